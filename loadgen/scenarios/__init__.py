"""Workloads, one module each; the registry maps a scenario's name to its `run`.

A scenario drives CPUs through the cluster (`Driver`) and records what a client sees
(`Measurements`); the memory service and the coordinator count the rest.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from loadgen.scenarios import (fault_scaling, flush_ceiling, fork, mixed, mprotect, munmap,
                               replay, shared_write, swapout, tlb_flush)
from loadgen.scenarios.base import Driver, Measurements, Progress, RunConfig

Scenario = Callable[[Driver, RunConfig, Progress], Awaitable[None]]
_MODULES = {"munmap": munmap, "tlb-flush": tlb_flush, "fault-scaling": fault_scaling,
            "mprotect": mprotect, "mixed": mixed, "fork": fork, "shared-write": shared_write,
            "swapout": swapout, "flush-ceiling": flush_ceiling,
            "replay": replay}  # replay: a recorded trace (`--trace FILE`)
SCENARIOS: dict[str, Scenario] = {name: module.run for name, module in _MODULES.items()}
DOCS = {name: (module.__doc__ or "").strip().splitlines()[0]
        for name, module in _MODULES.items()}

__all__ = ["SCENARIOS", "DOCS", "Driver", "Measurements", "Progress", "RunConfig", "Scenario"]
