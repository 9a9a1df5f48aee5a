"""The memory service's domain: what a kernel's mm code does (DESIGN.md §3-§5).

Operations are coroutines because they wait on locks and on shootdowns; all
else is plain Python. The shootdown itself goes out through an injected port
(the coordinator in the service, an in-process delivery in unit tests).

Orders that make it correct:
  - fault: allocate outside the lock, lock, re-check, install or back out;
  - zap (munmap, madvise, exit): under the table lock clear PTEs into a
    gather; when the batch is full or at the end, bump tlb_gen, shoot down
    while still holding the lock, and only after dropping it free the pages
    (clear -> flush -> free; flush under the lock, free after: Linux since 2014);
  - targets: mm_cpumask minus the initiator, which flushes itself; lazy CPUs
    only when page tables were freed.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Awaitable, Callable, Iterator

from services.common.addresses import PTRS_PER_TABLE, USER_VPN_END, page_range
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from services.common.policy import Policy
from services.memory.frames import Frames
from services.memory.gather import FlushSpec, Gather, capacity
from services.memory.locks import LockClass, LockStats, LockValidator, OpContext, SimLock
from services.memory.mm import Mm, Vma
from services.memory.oracle import Oracle, Revokes
from services.memory.pagetable import (PageTable, make_pte, present_ptes, pte_pfn, pte_writable,
                                       walk)

DEFAULT_FRAMES = 1 << 24  # 64 GiB of simulated memory; arrays grow only as frames are used


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


@dataclasses.dataclass
class ShootdownResult:
    acked: list[int]
    fenced: list[int]


ShootdownPort = Callable[[FlushOrder, list[int]], Awaitable[ShootdownResult]]


@dataclasses.dataclass
class MissResult:
    outcome: str        # walked | anon | cow | prot | segv
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
    fault_latency_s: list[float] = dataclasses.field(default_factory=list)
    munmap_latency_s: list[float] = dataclasses.field(default_factory=list)
    fork_latency_s: list[float] = dataclasses.field(default_factory=list)
    audit_violations: int = 0


class _Zap:
    """The running state of one zap: its gather, what to free, the initiator's flushes."""

    def __init__(self, gather: Gather):
        self.gather = gather
        self.to_free: list[int] = []
        self.tables: list[PageTable] = []
        self.local: list[FlushOrder] = []
        self.shootdowns = 0


