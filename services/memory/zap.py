"""Changing a range of PTEs (DESIGN.md §3, §5): zapping it — munmap, madvise(DONTNEED),
exit (unmap_region: zap_pte_range, free_pgtables, tlb_finish_mmu) — and
write-protecting it (mprotect's change_protection).

Where the flush happens relative to the lock: with split PTE locks (Linux >= 2.6.15)
each table's lock is held only while its PTEs change, a full batch flushes under it
(force_flush) and the final flush comes after every PTE lock is dropped; in `mm` mode
(2.6.14) page_table_lock is held across the whole change, final flush included.
Either way, before a table's PTEs change, a reclaim flush still pending for the mm is
done first (flush_tlb_batched_pending).
"""
from __future__ import annotations

from services.common.addresses import PTRS_PER_TABLE
from services.memory.flush import Flusher, Zap
from services.memory.gather import Gather
from services.memory.locks import OpContext
from services.memory.mm import Mm
from services.memory.pagetable import PteTable, make_pte, present_ptes, pte_pfn, pte_writable, \
    swapped_ptes
from services.memory.rules import Rule
from services.memory.sharing import Sharing
from services.memory.state import KernelState
from services.memory.tables import Tables


class Zapper:
    def __init__(self, k: KernelState, tables: Tables, flusher: Flusher, sharing: Sharing):
        self.k, self.tables, self.flusher, self.sharing = k, tables, flusher, sharing

    async def zap(self, ctx: OpContext, cpu: int, mm: Mm, start: int, end: int, zap: Zap,
                  free_tables: bool, free_pgd: bool = False) -> None:
        """unmap_region over [start, end): every PTE table's PTEs cleared into the gather,
        then free_pgtables, then tlb_finish_mmu. Frees are left in `zap` for the caller.

        Shared tables first (Phillips 2002): one covered whole by an unmap is dropped by
        decrementing its count; a partial one (or any, for madvise) is unshared, and
        the private copy zapped like any table. Dropped tables are flushed before the
        sharer locks are released."""
        tables, flusher = self.tables, self.flusher
        shared = [t for t in tables.pte_tables(mm, start, end) if t.share_count]
        whole = [t for t in shared if free_tables and start <= t.base_vpn
                 and t.base_vpn + PTRS_PER_TABLE <= end]
        for table in shared:
            if table not in whole:
                await self.sharing.unshare(ctx, cpu, mm, table, zap.local)
        with flusher.gathering(mm):
            async with tables.sharers_locked(ctx, mm, whole), tables.zap_lock(ctx, mm):
                async with ctx.locked_once(mm.page_table_lock):
                    for table in whole:
                        pmd = tables.pmd_of(mm, table.base_vpn)
                        if table.share_count and pmd.entries[pmd.slot(table.base_vpn)] is table:
                            self.sharing.drop(mm, table, zap.gather)
                for table in tables.pte_tables(mm, start, end):
                    async with tables.pte_locked(ctx, mm, table):
                        await flusher.batched_pending(mm, cpu, zap)
                        for vpn, slot, pte in present_ptes(table, start, end):
                            if zap.gather.full:  # force_flush: under the table lock
                                await flusher.flush(mm, cpu, zap, Rule.ZAP_FLUSH)
                            self._clear_pte(table, vpn, slot, pte, zap)
                        for vpn, slot, swap_slot in swapped_ptes(table, start, end):
                            table.entries[slot] = 0
                            table.present -= 1
                            self.k.swap.drop(swap_slot)  # free_swap_and_cache
                    # Frames freed after the lock is dropped; their flush already completed.
                    zap.freed += flusher.release(zap.to_free, [])
                    zap.to_free.clear()
                if free_tables or free_pgd:
                    async with ctx.locked_once(mm.page_table_lock):
                        if free_tables:
                            tables.unlink_free(mm, start, end, zap.gather)
                        if free_pgd:
                            zap.gather.free_table(mm.pgd, 0)
                await flusher.finish(mm, cpu, zap, Rule.ZAP_FLUSH)

    def _clear_pte(self, table: PteTable, vpn: int, slot: int, pte: int, zap: Zap) -> None:
        """ptep_get_and_clear into the gather (the page is freed after its flush)."""
        k = self.k
        if zap.ctx is not None:
            zap.ctx.spend(k.policy.cost_model.pte_clear_ns)
        if k.rules.breaks(Rule.CLEAR_BEFORE_FLUSH):  # walkers see it until the flush
            k.ghosts[table.uid, slot] = (pte, table.tids[slot], table.writable(pte))
            zap.deferred.append((table.uid, slot))
        table.entries[slot] = 0
        table.present -= 1
        pfn = pte_pfn(pte)
        k.frames.mapcount[pfn] -= 1
        if not k.frames.mapcount[pfn]:
            # free_swap_cache: the last mapping gone, the page leaves the swap cache (at
            # once here, not at the next reclaim: SwapSpace); PTEs holding its slot
            # keep the slot.
            k.swap.uncache(pfn)
        zap.gather.clear_pte(vpn, table.tids[slot], pfn)

    async def write_protect(self, ctx: OpContext, cpu: int, mm: Mm, start: int, end: int,
                            zap: Zap) -> None:
        """change_protection to read-only over [start, end), then tlb_finish_mmu."""
        tables, flusher = self.tables, self.flusher
        with flusher.gathering(mm):
            async with tables.zap_lock(ctx, mm):
                for table in tables.pte_tables(mm, start, end):
                    async with tables.pte_locked(ctx, mm, table):
                        await flusher.batched_pending(mm, cpu, zap)
                        changed = _write_protect(table, start, end, zap.gather)
                        ctx.spend(changed * self.k.policy.cost_model.pte_clear_ns)
                await flusher.finish(mm, cpu, zap, Rule.MPROTECT_FLUSH)


def _write_protect(table: PteTable, start: int, end: int, gather: Gather) -> int:
    """Returns how many PTEs it changed."""
    changed = 0
    for vpn, slot, pte in present_ptes(table, start, end):
        if pte_writable(pte):
            table.entries[slot] = make_pte(pte_pfn(pte), False)
            old, table.tids[slot] = table.tids[slot], table.new_tid()
            gather.protect_pte(vpn, old, table.tids[slot])
            changed += 1
    return changed
