"""Batched misses (services/common/misses.py `batchable`, Kernel.walk_and_fault and
handle_misses) against the one-at-a-time path, on the in-process machine: the same
random program run both ways gives the same access counts, the same words reported to the oracle, the same
TLB contents in the same LRU order, and the same machine (kernel_digest: page tables,
frames, counters, the oracle's verdicts)."""
from __future__ import annotations

import asyncio
from array import array

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from services.common.addresses import PAGE_SHIFT
from services.common.errors import FailedPrecondition, InvalidArgument, SimError
from services.common.hits import HitReport
from services.common.misses import batchable, decisive
from services.cpu.core import BATCH_REACH, WALK_AHEAD, window
from services.memory.digest import kernel_digest
from tests.unit.machine import PAGE, make_machine

WRITABLE, READ_ONLY, UNMAPPED = 48, 8, 4  # page indexes: writable VMA, read-only VMA, none

touch = st.tuples(st.integers(0, WRITABLE + READ_ONLY + UNMAPPED - 1), st.booleans())
step = st.one_of(
    st.tuples(st.just("access"), st.lists(touch, min_size=1, max_size=90), st.booleans()),
    st.tuples(st.sampled_from(["mprotect-ro", "mprotect-rw", "madvise", "munmap"]),
              st.integers(0, WRITABLE - 1), st.integers(1, 16), st.booleans()),
    st.tuples(st.just("fork"), st.integers(0, 0), st.integers(0, 0), st.booleans()),
)
programs = st.fixed_dictionaries({
    "fork": st.sampled_from(["copy", "share"]),
    "frames": st.sampled_from([0, 0, 96, 140]),  # 0: no memory pressure
    "steps": st.lists(step, min_size=1, max_size=10),
})


async def run(program, batched: bool):
    policy = {"fork": program["fork"]}
    if program["frames"]:
        policy["frames"] = program["frames"]
    m = make_machine(3, **policy)
    m.batch_misses = batched
    calls = {"handle_miss": 0, "handle_misses": 0}  # the CPU's calls (RPCs in the service)
    real_miss, real_misses = m.kernel.handle_miss, m.kernel.handle_misses

    async def one(*args, **kwargs):
        calls["handle_miss"] += 1
        return await real_miss(*args, **kwargs)

    async def batch(*args, **kwargs):
        calls["handle_misses"] += 1
        alone = calls["handle_miss"]
        try:
            return await real_misses(*args, **kwargs)
        finally:
            calls["handle_miss"] = alone  # its own faults are not the CPU's calls
    m.kernel.handle_miss, m.kernel.handle_misses = one, batch  # type: ignore[method-assign]
    reports: list[tuple[bytes, bytes, list[int]]] = []
    report = m.report

    def recorded(hits: HitReport, mm: int = 0) -> int:
        r = array("q")
        r.frombytes(hits.runs)
        # the words, their counts and the run lengths, not the times
        reports.append((hits.words, hits.counts, list(r[0::3])))
        return report(hits, mm)
    m.report = recorded  # type: ignore[method-assign]

    mm = m.kernel.create_mm()
    for cpu in (0, 1):
        await m.switch(cpu, mm)
    base = (await m.syscall(0, "mmap", WRITABLE, True)).address
    ro = (await m.syscall(0, "mmap", READ_ONLY, False)).address
    nowhere = ro + (1 << 30)  # no VMA: segv

    def address(page: int) -> int:
        if page < WRITABLE:
            return base + page * PAGE
        if page < WRITABLE + READ_ONLY:
            return ro + (page - WRITABLE) * PAGE
        return nowhere + (page - WRITABLE - READ_ONLY) * PAGE

    outcomes: list = []
    for kind, *args in program["steps"]:
        try:
            if kind == "access":
                touches, stop_on_segv = args
                s = await m.access(0, [address(p) + 8 * i for i, (p, _) in enumerate(touches)],
                                   write=[w for _, w in touches], stop_on_segv=stop_on_segv)
                outcomes.append(s)
            elif kind == "fork":  # the child runs on cpu 2 and writes a page: COW both ways
                child = (await m.syscall(0, "fork")).child_mm
                await m.switch(2, child)
                outcomes.append(await m.access(2, [base], write=True))
            else:  # another CPU of the mm changes it between accesses: IPIs to cpu 0
                first, pages, on_self = args
                cpu = 0 if on_self else 1
                at = base + first * PAGE
                pages = min(pages, WRITABLE - first)
                if kind == "madvise":
                    await m.syscall(cpu, "madvise_dontneed", at, pages)
                elif kind == "munmap":
                    await m.syscall(cpu, "munmap", at, pages)
                else:
                    await m.syscall(cpu, "mprotect", at, pages, kind == "mprotect-rw")
        except SimError as e:  # refused (a range munmapped before): the same both ways
            outcomes.append(type(e).__name__)
    tlbs = [[[(key, slot.entry, slot.epoch) for key, slot in s.items()]
             for s in core.tlb._sets] for core in m.cpus.values()]
    counters = [core.tlb.counters for core in m.cpus.values()]
    return dict(outcomes=outcomes, reports=reports, tlbs=tlbs, counters=counters,
                digest=kernel_digest(m.kernel), faults=dict(m.kernel.stats.faults),
                stale=m.kernel.oracle.stale), calls


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs)
def test_batched_misses_change_nothing_but_the_number_of_calls(program):
    one, one_calls = asyncio.run(run(program, batched=False))
    batched, batched_calls = asyncio.run(run(program, batched=True))
    assert one_calls["handle_misses"] == 0
    assert batched == one
    assert batched_calls["handle_miss"] <= one_calls["handle_miss"]
    assert one["stale"] == 0


