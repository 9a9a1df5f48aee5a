"""Counts that follow Linux (≈ v6.18): the shared notes' count divergences
(attacks/test_attacks.py D-T), rewritten to assert what the kernel does, each with the
kernel function it follows. In-process machine, no network."""
import pytest

from services.memory.pagetable import walk
from tests.unit.machine import PAGE, make_machine, proc


# O. mm/vmscan.c shrink_folio_list: try_to_unmap_flush() before free_unref_folios, once per
#    call, and a call takes at most SWAP_CLUSTER_MAX (32) isolated folios.
@pytest.mark.parametrize("batch,per_flush", [(32, (16, 32)), (0, (512, 10**9))])
async def test_O_reclaim_flushes_once_per_32_pages_unless_told_otherwise(batch, per_flush):
    m = make_machine(2, frames=16384, reclaim_batch=batch)
    k = m.kernel
    await proc(m, (0, 1), 16384 - 600)
    more = await m.syscall(0, "mmap", 2000, True)
    await m.access(0, [more.address + i * PAGE for i in range(2000)], write=True)
    pages_per_flush = k.stats.swap_outs / k.stats.reclaim_shootdowns
    assert per_flush[0] <= pages_per_flush <= per_flush[1]
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []


# D. arch/x86/mm/tlb.c (≥ 6.13, "Update mm_cpumask lazily"): a CPU that ran the mm and
#    now runs another stays in its mask until a flush reaches it; flush_tlb_func then
#    clears its bit. Flushes that free tables reach every member (native_flush_tlb_multi);
#    others reach it only when should_trim_cpumask says so, at most once a second.
async def test_D_a_cpu_that_left_for_another_mm_gets_one_flush_and_leaves_the_mask():
    m = make_machine(3)
    k = m.kernel
    a = k.create_mm()
    await m.switch(0, a)
    await m.switch(2, a)
    await m.switch(2, 0)                       # idle, lazily keeping a
    b = k.create_mm()
    await m.switch(2, b)                       # now runs b: a member of a's mask still
    assert 2 in k.mms[a].cpumask
    ipis_to_2 = 0
    for _ in range(5):                         # five mmap/touch/munmap rounds in a
        r = await m.syscall(0, "mmap", 512, True)
        await m.access(0, [r.address + i * PAGE for i in range(512)], write=True)
        m.log.clear()
        await m.syscall(0, "munmap", r.address, 512)   # frees the PTE table
        ipis_to_2 += sum(2 in e[4] for e in m.log)
    assert ipis_to_2 == 1 and 2 not in k.mms[a].cpumask
    assert m.cpus[2].tlb.counters.flush_not_loaded == 1


async def test_a_lazy_cpu_receiving_a_flush_switches_to_init_mm_and_flushes_when_it_returns():
    m = make_machine(2)
    mm, base, addrs = await proc(m, (0, 1), 600)
    await m.switch(1, 0)                        # CPU 1: lazy on mm
    assert m.cpus[1].lazy and m.cpus[1].loaded_mm == mm
    await m.syscall(0, "munmap", base, 600)     # frees tables: lazy CPUs get it too
    core = m.cpus[1]
    assert not core.lazy and core.loaded_mm == 0 and len(core.tlb) > 0  # nothing flushed
    full = core.tlb.counters.flush_full
    await m.switch(1, mm)                       # back: behind by generation, so it flushes
    assert core.tlb.counters.flush_full == full + 1 and len(core.tlb) == 0
    assert m.kernel.oracle.stale == 0 and m.kernel.audit(m.dumps())[1] == []


async def test_a_cpu_that_goes_lazy_after_taking_a_flush_stays_lazy_on_the_mm():
    """flush_tlb_func runs on the target: what it did is the target's to say (its ack).
    CPU 1 takes munmap's flush while it runs the mm, then goes lazy before the munmap
    returns: it still has the mm loaded, so the next flush that frees no table skips it
    as lazy (should_flush_tlb) instead of sending it an IPI. (The kernel used to judge
    from its own view after the fact and take CPU 1 for one that had switched to
    init_mm.)"""
    m = make_machine(3)
    mm, base, addrs = await proc(m, (0, 1, 2), 8)
    k = m.kernel
    deliver = k.shootdown

    async def goes_lazy_after_the_flush(order, targets):
        result = await deliver(order, targets)
        if 1 in targets and m.cpus[1].loaded_mm == mm and not m.cpus[1].lazy:
            await m.switch(1, 0)  # idle, lazily keeping the mm, before the call returns
        return result

    k.shootdown = goes_lazy_after_the_flush
    await m.syscall(0, "munmap", base, 1)
    k.shootdown = deliver
    assert m.cpus[1].lazy and m.cpus[1].loaded_mm == mm and k.k.is_lazy(1, k.mms[mm])
    m.log.clear()
    await m.syscall(0, "munmap", base + PAGE, 1)
    assert [e[4] for e in m.log] == [(2,)] and k.stats.lazy_skipped == 1


