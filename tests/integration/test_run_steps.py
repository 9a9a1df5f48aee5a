"""A CPU's Run (a task's consecutive steps in one call) over real gRPC: it does exactly
what the same steps as their own calls do, a step that fails ends it where the caller
can start again, and the load generator's Driver rides out a CPU fenced mid-run."""
import asyncio

import grpc
import pytest

from loadgen.scenarios import Driver, Measurements
from services.common.addresses import pack_addresses
from services.common.policy import Policy
from tests.harness import InProcessCluster
from tests.loadgen.test_driver_rejoin import fence
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

PAGE = 4096
A, B = 0x7F00_0000_0000, 0x5555_0000_0000


def switch(mm: int) -> cpu_pb2.Step:
    return cpu_pb2.Step(switch_mm=cpu_pb2.SwitchMmRequest(mm=mm))


def sys(**call) -> cpu_pb2.Step:
    return cpu_pb2.Step(syscall=common_pb2.SyscallRequest(**call))


def mmap(at: int, pages: int, writable: bool = True) -> cpu_pb2.Step:
    return sys(mmap=common_pb2.MmapArgs(pages=pages, writable=writable, address=at))


def access(at: int, pages: int, writes: bytes = b"") -> cpu_pb2.Step:
    addresses = [at + i * PAGE for i in range(pages)]
    return cpu_pb2.Step(access=cpu_pb2.AccessRequest(
        packed_addresses=pack_addresses(addresses), writes=writes))


def program(mm: int, child: int) -> list[cpu_pb2.Step]:
    """Every kind of step, with walks, faults, COW, flushes of CPU 1 and a switch of mm
    between access steps (the run's hit report is then split)."""
    return [
        switch(mm), mmap(A, 8), access(A, 8, b"\x01" * 8), access(A, 8),
        mmap(B, 4), access(B, 4, b"\x01\x00\x01\x00"),
        sys(mprotect=common_pb2.MprotectArgs(address=A, pages=4, writable=False)),
        access(A, 8, b"\x01" * 8),  # the first four: SEGV
        sys(madvise_dontneed=common_pb2.RangeArgs(address=B, pages=2)), access(B, 4),
        sys(fork=common_pb2.ForkArgs()), access(A + 4 * PAGE, 4, b"\x01" * 4),  # COW
        switch(child), access(B, 4, b"\x01" * 4), switch(mm),
        sys(munmap=common_pb2.RangeArgs(address=A, pages=8)), access(A, 2),
    ]


def comparable(result: cpu_pb2.StepResult) -> tuple:
    kind = result.WhichOneof("result")
    r = getattr(result, kind)
    if kind == "access":
        return kind, r.accesses, r.hits, r.misses, r.faults, r.segv, len(r.fault_latency_s)
    if kind == "syscall":
        return kind, r.address, r.child_mm, r.shootdowns, r.pages_freed
    return kind, r.flushed


async def one_way(c: InProcessCluster, as_run: bool) -> tuple[list[tuple], str, list]:
    cl = c.client
    await cl.reset(Policy(), 2)
    mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
    cpu0, cpu1 = cl.cpus[0].stub, cl.cpus[1].stub
    await cpu1.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))  # a target for the flushes
    child = mm + 1  # the fork's child: the next mm the machine makes (asserted below)
    steps = program(mm, child)
    if as_run:
        results = list((await cpu0.Run(cpu_pb2.RunRequest(steps=steps))).results)
    else:
        results = []
        for step in steps:
            kind = step.WhichOneof("step")
            method = {"switch_mm": cpu0.SwitchMm, "access": cpu0.Access,
                      "syscall": cpu0.Syscall}[kind]
            results.append(cpu_pb2.StepResult(**{kind: await method(getattr(step, kind))}))
    stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest(digest=True))
    assert stats.stale_accesses == 0 and stats.reports_lost == 0
    dump = await cpu0.DumpTlb(cpu_pb2.DumpTlbRequest())
    entries = sorted((e.mm, e.vpn, e.pfn, e.writable, e.tid) for e in dump.entries)
    return [comparable(r) for r in results], stats.digest, entries


