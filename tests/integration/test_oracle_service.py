"""The oracle inside the memory service, over real gRPC: a report of a million stale
hits is judged in chunks while every other call goes on."""
import asyncio
import time
from array import array

from services.common.policy import Policy
from tests.harness import InProcessCluster
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

PAGE = 4096


async def test_a_million_stale_hits_are_judged_while_other_calls_go_on():
    async with InProcessCluster(cpus=1) as c:
        cl = c.client
        await cl.reset(Policy(), 1)
        meta = cl.meta()
        cpu = cl.cpus[0].stub
        mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest(), metadata=meta)).mm
        await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
        r = await cpu.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=512, writable=True)))
        await cpu.Access(cpu_pb2.AccessRequest(
            addresses=[r.address + i * PAGE for i in range(512)], writes=b"\x01" * 512))
        tids = [e.tid for e in (await cpu.DumpTlb(cpu_pb2.DumpTlbRequest())).entries]
        await cpu.Syscall(common_pb2.SyscallRequest(
            munmap=common_pb2.RangeArgs(address=r.address, pages=512)))

        # As if a CPU had kept its entries and hit each of them 2048 times since.
        n = 1 << 20
        words = array("Q", (tids[i % len(tids)] << 1 | 1 for i in range(n)))
        now = time.monotonic_ns()
        runs = array("q")
        for k in range(0, n, 4096):
            runs.extend((4096, now + k, now + k + 1))
        report = asyncio.ensure_future(cl.memory.ReportAccesses(
            memory_pb2.ReportAccessesRequest(cpu=0, mm=mm, tids=words.tobytes(),
                                             runs=runs.tobytes()), metadata=meta))
        answered = 0
        while not report.done():  # other calls, each with a short deadline, all answered
            await cl.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=2.0)
            answered += 1
        assert (await report).stale == n
        assert answered >= 3  # they were served while the report was being judged
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.stale_accesses == n
