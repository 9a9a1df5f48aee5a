"""Workloads. Each drives CPUs through the cluster and records what a client sees;
the memory service and coordinator count the rest.

- munmap — LATR's mmap microbenchmark (ASPLOS'18): one process maps --pages pages;
  its threads, one per CPU, touch every page so each TLB holds them, and keep
  reading while the first thread munmaps the range; --rounds times. Look at
  shootdowns and IPIs per munmap and munmap latency, per-page vs gathered.
- fault-scaling — the split page-table lock case (Hugh Dickins 2005: "many-threaded
  application which concurrently initializes different parts of a large anonymous
  area"): threads on CPUs 1..N-1 fault disjoint 2 MiB regions while CPU 0 writes
  and madvise(DONTNEED)s pages of its own 2 MiB (will-it-scale tlb_flush1), holding
  that table's lock across each shootdown. Look at faults/s, fault latency and lock
  wait, mm vs split.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable

import grpc

from loadgen.cluster import Cluster, Cpu
from services.common.addresses import PAGE_SIZE, PTE_TABLE_PAGES
from services.common.errors import FailedPrecondition
from services.common.policy import Policy
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

log = logging.getLogger("tlbsim.loadgen")
CALL_TIMEOUT_S = 120.0
READER_SAMPLE = 64       # pages a concurrent reader touches per request
READER_PAUSE_S = 0.0005  # between a reader's requests
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


async def munmap(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    initiator = cpus[0]
    await d.new_process(cpus)
    for rnd in range(cfg.rounds):
        r = await d.syscall(initiator, mmap=common_pb2.MmapArgs(pages=cfg.pages, writable=True))
        addresses = pages_at(r.address, cfg.pages)
        await d.access(initiator, addresses, write=True)  # fault every page in
        others = d.live(cpus[1:])
        await asyncio.gather(*(d.access(c, addresses) for c in others))
        await d.audit()  # quiescent: every CPU holds the range
        done = asyncio.Event()

        sample = addresses[::max(1, len(addresses) // READER_SAMPLE)]

        async def reader(cpu: Cpu) -> None:
            # A thread that stays on its CPU and keeps using the mapping: it must see
            # the old pages until its flush, then fault (the mapping is gone). It reads
            # a spread sample and pauses, so it interrupts rather than saturates.
            while not done.is_set():
                r = await d.access(cpu, sample, stop_on_segv=True)
                if r is None or r.segv:
                    return
                await asyncio.sleep(READER_PAUSE_S)

        readers = [asyncio.create_task(reader(c)) for c in others] if cfg.readers else []
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        await d.syscall(initiator, munmap=common_pb2.RangeArgs(address=r.address,
                                                               pages=cfg.pages))
        d.m.munmap_latency_s.append(time.perf_counter() - t0)
        done.set()
        await asyncio.gather(*readers)
        d.m.rounds_done = rnd + 1
        progress(rnd + 1)


async def fault_scaling(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    if len(cpus) < 2:
        raise FailedPrecondition("fault-scaling needs at least 2 CPUs: one unmaps, the rest fault")
    churner, faulters = cpus[0], cpus[1:]
    await d.new_process(cpus)
    region = max(cfg.pages, PTE_TABLE_PAGES)
    # The churner's own 2 MiB: it stays mapped, so every zap flushes under that
    # table's lock (the mm's page_table_lock in mm mode) and frees no table.
    own = (await d.syscall(churner, mmap=common_pb2.MmapArgs(pages=PTE_TABLE_PAGES,
                                                            writable=True))).address
    for rnd in range(cfg.rounds):
        regions = [(await d.syscall(churner, mmap=common_pb2.MmapArgs(
            pages=region, writable=True))).address for _ in faulters]
        done = asyncio.Event()

        async def churn() -> None:
            # will-it-scale tlb_flush1: write a page, madvise(DONTNEED) it, again.
            page = 0
            while not done.is_set():
                address = own + (page % PTE_TABLE_PAGES) * PAGE_SIZE
                await d.access(churner, [address], write=True)
                t0 = time.perf_counter()
                await d.syscall(churner, madvise_dontneed=common_pb2.RangeArgs(
                    address=address, pages=1))
                d.m.munmap_latency_s.append(time.perf_counter() - t0)
                page += 1

        async def fault_in(cpu: Cpu, base: int) -> None:
            for chunk in range(0, region, 64):
                await d.access(cpu, pages_at(base + chunk * PAGE_SIZE, 64), write=True)

        churning = asyncio.create_task(churn())
        await asyncio.gather(*(fault_in(c, base) for c, base in zip(faulters, regions)))
        done.set()
        await churning
        for base in regions:
            await d.syscall(churner, munmap=common_pb2.RangeArgs(address=base, pages=region))
        d.m.rounds_done = rnd + 1
        progress(rnd + 1)


Scenario = Callable[[Driver, RunConfig, Progress], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {"munmap": munmap, "fault-scaling": fault_scaling}
