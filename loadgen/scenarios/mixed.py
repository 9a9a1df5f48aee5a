"""mixed — a weighted mix of the above: a web server's malloc/free churn.

The server workloads LATR (Apache), numaPTE and ecoTLB (Memcached, web servers) measure:
worker threads of one process allocate large buffers (mmap), fill them, free them
(munmap), trim (madvise DONTNEED), change protections, and keep reading shared data.
One thread per CPU (--cpus) draws operations with seeded weights (--mix, default
"mmap=4,munmap=3,madvise=1,mprotect=1,read=6,write=3"); a round is 20 operations per
thread; buffers are 1..min(--pages, 64) pages; every thread also reads a shared
--pages-page region that stays mapped. Look at ops/s, IPIs per munmap, munmap
latency and the share of IPIs that found nothing to do, per policy.
"""
from __future__ import annotations

import random

from loadgen.scenarios.base import Cpu, CpuLeft, Driver, Progress, RunConfig, pages_at
from services.common.addresses import PAGE_SIZE
from services.common.errors import InvalidArgument
from tlbsim.v1 import common_pb2

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'pages', 'rounds')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["ops_per_s", "ipis", "ipis_elided", "munmap_latency_ms"]
LABELS = {"munmap_latency_ms": "munmap / madvise latency"}

DEFAULT_MIX = "mmap=4,munmap=3,madvise=1,mprotect=1,read=6,write=3"
OPS_PER_ROUND = 20
MAX_LIVE = 16            # buffers a thread holds before it must free one
MAX_BUFFER_PAGES = 64


def parse_mix(text: str | None) -> dict[str, int]:
    weights = {}
    for part in (text or DEFAULT_MIX).split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in {"mmap", "munmap", "madvise", "mprotect", "read", "write"}:
            raise InvalidArgument(f"--mix {text!r}: expected op=weight with op one of mmap, "
                                  "munmap, madvise, mprotect, read, write")
        try:
            weights[name] = int(value)
        except ValueError:
            raise InvalidArgument(f"--mix {text!r}: weight {value!r} is not an integer") from None
        if weights[name] < 0:
            raise InvalidArgument(f"--mix {text!r}: weights must not be negative")
    if not any(weights.values()):
        raise InvalidArgument(f"--mix {text!r}: at least one weight must be positive")
    return weights


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    weights = parse_mix(cfg.mix)
    names, w = list(weights), list(weights.values())
    cpus = d.cluster.cpus[:cfg.cpus]
    await d.new_process(cpus)
    shared = (await d.syscall(cpus[0], mmap=common_pb2.MmapArgs(pages=cfg.pages,
                                                                writable=True))).address
    await d.access(cpus[0], pages_at(shared, cfg.pages), write=True)
    biggest = max(1, min(cfg.pages, MAX_BUFFER_PAGES))
    live: dict[int, list[tuple[int, int]]] = {c.id: [] for c in cpus}
    rngs = {c.id: random.Random(cfg.seed * 1_000_003 + c.id) for c in cpus}

    async def step(cpu: Cpu, op: str) -> None:
        rng, mine = rngs[cpu.id], live[cpu.id]
        if op == "mmap" or (op in ("munmap", "madvise", "mprotect", "write") and not mine):
            pages = rng.randint(1, biggest)
            address = (await d.syscall(cpu, mmap=common_pb2.MmapArgs(
                pages=pages, writable=True))).address
            mine.append((address, pages))
            await d.access(cpu, pages_at(address, pages), write=True)  # fill the buffer
        elif op == "munmap" or len(mine) > MAX_LIVE:
            address, pages = mine.pop(rng.randrange(len(mine)))
            await d.syscall(cpu, munmap=common_pb2.RangeArgs(address=address, pages=pages))
        elif op == "madvise":
            address, pages = rng.choice(mine)
            await d.syscall(cpu, madvise_dontneed=common_pb2.RangeArgs(address=address,
                                                                       pages=pages))
        elif op == "mprotect":
            address, pages = rng.choice(mine)
            for writable in (False, True):
                await d.syscall(cpu, mprotect=common_pb2.MprotectArgs(
                    address=address, pages=pages, writable=writable))
        elif op == "write":
            address, pages = rng.choice(mine)
            await d.access(cpu, [address + rng.randrange(pages) * PAGE_SIZE], write=True)
        else:  # read: the shared data and one of its own buffers
            addresses = [shared + rng.randrange(cfg.pages) * PAGE_SIZE for _ in range(8)]
            if mine:
                address, pages = rng.choice(mine)
                addresses.append(address + rng.randrange(pages) * PAGE_SIZE)
            await d.access(cpu, addresses)

    async def thread(cpu: Cpu) -> None:
        for _ in range(OPS_PER_ROUND):
            if not d.time_left(cfg) or cpu.id in d.m.lost_cpus:
                return
            try:
                await step(cpu, rngs[cpu.id].choices(names, w)[0])
            except CpuLeft:
                return  # its thread ends; the others go on

    for _ in d.rounds(cfg, progress):
        await d.gather(*(thread(c) for c in d.live(cpus)))
    await d.audit()
