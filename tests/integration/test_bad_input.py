"""Bad input over real gRPC: the right status code, a message naming the problem,
unchanged state, and a service that keeps serving."""
from array import array

import grpc
import pytest

from services.common import wire
from services.common.addresses import pack_addresses, user_addresses
from services.common.errors import InvalidArgument, OutOfRange
from services.common.policy import Policy
from tests.harness import InProcessCluster
from tlbsim.v1 import (common_pb2, coordinator_pb2, cpu_pb2, memory_pb2)

PAGE = 4096


@pytest.fixture
async def env():
    async with InProcessCluster(cpus=2) as c:
        cl = c.client
        await cl.reset(Policy(), 2)
        mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
        cpu = cl.cpus[0].stub
        await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
        base = (await cpu.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=8, writable=True)))).address
        await cpu.Access(cpu_pb2.AccessRequest(addresses=[base + i * PAGE for i in range(8)],
                                               writes=b"\x01" * 8))
        yield c, cl, cpu, mm, base


async def state(cl):
    s = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
    return (s.used_frames, s.shootdowns, s.pages_freed, dict(s.faults))


async def expect(call, code, text):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, e.value.details()
    assert text in e.value.details()


def munmap(address, pages):
    return common_pb2.SyscallRequest(munmap=common_pb2.RangeArgs(address=address, pages=pages))


@pytest.mark.parametrize("address,pages,code,text", [
    (0x10001001, 1, grpc.StatusCode.INVALID_ARGUMENT, "not page-aligned"),
    (0x10000000, 0, grpc.StatusCode.INVALID_ARGUMENT, "at least 1"),
    (0x0000_9000_0000_0000, 1, grpc.StatusCode.INVALID_ARGUMENT, "not canonical"),
    (0xFFFF_8000_0000_0000, 1, grpc.StatusCode.OUT_OF_RANGE, "kernel half"),
    (0x7FFF_FFFF_0000, 1 << 40, grpc.StatusCode.OUT_OF_RANGE, "47-bit"),
    (0x10000000, (1 << 64) - 1, grpc.StatusCode.OUT_OF_RANGE, "47-bit"),
])
async def test_bad_ranges(env, address, pages, code, text):
    c, cl, cpu, mm, base = env
    before = await state(cl)
    await expect(cpu.Syscall(munmap(address, pages)), code, text)
    assert await state(cl) == before
    r = await cpu.Syscall(munmap(base, 8))  # still serving, state intact
    assert r.pages_freed == 8


def fixed_mmap(address, pages):
    return common_pb2.SyscallRequest(mmap=common_pb2.MmapArgs(pages=pages, writable=True,
                                                              address=address))


@pytest.mark.parametrize("offset,pages,code,text", [
    (0, 1, grpc.StatusCode.ALREADY_EXISTS, "overlaps a mapping"),
    (-PAGE, 2, grpc.StatusCode.ALREADY_EXISTS, "MAP_FIXED_NOREPLACE"),
    (1, 1, grpc.StatusCode.INVALID_ARGUMENT, "not page-aligned"),
    (None, 1, grpc.StatusCode.INVALID_ARGUMENT, "mmap_min_addr"),
])
async def test_bad_fixed_mmaps(env, offset, pages, code, text):
    c, cl, cpu, mm, base = env
    before = await state(cl)
    address = PAGE if offset is None else base + offset
    await expect(cpu.Syscall(fixed_mmap(address, pages)), code, text)
    assert await state(cl) == before
    r = await cpu.Syscall(fixed_mmap(base + 64 * PAGE, pages))  # free space: mapped there
    assert r.address == base + 64 * PAGE


def run_of(*steps):
    return cpu_pb2.RunRequest(steps=list(steps))


def step_mmap(address):
    return cpu_pb2.Step(syscall=fixed_mmap(address, 1))


