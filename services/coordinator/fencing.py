"""The coordinator's half of fencing: which CPU is fenced, since which fence
generation, and when a fence is *settled* — the moment the memory service may free the
frames of the shootdown the CPU missed. Pure: an injected clock (seconds), no I/O.

The invariant: a fenced CPU never serves another translation from its old TLB, and the
frames of a shootdown it missed are not freed until it is known to have flushed, or to
be unable to execute (its lease ran out).

One CPU id's states (`Member`):

    unknown ──register(flushed_through=any)──────────► member        (a new CPU: empty TLB)
    unknown ──fence_absent()─────────────────────────► fenced(g)     (a restarted coordinator
                                                                      counted it fenced)
    member  ──fence(reason)──────────────────────────► fenced(g)     g: a new generation
    member  ──heartbeat()  → "ok"; renews the lease──► member
    member  ──register(any)────────────────────────── ► member        (renews the lease)
    fenced(g) ──fence(reason)────────────────────────► fenced(g)     (no fill since it learnt
                                                                      g: one flush covers both)
    fenced(g) ──heartbeat() → "fenced, flush through g"► fenced(g)   (no renewal)
    fenced(g) ──register(flushed_through ≠ g) → "flush through g first"► fenced(g)
    fenced(g) ──register(flushed_through = g)────────► member        (the only way out)

A CPU learns g only from an answer sent after the fence, flushes its whole TLB at that
moment and serves nothing until a registration is answered "ok"; so a registration that
names g proves the CPU holds nothing it held at the fence. Generations count up from a
base unique to this coordinator's start, so a claim made to an earlier coordinator never
matches. A process that restarted (a new address, flushed_through 0) is told to flush like
any other: it has nothing to flush and registers again at once.

`settled(cpu, g)`: it registered having flushed through g or later, or its lease ran out:
no answer "ok" (renewal) for lease + margin. The CPU's lease runs from the *send* time of
the request we answered, which is never later than our answer, so by our clock it has
expired by then.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable

from services.common.liveness import Liveness

DEADLINE = "deadline"        # it missed a shootdown deadline
COORDINATOR = "coordinator"  # a restarted coordinator counted it fenced while unknown


@dataclasses.dataclass
class Member:
    cpu: int
    address: str                # "" while only fence_absent() knows it
    renewed: float              # our last "ok" to it: its lease started no later
    generation: int = 0         # its latest fence (0: never fenced)
    flushed_through: int = 0    # the generation it proved it flushed through
    reason: str = ""            # why it was fenced last
    # Set when a registration clears the fence; a new one per fence.
    cleared: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def fenced(self) -> bool:
        return self.flushed_through != self.generation

    @property
    def registered(self) -> bool:
        return bool(self.address)


@dataclasses.dataclass(frozen=True)
class Answer:
    """What a registration or heartbeat is told."""
    fenced: bool          # register: flush everything first; heartbeat: you are fenced
    generation: int = 0   # ... through this fence generation
    reason: str = ""


OK = Answer(False)


class Fencing:
    def __init__(self, liveness: Liveness, clock: Callable[[], float], first_generation: int):
        self.liveness = liveness
        self.clock = clock
        self.started = clock()
        self.members: dict[int, Member] = {}
        self._generation = first_generation  # the last one handed out

    # --- what CPUs say ---------------------------------------------------------------
    def register(self, cpu: int, address: str, flushed_through: int) -> Answer:
        """A CPU (re)registers from `address`, having flushed its whole TLB through fence
        generation `flushed_through` (0: never told of one)."""
        now = self.clock()
        m = self.members.get(cpu)
        if m is None:
            self.members[cpu] = Member(cpu, address, renewed=now)
            return OK
        m.address = address
        if m.fenced:
            if flushed_through != m.generation:
                return Answer(True, m.generation, m.reason)
            m.flushed_through = m.generation
            m.cleared.set()
        m.renewed = now
        return OK

    def heartbeat(self, cpu: int) -> Answer | None:
        """None: not registered here (a restarted coordinator): it must register."""
        m = self.members.get(cpu)
        if m is None or not m.registered:
            return None
        if m.fenced:
            return Answer(True, m.generation, m.reason)
        m.renewed = self.clock()
        return OK

    # --- what shootdowns do ----------------------------------------------------------
    def fence(self, cpu: int, reason: str = DEADLINE) -> int:
        """It missed a shootdown: from now on it must flush before it executes again.
        Returns the generation the shootdown waits on (see `settled`)."""
        m = self.members[cpu]
        if not m.fenced:
            self._generation += 1
            m.generation, m.reason = self._generation, reason
            m.cleared = asyncio.Event()
        return m.generation

    def fence_absent(self, cpu: int) -> int:
        """A target we never heard from, counted fenced once its lease must have run out
        (it cannot have been renewed after we started): it flushes when it registers."""
        m = self.members.get(cpu)
        if m is None:
            m = self.members[cpu] = Member(cpu, "", renewed=self.started)
        return self.fence(cpu, COORDINATOR)

    def settled(self, cpu: int, generation: int) -> bool:
        m = self.members[cpu]
        return m.flushed_through >= generation or self.clock() >= self.lease_ends(cpu)

    def lease_ends(self, cpu: int) -> float:
        """When (our clock) the CPU can no longer be executing, however it was fenced."""
        return self.members[cpu].renewed + self.liveness.settle_s

    # --- views -------------------------------------------------------------------------
    def known(self, cpu: int) -> bool:
        m = self.members.get(cpu)
        return m is not None and m.registered

    def is_fenced(self, cpu: int) -> bool:
        m = self.members.get(cpu)
        return m is not None and m.fenced

    def fenced_cpus(self) -> list[int]:
        return [m.cpu for m in self.registered() if m.fenced]

    def registered(self) -> list[Member]:
        """Sorted by CPU. Also read from the metrics thread: one copy of the dict first."""
        return sorted((m for m in list(self.members.values()) if m.registered),
                      key=lambda m: m.cpu)
