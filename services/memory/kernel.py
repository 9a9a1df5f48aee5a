"""The memory service's domain: what a kernel's mm code does (DESIGN.md §3-§5), as
system calls over collaborators with one direction of use:

    kernel -> faults -> reclaim -> flush -> tables -> state
           -> zap    -> sharing -> flush
           -> audit

Operations are coroutines because they wait on locks and on shootdowns; all else is
plain Python. The shootdown goes out through an injected port (the coordinator in the
service, an in-process delivery in unit tests), and time comes from an injected clock.

Orders that make it correct (each a `Rule`, services/memory/rules.py):
  - fault: allocate outside the lock, lock, re-check, install or back out; a
    fault that finds the PTE gone (reclaimed meanwhile) fills nothing: the CPU
    accesses again (faults.py);
  - copy-on-write (wp_page_copy): clear the old PTE and flush it, and only then
    install the copy, so no two CPUs are served two frames for one page;
  - zap (munmap, madvise, exit) and mprotect: zap.py says where the flush happens
    relative to the locks; frames are freed only after the flush (clear -> flush ->
    free, flush.py); a gather that ran beside another of the same mm flushes the whole
    mm (mm_tlb_flush_nested);
  - fork ends with a flush of the parent's whole mm (dup_mmap: flush_tlb_mm);
  - targets: mm_cpumask minus the initiator, which flushes itself; lazy CPUs
    only when page tables were freed or unshared.
A call that removed or downgraded translations tells the oracle when it returned:
from then on no CPU of the mm may use them (oracle.py).
"""
from __future__ import annotations

from typing import Iterator, Sequence

from services.common.addresses import PTRS_PER_TABLE, USER_VPN_END, page_range
from services.common.clock import Clock, monotonic
from services.common.errors import (AlreadyExists, InvalidArgument, NotFound, OutOfRange,
                                    SimError)
from services.common.hits import HitReport
from services.common.misses import Touch, batchable
from services.common.policy import Policy
from services.memory.audit import TlbDump, audit
from services.memory.faults import Faults
from services.memory.flush import Flusher
from services.memory.mm import MMAP_MIN_VPN, Mm, Vma
from services.memory.oracle import Revokes
from services.memory.pagetable import walk
from services.memory.reclaim import Reclaimer
from services.memory.rules import Rule, Rules
from services.memory.sharing import Sharing, tables_of_vmas
from services.memory.state import (FlushOrder, KernelState, MissResult, ShootdownPort,
                                   ShootdownResult, SyscallResult)
from services.memory.tables import Pte, Tables
from services.memory.zap import Zapper

__all__ = ["Kernel", "FlushOrder", "MissResult", "ShootdownPort", "ShootdownResult",
           "SyscallResult"]

# One populating mmap faults in at most this many pages (~6 s, ~300 MiB): bounded work
# per request, like every other call (munmap and friends walk only populated tables).
MAX_POPULATE_PAGES = 1 << 20
# Misses a CPU resolves in one batch: its read-ahead window is 64 pages (cpu/core.py).
MAX_MISS_BATCH = 1024
FILLS = ("walked", "anon", "cow", "swapin")  # outcomes the CPU fills its TLB from
TABLE_LEVELS = 4
DEFAULT_FRAMES = 1 << 24  # 64 GiB of simulated memory; arrays grow only as frames are used


