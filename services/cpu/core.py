"""One simulated CPU: its TLB, the mm it runs, and the access loop (no I/O).

TLB hits never leave the CPU; a miss calls the injected `miss` coroutine (the
memory service's walk/fault handler). Every hit, and every TLB fill, is recorded
for the oracle (services/common/hits.py) in runs of up to RUN_HITS hits served
without a pause, each run with CLOCK_MONOTONIC ns before its first access and after
its last: one clock read per run instead of one per hit, and one word per distinct
translation served in it instead of one per hit; a fill is a run of its own
(services/memory/oracle.py says why that stays safe).

Fencing and the lease (the invariant the coordinator relies on): a fenced CPU serves
no translation from its old TLB contents, and a CPU whose lease has run out serves
none at all. `run_accesses` checks both before every run of hits and before every
TLB fill, so an Access in flight when the CPU is fenced (by a missed deadline, by
its lease, or by the coordinator) stops at its next run or fill. A run of hits is
atomic: the CPU takes flushes and checks its lease only between runs, and the
oracle judges a run at its start (services/memory/oracle.py)."""
from __future__ import annotations

import dataclasses
import time
from itertools import repeat
from operator import rshift
from typing import Awaitable, Callable, Protocol, Sequence

from services.common.addresses import PAGE_SHIFT
from services.common.costmodel import DEFAULT_PRESET, CostModel, preset
from services.common.errors import FailedPrecondition
from services.common.hits import HitLog, HitReport
from services.common.misses import Pte, Touch, decisive
from services.common.vtime import Interrupts
from services.cpu.tlb import FULL, NOT_LOADED, RANGE, TLB_NR_DYN_ASIDS, Entry, Tlb


class Translation(Protocol):
    outcome: str
    pfn: int
    writable: bool
    tid: int
    local_flushes: list
    vt: int | None  # virtual time the memory service answered at (None: wall clock)
    overtaken: bool  # a batch's answer its PTE no longer holds: count it, fault again


class FlushLike(Protocol):
    """A flush as the CPU reads it: the wire's FlushRequest, or the kernel's FlushOrder."""
    @property
    def mm(self) -> int: ...
    @property
    def start_vpn(self) -> int: ...
    @property
    def pages(self) -> int: ...
    @property
    def new_tlb_gen(self) -> int: ...
    @property
    def mm_tlb_gen(self) -> int: ...
    @property
    def all_mms(self) -> bool: ...


# (vpn, write, the CPU's virtual time or None) -> the walk's or the fault's answer
MissHandler = Callable[[int, bool, "int | None"], Awaitable[Translation]]
Walker = Callable[[list[int]], Awaitable[list[Pte]]]
# The read-ahead walk that also faults the window's batchable misses in the same call:
# (distinct vpns, the window's touches) -> (their PTEs, read before any fault; the batch
# faulted, (vpn, write) in order; the answers, one per miss handled: fewer when it
# stopped early, an exception last when the miss after them raised). services/memory/
# kernel.py `walk_and_fault` and `handle_misses` say when a batch stops.
WalkMisses = Callable[[list[int], list[Touch]],
                      Awaitable["tuple[list[Pte], list[tuple[int, bool]], list[Translation | Exception]]"]]
Pause = Callable[[], Awaitable[None]]
WALK_AHEAD = 64  # pages read per walk request: one round trip serves the misses that follow
# With the faults in the same call (wall-clock time), the window reaches past repeated
# accesses for those pages: up to this many accesses (misses.py `decisive` sends only
# the ones the batch depends on, so its cost is the pages', not the accesses').
BATCH_REACH = 1024
FAULTED = {"anon", "cow", "swapin"}
SEGV = {"segv", "prot"}
RETRY = "retry"  # the fault found the PTE changed under it: nothing to fill, access again
# Accesses offered to the TLB at once: from FIRST_RUN after a miss, doubling while
# all hit, up to RUN_HITS (which bounds how far the oracle's time can be off): a
# run that stops early costs no more than the hits before it.
FIRST_RUN = 16
RUN_HITS = 4096
# A long Access gives the event loop a turn at least this often (ns of the core's
# clock), so heartbeats renew the lease and flushes are taken between runs.
PAUSE_EVERY_NS = 2_000_000
FENCE_REASONS = {
    "deadline": "it missed a shootdown deadline",
    "lease": "its lease ran out (no heartbeat answered in time)",
    "coordinator": "the coordinator fenced it",
    "unregistered": "it is not registered with the coordinator yet",
}


