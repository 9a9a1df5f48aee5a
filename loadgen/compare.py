"""`tlbsim load compare`: two configurations of one scenario (or trace) on the same cluster
and seed, alternating A and B run by run, as one table of medians and B/A ratios with
their spread; `--sweep key=v1,v2,...` repeats the comparison for each value (a series)."""
from __future__ import annotations

import asyncio
import csv
import dataclasses
import statistics
from typing import Callable, Sequence

from loadgen.cluster import Cluster
from loadgen.metrics import COMPARED, VIRTUAL_KEYS, Metric, expand
from loadgen.runner import failed, run
from loadgen.scenarios import LABELS, RunConfig, headline

COMPARE_VERSION = 1


def compared(scenario: str, reports: Sequence[dict] = ()) -> list[Metric]:
    """What a comparison reports: the virtual-time figures the runs have (--timing
    virtual), then the scenario's headline, then every common metric
    (loadgen/metrics.py), each once."""
    first = leading(scenario, reports)
    seen = {m.path for m in first}
    return first + [m for m in expand(COMPARED, LABELS.get(scenario)) if m.path not in seen]


def leading(scenario: str, reports: Sequence[dict] = ()) -> list[Metric]:
    """The rows a comparison leads with: the virtual figures any run measured, then the
    scenario's (wall-clock) headline."""
    virtual = [m for m in expand(VIRTUAL_KEYS)
               if any(m.value(r) is not None for r in reports)]
    return virtual + headline(scenario)


def summarize(a_reports: list[dict], b_reports: list[dict], metrics: list[Metric],
              first: int = 0) -> list[dict]:
    """Per metric: medians of A and B, and the median B/A of the paired runs with its
    spread (min, max over the pairs). The first `first` metrics are the headline. A
    metric no run measured is left out, and so is one that was 0 in every run unless
    it is a safety count (its 0 is the news)."""
    rows = []
    for i, m in enumerate(metrics):
        a = [m.value(r) for r in a_reports]
        b = [m.value(r) for r in b_reports]
        if all(v is None for v in a + b):
            continue
        if i >= first and not m.safety and not any(a + b):
            continue
        a_ok = [v for v in a if v is not None]
        b_ok = [v for v in b if v is not None]
        ratios = [y / x for x, y in zip(a, b) if x is not None and y is not None and x]
        a_med = statistics.median(a_ok) if a_ok else None
        b_med = statistics.median(b_ok) if b_ok else None
        rows.append({
            "metric": m.path, "label": m.heading, "headline": i < first,
            "a": a_med, "b": b_med, "a_values": a, "b_values": b,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            # Not the same as `ratio` when the pairs vary (README, Comparing).
            "ratio_of_medians": b_med / a_med if a_med and b_med is not None else None,
        })
    return rows


def disagrees(row: dict) -> bool:
    """The median of the pair ratios and the ratio of the medians tell different
    stories: one above 1 and the other below, or one outside the pairs' spread."""
    r, rom = row["ratio"], row.get("ratio_of_medians")
    if r is None or rom is None:
        return False
    opposite = (r - 1) * (rom - 1) < 0 and abs(r - rom) > 0.05 * max(r, rom)
    outside = not row["ratio_min"] * 0.999 <= rom <= row["ratio_max"] * 1.001
    return opposite or outside


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
    everything = reports["A"] + reports["B"]
    metrics = compared(a.cfg.scenario, everything)
    return {
        "version": COMPARE_VERSION, "kind": "compare", "scenario": a.cfg.scenario,
        "repeat": repeat, "pairs": pairs, "interrupted": interrupted,
        "a": {"spec": a.spec, "config": a.cfg.as_dict(), "reports": reports["A"]},
        "b": {"spec": b.spec, "config": b.cfg.as_dict(), "reports": reports["B"]},
        "metrics": summarize(reports["A"][:pairs], reports["B"][:pairs], metrics,
                             first=len(leading(a.cfg.scenario, everything))),
        "unsafe": any(failed(r) for r in reports["A"] + reports["B"]),
    }


async def sweep(cluster: Cluster, key: str, values: list[str],
                sides: Callable[[str], tuple[Side, Side]], repeat: int,
                on_run: Callable[[str, int], None] = lambda side, i: None) -> dict:
    points = []
    interrupted = False
    for value in values:
        a, b = sides(value)
        def on_side(side: str, i: int, v: str = value) -> None:
            on_run(f"{key}={v} {side}", i)
        result = await compare(cluster, a, b, repeat, on_side)
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
    metrics = compared(result["scenario"], [r for point in points for side in ("a", "b")
                                            for r in point[side]["reports"]])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "sweep_key", "sweep_value", "side", "spec", "run",
                    *(m.path for m in metrics)])
        for point in points:
            for side in ("a", "b"):
                for i, report in enumerate(point[side]["reports"]):
                    w.writerow([result["scenario"], result.get("key", ""), point["value"],
                                side.upper(), point[side]["spec"], i + 1,
                                *(m.value(report) for m in metrics)])
