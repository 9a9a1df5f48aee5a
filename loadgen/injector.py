"""Injecting the faults of services/common/chaos.py into a running local cluster: the CPU
faults through each CPU's `Chaos` admin RPC, the process faults through the launcher's
LocalCluster (which owns the processes). Used by `tlbsim chaos` and the soak."""
from __future__ import annotations

import asyncio
import dataclasses

import grpc

from services.common.chaos import FaultPlan  # validated here, before it is sent
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.server import channel
from services.launcher import LauncherError, LocalCluster
from tlbsim.v1 import cpu_pb2, cpu_pb2_grpc

RPC_TIMEOUT_S = 10.0
PROCESS = {"restart-coordinator": "coordinator", "restart-memory": "memory"}


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

    def _cpu_address(self, cpu: int) -> str:
        address = self.info.cpus.get(cpu)
        if address is None:
            raise InvalidArgument(f"no cpu {cpu} in this cluster (cpus {self.cpus()})")
        return address

    async def set_plan(self, cpu: int, plan: FaultPlan) -> cpu_pb2.ChaosResponse:
        """Replace CPU `cpu`'s fault plan; FaultPlan() heals it."""
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
        await asyncio.gather(*(self.set_plan(c, FaultPlan()) for c in self.cpus()))

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
