"""Resource limits (issue 8): bounded requests, explicit message sizes, a deadline on
every call; and the regression tests of what fuzzing found, named after it."""
from __future__ import annotations

import asyncio
import time
import tracemalloc

import grpc
import pytest

from loadgen.trace.fmt import TraceError, parse_lines
from services.common.addresses import USER_VPN_END
from services.common.policy import Policy
from services.common.server import MAX_MESSAGE_BYTES, channel
from services.cpu.service import MAX_ACCESSES
from services.memory.kernel import MAX_POPULATE_PAGES
from services.memory.service import MAX_WALK_PAGES
from tests.harness import InProcessCluster
from tlbsim.v1 import common_pb2, coordinator_pb2, cpu_pb2, memory_pb2

PAGE = 4096


@pytest.fixture
async def env():
    async with InProcessCluster(cpus=1) as c:
        cl = c.client
        await cl.reset(Policy(), 1)
        mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
        cpu = cl.cpus[0].stub
        await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
        yield c, cl, cpu


def syscall(**call):
    return common_pb2.SyscallRequest(**call)


async def expect(call, code, text):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, e.value.details()
    assert text in e.value.details()


async def test_munmap_of_2_to_the_36_pages_is_refused(env):
    c, cl, cpu = env
    assert 1 << 36 > USER_VPN_END  # more pages than user space has
    await expect(cpu.Syscall(syscall(munmap=common_pb2.RangeArgs(address=0x1000_0000,
                                                                  pages=1 << 36)), timeout=10),
                 grpc.StatusCode.OUT_OF_RANGE, "47-bit")


async def test_a_2_to_the_30_page_vma_unmaps_walking_only_populated_tables(env):
    """4 TiB mapped, three pages touched: munmap visits the tables that exist, so it
    takes milliseconds and a few KiB, where a page-by-page walk would take hours."""
    c, cl, cpu = env
    base = (await cpu.Syscall(syscall(mmap=common_pb2.MmapArgs(pages=1 << 30, writable=True)),
                              timeout=10)).address
    touched = [base, base + (1 << 29) * PAGE, base + ((1 << 30) - 1) * PAGE]
    await cpu.Access(cpu_pb2.AccessRequest(addresses=touched, writes=b"\x01" * 3), timeout=10)
    tracemalloc.start()
    try:
        r = await cpu.Syscall(syscall(munmap=common_pb2.RangeArgs(address=base, pages=1 << 30)),
                              timeout=10)  # the bound on time: a deadline, not a benchmark
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.pages_freed == 3
    assert peak < 8 << 20, f"munmap of an almost empty 2^30-page VMA peaked at {peak} bytes"
    s = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
    assert s.used_frames == 2  # only the pgd is left, and the machine's zero page


async def test_a_populating_mmap_is_bounded(env):
    c, cl, cpu = env
    await cl.reset(Policy(frames=4 * MAX_POPULATE_PAGES), 1)
    mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
    await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
    await expect(cpu.Syscall(syscall(mmap=common_pb2.MmapArgs(
        pages=MAX_POPULATE_PAGES + 1, populate=True)), timeout=10),
        grpc.StatusCode.OUT_OF_RANGE, f"at most {MAX_POPULATE_PAGES}")
    s = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
    assert s.used_frames == 2  # the pgd and the zero page: nothing populated


async def test_too_many_accesses_in_one_request(env):
    c, cl, cpu = env
    await expect(cpu.Access(cpu_pb2.AccessRequest(addresses=[0x1000_0000] * (MAX_ACCESSES + 1)),
                            timeout=30),
                 grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_ACCESSES}")


async def test_too_many_pages_in_one_walk(env):
    c, cl, cpu = env
    await expect(cl.memory.Walk(memory_pb2.WalkRequest(cpu=0, mm=1,
                                                       vpns=[0x10000] * (MAX_WALK_PAGES + 1)),
                                timeout=30),
                 grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_WALK_PAGES}")


async def test_messages_past_the_limit_are_refused_by_the_sender(env):
    c, cl, cpu = env
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cpu.Ping(cpu_pb2.PingRequest(payload=b"x" * (MAX_MESSAGE_BYTES + 1)), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await cpu.Ping(cpu_pb2.PingRequest(payload=b"ok"), timeout=5)).payload == b"ok"


