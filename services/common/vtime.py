"""Virtual time: the algebra of `--timing virtual` (DESIGN.md §7).

Every simulated CPU has a clock in ns; every event advances it by its cost-model
price. A shared resource (a lock, the cache line of an rwsem, the invalidation fabric)
is a FIFO server in virtual time: a request at t is granted at max(t, the moment the
resource is free) plus a hand-off, and the holder releases it at the virtual time its
critical section ends. The hand-off is the cache-line transfer a contended lock costs:
it grows with the number of requests already queued (a spinlock's waiters all pull the
line), which is what turns a lock's plateau into Lameter's collapse.

The load generator issues work in virtual-time order, one operation at a time, so every
resource sees its requests in (almost) request-time order and the figures do not depend
on the host's speed or load. A request that arrives earlier in virtual time than one
already granted (an operation that started later reached the resource sooner) is
granted after it: `inversions` counts those, the timing error of the serial order.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.costmodel import CostModel


@dataclasses.dataclass(frozen=True)
class Handoff:
    """What a grant costs: `free` when nobody held the resource, else `base` plus
    `per_waiter` for every request queued ahead (ns)."""
    free: float = 0.0
    base: float = 0.0
    per_waiter: float = 0.0

    def cost(self, contended: bool, waiters: int) -> float:
        return self.base + self.per_waiter * waiters if contended else self.free


NO_COST = Handoff()


class Server:
    """A mutex (or any one-at-a-time resource) in virtual time."""
    __slots__ = ("free_at", "_grants", "_last_request", "waits", "acquisitions", "contended",
                 "inversions")

    def __init__(self) -> None:
        self.free_at = 0              # when the holder releases (or the last one did)
        self._grants: list[int] = []  # recent grant times, sorted
        self._last_request = 0
        self.waits = 0                # ns requests waited in all (lock wait)
        self.acquisitions = 0
        self.contended = 0
        self.inversions = 0

    def acquire(self, at: int, handoff: Handoff = NO_COST) -> int:
        """Grant a request made at `at`; returns the grant time. The holder calls
        `release` at the virtual time its critical section ends."""
        self.acquisitions += 1
        if at < self._last_request:
            self.inversions += 1
        self._last_request = max(self._last_request, at)
        grants = self._grants
        del grants[:bisect.bisect_right(grants, at)]  # granted by `at`: not queued ahead
        waiters = len(grants)  # granted after `at`: requested earlier, still queued
        contended = self.free_at > at
        self.contended += contended
        grant = max(at, self.free_at) + round(handoff.cost(contended, waiters))
        self.waits += grant - at
        bisect.insort(grants, grant)
        self.free_at = grant
        return grant

    def release(self, at: int) -> None:
        self.free_at = max(self.free_at, at)


class RwServer:
    """A reader/writer lock (mmap_lock) in virtual time: readers share it but each takes
    and drops the rwsem's counter, one cache line (`line`); a writer waits for every
    reader granted before it to finish, and readers after it wait for it."""
    __slots__ = ("line", "readers_until", "writer", "writer_free_at")

    def __init__(self) -> None:
        self.line = Server()
        self.readers_until = 0   # the latest release of a reader
        self.writer = Server()
        self.writer_free_at = 0

    def read(self, at: int, handoff: Handoff = NO_COST) -> int:
        start = max(at, self.writer_free_at)
        grant = self.line.acquire(start, handoff)
        self.line.release(grant)  # the counter is held for the atomic only
        return grant

    def read_done(self, at: int) -> None:
        self.readers_until = max(self.readers_until, at)

    def write(self, at: int, handoff: Handoff = NO_COST) -> int:
        grant = self.writer.acquire(max(at, self.readers_until), handoff)
        self.writer_free_at = grant
        return grant

    def write_done(self, at: int) -> None:
        self.writer.release(at)
        self.writer_free_at = max(self.writer_free_at, at)


def serial_sends(start: int, targets: int, send_ns: float) -> list[int]:
    """The initiator of an IPI shootdown sends one IPI after another: target i's
    arrives at start + (i + 1) * send."""
    return [start + round((i + 1) * send_ns) for i in range(targets)]


def ipi_done(sends: list[int], handlers_done: list[int], ack_ns: float) -> int:
    """An IPI shootdown completes when the initiator has sent the last IPI and the last
    target's ack (its handler's end, plus the ack's trip) has reached it."""
    last_send = sends[-1] if sends else 0
    return max([last_send] + [round(d + ack_ns) for d in handlers_done])


def broadcast(fabric: Server, sent: int, pages: int, page_ns: float, full_ns: float,
              sync_ns: float, contention_ns: float) -> tuple[int, int]:
    """A hardware broadcast (INVLPGB + TLBSYNC, TLBI IS + DSB) through the invalidation
    fabric, one sender at a time: it waits for the broadcasts ahead of it, pays
    `contention_ns` per sender queued ahead (Arcangeli 2020: the broadcast's latency
    grows almost linearly with concurrent senders), invalidates on every CPU at once,
    and completes with the sync. Returns (when the targets are invalidated, done)."""
    grant = fabric.acquire(sent, Handoff(0.0, contention_ns, contention_ns))
    invalidated = grant + round(pages * page_ns if pages else full_ns)
    done = invalidated + round(sync_ns)
    fabric.release(done)
    return invalidated, done


@dataclasses.dataclass
class Interrupts:
    """A CPU's pending interrupts in virtual time: an IPI arriving at a moment the
    CPU's clock has not reached yet is taken when its execution gets there (the work
    it interrupts ends that much later); one arriving in its past is charged at once."""
    pending: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (at, ns)

    def take(self, now: int, arrival: int, cost: int) -> int:
        """Record an interrupt; returns the CPU's clock afterwards (later if it was
        already past `arrival`)."""
        if arrival >= now:
            bisect.insort(self.pending, (arrival, cost))
            return now
        return now + cost

    def run(self, end: int) -> int:
        """Work that ends at `end` on the CPU's clock: every interrupt arriving before
        it is taken during it, pushing the end later. Returns the real end."""
        while self.pending and self.pending[0][0] < end:
            end += self.pending.pop(0)[1]
        return end

    def idle_until(self, now: int) -> int:
        """The CPU sat idle up to `now`: interrupts before it were taken meanwhile."""
        while self.pending and self.pending[0][0] < now:
            self.pending.pop(0)
        return now


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One shootdown in virtual time: when it reaches each target, and how the
    initiator's wait ends."""
    arrivals: dict[int, int]
    sends: list[int]          # IPIs: when each was sent (empty for a broadcast)
    hardware_done: int | None  # a broadcast: done at its TLBSYNC, whatever the targets do
    ack_ns: float

    def done(self, handlers_done: list[int]) -> int:
        if self.hardware_done is not None:
            return self.hardware_done
        return ipi_done(self.sends, handlers_done, self.ack_ns)


def deliver(sent: int, targets: list[int], hardware: bool, pages: int, cm: "CostModel",
            fabric: Server) -> Delivery:
    """IPIs go out one after another in the targets' order (flush_tlb_multi's loop); a
    hardware broadcast reaches every target at once, through the shared fabric."""
    if hardware:
        at, done = broadcast(fabric, sent, pages, cm.broadcast_page_ns, cm.broadcast_full_ns,
                             cm.broadcast_sync_ns, cm.broadcast_contention_ns)
        return Delivery({c: at for c in targets}, [], done, cm.ack_ns)
    sends = serial_sends(sent, len(targets), cm.ipi_send_ns)
    return Delivery(dict(zip(targets, sends)), sends, None, cm.ack_ns)
