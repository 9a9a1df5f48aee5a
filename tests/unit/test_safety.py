"""The safety breaks an audit found (the shared notes' attacks/test_attacks.py), turned
around: each test is the attack, asserting what Linux guarantees, with the Linux code
that guarantees it. In-process machine (tests/unit/machine.py), no network."""
import asyncio

import pytest

from services.common.errors import ResourceExhausted
from services.memory.pagetable import TID_SEQ_BITS, walk
from tests.unit.machine import PAGE, make_machine, proc


def entry(m, cpu, mm, addr):
    for mm_, vpn, e in m.cpus[cpu].tlb.entries():
        if mm_ == mm and vpn == addr >> 12:
            return e
    return None


def pte(m, mm, addr):
    table = walk(m.kernel.mms[mm].pgd, addr >> 12)
    return table.entries[(addr >> 12) % 512] if table else 0


async def settle(n: int = 50) -> None:
    """Let every runnable task of the machine run until it blocks."""
    for _ in range(n):
        await asyncio.sleep(0)


def clean(m) -> None:
    k = m.kernel
    assert k.oracle.stale == 0 and k.oracle.incoherent == 0
    assert k.audit(m.dumps())[1] == []


# A. mm/memory.c wp_page_copy: "Clear the pte entry and flush it first, before updating
#    the pte with the new entry, to keep TLBs on different CPUs in sync."
async def test_A_cow_clears_and_flushes_the_old_page_before_installing_the_copy():
    m = make_machine(3)
    k = m.kernel
    mm, base, (V, FLAG) = await proc(m, (0,), 2)
    await m.syscall(0, "fork")                        # V is COW-shared with the child
    await m.switch(1, mm)
    await m.switch(2, mm)
    await m.access(2, [V])                            # CPU 2 caches V -> old page, RO
    old = entry(m, 2, mm, V)
    real, seen = k.shootdown, {}

    async def port(order, targets):
        if order.reason == "cow" and not seen:
            # CPU 1's COW flush is in flight: the PTE is already clear, so CPU 0's write
            # finds no translation and faults, waiting for the table lock.
            seen["pte"] = pte(m, mm, V)
            seen["cpu0"] = asyncio.create_task(m.access(0, [V], write=True))
            await settle()
            seen["cpu0 waited"] = not seen["cpu0"].done()
        return await real(order, targets)

    k.shootdown = port
    await m.access(1, [V], write=True)               # CPU 1: the COW fault on V
    await seen["cpu0"]
    await m.access(2, [V])
    assert seen["pte"] == 0 and seen["cpu0 waited"]
    frames = {entry(m, c, mm, V).pfn for c in (0, 1, 2)}
    assert len(frames) == 1 and old.pfn not in frames  # one frame, the copy, everywhere
    clean(m)


async def _reclaim_in_flight(m, syscall, *args):
    """mm A on CPUs 1 and 2 with writable entries; CPU 0 (mm B) reclaims, and its
    batched flush is held in flight while CPU 2 makes the call on a reclaimed page."""
    k = m.kernel
    a, base, addrs = await proc(m, (1, 2), 60)
    b = k.create_mm()
    await m.switch(0, b)
    more = await m.syscall(0, "mmap", 200, True)
    started, release = asyncio.Event(), asyncio.Event()
    real = k.shootdown

    async def port(order, targets):
        if order.reason == "reclaim" and not started.is_set():
            started.set()
            await release.wait()
        return await real(order, targets)

    k.shootdown = port
    pressure = asyncio.create_task(
        m.access(0, [more.address + i * PAGE for i in range(200)], write=True))
    await asyncio.wait_for(started.wait(), 5)
    victim = next(x for x in addrs if pte(m, a, x) < 0)
    assert entry(m, 1, a, victim).writable           # CPU 1 still holds the RW entry
    call_args = () if syscall == "fork" else (victim, *args)
    r = await m.syscall(2, syscall, *call_args)      # completes while reclaim waits
    return r, victim, entry(m, 1, a, victim), release, pressure, a


