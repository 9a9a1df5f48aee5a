"""What the page-table sharing scenarios share: a parent process with resident pages
(mapped with MAP_POPULATE, so no fault per page) and its forked children."""
from __future__ import annotations

import random

from loadgen.scenarios.base import Cpu, Driver, RunConfig, pages_at
from tlbsim.v1 import common_pb2


async def parent(d: Driver, cfg: RunConfig, cpu: Cpu) -> tuple[int, int]:
    """A process on `cpu` with --resident pages faulted in; returns (mm, base address)."""
    mm = await d.new_process([cpu])
    r = await d.syscall(cpu, mmap=common_pb2.MmapArgs(pages=cfg.resident, writable=True,
                                                     populate=True))
    return mm, r.address


async def fork(d: Driver, cpu: Cpu, n: int) -> list[int]:
    """Fork n children of the mm `cpu` runs; their mms."""
    return [(await d.syscall(cpu, fork=common_pb2.ForkArgs())).child_mm for _ in range(n)]


def sample(cfg: RunConfig, base: int, n: int, rnd: random.Random) -> list[int]:
    """n distinct resident pages, spread at random (the scenario's --seed)."""
    return sorted(rnd.sample(pages_at(base, cfg.resident), min(n, cfg.resident)))