async def test_a_run_does_exactly_what_its_steps_as_calls_do():
    async with InProcessCluster(cpus=2) as c:
        calls = await one_way(c, as_run=False)
        run = await one_way(c, as_run=True)
    assert run[0] == calls[0]
    assert run[1:] == calls[1:]  # the whole machine, and the TLB, the same
    results = run[0]
    assert ("syscall", 0, 0, 0, 0) not in results
    assert any(r[0] == "syscall" and r[2] for r in results)  # the fork made its child
    assert sum(r[5] for r in results if r[0] == "access") == 4 + 2  # mprotect, munmap
    assert all(r[0] != "access" or r[1] for r in results)


async def one_cpu(c: InProcessCluster, policy: Policy = Policy()):
    """A reset machine and a fresh mm: (the client, the mm, CPU 0's stub)."""
    cl = c.client
    await cl.reset(policy, 1)
    mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
    return cl, mm, cl.cpus[0].stub


async def test_a_failing_step_ends_the_run_and_the_next_call_meets_it():
    async with InProcessCluster(cpus=1) as c:
        cl, mm, cpu = await one_cpu(c)
        bad = mmap(A, 2)  # over the mapping the run's second step makes
        steps = [switch(mm), mmap(A, 4), access(A, 4), bad, mmap(B, 1)]
        r = await cpu.Run(cpu_pb2.RunRequest(steps=steps))
        assert [x.WhichOneof("result") for x in r.results] == ["switch_mm", "syscall", "access"]
        assert r.results[2].access.faults == 4 and all(x.latency_s > 0 for x in r.results)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cpu.Run(cpu_pb2.RunRequest(steps=steps[3:]))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert dict(stats.faults) and sum(stats.faults.values()) == 4  # the last step never ran
        r = await cpu.Run(cpu_pb2.RunRequest(steps=steps[4:]))
        assert r.results[0].syscall.address == B


async def test_the_driver_rides_out_a_cpu_fenced_between_steps_and_runs_each_once():
    async with InProcessCluster(cpus=1) as c:
        cl, mm, _ = await one_cpu(c)
        d = Driver(cl, Measurements())
        node = c.cpus[0].node
        real, done = node._syscall, []

        async def syscall_then_fenced(request):  # the CPU is fenced after the first mmap
            r = await real(request)
            done.append(request.WhichOneof("call"))
            if len(done) == 1:
                await fence(c, 0)
            return r

        node._syscall = syscall_then_fenced
        steps = [switch(mm), mmap(A, 4), access(A, 4, b"\x01" * 4), mmap(B, 2), access(B, 2)]
        results = await asyncio.wait_for(d.run(cl.cpus[0], steps), 60)
        assert [comparable(r)[0] for r in results] == [s.WhichOneof("step") for s in steps]
        assert done == ["mmap", "mmap"]  # each system call once
        assert d.m.fenced_waits == 1 and d.m.lost_cpus == set()
        assert d.m.syscalls["mmap"] == 2 and d.m.faults == 6 and d.m.accesses == 6
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.stale_accesses == 0


async def test_a_runs_report_names_the_mm_each_access_ran_in():
    """The oracle judges a hit by the mm its CPU ran (a translation may end for one mm's
    CPUs only): a run that switches mm reports each mm's accesses apart. Here the child
    of a sharing fork unmaps B (its CPUs may no longer use B's translations); the parent
    still maps B through the same PTE table and its later hits are legitimate — unless
    they were judged as the child's."""
    async with InProcessCluster(cpus=1) as c:
        cl, mm, cpu = await one_cpu(c, Policy(fork="share"))
        r = await cpu.Run(cpu_pb2.RunRequest(steps=[
            switch(mm), mmap(A, 1), mmap(B, 4), access(B, 4, b"\x01" * 4), access(A, 1),
            sys(fork=common_pb2.ForkArgs())]))
        child = r.results[-1].syscall.child_mm
        r = await cpu.Run(cpu_pb2.RunRequest(steps=[
            switch(child), sys(munmap=common_pb2.RangeArgs(address=B, pages=4)),
            switch(mm), access(B, 4), switch(child), access(A, 1)]))
        assert r.results[3].access.hits + r.results[3].access.misses == 4
        assert r.results[3].access.segv == 0
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.stale_accesses == 0 and stats.audit_violations == 0
