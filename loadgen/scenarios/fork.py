"""fork — On-Demand-Fork (Zhao et al., EuroSys'21): fork a large process repeatedly.

A process with --resident pages (its threads on every CPU hold TLB entries) forks
--children times per round; each child exits at once, as fork+exec workloads do.
`--fork copy` copies every PTE (write-protecting the parent's); `--fork share`
points the child's pmd entries at the parent's PTE tables (Phillips 2002). Look at
fork latency (memory-side), `pte_tables_allocated` during the forks (share: none;
copy: one per 512 resident pages per child) and the TLB entries the forks flushed.
"""
from __future__ import annotations

from loadgen.scenarios import sharing
from loadgen.scenarios.base import Driver, Progress, RunConfig
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'rounds', 'resident', 'children', 'fork')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["fork_latency_ms", "pte_tables_allocated", "tlb_entries_flushed"]


async def tlb_entries(d: Driver, cpus) -> int:
    dumps = [await c.stub.DumpTlb(cpu_pb2.DumpTlbRequest(), timeout=30) for c in d.live(cpus)]
    return sum(len(x.entries) for x in dumps)


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    mm, base = await sharing.parent(d, cfg, cpus[0])
    for c in cpus[1:]:
        await d.switch(c, mm)
    touched = sharing.pages_at(base, min(cfg.resident, 512))
    allocated = flushed = 0
    for _ in d.rounds(cfg, progress):
        for c in d.live(cpus):  # every thread holds (writable) translations
            await d.access(c, touched, write=True)
        before = await d.cluster.memory.Stats(memory_pb2.MemoryStatsRequest())
        entries = await tlb_entries(d, cpus)
        children = await sharing.fork(d, cpus[0], cfg.children)
        after = await d.cluster.memory.Stats(memory_pb2.MemoryStatsRequest())
        flushed += entries - await tlb_entries(d, cpus)
        allocated += after.tables_allocated.get(1, 0) - before.tables_allocated.get(1, 0)
        helper = cpus[-1]
        for child in children:  # each child exits at once; the parent's thread comes back
            await d.switch(helper, child)
            await d.syscall(helper, exit=common_pb2.ExitArgs())
        await d.switch(helper, mm)
    d.m.extra.update(pte_tables_allocated=allocated, tlb_entries_flushed=flushed)