async def test_bad_runs_are_refused_before_any_step_runs(env):
    c, cl, cpu, mm, base = env
    free = base + 64 * PAGE
    good = step_mmap(free)
    timed = cpu_pb2.Step(syscall=common_pb2.SyscallRequest(
        munmap=common_pb2.RangeArgs(address=base, pages=1), vtime_ns=5))
    bad_access = cpu_pb2.Step(access=cpu_pb2.AccessRequest(addresses=[base], writes=b"\x01\x01"))
    many = cpu_pb2.Step(access=cpu_pb2.AccessRequest(packed_addresses=pack_addresses(
        [base] * 300_000)))
    before = await state(cl)
    for request, text in [
            (run_of(good, cpu_pb2.Step()), "step 1 is empty"),
            (run_of(good, timed), "step 1 has a virtual time"),
            (run_of(good, cpu_pb2.Step(access=cpu_pb2.AccessRequest(
                addresses=[base], until_vtime_ns=9))), "wall-clock only"),
            (run_of(good, good, bad_access), "step 2: writes has 2 flags for 1"),
            (run_of(*[good] * 4097), "4097 steps in one run: at most 4096"),
            (run_of(good, many, many, many, many), "1200000 accesses in one run")]:
        await expect(cpu.Run(request), grpc.StatusCode.INVALID_ARGUMENT, text)
    assert await state(cl) == before
    r = await cpu.Run(run_of(good))  # nothing ran: the address is still free
    assert r.results[0].syscall.address == free


async def test_bad_access_addresses(env):
    c, cl, cpu, mm, base = env
    before = await state(cl)
    await expect(cpu.Access(cpu_pb2.AccessRequest(addresses=[base, 0x0001_0000_0000_0000])),
                 grpc.StatusCode.INVALID_ARGUMENT, "not canonical")
    await expect(cpu.Access(cpu_pb2.AccessRequest(addresses=[base], writes=b"\x01\x01")),
                 grpc.StatusCode.INVALID_ARGUMENT, "writes has 2 flags for 1")
    # the same checks on packed addresses, which are checked without decoding each
    for bad, code, text in [(0x0001_0000_0000_0000, grpc.StatusCode.INVALID_ARGUMENT,
                             "0x1000000000000 is not canonical"),
                            (0x0000_8000_0000_0000, grpc.StatusCode.INVALID_ARGUMENT,
                             "0x800000000000 is not canonical"),
                            (0xFFFF_8000_0000_1000, grpc.StatusCode.OUT_OF_RANGE, "kernel half")]:
        await expect(cpu.Access(cpu_pb2.AccessRequest(
            packed_addresses=pack_addresses([base, 0x7FFF_FFFF_F000, bad, base]))), code, text)
    await expect(cpu.Access(cpu_pb2.AccessRequest(packed_addresses=bytes(12))),
                 grpc.StatusCode.INVALID_ARGUMENT, "12 bytes: 8 bytes each")
    await expect(cpu.Access(cpu_pb2.AccessRequest(addresses=[base],
                                                  packed_addresses=pack_addresses([base]))),
                 grpc.StatusCode.INVALID_ARGUMENT, "give one of the two")
    await expect(cpu.Access(cpu_pb2.AccessRequest(packed_addresses=pack_addresses([base]),
                                                  writes=b"\x01\x01")),
                 grpc.StatusCode.INVALID_ARGUMENT, "writes has 2 flags for 1")
    assert await state(cl) == before
    r = await cpu.Access(cpu_pb2.AccessRequest(
        packed_addresses=pack_addresses([base, base + 4096]), writes=b"\x00\x01"))
    assert r.accesses == 2 and r.segv == 0


async def test_a_refused_call_in_virtual_time_leaves_the_cpus_clock(env):
    """The CPU starts a call at its virtual time before the memory service checks it: a
    refusal must undo that (found by the RPC fuzzer: the clock moved)."""
    c, cl, cpu, mm, base = env
    before = await state(cl)
    clock = (await cpu.DumpTlb(cpu_pb2.DumpTlbRequest())).virtual.clock_ns
    await expect(cpu.Syscall(common_pb2.SyscallRequest(
        mprotect=common_pb2.MprotectArgs(address=base, pages=0), vtime_ns=clock + 10**6)),
        grpc.StatusCode.INVALID_ARGUMENT, "at least 1")
    assert (await cpu.DumpTlb(cpu_pb2.DumpTlbRequest())).virtual.clock_ns == clock
    assert await state(cl) == before
    r = await cpu.Syscall(common_pb2.SyscallRequest(
        mprotect=common_pb2.MprotectArgs(address=base, pages=1), vtime_ns=clock + 10**6))
    assert r.vtime_ns >= clock + 10**6  # accepted: it ran from there


