"""The memory domain with real CPU cores, no network: DESIGN.md §3-§6 rules."""
import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from services.common.hits import HitReport
from tests.unit.machine import make_machine

PAGE = 4096


async def process_on_all(m, pages: int, ncpus: int = 4, write: bool = True):
    mm = m.kernel.create_mm()
    for c in range(ncpus):
        await m.switch(c, mm)
    r = await m.syscall(0, "mmap", pages, True)
    addrs = [r.address + i * PAGE for i in range(pages)]
    for c in range(ncpus):
        await m.access(c, addrs, write=write)
    return mm, r.address, addrs


async def test_gathered_munmap_is_one_full_shootdown_to_the_other_cpus():
    m = make_machine(4)
    mm, base, addrs = await process_on_all(m, 512)
    r = await m.syscall(0, "munmap", base, 512)
    assert r.shootdowns == 1
    assert r.pages_freed == 512
    assert m.log == [("shootdown", mm, 0, 0, (1, 2, 3))]  # full (512 > 33), initiator excluded
    assert m.kernel.stats.ipis == 3
    assert m.kernel.stats.tables_freed >= 1  # the PTE table went with the last VMA
    assert all(len(c.tlb) == 0 for c in m.cpus.values())
    assert m.kernel.oracle.stale == 0
    _, violations = m.kernel.audit(m.dumps())
    assert violations == []


async def test_munmap_over_several_batches_reports_every_page_it_freed():
    m = make_machine(2, batch=8)
    mm, base, _ = await process_on_all(m, 600, ncpus=2)
    r = await m.syscall(0, "munmap", base, 600)
    assert r.shootdowns > 1  # the gather filled: flushed and freed mid-way
    assert r.pages_freed == 600 == m.kernel.stats.pages_freed
    assert m.kernel.oracle.stale == 0


async def test_small_munmap_is_a_ranged_flush():
    m = make_machine(2)
    mm, base, _ = await process_on_all(m, 16, ncpus=2)
    await m.syscall(0, "munmap", base, 16)
    assert m.log == [("shootdown", mm, base >> 12, 16, (1,))]


async def test_per_page_mode_shoots_once_per_page():
    m = make_machine(2, flush="per-page")
    _, base, _ = await process_on_all(m, 40, ncpus=2)
    r = await m.syscall(0, "munmap", base, 40)
    assert r.shootdowns == 40  # one per page; the last one also covers the freed tables
    assert [e[3] for e in m.log[:39]] == [1] * 39


async def test_unmapping_nothing_sends_no_shootdown():
    m = make_machine(2)
    mm = m.kernel.create_mm()
    await m.switch(0, mm)
    r = await m.syscall(0, "mmap", 8, True)
    res = await m.syscall(0, "munmap", r.address, 8)  # never touched: no PTE cleared
    assert res.shootdowns == 0 and m.log == []


async def munmap_while_cpu1_runs_before_its_ipi(m, mm, base, addrs) -> list[int]:
    """munmap, with CPU 1 hitting every page after the PTEs are cleared but before its
    flush lands (it is busy; the IPI waits). Returns the stale hits the oracle saw then."""
    real_port, seen = m.kernel.shootdown, []

    async def port(order, targets):
        core = m.cpus[1]
        t0 = core.clock()
        words = [core.tlb.lookup(mm, a >> 12).tid << 1 for a in addrs]
        core.record_hits(words, t0, core.clock())
        seen.append(m.report(core.take_hits()))
        return await real_port(order, targets)

    m.kernel.shootdown = port
    await m.syscall(0, "munmap", base, len(addrs))
    return seen


async def test_free_before_flush_is_caught_by_the_oracle():
    m = make_machine(2, unsafe="free-before-flush")
    mm, base, addrs = await process_on_all(m, 4, ncpus=2)
    # The frames were freed first: these hits use memory that may already be reused.
    assert await munmap_while_cpu1_runs_before_its_ipi(m, mm, base, addrs) == [4]
    assert m.kernel.oracle.stale == 4


async def test_safe_order_hits_before_the_ack_are_not_stale():
    m = make_machine(2)
    mm, base, addrs = await process_on_all(m, 4, ncpus=2)
    assert await munmap_while_cpu1_runs_before_its_ipi(m, mm, base, addrs) == [0]
    assert m.kernel.oracle.stale == 0


async def test_a_dead_cpu_is_fenced_and_frames_still_freed():
    m = make_machine(3)
    _, base, _ = await process_on_all(m, 8, ncpus=3)
    m.dead.add(2)
    r = await m.syscall(0, "munmap", base, 8)
    assert r.pages_freed == 8
    assert m.kernel.stats.fenced == {2}
    assert m.cpus[2].fenced and len(m.cpus[2].tlb) == 0
    with pytest.raises(FailedPrecondition, match="fenced"):
        m.cpus[2].require_runnable()


async def test_lazy_cpu_is_skipped_unless_tables_are_freed():
    m = make_machine(3)
    mm, base, _ = await process_on_all(m, 64, ncpus=3)
    await m.switch(2, 0)  # idle, lazily keeping mm
    await m.syscall(0, "madvise_dontneed", base, 8)  # no table freed
    assert m.log[-1][4] == (1,)
    await m.syscall(0, "munmap", base, 64)  # frees the PTE table: lazy CPUs too
    assert m.log[-1][4] == (1, 2)
    await m.switch(2, mm)  # catching up at switch_mm flushes by generation
    _, violations = m.kernel.audit(m.dumps())
    assert violations == [] and m.kernel.oracle.stale == 0


