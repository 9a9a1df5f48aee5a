"""munmap — LATR's mmap microbenchmark (ASPLOS'18).

One process maps --pages pages; its threads, one per CPU, touch every page so each
TLB holds them, and keep reading while the first thread munmaps the range; --rounds
times. Look at shootdowns and IPIs per munmap and munmap latency, per-page vs gathered.
With --readers off it is LATR's quiet variant (the threads wait instead of reading).
"""
from __future__ import annotations

import asyncio
import time

from loadgen.scenarios.base import Cpu, Driver, Progress, RunConfig, pages_at
from tlbsim.v1 import common_pb2

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'pages', 'rounds')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["shootdowns", "ipis", "munmap_latency_ms"]

READER_SAMPLE = 64       # pages a concurrent reader touches per request
READER_PAUSE_S = 0.0005  # between a reader's requests


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    initiator = cpus[0]
    await d.new_process(cpus)
    for rnd in d.rounds(cfg, progress):
        r = await d.syscall(initiator, mmap=common_pb2.MmapArgs(pages=cfg.pages, writable=True))
        addresses = pages_at(r.address, cfg.pages)
        await d.access(initiator, addresses, write=True)  # fault every page in
        others = d.live(cpus[1:])
        await d.gather(*(d.access(c, addresses) for c in others))
        await d.audit()  # quiescent: every CPU holds the range
        done = asyncio.Event()

        sample = addresses[::max(1, len(addresses) // READER_SAMPLE)]

        async def reader(cpu: Cpu) -> None:
            # A thread that stays on its CPU and keeps using the mapping: it must see
            # the old pages until its flush, then fault (the mapping is gone). It reads
            # a spread sample and pauses, so it interrupts rather than saturates.
            while not done.is_set():
                r = await d.access(cpu, sample, stop_on_segv=True)
                if r is None or r.segv:
                    return
                await d.pause(cpu, READER_PAUSE_S)

        async def unmap() -> None:
            await d.pause(initiator, 0)  # the readers are under way
            t0 = time.perf_counter()
            await d.syscall(initiator, munmap=common_pb2.RangeArgs(address=r.address,
                                                                   pages=cfg.pages))
            d.m.munmap_latency_s.append(time.perf_counter() - t0)
            done.set()

        await d.gather(*(reader(c) for c in others if cfg.readers), unmap())
