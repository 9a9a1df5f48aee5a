"""The load generator and fencing (issue 14; the papercuts issue's finding 6): a CPU that
is fenced, flushes and rejoins stays in the run — its call is made again once it is
back — and only one that does not come back in time leaves it; a lost machine is told
by the reason the memory service attaches, not by the wording of its message."""
import asyncio

import grpc
import pytest

from loadgen.runner import run
from loadgen.scenarios import Driver, Measurements, RunConfig
from services.common.chaos import MACHINE_LOST
from services.common.errors import REASON_MACHINE_LOST, FailedPrecondition
from services.common.policy import Policy
from services.common.server import reason_of, start_server
from services.memory.service import MemoryNode
from tests.harness import InProcessCluster
from tlbsim.v1 import common_pb2, coordinator_pb2, cpu_pb2

PAGE = 4096


async def fence(c: InProcessCluster, cpu: int) -> None:
    """The coordinator fences `cpu` (as for a missed deadline) and the CPU hears it."""
    coord = c.coordinator.node
    generation = coord.fencing.fence(cpu)
    c.cpus[cpu].node._told_fenced(generation, "deadline")


def hold_registration(c: InProcessCluster, cpu: int) -> asyncio.Event:
    """`cpu` cannot register until the returned event is set."""
    node = c.cpus[cpu].node
    real = node.coordinator.Register
    release = asyncio.Event()

    async def held(request, **kw):
        await release.wait()
        return await real(request, **kw)

    node.coordinator.Register = held
    return release


async def setup(c: InProcessCluster) -> tuple[Driver, list[int]]:
    await c.client.reset(Policy(), 2)
    d = Driver(c.client, Measurements())
    await d.new_process(c.client.cpus)
    r = await d.syscall(c.client.cpus[0], mmap=common_pb2.MmapArgs(pages=4, writable=True))
    return d, [r.address + i * PAGE for i in range(4)]


async def test_a_fenced_cpu_that_rejoins_stays_in_the_run():
    async with InProcessCluster(cpus=2) as c:
        d, pages = await setup(c)
        cpu1 = c.client.cpus[1]
        release = hold_registration(c, 1)
        await fence(c, 1)
        access = asyncio.ensure_future(d.access(cpu1, pages, write=True))
        while d.m.fenced_waits == 0:  # it found the CPU fenced and waits
            await asyncio.sleep(0.01)
        assert not access.done()
        release.set()  # it flushes, registers, runs
        r = await asyncio.wait_for(access, 30)
        assert r is not None and r.accesses == 4
        assert d.m.lost_cpus == set() and d.m.fenced_waits == 1
        # A system call on it goes through as well (it checks first: nothing ran twice).
        assert (await d.syscall(cpu1, mmap=common_pb2.MmapArgs(pages=1))).address


async def test_a_fenced_cpu_that_does_not_come_back_in_time_leaves_the_run():
    async with InProcessCluster(cpus=2) as c:
        d, pages = await setup(c)
        d.rejoin_s = 0.3
        hold_registration(c, 1)  # never released
        await fence(c, 1)
        assert await d.access(c.client.cpus[1], pages) is None
        assert d.m.lost_cpus == {1}


async def test_a_restarted_memory_service_ends_the_run_by_its_reason():
    async with InProcessCluster(cpus=2) as c:
        d, pages = await setup(c)
        where = c.memory.address
        await c.memory.stop(0)
        c.memory = await start_server(MemoryNode(c.coordinator.address), where)
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the CPU relays the reason
            await c.client.cpus[0].stub.Access(cpu_pb2.AccessRequest(addresses=pages))
        assert reason_of(e.value) == REASON_MACHINE_LOST
        with pytest.raises(FailedPrecondition, match="the simulated machine was lost"):
            await d.access(c.client.cpus[0], pages)


async def test_a_memory_service_down_then_back_ends_the_run_as_lost_not_unavailable():
    """While it is down a CPU's call fails UNAVAILABLE; the driver asks the memory
    service (waiting for it) and finds another machine: the documented error."""
    async with InProcessCluster(cpus=2) as c:
        d, pages = await setup(c)
        where = c.memory.address
        await c.memory.stop(0)

        async def restart_soon():
            await asyncio.sleep(0.5)
            c.memory = await start_server(MemoryNode(c.coordinator.address), where)

        restarting = asyncio.ensure_future(restart_soon())
        with pytest.raises(FailedPrecondition) as e:
            await d.syscall(c.client.cpus[0], mmap=common_pb2.MmapArgs(pages=1))
        await restarting
        assert e.value.message.endswith(MACHINE_LOST)


async def test_a_munmap_run_survives_a_cpu_fenced_mid_run():
    """delay-acks on cpu 3 for the first round: it is fenced at the deadline, flushes and
    rejoins; the run keeps it (no CPU left the run) and is safe."""
    async with InProcessCluster(cpus=4) as c:
        await c.client.reset(Policy(), 4)
        stub = c.client.cpus[3].stub
        await stub.Chaos(cpu_pb2.ChaosRequest(ack_delay_s=1.0))
        healed = []

        def progress(done: int) -> None:
            if done == 1 and not healed:
                healed.append(asyncio.ensure_future(stub.Chaos(cpu_pb2.ChaosRequest())))

        report = await run(c.client, RunConfig("munmap", Policy(deadline_s=0.3), cpus=4,
                                               pages=64, rounds=3), progress)
        r = report["results"]
        assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
        assert r["deadline_misses"] >= 1 and r["rounds"] == 3
        assert r["fenced_cpus"] == []  # it came back: nobody left the run
        coord = await c.client.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest())
        assert coord.fences_flushed >= 1  # the munmap waited for its flush
