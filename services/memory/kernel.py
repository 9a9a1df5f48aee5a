"""The memory service's domain: what a kernel's mm code does (DESIGN.md §3-§5).

Operations are coroutines because they wait on locks and on shootdowns; all
else is plain Python. The shootdown itself goes out through an injected port
(the coordinator in the service, an in-process delivery in unit tests).

Orders that make it correct (each a `Rule`, services/memory/rules.py):
  - fault: allocate outside the lock, lock, re-check, install or back out; a
    fault that finds the PTE gone (reclaimed meanwhile) fills nothing: the CPU
    accesses again;
  - copy-on-write (wp_page_copy): clear the old PTE and flush it, and only then
    install the copy, so no two CPUs are served two frames for one page;
  - zap (munmap, madvise, exit): under the table lock clear PTEs into a gather
    (first flushing any reclaim flush of the mm still pending:
    flush_tlb_batched_pending); a full batch flushes under the lock; the final
    flush (tlb_finish_mmu) comes after every PTE table lock is dropped with split
    locks (Linux >= 2.6.15), under page_table_lock held across the whole zap in
    `mm` mode (2.6.14); a gather that ran beside another of the same mm flushes
    the whole mm (mm_tlb_flush_nested); frames are freed only after the flush
    (clear -> flush -> free);
  - fork ends with a flush of the parent's whole mm (dup_mmap: flush_tlb_mm);
  - targets: mm_cpumask minus the initiator, which flushes itself; lazy CPUs
    only when page tables were freed or unshared.
A call that removed or downgraded translations tells the oracle when it
returned: from then on no CPU of the mm may use them (oracle.py).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import time
from typing import AsyncIterator, Awaitable, Callable, Iterator, Sequence

from services.common.addresses import PTRS_PER_TABLE, USER_VPN_END, page_range
from services.common.errors import (FailedPrecondition, InvalidArgument, NotFound, OutOfRange,
                                    ResourceExhausted)
from services.common.policy import SPLIT_LOCKS, Policy
from services.common.stats import COUNT_BUCKETS, Samples
from services.memory.frames import Frames
from services.memory.gather import FlushSpec, Gather, capacity
from services.memory.locks import LockClass, LockStats, LockValidator, OpContext, SimLock
from services.memory.reclaim import Lru, SwapSpace, watermarks
from services.memory.mm import Mm, Vma
from services.memory.oracle import Oracle, Revokes
from services.memory.pagetable import (MAX_TABLE_UID, PageTable, make_pte, present_ptes, pte_pfn,
                                       pte_writable, swapped_ptes, tid_table, walk)
from services.memory.rules import Rule, Rules

# One populating mmap faults in at most this many pages (~6 s, ~300 MiB): bounded work
# per request, like every other call (munmap and friends walk only populated tables).
MAX_POPULATE_PAGES = 1 << 20
DEFAULT_FRAMES = 1 << 24  # 64 GiB of simulated memory; arrays grow only as frames are used
UNSAFE_IPI_DELAY_S = 0.005  # free-before-flush: how long the freed frames stay in use


@dataclasses.dataclass(frozen=True)
class FlushOrder:
    """One shootdown: what every target must invalidate (a FlushRequest)."""
    shootdown_id: int
    mm: int
    start_vpn: int
    pages: int          # 0 = full
    new_tlb_gen: int
    mm_tlb_gen: int
    freed_tables: bool
    initiator: int
    all_mms: bool = False  # every mm's entries: a changed shared table, or a reclaim batch
    reason: str = "other"  # the operation that shot down (munmap, cow, reclaim, ...)


@dataclasses.dataclass
class ShootdownResult:
    acked: list[int]
    fenced: list[int]


ShootdownPort = Callable[[FlushOrder, list[int]], Awaitable[ShootdownResult]]


@dataclasses.dataclass
class MissResult:
    outcome: str        # walked | anon | cow | swapin | prot | segv | retry (nothing to fill)
    pfn: int = 0
    writable: bool = False
    tid: int = 0
    local_flushes: list[FlushOrder] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SyscallResult:
    address: int = 0
    child_mm: int = 0
    shootdowns: int = 0
    pages_freed: int = 0
    latency_s: float = 0.0
    local_flushes: list[FlushOrder] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KernelStats:
    faults: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    shootdowns: int = 0
    full_flushes: int = 0
    ipis: int = 0
    lazy_skipped: int = 0
    pages_freed: int = 0
    tables_freed: int = 0
    tables_allocated: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)  # by level
    fenced: set[int] = dataclasses.field(default_factory=set)
    unshares: int = 0             # private copies of shared tables (write, mprotect, partial unmap)
    tables_dropped: int = 0       # shared tables a sharer let go of whole (munmap, exit)
    shared_tables: int = 0        # tables with share_count > 0 now
    reclaimed_pages: int = 0
    swap_outs: int = 0            # PTEs turned into swap entries
    swap_ins: int = 0
    reclaim_shootdowns: int = 0
    reclaim_ipis: int = 0
    fault_latency_s: Samples = dataclasses.field(default_factory=Samples)
    munmap_latency_s: Samples = dataclasses.field(default_factory=Samples)
    fork_latency_s: Samples = dataclasses.field(default_factory=Samples)
    audit_violations: int = 0
    # Metrics, read at scrape time: frames off the page tables not yet freed (their
    # shootdown in flight, or the table lock not yet dropped); per flush, how long its
    # frames waited since the gather opened, with how many frames; PTEs each flush covers.
    frames_pending_free: int = 0
    # Frames freed while the shootdown covering them had not completed (a target neither
    # acked nor was fenced): the unsafe order's signature; 0 for every safe policy.
    frames_freed_without_ack: int = 0
    flush_waits: Samples = dataclasses.field(default_factory=Samples)  # weighted by frames
    flush_pages: Samples = dataclasses.field(default_factory=lambda: Samples(COUNT_BUCKETS))
    range_pages: int = 0          # pages named by ranged shootdowns (broadcast invalidations)


class _Zap:
    """The running state of one zap: its gather, what to free, the initiator's flushes."""

    def __init__(self, gather: Gather, reason: str):
        self.gather = gather
        self.reason = reason  # the operation, for the shootdowns' metrics label
        self.to_free: list[int] = []
        self.tables: list[PageTable] = []
        self.local: list[FlushOrder] = []
        self.shootdowns = 0
        self.freed = 0  # pages freed by the batches flushed so far
        # Rule.CLEAR_BEFORE_FLUSH broken: PTEs the hardware walker still sees, until
        # after their flush (keys of Kernel._ghosts).
        self.deferred: list[tuple[int, int]] = []


