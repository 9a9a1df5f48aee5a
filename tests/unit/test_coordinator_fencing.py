"""The coordinator's fencing state machine (services/coordinator/fencing.py), every
transition on a fake clock: nothing sleeps."""
import asyncio

import pytest

from services.common.liveness import Liveness
from services.coordinator.fencing import COORDINATOR, DEADLINE, Fencing

LIVENESS = Liveness(heartbeat_s=0.25, heartbeat_timeout_s=0.5, lease_s=1.5,
                    lease_margin_s=1.0)
BASE = 7 << 32


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fencing(base: int = BASE) -> tuple[Fencing, Clock]:
    clock = Clock()
    return Fencing(LIVENESS, clock, base), clock


def test_a_new_cpu_registers_unfenced_whatever_it_claims():
    f, _ = fencing()
    assert not f.register(1, "a:1", flushed_through=0).fenced
    assert not f.register(2, "a:2", flushed_through=(3 << 32) + 5).fenced  # another coordinator's
    assert f.known(1) and not f.is_fenced(1) and f.fenced_cpus() == []


def test_fence_hands_out_a_new_generation_from_this_coordinators_base():
    f, _ = fencing()
    f.register(1, "a:1", 0)
    f.register(2, "a:2", 0)
    g1, g2 = f.fence(1), f.fence(2)
    assert BASE < g1 < g2 and g1 >> 32 == BASE >> 32
    assert f.is_fenced(1) and f.fenced_cpus() == [1, 2]
    assert f.members[1].reason == DEADLINE


def test_a_fenced_cpu_fenced_again_keeps_its_generation():
    # It cannot have refilled since it learnt the first fence (it serves nothing until
    # a registration is answered "ok"), so one flush covers both shootdowns.
    f, _ = fencing()
    f.register(1, "a:1", 0)
    g = f.fence(1)
    assert f.fence(1) == g


def test_heartbeat_renews_a_member_and_tells_a_fenced_one_its_generation():
    f, clock = fencing()
    f.register(1, "a:1", 0)
    clock.now += 1.0
    assert not f.heartbeat(1).fenced
    assert f.lease_ends(1) == clock.now + LIVENESS.settle_s  # renewed
    g = f.fence(1)
    renewed = f.members[1].renewed
    clock.now += 1.0
    answer = f.heartbeat(1)
    assert answer.fenced and answer.generation == g and answer.reason == DEADLINE
    assert f.members[1].renewed == renewed  # no renewal while fenced


def test_heartbeat_from_an_unknown_cpu_says_register():
    f, _ = fencing()
    assert f.heartbeat(5) is None


def test_registering_without_the_flush_is_told_to_flush_first_and_stays_fenced():
    f, _ = fencing()
    f.register(1, "a:1", 0)
    g = f.fence(1)
    for claim in (0, g - 1, g + 1):
        answer = f.register(1, "a:1", claim)
        assert answer.fenced and answer.generation == g
    assert f.is_fenced(1) and not f.settled(1, g)
    assert not f.members[1].cleared.is_set()


def test_registering_having_flushed_through_the_generation_unfences_and_settles():
    f, clock = fencing()
    f.register(1, "a:1", 0)
    g = f.fence(1)
    clock.now += 0.1
    assert not f.register(1, "a:1", g).fenced
    assert not f.is_fenced(1) and f.settled(1, g)
    assert f.members[1].cleared.is_set()
    assert f.lease_ends(1) == clock.now + LIVENESS.settle_s  # the answer "ok" renewed it


def test_a_later_generation_flushed_also_settles_an_earlier_fence():
    f, _ = fencing()
    f.register(1, "a:1", 0)
    g1 = f.fence(1)
    f.register(1, "a:1", g1)  # unfenced
    g2 = f.fence(1)
    assert g2 > g1
    f.register(1, "a:1", g2)
    assert f.settled(1, g1) and f.settled(1, g2)


def test_an_unreachable_fenced_cpu_settles_when_its_lease_runs_out():
    f, clock = fencing()
    f.register(1, "a:1", 0)
    clock.now += 0.2
    f.heartbeat(1)  # the last renewal
    renewed = clock.now
    clock.now += 0.3
    g = f.fence(1)
    clock.now = renewed + LIVENESS.settle_s - 1e-6
    assert not f.settled(1, g)
    clock.now = renewed + LIVENESS.settle_s
    assert f.settled(1, g) and f.is_fenced(1)  # settled, still fenced: it must flush


