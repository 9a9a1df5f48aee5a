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
from services.common import exitcodes
from services.common.errors import InvalidArgument

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
    if "modelled" in r:
        print_modelled(r)
    if "replay" in r:
        print_replay(r["replay"])
    if report.get("interrupted"):
        err_console.print("interrupted: the report covers what ran before Ctrl-C")
    for v in report.get("violations", []):
        err_console.print(f"audit: {v}", markup=False)


def print_modelled(r: dict) -> None:
    """Modelled hardware time next to the wall time: the run, per round, per access, per
    shootdown and per call of each kind of system call."""
    md = r["modelled"]
    parts = ", ".join(f"{k} {v:,.1f}" for k, v in md["components_us"].items() if v)
    table = Table(title=f"modelled time (cost model {md['cost_model']['name']}"
                        + (", after the warm-up" if md.get("from_warm") else "") + ")")
    for col in ("what", "wall", "modelled"):
        table.add_column(col, justify="left" if col == "what" else "right")
    table.add_row("run", f"{r['duration_s']:.3f} s", f"{md['total_us']:,.3f} µs"
                  + (f" ({parts})" if parts else ""))
    table.add_row("per round", f"{r['duration_s'] / r['rounds'] * 1e3:.3f} ms"
                  if r["rounds"] else "-", f"{md['ns_per_round']:,.1f} ns")
    table.add_row("per access (walks, faults)", "-", f"{md['access_ns']:,.2f} ns")
    table.add_row("per shootdown (invalidations, IPIs)",
                  f"{r['shootdown_latency_ms']['p50']:.3f} ms p50",
                  f"{md['flush_ns_per_shootdown']:,.1f} ns")
    for kind, ns in md["syscall_ns"].items():
        wall = r.get("syscall_latency_ms", {}).get(kind)
        table.add_row(f"per {kind}", f"{wall['p50']:.3f} ms p50" if wall else "-",
                      f"{ns:,.1f} ns")
    console.print(table)


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


def print_replay(rep: dict) -> None:
    """The trace's calls as strace saw them, next to what the replay did with them."""
    table = Table(title=f"replay of {' '.join(rep.get('command') or [])} "
                        f"({rep.get('source')}): {rep['tasks']} tasks, "
                        f"{rep['address_spaces']} address spaces")
    for col in ("call", "in the trace", "replayed", "failed in trace", "no effect"):
        table.add_column(col, justify="right" if col != "call" else "left")
    for name, seen in rep["calls"].items():
        table.add_row(name, str(seen), str(rep["replayed"].get(name, 0)),
                      str(rep["failed_in_trace"].get(name, 0)), str(rep["no_effect"].get(name, 0)))
    console.print(table)
    extras = {k: rep[k] for k in ("mm_switches", "implicit_munmaps", "implicit_mappings",
                                  "accesses_outside_mappings", "access_pages",
                                  "tasks_alive_at_end") if rep.get(k)}
    if extras:
        console.print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in extras.items()))
    if rep.get("unknown_syscalls"):
        console.print("not simulated (counted, not replayed): " + ", ".join(
            f"{k} x{v}" for k, v in rep["unknown_syscalls"].items()))
    if rep.get("advice_without_effect"):
        console.print("madvise advice without a simulated effect: " + ", ".join(
            f"{k} x{v}" for k, v in rep["advice_without_effect"].items()))


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e12:
        return f"{int(v):,}"
    return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.1f}"


def _ratio(row: dict) -> tuple[str, str]:
    if row["ratio"] is None:
        return "-", "-"
    spread = (f"{row['ratio_min']:.3g}–{row['ratio_max']:.3g}"
              if row["ratio_min"] != row["ratio_max"] else "")
    return f"{row['ratio']:.3g}x", spread


def print_compare(result: dict) -> None:
    table = Table(title=f"{result['scenario']}: A = {result['a']['spec'] or 'defaults'}, "
                        f"B = {result['b']['spec'] or 'defaults'} "
                        f"({result['pairs']} alternating pairs; medians)")
    for col in ("metric", "A", "B", "B/A", "B/A spread"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in result["metrics"]:
        table.add_row(row["label"], _num(row["a"]), _num(row["b"]), *_ratio(row))
    console.print(table)
    if result.get("interrupted"):
        err_console.print("interrupted: the table covers the pairs completed before Ctrl-C")


def print_sweep(result: dict, keys: list[str]) -> None:
    table = Table(title=f"{result['scenario']}: sweep of {result['key']}; "
                        f"A = {result['a_spec'] or 'defaults'}, "
                        f"B = {result['b_spec'] or 'defaults'}")
    table.add_column(result["key"])
    for key in keys:
        for col in ("A", "B", "B/A"):
            table.add_column(f"{key} {col}", justify="right")
    for point in result["points"]:
        rows = {row["metric"]: row for row in point["metrics"]}
        cells = [str(point["value"])]
        for key in keys:
            row = rows.get(key)
            cells += ([_num(row["a"]), _num(row["b"]), _ratio(row)[0]] if row else ["-"] * 3)
        table.add_row(*cells)
    console.print(table)
    if result.get("interrupted"):
        err_console.print("interrupted: the table covers the points completed before Ctrl-C")


def write_json(doc: dict, path: str | None) -> None:
    if not path:
        return
    text = json.dumps(doc, indent=2, sort_keys=True)
    if path == "-":
        sys.stdout.write(text + "\n")
        return
    with written(path, "--json"):
        with open(path, "w") as f:
            f.write(text + "\n")


def write_plot(plot: Callable[[dict, str], None], doc: dict, path: str) -> None:
    with written(path, "--plot"):
        plot(doc, path)


@contextlib.contextmanager
def written(path: str, option: str) -> Iterator[None]:
    """A write that failed after the run (the disk filled up, the folder went away) is a
    one-line error; the path itself was checked before the run."""
    try:
        yield
    except OSError as e:
        raise InvalidArgument(f"{option} {path}: {e.strerror or e}") from None


def verdict(report: dict) -> int:
    if failed(report):
        r = report["results"]
        err_console.print(f"oracle: {r['stale_accesses']} stale accesses, "
                          f"{r['audit_violations']} audit violations — the run is unsafe")
        return exitcodes.UNSAFE
    return exitcodes.OK


@contextlib.contextmanager
def byte_progress(label: str, shown: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A line on a terminal's stderr with how much of a log was read and the pages it
    held; silent when stderr is not a terminal (or not `shown`)."""
    if not shown or not err_console.is_terminal:
        yield lambda read, pages: None
        return
    with err_console.status(f"{label}: starting") as status:
        def show(read: int, pages: int) -> None:
            status.update(f"{label}: {read / 2 ** 20:,.0f} MiB read, {pages:,} page accesses")
        yield show


@contextlib.contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; silent when stdout is a pipe or file."""
    if not console.is_terminal or total < 2:
        yield lambda done: None
        return
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)
