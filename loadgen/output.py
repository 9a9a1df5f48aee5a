"""What a run shows: a table on the terminal, a progress bar when it is a TTY,
the JSON report for scripts, and the oracle's verdict as the exit code."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loadgen.compare import disagrees
from loadgen.metrics import (LATENCIES, VIRTUAL_KEYS, expand, lookup, metric, number, ratio_text,
                             spread_text)
from loadgen.runner import failed
from loadgen.scenarios import HEADLINES, LABELS, OPTIONS, headline
from services.common import exitcodes
from services.common.errors import InvalidArgument
from services.common.policy import Policy

console = Console()
err_console = Console(stderr=True)

# --- the run table ------------------------------------------------------------------------
# A block is a titled group of (label, value) rows; the table shows the blocks in the
# order of BLOCKS, each function returning None (or no rows) when it has nothing to
# say. A block that must come before the headline is one more function at the front.
Block = tuple[str, list[tuple[str, str]]]

# What every run reports after its headline, when it measured it (a zero is left out).
RUN_KEYS = ["ops_per_s", "shootdowns", "full_flushes", "ipis", "ipis_elided", "broadcasts",
            "pages_freed", "faults", "faults_per_s", "tlb_hit_rate", "munmap_latency_ms", "fault_latency_ms",
            "lock_wait_ms", "contended_locks", "shootdown_latency_ms", "unshares",
            "reclaimed_pages", "lock_order_violations", "reports_lost"]
SAFETY_KEYS = ["stale_accesses", "audit_violations", "frames_freed_without_ack",
               "deadline_misses"]


def latency_text(value) -> str | None:
    """`1.23 / 4.56 ms` (p50 / p99), or None when nothing was timed."""
    if not isinstance(value, dict) or not (value.get("p50") or value.get("p99")):
        return None
    return f"{number(value['p50'])} / {number(value['p99'])} ms"


def key_row(results: dict, key: str, label: str | None = None,
            shown_if_zero: bool = True) -> tuple[str, str] | None:
    """One row for a result key: a latency as p50 / p99, anything else as its metric."""
    if key in LATENCIES:
        text = latency_text(lookup_dict(results, key))
        if text is None and not shown_if_zero:
            return None
        return f"{label or LATENCIES[key]} p50 / p99", text or "not measured"
    m = metric(key, label)
    value = m.value({"results": results})
    if value is None or (not value and not shown_if_zero):
        return None
    return m.heading, m.text(value)


def lookup_dict(results: dict, key: str):
    value: object = results
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def virtual_block(report: dict) -> Block | None:
    """--timing virtual: the run's answers in virtual time, first."""
    r = report["results"]
    if "virtual" not in r:
        return None
    rows = []
    for m in expand(VIRTUAL_KEYS):
        value = m.value(report)
        if value is not None and (value or m.path.endswith(("late_flush_hits", "inversions"))):
            rows.append((m.heading, m.text(value)))
    if r["virtual"].get("perturbed"):
        rows.insert(0, ("warning", "CPUs were fenced (deadline or lease missed): these "
                                   "figures depend on the host's load"))
    model = report["config"].get("cost_model", "")
    return f"virtual time (cost model {model}; rates per virtual second)", rows


def headline_block(report: dict) -> Block | None:
    scenario = report["scenario"]
    if scenario not in HEADLINES:
        return None
    labels = LABELS.get(scenario, {})
    rows = [key_row(report["results"], k, labels.get(k)) for k in HEADLINES[scenario]]
    title = "wall clock: headline" if "virtual" in report["results"] else "headline"
    return title, [r for r in rows if r]


def run_block(report: dict) -> Block:
    r = report["results"]
    shown = set(HEADLINES.get(report["scenario"], []))
    labels = LABELS.get(report["scenario"], {})
    rows = [("ops, duration", f"{r['ops']:,} in {r['duration_s']:.3f} s")]
    rows += [row for k in RUN_KEYS if k not in shown
             and (row := key_row(r, k, labels.get(k), shown_if_zero=False))]
    return "the run", rows


