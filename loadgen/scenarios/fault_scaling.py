"""fault-scaling — the split page-table lock case (SGI's thp_pthread, will-it-scale tlb_flush1).

Hugh Dickins, 2005: "many-threaded application which concurrently initializes
different parts of a large anonymous area". Half the threads (CPUs N/2..N-1, the
faulters) fault disjoint 2 MiB regions of one mm, 64 pages per request, while the other
half (CPUs 0..N/2-1, the churners) each write 32 pages of their own 2 MiB and
madvise(DONTNEED) them one page at a time (will-it-scale tlb_flush1), so shootdowns come
back to back, each one while holding the lock of the churner's table — the mm's one
page_table_lock in `--lock mm` mode, that table's own ptl in `split` mode. With `mm` a
fault waits for whichever shootdown is in flight; with `split` it does not. Look at
`results.faulting_faults_per_s` (the faulters' rate while the churn runs), fault latency
and lock wait, mm vs split.
"""
from __future__ import annotations

import asyncio
import time

from loadgen.scenarios.base import Cpu, Driver, Progress, RunConfig, pages_at
from services.common.addresses import PAGE_SIZE, PTE_TABLE_PAGES
from services.common.errors import InvalidArgument
from tlbsim.v1 import common_pb2

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'pages', 'rounds')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["faulting_faults_per_s", "fault_latency_ms", "lock_wait_ms", "contended_locks"]
LABELS = {"munmap_latency_ms": "madvise latency"}  # the churners' calls


CHURN_BATCH = 32  # pages a churner writes in one request, then madvises one by one
CHURN_HEAD_START_S = 0.05  # wall clock: the churners are under way before the faults start


def check(cfg: RunConfig) -> None:
    if cfg.cpus < 2:
        raise InvalidArgument("fault-scaling needs --cpus 2 or more: half unmap, the rest fault")


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    check(cfg)
    cpus = d.cluster.cpus[:cfg.cpus]
    nchurn = max(1, len(cpus) // 2)
    churners, faulters = cpus[:nchurn], cpus[nchurn:]
    await d.new_process(cpus)
    region = max(cfg.pages, PTE_TABLE_PAGES)
    # Each churner's own 2 MiB: it stays mapped, so every zap flushes under that
    # table's lock (the mm's page_table_lock in mm mode) and frees no table.
    own = {c.id: (await d.syscall(c, mmap=common_pb2.MmapArgs(
        pages=PTE_TABLE_PAGES, writable=True))).address for c in churners}
    faulting_s, faulting_ns = 0.0, 0
    faulter_faults = 0
    for rnd in d.rounds(cfg, progress):
        regions = [(await d.syscall(churners[0], mmap=common_pb2.MmapArgs(
            pages=region, writable=True))).address for _ in faulters]
        done = asyncio.Event()

        async def churn(cpu: Cpu) -> None:
            # will-it-scale tlb_flush1: write pages, madvise(DONTNEED) them one by one,
            # so the shootdowns (each under the table's lock) come back to back.
            page = 0
            while not done.is_set():
                first = page % PTE_TABLE_PAGES
                await d.access(cpu, pages_at(own[cpu.id] + first * PAGE_SIZE, CHURN_BATCH),
                               write=True)
                for i in range(CHURN_BATCH):
                    if done.is_set():
                        break
                    t0 = time.perf_counter()
                    await d.syscall(cpu, madvise_dontneed=common_pb2.RangeArgs(
                        address=own[cpu.id] + (first + i) * PAGE_SIZE, pages=1))
                    d.m.munmap_latency_s.append(time.perf_counter() - t0)
                page += CHURN_BATCH

        async def fault_in(cpu: Cpu, base: int) -> None:
            nonlocal faulter_faults
            for chunk in range(0, region, 64):
                if not d.time_left(cfg):
                    return
                r = await d.access(cpu, pages_at(base + chunk * PAGE_SIZE, 64), write=True)
                faulter_faults += r.faults if r is not None else 0

        async def faulting() -> None:
            nonlocal faulting_s, faulting_ns
            if d.virtual is None:  # the churn is under way (in virtual time: together)
                await asyncio.sleep(CHURN_HEAD_START_S)
            d.start_together(faulters, max(d.now(c) for c in churners))
            t0, v0 = time.perf_counter(), max(d.now(c) for c in faulters)
            await d.gather(*(fault_in(c, base) for c, base in zip(faulters, regions)))
            faulting_s += time.perf_counter() - t0
            faulting_ns += max(d.now(c) for c in faulters) - v0
            done.set()

        await d.gather(*(churn(c) for c in churners), faulting())
        for base in regions:
            await d.syscall(churners[0], munmap=common_pb2.RangeArgs(address=base, pages=region))
    # The faulters' own rate while the churn runs: the number the lock mode changes.
    d.m.extra["faulting_faults_per_s"] = round(faulter_faults / faulting_s, 1) \
        if faulting_s else 0.0
    if d.virtual is not None:
        d.m.vextra["faulting_faults_per_s"] = \
            round(faulter_faults * 1e9 / faulting_ns, 1) if faulting_ns else 0.0
