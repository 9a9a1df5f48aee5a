"""Page-table sharing at fork, unsharing, the sharer list, reclaim and its flush
targets, and lock-all-sharers (DESIGN.md §3-§5; Phillips' RFC and Linus's replies)."""
import pytest

from services.common.errors import Aborted
from services.memory.pagetable import walk
from tests.unit.machine import PAGE, make_machine, proc


def pte_tables(m, mm_id):
    return m.kernel.tables.pte_tables(m.kernel.mms[mm_id], 0, 1 << 35)


async def test_share_fork_allocates_no_pte_table_and_counts_sharers_apart_from_refcount():
    m = make_machine(2, fork="share")
    mm, base, addrs = await proc(m, (0, 1), 1024)
    k = m.kernel
    before = dict(k.stats.tables_allocated)
    refs = [k.frames.refcount[k.walk(0, mm, [a >> 12])[0][0]] for a in addrs[:3]]
    r = await m.syscall(0, "fork")
    child = r.child_mm
    allocated = {lvl: k.stats.tables_allocated[lvl] - before.get(lvl, 0) for lvl in (1, 2, 3, 4)}
    assert allocated == {1: 0, 2: 1, 3: 1, 4: 1}  # the child's upper levels only
    tables = pte_tables(m, mm)
    assert tables == pte_tables(m, child)  # the very same PTE tables
    for t in tables:
        assert t.share_count == 1 and t.wp
        assert t.sharers == [(mm, t.base_vpn), (child, t.base_vpn)]
        assert k.frames.refcount[t.pfn] == 1  # sharing is not a reference
    assert [k.frames.refcount[k.walk(0, mm, [a >> 12])[0][0]] for a in addrs[:3]] == refs
    # The parent's writable entries were flushed: one shootdown, to the parent's CPU 1.
    assert r.shootdowns == 1 and m.log[-1][4] == (1,)
    assert all(not e.writable for mm_, _, e in m.cpus[1].tlb.entries())


async def test_reads_keep_sharing_writes_unshare_and_flush_only_the_writers_cpus():
    m = make_machine(4, fork="share")
    mm, base, addrs = await proc(m, (0, 1), 512)
    child = (await m.syscall(0, "fork")).child_mm
    await m.switch(2, child)
    await m.switch(3, child)
    shared = pte_tables(m, mm)[0]
    await m.access(1, addrs)  # the parent's CPU 1 refills (read-only) after the fork's flush
    await m.access(2, addrs)  # reads: through the shared table, no fault
    assert m.kernel.stats.faults == {"anon": 512} and pte_tables(m, child) == [shared]
    pfn = m.kernel.walk(2, child, [base >> 12])[0][0]
    refs = m.kernel.frames.refcount[pfn]
    m.log.clear()
    await m.access(2, addrs[:1], write=True)  # a write: copy the table, then COW the page
    private = pte_tables(m, child)[0]
    assert private is not shared and shared.share_count == 0 and shared.sharers is None
    assert m.kernel.stats.unshares == 1
    assert m.kernel.frames.refcount[pfn] == refs  # +1 for the copy's PTE, -1 by the COW
    # Unsharing flushed the child's CPUs only (2 initiates, 3 is the target) — the
    # shared table's entries did not change, so the parent's CPUs 0 and 1 keep theirs.
    assert [e[4] for e in m.log] == [(3,), (3,)]
    assert len(m.cpus[1].tlb) == 512
    _, violations = m.kernel.audit(m.dumps())
    assert violations == [] and m.kernel.oracle.stale == 0


async def test_the_last_sharer_frees_the_table_only_after_the_flush():
    m = make_machine(3, fork="share")
    mm, base, addrs = await proc(m, (0, 1), 512)
    child = (await m.syscall(0, "fork")).child_mm
    table = pte_tables(m, mm)[0]
    await m.switch(2, child)
    await m.syscall(2, "munmap", base, 512)  # covers it whole: dropped, not cleared
    assert table.share_count == 0 and table.present == 512
    assert not m.kernel.frames.is_free(table.pfn)
    seen = []
    real = m.kernel.shootdown

    async def port(order, targets):
        seen.append(m.kernel.frames.is_free(table.pfn))
        return await real(order, targets)

    m.kernel.shootdown = port
    await m.syscall(0, "munmap", base, 512)  # the last sharer: clear -> flush -> free
    assert seen and not any(seen)
    assert m.kernel.frames.is_free(table.pfn)


