"""The CPU's membership state machine (services/cpu/membership.py) driving a real
CpuCore, every transition on a fake clock; and the two halves together, the CPU and the
coordinator (services/coordinator/fencing.py), against the invariant under every order
of events hypothesis finds. Nothing sleeps."""
from array import array

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.common.errors import FailedPrecondition
from services.common.hits import HitReport
from services.common.liveness import Liveness
from services.coordinator.fencing import Fencing
from services.cpu.core import CpuCore
from services.cpu.membership import LEASE, FenceNotice, Membership
from services.cpu.tlb import Entry
from tests.unit.machine import make_machine

LIVENESS = Liveness(heartbeat_s=0.25, heartbeat_timeout_s=0.5, lease_s=1.5)
LEASE_NS = 1_500_000_000
PAGE = 4096


class NsClock:
    def __init__(self, step: int = 0):
        self.now, self.step = 1_000_000_000, step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


def member(clock=None) -> tuple[Membership, CpuCore, NsClock]:
    clock = clock or NsClock()
    core = CpuCore(0, 64, 4, clock=clock)
    return Membership(core, LIVENESS), core, clock


def fill(core: CpuCore, vpn: int) -> None:
    core.switch(1, 0)
    core.tlb.fill(1, vpn, Entry(vpn + 100, True, vpn + 1))


def test_an_unregistered_cpu_is_fenced_and_serves_nothing():
    m, core, _ = member()
    assert core.fenced and not m.registered
    with pytest.raises(FailedPrecondition, match="not registered with the coordinator"):
        core.require_runnable()


def test_registered_ok_unfences_and_the_lease_runs_from_the_send_time():
    m, core, clock = member()
    sent = clock.now
    clock.now += 300_000_000  # the answer took 0.3 s
    m.registered_ok(sent)
    assert not core.fenced and m.registered
    assert core.lease_until_ns == sent + LEASE_NS  # not from when the answer came


def test_a_coordinator_with_a_shorter_lease_gets_its_own():
    m, core, clock = member()
    m.registered_ok(clock.now, coordinator_lease_s=1.0)
    assert core.lease_until_ns == clock.now + 1_000_000_000


def test_heartbeat_ok_renews_from_its_send_time_and_never_shortens_the_lease():
    m, core, clock = member()
    m.registered_ok(clock.now)
    first = core.lease_until_ns
    assert not m.heartbeat_ok(clock.now + 250_000_000)
    assert core.lease_until_ns == first + 250_000_000
    assert not m.heartbeat_ok(clock.now)  # an older answer arriving late
    assert core.lease_until_ns == first + 250_000_000


def test_told_fenced_flushes_at_once_and_the_next_registration_claims_the_generation():
    m, core, clock = member()
    m.registered_ok(clock.now)
    fill(core, 5)
    m.told_fenced(FenceNotice(generation=(7 << 32) + 3, reason="deadline"))
    assert core.fenced and core.fence_reason == "deadline" and len(core.tlb) == 0
    assert m.flushed_through == (7 << 32) + 3
    with pytest.raises(FailedPrecondition, match="missed a shootdown deadline"):
        core.require_runnable()
    m.registered_ok(clock.now)
    assert not core.fenced


def test_the_lease_running_out_fences_with_reason_lease():
    m, core, clock = member()
    m.registered_ok(clock.now)
    fill(core, 5)
    assert not m.lease_check(core.lease_until_ns - 1)
    assert m.lease_check(core.lease_until_ns)
    assert core.fenced and core.fence_reason == LEASE and len(core.tlb) == 0
    assert m.fences == {LEASE: 1}
    assert not m.lease_check(core.lease_until_ns + 1)  # once


def test_a_heartbeat_answered_while_fenced_means_register_and_does_not_renew():
    m, core, clock = member()
    m.registered_ok(clock.now)
    until = core.lease_until_ns
    m.lease_check(until)
    assert m.heartbeat_ok(until + 1)  # register: only that unfences
    assert core.lease_until_ns == until and core.fenced


def test_not_registered_keeps_the_lease_and_the_tlb():
    m, core, clock = member()
    m.registered_ok(clock.now)
    fill(core, 5)
    m.not_registered()
    assert not m.registered and not core.fenced and len(core.tlb) == 1


def test_a_late_flush_fences_for_the_deadline():
    m, core, clock = member()
    m.registered_ok(clock.now)
    m.late_flush()
    assert core.fenced and core.fence_reason == "deadline"


async def test_lease_expiry_during_an_access_stops_it_before_the_lease_ends():
    machine = make_machine(1)
    mm = machine.kernel.create_mm()
    await machine.switch(0, mm)
    r = await machine.syscall(0, "mmap", 64, True)
    addrs = [r.address + i * PAGE for i in range(64)]
    old = machine.cpus[0]
    clock = NsClock(step=0)  # time stands still while the TLB fills
    core = machine.cpus[0] = CpuCore(0, 1536, 12, clock=clock)
    core.switch(mm, old.tlb.local_gen.get(mm, 0))
    m = Membership(core, Liveness(heartbeat_s=0.000_005, heartbeat_timeout_s=0.000_005,
                                  lease_s=0.000_02))  # 20 us: ~20 readings of the clock
    m.registered_ok(clock.now)
    await machine.access(0, addrs)
    core.take_hits()
    clock.step = 1_000  # now 1 us per reading

    async def miss(vpn, write, vt=None):
        return await machine.kernel.handle_miss(0, mm, vpn, write)

    with pytest.raises(FailedPrecondition, match="lease ran out"):
        await core.run_accesses(addrs * 4000, b"", miss)
    assert core.fenced and core.fence_reason == LEASE and len(core.tlb) == 0
    runs = array("q")
    runs.frombytes(core.take_hits()[1])
    assert runs and max(runs[1::3]) < core.lease_until_ns  # no run began past it