async def test_an_idle_cpu_going_idle_again_keeps_its_lazy_mm_and_gets_the_table_flush():
    """Idle twice in a row (enter_lazy_tlb again): the mm stays loaded, so exit's flush,
    which frees the tables, must still reach the CPU. (Found by the 5000-example
    property run: the second idle dropped the kernel's record of the lazy mm, a flush
    took the CPU out of the mask, and exit's flush skipped it; the audit saw it holding
    translations through freed tables.)"""
    m = make_machine(3)
    mm, base, addrs = await proc(m, (0, 1, 2), 8)
    k = m.kernel
    await m.switch(1, 0)
    await m.switch(1, 0)
    assert m.cpus[1].lazy and m.cpus[1].loaded_mm == mm and k.k.is_lazy(1, k.mms[mm])
    await m.syscall(0, "munmap", base, 1)  # frees no table: CPU 1 is skipped, as lazy
    assert 1 in k.mms[mm].cpumask
    m.log.clear()
    await m.syscall(0, "exit")
    assert any(1 in e[4] for e in m.log), m.log  # exit's flush (freed tables) reached it
    assert m.cpus[1].loaded_mm == 0 and k.audit(m.dumps())[1] == []


# E, F. arch_tlbbatch_flush -> native_flush_tlb_multi(freed_tables false) ->
#    should_flush_tlb: reclaim's batched flush skips lazy CPUs; flush_tlb_func with
#    f->mm == NULL flushes only the mm the receiver runs and brings it up to date.
async def test_E_reclaim_skips_lazy_cpus_and_F_its_receivers_keep_ranged_flushes():
    m = make_machine(4, frames=256)
    k = m.kernel
    a, base, addrs = await proc(m, (1, 3), 100)
    await m.switch(3, 0)                        # CPU 3: lazy on a
    c, cbase, caddrs = await proc(m, (2,), 4)   # CPU 2 runs an unrelated mm c
    await m.switch(1, c)
    await m.switch(1, a)
    b = k.create_mm()
    await m.switch(0, b)
    more = await m.syscall(0, "mmap", 150, True)
    m.log.clear()
    await m.access(0, [more.address + i * PAGE for i in range(150)], write=True)
    reclaims = [e for e in m.log if e[1] == a]
    assert reclaims and not any(3 in e[4] for e in reclaims)   # the lazy CPU is left out
    await m.access(1, addrs[-4:])
    before = m.cpus[1].tlb.counters.flush_full
    res = await m.syscall(1, "munmap", addrs[-1], 1)
    assert [f.pages for f in res.local_flushes][-1] == 1   # a 1-page ranged flush ...
    assert m.cpus[1].tlb.counters.flush_range >= 1
    assert m.cpus[1].tlb.counters.flush_full == before + 1  # ... only batched-pending's full
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []


# S. arch/x86/mm/tlb.c choose_new_asid: TLB_NR_DYN_ASIDS = 6 per CPU; with 8 mms taking
#    turns every switch takes a new ASID and flushes; without PCID every CR3 write does.
@pytest.mark.parametrize("asids,full,refills", [(6, 80, 320), (8, 0, 0), (0, 80, 320)])
async def test_S_eight_mms_round_robin_on_six_asids_flush_at_every_switch(asids, full, refills):
    m = make_machine(1, asids=asids)
    k = m.kernel
    mms = []
    for _ in range(8):
        mm = k.create_mm()
        await m.switch(0, mm)
        r = await m.syscall(0, "mmap", 4, True)
        await m.access(0, [r.address + i * PAGE for i in range(4)], write=True)
        mms.append((mm, r.address))
    counters = m.cpus[0].tlb.counters
    flushes, misses = counters.flush_full, counters.misses
    for _ in range(10):
        for mm, a in mms:
            await m.switch(0, mm)
            await m.access(0, [a + i * PAGE for i in range(4)])
    assert counters.flush_full - flushes == full and counters.misses - misses == refills


