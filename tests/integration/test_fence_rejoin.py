"""Fencing over real gRPC in one process (issue 14): a fenced CPU never serves its old
TLB again, the frames of the shootdown it missed wait for its flush (or its lease), and
the races of the issue — a lost heartbeat, then the fence, then a re-registration; a
fence while a batched walk is out; a lease that runs out inside an Access."""
import asyncio

import grpc
import pytest

from services.common.errors import REASON_CPU_FENCED
from services.common.liveness import Liveness
from services.common.policy import Policy
from services.common.server import reason_of
from tests.harness import InProcessCluster
from tlbsim.v1 import common_pb2, coordinator_pb2, cpu_pb2, memory_pb2

PAGE = 4096


async def fenced_at_coordinator(c: InProcessCluster, cpu: int) -> bool:
    listing = await c.client.coordinator.ListCpus(coordinator_pb2.ListCpusRequest())
    return [x.fenced for x in listing.cpus if x.cpu == cpu] == [True]


async def rejoined(c: InProcessCluster, cpu: int) -> None:
    """Registered and unfenced on both sides (bounded: it does that by itself)."""
    for _ in range(200):
        if not await fenced_at_coordinator(c, cpu) and not c.cpus[cpu].node.core.fenced:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"cpu {cpu} did not rejoin")


async def process_on(c: InProcessCluster, cpus: list[int], pages: int) -> tuple[int, int]:
    """An mm on `cpus` with `pages` written by the first: (mm, address)."""
    cl = c.client
    mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest(), metadata=cl.meta())).mm
    for cpu in cpus:
        await cl.cpus[cpu].stub.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
    r = await cl.cpus[cpus[0]].stub.Syscall(common_pb2.SyscallRequest(
        mmap=common_pb2.MmapArgs(pages=pages, writable=True)))
    await cl.cpus[cpus[0]].stub.Access(cpu_pb2.AccessRequest(
        addresses=[r.address + i * PAGE for i in range(pages)], writes=b"\x01" * pages))
    return mm, r.address


@pytest.mark.parametrize("lost_as", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND])
async def test_a_fenced_cpu_whose_heartbeat_is_lost_flushes_before_the_frames_are_freed(lost_as):
    """Break K of the safety review (/work/shared/reference/attacks/test_fence_rejoin.py):
    cpu 2 misses a shootdown, the one heartbeat that would tell it so is lost, and it goes
    on (UNAVAILABLE) or registers again without having heard of the fence (NOT_FOUND).
    Before issue 14 the coordinator unfenced it at that registration, the munmap freed
    the frames, its TLB kept all 8 entries and the next Access hit them: 8 stale
    accesses. Now it is told to flush first, and the munmap waits for that flush."""
    async with InProcessCluster(cpus=3) as c:
        cl = c.client
        await cl.reset(Policy(deadline_s=0.3), 3)
        mm, address = await process_on(c, [1, 2], 8)
        addrs = [address + i * PAGE for i in range(8)]
        cpu2 = cl.cpus[2].stub
        await cpu2.Access(cpu_pb2.AccessRequest(addresses=addrs, writes=b"\x01" * 8))
        await cpu2.Chaos(cpu_pb2.ChaosRequest(drop_fraction=1.0, seed=1))  # loses flushes
        node2 = c.cpus[2].node
        real = node2.coordinator.Heartbeat
        lost = []
        c.coordinator.node._notify_fenced = lambda cpu: None  # its stream notice is lost too

        async def flaky(request, **kw):
            answer = await real(request, **kw)
            if answer.fenced and not lost:  # the answer that would tell it is lost
                lost.append(1)
                raise grpc.aio.AioRpcError(lost_as, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           "heartbeat lost")
            return answer

        node2.coordinator.Heartbeat = flaky
        res = await cl.cpus[1].stub.Syscall(common_pb2.SyscallRequest(
            munmap=common_pb2.RangeArgs(address=address, pages=8)))
        assert lost == [1]
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert res.pages_freed == 8 and stats.frames_freed_without_ack == 0
        dump = await cpu2.DumpTlb(cpu_pb2.DumpTlbRequest())
        assert not [e for e in dump.entries if e.mm == mm]  # flushed before the free
        coord = await cl.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest())
        assert coord.deadline_misses == 1 and coord.fences_flushed == 1
        assert node2.member.fences.get("deadline") == 1

        await cpu2.Chaos(cpu_pb2.ChaosRequest())  # heal
        await rejoined(c, 2)
        a = await cpu2.Access(cpu_pb2.AccessRequest(addresses=addrs))
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert a.hits == 0 and a.segv == 8 and stats.stale_accesses == 0


