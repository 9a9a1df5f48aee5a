"""Reclaim, the one nonlocal operation (DESIGN.md §3): under memory pressure, unmap
the oldest pages from every mm that maps them, through the frame's reverse map,
batch them into one flush, and free them only after it (mm/rmap.c's batched unmap
flushing; mm/vmscan.c's shrink_folio_list)."""
from __future__ import annotations

import collections

from services.common.addresses import PTRS_PER_TABLE
from services.common.policy import Policy
from services.memory.flush import Flusher
from services.memory.locks import OpContext
from services.memory.mm import Mm
from services.memory.oracle import Batch
from services.memory.pagetable import PteTable, pte_pfn, walk
from services.memory.rules import Rule
from services.memory.state import FlushOrder, KernelState
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
        union: set[int] = set()      # mms whose tables changed, with every sharer
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
                    union.update(sharers)
                    shared |= table.share_count > 0
                    for m in sharers:
                        k.mms[m].tlb_batch_pending += 1
        if pages:
            await self._flush_and_free(ctx, initiator, pages, ends, union, walked, shared)
        self._keep_mapped(victims)

    async def _flush_and_free(self, ctx: OpContext, initiator: int, pages: list[int],
                              ends: Batch, union: set[int], walked: set[int],
                              shared: bool) -> None:
        """try_to_unmap_flush, then free: one flush of every affected mm's entries."""
        k = self.k
        k.stats.swap_outs += len(pages)
        k.stats.frames_pending_free += len(pages)
        k.unflushed.update(pages)
        mms = [k.mms[m] for m in sorted(union)]
        cpus = reclaim_targets(k.policy, shared, set(k.cpu_mm),
                               [k.mms[m].cpumask for m in walked], [mm.cpumask for mm in mms])
        # arch_tlbbatch_flush -> should_flush_tlb: lazy CPUs are left out; they, and
        # CPUs that hold an mm without running it, catch up at switch_mm by generation
        # (arch_tlbbatch_add_pending bumped each mm's).
        k.stats.lazy_skipped += sum(1 for c in cpus if k.is_lazy(c))
        cpus = {c for c in cpus if not k.is_lazy(c)}
        if k.rules.breaks(Rule.FLUSH_BEFORE_FREE):
            k.oracle.flushed(ends, k.clock())
        for mm in mms:
            mm.tlb_gen += 1
        first = mms[0]
        ctx.spend(k.policy.cost_model.flush_call_ns)
        order = FlushOrder(next(k.shootdown_ids), first.id, 0, 0, first.tlb_gen,
                           first.tlb_gen, False, initiator, all_mms=True, reason="reclaim",
                           mm_gens={mm.id: mm.tlb_gen for mm in mms}, sent_vt=ctx.vt)
        local = [order] if initiator in cpus else []
        targets = sorted(cpus - {initiator})
        k.stats.shootdowns += 1
        k.stats.reclaim_shootdowns += 1
        k.stats.full_flushes += 1
        if targets and k.rules.keeps(Rule.RECLAIM_FLUSH):
            k.stats.ipis += len(targets)
            k.stats.reclaim_ipis += len(targets)
            result = await k.port(order, targets)
            k.stats.fenced.update(result.fenced)
            if ctx.vt is not None and result.done_vt is not None:
                ctx.vt = max(ctx.vt, result.done_vt)
        k.unflushed -= collections.Counter(pages)
        k.oracle.flushed(ends, k.clock())
        k.pending_local.setdefault(initiator, []).extend(local)
        for pfn in set(pages):
            # __remove_mapping: a page freed by reclaim leaves the swap cache (its slot
            # stays, held by the PTEs); one a fault mapped again meanwhile stays cached.
            if not k.frames.mapcount[pfn]:
                k.swap.uncache(pfn)
        k.stats.reclaimed_pages += self.flusher.release(pages, [])

    def _keep_mapped(self, victims: list[int]) -> None:
        """Victims still mapped after reclaim's unmap stay resident: back on the LRU."""
        frames = self.k.frames
        for pfn in victims:
            if frames.mapcount[pfn] and not frames.is_free(pfn):
                self.k.lru.add(pfn)
