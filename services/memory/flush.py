"""The flush engine (mmu_gather's back half): from a gather to a shootdown to the
frames' release — clear -> flush -> free (DESIGN.md §3-§4).

A flush bumps the mm's tlb_gen, sends one shootdown to the mm's CPUs (the
initiator flushes itself: its order comes back in `Zap.local`), waits until every
target acked or was fenced, tells the oracle what ended, and only then hands the
gathered frames to be freed.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Iterable, Iterator

from services.memory.gather import FlushSpec, Gather, capacity
from services.memory.locks import OpContext
from services.memory.mm import Mm
from services.memory.oracle import Revokes
from services.memory.pagetable import PageTable
from services.memory.rules import Rule
from services.memory.state import FlushOrder, KernelState


class Zap:
    """The running state of one operation's flushing: its gather, what to free, the
    initiator's own flushes, the count of shootdowns."""

    def __init__(self, gather: Gather, reason: str, ctx: OpContext | None = None):
        self.gather = gather
        self.ctx = ctx  # the operation's: its virtual clock, in virtual time
        self.reason = reason  # the operation, for the shootdowns' metrics label
        self.to_free: list[int] = []
        self.tables: list[PageTable] = []
        self.local: list[FlushOrder] = []
        self.shootdowns = 0
        self.freed = 0  # pages freed by the batches flushed so far
        # Rule.CLEAR_BEFORE_FLUSH broken: PTEs the hardware walker still sees, until
        # after their flush (keys of KernelState.ghosts).
        self.deferred: list[tuple[int, int]] = []


TRIM_EVERY_NS = 1_000_000_000  # should_trim_cpumask: at most once per HZ per mm


def flush_targets(cpumask: Iterable[int], initiator: int, running: set[int], lazy: set[int],
                  everyone: bool, trim: bool) -> tuple[list[int], int]:
    """native_flush_tlb_multi and should_flush_tlb (x86, ≈ v6.18): when page tables were
    freed or unshared (`everyone`), every CPU in the mask but the initiator — lazy ones
    and those no longer running the mm too, whose page walker could still use the old
    tables; otherwise the CPUs that run the mm, and, when `trim`, the members that no
    longer do (so that they leave the mask). Returns (targets, lazy CPUs left out)."""
    targets, lazy_skipped = [], 0
    for cpu in sorted(cpumask):
        if cpu == initiator:
            continue
        if everyone or cpu in running or (trim and cpu not in lazy):
            targets.append(cpu)
        elif cpu in lazy:
            lazy_skipped += 1
    return targets, lazy_skipped