def safety_block(report: dict) -> Block:
    r = report["results"]
    rows = [key_row(r, k) for k in SAFETY_KEYS]
    fenced = r.get("fenced_cpus") or []
    rows.append(("CPUs fenced or lost at the end", ", ".join(map(str, fenced)) or "none"))
    return "safety", [row for row in rows if row]


BLOCKS: list[Callable[[dict], Block | None]] = [virtual_block, headline_block, run_block,
                                                safety_block]


def report_blocks(report: dict) -> list[Block]:
    return [b for build in BLOCKS if (b := build(report)) is not None and b[1]]


def describe(scenario: str, cfg: dict, swept: dict[str, str] | None = None) -> str:
    """The configuration in words: the workload options the scenario reads, then the
    policy (flush, lock, transport, and whatever differs from the defaults). `swept`
    gives the text of an option a sweep varies (`pages`: "1, 8, 64, 512")."""
    swept = swept or {}
    uses = OPTIONS.get(scenario, ("cpus", "pages", "rounds"))
    words = []
    if scenario == "replay" and cfg.get("trace"):
        words.append(f"trace {os.path.basename(cfg['trace'])}")

    def counted(key: str, one: str, many: str) -> str:
        if key in swept:
            return f"{swept[key]} {many}"
        n = cfg[key]
        return f"{n:,} {one if n == 1 else many}"

    for key in uses:
        if key == "cpus":
            words.append(counted("cpus", "CPU", "CPUs"))
        elif key == "rounds" and cfg.get("duration_s") and "rounds" not in swept:
            words.append(f"for {number(cfg['duration_s'])} s")
        elif key == "rounds" and cfg.get("ops") and "rounds" not in swept:
            words.append(f"until {cfg['ops']:,} ops")
        elif key == "rounds":
            words.append(counted("rounds", "round", "rounds"))
        elif key == "pages":
            words.append(counted("pages", "page", "pages"))
        elif key == "resident":
            words.append(counted("resident", "resident page", "resident pages"))
        elif key == "children":
            words.append(counted("children", "child", "children"))
    return ", ".join(words) + "; " + policy_text(cfg, swept)


def policy_text(cfg: dict, swept: dict[str, str] | None = None) -> str:
    swept = swept or {}
    default = Policy().as_dict()
    always = ("flush", "lock", "transport")
    shown = list(always) + [k for k in default if k not in always and k in cfg
                            and (cfg[k] != default[k] or k in swept)]
    return " ".join(f"{k.replace('_', '-')}="
                    f"{swept[k] if k in swept else _flag(cfg[k])}" for k in shown)