def test_packed_addresses_round_trip_and_name_the_first_bad_one():
    addresses = [0, 1, 0x7FFF_FFFF_FFFF, 0x1234_5678_9ABC]
    assert list(user_addresses(pack_addresses(addresses))) == addresses
    for bad in (1 << 47, 1 << 48, 1 << 56, 1 << 63):
        with pytest.raises((InvalidArgument, OutOfRange), match=f"{bad:#x}"):
            user_addresses(pack_addresses([5, bad, 1 << 62]))


async def test_unknown_mm_and_exited_mm(env):
    c, cl, cpu, mm, base = env
    await expect(cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=999)), grpc.StatusCode.NOT_FOUND,
                 "no mm 999")
    await cpu.Syscall(common_pb2.SyscallRequest(exit=common_pb2.ExitArgs()))
    await expect(cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm)),
                 grpc.StatusCode.FAILED_PRECONDITION, f"mm {mm} has exited")
    await expect(cl.memory.HandleMiss(memory_pb2.HandleMissRequest(cpu=0, mm=mm, vpn=1)),
                 grpc.StatusCode.FAILED_PRECONDITION, "exited")


async def test_cpu_not_running_the_mm(env):
    c, cl, cpu, mm, base = env
    await expect(cl.memory.HandleMiss(memory_pb2.HandleMissRequest(cpu=7, mm=mm, vpn=1)),
                 grpc.StatusCode.FAILED_PRECONDITION, "cpu 7 is not running")
    idle = cl.cpus[1].stub
    await expect(idle.Access(cpu_pb2.AccessRequest(addresses=[base])),
                 grpc.StatusCode.FAILED_PRECONDITION, "runs no mm")


async def test_unknown_cpu_at_the_coordinator(env):
    c, cl, cpu, mm, base = env
    await expect(cl.coordinator.Heartbeat(coordinator_pb2.HeartbeatRequest(cpu=42)),
                 grpc.StatusCode.NOT_FOUND, "cpu 42")
    await expect(cl.coordinator.PingFanout(coordinator_pb2.PingFanoutRequest(
        targets=[0, 42], transport=common_pb2.TRANSPORT_GRPC)), grpc.StatusCode.NOT_FOUND, "42")
    await expect(cl.coordinator.Register(coordinator_pb2.RegisterRequest(cpu=5)),
                 grpc.StatusCode.INVALID_ARGUMENT, "address is empty")


async def test_bad_policies_and_empty_calls(env):
    c, cl, cpu, mm, base = env
    before = await state(cl)
    await expect(cl.memory.Reset(memory_pb2.MemoryResetRequest(policy=common_pb2.Policy())),
                 grpc.StatusCode.INVALID_ARGUMENT, "lock is unspecified")
    bad = wire.policy_to_proto(Policy())
    bad.tlb_ways = 7
    await expect(cl.coordinator.Reset(coordinator_pb2.CoordinatorResetRequest(policy=bad)),
                 grpc.StatusCode.INVALID_ARGUMENT, "not a multiple of 7 ways")
    await expect(cpu.Reset(cpu_pb2.CpuResetRequest(tlb_entries=0, tlb_ways=0)),
                 grpc.StatusCode.INVALID_ARGUMENT, "TLB of 0 entries")
    await expect(cpu.Syscall(common_pb2.SyscallRequest()), grpc.StatusCode.INVALID_ARGUMENT,
                 "no call")
    await expect(cl.memory.ReportAccesses(memory_pb2.ReportAccessesRequest(tids=b"123")),
                 grpc.StatusCode.INVALID_ARGUMENT, "8-byte")
    await expect(cl.memory.ReportAccesses(memory_pb2.ReportAccessesRequest(tids=bytes(16))),
                 grpc.StatusCode.INVALID_ARGUMENT, "add up to the report's")  # no runs
    one_run = array("q", (2, 0, 0)).tobytes()
    for counts in (array("I", [1]), array("I", [1, 0])):  # a count short; a word for none
        await expect(cl.memory.ReportAccesses(memory_pb2.ReportAccessesRequest(
            tids=bytes(16), runs=one_run, counts=counts.tobytes())),
            grpc.StatusCode.INVALID_ARGUMENT, "counts must give each word")
    assert await state(cl) == before
    assert (await cpu.Access(cpu_pb2.AccessRequest(addresses=[base]))).hits == 1


