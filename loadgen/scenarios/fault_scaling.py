"""fault-scaling — the split page-table lock case.

Hugh Dickins, 2005: "many-threaded application which concurrently initializes
different parts of a large anonymous area". Threads on CPUs 1..N-1 fault disjoint
2 MiB regions while CPU 0 writes and madvise(DONTNEED)s pages of its own 2 MiB
(will-it-scale tlb_flush1), holding that table's lock across each shootdown. Look
at faults/s, fault latency and lock wait, mm vs split.
"""
from __future__ import annotations

import asyncio
import time

from loadgen.scenarios.base import Cpu, Driver, Progress, RunConfig, pages_at
from services.common.addresses import PAGE_SIZE, PTE_TABLE_PAGES
from services.common.errors import FailedPrecondition
from tlbsim.v1 import common_pb2


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    if len(cpus) < 2:
        raise FailedPrecondition("fault-scaling needs at least 2 CPUs: one unmaps, the rest fault")
    churner, faulters = cpus[0], cpus[1:]
    await d.new_process(cpus)
    region = max(cfg.pages, PTE_TABLE_PAGES)
    # The churner's own 2 MiB: it stays mapped, so every zap flushes under that
    # table's lock (the mm's page_table_lock in mm mode) and frees no table.
    own = (await d.syscall(churner, mmap=common_pb2.MmapArgs(pages=PTE_TABLE_PAGES,
                                                            writable=True))).address
    for rnd in range(cfg.rounds):
        regions = [(await d.syscall(churner, mmap=common_pb2.MmapArgs(
            pages=region, writable=True))).address for _ in faulters]
        done = asyncio.Event()

        async def churn() -> None:
            # will-it-scale tlb_flush1: write a page, madvise(DONTNEED) it, again.
            page = 0
            while not done.is_set():
                address = own + (page % PTE_TABLE_PAGES) * PAGE_SIZE
                await d.access(churner, [address], write=True)
                t0 = time.perf_counter()
                await d.syscall(churner, madvise_dontneed=common_pb2.RangeArgs(
                    address=address, pages=1))
                d.m.munmap_latency_s.append(time.perf_counter() - t0)
                page += 1

        async def fault_in(cpu: Cpu, base: int) -> None:
            for chunk in range(0, region, 64):
                await d.access(cpu, pages_at(base + chunk * PAGE_SIZE, 64), write=True)

        churning = asyncio.create_task(churn())
        await asyncio.gather(*(fault_in(c, base) for c, base in zip(faulters, regions)))
        done.set()
        await churning
        for base in regions:
            await d.syscall(churner, munmap=common_pb2.RangeArgs(address=base, pages=region))
        d.m.rounds_done = rnd + 1
        progress(rnd + 1)
