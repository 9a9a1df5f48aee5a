"""Workloads, one module each; the registry maps a scenario's name to its `run`.

A scenario's concurrent threads go through `Driver.gather` and its waits through
`Driver.pause`, never asyncio directly: that is what lets every scenario run in virtual
time (--timing virtual, loadgen/vsched.py), one operation at a time in virtual-time order.

A scenario drives CPUs through the cluster (`Driver`) and records what a client sees
(`Measurements`); the memory service and the coordinator count the rest.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from loadgen.metrics import Metric, expand
from loadgen.scenarios import (fault_scaling, fault_storm, flush_ceiling, fork, mixed,
                               mprotect, munmap, replay, shared_write, swapout, tlb_flush)
from loadgen.scenarios.base import Driver, Measurements, Progress, RunConfig

Scenario = Callable[[Driver, RunConfig, Progress], Awaitable[None]]
_MODULES = {"munmap": munmap, "tlb-flush": tlb_flush, "fault-scaling": fault_scaling,
            "fault-storm": fault_storm,
            "mprotect": mprotect, "mixed": mixed, "fork": fork, "shared-write": shared_write,
            "swapout": swapout, "flush-ceiling": flush_ceiling,
            "replay": replay}  # replay: a recorded trace (`--trace FILE`)
SCENARIOS: dict[str, Scenario] = {name: module.run for name, module in _MODULES.items()}
DOCS = {name: (module.__doc__ or "").strip().splitlines()[0]
        for name, module in _MODULES.items()}
# The options each scenario reads; the result keys it shows first (its headline: the
# run table's first rows, compare's first rows, the sweep's series, the plot's panels);
# and its own name for a result key where the catalogue's (loadgen/metrics.py) would
# mislead (tlb-flush times madvise calls as `munmap_latency_ms`).
OPTIONS: dict[str, tuple[str, ...]] = {
    name: module.OPTIONS for name, module in _MODULES.items()}
HEADLINES: dict[str, list[str]] = {name: module.HEADLINE for name, module in _MODULES.items()}
LABELS: dict[str, dict[str, str]] = {
    name: getattr(module, "LABELS", {}) for name, module in _MODULES.items()}
# A scenario's `check(cfg)` refuses (InvalidArgument) a configuration it cannot run,
# before the cluster is touched.
CHECKS: dict[str, Callable[[RunConfig], None]] = {
    name: module.check for name, module in _MODULES.items() if hasattr(module, "check")}


def check(cfg: RunConfig) -> None:
    if cfg.scenario in CHECKS:
        CHECKS[cfg.scenario](cfg)


def headline(scenario: str) -> list[Metric]:
    """The scenario's headline as metrics (a latency key: its p50 and p99)."""
    return expand(HEADLINES[scenario], LABELS[scenario])


__all__ = ["SCENARIOS", "DOCS", "OPTIONS", "HEADLINES", "LABELS", "CHECKS", "check",
           "Driver", "Measurements", "Progress", "RunConfig", "Scenario", "headline"]
