"""Reclaim, the one nonlocal operation (DESIGN.md §3): under memory pressure, unmap
the oldest pages from every mm that maps them, through the frame's reverse map,
batch them into one flush, and free them only after it (mm/rmap.c's batched unmap
flushing; mm/vmscan.c's shrink_folio_list)."""
from __future__ import annotations

import collections

from services.common.addresses import PTRS_PER_TABLE
from services.common.policy import Policy
from services.memory.flush import Flusher, flush_targets
from services.memory.locks import OpContext
from services.memory.mm import Mm
from services.memory.oracle import Batch
from services.memory.pagetable import PteTable, pte_pfn, walk
from services.memory.rules import Rule
from services.memory.state import FlushOrder, KernelState, ShootdownResult
from services.memory.tables import Tables


def reclaim_targets(policy: Policy, shared: bool, every_cpu: set[int],
                    walked_masks: list[set[int]], union_masks: list[set[int]]) -> set[int]:
    """Who gets reclaim's batched flush: the union of the affected mms' CPUs — or, when
    a still-shared table changed, as the shared-flush policy says: every CPU that ever
    ran anything (Linus 2002), the sharers' CPUs, or (wrong on purpose) only the CPUs of
    the mm the reverse-map walk went through."""
    if shared and policy.shared_change_flushes_every_cpu:
        return set(every_cpu)
    if shared and policy.shared_change_flushes_changer_only:
        return set().union(*walked_masks)
    return set().union(*union_masks)


