"""`tlbsim load compare`: two configurations of one scenario (or trace) on the same cluster
and seed, alternating A and B run by run, as one table of medians and B/A ratios with
their spread; `--sweep key=v1,v2,...` repeats the comparison for each value (a series)."""
from __future__ import annotations

import asyncio
import csv
import dataclasses
import statistics
from typing import Callable

from loadgen.cluster import Cluster
from loadgen.runner import failed, run
from loadgen.scenarios import RunConfig

COMPARE_VERSION = 1

# (label, path into results) of every scalar the comparison reports.
METRICS: list[tuple[str, str]] = [
    ("ops/s", "ops_per_s"), ("duration (s)", "duration_s"),
    ("shootdowns", "shootdowns"), ("IPIs", "ipis"), ("IPIs that found nothing", "ipis_elided"),
    ("full flushes", "full_flushes"), ("pages freed", "pages_freed"),
    ("faults", "faults"), ("faults/s", "faults_per_s"), ("TLB hit rate", "tlb_hit_rate"),
    ("munmap latency p50 (ms)", "munmap_latency_ms.p50"),
    ("munmap latency p99 (ms)", "munmap_latency_ms.p99"),
    ("fault latency p50 (ms)", "fault_latency_ms.p50"),
    ("fault latency p99 (ms)", "fault_latency_ms.p99"),
    ("lock wait p50 (ms)", "lock_wait_ms.p50"), ("lock wait p99 (ms)", "lock_wait_ms.p99"),
    ("contended lock acquisitions", "contended_locks"),
    ("shootdown latency p50 (ms)", "shootdown_latency_ms.p50"),
    ("shootdown latency p99 (ms)", "shootdown_latency_ms.p99"),
    ("stale accesses", "stale_accesses"), ("audit violations", "audit_violations"),
    # Modelled hardware time (the run's cost model), next to the wall times above.
    ("modelled time (µs)", "modelled.total_us"),
    ("modelled ns per round", "modelled.ns_per_round"),
    ("modelled ns per access", "modelled.access_ns"),
    ("modelled ns per shootdown", "modelled.flush_ns_per_shootdown"),
    ("modelled ns per munmap", "modelled.syscall_ns.munmap"),
    ("modelled ns per madvise", "modelled.syscall_ns.madvise_dontneed"),
    ("modelled ns per mprotect", "modelled.syscall_ns.mprotect"),
]
# What a sweep's table and plot show per scenario (the paper's y axis).
HEADLINE = {
    "munmap": ["ipis", "munmap_latency_ms.p50"],
    "fault-scaling": ["faulting_faults_per_s", "faults_per_s", "fault_latency_ms.p50"],
    "tlb-flush": ["madvise_per_s", "ipis"],
    "mprotect": ["syscall_latency_ms.mprotect.p50", "ipis"],
    "mixed": ["ops_per_s", "ipis"],
    "replay": ["shootdowns", "ipis"],
    "flush-ceiling": ["modelled.ns_per_round", "full_flushes"],
}
DEFAULT_HEADLINE = ["ops_per_s", "ipis"]


def metric(report: dict, path: str) -> float | None:
    value = report["results"]
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def headline(scenario: str) -> list[str]:
    return HEADLINE.get(scenario, DEFAULT_HEADLINE)


def summarize(a_reports: list[dict], b_reports: list[dict], paths: list[str]) -> list[dict]:
    """Per metric: medians of A and B, and the median B/A of the paired runs with its
    spread (min, max over the pairs)."""
    rows = []
    labels = dict((p, label) for label, p in METRICS)
    for path in paths:
        a = [metric(r, path) for r in a_reports]
        b = [metric(r, path) for r in b_reports]
        if all(v is None for v in a + b):
            continue
        a_ok = [v for v in a if v is not None]
        b_ok = [v for v in b if v is not None]
        ratios = [y / x for x, y in zip(a, b) if x is not None and y is not None and x]
        rows.append({
            "metric": path, "label": labels.get(path, path),
            "a": statistics.median(a_ok) if a_ok else None,
            "b": statistics.median(b_ok) if b_ok else None,
            "a_values": a, "b_values": b,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
        })
    return rows


@dataclasses.dataclass
class Side:
    label: str       # "A" / "B"
    spec: str        # what the user wrote, e.g. "flush=per-page"
    cfg: RunConfig


async def compare(cluster: Cluster, a: Side, b: Side, repeat: int,
                  on_run: Callable[[str, int], None] = lambda side, i: None) -> dict:
    """A, B, A, B, ... `repeat` pairs; stops early (interrupted) on Ctrl-C."""
    reports: dict[str, list[dict]] = {"A": [], "B": []}
    interrupted = False
    try:
        for i in range(repeat):
            for side in (a, b):
                on_run(side.label, i)
                report = await run(cluster, side.cfg)
                if report["interrupted"]:
                    interrupted = True
                    break
                reports[side.label].append(report)
            if interrupted:
                break
    except (asyncio.CancelledError, KeyboardInterrupt):
        interrupted = True
    pairs = min(len(reports["A"]), len(reports["B"]))
    paths = [p for _, p in METRICS] + [p for p in headline(a.cfg.scenario)
                                       if p not in {q for _, q in METRICS}]
    return {
        "version": COMPARE_VERSION, "kind": "compare", "scenario": a.cfg.scenario,
        "repeat": repeat, "pairs": pairs, "interrupted": interrupted,
        "a": {"spec": a.spec, "config": a.cfg.as_dict(), "reports": reports["A"]},
        "b": {"spec": b.spec, "config": b.cfg.as_dict(), "reports": reports["B"]},
        "metrics": summarize(reports["A"][:pairs], reports["B"][:pairs], paths),
        "unsafe": any(failed(r) for r in reports["A"] + reports["B"]),
    }


async def sweep(cluster: Cluster, key: str, values: list[str],
                sides: Callable[[str], tuple[Side, Side]], repeat: int,
                on_run: Callable[[str, int], None] = lambda side, i: None) -> dict:
    points = []
    interrupted = False
    for value in values:
        a, b = sides(value)
        result = await compare(cluster, a, b, repeat,
                               lambda side, i, v=value: on_run(f"{key}={v} {side}", i))
        points.append({"value": value, **result})
        if result["interrupted"]:
            interrupted = True
            break
    first = points[0] if points else {}
    return {"version": COMPARE_VERSION, "kind": "sweep", "scenario": first.get("scenario"),
            "key": key, "values": values, "repeat": repeat, "interrupted": interrupted,
            "a_spec": first.get("a", {}).get("spec"), "b_spec": first.get("b", {}).get("spec"),
            "points": points, "unsafe": any(p["unsafe"] for p in points)}


def write_csv(result: dict, path: str) -> None:
    """One row per run: the sweep value (if any), the side, the repeat, every metric."""
    points = result["points"] if result["kind"] == "sweep" else [{"value": "", **result}]
    paths = [p for _, p in METRICS]
    for p in headline(result["scenario"] or ""):
        if p not in paths:
            paths.append(p)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "sweep_key", "sweep_value", "side", "spec", "run", *paths])
        for point in points:
            for side in ("a", "b"):
                for i, report in enumerate(point[side]["reports"]):
                    w.writerow([result["scenario"], result.get("key", ""), point["value"],
                                side.upper(), point[side]["spec"], i + 1,
                                *(metric(report, p) for p in paths)])