class Flusher:
    def __init__(self, k: KernelState):
        self.k = k

    def gather(self, mm: Mm, fullmm: bool = False, pages: int = 0) -> Gather:
        """A gather of `mm`'s changes; a zap's holds the policy's batch (per-page mode:
        one page), other users' (`pages`) all their changes."""
        k = self.k
        if not pages:
            pages = 1 if k.policy.per_page_flush else capacity(k.policy.batch)
        return Gather(pages, k.policy.ceiling, lambda: k.oracle.batch([mm.id]), k.clock, fullmm)

    def zap(self, mm: Mm, reason: str, ctx: OpContext | None = None, fullmm: bool = False,
            pages: int = 0) -> Zap:
        return Zap(self.gather(mm, fullmm, pages), reason, ctx)

    @staticmethod
    @contextlib.contextmanager
    def gathering(mm: Mm) -> Iterator[None]:
        """tlb_gather_mmu ... tlb_finish_mmu: the mm's count of gathers in flight
        (mm->tlb_flush_pending), which mm_tlb_flush_nested reads."""
        mm.tlb_flush_pending += 1
        try:
            yield
        finally:
            mm.tlb_flush_pending -= 1

    def release(self, pages: list[int], tables: list[PageTable]) -> int:
        """Drop the gathered references; free what reaches zero. Returns pages freed."""
        k = self.k
        frames, freed = k.frames, 0
        # Only a frame this frees counts as freed without ack: a reference dropped while
        # another holder keeps the frame (reclaim, whose flush is still in flight, after
        # a fault mapped the page again from the swap cache) frees nothing.
        for pfn in pages:
            if frames.put(pfn):
                k.stats.frames_freed_without_ack += k.unflushed[pfn] > 0
                frames.free(pfn)
                k.lru.remove(pfn)
                freed += 1
        for table in tables:
            if frames.put(table.pfn):
                k.stats.frames_freed_without_ack += k.unflushed[table.pfn] > 0
                frames.free(table.pfn)
                k.stats.tables_freed += 1
        k.stats.pages_freed += freed
        k.stats.frames_pending_free -= len(pages) + len(tables)
        return freed

    async def flush(self, mm: Mm, initiator: int, zap: Zap, rule: Rule) -> None:
        """tlb_flush_mmu: invalidate what the gather holds, then hand its pages to free.
        `rule` names the flush (the mutation test skips it: as if it had been sent)."""
        k = self.k
        spec = zap.gather.flush_spec()
        opened = zap.gather.opened
        pages, tables, ends = zap.gather.take()
        if spec is None:
            return
        k.stats.frames_pending_free += len(pages) + len(tables)
        k.stats.flush_pages.append(len(ends.revoked) + len(ends.downgraded))
        covered = [*pages, *(t.pfn for t in tables)]
        k.unflushed.update(covered)
        if k.rules.breaks(Rule.FLUSH_BEFORE_FREE):
            # Deliberately wrong: the frames go back to the allocator while other CPUs
            # may still hold translations to them. The oracle must catch the result.
            self.release(pages, tables)
            k.oracle.flushed(ends, k.clock())
            pages, tables = [], []
        if k.rules.keeps(rule):
            await self.shoot(mm, initiator, spec, zap)
        for key in zap.deferred:  # Rule.CLEAR_BEFORE_FLUSH broken: cleared late
            k.ghosts.pop(key, None)
        zap.deferred.clear()
        k.unflushed -= collections.Counter(covered)  # every target acked or was fenced
        now = k.clock()
        k.stats.flush_waits.append((now - opened) / 1e9, len(pages) + len(tables))
        k.oracle.flushed(ends, now)
        zap.to_free.extend(pages)
        zap.tables.extend(tables)

    async def finish(self, mm: Mm, initiator: int, zap: Zap, rule: Rule) -> None:
        """tlb_finish_mmu: the gather's last flush; if another gather of the mm ran
        meanwhile (mm_tlb_flush_nested), the whole mm, lazy CPUs too, whatever this
        one cleared: the other may have cleared PTEs this one found empty."""
        if mm.tlb_flush_pending > 1 and self.k.rules.keeps(Rule.NESTED_FLUSH):
            zap.gather.whole_mm()
        await self.flush(mm, initiator, zap, rule)

    async def batched_pending(self, mm: Mm, initiator: int, zap: Zap) -> None:
        """flush_tlb_batched_pending (mm/rmap.c): under a PTE table lock, before changing
        PTEs: if reclaim cleared PTEs of this mm and deferred their flush, a PTE this
        call finds already gone may still be cached elsewhere; flush the mm now. Like
        Linux, it is not told when reclaim's own flush completed: the first caller after
        a reclaim pays one extra flush."""
        pending = mm.tlb_batch_pending
        if pending == mm.tlb_batch_flushed or self.k.rules.breaks(Rule.BATCHED_PENDING):
            return
        extra = self.zap(mm, "batched-pending", zap.ctx)
        extra.gather.whole_mm()  # flush_tlb_mm: freed_tables, so lazy CPUs too
        await self.flush(mm, initiator, extra, Rule.BATCHED_PENDING)
        zap.local.extend(extra.local)
        zap.shootdowns += extra.shootdowns
        # A reclaim that cleared more meanwhile keeps its mark (atomic_cmpxchg in Linux).
        if mm.tlb_batch_pending == pending:
            mm.tlb_batch_flushed = pending

    async def shoot(self, mm: Mm, initiator: int, spec: FlushSpec, zap: Zap) -> None:
        k = self.k
        ctx = zap.ctx
        vt = None
        if ctx is not None and ctx.vt is not None:
            ctx.spend(k.policy.cost_model.flush_call_ns)
            vt = ctx.vt
        mm.tlb_gen += 1  # after changing the tables, before sending: x86 tlb_gen
        order = FlushOrder(next(k.shootdown_ids), mm.id, spec.start_vpn, spec.pages,
                           mm.tlb_gen, mm.tlb_gen, spec.freed_tables, initiator,
                           reason=zap.reason, sent_vt=vt, hardware=self.broadcasts(mm))
        if k.runs(initiator, mm):
            zap.local.append(order)
        running = {c for c in mm.cpumask if k.runs(c, mm)}
        lazy = {c for c in mm.cpumask if k.is_lazy(c, mm)}
        now = vt if vt is not None else k.clock()  # virtual time trims on its own clock
        trim = len(running) + len(lazy) < len(mm.cpumask) and now >= mm.trim_at_ns
        if trim:
            mm.trim_at_ns = now + TRIM_EVERY_NS
        targets, skipped = flush_targets(
            mm.cpumask, initiator, running, lazy,
            spec.freed_tables and k.rules.keeps(Rule.FREED_TABLES_LAZY), trim)
        k.stats.lazy_skipped += skipped
        zap.shootdowns += 1
        k.stats.shootdowns += 1
        k.stats.full_flushes += spec.full
        k.stats.range_pages += spec.pages  # 0 for a full flush (the cost model's input)
        if not targets:
            return
        if order.hardware:
            k.stats.broadcasts += 1
            k.stats.broadcast_full += spec.full
            k.stats.broadcast_pages += spec.pages
        else:
            k.stats.ipis += len(targets)
        result = await k.port(order, targets)
        k.stats.fenced.update(result.fenced)
        if ctx is not None and ctx.vt is not None and result.done_vt is not None:
            k.stats.shootdown_vt_ns.append(result.done_vt - ctx.vt)
            ctx.vt = max(ctx.vt, result.done_vt)  # the initiator waits for the last ack
        self.not_loaded(mm, result.not_loaded)

    def broadcasts(self, mm: Mm) -> bool:
        """--broadcast hw: INVLPGB, for an mm with a global ASID — active on 4 or more
        CPUs at once (consider_global_asid, mm_active_cpus_exceeds(mm, 3)); else IPIs.
        In virtual time a broadcast cost model (invlpgb: ARM's TLBI IS, which has no such
        threshold) is that hardware: every shootdown is a broadcast."""
        k, p = self.k, self.k.policy
        if p.cost_model.broadcast and p.virtual:
            return True
        return p.hw_broadcast and sum(1 for c in mm.cpumask if k.runs(c, mm)) >= 4

    def not_loaded(self, mm: Mm, cpus: list[int]) -> None:
        """The targets that did not run `mm` when its flush reached them (their acks say
        so) left it (flush_tlb_func): a lazy one switched to init_mm, one running another
        mm (or idle) left the mask. A target that ran the mm then and went lazy since
        stays lazy, in the mask, with the mm's tables loaded: later flushes that free
        tables must still reach it. One that switched back to the mm meanwhile stays."""
        k = self.k
        for cpu in cpus:
            if k.is_lazy(cpu, mm):
                del k.lazy_mm[cpu]
            elif not k.runs(cpu, mm):
                mm.cpumask.discard(cpu)

    def returned(self, mm: Mm, start: int, end: int, revokes: Revokes) -> None:
        """A call is about to return to its caller: what it removed (or write-protected)
        in [start, end) must be gone from every CPU of the mm from now on (oracle.py)."""
        self.k.oracle.returned(mm.id, start, end, self.k.clock(), revokes)
