"""The pure parts of fault injection: the fault plan, the memory epoch check, the soak's
fault schedule and verdict, durations."""
import pytest

from loadgen.cli.options import parse_duration
from loadgen.soak import ChaosSchedule, Tally, verdict
from services.common.chaos import (EPOCH_KEY, MACHINE_LOST, SOAK_KINDS, ChaosPlan,
                                   check_epoch, epoch_metadata, epoch_of)
from services.common.errors import FailedPrecondition, InvalidArgument


def test_the_zero_plan_is_healthy_and_bad_plans_are_refused():
    assert ChaosPlan().healthy and ChaosPlan().describe() == "healthy"
    assert not ChaosPlan(partitioned=True).healthy
    for bad in ({"drop_fraction": -0.1}, {"drop_fraction": 1.01}, {"ack_delay_s": -1},
                {"ack_delay_s": 61}):
        with pytest.raises(InvalidArgument):
            ChaosPlan(**bad)


def test_drops_are_seeded_and_near_their_fraction():
    p, q = ChaosPlan(drop_fraction=0.3, seed=5), ChaosPlan(drop_fraction=0.3, seed=5)
    first, second = [p.drops() for _ in range(2000)], [q.drops() for _ in range(2000)]
    assert first == second
    assert 500 < sum(first) < 700
    assert not any(ChaosPlan(drop_fraction=0.0).drops() for _ in range(100))
    assert all(ChaosPlan(drop_fraction=1.0).drops() for _ in range(100))


def test_epoch_check_refuses_another_machine_and_names_a_reset():
    boot, other = 7, 8
    check_epoch(epoch_of(boot, 3), [(EPOCH_KEY, str(epoch_of(boot, 3)))])
    check_epoch(epoch_of(boot, 3), [])            # a caller with no state passes
    check_epoch(epoch_of(boot, 3), epoch_metadata(0))
    with pytest.raises(FailedPrecondition) as lost:
        check_epoch(epoch_of(other, 1), epoch_metadata(epoch_of(boot, 3)))
    assert lost.value.message == MACHINE_LOST
    with pytest.raises(FailedPrecondition, match="reset by another run"):
        check_epoch(epoch_of(boot, 4), epoch_metadata(epoch_of(boot, 3)))
    with pytest.raises(InvalidArgument):
        check_epoch(1, [(EPOCH_KEY, "x")])


def test_the_schedule_brings_every_kind_once_per_cycle_reproducibly():
    s1, s2 = ChaosSchedule(list(SOAK_KINDS), [0, 1, 2, 3], 9), \
        ChaosSchedule(list(SOAK_KINDS), [0, 1, 2, 3], 9)
    first = [s1.next() for _ in range(2 * len(SOAK_KINDS))]
    assert first == [s2.next() for _ in range(2 * len(SOAK_KINDS))]
    n = len(SOAK_KINDS)
    assert sorted(k for k, _ in first[:n]) == sorted(SOAK_KINDS)
    assert sorted(k for k, _ in first[n:]) == sorted(SOAK_KINDS)
    assert {cpu for _, cpu in first} <= {0, 1, 2, 3}


def test_verdict_fails_on_each_kind_of_violation():
    assert verdict(Tally()) == []
    for field in ("stale_accesses", "audit_violations", "frames_freed_without_ack",
                  "hung_calls"):
        t = Tally()
        setattr(t, field, 1)
        assert verdict(t) == [f"{field}: 1"]
    t = Tally(violations=["cpu 2 did not rejoin"])
    assert verdict(t) == ["cpu 2 did not rejoin"]


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90
    assert parse_duration("10m") == 600 and parse_duration("1h") == 3600
    for bad in ("", "ten", "0s", "-5m", "9999h"):
        with pytest.raises(InvalidArgument):
            parse_duration(bad)
