"""Access reports sent after the Access answered (services/memory/promises.py), over real
gRPC: the CPU's Access no longer waits for its report, and the memory service's Stats
waits for every report a walk promised, so its stale count is as exact as before."""
import asyncio
import contextlib
import time
from array import array

import grpc
import pytest

from services.common.policy import Policy
from services.memory import service as memory_service
from services.memory.promises import INCARNATION_SHIFT
from tests.harness import InProcessCluster
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

PAGE = 4096
TOKEN = 7 << INCARNATION_SHIFT | 1


async def _revoked_tids(cl, pages: int) -> tuple[int, list[int]]:
    """An mm on CPU 0 and the tids of `pages` translations it filled, then unmapped."""
    cpu = cl.cpus[0].stub
    mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest(), metadata=cl.meta())).mm
    await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
    base = (await cpu.Syscall(common_pb2.SyscallRequest(
        mmap=common_pb2.MmapArgs(pages=pages, writable=True)))).address
    await cpu.Access(cpu_pb2.AccessRequest(addresses=[base + i * PAGE for i in range(pages)],
                                           writes=b"\x01" * pages))
    tids = [e.tid for e in (await cpu.DumpTlb(cpu_pb2.DumpTlbRequest())).entries]
    await cpu.Syscall(common_pb2.SyscallRequest(munmap=common_pb2.RangeArgs(
        address=base, pages=pages)))
    return mm, tids


@contextlib.asynccontextmanager
async def _machine(pages: int = 1):
    """A one-CPU cluster, reset, with `pages` revoked translations (_revoked_tids)."""
    async with InProcessCluster(cpus=1) as c:
        cl = c.client
        await cl.reset(Policy(), 1)
        mm, tids = await _revoked_tids(cl, pages)
        yield cl, mm, tids


async def _walk_promising(cl, mm: int, token: int = TOKEN) -> None:
    await cl.memory.Walk(memory_pb2.WalkRequest(cpu=0, mm=mm, vpns=[1], report_token=token),
                         metadata=cl.meta())


def _stale_report(mm: int, tids: list[int], token: int) -> memory_pb2.ReportAccessesRequest:
    """As if CPU 0 had hit each revoked translation once, just now."""
    now = time.monotonic_ns()
    return memory_pb2.ReportAccessesRequest(
        cpu=0, mm=mm, token=token, tids=array("Q", (t << 1 | 1 for t in tids)).tobytes(),
        runs=array("q", (len(tids), now, now)).tobytes())


async def test_stats_waits_for_a_promised_report_and_counts_its_stale_hits():
    async with _machine(8) as (cl, mm, tids):
        meta = cl.meta()
        await _walk_promising(cl, mm)
        with pytest.raises(grpc.aio.AioRpcError) as held:  # the report is owed
            await cl.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=0.5)
        assert held.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        waiting = asyncio.ensure_future(cl.memory.Stats(memory_pb2.MemoryStatsRequest()))
        r = await cl.memory.ReportAccesses(_stale_report(mm, tids, TOKEN), metadata=meta)
        assert r.stale == 8
        stats = await waiting
        assert (stats.stale_accesses, stats.reports_lost) == (8, 0)


async def test_a_restarted_cpus_promise_is_lost_not_waited_for():
    async with _machine() as (cl, mm, _):
        meta = cl.meta()
        for incarnation in (7, 8):  # the CPU died between its walk and its report
            await _walk_promising(cl, mm, incarnation << INCARNATION_SHIFT | 1)
        await cl.memory.ReportAccesses(memory_pb2.ReportAccessesRequest(
            cpu=0, mm=mm, token=8 << INCARNATION_SHIFT | 1), metadata=meta)
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.reports_lost == 1


async def test_stats_gives_up_on_a_report_that_never_comes(monkeypatch):
    monkeypatch.setattr(memory_service, "PROMISE_WAIT_S", 0.1)
    async with _machine() as (cl, mm, _):
        await _walk_promising(cl, mm)
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=30)
        assert stats.reports_lost == 1
        again = await cl.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=30)
        assert again.reports_lost == 1  # counted once; nothing owed any more
        await cl.memory.ReportAccesses(memory_pb2.ReportAccessesRequest(
            cpu=0, mm=mm, token=TOKEN), metadata=cl.meta())
        late = await cl.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=30)
        assert late.reports_lost == 0  # it came after all, and was judged


async def test_a_refused_walk_promises_nothing():
    async with _machine() as (cl, mm, _):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cl.memory.Walk(memory_pb2.WalkRequest(
                cpu=0, mm=mm, vpns=[1], touch_vpns=[1], report_token=TOKEN),
                metadata=cl.meta())
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cl.memory.HandleMiss(memory_pb2.HandleMissRequest(
                cpu=0, mm=mm + 100, vpn=1, report_token=TOKEN), metadata=cl.meta())
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND  # no such mm
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.reports_lost == 0  # nothing owed: not given up on either


async def test_a_reset_forgets_the_old_machines_promises():
    async with _machine() as (cl, mm, _):
        await _walk_promising(cl, mm)
        await cl.reset(Policy(), 1)
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.reports_lost == 0  # not waited for, so not given up on either


async def test_an_access_that_faulted_answers_before_its_report_which_stats_awaits():
    async with InProcessCluster(cpus=1) as c:
        cl = c.client
        await cl.reset(Policy(), 1)
        node = c.cpus[0].node
        held, sent = asyncio.Event(), []
        to_memory = node._to_memory

        async def hold_reports(method, request, epoch=None):
            if isinstance(request, memory_pb2.ReportAccessesRequest):
                sent.append(request)
                await held.wait()
            return await to_memory(method, request, epoch)
        node._to_memory = hold_reports
        cpu = cl.cpus[0].stub
        mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest(), metadata=cl.meta())).mm
        await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
        base = (await cpu.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=64, writable=True)))).address
        r = await asyncio.wait_for(cpu.Access(cpu_pb2.AccessRequest(
            addresses=[base + i * PAGE for i in range(64)], writes=b"\x01" * 64)), 30)
        assert r.faults == 64 and len(sent) == 1  # answered, its report held back
        assert sent[0].token >> INCARNATION_SHIFT and len(sent[0].tids) == 64 * 8
        with pytest.raises(grpc.aio.AioRpcError) as owed:
            await cl.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=0.5)
        assert owed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        held.set()
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=30)
        assert (stats.stale_accesses, stats.reports_lost) == (0, 0)
        assert c.memory.node.kernel.oracle.checked == 64  # the 64 fills, judged
        r = await cpu.Access(cpu_pb2.AccessRequest(addresses=[base]))
        assert r.hits == 1 and sent[1].token == 0  # a hit-only Access awaited its report
