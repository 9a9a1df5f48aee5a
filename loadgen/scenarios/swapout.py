"""swapout — reclaim, "the only VM operation that ever is nonlocal" (Linus, 2002).

A parent with --resident pages forks --children; they (the sharers) run on the first
half of the CPUs and keep reading their shared range, a bystander process runs on the
other CPUs, and each round a pressure process allocates --pages pages past the
--frames budget, so reclaim unmaps the oldest pages — many through shared tables —
with one batched flush, then frees them. Its targets: every CPU (`all-cpus`), the
union of the sharers' CPUs (`sharer-union`), or only the changing mm's
(`unsafe-mm-only`: the other sharers' CPUs keep using freed pages; the oracle fails
the run). Look at reclaimed pages, reclaim IPIs per reclaimed page, stale accesses.
"""
from __future__ import annotations

import random

from loadgen.scenarios import sharing
from loadgen.scenarios.base import Driver, Progress, RunConfig, pages_at
from services.common.errors import InvalidArgument
from tlbsim.v1 import common_pb2, memory_pb2

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'pages', 'rounds', 'resident', 'children', 'fork', 'frames')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["reclaimed_pages", "reclaim_ipis_per_page", "reclaim_ipis", "swap_outs",
            "swap_ins"]


def check(cfg: RunConfig) -> None:
    if not cfg.policy.frames:
        raise InvalidArgument("swapout needs memory pressure: give --frames, e.g. "
                              "--frames 2048 with --resident 1536 --pages 512")
    if cfg.cpus < 3:
        raise InvalidArgument("swapout needs --cpus 3 or more: sharers, pressure, bystander")


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    check(cfg)
    cpus = d.cluster.cpus[:cfg.cpus]
    half = max(2, len(cpus) // 2)
    sharers_cpus, others = cpus[:half], cpus[half:]
    rnd = random.Random(cfg.seed)
    mm, base = await sharing.parent(d, cfg, sharers_cpus[0])
    children = await sharing.fork(d, sharers_cpus[0], cfg.children)
    runs = [mm, *children]
    placement = list(zip(sharers_cpus, runs))  # one process per sharer CPU
    for cpu, who in placement:
        await d.switch(cpu, who)
    bystander = await d.new_process(others)  # CPUs that run something else
    pressure_cpu = others[0]
    before = await d.cluster.memory.Stats(memory_pb2.MemoryStatsRequest())
    for _ in d.rounds(cfg, progress):
        for cpu, _who in placement:  # the sharers cache translations of the shared range
            await d.access(cpu, sharing.sample(cfg, base, 256, rnd))
        await d.new_process([pressure_cpu])  # the pressure: a fresh process each round
        r = await d.syscall(pressure_cpu, mmap=common_pb2.MmapArgs(pages=cfg.pages,
                                                                  writable=True))
        await d.access(pressure_cpu, pages_at(r.address, cfg.pages), write=True)
        for cpu, _who in placement:  # use what they cached: stale if never flushed
            await d.access(cpu, sharing.sample(cfg, base, 256, rnd))
        await d.syscall(pressure_cpu, exit=common_pb2.ExitArgs())
        await d.switch(pressure_cpu, bystander)
    after = await d.cluster.memory.Stats(memory_pb2.MemoryStatsRequest())
    reclaimed = after.reclaimed_pages - before.reclaimed_pages
    ipis = after.reclaim_ipis - before.reclaim_ipis
    d.m.extra.update(
        reclaim_ipis_per_page=round(ipis / reclaimed, 4) if reclaimed else 0.0,
        reclaim_flushes_per_page=round(
            (after.reclaim_shootdowns - before.reclaim_shootdowns) / reclaimed, 4)
        if reclaimed else 0.0,
        sharer_cpus=[c.id for c in sharers_cpus])
