"""TLB misses and page faults (DESIGN.md §3): the hardware walker first, then the
fault handler — allocate outside the lock, lock, re-check, install or back out; a
write to a read-only page in a writable VMA copies it (wp_page_copy) or reuses it."""
from __future__ import annotations

from services.common.addresses import PTRS_PER_TABLE, USER_VPN_END
from services.common.errors import OutOfRange
from services.memory.flush import Flusher
from services.memory.locks import OpContext
from services.memory.mm import Mm, Vma
from services.memory.oracle import Revokes
from services.memory.pagetable import PteTable, make_pte, pte_pfn
from services.memory.reclaim import Reclaimer
from services.memory.rules import Rule
from services.memory.sharing import Sharing
from services.memory.state import FlushOrder, KernelState, MissResult
from services.memory.tables import Tables


class Faults:
    def __init__(self, k: KernelState, tables: Tables, flusher: Flusher, sharing: Sharing,
                 reclaimer: Reclaimer):
        self.k, self.tables, self.flusher = k, tables, flusher
        self.sharing, self.reclaimer = sharing, reclaimer

    async def handle_miss(self, cpu: int, mm: Mm, vpn: int, write: bool,
                          vt: int | None = None) -> MissResult:
        """The walk the CPU's miss needs; a fault when it finds no usable PTE. `vt`: the
        CPU's virtual time (the walk itself is the CPU's to price)."""
        if not 0 <= vpn < USER_VPN_END:
            raise OutOfRange(f"vpn {vpn:#x} is past the 47-bit user address space")
        pte = self.tables.hw_pte(mm, vpn)  # the hardware walker: no lock
        if pte is not None and (not write or pte[1]):
            return MissResult("walked", *pte, vt=vt)
        k = self.k
        t0 = k.clock()
        ctx = k.ctx(vt)
        ctx.spend(k.policy.cost_model.fault_ns)  # the trap, the handler's entry and exit
        result = await self._fault(ctx, cpu, mm, vpn, write)
        result.vt = ctx.vt
        k.stats.faults[result.outcome] += 1
        k.stats.fault_latency_s.append((k.clock() - t0) / 1e9)
        return result

    async def _fault(self, ctx: OpContext, cpu: int, mm: Mm, vpn: int,
                     write: bool) -> MissResult:
        k = self.k
        local: list[FlushOrder] = []
        async with mm.mmap_lock.read(ctx):
            k.alive(mm)
            vma = mm.find_vma(vpn)
            if vma is None:
                return MissResult("segv")
            if write and not vma.writable:
                return MissResult("prot")
            table = await self.tables.ensure_pte(ctx, mm, vpn)
            if write and table.share_count:
                # Writing through a shared table: copy the table first. Read faults keep
                # sharing ("continue to share page tables over read-only page faults").
                await self.sharing.unshare(ctx, cpu, mm, table, local)
                table = await self.tables.ensure_pte(ctx, mm, vpn)  # the private copy
            if write and table.wp and not table.share_count:
                await self.sharing.unprotect(ctx, mm, table)
            slot = table.slot(vpn)
            result = None
            if table.entries[slot] < 0:
                result = await self._swap_in(ctx, cpu, mm, vma, vpn, table, write)
            elif table.entries[slot] == 0:
                result = await self._populate(ctx, cpu, mm, vma, vpn, table, write)
            if result is None or (write and not result.writable and result.outcome == "swapin"):
                # (do_swap_page ends a write fault to a page it could map only read-only
                # with do_wp_page: the copy below.)
                pte = table.entries[slot]
                if pte > 0 and write and not table.writable(pte):
                    result = await self._cow(ctx, cpu, mm, vpn, table)
                elif pte > 0:
                    result = MissResult("walked", pte_pfn(pte), table.writable(pte),
                                        table.tids[slot])
                else:  # reclaimed again while we waited: the CPU accesses again
                    result = MissResult("retry")
        result.local_flushes = local + result.local_flushes + k.pending_local.pop(cpu, [])
        return result

    async def _populate(self, ctx: OpContext, cpu: int, mm: Mm, vma: Vma, vpn: int,
                        table: PteTable, write: bool) -> MissResult | None:
        """A none PTE: zero-fill. Installing needs no flush (not present -> present),
        also in a shared table, where every sharer sees the page. A read maps the shared
        zero page read-only (do_anonymous_page; the first write copies it). Returns None
        when another CPU got there first."""
        k = self.k
        slot = table.slot(vpn)
        if not write and k.zero_pfn:
            async with self.tables.pte_locked(ctx, mm, table):
                if table.entries[slot] != 0:
                    return None
                k.frames.get(k.zero_pfn)
                k.stats.zero_page_maps += 1
                return self.install(mm, table, vpn, k.zero_pfn, False, "anon", ctx=ctx)
        fresh = await self.reclaimer.alloc_page(ctx, cpu, zero=True)  # outside the lock
        async with self.tables.pte_locked(ctx, mm, table):
            pmd = self.tables.pmd_of(mm, vpn)  # still this mm's table (not unshared)?
            if table.entries[slot] == 0 and pmd.entries[pmd.slot(vpn)] is table:
                return self.install(mm, table, vpn, fresh, vma.writable, "anon", ctx=ctx)
        self._put(fresh)  # lost the race: back out
        return None

    async def _swap_in(self, ctx: OpContext, cpu: int, mm: Mm, vma: Vma, vpn: int,
                       table: PteTable, write: bool) -> MissResult | None:
        """do_swap_page (mm/memory.c, ≈ v6.18): the page of the swap entry, from the swap
        cache if it is resident (swap_cache_get_folio: every mm that faults on the entry
        maps that one frame), else read into a new frame that joins the cache. Under the
        lock: the entry unchanged, swap_free drops this PTE's hold on the slot; on a
        write fault a page whose only reference is ours leaves the cache
        (should_try_to_free_swap -> folio_free_swap, which keeps the slot while other
        PTEs hold it). Mapped writable only when exclusive: the entry was
        (pte_swp_exclusive), or no one else references the frame (folio_ref_count == 1)
        — else read-only, and a write fault goes on to the copy (do_wp_page). Returns
        None when the entry changed meanwhile (the caller re-reads the PTE)."""
        k = self.k
        slot = table.slot(vpn)
        before = table.entries[slot]
        entry = -before
        pfn = k.swap.cached(entry)
        if pfn:
            k.frames.get(pfn)
        else:
            # The read, outside the lock (priced as a zero-fill: no swap-read price).
            fresh = await self.reclaimer.alloc_page(ctx, cpu, zero=True)
            pfn = k.swap.cached(entry)  # read by another fault meanwhile?
            if pfn:
                k.frames.get(pfn)
                self._put(fresh)
            elif k.swap.refs(entry):
                pfn = fresh
                k.swap.add_to_cache(entry, pfn)
                k.stats.swap_reads += 1
            else:  # every PTE let go of the slot meanwhile (zapped): nothing to read
                self._put(fresh)
                return None
        async with self.tables.pte_locked(ctx, mm, table):
            pmd = self.tables.pmd_of(mm, vpn)  # still this mm's table (not unshared)?
            if table.entries[slot] == before and pmd.entries[pmd.slot(vpn)] is table:
                exclusive = k.swap.exclusive(entry)
                k.swap.drop(entry)  # swap_free
                table.present -= 1
                k.stats.swap_ins += 1
                if write and k.frames.refcount[pfn] == 1:  # ours alone but for the cache
                    exclusive |= k.swap.free_swap(pfn)
                return self.install(mm, table, vpn, pfn, vma.writable and exclusive,
                                    "swapin", ctx=ctx)
        self._put(pfn)  # the entry changed meanwhile: back out
        return None

    def _put(self, pfn: int) -> None:
        """Drop a fault's own reference to a frame it did not map; an unmapped frame it
        was the last to hold is freed, and leaves the swap cache."""
        k = self.k
        if k.frames.put(pfn):
            k.swap.uncache(pfn)
            k.frames.free(pfn)

    def install(self, mm: Mm, table: PteTable, vpn: int, pfn: int, writable: bool,
                outcome: str, replaces: int = 0, ctx: OpContext | None = None) -> MissResult:
        """Map `pfn` at `vpn` (under the PTE lock: `ctx` pays for it in virtual time);
        `replaces`: the translation a COW copy takes the place of, which must be dead
        already (the oracle's coherence check)."""
        k = self.k
        if ctx is not None:
            ctx.spend(k.policy.cost_model.pte_install_ns)
        slot = table.slot(vpn)
        if replaces:
            k.oracle.superseded(replaces, k.clock())
        table.entries[slot] = make_pte(pfn, writable)
        table.tids[slot] = tid = table.new_tid()
        table.present += 1
        k.frames.mapcount[pfn] += 1
        if pfn != k.zero_pfn:  # the zero page is no one's, and never reclaimed
            k.frames.rmap_vpn[pfn] = vpn
            k.frames.rmap_family[pfn] = mm.family
            k.lru.add(pfn)
        return MissResult(outcome, pfn, table.writable(table.entries[slot]), tid)

    async def _cow(self, ctx: OpContext, cpu: int, mm: Mm, vpn: int,
                   table: PteTable) -> MissResult:
        """A write to a read-only PTE in a writable VMA: reuse the page if it is ours
        alone, else copy it (wp_page_copy): clear the old PTE and flush it, and only
        then install the copy, so that no CPU is still served the old frame while
        another is served the new one."""
        k = self.k
        slot = table.slot(vpn)
        fresh = await self.reclaimer.alloc_page(ctx, cpu)  # may reclaim: even the page itself
        ctx.spend(k.policy.cost_model.page_copy_ns)  # copied outside the lock
        zap = self.flusher.zap(mm, "cow", ctx, pages=1)
        async with self.tables.pte_locked(ctx, mm, table):
            pte = table.entries[slot]
            if pte > 0 and table.writable(pte):  # another CPU broke the COW first
                result = MissResult("walked", pte_pfn(pte), True, table.tids[slot])
            elif pte <= 0 or table.wp:
                # Reclaimed, or unshared, while we allocated: nothing to fill, the CPU
                # accesses again (the fault returns and the access refaults).
                result = MissResult("retry")
            else:
                old_pfn, old_tid = pte_pfn(pte), table.tids[slot]
                if (k.frames.mapcount[old_pfn] == 1 and k.frames.refcount[old_pfn] == 1
                        and k.swap.free_swap(old_pfn)):
                    # wp_can_reuse_anon_folio (a swap-cache page only once no PTE holds
                    # its slot: folio_free_swap), then wp_page_reuse: upgrading needs no
                    # flush; the old entry stays valid
                    table.entries[slot] = make_pte(old_pfn, True)
                    table.tids[slot] = tid = table.new_tid()
                    k.oracle.transition(old_tid, tid, k.clock(), Revokes.NOTHING)
                    result = MissResult("cow", old_pfn, True, tid)
                else:
                    if k.rules.breaks(Rule.COW_CLEAR_FIRST):  # the copy goes in first
                        result = self.install(mm, table, vpn, fresh, True, "cow", old_tid, ctx)
                    else:
                        table.entries[slot] = 0  # ptep_clear_flush: clear ...
                    table.present -= 1
                    k.frames.mapcount[old_pfn] -= 1
                    if not k.frames.mapcount[old_pfn]:
                        k.swap.uncache(old_pfn)  # its last mapping: out of the swap cache
                    zap.gather.clear_pte(vpn, old_tid, old_pfn)
                    await self.flusher.flush(mm, cpu, zap, Rule.COW_FLUSH)  # ... flush, then
                    if k.rules.keeps(Rule.COW_CLEAR_FIRST):
                        result = self.install(mm, table, vpn, fresh, True, "cow", old_tid, ctx)
                    fresh = 0
        if fresh:
            self._put(fresh)
        self.flusher.release(zap.to_free, zap.tables)
        result.local_flushes = zap.local
        return result

    async def populate_range(self, ctx: OpContext, cpu: int, mm: Mm, start: int, end: int,
                             writable: bool) -> None:
        """MAP_POPULATE: a zero-filled page in every none PTE, a table's worth at a time
        (allocated outside the lock, installed under it, as a fault would)."""
        k = self.k
        vpn = start
        while vpn < end:
            stop = min(end, vpn - vpn % PTRS_PER_TABLE + PTRS_PER_TABLE)
            table = await self.tables.ensure_pte(ctx, mm, vpn)
            fresh = [await self.reclaimer.alloc_page(ctx, cpu, zero=True)
                     for _ in range(stop - vpn)]
            async with self.tables.pte_locked(ctx, mm, table):
                for v in range(vpn, stop):
                    if table.entries[table.slot(v)] == 0:
                        self.install(mm, table, v, fresh.pop(), writable, "anon", ctx=ctx)
            for pfn in fresh:  # slots populated meanwhile: back out
                k.frames.put(pfn)
                k.frames.free(pfn)
            vpn = stop
