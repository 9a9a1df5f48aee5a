"""Page-table sharing (DESIGN.md §3): fork pointing the child at the parent's PTE
tables, the sharer list (the 2002 "pmd-rmap"), unsharing (copy-on-write of a page
table), dropping a shared table whole — and fork's per-PTE copy, its alternative."""
from __future__ import annotations

from services.common.addresses import PTRS_PER_TABLE, USER_VPN_END
from services.memory.flush import Flusher
from services.memory.gather import Gather
from services.memory.locks import OpContext
from services.memory.mm import Mm, Vma
from services.memory.oracle import Revokes
from services.memory.pagetable import (Directory, PteTable, make_pte, present_ptes, pte_pfn, pte_writable,
                                       swapped_ptes)
from services.memory.rules import Rule
from services.memory.state import FlushOrder, KernelState
from services.memory.tables import Tables


class Sharing:
    def __init__(self, k: KernelState, tables: Tables, flusher: Flusher):
        self.k, self.tables, self.flusher = k, tables, flusher

    # --- fork ---------------------------------------------------------------------------------
    async def share_tables(self, ctx: OpContext, parent: Mm, child: Mm,
                           tables: list[PteTable], gather: Gather) -> None:
        """fork `share`: point the child's pmd entries at the parent's PTE tables and
        write-protect each table as a whole — O(tables), not O(pages). Every sharer list
        is locked once, in key order, for the whole fork."""
        async with self.tables.sharers_locked(ctx, parent, tables):
            for table in tables:
                if not table.wp:
                    async with self.tables.pte_locked(ctx, parent, table):
                        table.wp = True
                        gather.protect_table(table)
                pmd = await self.tables.ensure_pmd(ctx, child, table.base_vpn)  # upper levels
                self._share_into(parent, child, pmd, table)
                ctx.spend(self.k.policy.cost_model.pte_install_ns)  # one pmd entry

    async def copy_table(self, ctx: OpContext, parent: Mm, child: Mm, src: PteTable,
                         vma: Vma, gather: Gather) -> None:
        """fork `copy`: every present PTE of `vma` in `src`, read-only on both sides."""
        k = self.k
        # The child runs nowhere yet: its tables need no lock of the parent's.
        dst = await self.tables.ensure_pte(ctx, child, max(vma.start, src.base_vpn))
        async with self.tables.pte_locked(ctx, parent, src):
            for vpn, slot, pte in present_ptes(src, vma.start, vma.end):
                pfn = pte_pfn(pte)
                if src.writable(pte):
                    src.entries[slot] = make_pte(pfn, False)
                    old, src.tids[slot] = src.tids[slot], src.new_tid()
                    gather.protect_pte(vpn, old, src.tids[slot])
                dst.entries[slot] = make_pte(pfn, False)
                dst.tids[slot] = dst.new_tid()
                dst.present += 1
                k.frames.get(pfn)
                k.frames.mapcount[pfn] += 1
                ctx.spend(k.policy.cost_model.pte_copy_ns)
            for vpn, slot, swap_slot in swapped_ptes(src, vma.start, vma.end):
                dst.entries[slot] = -swap_slot
                dst.present += 1
                k.swap.dup(swap_slot)

    def _share_into(self, parent: Mm, child: Mm, pmd: Directory, table: PteTable) -> None:
        """Point the child's pmd entry at `table`: one more sharer, not one more reference."""
        if table.sharers is None:
            table.sharers = [(parent.id, table.base_vpn)]
            self.k.stats.shared_tables += 1
        pmd.entries[pmd.slot(table.base_vpn)] = table
        pmd.present += 1
        table.share_count += 1
        table.sharers.append((child.id, table.base_vpn))

    # --- leaving a shared table ------------------------------------------------------------
    def _leave(self, mm: Mm, table: PteTable) -> None:
        """This mm no longer maps `table`: one sharer fewer (the table is not freed)."""
        assert table.sharers is not None
        table.sharers.remove((mm.id, table.base_vpn))
        table.share_count -= 1
        if table.share_count == 0:
            table.sharers = None
            self.k.stats.shared_tables -= 1

    async def unshare(self, ctx: OpContext, cpu: int, mm: Mm, table: PteTable,
                      local: list[FlushOrder]) -> None:
        """Copy-on-write of a page table (Phillips 2002): give this mm a private copy,
        raising the count of every page it maps, then let go of the shared one, and
        flush this mm's CPUs before the sharer list is unlocked. The shared table's
        entries are untouched, so other sharers need no flush."""
        k, tables = self.k, self.tables
        fresh = tables.alloc_pte(table.base_vpn)
        ctx.spend(k.policy.cost_model.table_alloc_ns)
        zap = self.flusher.zap(mm, "unshare", ctx)
        async with tables.sharers_locked(ctx, mm, [table]), ctx.locked_once(mm.page_table_lock):
            pmd = tables.pmd_of(mm, table.base_vpn)
            slot = pmd.slot(table.base_vpn)
            if pmd.entries[slot] is not table or not table.share_count:
                tables.discard(fresh)  # unshared, or exclusive, meanwhile: nothing to copy
                return
            async with tables.pte_locked(ctx, mm, table):
                for vpn, i, pte in present_ptes(table, 0, USER_VPN_END):
                    pfn = pte_pfn(pte)
                    fresh.entries[i] = make_pte(pfn, False)  # still shared with the others: COW
                    fresh.tids[i] = fresh.new_tid()
                    k.frames.get(pfn)
                    k.frames.mapcount[pfn] += 1
                    ctx.spend(k.policy.cost_model.pte_copy_ns)
                for vpn, i, swap_slot in swapped_ptes(table, 0, USER_VPN_END):
                    fresh.entries[i] = -swap_slot
                    k.swap.dup(swap_slot)
                fresh.present = table.present
            pmd.entries[slot] = fresh
            self._leave(mm, table)
            k.stats.unshares += 1
            zap.gather.unshare_table(table)
            await self.flusher.flush(mm, cpu, zap, Rule.UNSHARE_FLUSH)
        local.extend(zap.local)

    async def unshare_range(self, ctx: OpContext, cpu: int, mm: Mm, start: int, end: int,
                            local: list[FlushOrder]) -> None:
        for table in self.tables.pte_tables(mm, start, end):
            if table.share_count:
                await self.unshare(ctx, cpu, mm, table, local)

    def drop(self, mm: Mm, table: PteTable, gather: Gather) -> None:
        """munmap or exit covering a shared table whole: unhook it from this mm and
        decrement its count (no PTE is cleared, nothing is freed); the caller holds the
        sharer lock and flushes this mm's CPUs before releasing it."""
        pmd = self.tables.pmd_of(mm, table.base_vpn)
        pmd.entries[pmd.slot(table.base_vpn)] = None
        pmd.present -= 1
        self._leave(mm, table)
        self.k.stats.tables_dropped += 1
        gather.unshare_table(table)

    async def unprotect(self, ctx: OpContext, mm: Mm, table: PteTable) -> None:
        """An exclusive table still write-protected as a whole (it was shared): move the
        protection down to each PTE, then lift the table's. Effective permissions do not
        change, so no flush; the old read-only entries stay valid."""
        async with self.tables.pte_locked(ctx, mm, table):
            if not table.wp or table.share_count:
                return
            now = self.k.clock()
            for vpn, i, pte in present_ptes(table, 0, USER_VPN_END):
                if pte_writable(pte):
                    table.entries[i] = make_pte(pte_pfn(pte), False)
                    old, table.tids[i] = table.tids[i], table.new_tid()
                    self.k.oracle.transition(old, table.tids[i], now, Revokes.NOTHING)
            table.wp = False


def tables_of_vmas(tables: list[PteTable], vmas: list[Vma]) -> list[tuple[PteTable, Vma]]:
    """(table, vma) for every VMA overlapping every table: what fork `copy` walks."""
    return [(t, v) for t in tables for v in vmas
            if v.start < t.base_vpn + PTRS_PER_TABLE and t.base_vpn < v.end]