# H. mm/memory.c do_anonymous_page: a read fault maps the shared zero page read-only;
#    the first write is do_wp_page -> wp_page_copy from it, a one-page flush to the mm's
#    other CPUs (which may cache the read-only zero-page entry).
@pytest.mark.parametrize("zero_page", [True, False])
async def test_H_a_read_maps_the_zero_page_and_the_first_write_copies_it(zero_page):
    m = make_machine(2, zero_page=zero_page)
    k = m.kernel
    mm = k.create_mm()
    await m.switch(0, mm)
    await m.switch(1, mm)
    r = await m.syscall(0, "mmap", 1, True)

    def data_frames() -> int:
        return k.frames.used - sum(k.stats.tables_allocated.values()) - k.reserved_frames

    await m.access(1, [r.address])                 # read
    assert data_frames() == (0 if zero_page else 1)
    m.log.clear()
    await m.access(0, [r.address], write=True)     # the first write
    if zero_page:
        assert dict(k.stats.faults) == {"anon": 1, "cow": 1}
        assert m.log == [("shootdown", mm, r.address >> 12, 1, (1,))]
        assert data_frames() == 1 and k.stats.zero_page_maps == 1
    else:
        assert dict(k.stats.faults) == {"anon": 1} and m.log == []
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []


# T. One swap entry per page, and the swap cache (mm/, ≈ v6.18). Reclaim gives a page ONE
#    slot (folio_alloc_swap) and try_to_unmap_one installs that entry in every PTE mapping
#    it, counted by the slot's swap count (fork's copy_nonpresent_pte: swap_duplicate).
#    do_swap_page finds the page in the swap cache (swap_cache_get_folio) and maps that
#    one frame into each mm that faults, read-only while it is shared; a write then is
#    do_wp_page: wp_page_copy with a one-page flush to the writer's other CPUs, or
#    wp_page_reuse once the page is the writer's alone (folio_free_swap drops the slot).
async def forked_then_reclaimed(m):
    """A parent on CPUs 0 and 2 with 60 written pages, forked (the child on CPU 1), then
    an unrelated mm's 60 pages push the parent's out to swap: (parent, child, other, V),
    V the parent's first page, swapped out in both."""
    k = m.kernel
    parent, base, addrs = await proc(m, (0, 2), 60)
    child = (await m.syscall(0, "fork")).child_mm
    await m.switch(1, child)
    other = k.create_mm()
    await m.switch(0, other)
    more = await m.syscall(0, "mmap", 60, True)
    await m.access(0, [more.address + i * PAGE for i in range(60)], write=True)  # reclaim
    await m.switch(0, parent)
    return parent, child, other, addrs[0]


def pte(k, mm: int, address: int) -> int:
    vpn = address >> 12
    return walk(k.mms[mm].pgd, vpn).entries[vpn % 512]


async def test_T_a_shared_page_gets_one_swap_entry_and_swaps_in_to_one_read_only_frame():
    m = make_machine(3, frames=128)
    k = m.kernel
    parent, child, other, V = await forked_then_reclaimed(m)
    entry = pte(k, parent, V)
    assert entry < 0 and pte(k, child, V) == entry           # try_to_unmap_one: one entry
    assert k.swap.refs(-entry) == 2                          # held by two PTEs
    assert k.stats.swap_outs == 2 * k.swap.allocated         # a slot per page, not per PTE
    await m.access(1, [V])                                   # the child reads: swapped in
    await m.access(0, [V])                                   # the parent: from the cache
    pp, pc = pte(k, parent, V), pte(k, child, V)
    assert pp > 0 and pp >> 1 == pc >> 1                     # one frame, mapped in both
    assert not pp & 1 and not pc & 1                         # read-only while shared
    assert (k.stats.swap_ins, k.stats.swap_reads) == (2, 1)
    pfn = pp >> 1
    assert (k.frames.mapcount[pfn], k.frames.refcount[pfn]) == (2, 2)
    assert k.swap.refs(-entry) == 0 and k.swap.cached(-entry) == pfn
    m.log.clear()
    await m.access(0, [V], write=True)                       # do_wp_page -> wp_page_copy
    assert k.stats.faults["cow"] == 1 and pte(k, parent, V) >> 1 != pfn
    # ptep_clear_flush: one page, to the parent's other CPU, not to the child's CPU 1
    assert m.log == [("shootdown", parent, V >> 12, 1, (2,))]
    m.log.clear()
    await m.access(1, [V], write=True)                       # the child's alone now:
    assert pte(k, child, V) == pfn << 1 | 1 and m.log == []  # wp_page_reuse, no flush
    assert k.swap.refs(-entry) == 0 and k.swap.cached(-entry) == 0  # the slot is free
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []


