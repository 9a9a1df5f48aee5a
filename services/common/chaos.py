"""Chaos: the faults tlbsim injects into itself on purpose (not page faults), what a CPU
does wrong under them, and the memory epoch.

A `ChaosPlan` is pure: the CPU service consults it on every flush delivery and every
call (services/cpu/service.py); the `Chaos` admin RPC replaces it. Process-level faults
(killing and restarting a service, stopping the broker) belong to whoever owns the
processes: services/launcher.py's LocalCluster.

The memory epoch: the memory service picks a new one when it starts and at every run
(Reset); every caller sends the epoch it knows as metadata, and a call from another
epoch fails with FAILED_PRECONDITION and MACHINE_LOST, so a memory restart (the
simulated machine is RAM: it is gone) is an error, never silently wrong numbers.
"""
from __future__ import annotations

import dataclasses
import random
import secrets
from typing import Iterable

from services.common.errors import REASON_MACHINE_LOST, REASON_RUN_RESET, \
    FailedPrecondition, InvalidArgument

MAX_ACK_DELAY_S = 60.0

# The fault kinds, with their designed outcome (README "Reliability and fault injection").
KINDS = {
    "kill-cpu": "SIGKILL a CPU's process and start it again at its address (a process "
                "of `up --cpus-per-process K`: all K CPUs in it): a shootdown waiting on "
                "it fences it at the deadline; it rejoins with an empty TLB",
    "delay-acks": "a CPU applies each flush at once but holds its ack past the deadline: "
                  "it is fenced, flushes its whole TLB and re-registers",
    "drop-flushes": "a CPU loses a fraction of flush deliveries before applying them: "
                    "the coordinator redelivers (a flush is idempotent by generation) "
                    "until the deadline, and fences only a CPU it never reached",
    "partition": "a CPU answers nothing and sends nothing (no heartbeats, no stream, no "
                 "memory calls) until healed: fenced at the deadline, its lease expires, "
                 "it flushes; healed, it re-registers",
    "restart-coordinator": "SIGKILL the coordinator and start it again at its address: "
                           "the memory service retries the shootdown (same id, same "
                           "deadline); targets the new coordinator does not know yet are "
                           "waited for until their lease must have expired, else fenced",
    "stop-broker": "stop the MQTT broker, then start it again: mqtt shootdowns go over "
                   "gRPC meanwhile; both sides reconnect",
    "restart-memory": "SIGKILL the memory service and start it again: the simulated "
                      "machine is lost (a new epoch); every call of the old run fails "
                      "with a clear error until a new run starts",
}
# Kinds that stay until healed (the CPU's plan cleared, the broker started again); the
# others are done when injected (a process killed and started again).
CPU_KINDS = ("delay-acks", "drop-flushes", "partition")
LASTING_KINDS = (*CPU_KINDS, "stop-broker")
# The soak's periodic faults: the kinds a running load survives (a memory restart ends it).
SOAK_KINDS = ("kill-cpu", "delay-acks", "drop-flushes", "partition", "restart-coordinator",
              "stop-broker")

EPOCH_KEY = "tlbsim-epoch"  # gRPC metadata: the memory epoch the caller's state belongs to
MACHINE_LOST = ("memory service restarted: the simulated machine was lost; start a new run "
                "(tlbsim load run ... resets the cluster)")


@dataclasses.dataclass
class ChaosPlan:
    """What a CPU does wrong, on purpose. The zero plan is a healthy CPU."""
    ack_delay_s: float = 0.0    # hold every flush ack this long (the flush applies at once)
    drop_fraction: float = 0.0  # lose this share of flush deliveries, before applying them
    partitioned: bool = False   # answer nothing, send nothing
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ack_delay_s <= MAX_ACK_DELAY_S:
            raise InvalidArgument(f"ack delay {self.ack_delay_s} s: must be in "
                                  f"[0, {MAX_ACK_DELAY_S:.0f}]")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise InvalidArgument(f"drop fraction {self.drop_fraction}: must be in [0, 1]")
        self._rng = random.Random(self.seed)

    @property
    def healthy(self) -> bool:
        return not (self.ack_delay_s or self.drop_fraction or self.partitioned)

    def drops(self) -> bool:
        """Is this delivery lost? Seeded: the same plan loses the same deliveries."""
        return self.drop_fraction > 0 and self._rng.random() < self.drop_fraction

    def describe(self) -> str:
        if self.healthy:
            return "healthy"
        parts = []
        if self.partitioned:
            parts.append("partitioned")
        if self.ack_delay_s:
            parts.append(f"acks delayed {self.ack_delay_s:g} s")
        if self.drop_fraction:
            parts.append(f"drops {self.drop_fraction:.0%} of flushes (seed {self.seed})")
        return ", ".join(parts)


@dataclasses.dataclass
class ChaosCounts:
    """What a CPU's chaos plans did, since the process started."""
    acks_delayed: int = 0
    deliveries_dropped: int = 0
    calls_refused: int = 0


# --- the memory epoch ---------------------------------------------------------------------
def new_boot() -> int:
    """This start of the memory service: the epoch's high 32 bits (a restart differs)."""
    return secrets.randbits(31) + 1


def epoch_of(boot: int, run: int) -> int:
    """high 32 bits: which start of the memory service; low 32 bits: its run counter."""
    return boot << 32 | run & 0xFFFFFFFF


def epoch_metadata(epoch: int) -> tuple[tuple[str, str], ...]:
    """The metadata a caller sends: none before it knows an epoch (a fresh process)."""
    return ((EPOCH_KEY, str(epoch)),) if epoch else ()


def check_epoch(current: int, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
    """A call from another epoch's state is refused. A caller that names none (a fresh
    process, a tool) holds no state of an old machine and passes."""
    for key, value in metadata or ():
        if key == EPOCH_KEY:
            try:
                sent = int(value)
            except ValueError:
                raise InvalidArgument(f"{EPOCH_KEY} metadata {value!r} is not a number") \
                    from None
            if sent != current:
                if sent >> 32 == current >> 32:  # same start of the service: a new run
                    raise FailedPrecondition(f"the cluster was reset by another run (epoch "
                                             f"{sent} -> {current}): this run's state is gone",
                                             REASON_RUN_RESET)
                raise FailedPrecondition(MACHINE_LOST, REASON_MACHINE_LOST)
            return

# A CPU's lease, heartbeats and how they scale with the cluster: services/common/liveness.py.