# B1-B3. mm/rmap.c flush_tlb_batched_pending (commit 3ea277194daa), from zap_pte_range
#    and change_pte_range: a PTE change that finds reclaim's flush still pending flushes
#    the mm before it returns.
@pytest.mark.parametrize("syscall,args,after", [
    ("mprotect", (1, False), "segv"),        # B1: a write after mprotect(RO) returned
    ("munmap", (1,), "segv"),                # B2: an access after munmap returned
    ("madvise_dontneed", (1,), "faults"),    # B3: after MADV_DONTNEED: a fresh zero page
])
async def test_B_a_call_racing_a_reclaim_flush_flushes_before_it_returns(syscall, args, after):
    m = make_machine(3, frames=256)
    r, victim, cpu1_entry, release, pressure, a = await _reclaim_in_flight(m, syscall, *args)
    assert r.shootdowns == 1 and cpu1_entry is None  # the batched-pending flush reached CPU 1
    later = asyncio.create_task(m.access(1, [victim], write=True))
    release.set()
    await pressure
    s = await later
    assert getattr(s, after) == 1 and s.hits == 0
    clean(m)


# B4 (and G). kernel/fork.c dup_mmap ends with flush_tlb_mm(oldmm), whatever it
#    write-protected: with a reclaim flush in flight, the parent's CPUs keep nothing.
async def test_B4_fork_flushes_the_parent_even_when_it_write_protects_nothing():
    m = make_machine(3, frames=256)
    r, victim, cpu1_entry, release, pressure, a = await _reclaim_in_flight(m, "fork")
    assert r.shootdowns == 1 and cpu1_entry is None
    later = asyncio.create_task(m.access(1, [victim], write=True))
    release.set()
    await pressure
    s = await later
    assert s.hits == 0 and s.faults >= 1
    clean(m)


async def test_G_fork_of_a_read_only_mm_still_flushes_the_parents_cpus():
    m = make_machine(2)
    mm, base, addrs = await proc(m, (0, 1), 8, write=False, vma_writable=False)
    m.log.clear()
    r = await m.syscall(0, "fork")
    assert r.shootdowns == 1 and m.log == [("shootdown", mm, 0, 0, (1,))]  # full
    clean(m)


# C. A fault that finds its PTE gone fills nothing: "the fault returns and the access
#    refaults" (do_wp_page / wp_page_copy re-check under the PTL and return).
async def test_C_cow_under_memory_pressure_refaults_instead_of_filling_pfn_0():
    m = make_machine(2, frames=128)
    k = m.kernel
    parent, base, addrs = await proc(m, (0,), 104)   # 104 pages + 8 tables: 16 free = low
    child = (await m.syscall(0, "fork")).child_mm
    await m.switch(1, child)
    assert k.frames.free_count <= k.low_watermark
    s = await m.access(1, [addrs[0]], write=True)    # COW -> _alloc_page -> reclaim of V
    e = entry(m, 1, child, addrs[0])
    assert e is not None and e.pfn != 0 and e.tid != 0 and e.writable
    assert pte(m, child, addrs[0]) == (e.pfn << 1 | 1)  # what the TLB holds is the PTE
    r = await m.access(1, [addrs[0]] * 5)
    assert r.hits == 5 and s.faults >= 1
    clean(m)


# J. Tids never alias: table uid and change counter have room for any run.
async def test_J_tids_do_not_wrap_after_2_pow_24_changes():
    m = make_machine(1)
    k = m.kernel
    mm = k.create_mm()
    await m.switch(0, mm)
    r1 = await m.syscall(0, "mmap", 2, True)
    r2 = await m.syscall(0, "mmap", 512, True)       # 2 MiB-aligned: another PTE table
    await m.access(0, [r1.address], write=True)
    await m.access(0, [r2.address], write=True)
    t4, t5 = walk(k.mms[mm].pgd, r1.address >> 12), walk(k.mms[mm].pgd, r2.address >> 12)
    victim_tid = t5.tids[0]
    await m.syscall(0, "madvise_dontneed", r2.address, 1)
    t4.seq = 1 << 24                                 # a long run on a hot table
    await m.access(0, [r1.address + PAGE], write=True)
    assert entry(m, 0, mm, r1.address + PAGE).tid != victim_tid
    r = await m.access(0, [r1.address + PAGE] * 3, write=True)
    assert r.hits == 3
    clean(m)


