"""Workloads, one module each; the registry maps a scenario's name to its `run`.

A scenario drives CPUs through the cluster (`Driver`) and records what a client sees
(`Measurements`); the memory service and the coordinator count the rest.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from loadgen.scenarios import fault_scaling, munmap
from loadgen.scenarios.base import Driver, Measurements, Progress, RunConfig

Scenario = Callable[[Driver, RunConfig, Progress], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {"munmap": munmap.run, "fault-scaling": fault_scaling.run}
DOCS = {name: (module.__doc__ or "").strip().splitlines()[0]
        for name, module in (("munmap", munmap), ("fault-scaling", fault_scaling))}

__all__ = ["SCENARIOS", "DOCS", "Driver", "Measurements", "Progress", "RunConfig", "Scenario"]