async def test_a_cpu_fenced_while_its_batched_walk_is_out_fills_nothing():
    """cpu 1's Access has a batched walk out at the memory service when the coordinator
    fences it (it lost the flush of another range's munmap) and its heartbeat tells it
    so: the walk's answer fills nothing, the Access stops, the CPU flushes and rejoins."""
    async with InProcessCluster(cpus=2) as c:
        cl = c.client
        await cl.reset(Policy(deadline_s=0.3), 2)
        mm, address = await process_on(c, [0, 1], 8)
        addrs = [address + i * PAGE for i in range(8)]
        node1 = c.cpus[1].node
        told = asyncio.Event()
        real_told, real_walk = node1.member.told_fenced, node1.memory.Walk

        def told_fenced(notice):
            real_told(notice)
            told.set()

        async def held_walk(request, **kw):
            reply = await real_walk(request, **kw)
            await told.wait()  # the heartbeat's answer comes while the walk is out
            return reply

        node1.member.told_fenced = told_fenced
        node1.memory.Walk = held_walk
        access = asyncio.ensure_future(cl.cpus[1].stub.Access(
            cpu_pb2.AccessRequest(addresses=addrs), timeout=30))
        other = (await cl.cpus[0].stub.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=1, writable=True)))).address
        await cl.cpus[0].stub.Access(cpu_pb2.AccessRequest(addresses=[other], writes=b"\x01"))
        await cl.cpus[1].stub.Chaos(cpu_pb2.ChaosRequest(drop_fraction=1.0))
        await cl.cpus[0].stub.Syscall(common_pb2.SyscallRequest(
            munmap=common_pb2.RangeArgs(address=other, pages=1)))  # cpu 1 misses it
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await access
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(e.value) == REASON_CPU_FENCED
        assert "missed a shootdown deadline" in e.value.details()
        dump = await cl.cpus[1].stub.DumpTlb(cpu_pb2.DumpTlbRequest())
        assert not [x for x in dump.entries if x.mm == mm]  # the walk filled nothing
        await cl.cpus[1].stub.Chaos(cpu_pb2.ChaosRequest())
        await rejoined(c, 1)
        a = await cl.cpus[1].stub.Access(cpu_pb2.AccessRequest(addresses=addrs))
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert a.misses >= 1 and stats.stale_accesses == 0


async def test_a_lease_that_runs_out_inside_a_long_access_stops_it_and_the_cpu_rejoins():
    """No heartbeat or registration of cpu 0 is answered (an overloaded coordinator) while
    it runs an Access far longer than its 1.5 s lease (2^20 accesses cycling through 4,096
    pages: walks and faults). The Access stops there (the lease is checked before every
    run of hits and every fill), the CPU flushes by the lease's rule, and once the
    coordinator answers again it registers and runs."""
    async with InProcessCluster(cpus=1) as c:
        cl = c.client
        await cl.reset(Policy(), 1)
        mm, address = await process_on(c, [0], 8)
        pages = 4096
        base = (await cl.cpus[0].stub.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=pages, writable=True)))).address
        addrs = [base + i * PAGE for i in range(pages)]
        node = c.cpus[0].node
        answered = asyncio.Event()

        def unanswered(real):
            async def call(request, **kw):
                if not answered.is_set():
                    raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                               grpc.aio.Metadata(), grpc.aio.Metadata(), "late")
                return await real(request, **kw)
            return call

        node.coordinator.Heartbeat = unanswered(node.coordinator.Heartbeat)
        node.coordinator.Register = unanswered(node.coordinator.Register)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cl.cpus[0].stub.Access(cpu_pb2.AccessRequest(addresses=addrs * 256),
                                         timeout=120)
        assert reason_of(e.value) == REASON_CPU_FENCED and "lease ran out" in e.value.details()
        assert node.core.fenced and node.core.fence_reason == "lease" and len(node.core.tlb) == 0
        assert node.member.fences == {"lease": 1}
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.stale_accesses == 0
        answered.set()
        await rejoined(c, 0)
        a = await cl.cpus[0].stub.Access(cpu_pb2.AccessRequest(addresses=addrs[:64]))
        assert a.accesses == 64 and a.misses >= 1  # from an empty TLB


async def test_an_unregistered_cpu_serves_nothing_and_says_why():
    async with InProcessCluster(cpus=1) as c:
        from services.cpu.service import CpuNode
        node = CpuNode(5, c.memory.address, "127.0.0.1:1", metrics=False)  # never registers
        with pytest.raises(Exception, match="not registered with the coordinator"):
            node.core.require_runnable()


async def test_a_fenced_cpu_hears_it_on_its_stream_before_its_next_heartbeat():
    """Heartbeats every 30 s: the fence notice on the flush stream alone makes the CPU
    flush and register, so the munmap that fenced it completes long before."""
    live = Liveness(heartbeat_s=30, heartbeat_timeout_s=10, lease_s=60)
    async with InProcessCluster(cpus=2, liveness=live) as c:
        cl = c.client
        await cl.reset(Policy(deadline_s=0.3), 2)
        mm, address = await process_on(c, [0, 1], 8)
        await cl.cpus[1].stub.Access(cpu_pb2.AccessRequest(
            addresses=[address + i * PAGE for i in range(8)]))
        await cl.cpus[1].stub.Chaos(cpu_pb2.ChaosRequest(drop_fraction=1.0))
        res = await asyncio.wait_for(cl.cpus[0].stub.Syscall(common_pb2.SyscallRequest(
            munmap=common_pb2.RangeArgs(address=address, pages=8))), 10)
        assert res.pages_freed == 8
        coord = await cl.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest())
        assert coord.deadline_misses == 1 and coord.fences_flushed == 1  # not its lease
        dump = await cl.cpus[1].stub.DumpTlb(cpu_pb2.DumpTlbRequest())
        assert not [e for e in dump.entries if e.mm == mm]
        assert c.cpus[1].node.heartbeats_failed == 0