def _flag(v) -> str:
    return {True: "on", False: "off"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def named(scenario: str, reports: list[dict]) -> str:
    """The scenario, and for a trace its file and the traced command."""
    if scenario != "replay" or not reports:
        return scenario
    cfg, rep = reports[0]["config"], reports[0]["results"].get("replay", {})
    command = " ".join(rep.get("command") or [])
    name = os.path.basename(cfg.get("trace") or "") or "a trace"
    return f"replay of {name}" + (f" ({command})" if command else "")


def trace_notes(rep: dict | None) -> list[str]:
    """What a trace cannot show, said where its policies are compared: a trace without
    page accesses flushes nothing; one whose address spaces each ran on one CPU sends
    no IPI."""
    if not rep:
        return []
    if not rep.get("access_pages"):
        return ["This trace holds no page accesses (recorded without --accesses): no page "
                "is ever faulted in, so its munmaps clear no PTE and per-page and gathered "
                "flushing send the same shootdowns (only freed page tables flush). Record "
                "it with `tlbsim trace record --accesses`."]
    if not rep.get("address_spaces_on_several_cpus"):
        return ["No address space of this trace had its pages touched from two CPUs (each "
                "process ran one thread): a shootdown has no target but its initiator, so "
                "IPIs are 0 whatever the policy. The multi-threaded trace "
                "tests/fixtures/traces/threads-munmap.tlbt.gz is one where they are not."]
    return []


def replay_of(result: dict) -> dict | None:
    """A comparison's trace summary (the first run's), if it compared a trace."""
    reports = result.get("a", {}).get("reports") or []
    return reports[0]["results"].get("replay") if reports else None


def print_report(report: dict) -> None:
    r = report["results"]
    table = Table(title=f"{report['scenario']}: {describe(report['scenario'], report['config'])}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for i, (title, rows) in enumerate(report_blocks(report)):
        if i:
            table.add_section()
        table.add_row(f"[bold]{title}[/bold]", "")
        for label, value in rows:
            table.add_row(f"  {label}", value)
    console.print(table)
    if "modelled" in r:
        print_modelled(r)
    if "replay" in r:
        print_replay(r["replay"])
    if report.get("interrupted"):
        err_console.print("interrupted: the report covers what ran before Ctrl-C")
    for v in report.get("violations", []):
        err_console.print(f"audit: {v}", markup=False)
    if r.get("lock_order_reports"):
        err_console.print(f"lock validator: {r['lock_order_violations']:,} inversions refused; "
                          f"the first: {r['lock_order_reports'][0]}", markup=False)


def print_modelled(r: dict) -> None:
    """Modelled hardware time next to the wall time: the run, per round, per access, per
    shootdown and per call of each kind of system call."""
    md = r["modelled"]
    parts = ", ".join(f"{k} {v:,.1f}" for k, v in md["components_us"].items() if v)
    table = Table(title=f"modelled work: event counts x costs, summed (cost model "
                        f"{md['cost_model']['name']}"
                        + (", after the warm-up" if md.get("from_warm") else "")
                        + "; not elapsed time)")
    for col in ("what", "wall", "modelled work"):
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
                     keys: list[str], virtual: Sequence[dict] = (),
                     virtual_keys: Sequence[str] = ()) -> None:
    """Reports side by side (the demo): one row per result key, and B/A for two. With
    `virtual` (the same configurations run in virtual time), their `virtual_keys` come
    first under their own heading, the wall-clock rows below under theirs."""
    table = Table(title=title)
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    two = len(reports) == 2
    if two:
        table.add_column("B/A", justify="right")
    if virtual:
        table.add_row("[bold]virtual time[/bold] (cost model, per virtual second)", "")
        for m in expand(virtual_keys):
            values = [m.value(rep) for rep in virtual]
            if all(v is None for v in values):
                continue
            row = [m.text(v) for v in values]
            if two:
                a, b = values
                row.append(ratio_text(b / a) if a and b is not None else "-")
            table.add_row(f"  {m.heading}", *row)
        table.add_section()
        table.add_row("[bold]wall clock[/bold] (this machine, Python and gRPC)", "")
    for key in keys:
        cells = [key_row(rep["results"], key) for rep in reports]
        label = next((c[0] for c in cells if c), key)
        row = [c[1] if c else "-" for c in cells]
        if two:
            path = f"{key}.p50" if key in LATENCIES else key
            a, b = (lookup(rep["results"], path) for rep in reports)
            row.append(ratio_text(b / a) if a and b is not None else "-")
        table.add_row(f"  {label}" if virtual else label, *row)
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
    for note in trace_notes(rep):
        console.print(f"note: {note}", markup=False)
    if rep.get("unknown_syscalls"):
        console.print("not simulated (counted, not replayed): " + ", ".join(
            f"{k} x{v}" for k, v in rep["unknown_syscalls"].items()))
    if rep.get("advice_without_effect"):
        console.print("madvise advice without a simulated effect: " + ", ".join(
            f"{k} x{v}" for k, v in rep["advice_without_effect"].items()))


def _spread(row: dict) -> str:
    return spread_text(row["ratio_min"], row["ratio_max"])


def _pairs(n: int) -> str:
    return f"{n} alternating pair{'s' * (n != 1)}"


DISAGREE_NOTE = ("* the median of the pair ratios and the ratio of the medians disagree: "
                 "the pairs vary (see the spread). B/A compares each B run with the A run "
                 "just before it, which a drifting machine hits alike; the medians do not.")


def compare_caption(result: dict, swept: dict[str, str] | None = None) -> str:
    """What each side ran: its whole configuration (a sweep: the values it took)."""
    return "\n".join(f"{s.upper()}: "
                     f"{describe(result['scenario'], result[s]['config'], swept)}"
                     for s in ("a", "b"))


def swept_values(result: dict) -> dict[str, str]:
    """{config key: "1, 8, 64"} of a sweep."""
    dest = result["key"].lstrip("-").replace("-", "_")  # the option's name, as --a takes it
    key = {"deadline": "deadline_s", "duration": "duration_s"}.get(dest, dest)
    return {key: ", ".join(map(str, result["values"]))}


def print_compare(result: dict) -> None:
    reports = result["a"]["reports"]
    table = Table(title=f"{named(result['scenario'], reports)}: "
                        f"A = {result['a']['spec'] or 'defaults'}, "
                        f"B = {result['b']['spec'] or 'defaults'} "
                        f"({_pairs(result['pairs'])}; medians)",
                  caption=compare_caption(result), caption_justify="left")
    for col in ("metric", "A", "B", "B/A", "B/A spread"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    flagged = False
    was_headline = True
    for row in result["metrics"]:
        if was_headline and not row.get("headline"):
            table.add_section()
            was_headline = False
        m = metric(row["metric"])
        mark = "*" if disagrees(row) else ""
        flagged |= bool(mark)
        table.add_row(row["label"], m.text(row["a"]), m.text(row["b"]),
                      ratio_text(row["ratio"]) + mark, _spread(row))
    console.print(table)
    if flagged:
        console.print(DISAGREE_NOTE)
    for note in trace_notes(replay_of(result)):
        console.print(f"note: {note}", markup=False)
    if result.get("interrupted"):
        err_console.print("interrupted: the table covers the pairs completed before Ctrl-C")


def print_sweep(result: dict) -> None:
    """One small table per headline metric: the swept value down, A, B and B/A across."""
    key = result["key"]
    points = result["points"]
    first = points[0] if points else {}
    console.print(f"[bold]{named(result['scenario'], first.get('a', {}).get('reports', []))}: "
                  f"sweep of {key}[/bold]; "
                  f"A = {result['a_spec'] or 'defaults'}, B = {result['b_spec'] or 'defaults'}; "
                  f"{_pairs(first.get('pairs', 0))} per value")
    if first:
        console.print(compare_caption(first, swept_values(result)), markup=False)
    flagged = False
    for m in headline(result["scenario"]):
        rows = [{r["metric"]: r for r in p["metrics"]}.get(m.path) for p in points]
        if not any(rows):
            continue
        table = Table(title=m.heading, title_justify="left")
        for col in (key, "A", "B", "B/A", "B/A spread"):
            table.add_column(col, justify="left" if col == key else "right")
        for p, row in zip(points, rows):
            if row is None:
                table.add_row(str(p["value"]), "-", "-", "-", "")
                continue
            mark = "*" if disagrees(row) else ""
            flagged |= bool(mark)
            table.add_row(str(p["value"]), m.text(row["a"]), m.text(row["b"]),
                          ratio_text(row["ratio"]) + mark, _spread(row))
        console.print(table)
    if flagged:
        console.print(DISAGREE_NOTE)
    for note in trace_notes(replay_of(first) if first else None):
        console.print(f"note: {note}", markup=False)
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


@contextlib.contextmanager
def status(label: str) -> Iterator[Callable[[str], None]]:
    """A one-line status on a terminal (what runs now); on a pipe, one line per step on
    stderr, so a long run shows progress in a log too."""
    if not console.is_terminal:
        yield lambda text: err_console.print(f"{label}: {text}", markup=False)
        return
    with console.status(label) as s:
        yield lambda text: s.update(f"{label}: {text}")
