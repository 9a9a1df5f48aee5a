"""mprotect — threads read while one thread mprotects ranges (Alex Shi's `mprotect -t N`).

Alex Shi's range-flush test (the series that introduced x86's
tlb_single_page_flush_ceiling, 2012) times mprotect while N threads keep reading the
same mapping. Here one process maps --pages pages; every thread (one per CPU) touches
them; then the first thread, chunk after chunk of 16 pages, writes the chunk,
mprotects it read-only (the downgrade needs a shootdown to every reader's CPU) and
writable again (an upgrade needs none), while the others keep reading a sample of the
mapping. Look at shootdowns and IPIs per mprotect, the mprotect latency
(`results.syscall_latency_ms.mprotect`), full vs ranged flushes (`--ceiling`).
"""
from __future__ import annotations

import asyncio

from loadgen.scenarios.base import Cpu, Driver, Progress, RunConfig, pages_at
from services.common.addresses import PAGE_SIZE
from tlbsim.v1 import common_pb2

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'pages', 'rounds')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["syscall_latency_ms.mprotect", "shootdowns", "full_flushes", "ipis"]

CHUNK = 16               # pages per mprotect: below the ceiling, a ranged flush
READER_SAMPLE = 64       # pages a reader touches per request
READER_PAUSE_S = 0.0005


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    writer, others = cpus[0], cpus[1:]
    await d.new_process(cpus)
    base = (await d.syscall(writer, mmap=common_pb2.MmapArgs(pages=cfg.pages,
                                                             writable=True))).address
    addresses = pages_at(base, cfg.pages)
    await d.access(writer, addresses, write=True)
    await d.gather(*(d.access(c, addresses) for c in others))
    await d.audit()
    sample = addresses[::max(1, len(addresses) // READER_SAMPLE)]
    chunk = min(CHUNK, cfg.pages)

    for _ in d.rounds(cfg, progress):
        done = asyncio.Event()

        async def reader(cpu: Cpu) -> None:
            while not done.is_set():
                if await d.access(cpu, sample) is None:
                    return
                await d.pause(cpu, READER_PAUSE_S)

        async def write_protect() -> None:
            try:
                await d.pause(writer, 0)  # the readers are under way
                for first in range(0, cfg.pages - chunk + 1, chunk):
                    if not d.time_left(cfg):
                        break
                    address = base + first * PAGE_SIZE
                    await d.access(writer, pages_at(address, chunk), write=True)
                    await d.syscall(writer, mprotect=common_pb2.MprotectArgs(
                        address=address, pages=chunk, writable=False))
                    await d.syscall(writer, mprotect=common_pb2.MprotectArgs(
                        address=address, pages=chunk, writable=True))
            finally:
                done.set()

        await d.gather(*(reader(c) for c in d.live(others) if cfg.readers), write_protect())
        await d.audit()  # quiescent: readers stopped, every flush acknowledged
