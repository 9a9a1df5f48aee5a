"""What every scenario shares: its configuration, what the client measures, and a
driver whose CPU calls tolerate a CPU leaving mid-run (it is fenced; the run goes on).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Awaitable, Callable

import grpc

from loadgen.cluster import Cluster, Cpu
from services.common.addresses import PAGE_SIZE
from services.common.errors import FailedPrecondition
from services.common.policy import Policy
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

log = logging.getLogger("tlbsim.loadgen")
CALL_TIMEOUT_S = 120.0
# Errors that mean a CPU left the run (killed, restarting, fenced): the run goes on without it.
CPU_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.FAILED_PRECONDITION}


@dataclasses.dataclass
class RunConfig:
    scenario: str
    policy: Policy
    cpus: int = 4
    pages: int = 512
    rounds: int = 5
    seed: int = 0
    readers: bool = True

    def as_dict(self) -> dict:
        return {"cpus": self.cpus, "pages": self.pages, "rounds": self.rounds,
                "seed": self.seed, "readers": self.readers, **self.policy.as_dict()}


@dataclasses.dataclass
class Measurements:
    ops: int = 0
    accesses: int = 0
    hits: int = 0
    faults: int = 0
    segv: int = 0
    munmap_latency_s: list[float] = dataclasses.field(default_factory=list)
    fault_latency_s: list[float] = dataclasses.field(default_factory=list)
    lost_cpus: set[int] = dataclasses.field(default_factory=set)
    rounds_done: int = 0
    audited_entries: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)

    def add(self, r: cpu_pb2.AccessResponse) -> None:
        self.ops += r.accesses
        self.accesses += r.accesses
        self.hits += r.hits
        self.faults += r.faults
        self.segv += r.segv
        self.fault_latency_s.extend(r.fault_latency_s)


Progress = Callable[[int], None]  # called with the number of rounds completed


class Driver:
    """CPU calls that tolerate a CPU leaving mid-run (it is fenced, the run goes on)."""

    def __init__(self, cluster: Cluster, m: Measurements):
        self.cluster = cluster
        self.m = m

    def live(self, cpus: list[Cpu]) -> list[Cpu]:
        return [c for c in cpus if c.id not in self.m.lost_cpus]

    async def _call(self, cpu: Cpu, rpc: Awaitable):
        if cpu.id in self.m.lost_cpus:
            return None
        try:
            return await rpc
        except grpc.aio.AioRpcError as e:
            if e.code() not in CPU_LOST:
                raise
            log.warning("cpu %d left the run: %s %s", cpu.id, e.code().name, e.details())
            self.m.lost_cpus.add(cpu.id)
            return None

    async def access(self, cpu: Cpu, addresses: list[int], write: bool = False,
                     stop_on_segv: bool = False) -> cpu_pb2.AccessResponse | None:
        req = cpu_pb2.AccessRequest(addresses=addresses, stop_on_segv=stop_on_segv,
                                    writes=b"\x01" * len(addresses) if write else b"")
        r = await self._call(cpu, cpu.stub.Access(req, timeout=CALL_TIMEOUT_S))
        if r is not None:
            self.m.add(r)
        return r

    async def switch(self, cpu: Cpu, mm: int) -> None:
        await self._call(cpu, cpu.stub.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm),
                                                timeout=CALL_TIMEOUT_S))

    async def syscall(self, cpu: Cpu, **call) -> common_pb2.SyscallResponse:
        """A system call on a CPU the scenario cannot do without."""
        r = await self._call(cpu, cpu.stub.Syscall(common_pb2.SyscallRequest(**call),
                                                   timeout=CALL_TIMEOUT_S))
        if r is None:
            raise FailedPrecondition(f"cpu {cpu.id}, which drives this scenario, left the run")
        self.m.ops += 1
        return r

    async def audit(self) -> None:
        """At a quiescent point: every TLB entry of every CPU against the page tables."""
        dumps = []
        for cpu in self.live(self.cluster.cpus):
            dump = await self._call(cpu, cpu.stub.DumpTlb(cpu_pb2.DumpTlbRequest(), timeout=10))
            if dump is not None:
                dumps.append(dump)
        r = await self.cluster.memory.Audit(memory_pb2.AuditRequest(tlbs=dumps),
                                            timeout=CALL_TIMEOUT_S)
        self.m.audited_entries += r.entries_checked
        self.m.violations.extend(r.violations)

    async def new_process(self, cpus: list[Cpu]) -> int:
        mm = (await self.cluster.memory.CreateMm(memory_pb2.CreateMmRequest(),
                                                  timeout=CALL_TIMEOUT_S)).mm
        await asyncio.gather(*(self.switch(c, mm) for c in cpus))
        return mm


def pages_at(address: int, pages: int) -> list[int]:
    return [address + i * PAGE_SIZE for i in range(pages)]