async def test_mprotect_downgrade_revokes_writes_only():
    m = make_machine(2)
    mm, base, addrs = await process_on_all(m, 4, ncpus=2)
    await m.syscall(0, "mprotect", base, 4, False)
    assert m.log[-1][4] == (1,)
    stats = await m.access(1, addrs)  # reads still work (refilled read-only)
    assert stats.segv == 0
    stats = await m.access(1, addrs, write=True)
    assert stats.segv == 4  # writes to a read-only VMA
    _, violations = m.kernel.audit(m.dumps())
    assert violations == [] and m.kernel.oracle.stale == 0


async def test_fork_copy_shares_frames_read_only_and_cow_copies_on_write():
    m = make_machine(2)
    mm, base, addrs = await process_on_all(m, 4, ncpus=2)
    used = m.kernel.frames.used
    r = await m.syscall(0, "fork")
    child = r.child_mm
    assert r.shootdowns == 1  # the parent's writable entries were flushed
    await m.switch(1, child)
    await m.access(1, addrs)  # reads share the parent's frames
    assert m.kernel.frames.used == used + 4  # only the child's tables (pgd, pud, pmd, pte)
    await m.access(1, addrs, write=True)  # COW: four copies
    assert m.kernel.frames.used == used + 8
    assert m.kernel.stats.faults["cow"] == 4
    await m.access(0, addrs, write=True)  # the parent is now the only mapper: reuse
    assert m.kernel.frames.used == used + 8
    _, violations = m.kernel.audit(m.dumps())
    assert violations == [] and m.kernel.oracle.stale == 0


async def test_exit_frees_everything():
    m = make_machine(2)
    mm, base, _ = await process_on_all(m, 600, ncpus=2)
    await m.syscall(0, "exit")
    assert m.kernel.frames.used == m.kernel.reserved_frames  # the zero page
    assert m.cpus[0].loaded_mm == 0  # as the CPU service leaves it: running no mm
    with pytest.raises(FailedPrecondition, match="exited"):
        m.kernel.mm(mm)


@pytest.mark.parametrize("address,pages,error", [
    (0x1001, 1, InvalidArgument),                 # unaligned
    (0x1000, 0, InvalidArgument),                 # zero length
    (0xFFFF_8000_0000_0000, 1, OutOfRange),       # kernel half
    (0x0000_9000_0000_0000, 1, InvalidArgument),  # non-canonical
    (0x7FFF_FFFF_F000, 2, OutOfRange),            # runs past 47 bits
])
async def test_bad_ranges_are_refused_without_changing_state(address, pages, error):
    m = make_machine(1)
    mm, base, _ = await process_on_all(m, 4, ncpus=1)
    before = (m.kernel.frames.used, len(m.kernel.mms[mm].vmas), m.kernel.stats.shootdowns)
    with pytest.raises(error):
        await m.syscall(0, "munmap", address, pages)
    assert (m.kernel.frames.used, len(m.kernel.mms[mm].vmas),
            m.kernel.stats.shootdowns) == before


async def test_unknown_mm_and_cpu_not_running():
    m = make_machine(1)
    with pytest.raises(NotFound):
        await m.kernel.munmap(0, 99, 0x10000000, 1)
    mm = m.kernel.create_mm()
    with pytest.raises(FailedPrecondition, match="not running"):
        await m.kernel.munmap(0, mm, 0x10000000, 1)


async def test_audit_and_oracle_catch_a_cpu_that_acks_without_flushing():
    m = make_machine(2)
    mm, base, addrs = await process_on_all(m, 4, ncpus=2)

    async def lying_port(order, targets):  # acknowledges, invalidates nothing
        from services.memory.kernel import ShootdownResult
        return ShootdownResult(list(targets), [])

    m.kernel.shootdown = lying_port
    await m.syscall(0, "munmap", base, 4)
    _, violations = m.kernel.audit(m.dumps())
    assert len(violations) == 4 and all("cpu 1" in v for v in violations)
    # CPU 1 runs on and hits its stale entries: each hit is counted.
    stats = await m.access(1, addrs)
    assert stats.hits == 4 and m.kernel.oracle.stale == 4


async def test_write_through_a_stale_writable_entry_after_mprotect_is_stale():
    m = make_machine(2)
    mm, base, addrs = await process_on_all(m, 1, ncpus=2)
    entry = m.cpus[1].tlb.lookup(mm, base >> 12)
    await m.syscall(0, "mprotect", base, 1, False)
    t = m.cpus[1].clock()
    assert m.report(_hits([(entry.tid << 1) | 1], [t])) == 1   # a write: stale
    assert m.report(_hits([entry.tid << 1], [t])) == 0         # a read: still valid


def _hits(words, times):
    """One run per hit, at its time."""
    from array import array
    runs = [x for t in times for x in (1, t, t)]
    return HitReport(array("Q", words).tobytes(), array("q", runs).tobytes())