@dataclasses.dataclass
class VirtualCpu:
    """The CPU's side of virtual time (services/common/vtime.py): its clock, where the
    time went, and the interrupts it has yet to take."""
    clock: int = 0
    idle: int = 0           # jumped over, waiting for the next work
    handler: int = 0        # taking IPIs: the victim's cost of shootdowns
    interrupts_taken: int = 0
    late_flush_hits: int = 0  # accesses served from an entry after its flush's arrival
    interrupts: Interrupts = dataclasses.field(default_factory=Interrupts)
    # The last batch's runs of accesses: (first access's time, ns each, mm, vpns), so a
    # flush arriving in their virtual past can count the hits it came too late for.
    recent: list[tuple[int, float, int, list[int]]] = dataclasses.field(default_factory=list)

    @property
    def busy(self) -> int:
        return self.clock - self.idle

    def start(self, at: int | None) -> None:
        """Work for the CPU from virtual time `at` (its own clock if later)."""
        if at is not None and at > self.clock:
            taken = sum(cost for when, cost in self.interrupts.pending if when < at)
            self.idle += max(0, at - self.clock - taken)
            self.interrupts.idle_until(at)
            self.clock = at

    def mark(self) -> tuple:
        """What `rewind` restores: the clock and what `start` changes."""
        return self.clock, self.idle, list(self.interrupts.pending), self.interrupts_taken

    def rewind(self, mark: tuple) -> None:
        """Undo a `start` for work that was refused (bad input changes no state) — unless
        an interrupt was taken since: its handler ran on this timeline, and stays."""
        if self.interrupts_taken == mark[3]:
            self.clock, self.idle, self.interrupts.pending = mark[0], mark[1], mark[2]

    def advance(self, ns: float) -> None:
        """The CPU works `ns`; interrupts arriving meanwhile are taken during it."""
        self.clock = self.interrupts.run(self.clock + round(ns))

    def late_hits(self, mm: int, first_vpn: int, pages: int, arrival: int) -> int:
        """Accesses of the recent runs after `arrival` to pages a flush covers."""
        late = 0
        for first, each, run_mm, vpns in self.recent:
            if run_mm != mm or first + each * len(vpns) <= arrival:
                continue
            skip = 0 if each <= 0 or first > arrival else int((arrival - first) // each) + 1
            late += sum(1 for v in vpns[skip:]
                        if not pages or first_vpn <= v < first_vpn + pages)
        return late


@dataclasses.dataclass
class AccessStats:
    accesses: int = 0
    hits: int = 0
    misses: int = 0
    faults: int = 0
    segv: int = 0


def window(addresses: Sequence[int], start: int, batched: bool) -> tuple[list[int], list[int]]:
    """A read-ahead walk's window from `start` (the miss): its accesses' pages, and its
    distinct pages in order (WALK_AHEAD of them at most, what the walk reads). Batched,
    it reaches up to BATCH_REACH accesses for them; else WALK_AHEAD accesses."""
    pages = list(map(rshift, addresses[start:start + (BATCH_REACH if batched else WALK_AHEAD)],
                     repeat(PAGE_SHIFT)))
    ahead = list(dict.fromkeys(pages))
    if len(ahead) > WALK_AHEAD:  # end the window before the first page past them
        pages = pages[:pages.index(ahead[WALK_AHEAD])]
        del ahead[WALK_AHEAD:]
    return pages, ahead


class CpuCore:
    def __init__(self, cpu_id: int, tlb_entries: int, tlb_ways: int,
                 clock: Callable[[], int] = time.monotonic_ns, asids: int = TLB_NR_DYN_ASIDS):
        self.id = cpu_id
        self.clock = clock
        self.tlb = Tlb(tlb_entries, tlb_ways, asids)
        self.costs: CostModel = preset(DEFAULT_PRESET)  # what events cost in virtual time
        self.v = VirtualCpu()
        self.loaded_mm = 0
        self.lazy = False
        self.fenced = False
        self.fence_reason = ""
        # The lease, on `clock`: no translation is served at or after it. None: no
        # lease (a CPU that is not a cluster member, e.g. in domain tests).
        self.lease_until_ns: int | None = None
        self._hits = HitLog()  # what it served since its last report, for the oracle

    def reset(self, tlb_entries: int, tlb_ways: int, asids: int = TLB_NR_DYN_ASIDS,
              costs: CostModel | None = None) -> None:
        self.tlb = Tlb(tlb_entries, tlb_ways, asids)
        self.costs = costs or preset(DEFAULT_PRESET)
        self.v = VirtualCpu()
        self.loaded_mm = 0
        self.lazy = False
        self.take_hits()

    # --- scheduling ------------------------------------------------------------------
    def switch(self, mm: int, mm_gen: int, lazy: bool = False) -> bool:
        """Load `mm` (0 = idle). Returns True when the TLB had to flush to catch up."""
        if mm == 0:
            self.lazy = lazy
            if not lazy:
                self.loaded_mm = 0
            return False
        reload = mm != self.loaded_mm  # leaving lazy mode on the same mm keeps CR3
        self.loaded_mm = mm
        self.lazy = False
        return self.tlb.switch_to(mm, mm_gen, reload)

    def require_runnable(self) -> int:
        if not self.fenced and self.lease_until_ns is not None and \
                self.clock() >= self.lease_until_ns:
            self.fence("lease")
        if self.fenced:
            why = FENCE_REASONS.get(self.fence_reason, self.fence_reason or "it was fenced")
            raise FailedPrecondition(
                f"cpu {self.id} is fenced: {why}; it flushes its TLB and re-registers")
        if not self.loaded_mm or self.lazy:
            raise FailedPrecondition(f"cpu {self.id} runs no mm: switch_mm first")
        return self.loaded_mm

    def fence(self, reason: str = "deadline") -> None:
        """Nothing cached may be trusted any more: drop it all, and serve nothing until
        unfenced (after re-registering). `reason` is one of FENCE_REASONS."""
        if not self.fenced:
            self.fence_reason = reason
        self.fenced = True
        self.tlb.invalidate_all()

    def unfence(self) -> None:
        """Re-registered after flushing: the TLB is empty, execution may resume."""
        self.fenced = False
        self.fence_reason = ""

    # --- invalidation ------------------------------------------------------------------
    def apply_flush(self, f: FlushLike) -> tuple[str, int]:
        """flush_tlb_func (x86, ≈ v6.18). Reclaim's batched flush names no mm: the CPU
        flushes the mm it runs, whole. A lazy CPU switches to init_mm instead of
        flushing (a full flush when it comes back: its generation is behind). A CPU that
        no longer runs the mm flushes nothing: it leaves the mm's mask (the kernel clears
        the bit), and its entries wait for its next switch to the mm."""
        tlb = self.tlb
        if f.all_mms:
            if not self.loaded_mm or self.lazy:
                return self._not_loaded()
            gens = getattr(f, "mm_gens", None) or {}
            gen = gens.get(self.loaded_mm, tlb.mm_gen_seen.get(self.loaded_mm, 0))
            return FULL, tlb.flush_loaded(self.loaded_mm, gen)
        if f.mm != self.loaded_mm or self.lazy:
            tlb.announce_gen(f.mm, max(f.mm_tlb_gen, f.new_tlb_gen))
            return self._not_loaded()
        return tlb.apply_flush(f.mm, f.start_vpn, f.pages, f.new_tlb_gen, f.mm_tlb_gen)

    def take_flush(self, f: FlushLike, arrival: int | None,
                   hardware: bool = False) -> tuple[str, int, int | None]:
        """A flush from another CPU (an IPI), or a hardware broadcast's invalidation.
        In virtual time (`arrival` given) the IPI interrupts this CPU at `arrival`: the
        handler (receive, invalidations) runs on its timeline, now if its clock is past
        the arrival, else when its work gets there; a broadcast costs it nothing.
        Returns (outcome, entries removed, when the handler finished)."""
        outcome, removed = self.invalidate(f) if hardware else self.apply_flush(f)
        if arrival is None:
            return outcome, removed, None
        v, cm = self.v, self.costs
        if arrival < v.clock:  # served accesses in its virtual past that it now undoes
            v.late_flush_hits += v.late_hits(f.mm, f.start_vpn, f.pages, arrival)
        if hardware:
            return outcome, removed, arrival
        cost = round(cm.ipi_receive_ns + self._invalidation_ns(outcome, f.pages))
        v.clock = v.interrupts.take(v.clock, arrival, cost)
        v.handler += cost
        v.interrupts_taken += 1
        return outcome, removed, arrival + cost

    def local_flush(self, f: FlushLike, virtual: bool) -> tuple[str, int]:
        """The initiator's own invalidation, which it pays for in virtual time."""
        outcome, removed = self.apply_flush(f)
        if virtual:
            self.v.advance(self._invalidation_ns(outcome, f.pages))
        return outcome, removed

    def _invalidation_ns(self, outcome: str, pages: int) -> float:
        cm = self.costs
        if outcome == RANGE:
            return pages * cm.invlpg_ns
        return cm.full_flush_ns if outcome == FULL else 0.0

    def invalidate(self, f: FlushLike) -> tuple[str, int]:
        """A hardware broadcast (INVLPGB for a global ASID): the range, or the whole mm,
        is invalidated on this CPU by the hardware, whatever it runs; no generation rule
        (the ASID is the same everywhere, so the mm's generation is current here)."""
        tlb = self.tlb
        tlb.counters.flush_requests += 1
        # Counted apart from this CPU's own invlpg and full flushes: the initiator's
        # broadcast did the work (the cost model prices it there).
        tlb.counters.flush_hardware += 1
        tlb.flushes_applied += 1
        gen = tlb.announce_gen(f.mm, max(f.mm_tlb_gen, f.new_tlb_gen))
        if f.pages:
            removed = tlb.invalidate_range(f.mm, f.start_vpn, f.pages)
            outcome = RANGE
        else:
            removed = tlb.invalidate_mm(f.mm)
            outcome = FULL
        if tlb.local_gen.get(f.mm, 0) >= f.new_tlb_gen - 1:
            tlb.local_gen[f.mm] = gen
        return outcome, removed

    def _not_loaded(self) -> tuple[str, int]:
        self.tlb.counters.flush_requests += 1
        self.tlb.counters.flush_not_loaded += 1
        if self.lazy:  # switch_mm_irqs_off(NULL, &init_mm): the mm is no longer loaded
            self.lazy = False
            self.loaded_mm = 0
        return NOT_LOADED, 0

    # --- execution -------------------------------------------------------------------
    async def run_accesses(self, addresses: Sequence[int], writes: Sequence[int],
                           miss: MissHandler, walk: Walker | None = None,
                           stop_on_segv: bool = False,
                           pause: Pause | None = None, vt: int | None = None,
                           until: int | None = None,
                           misses: WalkMisses | None = None) -> AccessStats:
        """Execute accesses (user-space byte addresses) in order. A TLB miss is served
        from a batched walk of the pages ahead when possible (valid only while no flush
        reached this CPU since), else by the memory service's fault handler. With
        `misses` (wall-clock time only) in place of `walk`, the pages the walk finds
        absent, or read-only for the write that first touches them, are faulted in the
        same call, and each answer is taken at its own miss, exactly where `miss` would
        have been called (services/common/misses.py says which pages; a flush reaching
        the CPU since makes the answers overtaken, as it would a single fault's). `pause`
        gives the caller's event loop a turn every PAUSE_EVERY_NS (flushes and
        heartbeats are served then, between runs). Raises FailedPrecondition, with the
        hits served so far recorded, once the CPU is fenced or its lease runs out.

        In virtual time (`vt`: when the batch starts) each hit, walk and fault advances
        the CPU's clock, and the batch stops once the clock reaches `until` (the
        quantum: stats.accesses says how many ran)."""
        mm = self.require_runnable()
        stats = AccessStats()
        virtual = vt is not None
        v, hit_ns, walk_ns = self.v, self.costs.tlb_hit_ns, self.costs.walk_ns
        if virtual:
            v.start(vt)
            v.recent = []
            limit = until if until is not None else 1 << 62
        walked: dict[int, Pte] = {}
        walked_at = -1  # flushes_applied when `walked` was read
        # vpn -> (the batch's answer for its next miss, flushes_applied when asked)
        answered: dict[int, tuple[Translation | Exception, int]] = {}
        batch_misses = misses if not virtual else None  # virtual: each fault at its time
        tlb, log, clock = self.tlb, self._hits, self.clock
        i, n, span = 0, len(addresses), FIRST_RUN
        paused_ns = clock()
        while i < n:
            if virtual and i and v.clock >= limit:
                break
            stop = min(n, i + span)
            if virtual and hit_ns > 0:  # no run past the quantum
                stop = min(stop, i + max(1, int((limit - v.clock) / hit_ns) + 1))
            first_ns = clock()
            if pause is not None and first_ns - paused_ns >= PAUSE_EVERY_NS:
                await pause()
                first_ns = paused_ns = clock()
            self._may_serve(mm, first_ns)
            logged = len(log.words)
            j = tlb.hits_from(mm, addresses, writes, i, stop, log)  # TLB hits: no I/O
            if j > i:
                log.run(first_ns, clock(), logged)
                stats.hits += j - i
                stats.accesses += j - i
                if virtual:
                    v.recent.append((v.clock, hit_ns, mm,
                                     [a >> PAGE_SHIFT for a in addresses[i:j]]))
                    v.advance((j - i) * hit_ns)
                i = j
            if j == stop:
                span = min(2 * span, RUN_HITS)
                continue
            span = FIRST_RUN
            vpn = addresses[i] >> PAGE_SHIFT
            write = writes[i] if writes else 0
            stats.accesses += 1
            i += 1
            tlb.lookup(mm, vpn)  # not a usable hit: counted, and a dead slot dropped
            if virtual:
                v.advance(walk_ns)  # the page walk, in hardware
            answer = answered.pop(vpn, None)
            if walk is not None and answer is None:
                if walked_at != tlb.flushes_applied or vpn not in walked:
                    pages, ahead = window(addresses, i - 1, batch_misses is not None)
                    walked_at = tlb.flushes_applied
                    if batch_misses is None:
                        walked = dict(zip(ahead, await walk(ahead)))
                    else:
                        flags = writes[i - 1:i - 1 + len(pages)] if writes else b""
                        touches = self.touches(mm, vpn, pages, flags, answered)
                        ptes, batch, results = await batch_misses(ahead, touches)
                        walked = dict(zip(ahead, ptes))
                        answered.update((v, (r, walked_at))
                                        for (v, _), r in zip(batch, results))
                        answer = answered.pop(vpn, None)
                pte = walked[vpn]
                if answer is None and walked_at == tlb.flushes_applied and \
                        pte is not None and (not write or pte[1]):
                    stats.misses += 1
                    self._fill(mm, vpn, Entry(*pte), bool(write))
                    continue
            segv = await self._miss(mm, vpn, bool(write), miss, stats, virtual, answer)
            if segv and stop_on_segv:
                break
        return stats

    def touches(self, mm: int, vpn: int, pages: Sequence[int], writes: Sequence[int],
                answered: dict) -> list[Touch]:
        """The window's accesses that services/common/misses.py `batchable` acts on
        (`decisive`), as it reads them: (vpn, write, held), held when the TLB holds the
        page or an answer is pending."""
        holds = self.tlb.holds
        return [(page, write, page in answered or (page != vpn and holds(mm, page)))
                for page, write in decisive(pages, writes)]

    async def _miss(self, mm: int, vpn: int, write: bool, miss: MissHandler,
                    stats: AccessStats, virtual: bool = False,
                    answer: "tuple[Translation | Exception, int] | None" = None) -> bool:
        """Walk (and fault); fill the TLB unless a flush overtook the walk, then retry:
        on hardware the fill and the invalidation cannot pass each other. `answer`: the
        memory service's answer to this miss already (a batch), and flushes_applied when
        it was asked: taken as `miss` would have returned it."""
        v = self.v
        while True:
            stats.misses += 1
            if answer is not None:
                (got, before), answer = answer, None
                if isinstance(got, Exception):
                    raise got  # as the fault would have, alone
                t = got
            else:
                before = self.tlb.flushes_applied
                t = await miss(vpn, write, v.clock if virtual else None)
                if virtual and t.vt is not None and t.vt > v.clock:
                    v.advance(t.vt - v.clock)  # the fault's time, interrupts taken during it
            overtaken = self.tlb.flushes_applied != before or t.overtaken
            for f in t.local_flushes:
                self.local_flush(f, virtual)
            if t.outcome in FAULTED:
                stats.faults += 1
            if t.outcome in SEGV:
                stats.segv += 1
                return True
            self._may_serve(mm, self.clock())  # fenced while the fault was out? stop
            if not overtaken and t.outcome != RETRY:
                self._fill(mm, vpn, Entry(t.pfn, t.writable, t.tid), write)
                return False

    def _fill(self, mm: int, vpn: int, entry: Entry, write: bool) -> None:
        """Fill the TLB and serve the access from it: recorded for the oracle like a hit
        (a run of one), after checking the CPU may still serve anything — it may have
        been fenced while the walk or the fault was out."""
        now = self.clock()
        self._may_serve(mm, now)
        self.tlb.fill(mm, vpn, entry)
        self._hits.add((entry.tid << 1 | write,), now, now)

    def _may_serve(self, mm: int, now_ns: int) -> None:
        """Before a run of hits or a fill: still unfenced, within the lease, on `mm`."""
        if self.fenced or self.loaded_mm != mm or (
                self.lease_until_ns is not None and now_ns >= self.lease_until_ns):
            self.require_runnable()
            raise FailedPrecondition(f"cpu {self.id} switched mm during an access")

    def record_hits(self, words: Sequence[int], first_ns: int, last_ns: int) -> None:
        """Record one run of hits made outside `run_accesses` (tests drive the TLB directly)."""
        self._hits.add(words, first_ns, last_ns)

    def take_hits(self) -> HitReport:
        """What it served since the last call, for the oracle."""
        return self._hits.take()