async def test_J_a_table_out_of_translation_ids_refuses_instead_of_wrapping():
    m = make_machine(1)
    mm, base, addrs = await proc(m, (0,), 2)
    table = walk(m.kernel.mms[mm].pgd, base >> 12)
    table.seq = (1 << TID_SEQ_BITS) - 1
    with pytest.raises(ResourceExhausted, match="translation ids would repeat"):
        table.new_tid()


# M. exit_mmap runs once: a second CPU of the mm exiting meanwhile only goes idle.
async def test_M_two_cpus_exiting_at_once_tear_the_mm_down_once():
    m = make_machine(3)
    k = m.kernel
    mm, base, addrs = await proc(m, (0, 1), 4)
    real, second = k.shootdown, []

    async def port(order, targets):
        if order.reason == "exit" and not second:    # exit #1 is mid-teardown
            second.append(asyncio.create_task(k.exit(1, mm)))
            await settle()                           # exit #2 passed running(), now waits
        return await real(order, targets)

    k.shootdown = port
    await k.exit(0, mm)
    other = k.create_mm()
    pgd = k.mms[other].pgd.pfn
    r = await second[0]
    assert r.shootdowns == 0 and r.pages_freed == 0 and k.cpu_mm[1] == 0
    assert k.frames.refcount[pgd] == 1 and not k.frames.is_free(pgd)  # still live
    assert k.frames.used == 1 + k.reserved_frames  # `other`'s pgd (and the zero page)


# N. A page reclaim could not unmap everywhere (a sharer copied its table meanwhile)
#    stays resident and on the LRU, as try_to_unmap failing puts the folio back.
async def test_N_reclaim_racing_unshare_keeps_every_mapped_page_reclaimable():
    m = make_machine(4, fork="share", lock="split", frames=1200)
    k = m.kernel
    a, base, addrs = await proc(m, (1,), 1024)
    c = (await m.syscall(1, "fork")).child_mm
    await m.switch(2, c)
    await m.switch(3, c)
    b = k.create_mm()
    await m.switch(0, b)
    more = await m.syscall(0, "mmap", 4000, True)
    real = k.shootdown
    hold, held = asyncio.Event(), asyncio.Event()

    async def port(order, targets):
        if order.reason == "unshare" and not held.is_set():
            held.set()
            await hold.wait()
        return await real(order, targets)

    k.shootdown = port
    t2 = asyncio.create_task(m.access(2, [addrs[600]], write=True))   # unshare T2
    await held.wait()
    t3 = asyncio.create_task(m.access(3, [addrs[5]], write=True))     # unshare T1: waits
    await settle(5)
    need = k.frames.free_count - k.low_watermark
    t0 = asyncio.create_task(m.access(0, [more.address + i * PAGE for i in range(need + 1)],
                                      write=True))
    await settle()
    hold.set()
    await asyncio.gather(t2, t3, t0)
    assert k.stats.reclaim_shootdowns >= 1
    for mm_id in (a, c):
        for x in addrs[:512]:
            p = pte(m, mm_id, x)
            assert p <= 0 or (p >> 1) in k.lru, (mm_id, hex(x))
    clean(m)


# P. mm/mmu_gather.c tlb_finish_mmu: "If there are parallel threads are doing PTE
#    changes on same range under non-exclusive lock ... flush TLB forcefully"
#    (mm_tlb_flush_nested).
async def test_P_a_madvise_beside_another_in_flight_flushes_the_whole_mm():
    m = make_machine(3)
    k = m.kernel
    mm, base, addrs = await proc(m, (0, 1, 2), 1024)
    V = addrs[100]
    started, release = asyncio.Event(), asyncio.Event()
    real = k.shootdown

    async def port(order, targets):
        if order.reason == "madvise" and not started.is_set():
            started.set()
            await release.wait()
        return await real(order, targets)

    k.shootdown = port
    first = asyncio.create_task(m.syscall(0, "madvise_dontneed", V, 600))
    await started.wait()
    m.log.clear()
    r2 = await m.syscall(2, "madvise_dontneed", V, 1)  # finds V already clear
    assert r2.shootdowns == 1 and m.log == [("shootdown", mm, 0, 0, (0, 1))]  # whole mm
    assert entry(m, 1, mm, V) is None
    after = await m.access(1, [V])                     # a fresh zero page
    assert after.hits == 0 and after.faults == 1
    release.set()
    await first
    clean(m)