class Kernel:
    def __init__(self, policy: Policy, shootdown: ShootdownPort, frames: int = DEFAULT_FRAMES,
                 clock: Callable[[], int] = time.monotonic_ns,
                 broken: frozenset[Rule] = frozenset()):
        self.policy = policy
        self.shootdown = shootdown
        self.clock = clock
        if policy.unsafe == "free-before-flush":
            broken |= {Rule.FLUSH_BEFORE_FREE}
        self.rules = Rules(broken)  # all kept, but for the mutation test and --unsafe
        frames = policy.frames or frames  # the run's budget, else the service's default
        self.frames = Frames(frames)
        self.mms: dict[int, Mm] = {}
        self.oracle = Oracle()
        self.lock_stats = LockStats()
        self.validator = LockValidator()
        self.stats = KernelStats()
        self.cpu_mm: dict[int, int] = {}       # cpu -> loaded mm (0 = idle)
        self.families: dict[int, set[int]] = {}  # fork families: where a page's rmap looks
        self.lru = Lru()
        self.swap = SwapSpace()
        self.low_watermark, self.high_watermark = watermarks(frames)
        self._reclaiming = asyncio.Lock()  # one reclaimer at a time; not a page-table lock
        self._pending_local: dict[int, list[FlushOrder]] = {}
        # Frames whose covering shootdown has not completed, by pfn (a count: one frame
        # may be in two flushes at once, e.g. a page table and a reclaim batch).
        self._unflushed: collections.Counter = collections.Counter()
        # Rule.CLEAR_BEFORE_FLUSH broken: (table uid, slot) -> (pte, tid, writable) of
        # PTEs cleared whose clearing the hardware walker does not see before the flush.
        self._ghosts: dict[tuple[int, int], tuple[int, int, bool]] = {}
        self._mm_ids = itertools.count(1)
        self._table_uids = itertools.count(1)
        self._shootdown_ids = itertools.count(1)

    # --- helpers -----------------------------------------------------------------------
    def ctx(self) -> OpContext:
        return OpContext(self.validator, self.lock_stats)

    def mm(self, mm_id: int) -> Mm:
        mm = self.mms.get(mm_id)
        if mm is None:
            raise NotFound(f"no mm {mm_id}")
        if mm.exited:
            raise FailedPrecondition(f"mm {mm_id} has exited")
        return mm

    def running(self, cpu: int, mm_id: int) -> Mm:
        """The mm the calling CPU must be running to touch it."""
        mm = self.mm(mm_id)
        if self.cpu_mm.get(cpu) != mm_id:
            raise FailedPrecondition(f"cpu {cpu} is not running mm {mm_id}: switch_mm first")
        return mm

    def alive(self, mm: Mm) -> Mm:
        """After waiting for mmap_lock: the mm may have exited meanwhile (another CPU's
        exit got the lock first; exit_mmap runs once)."""
        if mm.exited:
            raise FailedPrecondition(f"mm {mm.id} has exited")
        return mm

    def _alloc_table(self, level: int, base_vpn: int) -> PageTable:
        uid = next(self._table_uids)
        if uid > MAX_TABLE_UID:
            raise ResourceExhausted(f"{MAX_TABLE_UID} page tables allocated in this run: "
                                    "translation ids would repeat; start a new run")
        pfn = self.frames.alloc()  # tables never wait for reclaim: the watermarks leave room
        table = PageTable(pfn, level, base_vpn, uid=uid)
        if level == 1:
            table.ptl = SimLock(LockClass.PTL, f"ptl:{uid}", key=uid)
            table.rmap_lock = SimLock(LockClass.RMAP, f"rmap:{uid}", key=uid)
        self.stats.tables_allocated[level] += 1
        return table

    def _pte_locks(self, mm: Mm, table: PageTable) -> list[SimLock]:
        """What guards a PTE table's entries: the mode's whole point. In mm mode the
        mm's page_table_lock, plus the table's own lock, because a shared table's other
        sharers do not take this mm's lock."""
        if self.policy.lock in SPLIT_LOCKS:
            return [table.ptl]
        return [mm.page_table_lock, table.ptl]

    @contextlib.asynccontextmanager
    async def _pte_locked(self, ctx: OpContext, mm: Mm, table: PageTable) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for lock in self._pte_locks(mm, table):
                await stack.enter_async_context(ctx.locked_once(lock))
            yield

    @contextlib.asynccontextmanager
    async def _sharers_locked(self, ctx: OpContext, mm: Mm,
                              tables: list[PageTable]) -> AsyncIterator[None]:
        """Hold what guards the sharer lists of `tables`: their rmap locks (the 2002
        pmd-rmap), in key order — or, in the lock-all-sharers modes, the
        page_table_lock of every sharer mm: in mm-id order, or (unordered) this mm
        first and then the sharer lists' order, which the validator refuses."""
        if self.policy.lock.startswith("lock-all-sharers"):
            ids = [mm.id] + [m for t in tables for m, _ in (t.sharers or ())]
            order = list(dict.fromkeys(ids))
            if self.policy.lock == "lock-all-sharers":
                order.sort()
            locks = [self.mms[m].page_table_lock for m in order if m in self.mms]
        else:
            locks = sorted((t.rmap_lock for t in tables), key=lambda lock: lock.key)
        if not tables:
            locks = []
        async with contextlib.AsyncExitStack() as stack:
            for lock in locks:
                await stack.enter_async_context(ctx.locked_once(lock))
            yield

    def _gather(self, mm: Mm, fullmm: bool = False, pages: int = 0) -> Gather:
        """A gather of `mm`'s changes; a zap's holds the policy's batch (per-page mode:
        one page), other users' (`pages`) all their changes."""
        if not pages:
            pages = 1 if self.policy.flush == "per-page" else capacity(self.policy.batch)
        return Gather(pages, self.policy.ceiling, lambda: self.oracle.batch([mm.id]),
                      self.clock, fullmm)

    @contextlib.contextmanager
    def _gathering(self, mm: Mm) -> Iterator[None]:
        """tlb_gather_mmu ... tlb_finish_mmu: the mm's count of gathers in flight
        (mm->tlb_flush_pending), which mm_tlb_flush_nested reads."""
        mm.tlb_flush_pending += 1
        try:
            yield
        finally:
            mm.tlb_flush_pending -= 1

    def _zap_lock(self, ctx: OpContext, mm: Mm):
        """What a zap holds from its first PTE to its final flush: page_table_lock in
        `mm` mode (2.6.14's unmap_region held it across tlb_finish_mmu); nothing with
        split PTE locks, which are taken per table."""
        if self.policy.lock in SPLIT_LOCKS:
            return contextlib.nullcontext()
        return ctx.locked_once(mm.page_table_lock)

    # --- processes and CPUs ----------------------------------------------------------------
    def create_mm(self, family: int | None = None) -> int:
        """A new mm; a forked child joins its parent's family (the pages' reverse map)."""
        mm_id = next(self._mm_ids)
        mm = self.mms[mm_id] = Mm(mm_id, self._alloc_table(4, 0))
        mm.family = mm_id if family is None else family
        self.families.setdefault(mm.family, set()).add(mm_id)
        return mm_id

    def switch_mm(self, cpu: int, mm_id: int) -> int:
        """Set the CPU's bit in the new mm's mask *before* reading its tlb_gen."""
        new = self.mm(mm_id) if mm_id else None
        prev_id = self.cpu_mm.get(cpu, 0)
        if prev_id and prev_id != mm_id:
            prev = self.mms.get(prev_id)
            # Going idle with lazy TLB keeps the old mm loaded: its bit stays and the
            # CPU is skipped by flushes that free no tables; it catches up at switch.
            if prev is not None and (new is not None or not self.policy.lazy_tlb):
                prev.cpumask.discard(cpu)
        if new is None:
            self.cpu_mm[cpu] = 0
            return 0
        new.cpumask.add(cpu)
        self.cpu_mm[cpu] = mm_id
        return new.tlb_gen

    def _is_lazy(self, cpu: int, mm: Mm) -> bool:
        return self.cpu_mm.get(cpu, 0) != mm.id

    # --- the flush -----------------------------------------------------------------------
    def _release(self, pages: list[int], tables: list[PageTable]) -> int:
        """Drop the gathered references; free what reaches zero. Returns pages freed."""
        freed = 0
        self.stats.frames_freed_without_ack += sum(
            1 for pfn in itertools.chain(pages, (t.pfn for t in tables)) if self._unflushed[pfn])
        for pfn in pages:
            if self.frames.put(pfn):
                self.frames.free(pfn)
                self.lru.remove(pfn)
                freed += 1
        for table in tables:
            if self.frames.put(table.pfn):
                self.frames.free(table.pfn)
                self.stats.tables_freed += 1
        self.stats.pages_freed += freed
        self.stats.frames_pending_free -= len(pages) + len(tables)
        return freed

    async def _flush(self, mm: Mm, initiator: int, zap: _Zap, rule: Rule) -> None:
        """tlb_flush_mmu: invalidate what the gather holds, then hand its pages to free.
        `rule` names the flush (the mutation test skips it: as if it had been sent)."""
        spec = zap.gather.flush_spec()
        opened = zap.gather.opened
        pages, tables, ends = zap.gather.take()
        if spec is None:
            return
        self.stats.frames_pending_free += len(pages) + len(tables)
        self.stats.flush_pages.append(len(ends.revoked) + len(ends.downgraded))
        covered = [*pages, *(t.pfn for t in tables)]
        self._unflushed.update(covered)
        if self.rules.breaks(Rule.FLUSH_BEFORE_FREE):
            # Deliberately wrong: the frames go back to the allocator while other CPUs
            # may still hold translations to them. The oracle must catch the result.
            self._release(pages, tables)
            self.oracle.flushed(ends, self.clock())
            pages, tables = [], []
            # As if the IPI were slow: the other CPUs run on for a while with
            # translations to frames that are already free, as the bug lets them.
            await asyncio.sleep(UNSAFE_IPI_DELAY_S)
        if self.rules.keeps(rule):
            await self._shoot(mm, initiator, spec, zap)
        for key in zap.deferred:  # Rule.CLEAR_BEFORE_FLUSH broken: cleared late
            self._ghosts.pop(key, None)
        zap.deferred.clear()
        self._unflushed -= collections.Counter(covered)  # every target acked or was fenced
        now = self.clock()
        self.stats.flush_waits.append((now - opened) / 1e9, len(pages) + len(tables))
        self.oracle.flushed(ends, now)
        zap.to_free.extend(pages)
        zap.tables.extend(tables)

    async def _finish(self, mm: Mm, initiator: int, zap: _Zap, rule: Rule) -> None:
        """tlb_finish_mmu: the gather's last flush; if another gather of the mm ran
        meanwhile (mm_tlb_flush_nested), the whole mm, lazy CPUs too, whatever this
        one cleared: the other may have cleared PTEs this one found empty."""
        if mm.tlb_flush_pending > 1 and self.rules.keeps(Rule.NESTED_FLUSH):
            zap.gather.whole_mm()
        await self._flush(mm, initiator, zap, rule)

    async def _flush_batched_pending(self, mm: Mm, initiator: int, zap: _Zap) -> None:
        """flush_tlb_batched_pending (mm/rmap.c): under a PTE table lock, before changing
        PTEs: if reclaim cleared PTEs of this mm and deferred their flush, a PTE this
        call finds already gone may still be cached elsewhere; flush the mm now. Like
        Linux, it is not told when reclaim's own flush completed: the first caller after
        a reclaim pays one extra flush."""
        pending = mm.tlb_batch_pending
        if pending == mm.tlb_batch_flushed or self.rules.breaks(Rule.BATCHED_PENDING):
            return
        extra = _Zap(self._gather(mm), "batched-pending")
        extra.gather.whole_mm()  # flush_tlb_mm: freed_tables, so lazy CPUs too
        await self._flush(mm, initiator, extra, Rule.BATCHED_PENDING)
        zap.local.extend(extra.local)
        zap.shootdowns += extra.shootdowns
        # A reclaim that cleared more meanwhile keeps its mark (atomic_cmpxchg in Linux).
        if mm.tlb_batch_pending == pending:
            mm.tlb_batch_flushed = pending

    async def _shoot(self, mm: Mm, initiator: int, spec: FlushSpec, zap: _Zap) -> None:
        mm.tlb_gen += 1  # after changing the tables, before sending: x86 tlb_gen
        order = FlushOrder(next(self._shootdown_ids), mm.id, spec.start_vpn, spec.pages,
                           mm.tlb_gen, mm.tlb_gen, spec.freed_tables, initiator,
                           reason=zap.reason)
        if initiator in mm.cpumask and not self._is_lazy(initiator, mm):
            zap.local.append(order)
        lazy_too = spec.freed_tables and self.rules.keeps(Rule.FREED_TABLES_LAZY)
        targets = []
        for cpu in sorted(mm.cpumask):
            if cpu == initiator:
                continue
            if self._is_lazy(cpu, mm) and not lazy_too:
                self.stats.lazy_skipped += 1
                continue
            targets.append(cpu)
        zap.shootdowns += 1
        self.stats.shootdowns += 1
        self.stats.full_flushes += spec.full
        self.stats.range_pages += spec.pages  # 0 for a full flush (the cost model's input)
        if not targets:
            return
        self.stats.ipis += len(targets)
        result = await self.shootdown(order, targets)
        self.stats.fenced.update(result.fenced)

    # --- page tables -----------------------------------------------------------------------
    async def _ensure_table(self, ctx: OpContext, mm: Mm, vpn: int, level: int) -> PageTable:
        """The table at `level` covering `vpn`, populating the levels above it under
        page_table_lock: allocate outside the lock, re-check, install or back out."""
        table = mm.pgd
        while table.level > level:
            slot = table.slot(vpn)
            child = table.entries[slot]
            if child is None:
                span = PTRS_PER_TABLE ** (table.level - 1)
                fresh = self._alloc_table(table.level - 1, vpn - vpn % span)
                async with ctx.locked_once(mm.page_table_lock):
                    child = table.entries[slot]
                    if child is None:  # nobody populated it while we allocated
                        table.entries[slot] = child = fresh
                        table.present += 1
                        fresh = None
                if fresh is not None:
                    self._discard_table(fresh)
            table = child
        return table

    def _discard_table(self, table: PageTable) -> None:
        """A table that never became visible (lost an install race, or an unneeded copy)."""
        self.frames.put(table.pfn)
        self.frames.free(table.pfn)
        self.stats.tables_allocated[table.level] -= 1

    def _pte_tables(self, mm: Mm, start: int, end: int) -> list[PageTable]:
        """Existing PTE tables overlapping [start, end), in address order (a tree walk:
        only populated branches are visited)."""
        out: list[PageTable] = []

        def visit(table: PageTable) -> None:
            span = PTRS_PER_TABLE ** (table.level - 1)
            first = max(start, table.base_vpn) // span % PTRS_PER_TABLE
            last = (min(end, table.base_vpn + table.span) - 1) // span % PTRS_PER_TABLE
            for child in table.entries[first:last + 1]:
                if child is None:
                    continue
                if child.level == 1:
                    out.append(child)
                else:
                    visit(child)

        if start < end:
            visit(mm.pgd)
        return out

    def _pmd_of(self, mm: Mm, vpn: int) -> PageTable | None:
        table = mm.pgd
        while table is not None and table.level > 2:
            table = table.entries[table.slot(vpn)]
        return table

    def _unlink_free_tables(self, mm: Mm, start: int, end: int, gather: Gather) -> None:
        """free_pgtables: unhook tables no VMA needs any more; they go through the gather.
        A shared table is never freed here: a sharer drops it instead (`_drop_shared`)."""
        def prune(table: PageTable) -> None:
            span = PTRS_PER_TABLE ** (table.level - 1)
            first = max(start, table.base_vpn) // span
            last = (min(end, table.base_vpn + table.span) - 1) // span
            for i in range(first, last + 1):
                slot = i % PTRS_PER_TABLE
                child = table.entries[slot]
                if child is None or child.share_count:
                    continue
                if child.level > 1:
                    prune(child)
                if child.present == 0 and not mm.overlaps(child.base_vpn,
                                                          child.base_vpn + child.span):
                    table.entries[slot] = None
                    table.present -= 1
                    gather.free_table(child, max(start, child.base_vpn))
        prune(mm.pgd)

    # --- page-table sharing ---------------------------------------------------------------
    def _share_into(self, parent: Mm, child: Mm, pmd: PageTable, table: PageTable) -> None:
        """Point the child's pmd entry at `table`: one more sharer, not one more reference."""
        if table.sharers is None:
            table.sharers = [(parent.id, table.base_vpn)]
            self.stats.shared_tables += 1
        pmd.entries[pmd.slot(table.base_vpn)] = table
        pmd.present += 1
        table.share_count += 1
        table.sharers.append((child.id, table.base_vpn))

    def _leave_shared(self, mm: Mm, table: PageTable) -> None:
        """This mm no longer maps `table`: one sharer fewer (the table is not freed)."""
        table.sharers.remove((mm.id, table.base_vpn))
        table.share_count -= 1
        if table.share_count == 0:
            table.sharers = None
            self.stats.shared_tables -= 1

    async def _unshare(self, ctx: OpContext, cpu: int, mm: Mm, table: PageTable,
                       local: list[FlushOrder]) -> None:
        """Copy-on-write of a page table (Phillips 2002): give this mm a private copy,
        raising the count of every page it maps, then let go of the shared one, and
        flush this mm's CPUs before the sharer list is unlocked. The shared table's
        entries are untouched, so other sharers need no flush."""
        fresh = self._alloc_table(1, table.base_vpn)
        zap = _Zap(self._gather(mm), "unshare")
        async with self._sharers_locked(ctx, mm, [table]), \
                ctx.locked_once(mm.page_table_lock):
            pmd = self._pmd_of(mm, table.base_vpn)
            slot = pmd.slot(table.base_vpn)
            if pmd.entries[slot] is not table or not table.share_count:
                self._discard_table(fresh)  # unshared, or exclusive, meanwhile: nothing to copy
                return
            async with self._pte_locked(ctx, mm, table):
                for vpn, i, pte in present_ptes(table, 0, USER_VPN_END):
                    pfn = pte_pfn(pte)
                    fresh.entries[i] = make_pte(pfn, False)  # still shared with the others: COW
                    fresh.tids[i] = fresh.new_tid()
                    self.frames.get(pfn)
                    self.frames.mapcount[pfn] += 1
                for vpn, i, swap_slot in swapped_ptes(table, 0, USER_VPN_END):
                    fresh.entries[i] = -swap_slot
                    self.swap.dup(swap_slot)
                fresh.present = table.present
            pmd.entries[slot] = fresh
            self._leave_shared(mm, table)
            self.stats.unshares += 1
            zap.gather.unshare_table(table)
            await self._flush(mm, cpu, zap, Rule.UNSHARE_FLUSH)
        local.extend(zap.local)

    async def _unshare_range(self, ctx: OpContext, cpu: int, mm: Mm, start: int, end: int,
                             local: list[FlushOrder]) -> None:
        for table in self._pte_tables(mm, start, end):
            if table.share_count:
                await self._unshare(ctx, cpu, mm, table, local)

    def _drop_shared(self, mm: Mm, table: PageTable, gather: Gather) -> None:
        """munmap or exit covering a shared table whole: unhook it from this mm and
        decrement its count (no PTE is cleared, nothing is freed); the caller holds the
        sharer lock and flushes this mm's CPUs before releasing it."""
        pmd = self._pmd_of(mm, table.base_vpn)
        pmd.entries[pmd.slot(table.base_vpn)] = None
        pmd.present -= 1
        self._leave_shared(mm, table)
        self.stats.tables_dropped += 1
        gather.unshare_table(table)

    async def _unprotect(self, ctx: OpContext, mm: Mm, table: PageTable) -> None:
        """An exclusive table still write-protected as a whole (it was shared): move the
        protection down to each PTE, then lift the table's. Effective permissions do not
        change, so no flush; the old read-only entries stay valid."""
        async with self._pte_locked(ctx, mm, table):
            if not table.wp or table.share_count:
                return
            now = self.clock()
            for vpn, i, pte in present_ptes(table, 0, USER_VPN_END):
                if pte_writable(pte):
                    table.entries[i] = make_pte(pte_pfn(pte), False)
                    old, table.tids[i] = table.tids[i], table.new_tid()
                    self.oracle.transition(old, table.tids[i], now, Revokes.NOTHING)
            table.wp = False

    # --- walks and faults -------------------------------------------------------------------
    def walk(self, cpu: int, mm_id: int, vpns: list[int]) -> list[tuple[int, bool, int] | None]:
        """The hardware walker for several pages at one instant: (pfn, writable, tid) or None."""
        mm = self.running(cpu, mm_id)
        out: list[tuple[int, bool, int] | None] = []
        for vpn in vpns:
            if not 0 <= vpn < USER_VPN_END:
                raise OutOfRange(f"vpn {vpn:#x} is past the 47-bit user address space")
            table = walk(mm.pgd, vpn)
            pte = table.entries[vpn % PTRS_PER_TABLE] if table is not None else 0
            if pte > 0:
                out.append((pte_pfn(pte), table.writable(pte), table.tids[vpn % PTRS_PER_TABLE]))
            else:
                out.append(self._ghost(table, vpn))
        return out

    def _ghost(self, table: PageTable | None, vpn: int) -> tuple[int, bool, int] | None:
        """What the hardware walker sees of a cleared PTE: nothing, unless
        Rule.CLEAR_BEFORE_FLUSH is broken and its flush has not completed."""
        if not self._ghosts or table is None:
            return None
        ghost = self._ghosts.get((table.uid, vpn % PTRS_PER_TABLE))
        return (pte_pfn(ghost[0]), ghost[2], ghost[1]) if ghost else None

    async def handle_miss(self, cpu: int, mm_id: int, vpn: int, write: bool) -> MissResult:
        if not 0 <= vpn < USER_VPN_END:
            raise OutOfRange(f"vpn {vpn:#x} is past the 47-bit user address space")
        mm = self.running(cpu, mm_id)
        table = walk(mm.pgd, vpn)
        if table is not None:  # the hardware walker: no lock
            slot = table.slot(vpn)
            pte = table.entries[slot]
            if pte > 0 and (not write or table.writable(pte)):
                return MissResult("walked", pte_pfn(pte), table.writable(pte), table.tids[slot])
            ghost = self._ghost(table, vpn)
            if ghost and (not write or ghost[1]):
                return MissResult("walked", *ghost)
        t0 = self.clock()
        result = await self._fault(cpu, mm, vpn, write)
        self.stats.faults[result.outcome] += 1
        self.stats.fault_latency_s.append((self.clock() - t0) / 1e9)
        return result

    async def _alloc_page(self, ctx: OpContext, cpu: int) -> int:
        """A data frame; below the low watermark, reclaim first (direct reclaim)."""
        if self.frames.free_count <= self.low_watermark:
            async with self._reclaiming:
                if self.frames.free_count <= self.low_watermark:
                    await self._reclaim(ctx, cpu)
        return self.frames.alloc()

    async def _fault(self, cpu: int, mm: Mm, vpn: int, write: bool) -> MissResult:
        ctx = self.ctx()
        local: list[FlushOrder] = []
        async with mm.mmap_lock.read(ctx):
            self.alive(mm)
            vma = mm.find_vma(vpn)
            if vma is None:
                return MissResult("segv")
            if write and not vma.writable:
                return MissResult("prot")
            table = await self._ensure_table(ctx, mm, vpn, 1)
            if write and table.share_count:
                # Writing through a shared table: copy the table first. Read faults keep
                # sharing ("continue to share page tables over read-only page faults").
                await self._unshare(ctx, cpu, mm, table, local)
                table = walk(mm.pgd, vpn)
            if write and table.wp and not table.share_count:
                await self._unprotect(ctx, mm, table)
            slot = table.slot(vpn)
            result = None
            if table.entries[slot] <= 0:
                result = await self._populate(ctx, cpu, mm, vma, vpn, table)
            if result is None:
                pte = table.entries[slot]
                if pte > 0 and write and not table.writable(pte):
                    result = await self._cow(ctx, cpu, mm, vpn, table)
                elif pte > 0:
                    result = MissResult("walked", pte_pfn(pte), table.writable(pte),
                                        table.tids[slot])
                else:  # reclaimed again while we waited: the CPU accesses again
                    result = MissResult("retry")
        result.local_flushes = local + result.local_flushes + self.take_local_flushes(cpu)
        return result

    async def _populate(self, ctx: OpContext, cpu: int, mm: Mm, vma: Vma, vpn: int,
                        table: PageTable) -> MissResult | None:
        """A none or swapped PTE: zero-fill, or swap in. Installing needs no flush (not
        present -> present), also in a shared table, where every sharer sees the page.
        Returns None when another CPU got there first."""
        slot = table.slot(vpn)
        before = table.entries[slot]
        fresh = await self._alloc_page(ctx, cpu)  # allocate outside the lock
        async with self._pte_locked(ctx, mm, table):
            pmd = self._pmd_of(mm, vpn)  # still this mm's table (not unshared meanwhile)?
            if table.entries[slot] == before and pmd.entries[pmd.slot(vpn)] is table:
                if before < 0:
                    self.swap.drop(-before)
                    table.present -= 1
                    self.stats.swap_ins += 1
                return self._install(mm, table, vpn, fresh, vma.writable,
                                     "anon" if before == 0 else "swapin")
        self.frames.put(fresh)  # lost the race: back out
        self.frames.free(fresh)
        return None

    def _install(self, mm: Mm, table: PageTable, vpn: int, pfn: int, writable: bool,
                 outcome: str, replaces: int = 0) -> MissResult:
        """Map `pfn` at `vpn`; `replaces`: the translation a COW copy takes the place of,
        which must be dead already (the oracle's coherence check)."""
        slot = table.slot(vpn)
        if replaces:
            self.oracle.superseded(replaces, self.clock())
        table.entries[slot] = make_pte(pfn, writable)
        table.tids[slot] = tid = table.new_tid()
        table.present += 1
        self.frames.mapcount[pfn] += 1
        self.frames.rmap_vpn[pfn] = vpn
        self.frames.rmap_family[pfn] = mm.family
        self.lru.add(pfn)
        return MissResult(outcome, pfn, table.writable(table.entries[slot]), tid)

    async def _cow(self, ctx: OpContext, cpu: int, mm: Mm, vpn: int,
                   table: PageTable) -> MissResult:
        """A write to a read-only PTE in a writable VMA: reuse the page if it is ours
        alone, else copy it (wp_page_copy): clear the old PTE and flush it, and only
        then install the copy, so that no CPU is still served the old frame while
        another is served the new one."""
        slot = table.slot(vpn)
        fresh = await self._alloc_page(ctx, cpu)  # may reclaim: even the page itself
        zap = _Zap(self._gather(mm, pages=1), "cow")
        async with self._pte_locked(ctx, mm, table):
            pte = table.entries[slot]
            if pte > 0 and table.writable(pte):  # another CPU broke the COW first
                result = MissResult("walked", pte_pfn(pte), True, table.tids[slot])
            elif pte <= 0 or table.wp:
                # Reclaimed, or unshared, while we allocated: nothing to fill, the CPU
                # accesses again (the fault returns and the access refaults).
                result = MissResult("retry")
            else:
                old_pfn, old_tid = pte_pfn(pte), table.tids[slot]
                if self.frames.mapcount[old_pfn] == 1 and self.frames.refcount[old_pfn] == 1:
                    # wp_page_reuse: upgrading needs no flush; the old entry stays valid
                    table.entries[slot] = make_pte(old_pfn, True)
                    table.tids[slot] = tid = table.new_tid()
                    self.oracle.transition(old_tid, tid, self.clock(), Revokes.NOTHING)
                    result = MissResult("cow", old_pfn, True, tid)
                else:
                    if self.rules.breaks(Rule.COW_CLEAR_FIRST):  # the copy goes in first
                        result = self._install(mm, table, vpn, fresh, True, "cow", old_tid)
                    else:
                        table.entries[slot] = 0  # ptep_clear_flush: clear ...
                    table.present -= 1
                    self.frames.mapcount[old_pfn] -= 1
                    zap.gather.clear_pte(vpn, old_tid, old_pfn)
                    await self._flush(mm, cpu, zap, Rule.COW_FLUSH)  # ... and flush, then
                    if self.rules.keeps(Rule.COW_CLEAR_FIRST):
                        result = self._install(mm, table, vpn, fresh, True, "cow", old_tid)
                    fresh = 0
        if fresh:
            self.frames.put(fresh)
            self.frames.free(fresh)
        self._release(zap.to_free, zap.tables)
        result.local_flushes = zap.local
        return result

    # --- reclaim: the one nonlocal operation ----------------------------------------------
    def _mappings(self, pfn: int) -> list[tuple[Mm, PageTable]]:
        """Every PTE table mapping `pfn`, through the reverse map: the page's address and
        its fork family (anon_vma's role); a table shared by several mms appears once."""
        vpn = self.frames.rmap_vpn[pfn]
        out, seen = [], set()
        for mm_id in sorted(self.families.get(self.frames.rmap_family[pfn], ())):
            mm = self.mms[mm_id]
            table = walk(mm.pgd, vpn)
            if table is None or table.uid in seen:
                continue
            pte = table.entries[vpn % PTRS_PER_TABLE]
            if pte > 0 and pte_pfn(pte) == pfn:
                seen.add(table.uid)
                out.append((mm, table))
        return out

    async def _reclaim(self, ctx: OpContext, initiator: int) -> None:
        """Swap out the oldest pages until free frames reach the high watermark: unmap each
        from every mm that maps it, batch them all into one flush — to the union of the
        affected mms' CPUs, or by the shared-flush policy when a shared table changed —
        and free them only after it (mm/rmap.c's batched unmap flushing). Each mm whose
        PTEs it cleared is marked (set_tlb_ubc_flush_pending), so that a PTE change
        racing with the deferred flush flushes first (flush_tlb_batched_pending). A page
        that is still mapped afterwards (a sharer copied its table meanwhile) goes back
        on the LRU, as try_to_unmap failing puts the folio back."""
        victims = self.lru.oldest(self.high_watermark - self.frames.free_count)
        ends = self.oracle.batch(())
        pages = []
        union: set[int] = set()      # mms whose tables changed, with every sharer
        walked: set[int] = set()     # only the mms the rmap walk went through
        shared = False
        for pfn in victims:
            for mm, table in self._mappings(pfn):
                async with self._sharers_locked(ctx, mm, [table]), \
                        self._pte_locked(ctx, mm, table):
                    vpn = self.frames.rmap_vpn[pfn]
                    slot = table.slot(vpn)
                    pte = table.entries[slot]
                    if pte <= 0 or pte_pfn(pte) != pfn:
                        continue  # changed while we waited for the lock
                    sharers = [m for m, _ in table.sharers or [(mm.id, 0)]]
                    ends.mms.update(sharers)
                    ends.clear(vpn, table.tids[slot])
                    table.entries[slot] = -self.swap.store()
                    table.tids[slot] = 0
                    self.frames.mapcount[pfn] -= 1
                    pages.append(pfn)
                    walked.add(mm.id)
                    union.update(sharers)
                    shared |= table.share_count > 0
                    for m in sharers:
                        self.mms[m].tlb_batch_pending += 1
        if not pages:
            self._keep_mapped(victims)
            return
        self.stats.swap_outs += len(pages)
        self.stats.frames_pending_free += len(pages)
        self._unflushed.update(pages)
        mms = [self.mms[m] for m in sorted(union)]
        if shared and self.policy.shared_flush == "all-cpus":
            cpus = set(self.cpu_mm)  # CPUs that ever ran anything: the rest cache nothing
        elif shared and self.policy.shared_flush == "unsafe-mm-only":
            cpus = set().union(*(self.mms[m].cpumask for m in walked))
        else:
            cpus = set().union(*(mm.cpumask for mm in mms))
        if self.rules.breaks(Rule.FLUSH_BEFORE_FREE):
            self.oracle.flushed(ends, self.clock())
        for mm in mms:  # lazy CPUs of each mm catch up at switch_mm by generation
            mm.tlb_gen += 1
        first = mms[0]
        order = FlushOrder(next(self._shootdown_ids), first.id, 0, 0, first.tlb_gen,
                           first.tlb_gen, False, initiator, all_mms=True, reason="reclaim")
        local = [order] if initiator in cpus else []
        targets = sorted(cpus - {initiator})
        self.stats.shootdowns += 1
        self.stats.reclaim_shootdowns += 1
        self.stats.full_flushes += 1
        if targets and self.rules.keeps(Rule.RECLAIM_FLUSH):
            self.stats.ipis += len(targets)
            self.stats.reclaim_ipis += len(targets)
            result = await self.shootdown(order, targets)
            self.stats.fenced.update(result.fenced)
        self._unflushed -= collections.Counter(pages)
        self.oracle.flushed(ends, self.clock())
        self._pending_local.setdefault(initiator, []).extend(local)
        freed = self._release(pages, [])
        self.stats.reclaimed_pages += freed
        self._keep_mapped(victims)

    def _keep_mapped(self, victims: list[int]) -> None:
        """Victims still mapped after reclaim's unmap stay resident: back on the LRU."""
        for pfn in victims:
            if self.frames.mapcount[pfn] and not self.frames.is_free(pfn):
                self.lru.add(pfn)

    def take_local_flushes(self, cpu: int) -> list[FlushOrder]:
        """Flushes a CPU owes itself from reclaim it ran on another's behalf."""
        return self._pending_local.pop(cpu, [])

    # --- system calls ------------------------------------------------------------------------
    async def mmap(self, cpu: int, mm_id: int, pages: int, writable: bool,
                   populate: bool = False) -> SyscallResult:
        mm = self.running(cpu, mm_id)
        if pages <= 0:
            raise InvalidArgument(f"mmap of {pages} pages: must be at least 1")
        if populate and pages > MAX_POPULATE_PAGES:
            raise OutOfRange(f"mmap of {pages} populated pages: at most {MAX_POPULATE_PAGES} "
                             "per call (populate more with several mmaps)")
        if populate and pages > self.frames.budget:
            raise OutOfRange(f"mmap of {pages} populated pages: the machine has "
                             f"{self.frames.budget} frames")
        ctx = self.ctx()
        async with mm.mmap_lock.write(ctx) as mmap_lock:
            if mm.next_vpn + pages + PTRS_PER_TABLE > USER_VPN_END:
                raise OutOfRange(f"mmap of {pages} pages does not fit in the 47-bit user space")
            start = mm.place(pages)
            mm.insert(Vma(start, start + pages, writable))
            if populate:
                await mmap_lock.downgrade()
                await self._populate_range(ctx, cpu, mm, start, start + pages, writable)
        return SyscallResult(address=start << 12, local_flushes=self.take_local_flushes(cpu))

    async def _populate_range(self, ctx: OpContext, cpu: int, mm: Mm, start: int, end: int,
                              writable: bool) -> None:
        """MAP_POPULATE: a zero-filled page in every none PTE, a table's worth at a time
        (allocated outside the lock, installed under it, as a fault would)."""
        vpn = start
        while vpn < end:
            stop = min(end, vpn - vpn % PTRS_PER_TABLE + PTRS_PER_TABLE)
            table = await self._ensure_table(ctx, mm, vpn, 1)
            fresh = [await self._alloc_page(ctx, cpu) for _ in range(stop - vpn)]
            async with self._pte_locked(ctx, mm, table):
                for v in range(vpn, stop):
                    if table.entries[table.slot(v)] == 0:
                        self._install(mm, table, v, fresh.pop(), writable, "anon")
            for pfn in fresh:  # slots populated meanwhile: back out
                self.frames.put(pfn)
                self.frames.free(pfn)
            vpn = stop

    async def munmap(self, cpu: int, mm_id: int, address: int, pages: int) -> SyscallResult:
        start, end = page_range(address, pages)
        mm = self.running(cpu, mm_id)
        t0 = self.clock()
        ctx = self.ctx()
        zap = _Zap(self._gather(mm), "munmap")
        async with mm.mmap_lock.write(ctx) as mmap_lock:
            self.alive(mm)
            if mm.remove(start, end):
                # As Linux does, the VMA change needs the lock exclusive; the zap only
                # shared, so faults elsewhere in the mm go on while the shootdown waits.
                await mmap_lock.downgrade()
                await self._zap(ctx, cpu, mm, start, end, zap, free_tables=True)
        freed = zap.freed + self._release(zap.to_free, zap.tables)
        self._returned(mm, start, end, Revokes.ALL)
        latency = (self.clock() - t0) / 1e9
        self.stats.munmap_latency_s.append(latency)
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed, latency_s=latency,
                             local_flushes=zap.local)

    async def madvise_dontneed(self, cpu: int, mm_id: int, address: int,
                               pages: int) -> SyscallResult:
        start, end = page_range(address, pages)
        mm = self.running(cpu, mm_id)
        t0 = self.clock()
        ctx = self.ctx()
        zap = _Zap(self._gather(mm), "madvise")
        async with mm.mmap_lock.read(ctx):
            self.alive(mm)
            if not mm.covered(start, end):
                raise NotFound(f"madvise: [{address:#x}, +{pages} pages) is not fully mapped")
            await self._zap(ctx, cpu, mm, start, end, zap, free_tables=False)
        freed = zap.freed + self._release(zap.to_free, zap.tables)
        self._returned(mm, start, end, Revokes.ALL)
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed,
                             latency_s=(self.clock() - t0) / 1e9, local_flushes=zap.local)

    def _returned(self, mm: Mm, start: int, end: int, revokes: Revokes) -> None:
        """The call is about to return to its caller: what it removed (or write-protected)
        in [start, end) must be gone from every CPU of the mm from now on (oracle.py)."""
        self.oracle.returned(mm.id, start, end, self.clock(), revokes)

    async def _zap(self, ctx: OpContext, cpu: int, mm: Mm, start: int, end: int, zap: _Zap,
                   free_tables: bool, free_pgd: bool = False) -> None:
        """unmap_region: zap_pte_range over every PTE table (clear, flush when the batch
        fills), free_pgtables, tlb_finish_mmu (the final flush). Frees are left in `zap`
        for the caller.

        Shared tables first (Phillips 2002): one covered whole by an unmap is dropped by
        decrementing its count; a partial one (or any, for madvise) is unshared, and
        the private copy zapped like any table. Dropped tables are flushed before the
        sharer locks are released."""
        shared = [t for t in self._pte_tables(mm, start, end) if t.share_count]
        whole = [t for t in shared if free_tables and start <= t.base_vpn
                 and t.base_vpn + PTRS_PER_TABLE <= end]
        for table in shared:
            if table not in whole:
                await self._unshare(ctx, cpu, mm, table, zap.local)
        with self._gathering(mm):
            async with self._sharers_locked(ctx, mm, whole), self._zap_lock(ctx, mm):
                async with ctx.locked_once(mm.page_table_lock):
                    for table in whole:
                        pmd = self._pmd_of(mm, table.base_vpn)
                        if table.share_count and pmd.entries[pmd.slot(table.base_vpn)] is table:
                            self._drop_shared(mm, table, zap.gather)
                for table in self._pte_tables(mm, start, end):
                    async with self._pte_locked(ctx, mm, table):
                        await self._flush_batched_pending(mm, cpu, zap)
                        for vpn, slot, pte in present_ptes(table, start, end):
                            if zap.gather.full:  # force_flush: under the table lock
                                await self._flush(mm, cpu, zap, Rule.ZAP_FLUSH)
                            self._clear_pte(table, vpn, slot, pte, zap)
                        for vpn, slot, swap_slot in swapped_ptes(table, start, end):
                            table.entries[slot] = 0
                            table.present -= 1
                            self.swap.drop(swap_slot)
                    # Frames freed after the lock is dropped; their flush already completed.
                    zap.freed += self._release(zap.to_free, [])
                    zap.to_free.clear()
                if free_tables or free_pgd:
                    async with ctx.locked_once(mm.page_table_lock):
                        if free_tables:
                            self._unlink_free_tables(mm, start, end, zap.gather)
                        if free_pgd:
                            zap.gather.free_table(mm.pgd, 0)
                await self._finish(mm, cpu, zap, Rule.ZAP_FLUSH)

    def _clear_pte(self, table: PageTable, vpn: int, slot: int, pte: int, zap: _Zap) -> None:
        """ptep_get_and_clear into the gather (the page is freed after its flush)."""
        pfn = pte_pfn(pte)
        if self.rules.breaks(Rule.CLEAR_BEFORE_FLUSH):  # walkers see it until the flush
            self._ghosts[table.uid, slot] = (pte, table.tids[slot], table.writable(pte))
            zap.deferred.append((table.uid, slot))
        table.entries[slot] = 0
        table.present -= 1
        self.frames.mapcount[pfn] -= 1
        zap.gather.clear_pte(vpn, table.tids[slot], pfn)

    async def mprotect(self, cpu: int, mm_id: int, address: int, pages: int,
                       writable: bool) -> SyscallResult:
        start, end = page_range(address, pages)
        mm = self.running(cpu, mm_id)
        t0 = self.clock()
        ctx = self.ctx()
        zap = _Zap(self._gather(mm, pages=1 << 62), "mprotect")  # no frees: one flush
        async with mm.mmap_lock.write(ctx):
            self.alive(mm)
            if not mm.covered(start, end):
                raise NotFound(f"mprotect: [{address:#x}, +{pages} pages) is not fully mapped")
            await self._unshare_range(ctx, cpu, mm, start, end, zap.local)
            for vma in mm.carve(start, end):
                vma.writable = writable
            mm.merge()
            if not writable:  # downgrade: existing writable translations must go
                with self._gathering(mm):  # change_protection
                    async with self._zap_lock(ctx, mm):
                        for table in self._pte_tables(mm, start, end):
                            async with self._pte_locked(ctx, mm, table):
                                await self._flush_batched_pending(mm, cpu, zap)
                                self._write_protect(table, start, end, zap.gather)
                        await self._finish(mm, cpu, zap, Rule.MPROTECT_FLUSH)
        if not writable:
            self._returned(mm, start, end, Revokes.WRITES)
        return SyscallResult(shootdowns=zap.shootdowns, latency_s=(self.clock() - t0) / 1e9,
                             local_flushes=zap.local)

    def _write_protect(self, table: PageTable, start: int, end: int, gather: Gather) -> None:
        for vpn, slot, pte in present_ptes(table, start, end):
            if pte_writable(pte):
                table.entries[slot] = make_pte(pte_pfn(pte), False)
                old, table.tids[slot] = table.tids[slot], table.new_tid()
                gather.protect_pte(vpn, old, table.tids[slot])

    async def fork(self, cpu: int, mm_id: int) -> SyscallResult:
        """fork: `copy` copies every PTE read-only for COW; `share` points the child's pmd
        entries at the parent's PTE tables and write-protects each table as a whole —
        O(tables), not O(pages). Either way it ends, as dup_mmap does, with a flush of
        the parent's whole mm (flush_tlb_mm), whatever it write-protected."""
        parent = self.running(cpu, mm_id)
        t0 = self.clock()
        ctx = self.ctx()
        zap = _Zap(self._gather(parent, pages=1 << 62), "fork")
        async with parent.mmap_lock.write(ctx):
            self.alive(parent)
            child_id = self.create_mm(family=parent.family)
            child = self.mms[child_id]
            child.vmas = [Vma(v.start, v.end, v.writable) for v in parent.vmas]
            child.next_vpn = parent.next_vpn
            tables = self._pte_tables(parent, 0, USER_VPN_END)
            if self.policy.fork == "share":
                await self._share_tables(ctx, parent, child, tables, zap.gather)
            else:
                for table in tables:
                    for vma in parent.vmas:
                        if vma.start < table.base_vpn + PTRS_PER_TABLE and \
                                table.base_vpn < vma.end:
                            await self._copy_table(ctx, parent, child, table, vma, zap.gather)
            zap.gather.whole_mm()
            await self._flush(parent, cpu, zap, Rule.FORK_FLUSH)
        self._returned(parent, 0, USER_VPN_END, Revokes.WRITES)
        latency = (self.clock() - t0) / 1e9
        self.stats.fork_latency_s.append(latency)
        return SyscallResult(child_mm=child_id, shootdowns=zap.shootdowns, latency_s=latency,
                             local_flushes=zap.local)

    async def _share_tables(self, ctx: OpContext, parent: Mm, child: Mm,
                            tables: list[PageTable], gather: Gather) -> None:
        """Every sharer list is locked once, in key order, for the whole fork."""
        async with self._sharers_locked(ctx, parent, tables):
            for table in tables:
                if not table.wp:
                    async with self._pte_locked(ctx, parent, table):
                        table.wp = True
                        gather.protect_table(table)
                pmd = await self._ensure_table(ctx, child, table.base_vpn, 2)  # upper levels
                self._share_into(parent, child, pmd, table)

    async def _copy_table(self, ctx: OpContext, parent: Mm, child: Mm, src: PageTable,
                          vma: Vma, gather: Gather) -> None:
        # The child runs nowhere yet: its tables need no lock of the parent's.
        dst = await self._ensure_table(ctx, child, max(vma.start, src.base_vpn), 1)
        async with self._pte_locked(ctx, parent, src):
            for vpn, slot, pte in present_ptes(src, vma.start, vma.end):
                pfn = pte_pfn(pte)
                if src.writable(pte):
                    src.entries[slot] = make_pte(pfn, False)
                    old, src.tids[slot] = src.tids[slot], src.new_tid()
                    gather.protect_pte(vpn, old, src.tids[slot])
                dst.entries[slot] = make_pte(pfn, False)
                dst.tids[slot] = dst.new_tid()
                dst.present += 1
                self.frames.get(pfn)
                self.frames.mapcount[pfn] += 1
            for vpn, slot, swap_slot in swapped_ptes(src, vma.start, vma.end):
                dst.entries[slot] = -swap_slot
                dst.present += 1
                self.swap.dup(swap_slot)

    async def exit(self, cpu: int, mm_id: int) -> SyscallResult:
        """exit_mmap: tear down everything with one full flush, then free. Shared tables
        are dropped, not cleared; the last sharer frees them (clear -> flush -> free).
        It runs once: a CPU of the mm that exits while another's exit holds the lock
        finds the mm gone and only goes idle."""
        mm = self.running(cpu, mm_id)
        t0 = self.clock()
        ctx = self.ctx()
        zap = _Zap(self._gather(mm, fullmm=True), "exit")
        async with mm.mmap_lock.write(ctx):
            if mm.exited:
                self.switch_mm(cpu, 0)
                return SyscallResult()
            mm.vmas = []
            await self._zap(ctx, cpu, mm, 0, USER_VPN_END, zap, free_tables=True, free_pgd=True)
            mm.exited = True
        self.families[mm.family].discard(mm.id)
        freed = zap.freed + self._release(zap.to_free, zap.tables)
        self.switch_mm(cpu, 0)
        mm.cpumask.clear()
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed,
                             latency_s=(self.clock() - t0) / 1e9, local_flushes=zap.local)

    # --- the oracle ----------------------------------------------------------------------------
    def report_accesses(self, words: Sequence[int], runs: Sequence[int], mm: int = 0) -> int:
        return self.oracle.check_hits(words, runs, mm)

    def judge_accesses(self, words: Sequence[int], runs: Sequence[int],
                       mm: int = 0) -> Iterator[int]:
        """`report_accesses` in chunks (Oracle.judge), for a caller with an event loop."""
        return self.oracle.judge(words, runs, mm)

    def audit(self, dumps: list[dict]) -> tuple[int, list[str]]:
        """Compare TLB contents with the page tables at a quiescent point.

        A dump is {cpu, fenced, loaded_mm, lazy, local_gen: {mm: gen},
        entries: [(mm, vpn, pfn, writable, tid)]}. An entry that no longer matches its
        PTE is a violation unless the CPU legitimately has not caught up: it is not
        running that mm (or is lazy) and its generation for the mm is behind — it
        flushes at its next switch_mm. A lazy CPU still has the mm's page tables loaded,
        and its page walker may walk them: it may hold nothing through a table the mm
        no longer maps (freed or unshared), which is why such flushes reach lazy CPUs.
        Fenced CPUs cannot execute and are skipped."""
        checked, violations = 0, []
        for d in dumps:
            if d["fenced"]:
                continue
            for mm_id, vpn, pfn, writable, tid in d["entries"]:
                checked += 1
                mm = self.mms.get(mm_id)
                where = f"cpu {d['cpu']}: mm {mm_id} vpn {vpn:#x} -> pfn {pfn}"
                if mm is None:
                    violations.append(f"{where}: no such mm")
                    continue
                table = None if mm.exited else walk(mm.pgd, vpn)
                behind = d["local_gen"].get(mm_id, 0) < mm.tlb_gen
                running = d["loaded_mm"] == mm_id and not d["lazy"]
                if behind and not running:
                    if d["loaded_mm"] == mm_id and (table is None or
                                                    table.uid != tid_table(tid)):
                        violations.append(f"{where}: a lazy CPU holds a translation through "
                                          "a page table the mm no longer maps")
                    continue
                slot = vpn % PTRS_PER_TABLE
                pte = table.entries[slot] if table is not None else 0
                if pte <= 0 or pte_pfn(pte) != pfn:
                    now = {0: "nothing"}.get(pte, "a swap entry" if pte < 0 else
                                             f"pfn {pte_pfn(pte)}")
                    violations.append(f"{where}: the PTE now maps {now}")
                elif not self.oracle.entry_valid(tid, writable, table.tids[slot], mm_id):
                    violations.append(f"{where}: translation {tid} was revoked"
                                      f"{' (writable, PTE read-only)' if writable else ''}")
        self.stats.audit_violations += len(violations)
        return checked, violations
