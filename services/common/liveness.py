"""How often a CPU proves it is alive, how long its lease lasts, how long start-up may
take: derived from the cluster's size, each one configurable (README "Liveness at scale").

- The heartbeat interval grows with the cluster so the coordinator answers at most
  HEARTBEAT_BUDGET_PER_S heartbeats a second in total, however many CPUs there are
  (never more often than every MIN_HEARTBEAT_S per CPU).
- The heartbeat timeout is TIMEOUT_INTERVALS intervals: a coordinator busy with a
  fan-out (or starved of CPU by 64 processes on 2 cores) answers late, not never, and a
  heartbeat that times out is only followed by the next one (never a re-registration).
- The lease is LEASE_TIMEOUTS timeouts. A CPU sends its next heartbeat when the last was
  answered (at most one in flight) and no sooner than an interval after the last was
  sent, so while every answer comes within the timeout T the gap between two answered
  heartbeats' send times is at most max(interval, T), and the lease, renewed from the
  send time, outlasts it plus the next answer's T: it needs lease >= 2T; 3T leaves a
  whole timeout of slack. A CPU fences itself only when the coordinator has not
  answered for about a lease.
- The coordinator counts a fenced CPU it cannot reach as unable to execute once its
  lease has run out plus LEASE_MARGIN_S (the CPU checks its lease before every run of
  hits and every TLB fill, so the margin only covers clocks and the hop).
- Start-up: every process imports Python, gRPC and protobuf (about a CPU-second each
  on a loaded machine): READY_PER_PROCESS_S per CPU process, READY_PER_CPU_S per CPU
  (each registers on its own), on top of READY_BASE_S.

For 1-8 CPUs this gives 0.25 s / 0.5 s / 1.5 s (what the fixed constants were); 16 CPUs
0.5 / 1 / 3 s; 32 CPUs 1 / 2 / 6 s; 64 CPUs 2 / 4 / 12 s; 256 CPUs 8 / 16 / 48 s (the
coordinator's load is per heartbeat, whether the CPUs share processes or not).
"""
from __future__ import annotations

import dataclasses

from services.common.errors import InvalidArgument

HEARTBEAT_BUDGET_PER_S = 32.0
MIN_HEARTBEAT_S = 0.25
TIMEOUT_INTERVALS = 2.0
LEASE_TIMEOUTS = 3.0
LEASE_MARGIN_S = 1.0
READY_BASE_S = 30.0
READY_PER_PROCESS_S = 1.5
READY_PER_CPU_S = 0.1  # a co-hosted CPU: its server, registration and first heartbeat
MIN_REJOIN_S = 30.0  # a fenced CPU waited for by the load generator, at least


@dataclasses.dataclass(frozen=True)
class Liveness:
    heartbeat_s: float
    heartbeat_timeout_s: float
    lease_s: float
    lease_margin_s: float = LEASE_MARGIN_S

    def __post_init__(self) -> None:
        for name in ("heartbeat_s", "heartbeat_timeout_s", "lease_s"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise InvalidArgument(f"{name.replace('_s', '').replace('_', ' ')} "
                                      f"{value:g} s: must be in (0, 3600]")
        if self.lease_margin_s < 0:
            raise InvalidArgument("the lease margin must not be negative")
        if self.lease_s < self.heartbeat_s + self.heartbeat_timeout_s:
            raise InvalidArgument(
                f"lease {self.lease_s:g} s: must be at least the heartbeat interval plus "
                f"its timeout ({self.heartbeat_s + self.heartbeat_timeout_s:g} s), or a "
                "CPU fences itself between two heartbeats answered in time")

    @classmethod
    def for_cluster(cls, cpus: int, heartbeat_s: float | None = None,
                    heartbeat_timeout_s: float | None = None,
                    lease_s: float | None = None) -> "Liveness":
        """The derived values for `cpus` CPUs; one given explicitly also moves those
        derived from it (a longer interval, a longer timeout and lease)."""
        if cpus < 1:
            raise InvalidArgument(f"cluster size {cpus}: must be at least 1")
        h = heartbeat_s if heartbeat_s is not None else \
            max(MIN_HEARTBEAT_S, cpus / HEARTBEAT_BUDGET_PER_S)
        t = heartbeat_timeout_s if heartbeat_timeout_s is not None else TIMEOUT_INTERVALS * h
        lease = lease_s if lease_s is not None else LEASE_TIMEOUTS * t
        return cls(h, t, lease)

    @property
    def settle_s(self) -> float:
        """How long after its last unfenced answer a fenced CPU can no longer execute."""
        return self.lease_s + self.lease_margin_s

    @property
    def rejoin_s(self) -> float:
        """How long a fenced CPU that is alive may take to be back: it learns of the fence
        at its next heartbeat, flushes, registers; or its lease runs out first. Twice
        that, and never under MIN_REJOIN_S (a coordinator restart is in it too)."""
        return max(MIN_REJOIN_S, 2 * (self.settle_s + self.heartbeat_s
                                      + 2 * self.heartbeat_timeout_s))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def ready_timeout_s(cpus: int, processes: int | None = None) -> float:
    """How long `tlbsim up` waits for `cpus` CPUs in `processes` CPU processes (by
    default one each) and the rest to be ready."""
    return READY_BASE_S + READY_PER_PROCESS_S * (cpus if processes is None else processes) \
        + READY_PER_CPU_S * cpus