@pytest.mark.parametrize("order", [("parent", "child"), ("child", "parent")])
async def test_exit_of_any_sharer_frees_everything_at_the_end(order):
    m = make_machine(2, fork="share")
    mm, base, addrs = await proc(m, (0,), 700)
    child = (await m.syscall(0, "fork")).child_mm
    await m.switch(1, child)
    await m.access(1, addrs[:5], write=True)  # some private copies too
    cpu = {"parent": 0, "child": 1}
    for who in order:
        await m.syscall(cpu[who], "exit")
    assert m.kernel.frames.used == m.kernel.reserved_frames
    assert m.kernel.stats.shared_tables == 0


async def test_lock_all_sharers_orders_by_mm_id_and_unordered_is_refused():
    for lock, refused in (("lock-all-sharers", False), ("lock-all-sharers-unordered", True)):
        m = make_machine(2, fork="share", lock=lock)
        mm, base, addrs = await proc(m, (0,), 8)
        child = (await m.syscall(0, "fork")).child_mm
        await m.switch(1, child)
        if refused:  # the child (higher id) locks itself first, then the parent
            with pytest.raises(Aborted, match="lock order inversion"):
                await m.access(1, addrs[:1], write=True)
            assert len(m.kernel.validator.reports) == 1
            assert not any(l.locked() for l in (m.kernel.mms[mm].page_table_lock._lock,
                                                m.kernel.mms[child].page_table_lock._lock))
        else:
            await m.access(1, addrs[:1], write=True)
            assert m.kernel.stats.unshares == 1 and m.kernel.validator.reports == []


async def test_reclaim_swaps_out_frees_only_after_acks_and_swaps_back_in():
    m = make_machine(2, frames=128)
    mm, base, addrs = await proc(m, (0, 1), 100)
    k = m.kernel
    checked = []
    real = k.shootdown

    async def port(order, targets):
        if order.all_mms:  # a reclaim batch: nothing it unmapped is free yet
            checked.append(k.frames.free_count)
        return await real(order, targets)

    k.shootdown = port
    more = await m.syscall(0, "mmap", 60, True)
    await m.access(0, [more.address + i * PAGE for i in range(60)], write=True)
    assert k.stats.reclaimed_pages > 0 and k.stats.swap_outs > 0 and checked
    assert all(free <= k.low_watermark for free in checked)
    await m.access(1, addrs)  # CPU 1 was flushed; its accesses swap the pages back in
    assert k.stats.swap_ins > 0
    _, violations = k.audit(m.dumps())
    assert violations == [] and k.oracle.stale == 0


@pytest.mark.parametrize("policy,targets,stale", [
    ("all-cpus", (1, 2, 3), False),
    ("sharer-union", (1, 2), False),
    ("unsafe-mm-only", (1,), True),
])
async def test_reclaim_through_a_shared_table_flushes_by_policy(policy, targets, stale):
    # Parent on CPUs 0-1, its sharing child on CPU 2; CPU 3 ran something else.
    m = make_machine(4, fork="share", frames=160, shared_flush=policy)
    k = m.kernel
    mm, base, addrs = await proc(m, (1,), 64)
    await m.switch(0, mm)
    child = (await m.syscall(1, "fork")).child_mm
    await m.switch(2, child)
    await m.access(2, addrs)  # the child's CPU caches the shared translations
    await m.switch(3, k.create_mm())
    other = await m.syscall(3, "mmap", 120, True)
    await m.access(3, [other.address + i * PAGE for i in range(120)], write=True)
    reclaims = [e for e in m.log if e[0] == "shootdown" and e[1] == mm]
    assert k.stats.reclaim_shootdowns >= 1
    assert set(targets) <= set().union(*(set(e[4]) for e in reclaims)) | {3}
    await m.access(2, addrs)  # the child runs on: stale only if its CPU was skipped
    assert (k.oracle.stale > 0) == stale


async def test_partial_munmap_unshares_then_zaps_the_copy():
    m = make_machine(2, fork="share")
    mm, base, addrs = await proc(m, (0,), 512)
    child = (await m.syscall(0, "fork")).child_mm
    await m.switch(1, child)
    shared = pte_tables(m, mm)[0]
    await m.syscall(1, "munmap", base, 16)
    assert shared.share_count == 0 and shared.present == 512  # the parent's is intact
    private = walk(m.kernel.mms[child].pgd, (base >> 12) + 16)
    assert private is not shared and private.present == 512 - 16
    _, violations = m.kernel.audit(m.dumps())
    assert violations == []