async def test_too_many_shootdown_targets(env):
    c, cl, cpu = env
    await expect(cl.coordinator.Shootdown(coordinator_pb2.ShootdownRequest(
        flush=common_pb2.FlushRequest(mm=1), targets=list(range(5000))), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "targets")


async def test_a_far_future_shootdown_deadline_waits_no_longer_than_the_policy(env):
    """A Shootdown naming a CPU nobody registered waits for it until its deadline; a
    caller's deadline of year 30,000 must not hold the call open past the policy's."""
    c, cl, cpu = env
    await cl.reset(Policy(deadline_s=0.2), 1)
    r = await cl.coordinator.Shootdown(coordinator_pb2.ShootdownRequest(
        flush=common_pb2.FlushRequest(shootdown_id=1, mm=1, deadline_unix_s=1e12),
        targets=[999]), timeout=5)
    assert list(r.fenced) == [999]


async def never_answering_server() -> tuple[grpc.aio.Server, int]:
    async def sleep_forever(request, context):
        await asyncio.sleep(3600)

    handler = grpc.method_handlers_generic_handler(
        "tlbsim.v1.CpuService", {"Ping": grpc.unary_unary_rpc_method_handler(
            sleep_forever, request_deserializer=cpu_pb2.PingRequest.FromString,
            response_serializer=cpu_pb2.PingResponse.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_a_call_to_a_service_that_never_answers_times_out():
    """Every call through channel() has a deadline: the caller's, else the default."""
    from tlbsim.v1 import cpu_pb2_grpc
    server, port = await never_answering_server()
    try:
        async with channel(f"127.0.0.1:{port}", default_timeout=0.3) as ch:
            stub = cpu_pb2_grpc.CpuServiceStub(ch)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Ping(cpu_pb2.PingRequest())  # no timeout given
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 5
            with pytest.raises(grpc.aio.AioRpcError) as e:  # the caller's own wins
                await stub.Ping(cpu_pb2.PingRequest(), timeout=0.1)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(0)


# --- what fuzzing found ---------------------------------------------------------------------
async def test_fuzz_found_ping_fanout_of_2_to_the_32_rounds_held_the_event_loop(env):
    """rounds=2^32-1 with no targets looped without ever yielding: the coordinator
    (and everything on its event loop) stopped answering."""
    c, cl, cpu = env
    await expect(cl.coordinator.PingFanout(coordinator_pb2.PingFanoutRequest(
        transport=common_pb2.TRANSPORT_GRPC, rounds=2**32 - 1), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT, "rounds")
    r = await cl.coordinator.PingFanout(coordinator_pb2.PingFanoutRequest(
        targets=[0], transport=common_pb2.TRANSPORT_GRPC, rounds=3), timeout=5)
    assert len(r.latency_s) == 3


async def test_fuzz_found_a_hardware_flush_of_2_to_the_40_pages_held_the_cpu(env):
    """A Flush naming 2^40 pages invalidated them one at a time: the CPU service (and
    everything on its event loop) stopped answering. It is one pass over the TLB now."""
    c, cl, cpu = env
    mm = (await cpu.DumpTlb(cpu_pb2.DumpTlbRequest())).loaded_mm
    for gen, hardware in ((1, True), (2, False)):  # INVLPGB, then an IPI's ranged flush
        base = (await cpu.Syscall(syscall(mmap=common_pb2.MmapArgs(pages=1)))).address
        await cpu.Access(cpu_pb2.AccessRequest(addresses=[base]), timeout=5)
        ack = await cpu.Flush(common_pb2.FlushRequest(
            shootdown_id=gen, mm=mm, start_vpn=0, pages=1 << 40, new_tlb_gen=gen,
            mm_tlb_gen=gen, hardware=hardware), timeout=5)
        assert ack.entries_removed == 1  # the range covered the page the Access filled
        dump = await cpu.DumpTlb(cpu_pb2.DumpTlbRequest(), timeout=5)
        assert len(dump.entries) == 0


def test_fuzz_found_a_trace_event_whose_op_is_a_list():
    """{"op": []} raised TypeError (unhashable) instead of the parser's own error."""
    header = '{"format": "tlbsim-trace", "version": 1, "source": "strace", "events": 1}'
    with pytest.raises(TraceError, match=r"line 2: unknown op \[\]"):
        parse_lines([header, '{"op": [], "tid": 1}'])
