"""What a run shows: a table on the terminal, a progress bar when it is a TTY,
the JSON report for scripts, and the oracle's verdict as the exit code."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loadgen.runner import failed

console = Console()
err_console = Console(stderr=True)

# (label, result key, format) for the single-run table.
ROWS = [
    ("ops", "ops", "{}"), ("duration", "duration_s", "{:.3f} s"),
    ("shootdowns", "shootdowns", "{}"), ("full flushes", "full_flushes", "{}"),
    ("IPIs (flush deliveries)", "ipis", "{}"), ("IPIs that found nothing", "ipis_elided", "{}"),
    ("pages freed", "pages_freed", "{}"), ("faults", "faults", "{}"),
    ("faults/s", "faults_per_s", "{}"), ("TLB hit rate", "tlb_hit_rate", "{:.2%}"),
    ("munmap latency p50 / p99", "munmap_latency_ms", "ms"),
    ("fault latency p50 / p99", "fault_latency_ms", "ms"),
    ("lock wait p50 / p99", "lock_wait_ms", "ms"),
    ("shootdown latency p50 / p99", "shootdown_latency_ms", "ms"),
    ("fenced CPUs", "fenced_cpus", "{}"),
    ("stale accesses", "stale_accesses", "{}"), ("audit violations", "audit_violations", "{}"),
]


def fmt(value, how: str) -> str:
    if how == "ms":
        return f"{value['p50']:.3f} / {value['p99']:.3f} ms"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return how.format(value)


def print_report(report: dict) -> None:
    r = report["results"]
    cfg = report["config"]
    title = (f"{report['scenario']}: {cfg['cpus']} CPUs, {cfg['pages']} pages, "
             f"flush={cfg['flush']} lock={cfg['lock']} transport={cfg['transport']}"
             + (f" unsafe={cfg['unsafe']}" if cfg["unsafe"] != "none" else ""))
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, how in ROWS:
        table.add_row(label, fmt(r[key], how))
    console.print(table)
    if report.get("interrupted"):
        err_console.print("interrupted: the report covers what ran before Ctrl-C")
    for v in report.get("violations", []):
        err_console.print(f"audit: {v}", markup=False)


def print_comparison(title: str, labels: list[str], reports: list[dict],
                     rows: list[tuple[str, str, str]]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    if len(reports) == 2:
        table.add_column("B/A", justify="right")
    for label, key, how in rows:
        values = [rep["results"][key] for rep in reports]
        cells = [fmt(v, how) for v in values]
        if len(reports) == 2:
            a, b = (v["p50"] if isinstance(v, dict) else v for v in values)
            cells.append(f"{b / a:.3g}x" if isinstance(a, (int, float)) and a else "-")
        table.add_row(label, *cells)
    console.print(table)


def write_json(doc: dict, path: str | None) -> None:
    if not path:
        return
    text = json.dumps(doc, indent=2, sort_keys=True)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def verdict(report: dict) -> int:
    if failed(report):
        r = report["results"]
        err_console.print(f"oracle: {r['stale_accesses']} stale accesses, "
                          f"{r['audit_violations']} audit violations — the run is unsafe")
        return 1
    return 0


@contextlib.contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; silent when stdout is a pipe or file."""
    if not console.is_terminal or total < 2:
        yield lambda done: None
        return
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)