async def test_T_a_write_swap_in_of_a_page_another_mm_still_holds_in_swap_copies_it():
    """should_try_to_free_swap: the write fault's page is ours alone but for the swap cache,
    yet folio_free_swap keeps the slot (the parent's PTE holds it): not exclusive, so
    do_swap_page maps it read-only and do_wp_page copies it. The parent's entry is kept."""
    m = make_machine(3, frames=128)
    k = m.kernel
    parent, child, other, V = await forked_then_reclaimed(m)
    entry = pte(k, parent, V)
    shootdowns, freed = k.stats.shootdowns, k.frames.freed_total
    m.log.clear()
    await m.access(1, [V], write=True)
    assert pte(k, child, V) & 1 and k.stats.faults["cow"] == 1
    # wp_page_copy: its flush (the child runs on CPU 1 alone: no IPI), the read page freed
    assert k.stats.shootdowns == shootdowns + 1 and m.log == []
    assert k.frames.freed_total == freed + 1 and k.stats.swap_reads == 1
    assert pte(k, parent, V) == entry and k.swap.refs(-entry) == 1
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []


async def test_T_fork_reclaim_swap_in_write_exit_leaves_nothing_stale_and_nothing_behind():
    m = make_machine(3, frames=128)
    k = m.kernel
    parent, child, other, V = await forked_then_reclaimed(m)
    pages = [V + i * PAGE for i in range(60)]
    await m.access(1, pages[:30])                            # child reads half back
    await m.access(0, pages[:20])                            # parent: from the cache
    await m.access(0, pages[10:20], write=True)              # copies
    await m.access(1, pages[:10], write=True)                # reuses
    await m.syscall(1, "exit")                               # the child's entries go
    await m.access(0, pages[20:40], write=True)              # parent: from the cache, reuses
    assert k.stats.swap_ins > k.stats.swap_reads > 0 and k.stats.faults["cow"] >= 10
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []
    await m.syscall(0, "exit")
    await m.switch(0, other)
    await m.syscall(0, "exit")
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []
    assert k.frames.used == k.reserved_frames and len(k.swap) == 0 and len(k.lru) == 0


# Reclaim under --broadcast hw. arch/x86/mm/tlb.c (≥ 6.15) arch_tlbbatch_add_pending: an
#    mm with a global ASID (consider_global_asid: active on 4+ CPUs) has each unmapped page
#    invalidated at once by INVLPGB (invlpgb_flush_user_nr_nosync), completed by the
#    TLBSYNC in arch_tlbbatch_flush; only the other mms' CPUs join the batch's IPIs.
@pytest.mark.parametrize("hw", [True, False])
async def test_reclaim_of_a_global_asid_mm_broadcasts_its_pages_instead_of_ipis(hw):
    m = make_machine(5, frames=256, hw_broadcast=hw)
    k = m.kernel
    wide, base, addrs = await proc(m, (1, 2, 3, 4), 100)   # running on 4 CPUs: global ASID
    other = k.create_mm()
    await m.switch(0, other)
    more = await m.syscall(0, "mmap", 150, True)
    await m.access(0, [more.address + i * PAGE for i in range(150)], write=True)
    assert k.stats.swap_outs > 0
    if hw:
        assert k.stats.reclaim_ipis == 0 and k.stats.broadcast_pages == k.stats.swap_outs
        assert m.cpus[1].tlb.counters.flush_hardware == k.stats.broadcasts > 0
    else:
        assert k.stats.reclaim_ipis == 4 * k.stats.reclaim_shootdowns > 0
        assert k.stats.broadcasts == 0
    await m.access(1, addrs)                                 # swap back in, read
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []


async def test_T_a_page_swapped_out_of_one_mm_alone_swaps_in_writable_on_a_read():
    """try_to_unmap_one marks the entry of an exclusive page (pte_swp_mkexclusive); do_swap_page
    maps it writable even on a read fault (RMAP_EXCLUSIVE): no COW fault on the next write."""
    m = make_machine(2, frames=128)
    k = m.kernel
    mm, base, addrs = await proc(m, (0,), 60)
    other = k.create_mm()
    await m.switch(1, other)
    more = await m.syscall(1, "mmap", 60, True)
    await m.access(1, [more.address + i * PAGE for i in range(60)], write=True)  # reclaim
    entry = pte(k, mm, base)
    assert entry < 0 and k.swap.exclusive(-entry)
    await m.access(0, [base])
    await m.access(0, [base], write=True)
    assert pte(k, mm, base) & 1 and k.stats.faults["cow"] == 0
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []
