"""fault-storm — concurrent anonymous faults on disjoint areas of one mm (Lameter 2004-5).

Christoph Lameter's page-fault scalability test on SGI's Altix, the measurement behind
the split page-table lock (Linux 2.6.15): one process, one thread per CPU, each
write-faulting its own part of one anonymous mapping (here --pages pages, each part in
its own PTE table), --rounds times. With `--lock mm` every fault takes the mm's one
page_table_lock; with `split` each part's table has its own. Look at
`faulting_faults_per_s` (faults per second of the faulting phase) against --cpus;
`tlbsim reproduce lameter-2005` sweeps it.
"""
from __future__ import annotations

from loadgen.scenarios.base import Cpu, Driver, Progress, RunConfig, pages_at
from services.common.addresses import PAGE_SIZE, PTE_TABLE_PAGES
from services.common.errors import InvalidArgument
from tlbsim.v1 import common_pb2

OPTIONS = ('cpus', 'pages', 'rounds')
HEADLINE = ["faulting_faults_per_s", "fault_latency_ms", "lock_wait_ms", "contended_locks"]

REQUEST_PAGES = 64  # pages a thread touches per request


def check(cfg: RunConfig) -> None:
    if not 1 <= cfg.pages <= PTE_TABLE_PAGES:
        raise InvalidArgument(f"fault-storm: --pages {cfg.pages} per thread must be "
                              f"1..{PTE_TABLE_PAGES} (one PTE table each)")


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    check(cfg)
    cpus = d.cluster.cpus[:cfg.cpus]
    await d.new_process(cpus)
    faults, faulting_s, faulting_ns = 0, 0.0, 0
    for _ in d.rounds(cfg, progress):
        # One table per thread, aligned so that no two threads share one.
        span = (len(cpus) + 1) * PTE_TABLE_PAGES
        r = await d.syscall(cpus[0], mmap=common_pb2.MmapArgs(pages=span, writable=True))
        table = PTE_TABLE_PAGES * PAGE_SIZE
        base = -(-r.address // table) * table

        async def fault_in(cpu: Cpu, start: int) -> int:
            done = 0
            for first in range(0, cfg.pages, REQUEST_PAGES):
                a = await d.access(cpu, pages_at(start + first * PAGE_SIZE,
                                                 min(REQUEST_PAGES, cfg.pages - first)),
                                   write=True)
                done += a.faults if a is not None else 0
            return done

        # Every thread starts the phase together (at the latest clock among them).
        t0 = max(d.now(c) for c in cpus)
        d.start_together(cpus, t0)
        wall = d.wall()
        counts = await d.gather(*(fault_in(c, base + i * table) for i, c in enumerate(cpus)))
        faulting_s += d.wall() - wall
        faulting_ns += max(d.now(c) for c in cpus) - t0
        faults += sum(counts)
        await d.syscall(cpus[0], munmap=common_pb2.RangeArgs(address=r.address, pages=span))
    d.m.extra["faulting_faults_per_s"] = round(faults / faulting_s, 1) if faulting_s else 0.0
    if d.virtual is not None:
        d.m.vextra["faulting_faults_per_s"] = \
            round(faults * 1e9 / faulting_ns, 1) if faulting_ns else 0.0
