"""Random concurrent programs on 4 CPUs (hypothesis): fork (copy or share), read,
write, mmap, munmap, madvise, mprotect, exit, idle and switch, under memory pressure,
with a shootdown port that lets the targets run a random number of event-loop turns
before and after their flush (tests/unit/workbench.py) — so that operations
interleave at every lock and every shootdown wait. Each program runs in waves of
concurrent operations; after each wave (a quiescent point):

- the oracle and the audit are clean;
- every count matches the page tables: mapcounts, refcounts, frames in use, swap
  slots, nothing pending;
- every mapped page is on the LRU (reclaimable), and nothing else is;
and at the end, once every mm has exited, every frame and swap slot is free.

`make test` runs PROPERTY_EXAMPLES (default 150) programs; the long mode is
    TLBSIM_PROPERTY_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/unit/test_concurrent_sequences.py
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from services.common.errors import SimError
from services.memory.pagetable import PageTable
from tests.unit.machine import PAGE
from tests.unit.workbench import Workbench

EXAMPLES = int(os.environ.get("TLBSIM_PROPERTY_EXAMPLES", "150"))
NCPUS = 4
KINDS = ("read", "write", "write", "read", "mmap", "munmap", "madvise", "mprotect-ro",
         "mprotect-rw", "fork", "exit", "idle", "switch", "switch")


@dataclasses.dataclass(frozen=True)
class Op:
    cpu: int
    kind: str
    which: int   # which mm (switch) or region (the rest), modulo what exists
    first: int   # first page within the region
    pages: int


ops = st.builds(Op, st.integers(0, NCPUS - 1), st.sampled_from(KINDS), st.integers(0, 7),
                st.integers(0, 47), st.integers(1, 24))
programs = st.fixed_dictionaries({
    "fork": st.sampled_from(["copy", "share"]),
    "lock": st.sampled_from(["split", "mm"]),
    "frames": st.sampled_from([128, 112, 160, 0]),  # 0: no pressure
    "turns": st.lists(st.integers(0, 12), min_size=1, max_size=12),
    "waves": st.lists(st.lists(ops, min_size=1, max_size=5), min_size=1, max_size=7),
})


class World:
    """What the program knows: live mms and the regions it mapped in each."""

    def __init__(self, wb: Workbench):
        self.wb = wb
        self.regions: dict[int, list[tuple[int, int]]] = {}  # mm -> [(address, pages)]
        self.refused = collections.Counter()  # domain refusals (fine), by kind

    def mm_of(self, cpu: int) -> int:
        core = self.wb.m.cpus[cpu]
        return 0 if core.lazy else core.loaded_mm

    async def run(self, op: Op) -> None:
        try:
            await self._run(op)
        except SimError as e:
            self.refused[f"{op.kind}: {e.code.name}"] += 1

    async def _run(self, op: Op) -> None:
        wb, cpu = self.wb, op.cpu
        if op.kind == "switch":
            live = sorted(self.regions)
            if not live:
                mm = wb.k.create_mm()
                self.regions[mm] = []
            else:
                mm = live[op.which % len(live)]
            await wb.switch(cpu, mm)
            return
        if op.kind == "idle":
            await wb.switch(cpu, 0)
            return
        mm = self.mm_of(cpu)
        if not mm or mm not in self.regions:
            return
        if op.kind == "mmap":
            r = await wb.syscall(cpu, "mmap", op.pages * 2, True)
            if mm in self.regions:  # not exited by another CPU meanwhile
                self.regions[mm].append((r.address, op.pages * 2))
            return
        if op.kind == "fork":
            inherited = list(self.regions[mm])  # the VMAs the child is forked with
            r = await wb.syscall(cpu, "fork")
            self.regions[r.child_mm] = inherited
            return
        if op.kind == "exit":
            await wb.syscall(cpu, "exit")
            # The mm the CPU ran when the call started: a switch of the same wave may
            # have moved it since `mm_of` was read.
            for gone in [m for m in self.regions if wb.k.mms[m].exited]:
                self.regions.pop(gone)
            return
        if not self.regions[mm]:
            return
        base, size = self.regions[mm][op.which % len(self.regions[mm])]
        first = op.first % size
        pages = min(op.pages, size - first)
        address = base + first * PAGE
        if op.kind in ("read", "write"):
            await wb.access(cpu, [address + i * PAGE for i in range(pages)],
                            write=op.kind == "write")
        elif op.kind == "munmap":
            await wb.syscall(cpu, "munmap", address, pages)
        elif op.kind == "madvise":
            await wb.syscall(cpu, "madvise_dontneed", address, pages)
        else:
            await wb.syscall(cpu, "mprotect", address, pages, op.kind == "mprotect-rw")


def distinct_tables(k) -> tuple[list[PageTable], list[PageTable]]:
    """(every table frame, the PTE tables) reachable from the live mms, each once."""
    seen: dict[int, PageTable] = {}

    def visit(t: PageTable) -> None:
        if t.uid in seen:
            return
        seen[t.uid] = t
        if t.level > 1:
            for child in t.entries:
                if child is not None:
                    visit(child)

    for mm in k.mms.values():
        if not mm.exited:
            visit(mm.pgd)
    tables = list(seen.values())
    return tables, [t for t in tables if t.level == 1]


def check_quiescent(k) -> None:
    """Every count matches the page tables, nothing is pending, the LRU is exact."""
    tables, ptes = distinct_tables(k)
    mapped: collections.Counter = collections.Counter()
    swapped: collections.Counter = collections.Counter()
    for t in ptes:
        present = 0
        for slot, pte in enumerate(t.entries):
            if pte > 0:
                mapped[pte >> 1] += 1
            elif pte < 0:
                swapped[-pte] += 1
            present += pte != 0
        assert present == t.present, f"table {t.uid}: present {t.present}, counted {present}"
    for pfn in range(1, len(k.frames.refcount)):
        assert k.frames.mapcount[pfn] == mapped[pfn], (pfn, k.frames.mapcount[pfn], mapped[pfn])
    table_pfns = {t.pfn for t in tables}
    zero = k.k.zero_pfn  # pinned for the machine's life: one reference more than its maps
    for pfn in mapped:
        assert k.frames.refcount[pfn] == mapped[pfn] + (pfn == zero), (pfn, "refcount")
        assert pfn not in table_pfns
    for t in tables:
        assert k.frames.refcount[t.pfn] == 1, (t.uid, "table refcount")
    data = set(mapped) - {zero}
    assert k.frames.used == len(data) + len(tables) + k.reserved_frames, \
        (k.frames.used, len(data), len(tables))
    assert dict(swapped) == k.swap._refs, "swap slots"
    assert set(k.lru) == data, "the LRU is exactly the mapped pages"
    assert not k.oracle.inflight and not k.k.unflushed
    assert k.stats.frames_pending_free == 0
    for mm in k.mms.values():
        assert mm.tlb_flush_pending == 0
        if not mm.exited:
            for t in ptes:
                if t.sharers:
                    assert t.share_count == len(t.sharers) - 1


async def run_program(program) -> World:
    turns = itertools.cycle(program["turns"])
    policy = {"fork": program["fork"], "lock": program["lock"]}
    if program["frames"]:
        policy["frames"] = program["frames"]
    wb = Workbench(NCPUS, turns=lambda: next(turns), **policy)
    world = World(wb)
    # Every program starts from one process on every CPU, with 96 pages touched.
    mm, base, _ = await wb.process(tuple(range(NCPUS)), 96, write=True)
    wb.ws.clear()  # the program's own accesses only
    world.regions[mm] = [(base, 96)]
    for wave in program["waves"]:
        await asyncio.gather(*(world.run(op) for op in wave))
        await wb.quiesce()
        assert wb.findings() == [], (wave, wb.findings())
        check_quiescent(wb.k)
    for mm in sorted(world.regions):  # tear everything down: nothing may be left
        await wb.switch(0, mm)
        await wb.syscall(0, "exit")
    await wb.quiesce()
    assert wb.findings() == []
    k = wb.k
    assert k.frames.used == k.reserved_frames and len(k.swap) == 0 and len(k.lru) == 0
    return world


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs)
def test_random_concurrent_programs_stay_safe_and_consistent(program):
    asyncio.run(run_program(program))
