"""Page tables of an mm: allocating, finding, unhooking them, the locks that guard
them (DESIGN.md §5), and the hardware walker."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

from services.common.addresses import PTRS_PER_TABLE, USER_VPN_END
from services.common.errors import OutOfRange, ResourceExhausted
from services.memory.gather import Gather
from services.memory.locks import LockClass, OpContext, SimLock
from services.memory.mm import Mm
from services.memory.pagetable import (MAX_TABLE_UID, Directory, PageTable, PteTable, pte_pfn,
                                       walk)
from services.memory.state import KernelState

Pte = tuple[int, bool, int]  # (pfn, writable, tid) of a present PTE


class Tables:
    def __init__(self, k: KernelState):
        self.k = k

    # --- allocation -----------------------------------------------------------------------
    def alloc(self, level: int, base_vpn: int) -> PageTable:
        uid = next(self.k.table_uids)
        if uid > MAX_TABLE_UID:
            raise ResourceExhausted(f"{MAX_TABLE_UID} page tables allocated in this run: "
                                    "translation ids would repeat; start a new run")
        pfn = self.k.frames.alloc()  # tables never wait for reclaim: the watermarks leave room
        self.k.stats.tables_allocated[level] += 1
        if level > 1:
            return Directory(pfn, level, base_vpn, uid)
        return PteTable(pfn, base_vpn, uid, SimLock(LockClass.PTL, f"ptl:{uid}", key=uid),
                        SimLock(LockClass.RMAP, f"rmap:{uid}", key=uid))

    def alloc_pte(self, base_vpn: int) -> PteTable:
        table = self.alloc(1, base_vpn)
        assert isinstance(table, PteTable)
        return table

    def alloc_pgd(self) -> Directory:
        table = self.alloc(4, 0)
        assert isinstance(table, Directory)
        return table

    def discard(self, table: PageTable) -> None:
        """A table that never became visible (lost an install race, or an unneeded copy)."""
        self.k.frames.put(table.pfn)
        self.k.frames.free(table.pfn)
        self.k.stats.tables_allocated[table.level] -= 1

    async def ensure_pte(self, ctx: OpContext, mm: Mm, vpn: int) -> PteTable:
        """The PTE table covering `vpn`, populating the levels above it."""
        table = await self._ensure(ctx, mm, vpn, 1)
        assert isinstance(table, PteTable)
        return table

    async def ensure_pmd(self, ctx: OpContext, mm: Mm, vpn: int) -> Directory:
        """The pmd covering `vpn`, populating the levels above it."""
        table = await self._ensure(ctx, mm, vpn, 2)
        assert isinstance(table, Directory)
        return table

    async def _ensure(self, ctx: OpContext, mm: Mm, vpn: int, level: int) -> PageTable:
        """The table at `level` covering `vpn`, populating the levels above it under
        page_table_lock: allocate outside the lock, re-check, install or back out."""
        table: PageTable = mm.pgd
        while isinstance(table, Directory) and table.level > level:
            slot = table.slot(vpn)
            child = table.entries[slot]
            if child is None:
                span = PTRS_PER_TABLE ** (table.level - 1)
                fresh = self.alloc(table.level - 1, vpn - vpn % span)
                ctx.spend(self.k.policy.cost_model.table_alloc_ns)
                async with ctx.locked_once(mm.page_table_lock):
                    child = table.entries[slot]
                    if child is None:  # nobody populated it while we allocated
                        table.entries[slot] = child = fresh
                        table.present += 1
                if child is not fresh:
                    self.discard(fresh)
            table = child
        return table

    # --- finding ----------------------------------------------------------------------------
    @staticmethod
    def pte_tables(mm: Mm, start: int, end: int) -> list[PteTable]:
        """Existing PTE tables overlapping [start, end), in address order (a tree walk:
        only populated branches are visited)."""
        out: list[PteTable] = []

        def visit(table: Directory) -> None:
            span = PTRS_PER_TABLE ** (table.level - 1)
            first = max(start, table.base_vpn) // span % PTRS_PER_TABLE
            last = (min(end, table.base_vpn + table.span) - 1) // span % PTRS_PER_TABLE
            for child in table.entries[first:last + 1]:
                if isinstance(child, PteTable):
                    out.append(child)
                elif child is not None:
                    visit(child)

        if start < end:
            visit(mm.pgd)
        return out

    @staticmethod
    def pmd_of(mm: Mm, vpn: int) -> Directory:
        """The pmd table covering `vpn` (it exists: callers hold a PTE table under it)."""
        table: PageTable | None = mm.pgd
        while isinstance(table, Directory) and table.level > 2:
            table = table.entries[table.slot(vpn)]
        assert isinstance(table, Directory), f"no pmd covers vpn {vpn:#x}"
        return table

    @staticmethod
    def unlink_free(mm: Mm, start: int, end: int, gather: Gather) -> None:
        """free_pgtables: unhook tables no VMA needs any more; they go through the gather.
        A shared table is never freed here: a sharer drops it instead (sharing.drop)."""
        def prune(table: Directory) -> None:
            span = PTRS_PER_TABLE ** (table.level - 1)
            first = max(start, table.base_vpn) // span
            last = (min(end, table.base_vpn + table.span) - 1) // span
            for i in range(first, last + 1):
                slot = i % PTRS_PER_TABLE
                child = table.entries[slot]
                if child is None or (isinstance(child, PteTable) and child.share_count):
                    continue
                if isinstance(child, Directory):
                    prune(child)
                if child.present == 0 and not mm.overlaps(child.base_vpn,
                                                          child.base_vpn + child.span):
                    table.entries[slot] = None
                    table.present -= 1
                    gather.free_table(child, max(start, child.base_vpn))
        prune(mm.pgd)

    # --- locks --------------------------------------------------------------------------------
    def pte_locks(self, mm: Mm, table: PteTable) -> list[SimLock]:
        """What guards a PTE table's entries: the mode's whole point. In mm mode the
        mm's page_table_lock, plus the table's own lock, because a shared table's other
        sharers do not take this mm's lock."""
        if self.k.policy.pte_lock_only:
            return [table.ptl]
        return [mm.page_table_lock, table.ptl]

    @contextlib.asynccontextmanager
    async def pte_locked(self, ctx: OpContext, mm: Mm, table: PteTable) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for lock in self.pte_locks(mm, table):
                await stack.enter_async_context(ctx.locked_once(lock))
            yield

    @contextlib.asynccontextmanager
    async def sharers_locked(self, ctx: OpContext, mm: Mm,
                             tables: list[PteTable]) -> AsyncIterator[None]:
        """Hold what guards the sharer lists of `tables`: their rmap locks (the 2002
        pmd-rmap), in key order — or, in the lock-all-sharers modes, the
        page_table_lock of every sharer mm: in mm-id order, or (unordered) this mm
        first and then the sharer lists' order, which the validator refuses."""
        policy = self.k.policy
        if not tables:
            locks: list[SimLock] = []
        elif policy.locks_all_sharers:
            ids = [mm.id] + [m for t in tables for m, _ in (t.sharers or ())]
            order = list(dict.fromkeys(ids))
            if policy.sharers_locked_in_id_order:
                order.sort()
            locks = [self.k.mms[m].page_table_lock for m in order if m in self.k.mms]
        else:
            locks = sorted((t.rmap_lock for t in tables), key=lambda lock: lock.key)
        async with contextlib.AsyncExitStack() as stack:
            for lk in locks:
                await stack.enter_async_context(ctx.locked_once(lk))
            yield

    def zap_lock(self, ctx: OpContext, mm: Mm):
        """What a zap holds from its first PTE to its final flush: page_table_lock in
        `mm` mode (2.6.14's unmap_region held it across tlb_finish_mmu); nothing with
        split PTE locks, which are taken per table."""
        if self.k.policy.pte_lock_only:
            return contextlib.nullcontext()
        return ctx.locked_once(mm.page_table_lock)

    # --- the hardware walker --------------------------------------------------------------
    def hw_walk(self, mm: Mm, vpns: list[int]) -> list[Pte | None]:
        """What the page walker reads for several pages at one instant, lockless."""
        out: list[Pte | None] = []
        for vpn in vpns:
            if not 0 <= vpn < USER_VPN_END:
                raise OutOfRange(f"vpn {vpn:#x} is past the 47-bit user address space")
            out.append(self.hw_pte(mm, vpn))
        return out

    def hw_pte(self, mm: Mm, vpn: int) -> Pte | None:
        table = walk(mm.pgd, vpn)
        if table is None:
            return None
        slot = vpn % PTRS_PER_TABLE
        pte = table.entries[slot]
        if pte > 0:
            return pte_pfn(pte), table.writable(pte), table.tids[slot]
        ghost = self.k.ghosts.get((table.uid, slot)) if self.k.ghosts else None
        # Rule.CLEAR_BEFORE_FLUSH broken: the walker still sees a PTE cleared too late.
        return (pte_pfn(ghost[0]), ghost[2], ghost[1]) if ghost else None
