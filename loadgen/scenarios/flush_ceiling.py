"""flush-ceiling — ranged vs full flush of N pages under a resident working set (x86's 33).

Linux flushes a range page by page (one invlpg each) up to
`tlb_single_page_flush_ceiling` (33) pages and flushes the whole TLB above it,
"balancing the cycles you spend doing invlpg with the cycles that you spend refilling
the TLB later" (Documentation/arch/x86/tlb.rst). Here one process maps --resident pages
(its working set; 512 by default for this scenario) and every thread (one per CPU,
--cpus) touches them, so every TLB holds them; then each round the first thread
writes the first --pages pages and mprotects them read-only (the downgrade needs a
flush: ranged when --pages <= --ceiling, else a full flush of the mm), every thread
re-touches its whole working set (after a full flush its refills are real simulated
misses), and the pages are made writable again (an upgrade needs no flush). Modelled time covers the rounds
only (`results.modelled.ns_per_round`); compare --ceiling 64 with --ceiling 0 and sweep
--pages to find where the full flush starts to win (`tlbsim bench` does).
"""
from __future__ import annotations


from loadgen.modelled import machine_events
from loadgen.scenarios.base import Driver, Progress, RunConfig, pages_at
from tlbsim.v1 import common_pb2

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'pages', 'rounds', 'resident')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
# The trade-off: a ranged flush costs per page, a full one costs refills (per access).
HEADLINE = ["modelled.ns_per_round", "modelled.flush_ns_per_shootdown", "modelled.access_ns",
            "full_flushes"]

DEFAULT_WORKING_SET = 512  # pages: 2 MiB, one PTE table, a third of a 1536-entry TLB


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    initiator = cpus[0]
    working_set = cfg.resident
    flushed = min(cfg.pages, working_set)
    await d.new_process(cpus)
    base = (await d.syscall(initiator, mmap=common_pb2.MmapArgs(pages=working_set,
                                                                writable=True))).address
    pages = pages_at(base, working_set)
    await d.access(initiator, pages, write=True)
    await d.gather(*(d.access(c, pages) for c in cpus[1:]))
    d.m.modelled_from = await machine_events(d.cluster, d.m.lost_cpus)  # after the warm-up

    for _ in d.rounds(cfg, progress):
        # Write them first: an mprotect back to writable leaves the PTEs read-only until
        # a write fault upgrades them, and only a downgrade of writable PTEs flushes.
        await d.access(initiator, pages[:flushed], write=True)
        await d.syscall(initiator, mprotect=common_pb2.MprotectArgs(
            address=base, pages=flushed, writable=False))
        await d.gather(*(d.access(c, pages) for c in d.live(cpus)))
        await d.syscall(initiator, mprotect=common_pb2.MprotectArgs(
            address=base, pages=flushed, writable=True))
    d.m.extra["working_set_pages"] = working_set
    d.m.extra["flushed_pages"] = flushed