def test_race_heartbeat_timeout_then_fence_then_reregister():
    """The hole of issue 14: the CPU's heartbeat times out (its answer "ok" was given
    but lost), the CPU is fenced meanwhile, and it registers again through its error
    path without having heard of the fence. It is told to flush first; the shootdown
    waits for that flush (or for the lease renewed by the lost answer), never for the
    bare re-registration."""
    f, clock = fencing()
    f.register(1, "a:1", 0)
    clock.now += 0.25
    assert not f.heartbeat(1).fenced  # answered; the answer is lost on the way
    answered = clock.now
    clock.now += 0.12
    g = f.fence(1)  # it missed a shootdown deadline
    clock.now += 0.05
    answer = f.register(1, "a:1", flushed_through=0)  # the error path: no flush
    assert answer.fenced and answer.generation == g and answer.reason == DEADLINE
    assert not f.settled(1, g)
    assert f.lease_ends(1) == answered + LIVENESS.settle_s  # not renewed by that
    assert not f.register(1, "a:1", flushed_through=g).fenced  # after its flush
    assert f.settled(1, g)


def test_a_restarted_process_at_a_new_address_is_told_to_flush_too():
    f, _ = fencing()
    f.register(3, "a:3", 0)
    g = f.fence(3)
    answer = f.register(3, "a:99", 0)  # a new process: nothing to flush, but it must say so
    assert answer.fenced and f.members[3].address == "a:99"
    assert not f.register(3, "a:99", g).fenced


def test_a_cpu_counted_fenced_while_unknown_flushes_at_registration():
    f, clock = fencing()
    clock.now += LIVENESS.settle_s  # the restarted coordinator waited out its lease
    g = f.fence_absent(4)
    assert f.members[4].reason == COORDINATOR
    assert f.settled(4, g)  # it cannot have been renewed since we started
    assert not f.known(4) and f.registered() == [] and f.heartbeat(4) is None
    old_claim = (BASE - (1 << 32)) + 9  # what it flushed through for the previous coordinator
    answer = f.register(4, "a:4", old_claim)
    assert answer.fenced and answer.generation == g and answer.reason == COORDINATOR
    assert not f.register(4, "a:4", g).fenced and f.known(4)


def test_generations_of_two_starts_never_match():
    before, _ = fencing(base=1 << 32)
    after, _ = fencing(base=2 << 32)
    for f in (before, after):
        f.register(1, "a:1", 0)
    claim = before.fence(1)
    g = after.fence(1)
    assert after.register(1, "a:1", claim).fenced  # flushed for the old one: not enough
    assert not after.register(1, "a:1", g).fenced


async def test_a_waiter_on_a_fence_wakes_when_the_flush_is_proved():
    f, _ = fencing()
    f.register(1, "a:1", 0)
    g = f.fence(1)
    waiter = asyncio.ensure_future(f.members[1].cleared.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    f.register(1, "a:1", 0)  # not proved: still waiting
    await asyncio.sleep(0)
    assert not waiter.done()
    f.register(1, "a:1", g)
    await asyncio.wait_for(waiter, 1)


@pytest.mark.parametrize("cpus,expect", [(1, (0.25, 0.5, 1.5)), (8, (0.25, 0.5, 1.5)),
                                         (16, (0.5, 1.0, 3.0)), (64, (2.0, 4.0, 12.0))])
def test_liveness_derived_from_the_cluster_size(cpus, expect):
    live = Liveness.for_cluster(cpus)
    assert (live.heartbeat_s, live.heartbeat_timeout_s, live.lease_s) == expect
    # The coordinator answers at most 32 heartbeats a second, however many CPUs.
    assert cpus / live.heartbeat_s <= 32
    assert live.lease_s >= 2 * live.heartbeat_timeout_s


def test_liveness_given_values_move_the_derived_ones_and_contradictions_are_refused():
    from services.common.errors import InvalidArgument
    live = Liveness.for_cluster(4, heartbeat_s=1.0)
    assert (live.heartbeat_timeout_s, live.lease_s) == (2.0, 6.0)
    with pytest.raises(InvalidArgument, match="lease 0.5 s: must be at least"):
        Liveness.for_cluster(4, lease_s=0.5)
    with pytest.raises(InvalidArgument, match="heartbeat 0 s"):
        Liveness.for_cluster(4, heartbeat_s=0)