# R. Split PTE locks (Linux >= 2.6.15): the zap's final flush is tlb_finish_mmu, after
#    every PTE table lock is dropped, so a fault on the table does not wait for IPIs;
#    `mm` mode keeps 2.6.14's page_table_lock held across the flush.
@pytest.mark.parametrize("lock,fault_waits", [("split", False), ("mm", True)])
async def test_R_a_fault_waits_for_the_zap_flush_only_in_mm_mode(lock, fault_waits):
    m = make_machine(3, lock=lock)
    k = m.kernel
    mm = k.create_mm()
    for c in range(3):
        await m.switch(c, mm)
    r = await m.syscall(0, "mmap", 512, True)
    addrs = [r.address + i * PAGE for i in range(512)]
    await m.access(1, addrs[:500], write=True)           # pages 500.. still none
    started, release = asyncio.Event(), asyncio.Event()
    real = k.shootdown

    async def port(order, targets):
        if order.reason == "madvise" and not started.is_set():
            started.set()
            await release.wait()
        return await real(order, targets)

    k.shootdown = port
    zap = asyncio.create_task(m.syscall(0, "madvise_dontneed", r.address, 100))
    await started.wait()
    fault = asyncio.create_task(m.access(2, [addrs[505]], write=True))  # untouched page
    await settle(100)
    assert fault.done() is not fault_waits
    release.set()
    await zap
    await fault
    clean(m)


# Reclaim's flush in flight, a fault maps the page again from the swap cache
# (do_swap_page: swap_cache_get_folio) and the mm unmaps it: that drops the fault's
# reference only. Reclaim still holds the frame, and frees it after its own flush; no
# frame was freed before its flush was acked (the soak's frames_freed_without_ack).
async def test_a_page_mapped_from_the_swap_cache_during_reclaims_flush_is_freed_after_it():
    m = make_machine(3, frames=256)
    k = m.kernel
    r, victim, _, release, pressure, a = await _reclaim_in_flight(m, "mprotect", 1, False)
    pfn = k.swap.cached(-pte(m, a, victim))
    assert pfn and k.k.unflushed[pfn]                # reclaim's flush not acked yet
    freed = k.frames.gen[pfn]
    await m.access(2, [victim])                      # swapped in: that very frame
    assert pte(m, a, victim) >> 1 == pfn
    await m.syscall(2, "munmap", victim, 1)
    assert k.frames.gen[pfn] == freed and k.stats.frames_freed_without_ack == 0
    release.set()
    await asyncio.wait_for(pressure, 10)
    assert k.frames.gen[pfn] == freed + 1            # freed once, by reclaim, after its flush
    assert k.stats.frames_freed_without_ack == 0
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []


# The zero page is mapped by every read of a page never written (do_anonymous_page),
# and each zap gathers it like any page; two munmaps of zero-page mappings, the first's
# flush in flight, release it twice. Neither frees it (it is pinned): nothing was freed
# before its flush was acked. (The chaos soak counted this once: its mixed workload
# reads pages that MADV_DONTNEED emptied.)
async def test_the_zero_page_released_while_another_flush_of_it_is_in_flight_is_not_freed():
    m = make_machine(4)
    k = m.kernel
    a, _, in_a = await proc(m, (0, 1), 1, write=False)        # two mms, each reading one
    b, _, in_b = await proc(m, (2, 3), 1, write=False)        # page: the zero page
    assert pte(m, a, in_a[0]) >> 1 == pte(m, b, in_b[0]) >> 1 == k.k.zero_pfn
    started, release = asyncio.Event(), asyncio.Event()
    real = k.shootdown

    async def port(order, targets):
        if not started.is_set():
            started.set()
            await release.wait()
        return await real(order, targets)

    k.shootdown = port
    first = asyncio.create_task(m.syscall(0, "munmap", in_a[0], 1))
    await asyncio.wait_for(started.wait(), 5)
    assert k.k.unflushed[k.k.zero_pfn]                        # its flush not acked yet
    await asyncio.wait_for(m.syscall(2, "munmap", in_b[0], 1), 5)
    release.set()
    await asyncio.wait_for(first, 5)
    assert k.stats.frames_freed_without_ack == 0 and not k.frames.is_free(k.k.zero_pfn)
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []
