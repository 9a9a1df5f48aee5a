"""The CPU faults of services/common/chaos.py, each with its designed outcome, over real
gRPC in one process: the oracle stays at 0 throughout, no frame is freed before its
shootdown completed, and every CPU rejoins."""
import asyncio

import pytest

from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common.policy import Policy
from tests.harness import STEADY, InProcessCluster, until
from tlbsim.v1 import coordinator_pb2, cpu_pb2, memory_pb2


async def chaos(c: InProcessCluster, cpu: int, **plan) -> cpu_pb2.ChaosResponse:
    stub = next(x.stub for x in c.client.cpus if x.id == cpu)
    return await stub.Chaos(cpu_pb2.ChaosRequest(**plan), timeout=10)


async def rejoined(c: InProcessCluster, cpu: int, timeout: float = 10.0) -> cpu_pb2.DumpTlbResponse:
    """Wait until the CPU is registered and unfenced; its TLB dump then."""
    for _ in range(int(timeout / 0.05)):
        listing = await c.client.coordinator.ListCpus(coordinator_pb2.ListCpusRequest())
        if [x.fenced for x in listing.cpus if x.cpu == cpu] == [False]:
            dump = await c.cpus[cpu].node.DumpTlb(cpu_pb2.DumpTlbRequest(), None)
            if not dump.fenced:
                return dump
        await asyncio.sleep(0.05)
    raise AssertionError(f"cpu {cpu} did not rejoin within {timeout} s")


async def memory_stats(c: InProcessCluster) -> memory_pb2.MemoryStats:
    return await c.client.memory.Stats(memory_pb2.MemoryStatsRequest())


def safe(r: dict) -> None:
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0


async def test_delayed_acks_fence_the_cpu_which_rejoins_flushed():
    async with InProcessCluster(cpus=4) as c:
        await c.client.reset(Policy(), 4)
        await chaos(c, 3, ack_delay_s=1.0)  # past the 0.3 s deadline
        cfg = RunConfig("munmap", Policy(deadline_s=0.3), cpus=4, pages=64, rounds=2)
        r = (await run(c.client, cfg))["results"]
        safe(r)
        assert r["deadline_misses"] >= 1  # fenced (and back by the end: it re-registered)
        assert r["pages_freed"] == 2 * 64  # freed once it was fenced
        assert (await memory_stats(c)).frames_freed_without_ack == 0
        counts = await chaos(c, 3)  # heal
        assert counts.acks_delayed >= 1
        dump = await rejoined(c, 3)
        assert list(dump.entries) == []  # it flushed everything before re-registering


@pytest.mark.parametrize("transport", ["grpc", "stream"])
async def test_dropped_flushes_are_redelivered_not_fenced(transport):
    # STEADY: no CPU may fence itself on a late heartbeat here; only the drops are tested.
    async with InProcessCluster(cpus=4, liveness=STEADY) as c:
        await c.client.reset(Policy(), 4)
        await chaos(c, 2, drop_fraction=0.5, seed=7)
        cfg = RunConfig("munmap", Policy(deadline_s=5.0, transport=transport), cpus=4,
                        pages=64, rounds=4)
        report = await run(c.client, cfg)
        r = report["results"]
        counts = await chaos(c, 2)
        coord = await c.client.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest())
        safe(r)
        assert counts.deliveries_dropped >= 1 and coord.redeliveries >= 1
        assert r["deadline_misses"] == 0 and r["fenced_cpus"] == []  # reached in the end
        assert r["ipis"] == 4 * 3 and r["pages_freed"] == 4 * 64


async def test_a_cpu_that_loses_every_flush_is_fenced():
    async with InProcessCluster(cpus=2) as c:
        await c.client.reset(Policy(), 2)
        await chaos(c, 1, drop_fraction=1.0)
        cfg = RunConfig("munmap", Policy(deadline_s=0.3), cpus=2, pages=32, rounds=1)
        r = (await run(c.client, cfg))["results"]
        safe(r)
        assert r["deadline_misses"] == 1
        await chaos(c, 1)
        assert list((await rejoined(c, 1)).entries) == []