def window(mm, vpns, touches, cpu=0):
    """A Walk that also faults the window's batchable misses: touches (vpn, write, held)."""
    return memory_pb2.WalkRequest(cpu=cpu, mm=mm, vpns=vpns,
                                  touch_vpns=[t[0] for t in touches],
                                  touch_writes=[t[1] for t in touches],
                                  touch_held=[t[2] for t in touches])


async def digest(cl):
    return (await cl.memory.Stats(memory_pb2.MemoryStatsRequest(digest=True))).digest


async def test_bad_fault_windows(env):
    c, cl, cpu, mm, base = env
    vpn = base // PAGE
    fresh = (await cpu.Syscall(common_pb2.SyscallRequest(
        mmap=common_pb2.MmapArgs(pages=4, writable=True)))).address // PAGE
    good = [(fresh, True, False), (fresh + 1, True, False)]
    before = await digest(cl)
    short = window(mm, [fresh, fresh + 1], good)
    del short.touch_held[1]
    for request, text in [
            (short, "touches: 2 vpns, 2 write flags, 1 held flags"),
            (window(mm, [fresh], good), "a touch names a page the walk does not read"),
            (window(mm, [fresh, 1 << 40], good), "47-bit"),
            (window(mm, [fresh], [(fresh, True, False)] * 1025), "at most 1024")]:
        await expect(cl.memory.Walk(request), grpc.StatusCode.INVALID_ARGUMENT
                     if "47-bit" not in text else grpc.StatusCode.OUT_OF_RANGE, text)
        assert await digest(cl) == before  # nothing ran, not even the good misses first
    r = await cl.memory.Walk(window(mm, [vpn, fresh], [(vpn, True, False), (fresh, True, False)]))
    assert list(r.missed_vpns) == [fresh] and list(r.missed_writes) == [True]  # still serving
    assert [m.outcome for m in r.misses] == [memory_pb2.MISS_OUTCOME_FAULT_ANON]
    assert r.ptes[0].present and not r.ptes[1].present  # read before the fault
    assert not r.HasField("error")


async def test_bad_miss_batches_in_the_domain_run_nothing(env):
    c, cl, cpu, mm, base = env
    node = c.memory.node
    fresh = (await cpu.Syscall(common_pb2.SyscallRequest(
        mmap=common_pb2.MmapArgs(pages=4, writable=True)))).address // PAGE
    before = await digest(cl)
    for bad in ([(fresh, True), (fresh, False)], [(fresh, True), (1 << 40, True)],
                [(fresh + i, True) for i in range(1025)]):
        with pytest.raises(InvalidArgument):
            await node.kernel.handle_misses(0, mm, bad)
        assert await digest(cl) == before


async def test_a_fault_window_of_an_exited_mm_is_refused_by_its_walk(env):
    c, cl, cpu, mm, base = env
    fresh = (await cpu.Syscall(common_pb2.SyscallRequest(
        mmap=common_pb2.MmapArgs(pages=4, writable=True)))).address // PAGE
    await cpu.Syscall(common_pb2.SyscallRequest(exit=common_pb2.ExitArgs()))
    await expect(cl.memory.Walk(window(mm, [fresh], [(fresh, True, False)])),
                 grpc.StatusCode.FAILED_PRECONDITION, "exited")  # the walk refuses first