class Reclaimer:
    def __init__(self, k: KernelState, tables: Tables, flusher: Flusher):
        self.k, self.tables, self.flusher = k, tables, flusher

    def mappings(self, pfn: int) -> list[tuple[Mm, PteTable]]:
        """Every PTE table mapping `pfn`, through the reverse map: the page's address and
        its fork family (anon_vma's role); a table shared by several mms appears once."""
        k = self.k
        vpn = k.frames.rmap_vpn[pfn]
        out, seen = [], set()
        for mm_id in sorted(k.families.get(k.frames.rmap_family[pfn], ())):
            mm = k.mms[mm_id]
            table = walk(mm.pgd, vpn)
            if table is None or table.uid in seen:
                continue
            pte = table.entries[vpn % PTRS_PER_TABLE]
            if pte > 0 and pte_pfn(pte) == pfn:
                seen.add(table.uid)
                out.append((mm, table))
        return out

    async def alloc_page(self, ctx: OpContext, cpu: int, zero: bool = False) -> int:
        """A data frame (`zero`: zero-filled); below the low watermark, reclaim first
        (direct reclaim)."""
        k = self.k
        cm = k.policy.cost_model
        ctx.spend(cm.page_alloc_ns + (cm.page_zero_ns if zero else 0))
        if k.frames.free_count <= k.low_watermark:
            async with k.reclaiming:
                if k.frames.free_count <= k.low_watermark:
                    await self.reclaim(ctx, cpu)
        return k.frames.alloc()

    async def reclaim(self, ctx: OpContext, initiator: int) -> None:
        """Swap out the oldest pages until free frames reach the high watermark, in
        batches of the policy's reclaim_batch (shrink_folio_list works through at most
        SWAP_CLUSTER_MAX = 32 isolated folios, with one try_to_unmap_flush each)."""
        k = self.k
        want = k.high_watermark - k.frames.free_count
        while want > 0:
            victims = k.lru.oldest(min(want, k.policy.reclaim_batch or want))
            if not victims:
                return
            want -= len(victims)
            await self._shrink(ctx, initiator, victims)

    async def _shrink(self, ctx: OpContext, initiator: int, victims: list[int]) -> None:
        """One batch: unmap each victim from every mm that maps it, flush them all at once
        (reclaim_targets), and free them only after it. Each mm whose PTEs it cleared is
        marked (set_tlb_ubc_flush_pending), so that a PTE change racing with the deferred
        flush flushes first (flush_tlb_batched_pending). A page still mapped afterwards (a
        sharer copied its table meanwhile) goes back on the LRU, as try_to_unmap failing
        puts the folio back."""
        k, tables = self.k, self.tables
        ends = k.oracle.batch(())
        pages = []
        unmapped: dict[int, list[int]] = {}  # mm (with every sharer) -> vpns it lost
        walked: set[int] = set()     # only the mms the rmap walk went through
        shared = False
        for pfn in victims:
            for mm, table in self.mappings(pfn):
                async with tables.sharers_locked(ctx, mm, [table]), \
                        tables.pte_locked(ctx, mm, table):
                    vpn = k.frames.rmap_vpn[pfn]
                    slot = table.slot(vpn)
                    pte = table.entries[slot]
                    if pte <= 0 or pte_pfn(pte) != pfn:
                        continue  # changed while we waited for the lock
                    sharers = [m for m, _ in table.sharers or [(mm.id, 0)]]
                    ctx.spend(k.policy.cost_model.pte_clear_ns)
                    ends.mms.update(sharers)
                    ends.clear(vpn, table.tids[slot])
                    # try_to_unmap_one: every PTE of the page gets the page's one swap
                    # entry; exclusive (pte_swp_mkexclusive) when the page was this PTE's
                    # alone: an anonymous page is mapped writable only when it is
                    # (PageAnonExclusive).
                    table.entries[slot] = -k.swap.unmap(pfn, table.writable(pte))
                    table.tids[slot] = 0
                    k.frames.mapcount[pfn] -= 1
                    pages.append(pfn)
                    walked.add(mm.id)
                    for m in sharers:
                        unmapped.setdefault(m, []).append(vpn)
                    shared |= table.share_count > 0
                    for m in sharers:
                        k.mms[m].tlb_batch_pending += 1
        if pages:
            await self._flush_and_free(ctx, initiator, pages, ends, unmapped, walked, shared)
        self._keep_mapped(victims)

    async def _flush_and_free(self, ctx: OpContext, initiator: int, pages: list[int],
                              ends: Batch, unmapped: dict[int, list[int]], walked: set[int],
                              shared: bool) -> None:
        """try_to_unmap_flush, then free: one flush of every affected mm's entries — but
        under --broadcast hw an mm with a global ASID (Flusher.broadcasts) gets hardware
        broadcasts of its pages instead (x86 ≥ 6.15 arch_tlbbatch_add_pending: INVLPGB
        per page at once, TLBSYNC in arch_tlbbatch_flush), and no IPIs."""
        k = self.k
        k.stats.swap_outs += len(pages)
        k.stats.frames_pending_free += len(pages)
        k.stats.reclaim_shootdowns += 1
        k.unflushed.update(pages)
        if k.rules.breaks(Rule.FLUSH_BEFORE_FREE):
            k.oracle.flushed(ends, k.clock())
        mms = [k.mms[m] for m in sorted(unmapped)]
        hardware = [mm for mm in mms if self.flusher.broadcasts(mm)]
        batched = [mm for mm in mms if mm not in hardware]
        ctx.spend(k.policy.cost_model.flush_call_ns)
        local: list[FlushOrder] = []  # the initiator's own, owed once the flush is done
        for mm in hardware:
            await self._broadcast(ctx, initiator, mm, unmapped[mm.id], local)
        if batched:
            await self._batch_flush(ctx, initiator, batched,
                                    walked & {mm.id for mm in batched}, shared, local)
        k.unflushed -= collections.Counter(pages)
        k.oracle.flushed(ends, k.clock())
        k.pending_local.setdefault(initiator, []).extend(local)
        for pfn in set(pages):
            # __remove_mapping: a page freed by reclaim leaves the swap cache (its slot
            # stays, held by the PTEs); one a fault mapped again meanwhile stays cached.
            if not k.frames.mapcount[pfn]:
                k.swap.uncache(pfn)
        k.stats.reclaimed_pages += self.flusher.release(pages, [])

    async def _batch_flush(self, ctx: OpContext, initiator: int, mms: list[Mm],
                           walked: set[int], shared: bool, local: list[FlushOrder]) -> None:
        """arch_tlbbatch_flush's IPIs: one flush of these mms' entries, each receiver
        flushing the mm it runs."""
        k = self.k
        cpus = reclaim_targets(k.policy, shared, set(k.cpu_mm),
                               [k.mms[m].cpumask for m in walked], [mm.cpumask for mm in mms])
        # arch_tlbbatch_flush -> should_flush_tlb: lazy CPUs are left out; they, and
        # CPUs that hold an mm without running it, catch up at switch_mm by generation
        # (arch_tlbbatch_add_pending bumped each mm's).
        k.stats.lazy_skipped += sum(1 for c in cpus if k.is_lazy(c))
        cpus = {c for c in cpus if not k.is_lazy(c)}
        for mm in mms:
            mm.tlb_gen += 1
        first = mms[0]
        order = FlushOrder(next(k.shootdown_ids), first.id, 0, 0, first.tlb_gen,
                           first.tlb_gen, False, initiator, all_mms=True, reason="reclaim",
                           mm_gens={mm.id: mm.tlb_gen for mm in mms}, sent_vt=ctx.vt)
        if initiator in cpus:
            local.append(order)
        targets = sorted(cpus - {initiator})
        k.stats.shootdowns += 1
        k.stats.full_flushes += 1
        if targets and k.rules.keeps(Rule.RECLAIM_FLUSH):
            k.stats.ipis += len(targets)
            k.stats.reclaim_ipis += len(targets)
            self._waited(ctx, await k.port(order, targets))

    async def _broadcast(self, ctx: OpContext, initiator: int, mm: Mm, vpns: list[int],
                         local: list[FlushOrder]) -> None:
        """The INVLPGBs of one global-ASID mm's unmapped pages, a run of contiguous pages
        to an order (each page its own INVLPGB: broadcast_pages), to the CPUs a flush of
        the mm would reach (flush_targets; the others catch up by generation)."""
        k = self.k
        running = {c for c in mm.cpumask if k.runs(c, mm)}
        lazy = {c for c in mm.cpumask if k.is_lazy(c, mm)}
        targets, skipped = flush_targets(mm.cpumask, initiator, running, lazy, False, False)
        k.stats.lazy_skipped += skipped
        for start, pages in _runs(sorted(set(vpns))):
            mm.tlb_gen += 1
            order = FlushOrder(next(k.shootdown_ids), mm.id, start, pages, mm.tlb_gen,
                               mm.tlb_gen, False, initiator, reason="reclaim",
                               sent_vt=ctx.vt, hardware=True)
            if k.runs(initiator, mm):
                local.append(order)
            k.stats.shootdowns += 1
            k.stats.range_pages += pages
            if targets and k.rules.keeps(Rule.RECLAIM_FLUSH):
                k.stats.broadcasts += 1
                k.stats.broadcast_pages += pages
                self._waited(ctx, await k.port(order, targets))

    def _waited(self, ctx: OpContext, result: ShootdownResult) -> None:
        self.k.stats.fenced.update(result.fenced)
        if ctx.vt is not None and result.done_vt is not None:
            ctx.vt = max(ctx.vt, result.done_vt)

    def _keep_mapped(self, victims: list[int]) -> None:
        """Victims still mapped after reclaim's unmap stay resident: back on the LRU."""
        frames = self.k.frames
        for pfn in victims:
            if frames.mapcount[pfn] and not frames.is_free(pfn):
                self.k.lru.add(pfn)


def _runs(vpns: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct vpns as (start, pages) runs of contiguous pages."""
    runs: list[tuple[int, int]] = []
    for vpn in vpns:
        if runs and runs[-1][0] + runs[-1][1] == vpn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((vpn, 1))
    return runs
