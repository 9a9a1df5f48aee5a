"""A whole cluster in one process, over real gRPC on port 0 (after grpclib's
ClientServer harness): coordinator, memory and CPUs, each its own server."""
from __future__ import annotations

import asyncio

from loadgen.cluster import Cluster
from services.common.liveness import Liveness
from services.common.server import RunningServer, start_server
from services.coordinator.service import CoordinatorNode
from services.cpu.service import CpuNode
from services.memory.service import MemoryNode

# For tests about something other than leases: the usual heartbeats, a lease that outlasts
# the test. The whole cluster shares one event loop here; on a loaded machine (load ~24 on
# 2 cores) it answers heartbeats later than the default 0.5 s timeout, and a CPU fencing
# itself at its 1.5 s lease is a second event the test did not ask for (issue 14): its
# retried calls then overlap the ones still in flight. Fencing tests keep the defaults.
STEADY = Liveness(heartbeat_s=0.25, heartbeat_timeout_s=0.5, lease_s=600.0)


class InProcessCluster:
    def __init__(self, cpus: int = 4, frames: int | None = None, mqtt_url: str | None = None,
                 liveness=None):
        self.ncpus = cpus
        self.liveness = liveness  # services.common.liveness.Liveness; None: the default
        self.mqtt_url = mqtt_url  # the coordinator and the CPUs use this broker
        self.frames = frames
        self.coordinator: RunningServer | None = None
        self.memory: RunningServer | None = None
        self.cpus: dict[int, RunningServer] = {}
        self.client: Cluster | None = None

    async def start_cpu(self, cpu: int, mqtt: bool = True) -> RunningServer:
        """mqtt=False: a CPU that never hears the broadcast (only gRPC reaches it)."""
        self.cpus[cpu] = await start_server(
            CpuNode(cpu, self.memory.address, self.coordinator.address,
                    mqtt_url=self.mqtt_url if mqtt else None, liveness=self.liveness))
        return self.cpus[cpu]

    async def stop_cpu(self, cpu: int, grace: float = 0) -> None:
        await self.cpus.pop(cpu).stop(grace)

    async def __aenter__(self) -> "InProcessCluster":
        self.coordinator = await start_server(CoordinatorNode(mqtt_url=self.mqtt_url,
                                                              liveness=self.liveness))
        self.memory = await start_server(MemoryNode(self.coordinator.address, self.frames))
        for i in range(self.ncpus):
            await self.start_cpu(i)
        self.client = Cluster(self.coordinator.address)
        await self.client.discover(self.ncpus)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        for server in [*self.cpus.values(), self.memory, self.coordinator]:
            await server.stop(0)
        await asyncio.sleep(0)


async def until(condition, what: str = "the condition", timeout: float = 30.0) -> None:
    """Wait for something the test caused to have happened (a counter moved, a state
    changed), looking every 10 ms: the test goes on at that event, not after a guess of
    how long it takes. `timeout` only bounds a failure."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        await asyncio.sleep(0.01)