async def test_partitioned_cpu_is_fenced_its_lease_expires_and_it_rejoins():
    async with InProcessCluster(cpus=4) as c:
        await c.client.reset(Policy(), 4)
        cfg = RunConfig("munmap", Policy(deadline_s=0.3), cpus=4, pages=64, rounds=3)
        partitioned = asyncio.Event()

        def progress(done: int) -> None:
            if done == 1 and not partitioned.is_set():
                partitioned.set()
                asyncio.get_running_loop().create_task(chaos(c, 1, partitioned=True))

        r = (await run(c.client, cfg, progress))["results"]
        safe(r)
        assert 1 in r["fenced_cpus"] and r["deadline_misses"] >= 1
        assert r["pages_freed"] == 3 * 64
        await asyncio.sleep(2.0)  # past the lease: the CPU has fenced itself
        assert c.cpus[1].node.core.fenced
        counts = await chaos(c, 1)  # heal
        assert counts.calls_refused >= 1
        assert list((await rejoined(c, 1)).entries) == []
        again = await run(c.client, RunConfig("munmap", Policy(), cpus=4, pages=64, rounds=1))
        safe(again["results"])
        assert again["results"]["fenced_cpus"] == [] and again["results"]["ipis"] == 3


async def test_bad_chaos_plans_are_invalid_argument_and_change_nothing():
    import grpc
    async with InProcessCluster(cpus=1) as c:
        for plan in ({"drop_fraction": 1.5}, {"ack_delay_s": -1}, {"ack_delay_s": 1e9}):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await chaos(c, 0, **plan)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.cpus[0].node.plan.healthy


@pytest.mark.parametrize("unsafe,early", [("none", False), ("free-before-flush", True)])
async def test_frames_freed_without_ack_count_the_unsafe_order(unsafe, early):
    async with InProcessCluster(cpus=4) as c:
        cfg = RunConfig("munmap", Policy(unsafe=unsafe, deadline_s=10), cpus=4, pages=64,
                        rounds=3)
        await run(c.client, cfg)
        freed_early = (await memory_stats(c)).frames_freed_without_ack
        assert (freed_early > 0) is early
        if early:
            assert freed_early >= 3 * 64  # every data page of every munmap


async def test_coordinator_restart_mid_shootdown_retries_and_waits_for_the_targets():
    """The shootdown is in flight (a CPU holds its ack) when the coordinator dies. The
    memory service sends it again; the new coordinator knows no CPU and waits for the
    targets to register before it counts them; the frames are freed after that.

    Each step waits for the event the story needs, not for a time: the ack is held until
    the coordinator is gone (the longest delay there is), and the leases (STEADY) outlast
    the test, so the new coordinator waits for cpu 1 until the test heals it."""
    from services.common.chaos import MAX_ACK_DELAY_S
    from services.common.server import start_server
    from services.coordinator.service import CoordinatorNode
    from tlbsim.v1 import common_pb2

    async with InProcessCluster(cpus=2, liveness=STEADY) as c:
        await c.client.reset(Policy(deadline_s=5.0), 2)
        cpu0, cpu1 = c.client.cpus
        mm = (await c.client.memory.CreateMm(memory_pb2.CreateMmRequest(),
                                             metadata=c.client.meta())).mm
        for cpu in (cpu0, cpu1):
            await cpu.stub.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
        address = (await cpu0.stub.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=16, writable=True)))).address
        pages = [address + i * 4096 for i in range(16)]
        for cpu in (cpu0, cpu1):
            await cpu.stub.Access(cpu_pb2.AccessRequest(addresses=pages, writes=b"\x01" * 16))
        await chaos(c, 1, ack_delay_s=MAX_ACK_DELAY_S)
        munmap = asyncio.ensure_future(cpu0.stub.Syscall(common_pb2.SyscallRequest(
            munmap=common_pb2.RangeArgs(address=address, pages=16)), timeout=30))
        held = c.cpus[1].node.chaos_counts
        await until(lambda: held.acks_delayed == 1, "cpu 1 holding the shootdown's ack")
        await chaos(c, 1, partitioned=True)  # and cpu 1 cannot re-register at once
        where = c.coordinator.address
        await c.coordinator.stop(0)
        c.coordinator = await start_server(CoordinatorNode(liveness=STEADY), where)
        node = c.coordinator.node
        await until(lambda: node.stats.unknown_targets >= 1, "the retried shootdown")
        # cpu 0 re-registering takes a heartbeat or more: time the munmap would have had
        # to finish, were cpu 1 (never seen by the new coordinator) not waited for.
        await until(lambda: node.fencing.known(0), "cpu 0 registering with the new one")
        assert not munmap.done() and not node.fencing.known(1)
        await chaos(c, 1)  # heal: it registers and takes the flush
        result = await munmap
        assert result.pages_freed == 16
        mem = await memory_stats(c)
        coord = await c.client.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest())
        assert mem.shootdown_retries >= 1 and coord.unknown_targets >= 1
        assert mem.stale_accesses == 0 and mem.frames_freed_without_ack == 0
        dump = await c.cpus[1].node.DumpTlb(cpu_pb2.DumpTlbRequest(), None)
        assert not [e for e in dump.entries if e.mm == mm]  # the range is gone from cpu 1
