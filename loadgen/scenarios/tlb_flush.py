"""tlb-flush — will-it-scale tlb_flush1/2: threads write a page, then madvise(DONTNEED) it.

will-it-scale (Anton Blanchard; the benchmark Linux's TLB-flush changes are measured
with) runs N threads of one process; each loops over its own mapping: write a page,
madvise(MADV_DONTNEED) it, next page. tlb_flush2 uses 1 MB of anonymous memory;
tlb_flush1 a private file mapping, which the simulator models as anonymous memory (the
flush behaviour is the same). Here one thread per CPU (--cpus) owns --pages pages; a
round is one pass of every thread over its pages. Every madvise clears one PTE and
sends one shootdown to the other threads' CPUs. Look at madvise ops/s
(`results.ops_per_s`), IPIs per madvise and madvise latency
(`results.munmap_latency_ms`), per transport and per CPU count.
"""
from __future__ import annotations

import time

from loadgen.scenarios.base import Cpu, Driver, Progress, RunConfig
from services.common.addresses import PAGE_SIZE
from tlbsim.v1 import common_pb2

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'pages', 'rounds')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["madvise_per_s", "ipis", "munmap_latency_ms"]
LABELS = {"munmap_latency_ms": "madvise latency"}


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    await d.new_process(cpus)
    regions = {c.id: (await d.syscall(c, mmap=common_pb2.MmapArgs(
        pages=cfg.pages, writable=True))).address for c in cpus}
    madvises = 0

    async def thread(cpu: Cpu) -> None:
        nonlocal madvises
        for page in range(cfg.pages):
            if not d.time_left(cfg) or cpu.id in d.m.lost_cpus:
                return
            address = regions[cpu.id] + page * PAGE_SIZE
            await d.access(cpu, [address], write=True)
            t0 = time.perf_counter()
            await d.syscall(cpu, madvise_dontneed=common_pb2.RangeArgs(address=address,
                                                                       pages=1))
            d.m.munmap_latency_s.append(time.perf_counter() - t0)
            madvises += 1

    t0 = time.perf_counter()
    for _ in d.rounds(cfg, progress):
        await d.gather(*(thread(c) for c in d.live(cpus)))
    elapsed = time.perf_counter() - t0
    d.m.extra["madvise_per_s"] = round(madvises / elapsed, 1) if elapsed else 0.0
