"""Injecting the chaos faults of services/common/chaos.py into a running local cluster:
the CPU faults through each CPU's `Chaos` admin RPC, the process faults through the
launcher's LocalCluster (which owns the processes). `inject` and `heal` are the one
dispatch over the kinds, for `tlbsim chaos` and the soak alike."""
from __future__ import annotations

import asyncio
import dataclasses

import grpc

from services.common.cohost import format_ids
from services.common.chaos import CPU_KINDS, KINDS, LASTING_KINDS, ChaosPlan
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.server import channel
from services.launcher import LauncherError, LocalCluster
from tlbsim.v1 import cpu_pb2, cpu_pb2_grpc

RPC_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """How hard the CPU kinds hit (`tlbsim chaos --delay/--fraction/--seed`)."""
    ack_delay_s: float = 2.0     # delay-acks: past the default 1 s deadline
    drop_fraction: float = 0.5   # drop-flushes
    seed: int = 0                # drop-flushes: which deliveries are lost

    def plan(self, kind: str) -> ChaosPlan:
        """The CPU's plan for a CPU kind (validated here, before it is sent)."""
        return {"delay-acks": lambda: ChaosPlan(ack_delay_s=self.ack_delay_s),
                "drop-flushes": lambda: ChaosPlan(drop_fraction=self.drop_fraction,
                                                  seed=self.seed),
                "partition": lambda: ChaosPlan(partitioned=True)}[kind]()


def lasting(kind: str) -> bool:
    """Does the fault stay until healed (a CPU's plan, a stopped broker)?"""
    return kind in LASTING_KINDS


class Injector:
    """Faults for one local cluster. Process operations block (they wait for the new
    process to serve), so they run in a thread: the load goes on meanwhile."""

    def __init__(self, local: LocalCluster):
        self.local = local
        if local.info is None:
            raise FailedPrecondition("the cluster is not running")
        self.info = local.info

    def cpus(self) -> list[int]:
        return sorted(self.info.cpus)

    async def inject(self, kind: str, cpu: int | None = None,
                     settings: Settings = Settings()) -> str:
        """One fault of `kind` (services/common/chaos.py KINDS; `cpu` for the CPU kinds and
        kill-cpu); what it did, in words. A lasting kind stays until `heal`."""
        if kind not in KINDS:
            raise InvalidArgument(f"unknown chaos kind {kind!r}: choose from {', '.join(KINDS)}")
        if kind in (*CPU_KINDS, "kill-cpu"):
            if cpu is None:
                raise InvalidArgument(f"chaos {kind} needs --cpu N")
            self._cpu_address(cpu)  # a known CPU
        if kind in CPU_KINDS:
            await self.set_plan(cpu, settings.plan(kind))  # type: ignore[arg-type]
            return f"cpu {cpu}: {kind}"
        if kind == "stop-broker":
            await self.stop_broker()
            return "MQTT broker stopped"
        name = f"cpu{cpu}" if kind == "kill-cpu" else kind.split("-", 1)[1]
        what = name
        if kind == "kill-cpu":  # a CPU that shares its process dies with all of it
            together = self.local.cpus_killed(name)
            what = f"cpu {cpu}" if len(together) == 1 else \
                f"cpus {format_ids(together)} (cpu {cpu} shares one process with them)"
        took = await self.restart(name)
        lost = " (the simulated machine is lost: start a new run)" if name == "memory" else ""
        return f"{what} killed and serving again after {took:.1f} s{lost}"

    async def heal(self, kind: str, cpu: int | None = None) -> None:
        """End a lasting fault: the CPU's plan cleared, the broker started again."""
        if kind in CPU_KINDS:
            await self.set_plan(cpu, ChaosPlan())  # type: ignore[arg-type]
        elif kind == "stop-broker":
            await self.start_broker()

    def _cpu_address(self, cpu: int) -> str:
        address = self.info.cpus.get(cpu)
        if address is None:
            raise InvalidArgument(f"no cpu {cpu} in this cluster (cpus {self.cpus()})")
        return address

    async def set_plan(self, cpu: int, plan: ChaosPlan) -> cpu_pb2.ChaosResponse:
        """Replace CPU `cpu`'s fault plan; ChaosPlan() heals it."""
        ch = channel(self._cpu_address(cpu))
        try:
            return await cpu_pb2_grpc.CpuServiceStub(ch).Chaos(
                cpu_pb2.ChaosRequest(**dataclasses.asdict(plan)), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(e.details()) from None
            raise FailedPrecondition(f"cpu {cpu}: chaos call failed: {e.code().name} "
                                     f"{e.details()}") from None
        finally:
            await ch.close()

    async def heal_all(self) -> None:
        await asyncio.gather(*(self.set_plan(c, ChaosPlan()) for c in self.cpus()))

    async def restart(self, name: str) -> float:
        """SIGKILL a service and start it again where it was; seconds it took."""
        try:
            return await asyncio.to_thread(self.local.restart, name)
        except LauncherError as e:
            raise FailedPrecondition(str(e)) from None

    async def stop_broker(self) -> None:
        if not self.info.mqtt:
            raise FailedPrecondition("this cluster has no MQTT broker (start it with "
                                     "`tlbsim up --mqtt`)")
        try:
            await asyncio.to_thread(self.local.kill, "mosquitto")
        except LauncherError as e:
            raise FailedPrecondition(str(e)) from None

    async def start_broker(self) -> float:
        if not self.info.mqtt:
            raise FailedPrecondition("this cluster has no MQTT broker")
        try:
            return await asyncio.to_thread(self.local.restart, "mosquitto", False)
        except LauncherError as e:
            raise FailedPrecondition(str(e)) from None