async def test_an_access_of_fresh_pages_faults_them_in_one_batch():
    program = {"fork": "copy", "frames": 0,
               "steps": [("access", [(p, True) for p in range(WRITABLE)], False)]}
    result, calls = await run(program, batched=True)
    assert calls == {"handle_miss": 0, "handle_misses": 1}
    assert result["outcomes"][0].faults == WRITABLE
    assert result["faults"]["anon"] == WRITABLE


async def test_a_page_read_then_written_is_batched_as_a_read_and_faults_again_alone():
    program = {"fork": "copy", "frames": 0,
               "steps": [("access", [(0, False), (1, True), (0, True)], False)]}
    result, calls = await run(program, batched=True)
    assert calls == {"handle_miss": 1, "handle_misses": 1}  # the write to page 0: alone
    assert result["outcomes"][0].faults == 3  # zero page, anon, then the zero page's copy


async def test_a_later_write_ends_the_batch_before_the_pages_after_it():
    """Page 0 read, then written (its own fault: the zero page's copy), then page 2: page 2
    must fault after that copy, as one at a time, not in the first batch (the frames
    would be taken in another order: the digest differs)."""
    program = {"fork": "copy", "frames": 0,
               "steps": [("access", [(0, False), (1, True), (0, True), (2, True)], False)]}
    one, _ = await run(program, batched=False)
    batched, calls = await run(program, batched=True)
    assert batched == one
    assert calls == {"handle_miss": 1, "handle_misses": 2}  # [0, 1]; 0's write; [2]


async def test_the_batch_stops_at_a_segv_when_the_access_stops_there():
    program = {"fork": "copy", "frames": 0,
               "steps": [("access", [(0, True), (WRITABLE + READ_ONLY, False), (1, True)],
                          True)]}
    result, _ = await run(program, batched=True)
    s = result["outcomes"][0]
    assert (s.accesses, s.faults, s.segv) == (2, 1, 1)
    assert result["faults"].get("anon") == 1  # page 1, after the segv, never faulted


async def test_bad_batches_are_refused_with_nothing_run():
    m = make_machine(1)
    mm = m.kernel.create_mm()
    await m.switch(0, mm)
    vpn = (await m.syscall(0, "mmap", 4, True)).address >> 12
    before = kernel_digest(m.kernel)
    for bad in ([(vpn, True), (vpn, False)], [(vpn, True), (1 << 40, True)],
                [(vpn + i, True) for i in range(2000)]):
        with pytest.raises(InvalidArgument):
            await m.kernel.handle_misses(0, mm, bad)
        assert kernel_digest(m.kernel) == before


async def test_a_miss_that_raises_ends_the_batch_and_is_returned_not_raised():
    m = make_machine(2)
    mm = m.kernel.create_mm()
    await m.switch(0, mm)
    vpn = (await m.syscall(0, "mmap", 4, True)).address >> 12
    results, error = await m.kernel.handle_misses(1, mm, [(vpn, True)])  # cpu 1: not on mm
    assert results == [] and isinstance(error, FailedPrecondition)


# --- the window a walk sends (pure) ----------------------------------------------------------
ptes_of = st.sampled_from([None, (7, False, 1), (7, True, 1)])  # absent, read-only, writable


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.booleans()), min_size=1, max_size=60),
       st.sets(st.integers(0, 11)), st.lists(ptes_of, min_size=12, max_size=12),
       st.booleans())
def test_the_decisive_accesses_give_the_batch_the_whole_window_gives(accesses, held, ptes,
                                                                     reads_only):
    pages = [p for p, _ in accesses]
    writes = b"" if reads_only else bytes(w for _, w in accesses)
    miss = pages[0]  # the window starts at the miss: its first touch is not held
    is_held = {p: p in held and p != miss for p in pages}
    walked = dict(enumerate(ptes))
    every = [(p, bool(writes[k]) if writes else False, is_held[p]) for k, p in enumerate(pages)]
    few = [(p, w, is_held[p]) for p, w in decisive(pages, writes)]
    assert batchable(few, walked) == batchable(every, walked)
    assert len(few) <= len(every) and len({p for p, _, _ in few}) == len(set(pages))


def test_the_window_reaches_past_repeats_for_the_pages_one_walk_reads():
    at = [p << PAGE_SHIFT for p in range(200)]
    # Not batched (virtual time): the first WALK_AHEAD accesses, as always.
    pages, ahead = window([at[k % 3] for k in range(500)], 0, batched=False)
    assert pages == [k % 3 for k in range(WALK_AHEAD)] and ahead == [0, 1, 2]
    # Batched: past the repeats, up to BATCH_REACH accesses...
    pages, ahead = window([at[k % 3] for k in range(5000)], 1, batched=True)
    assert len(pages) == BATCH_REACH and ahead == [1, 2, 0]
    # ...but no further than the walk's WALK_AHEAD distinct pages: it ends before the next.
    spread = [at[k // 2] for k in range(400)]  # each page twice
    pages, ahead = window(spread, 0, batched=True)
    assert ahead == list(range(WALK_AHEAD)) and pages == [k // 2 for k in range(2 * WALK_AHEAD)]