class Kernel:
    def __init__(self, policy: Policy, shootdown: ShootdownPort, frames: int = DEFAULT_FRAMES,
                 clock: Clock = monotonic, broken: frozenset[Rule] = frozenset()):
        if policy.free_before_flush:
            broken |= {Rule.FLUSH_BEFORE_FREE}
        # All rules kept, but for the mutation test and --unsafe.
        self.k = k = KernelState(policy, shootdown, policy.frames or frames, clock,
                                 Rules(broken))
        self.tables = Tables(k)
        self.flusher = Flusher(k)
        self.sharing = Sharing(k, self.tables, self.flusher)
        self.reclaimer = Reclaimer(k, self.tables, self.flusher)
        self.faults = Faults(k, self.tables, self.flusher, self.sharing, self.reclaimer)
        self.zapper = Zapper(k, self.tables, self.flusher, self.sharing)

    # --- the state, for the service and tests ---------------------------------------------
    @property
    def shootdown(self) -> ShootdownPort:
        return self.k.port

    @shootdown.setter
    def shootdown(self, port: ShootdownPort) -> None:
        self.k.port = port

    @property
    def policy(self) -> Policy:
        return self.k.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.k.policy = policy

    rules = property(lambda self: self.k.rules)
    clock = property(lambda self: self.k.clock)
    frames = property(lambda self: self.k.frames)
    mms = property(lambda self: self.k.mms)
    oracle = property(lambda self: self.k.oracle)
    stats = property(lambda self: self.k.stats)
    lock_stats = property(lambda self: self.k.lock_stats)
    validator = property(lambda self: self.k.validator)
    cpu_mm = property(lambda self: self.k.cpu_mm)
    families = property(lambda self: self.k.families)
    lru = property(lambda self: self.k.lru)
    swap = property(lambda self: self.k.swap)
    low_watermark = property(lambda self: self.k.low_watermark)
    high_watermark = property(lambda self: self.k.high_watermark)

    @property
    def reserved_frames(self) -> int:
        """Frames the machine holds for itself (the zero page): in use with no mm."""
        return 1 if self.k.zero_pfn else 0

    def mm(self, mm_id: int) -> Mm:
        """A live mm (NOT_FOUND, or FAILED_PRECONDITION once it exited)."""
        return self.k.mm(mm_id)

    # --- processes and CPUs ----------------------------------------------------------------
    def create_mm(self, family: int | None = None) -> int:
        """A new mm; a forked child joins its parent's family (the pages' reverse map)."""
        k = self.k
        mm_id = next(k.mm_ids)
        mm = k.mms[mm_id] = Mm(mm_id, self.tables.alloc_pgd())
        mm.family = mm_id if family is None else family
        k.families.setdefault(mm.family, set()).add(mm_id)
        return mm_id

    def switch_mm(self, cpu: int, mm_id: int) -> int:
        """switch_mm_irqs_off (x86, ≈ v6.18): set the CPU's bit in the new mm's mask
        *before* reading its tlb_gen. The old mm's bit is not cleared (mm_cpumask is
        updated lazily, since 6.13): the CPU stays a member until a flush finds it no
        longer runs the mm (flush.py). Going idle with lazy TLB keeps the old mm loaded:
        such a CPU is skipped by flushes that free no tables, and catches up when it
        runs the mm again, by generation."""
        k = self.k
        new = k.mm(mm_id) if mm_id else None
        prev = k.cpu_mm.get(cpu, 0)
        lazily = k.lazy_mm.pop(cpu, None)
        if new is None:
            k.cpu_mm[cpu] = 0
            kept = prev or lazily  # idle again: the mm it kept loaded stays loaded
            if kept and k.policy.lazy_tlb:
                k.lazy_mm[cpu] = kept
            return 0
        new.cpumask.add(cpu)
        k.cpu_mm[cpu] = mm_id
        return new.tlb_gen

    def take_local_flushes(self, cpu: int) -> list[FlushOrder]:
        """Flushes a CPU owes itself from reclaim it ran on another's behalf."""
        return self.k.pending_local.pop(cpu, [])

    # --- walks and faults -------------------------------------------------------------------
    def walk(self, cpu: int, mm_id: int, vpns: list[int]) -> list[Pte | None]:
        """The hardware walker for several pages at one instant: (pfn, writable, tid) or None."""
        return self.tables.hw_walk(self.k.running(cpu, mm_id), vpns)

    async def handle_miss(self, cpu: int, mm_id: int, vpn: int, write: bool,
                          vt: int | None = None) -> MissResult:
        if not 0 <= vpn < USER_VPN_END:
            raise OutOfRange(f"vpn {vpn:#x} is past the 47-bit user address space")
        return await self.faults.handle_miss(cpu, self.k.running(cpu, mm_id), vpn, write, vt)

    async def walk_and_fault(self, cpu: int, mm_id: int, vpns: list[int],
                             touches: Sequence[Touch]
                             ) -> tuple[list[Pte | None], list[tuple[int, bool]],
                                        list[MissResult], SimError | None]:
        """The CPU's read-ahead walk of `vpns` and, in the same call, the faults its
        window's `touches` will surely need (services/common/misses.py `batchable` on the
        PTEs read first, before any fault), run by `handle_misses`: (the PTEs, the batch,
        its answers, the error of the miss after them). Bad input changes nothing."""
        if len(touches) > MAX_MISS_BATCH:
            raise InvalidArgument(f"{len(touches)} touches in one window: at most "
                                  f"{MAX_MISS_BATCH}")
        ptes = self.walk(cpu, mm_id, vpns)
        walked = dict(zip(vpns, ptes))
        if any(page not in walked for page, _, _ in touches):
            raise InvalidArgument("a touch names a page the walk does not read")
        batch = batchable(touches, walked)
        if not batch:
            return ptes, [], [], None
        results, error = await self.handle_misses(cpu, mm_id, batch)
        return ptes, batch, results, error

    async def handle_misses(self, cpu: int, mm_id: int, misses: Sequence[tuple[int, bool]]
                            ) -> tuple[list[MissResult], SimError | None]:
        """Several misses of one CPU, (vpn, write) in access order, each exactly as
        `handle_miss` alone would run it (its own locks, its own accounting), one after
        another; the CPU takes each answer at its own miss, later than one at a time
        would, so nothing may run here that could revoke an earlier answer.

        Stops after a miss the CPU must act on before the next one, as it would have
        between two calls: a RETRY (it accesses that page again first), one that hands
        back flushes it owes itself, and a segv (the access may stop there; if not, the
        page's next touch faults again, and may come before the next page's); at a miss that
        raises, which is returned (the ones before it happened), not raised; and before
        a miss (not the first) that may revoke an earlier answer: one whose allocation
        may reclaim, or a write through a shared table (unshare). An answer whose PTE
        changed anyway by the end (another CPU's call) is marked overtaken: the CPU
        counts it and faults again, as if a flush had overtaken it. Bad input raises
        InvalidArgument before anything ran."""
        if len(misses) > MAX_MISS_BATCH:
            raise InvalidArgument(f"{len(misses)} misses in one batch: at most {MAX_MISS_BATCH}")
        seen: set[int] = set()
        for vpn, _ in misses:
            if not 0 <= vpn < USER_VPN_END:
                raise InvalidArgument(f"vpn {vpn:#x} is past the 47-bit user address space")
            if vpn in seen:
                raise InvalidArgument(f"vpn {vpn:#x} twice in one batch: a batch holds "
                                      "each page's first miss only")
            seen.add(vpn)
        results: list[MissResult] = []
        for vpn, write in misses:
            if results and self._may_revoke(mm_id, vpn, write):
                break
            try:
                r = await self.handle_miss(cpu, mm_id, vpn, write)
            except SimError as e:
                return self._still_current(mm_id, misses, results), e
            results.append(r)
            if r.outcome in ("retry", "segv", "prot") or r.local_flushes:
                break
        return self._still_current(mm_id, misses, results), None

    def _may_revoke(self, mm_id: int, vpn: int, write: bool) -> bool:
        """Could this miss's fault revoke a translation the batch already answered?"""
        k = self.k
        # An allocation at or below the low watermark reclaims (reclaim.py); the fault
        # may first take a frame for each missing table level.
        if k.frames.free_count <= k.low_watermark + TABLE_LEVELS:
            return True
        mm = k.mms.get(mm_id)
        table = walk(mm.pgd, vpn) if mm is not None and not mm.exited else None
        return bool(write and table is not None and table.share_count)

    def _still_current(self, mm_id: int, misses: Sequence[tuple[int, bool]],
                       results: list[MissResult]) -> list[MissResult]:
        """Mark overtaken each answer whose PTE no longer holds it."""
        mm = self.k.mms.get(mm_id)
        for (vpn, _), r in zip(misses, results):
            if r.outcome in FILLS and (mm is None or mm.exited or
                                       self.tables.hw_pte(mm, vpn) != (r.pfn, r.writable,
                                                                       r.tid)):
                r.overtaken = True
        return results

    # --- system calls ------------------------------------------------------------------------
    async def mmap(self, cpu: int, mm_id: int, pages: int, writable: bool,
                   populate: bool = False, vt: int | None = None,
                   address: int | None = None) -> SyscallResult:
        """`address`: MAP_FIXED_NOREPLACE — map exactly there, only into unmapped space
        (else ALREADY_EXISTS, changing nothing), so no mapping is replaced and nothing
        needs flushing; None: the kernel picks the place."""
        k = self.k
        mm = k.running(cpu, mm_id)
        if pages <= 0:
            raise InvalidArgument(f"mmap of {pages} pages: must be at least 1")
        if populate and pages > MAX_POPULATE_PAGES:
            raise OutOfRange(f"mmap of {pages} populated pages: at most {MAX_POPULATE_PAGES} "
                             "per call (populate more with several mmaps)")
        if populate and pages > k.frames.budget:
            raise OutOfRange(f"mmap of {pages} populated pages: the machine has "
                             f"{k.frames.budget} frames")
        if address is not None:
            fixed, _ = page_range(address, pages)
            if fixed < MMAP_MIN_VPN:  # mmap_min_addr: the NULL page and its neighbours
                raise InvalidArgument(f"mmap at {address:#x}: below mmap_min_addr "
                                      f"({MMAP_MIN_VPN << 12:#x})")
        ctx = k.ctx(vt)
        ctx.spend(k.policy.cost_model.syscall_ns)
        async with mm.mmap_lock.write(ctx) as mmap_lock:
            k.alive(mm)
            if address is None:
                start = mm.place(pages, USER_VPN_END - PTRS_PER_TABLE)
                if start is None:
                    raise OutOfRange(f"mmap of {pages} pages does not fit in the 47-bit "
                                     "user space")
            elif mm.overlaps(fixed, fixed + pages):
                raise AlreadyExists(f"mmap at {address:#x} of {pages} pages: the range "
                                    "overlaps a mapping (MAP_FIXED_NOREPLACE)")
            else:
                start = fixed
            mm.insert(Vma(start, start + pages, writable))
            if populate:
                await mmap_lock.downgrade(ctx)
                await self.faults.populate_range(ctx, cpu, mm, start, start + pages, writable)
        return SyscallResult(address=start << 12, local_flushes=self.take_local_flushes(cpu),
                             vt=ctx.vt)

    async def munmap(self, cpu: int, mm_id: int, address: int, pages: int, vt: int | None = None) -> SyscallResult:
        k = self.k
        start, end = page_range(address, pages)
        mm = k.running(cpu, mm_id)
        t0 = k.clock()
        ctx = k.ctx(vt)
        ctx.spend(k.policy.cost_model.syscall_ns)
        zap = self.flusher.zap(mm, "munmap", ctx)
        async with mm.mmap_lock.write(ctx) as mmap_lock:
            k.alive(mm)
            if mm.remove(start, end):
                # As Linux does, the VMA change needs the lock exclusive; the zap only
                # shared, so faults elsewhere in the mm go on while the shootdown waits.
                await mmap_lock.downgrade(ctx)
                await self.zapper.zap(ctx, cpu, mm, start, end, zap, free_tables=True)
        freed = zap.freed + self.flusher.release(zap.to_free, zap.tables)
        self.flusher.returned(mm, start, end, Revokes.ALL)
        latency = (k.clock() - t0) / 1e9
        k.stats.munmap_latency_s.append(latency)
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed, latency_s=latency,
                             local_flushes=zap.local, vt=ctx.vt)

    async def madvise_dontneed(self, cpu: int, mm_id: int, address: int,
                               pages: int, vt: int | None = None) -> SyscallResult:
        k = self.k
        start, end = page_range(address, pages)
        mm = k.running(cpu, mm_id)
        t0 = k.clock()
        ctx = k.ctx(vt)
        ctx.spend(k.policy.cost_model.syscall_ns)
        zap = self.flusher.zap(mm, "madvise", ctx)
        async with mm.mmap_lock.read(ctx):
            k.alive(mm)
            if not mm.covered(start, end):
                raise NotFound(f"madvise: [{address:#x}, +{pages} pages) is not fully mapped")
            await self.zapper.zap(ctx, cpu, mm, start, end, zap, free_tables=False)
        freed = zap.freed + self.flusher.release(zap.to_free, zap.tables)
        self.flusher.returned(mm, start, end, Revokes.ALL)
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed,
                             latency_s=(k.clock() - t0) / 1e9, local_flushes=zap.local,
                             vt=ctx.vt)

    async def mprotect(self, cpu: int, mm_id: int, address: int, pages: int,
                       writable: bool, vt: int | None = None) -> SyscallResult:
        k = self.k
        start, end = page_range(address, pages)
        mm = k.running(cpu, mm_id)
        t0 = k.clock()
        ctx = k.ctx(vt)
        ctx.spend(k.policy.cost_model.syscall_ns)
        zap = self.flusher.zap(mm, "mprotect", ctx, pages=1 << 62)  # no frees: one flush
        async with mm.mmap_lock.write(ctx):
            k.alive(mm)
            if not mm.covered(start, end):
                raise NotFound(f"mprotect: [{address:#x}, +{pages} pages) is not fully mapped")
            await self.sharing.unshare_range(ctx, cpu, mm, start, end, zap.local)
            for vma in mm.carve(start, end):
                vma.writable = writable
            mm.merge()
            if not writable:  # downgrade: existing writable translations must go
                await self.zapper.write_protect(ctx, cpu, mm, start, end, zap)
        if not writable:
            self.flusher.returned(mm, start, end, Revokes.WRITES)
        return SyscallResult(shootdowns=zap.shootdowns, latency_s=(k.clock() - t0) / 1e9,
                             local_flushes=zap.local, vt=ctx.vt)

    async def fork(self, cpu: int, mm_id: int, vt: int | None = None) -> SyscallResult:
        """fork: `copy` copies every PTE read-only for COW; `share` points the child's pmd
        entries at the parent's PTE tables and write-protects each table as a whole —
        O(tables), not O(pages). Either way it ends, as dup_mmap does, with a flush of
        the parent's whole mm (flush_tlb_mm), whatever it write-protected."""
        k = self.k
        parent = k.running(cpu, mm_id)
        t0 = k.clock()
        ctx = k.ctx(vt)
        ctx.spend(k.policy.cost_model.syscall_ns)
        zap = self.flusher.zap(parent, "fork", ctx, pages=1 << 62)
        async with parent.mmap_lock.write(ctx):
            k.alive(parent)
            child_id = self.create_mm(family=parent.family)
            child = k.mms[child_id]
            child.vmas = [Vma(v.start, v.end, v.writable) for v in parent.vmas]
            child.next_vpn = parent.next_vpn
            tables = self.tables.pte_tables(parent, 0, USER_VPN_END)
            if k.policy.shares_tables_at_fork:
                await self.sharing.share_tables(ctx, parent, child, tables, zap.gather)
            else:
                for table, vma in tables_of_vmas(tables, parent.vmas):
                    await self.sharing.copy_table(ctx, parent, child, table, vma, zap.gather)
            zap.gather.whole_mm()
            await self.flusher.flush(parent, cpu, zap, Rule.FORK_FLUSH)
        self.flusher.returned(parent, 0, USER_VPN_END, Revokes.WRITES)
        latency = (k.clock() - t0) / 1e9
        k.stats.fork_latency_s.append(latency)
        return SyscallResult(child_mm=child_id, shootdowns=zap.shootdowns, latency_s=latency,
                             local_flushes=zap.local, vt=ctx.vt)

    async def exit(self, cpu: int, mm_id: int, vt: int | None = None) -> SyscallResult:
        """exit_mmap: tear down everything with one full flush, then free. Shared tables
        are dropped, not cleared; the last sharer frees them (clear -> flush -> free).
        It runs once: a CPU of the mm that exits while another's exit holds the lock
        finds the mm gone and only goes idle."""
        k = self.k
        mm = k.running(cpu, mm_id)
        t0 = k.clock()
        ctx = k.ctx(vt)
        ctx.spend(k.policy.cost_model.syscall_ns)
        zap = self.flusher.zap(mm, "exit", ctx, fullmm=True)
        async with mm.mmap_lock.write(ctx):
            if mm.exited:
                k.cpu_mm[cpu] = 0
                return SyscallResult(vt=ctx.vt)
            mm.vmas = []
            await self.zapper.zap(ctx, cpu, mm, 0, USER_VPN_END, zap, free_tables=True,
                                  free_pgd=True)
            mm.exited = True
        k.families[mm.family].discard(mm.id)
        freed = zap.freed + self.flusher.release(zap.to_free, zap.tables)
        k.cpu_mm[cpu] = 0  # the exiting CPU goes idle on init_mm, lazy on nothing
        for c in [c for c, m in k.lazy_mm.items() if m == mm.id]:
            del k.lazy_mm[c]
        mm.cpumask.clear()
        return SyscallResult(shootdowns=zap.shootdowns, pages_freed=freed,
                             latency_s=(k.clock() - t0) / 1e9, local_flushes=zap.local,
                             vt=ctx.vt)

    # --- the oracle and the audit -------------------------------------------------------------
    def report_accesses(self, report: HitReport, mm: int = 0) -> int:
        return sum(self.judge_accesses(report, mm))

    def judge_accesses(self, report: HitReport, mm: int = 0) -> Iterator[int]:
        """A CPU's hit report judged in chunks (Oracle.judge), for a caller with an event
        loop: the stale counts. Raises InvalidArgument, judging nothing, on a bad report."""
        words, runs, counts = report.decode()
        return self.k.oracle.judge(words, runs, mm, counts)

    def audit(self, dumps: list[TlbDump]) -> tuple[int, list[str]]:
        return audit(self.k, dumps)
