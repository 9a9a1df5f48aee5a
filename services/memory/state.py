"""What the memory domain's parts share: the machine's state, its counters, and the
values that cross the shootdown port and the service boundary.

Every collaborator (tables, flush, sharing, zap, faults, reclaim, audit) gets the
one `KernelState` and the collaborators below it; nothing here does an operation.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
from typing import Awaitable, Callable

from services.common.clock import Clock
from services.common.errors import FailedPrecondition, NotFound
from services.common.policy import Policy
from services.common.stats import COUNT_BUCKETS, Samples
from services.common.vtime import Handoff
from services.memory.frames import Frames
from services.memory.locks import LockStats, LockValidator, OpContext
from services.memory.mm import Mm
from services.memory.oracle import Oracle
from services.memory.lru import Lru, SwapSpace, watermarks
from services.memory.rules import Rules


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
    all_mms: bool = False  # reclaim's batched flush: each CPU flushes the mm it runs
    reason: str = "other"  # the operation that shot down (munmap, cow, reclaim, ...)
    # all_mms: the generation each mm whose PTEs it cleared reached (arch_tlbbatch_add_pending)
    mm_gens: dict[int, int] = dataclasses.field(default_factory=dict)
    sent_vt: int | None = None  # virtual time it was sent at (--timing virtual)
    hardware: bool = False      # a hardware broadcast (INVLPGB): no handler on the targets


@dataclasses.dataclass
class ShootdownResult:
    acked: list[int]
    fenced: list[int]
    done_vt: int | None = None  # virtual time the last target's ack arrived
    # Targets whose ack said they did not run the mm when the flush arrived (they left
    # it: flush_tlb_func's switch to init_mm, or the mask's trim). What a target did is
    # its own to say: the kernel's view of it may have moved on since.
    not_loaded: list[int] = dataclasses.field(default_factory=list)


# Delivers a shootdown to its targets; returns once every one acked or was fenced.
ShootdownPort = Callable[[FlushOrder, list[int]], Awaitable[ShootdownResult]]


@dataclasses.dataclass
class MissResult:
    outcome: str        # walked | anon | cow | swapin | prot | segv | retry (nothing to fill)
    pfn: int = 0
    writable: bool = False
    tid: int = 0
    local_flushes: list[FlushOrder] = dataclasses.field(default_factory=list)
    vt: int | None = None  # virtual time the fault returned at
    overtaken: bool = False  # a batch's answer no longer current (kernel.handle_misses)


@dataclasses.dataclass
class SyscallResult:
    address: int = 0
    child_mm: int = 0
    shootdowns: int = 0
    pages_freed: int = 0
    latency_s: float = 0.0
    local_flushes: list[FlushOrder] = dataclasses.field(default_factory=list)
    vt: int | None = None  # virtual time the call returned at


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
    swap_ins: int = 0             # swap entries a fault replaced with a page (do_swap_page)
    swap_reads: int = 0           # of those, pages read from swap (not in the swap cache)
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
    zero_page_maps: int = 0       # read faults that mapped the shared zero page
    broadcasts: int = 0           # shootdowns sent as hardware broadcasts (no IPIs)
    broadcast_full: int = 0       # of those, full flushes of the mm
    broadcast_pages: int = 0      # pages the ranged ones named (one INVLPGB each)
    # --timing virtual: each shootdown's virtual latency, sent to the last ack (ns).
    shootdown_vt_ns: Samples = dataclasses.field(default_factory=Samples)


class KernelState:
    """The simulated machine's memory: frames, mms, the oracle, counters, and what is
    in flight."""

    def __init__(self, policy: Policy, port: ShootdownPort, frames: int, clock: Clock,
                 rules: Rules):
        self.policy = policy
        self.port = port
        self.clock = clock
        self.rules = rules
        self.frames = Frames(frames)
        # The shared zero page (my_zero_pfn): a frame pinned for the machine's life that
        # read faults map read-only; 0 with --zero-page off.
        self.zero_pfn = self.frames.alloc() if policy.zero_page else 0
        self.mms: dict[int, Mm] = {}
        self.oracle = Oracle()
        self.lock_stats = LockStats()
        self.validator = LockValidator()
        self.stats = KernelStats()
        self.cpu_mm: dict[int, int] = {}       # cpu -> the mm it runs (0 = idle)
        self.lazy_mm: dict[int, int] = {}      # idle cpu -> the mm it keeps loaded (lazy TLB)
        self.families: dict[int, set[int]] = {}  # fork families: where a page's rmap looks
        self.lru = Lru()
        self.swap = SwapSpace()
        self.low_watermark, self.high_watermark = watermarks(frames)
        self.reclaiming = asyncio.Lock()  # one reclaimer at a time; not a page-table lock
        # Flushes a CPU owes itself from reclaim it ran on another's behalf.
        self.pending_local: dict[int, list[FlushOrder]] = {}
        # Frames whose covering shootdown has not completed, by pfn (a count: one frame
        # may be in two flushes at once, e.g. a page table and a reclaim batch).
        self.unflushed: collections.Counter = collections.Counter()
        # Rule.CLEAR_BEFORE_FLUSH broken: (table uid, slot) -> (pte, tid, writable) of
        # PTEs cleared whose clearing the hardware walker does not see before the flush.
        self.ghosts: dict[tuple[int, int], tuple[int, int, bool]] = {}
        self.mm_ids = itertools.count(1)
        self.table_uids = itertools.count(1)
        self.shootdown_ids = itertools.count(1)

    def ctx(self, vt: int | None = None) -> OpContext:
        """The locks of one operation, checked against the lock order; `vt`: the
        operation's virtual start (None: wall-clock time)."""
        cm = self.policy.cost_model
        return OpContext(self.validator, self.lock_stats, self.clock, vt,
                         Handoff(cm.lock_ns, cm.lock_handoff_ns, cm.lock_handoff_waiter_ns),
                         Handoff(cm.rwsem_ns, cm.lock_handoff_ns, cm.rwsem_handoff_waiter_ns))

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

    @staticmethod
    def alive(mm: Mm) -> Mm:
        """After waiting for mmap_lock: the mm may have exited meanwhile (another CPU's
        exit got the lock first; exit_mmap runs once)."""
        if mm.exited:
            raise FailedPrecondition(f"mm {mm.id} has exited")
        return mm

    def runs(self, cpu: int, mm: Mm) -> bool:
        return self.cpu_mm.get(cpu, 0) == mm.id

    def is_lazy(self, cpu: int, mm: Mm | None = None) -> bool:
        """Idle with `mm` (or any mm) still loaded: lazy TLB."""
        lazy = self.lazy_mm.get(cpu, 0)
        return bool(lazy) and not self.cpu_mm.get(cpu, 0) and (mm is None or lazy == mm.id)
