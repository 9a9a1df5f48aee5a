"""A client's view of a running cluster: stubs for every service, found through
the coordinator (or a `tlbsim up` state file), and the per-run reset."""
from __future__ import annotations

import asyncio
import dataclasses

import grpc

from services.common.chaos import epoch_metadata
from services.common.errors import FailedPrecondition, Unavailable
from services.common.liveness import Liveness
from services.common import wire
from services.common.policy import Policy
from services.common.server import channel
from tlbsim.v1 import (coordinator_pb2, coordinator_pb2_grpc, cpu_pb2_grpc, memory_pb2,
                       memory_pb2_grpc)

RPC_TIMEOUT_S = 60.0
SHORT_WAIT_S = 10.0  # for CPUs that are not registered at all (yet)


@dataclasses.dataclass
class Cpu:
    id: int
    stub: cpu_pb2_grpc.CpuServiceStub


class Cluster:
    def __init__(self, coordinator: str):
        self.coordinator_address = coordinator
        self._channels: list[grpc.aio.Channel] = []
        self.coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(self._open(coordinator))
        self._memory: memory_pb2_grpc.MemoryServiceStub | None = None
        self.cpus: list[Cpu] = []
        self.epoch = 0  # the memory epoch of the last reset: sent with calls to memory
        # The coordinator's heartbeat and lease settings (from its listing): how long a
        # fenced CPU may take to come back follows from them.
        self.liveness = Liveness.for_cluster(1)

    @property
    def memory(self) -> memory_pb2_grpc.MemoryServiceStub:
        """The memory service, found by `discover` (which every run starts with)."""
        if self._memory is None:
            raise FailedPrecondition("no memory service yet: discover the cluster first")
        return self._memory

    def meta(self) -> tuple[tuple[str, str], ...]:
        """Metadata for calls to the memory service about this run's machine."""
        return epoch_metadata(self.epoch)

    def _open(self, address: str) -> grpc.aio.Channel:
        ch = channel(address, own_connection=True)  # discover's fresh look is fresh
        self._channels.append(ch)
        return ch

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    async def __aenter__(self) -> "Cluster":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def listing(self) -> coordinator_pb2.ListCpusResponse:
        listing = await self.coordinator.ListCpus(coordinator_pb2.ListCpusRequest(), timeout=5,
                                                  wait_for_ready=True)
        if listing.HasField("liveness"):
            self.liveness = Liveness(**{f.name: v for f, v in listing.liveness.ListFields()})
        return listing

    async def discover(self, want_cpus: int, wait_s: float | None = None) -> list[Cpu]:
        """Wait until the memory service and `want_cpus` unfenced CPUs are registered (by
        default as long as a fenced CPU may take to rejoin: Liveness.rejoin_s)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            try:
                listing = await self.listing()
            except grpc.aio.AioRpcError as e:
                raise Unavailable(
                    f"cannot reach the coordinator at {self.coordinator_address}: "
                    f"{e.code().name}") from None
            ready = [c for c in listing.cpus if not c.fenced]
            if listing.memory_address and len(ready) >= want_cpus:
                break
            # Enough CPUs, some fenced: they come back. Too few: fail sooner.
            wait = wait_s if wait_s is not None else self.liveness.rejoin_s \
                if len(listing.cpus) >= want_cpus else SHORT_WAIT_S
            if loop.time() > started + wait:
                raise FailedPrecondition(
                    f"the cluster has {len(ready)} usable CPUs"
                    f"{'' if listing.memory_address else ' and no memory service'}; "
                    f"this run needs {want_cpus}")
            await asyncio.sleep(0.1)
        if self._memory is None:
            self._memory = memory_pb2_grpc.MemoryServiceStub(self._open(listing.memory_address))
        self.cpus = [Cpu(c.cpu, cpu_pb2_grpc.CpuServiceStub(self._open(c.address)))
                     for c in sorted(ready, key=lambda c: c.cpu)[:want_cpus]]
        return self.cpus

    async def reset(self, policy: Policy, cpus: int) -> int:
        """A clean machine under `policy`: returns the memory service's new epoch."""
        await self.discover(cpus)
        pb = wire.policy_to_proto(policy)
        reply = await self.memory.Reset(memory_pb2.MemoryResetRequest(policy=pb),
                                        timeout=RPC_TIMEOUT_S)
        self.epoch = reply.epoch
        # The coordinator hands the epoch to CPUs that (re)start during the run.
        await self.coordinator.Reset(coordinator_pb2.CoordinatorResetRequest(
            policy=pb, epoch=reply.epoch), timeout=RPC_TIMEOUT_S)
        reset = wire.cpu_reset_request(policy, reply.epoch)
        await asyncio.gather(*(c.stub.Reset(reset, timeout=RPC_TIMEOUT_S) for c in self.cpus))
        return reply.epoch