async def test_fence_during_a_batched_walk_fills_nothing():
    machine = make_machine(1)
    mm = machine.kernel.create_mm()
    await machine.switch(0, mm)
    r = await machine.syscall(0, "mmap", 8, True)
    addrs = [r.address + i * PAGE for i in range(8)]
    await machine.access(0, addrs)  # present PTEs
    core = machine.cpus[0]
    core.tlb.invalidate_all()
    m = Membership(core, LIVENESS)
    m.registered_ok(core.clock())

    async def walk(vpns):
        ptes = machine.kernel.walk(0, mm, vpns)
        m.told_fenced(FenceNotice(9, "deadline"))  # the heartbeat's answer, mid-walk
        return ptes

    async def miss(vpn, write, vt=None):  # the fence made the walk's answer stale: asked again
        return await machine.kernel.handle_miss(0, mm, vpn, write)

    with pytest.raises(FailedPrecondition, match="missed a shootdown deadline"):
        await core.run_accesses(addrs, b"", miss, walk)
    assert len(core.tlb) == 0 and core.take_hits() == HitReport()


class Protocol(RuleBasedStateMachine):
    """One CPU and the coordinator exchanging heartbeats and registrations whose answers
    are delayed, lost or reordered, with fences (missed shootdowns), lease timers, fills
    and a clock that moves. The invariant: once the coordinator counts a fence settled,
    the CPU serves nothing it held at the fence."""

    def __init__(self):
        super().__init__()
        self.clock_ns = 1_000_000_000
        self.fencing = Fencing(LIVENESS, lambda: self.clock_ns / 1e9, 5 << 32)
        self.core = CpuCore(0, 64, 4, clock=lambda: self.clock_ns)
        self.cpu = Membership(self.core, LIVENESS)
        self.core.switch(1, 0)
        self.in_flight: list[tuple[str, int, int]] = []  # (kind, sent_ns, claim)
        self.answers: list[tuple[str, int, object]] = []  # (kind, sent_ns, answer)
        self.fences: list[tuple[int, int]] = []  # (generation, fenced at ns)
        self.next_vpn = 0
        self.filled_at: dict[int, int] = {}  # vpn -> when it was filled
        self.fencing.register(0, "cpu0", 0)
        self.cpu.registered_ok(self.clock_ns)

    @rule(ms=st.integers(0, 2000))
    def time_passes(self, ms):
        self.clock_ns += ms * 1_000_000

    @rule(kind=st.sampled_from(["heartbeat", "register"]))
    def cpu_sends(self, kind):
        self.in_flight.append((kind, self.clock_ns, self.cpu.flushed_through))

    @precondition(lambda self: self.in_flight)
    @rule(i=st.integers(0, 3))
    def coordinator_answers(self, i):
        kind, sent, claim = self.in_flight.pop(i % len(self.in_flight))
        answer = self.fencing.heartbeat(0) if kind == "heartbeat" else \
            self.fencing.register(0, "cpu0", claim)
        self.answers.append((kind, sent, answer))

    @precondition(lambda self: self.answers)
    @rule(i=st.integers(0, 3), lost=st.booleans())
    def cpu_hears(self, i, lost):
        kind, sent, answer = self.answers.pop(i % len(self.answers))
        if lost:
            return
        if answer is None:
            self.cpu.not_registered()
        elif answer.fenced:
            self.cpu.told_fenced(FenceNotice(answer.generation, answer.reason))
        elif kind == "register":
            self.cpu.registered_ok(sent)
        else:
            self.cpu.heartbeat_ok(sent)

    @rule()
    def shootdown_missed(self):
        self.fences.append((self.fencing.fence(0), self.clock_ns))

    @rule()
    def lease_timer(self):
        self.cpu.lease_check(self.clock_ns)

    @rule()
    def fill(self):
        try:
            self.core._may_serve(1, self.clock_ns)
        except FailedPrecondition:
            return
        self.next_vpn += 1
        self.core.tlb.fill(1, self.next_vpn, Entry(1, True, self.next_vpn))
        self.filled_at[self.next_vpn] = self.clock_ns

    @invariant()
    def settled_fences_leave_nothing_servable(self):
        servable = not self.core.fenced and self.core.lease_until_ns is not None and \
            self.clock_ns < self.core.lease_until_ns
        if not servable:
            return
        held = [self.filled_at[vpn] for _, vpn, _ in self.core.tlb.entries()]
        for generation, at in self.fences:
            if self.fencing.settled(0, generation):
                assert all(t >= at for t in held), \
                    f"fence {generation} settled, yet an entry filled before it is servable"


TestProtocol = Protocol.TestCase
TestProtocol.settings = settings(max_examples=500, stateful_step_count=40, deadline=None)