class Kernel:
    def __init__(self, policy: Policy, shootdown: ShootdownPort, frames: int = DEFAULT_FRAMES,
                 clock: Callable[[], int] = time.monotonic_ns):
        self.policy = policy
        self.shootdown = shootdown
        self.clock = clock
        self.frames = Frames(frames)
        self.mms: dict[int, Mm] = {}
        self.oracle = Oracle()
        self.lock_stats = LockStats()
        self.validator = LockValidator()
        self.stats = KernelStats()
        self.cpu_mm: dict[int, int] = {}       # cpu -> loaded mm (0 = idle)
        self._mm_ids = itertools.count(1)
        self._tids = itertools.count(1)
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

    def _alloc_table(self, level: int, base_vpn: int) -> PageTable:
        pfn = self.frames.alloc()
        ptl = SimLock(LockClass.PTL, f"ptl:{pfn}", key=pfn) if level == 1 else None
        self.stats.tables_allocated[level] += 1
        return PageTable(pfn, level, base_vpn, ptl)

    def _pte_lock(self, mm: Mm, table: PageTable) -> SimLock:
        """Which lock guards a PTE table's entries: the mode's whole point."""
        if self.policy.lock == "split":
            assert table.ptl is not None
            return table.ptl
        return mm.page_table_lock

    def _gather(self, fullmm: bool = False) -> Gather:
        """A zap's gather; per-page mode is a gather that holds one page."""
        pages = 1 if self.policy.flush == "per-page" else capacity(self.policy.batch)
        return Gather(pages, self.policy.ceiling, fullmm)

    def _new_tid(self) -> int:
        return next(self._tids)

    # --- processes and CPUs ----------------------------------------------------------------
    def create_mm(self) -> int:
        mm_id = next(self._mm_ids)
        self.mms[mm_id] = Mm(mm_id, self._alloc_table(4, 0))
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

    def forget_cpu(self, cpu: int) -> None:
        """A CPU restarted with an empty TLB: it no longer runs or caches anything."""
        self.cpu_mm.pop(cpu, None)
        for mm in self.mms.values():
            mm.cpumask.discard(cpu)

    def _is_lazy(self, cpu: int, mm: Mm) -> bool:
        return self.cpu_mm.get(cpu, 0) != mm.id

    # --- the flush -----------------------------------------------------------------------
    def _release(self, pages: list[int], tables: list[PageTable]) -> int:
        """Drop the gathered references; free what reaches zero. Returns pages freed."""
        freed = 0
        for pfn in pages:
            if self.frames.put(pfn):
                self.frames.free(pfn)
                freed += 1
        for table in tables:
            if self.frames.put(table.pfn):
                self.frames.free(table.pfn)
                self.stats.tables_freed += 1
        self.stats.pages_freed += freed
        return freed

    async def _flush(self, mm: Mm, initiator: int, zap: _Zap) -> None:
        """tlb_flush_mmu: invalidate what the gather holds, then hand its pages to free."""
        spec = zap.gather.flush_spec()
        pages, tables, revoked, write_revoked = zap.gather.take()
        if spec is None:
            return
        if self.policy.unsafe == "free-before-flush":
            # Deliberately wrong: the frames go back to the allocator while other CPUs
            # may still hold translations to them. The oracle must catch the result.
            self._release(pages, tables)
            self.oracle.revoke(revoked, self.clock())
            pages, tables = [], []
        await self._shoot(mm, initiator, spec, zap)
        now = self.clock()
        self.oracle.revoke(revoked, now)
        for old, new in write_revoked:
            self.oracle.transition(old, new, now, Revokes.WRITES)
        zap.to_free.extend(pages)
        zap.tables.extend(tables)

    async def _shoot(self, mm: Mm, initiator: int, spec: FlushSpec, zap: _Zap) -> None:
        mm.tlb_gen += 1  # after changing the tables, before sending: x86 tlb_gen
        order = FlushOrder(next(self._shootdown_ids), mm.id, spec.start_vpn, spec.pages,
                           mm.tlb_gen, mm.tlb_gen, spec.freed_tables, initiator)
        if initiator in mm.cpumask and not self._is_lazy(initiator, mm):
            zap.local.append(order)
        targets = []
        for cpu in sorted(mm.cpumask):
            if cpu == initiator:
                continue
            if self._is_lazy(cpu, mm) and not spec.freed_tables:
                self.stats.lazy_skipped += 1
                continue
            targets.append(cpu)
        zap.shootdowns += 1
        self.stats.shootdowns += 1
        self.stats.full_flushes += spec.full
        if not targets:
            return
        self.stats.ipis += len(targets)
        result = await self.shootdown(order, targets)
        self.stats.fenced.update(result.fenced)

    # --- page tables -----------------------------------------------------------------------
    async def _ensure_pte_table(self, ctx: OpContext, mm: Mm, vpn: int) -> PageTable:
        """Populate the upper levels down to the PTE table, under page_table_lock."""
        table = mm.pgd
        while table.level > 1:
            slot = table.slot(vpn)
            child = table.entries[slot]
            if child is None:
                span = PTRS_PER_TABLE ** (table.level - 1)
                fresh = self._alloc_table(table.level - 1, vpn - vpn % span)
                async with ctx.locked(mm.page_table_lock):
                    child = table.entries[slot]
                    if child is None:  # nobody populated it while we allocated
                        table.entries[slot] = child = fresh
                        table.present += 1
                        fresh = None
                if fresh is not None:
                    self.frames.put(fresh.pfn)
                    self.frames.free(fresh.pfn)
                    self.stats.tables_allocated[fresh.level] -= 1
            table = child
        return table

    def _pte_tables(self, mm: Mm, start: int, end: int) -> Iterator[PageTable]:
        """Existing PTE tables overlapping [start, end), in address order."""
        vpn = start - start % PTRS_PER_TABLE
        while vpn < end:
            table = walk(mm.pgd, vpn)
            if table is not None:
                yield table
            vpn += PTRS_PER_TABLE

    def _unlink_free_tables(self, mm: Mm, start: int, end: int, gather: Gather) -> None:
        """free_pgtables: unhook tables no VMA needs any more; they go through the gather."""
        def prune(table: PageTable) -> None:
            span = PTRS_PER_TABLE ** (table.level - 1)
            first = max(start, table.base_vpn) // span
            last = (min(end, table.base_vpn + table.span) - 1) // span
            for i in range(first, last + 1):
                slot = i % PTRS_PER_TABLE
                child = table.entries[slot]
                if child is None:
                    continue
                if child.level > 1:
                    prune(child)
                if child.present == 0 and not mm.overlaps(child.base_vpn,
                                                          child.base_vpn + child.span):
                    table.entries[slot] = None
                    table.present -= 1
                    gather.free_table(child, max(start, child.base_vpn))
        prune(mm.pgd)

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
            out.append((pte_pfn(pte), pte_writable(pte), table.tids[vpn % PTRS_PER_TABLE])
                       if pte else None)
        return out

    async def handle_miss(self, cpu: int, mm_id: int, vpn: int, write: bool) -> MissResult:
        if not 0 <= vpn < USER_VPN_END:
            raise OutOfRange(f"vpn {vpn:#x} is past the 47-bit user address space")
        mm = self.running(cpu, mm_id)
        table = walk(mm.pgd, vpn)
        if table is not None:  # the hardware walker: no lock
            slot = table.slot(vpn)
            pte = table.entries[slot]
            if pte and (not write or pte_writable(pte)):
                return MissResult("walked", pte_pfn(pte), pte_writable(pte), table.tids[slot])
        t0 = time.perf_counter()
        result = await self._fault(cpu, mm, vpn, write)
        self.stats.faults[result.outcome] += 1
        self.stats.fault_latency_s.append(time.perf_counter() - t0)
        return result

    async def _fault(self, cpu: int, mm: Mm, vpn: int, write: bool) -> MissResult:
        ctx = self.ctx()
        async with mm.mmap_lock.read(ctx):
            vma = mm.find_vma(vpn)
            if vma is None:
                return MissResult("segv")
            if write and not vma.writable:
                return MissResult("prot")
            table = await self._ensure_pte_table(ctx, mm, vpn)
            slot = table.slot(vpn)
            lock = self._pte_lock(mm, table)
            if table.entries[slot] == 0:
                fresh = self.frames.alloc()  # allocate outside the lock
                async with ctx.locked(lock):
                    if table.entries[slot] == 0:
                        return self._install(table, slot, fresh, vma.writable, "anon")
                self.frames.put(fresh)  # another CPU won the race: back out
                self.frames.free(fresh)
            pte = table.entries[slot]
            if write and not pte_writable(pte):
                return await self._cow(ctx, cpu, mm, vpn, table, lock)
            return MissResult("walked", pte_pfn(pte), pte_writable(pte), table.tids[slot])

    def _install(self, table: PageTable, slot: int, pfn: int, writable: bool,
                 outcome: str) -> MissResult:
        table.entries[slot] = make_pte(pfn, writable)
        table.tids[slot] = tid = self._new_tid()
        table.present += 1
        self.frames.mapcount[pfn] += 1
        return MissResult(outcome, pfn, writable, tid)

    async def _cow(self, ctx: OpContext, cpu: int, mm: Mm, vpn: int, table: PageTable,
                   lock: SimLock) -> MissResult:
        """A write to a read-only PTE in a writable VMA: reuse the page if it is ours
        alone, else copy it and flush the old translation before dropping the page."""
        slot = table.slot(vpn)
        fresh = self.frames.alloc()
        zap = _Zap(Gather(1, self.policy.ceiling))
        async with ctx.locked(lock):
            pte = table.entries[slot]
            if not pte or pte_writable(pte):  # changed while we allocated: let the CPU retry
                result = MissResult("walked", pte_pfn(pte), pte_writable(pte), table.tids[slot])
            else:
                old_pfn, old_tid = pte_pfn(pte), table.tids[slot]
                if self.frames.mapcount[old_pfn] == 1 and self.frames.refcount[old_pfn] == 1:
                    # wp_page_reuse: upgrading needs no flush; the old entry stays valid
                    table.entries[slot] = make_pte(old_pfn, True)
                    table.tids[slot] = tid = self._new_tid()
                    self.oracle.transition(old_tid, tid, self.clock(), Revokes.NOTHING)
                    result = MissResult("cow", old_pfn, True, tid)
                else:
                    self.frames.mapcount[old_pfn] -= 1
                    table.present -= 1
                    zap.gather.clear_pte(vpn, old_tid, old_pfn)
                    result = self._install(table, slot, fresh, True, "cow")
                    fresh = 0
                    await self._flush(mm, cpu, zap)
        if fresh:
            self.frames.put(fresh)
            self.frames.free(fresh)
        self._release(zap.to_free, zap.tables)
        result.local_flushes = zap.local
        return result

    # --- system calls ------------------------------------------------------------------------
    async def mmap(self, cpu: int, mm_id: int, pages: int, writable: bool) -> SyscallResult:
        mm = self.running(cpu, mm_id)
        if pages <= 0:
            raise InvalidArgument(f"mmap of {pages} pages: must be at least 1")
        ctx = self.ctx()
        async with mm.mmap_lock.write(ctx):
            if mm.next_vpn + pages + PTRS_PER_TABLE > USER_VPN_END:
                raise OutOfRange(f"mmap of {pages} pages does not fit in the 47-bit user space")
            start = mm.place(pages)
            mm.insert(Vma(start, start + pages, writable))
        return SyscallResult(address=start << 12)

    async def munmap(self, cpu: int, mm_id: int, address: int, pages: int) -> SyscallResult:
        start, end = page_range(address, pages)
        mm = self.running(cpu, mm_id)
        t0 = time.perf_counter()
        ctx = self.ctx()
        zap = _Zap(self._gather())
        async with mm.mmap_lock.write(ctx) as mmap_lock:
            if mm.remove(start, end):
                # As Linux does, the VMA change needs the lock exclusive; the zap only
                # shared, so faults elsewhere in the mm go on while the shootdown waits.
                await mmap_lock.downgrade()
                await self._zap(ctx, cpu, mm, start, end, zap, free_tables=True)
        freed = self._release(zap.to_free, zap.tables)
        latency = time.perf_counter() - t0
        self.stats.munmap_latency_s.append(latency)
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed, latency_s=latency,
                             local_flushes=zap.local)

    async def madvise_dontneed(self, cpu: int, mm_id: int, address: int,
                               pages: int) -> SyscallResult:
        start, end = page_range(address, pages)
        mm = self.running(cpu, mm_id)
        t0 = time.perf_counter()
        ctx = self.ctx()
        zap = _Zap(self._gather())
        async with mm.mmap_lock.read(ctx):
            if not mm.covered(start, end):
                raise NotFound(f"madvise: [{address:#x}, +{pages} pages) is not fully mapped")
            await self._zap(ctx, cpu, mm, start, end, zap, free_tables=False)
        freed = self._release(zap.to_free, zap.tables)
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed,
                             latency_s=time.perf_counter() - t0, local_flushes=zap.local)

    async def _zap(self, ctx: OpContext, cpu: int, mm: Mm, start: int, end: int, zap: _Zap,
                   free_tables: bool) -> None:
        """zap_page_range (+ free_pgtables): clear, flush when the batch fills, flush at
        the end while the last lock is held. Frees are left in `zap` for the caller."""
        tables = list(self._pte_tables(mm, start, end))
        frees_tables = free_tables and self._has_freeable_tables(mm, start, end)
        for i, table in enumerate(tables):
            async with ctx.locked(self._pte_lock(mm, table)):
                for vpn, slot, pte in present_ptes(table, start, end):
                    pfn = pte_pfn(pte)
                    table.entries[slot] = 0
                    table.present -= 1
                    self.frames.mapcount[pfn] -= 1
                    if zap.gather.clear_pte(vpn, table.tids[slot], pfn):
                        await self._flush(mm, cpu, zap)
                if i == len(tables) - 1 and not frees_tables:
                    await self._flush(mm, cpu, zap)
            # Frames freed after the lock is dropped; the shootdown already completed.
            self._release(zap.to_free, [])
            zap.to_free.clear()
        if frees_tables:
            async with ctx.locked(mm.page_table_lock):
                self._unlink_free_tables(mm, start, end, zap.gather)
                await self._flush(mm, cpu, zap)

    def _has_freeable_tables(self, mm: Mm, start: int, end: int) -> bool:
        first = start - start % PTRS_PER_TABLE
        return any(walk(mm.pgd, vpn) is not None and not mm.overlaps(vpn, vpn + PTRS_PER_TABLE)
                   for vpn in range(first, end, PTRS_PER_TABLE))

    async def mprotect(self, cpu: int, mm_id: int, address: int, pages: int,
                       writable: bool) -> SyscallResult:
        start, end = page_range(address, pages)
        mm = self.running(cpu, mm_id)
        t0 = time.perf_counter()
        ctx = self.ctx()
        zap = _Zap(Gather(1 << 62, self.policy.ceiling))  # no frees: one flush at the end
        async with mm.mmap_lock.write(ctx):
            if not mm.covered(start, end):
                raise NotFound(f"mprotect: [{address:#x}, +{pages} pages) is not fully mapped")
            for vma in mm.carve(start, end):
                vma.writable = writable
            mm.merge()
            if not writable:  # downgrade: existing writable translations must go
                tables = list(self._pte_tables(mm, start, end))
                for i, table in enumerate(tables):
                    async with ctx.locked(self._pte_lock(mm, table)):
                        self._write_protect(table, start, end, zap.gather)
                        if i == len(tables) - 1:
                            await self._flush(mm, cpu, zap)
        return SyscallResult(shootdowns=zap.shootdowns, latency_s=time.perf_counter() - t0,
                             local_flushes=zap.local)

    def _write_protect(self, table: PageTable, start: int, end: int, gather: Gather) -> None:
        for vpn, slot, pte in present_ptes(table, start, end):
            if pte_writable(pte):
                table.entries[slot] = make_pte(pte_pfn(pte), False)
                old, table.tids[slot] = table.tids[slot], self._new_tid()
                gather.protect_pte(vpn, old, table.tids[slot])

    async def fork(self, cpu: int, mm_id: int) -> SyscallResult:
        """fork in copy mode: copy every PTE read-only for COW, then flush the parent."""
        parent = self.running(cpu, mm_id)
        t0 = time.perf_counter()
        ctx = self.ctx()
        zap = _Zap(Gather(1 << 62, self.policy.ceiling))
        child_id = self.create_mm()
        child = self.mms[child_id]
        async with parent.mmap_lock.write(ctx):
            child.vmas = [Vma(v.start, v.end, v.writable) for v in parent.vmas]
            child.next_vpn = parent.next_vpn
            for vma in parent.vmas:
                for table in list(self._pte_tables(parent, vma.start, vma.end)):
                    await self._copy_table(ctx, parent, child, table, vma, zap.gather)
            async with ctx.locked(parent.page_table_lock):
                await self._flush(parent, cpu, zap)
        latency = time.perf_counter() - t0
        self.stats.fork_latency_s.append(latency)
        return SyscallResult(child_mm=child_id, shootdowns=zap.shootdowns, latency_s=latency,
                             local_flushes=zap.local)

    async def _copy_table(self, ctx: OpContext, parent: Mm, child: Mm, src: PageTable,
                          vma: Vma, gather: Gather) -> None:
        # The child runs nowhere yet: its tables need no lock of the parent's.
        dst = await self._ensure_pte_table(ctx, child, max(vma.start, src.base_vpn))
        async with ctx.locked(self._pte_lock(parent, src)):
            for vpn, slot, pte in present_ptes(src, vma.start, vma.end):
                pfn = pte_pfn(pte)
                if pte_writable(pte):
                    src.entries[slot] = make_pte(pfn, False)
                    old, src.tids[slot] = src.tids[slot], self._new_tid()
                    gather.protect_pte(vpn, old, src.tids[slot])
                dst.entries[slot] = make_pte(pfn, False)
                dst.tids[slot] = self._new_tid()
                dst.present += 1
                self.frames.get(pfn)
                self.frames.mapcount[pfn] += 1

    async def exit(self, cpu: int, mm_id: int) -> SyscallResult:
        """exit_mmap: tear down everything with one full flush, then free."""
        mm = self.running(cpu, mm_id)
        t0 = time.perf_counter()
        ctx = self.ctx()
        zap = _Zap(self._gather(fullmm=True))
        async with mm.mmap_lock.write(ctx):
            ranges = [(v.start, v.end) for v in mm.vmas]
            mm.vmas = []
            for start, end in ranges:
                await self._zap(ctx, cpu, mm, start, end, zap, free_tables=False)
            async with ctx.locked(mm.page_table_lock):
                self._unlink_free_tables(mm, 0, USER_VPN_END, zap.gather)
                zap.gather.free_table(mm.pgd, 0)
                await self._flush(mm, cpu, zap)
            mm.exited = True
        freed = self._release(zap.to_free, zap.tables)
        self.switch_mm(cpu, 0)
        mm.cpumask.clear()
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed,
                             latency_s=time.perf_counter() - t0, local_flushes=zap.local)

    # --- the oracle ----------------------------------------------------------------------------
    def report_accesses(self, words: list[int], times: list[int]) -> int:
        return self.oracle.check_hits(words, times)

    def audit(self, dumps: list[dict]) -> tuple[int, list[str]]:
        """Compare TLB contents with the page tables at a quiescent point.

        A dump is {cpu, fenced, loaded_mm, lazy, local_gen: {mm: gen},
        entries: [(mm, vpn, pfn, writable, tid)]}. An entry that no longer matches its
        PTE is a violation unless the CPU legitimately has not caught up: it is not
        running that mm (or is lazy) and its generation for the mm is behind — it
        flushes at its next switch_mm. Fenced CPUs cannot execute and are skipped."""
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
                behind = d["local_gen"].get(mm_id, 0) < mm.tlb_gen
                running = d["loaded_mm"] == mm_id and not d["lazy"]
                if behind and not running:
                    continue
                table = None if mm.exited else walk(mm.pgd, vpn)
                slot = vpn % PTRS_PER_TABLE
                pte = table.entries[slot] if table is not None else 0
                if not pte or pte_pfn(pte) != pfn:
                    violations.append(f"{where}: the PTE now maps "
                                      f"{'nothing' if not pte else f'pfn {pte_pfn(pte)}'}")
                elif not self.oracle.entry_valid(tid, writable, table.tids[slot]):
                    violations.append(f"{where}: translation {tid} was revoked"
                                      f"{' (writable, PTE read-only)' if writable else ''}")
        self.stats.audit_violations += len(violations)
        return checked, violations
