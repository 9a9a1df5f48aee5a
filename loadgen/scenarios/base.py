"""What every scenario shares: its configuration, what the client measures, and a
driver whose CPU calls ride out a fenced CPU (it flushes and rejoins: the call is made
again) and tolerate one leaving mid-run (killed, unreachable: the run goes on without it).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable, Iterator

import grpc

from loadgen.cluster import Cluster, Cpu
from loadgen.vsched import DEFAULT_QUANTUM_NS, VirtualScheduler
from services.common.addresses import PAGE_SIZE, pack_addresses, user_addresses
from services.common.costmodel import Events
from services.common.chaos import MACHINE_LOST
from services.common.errors import (REASON_CPU_FENCED, REASON_CPU_LEFT, REASON_MACHINE_LOST,
                                    REASON_RUN_RESET, FailedPrecondition)
from services.common.policy import Policy
from services.common.server import reason_of
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

log = logging.getLogger("tlbsim.loadgen")
CALL_TIMEOUT_S = 120.0
# Errors that mean a CPU left the run (killed, restarting, unreachable, fenced for good):
# the run goes on without it.
CPU_LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.FAILED_PRECONDITION}
REJOIN_BACKOFF_S = (0.05, 0.5)  # calling a fenced CPU again while it rejoins
PROBE_TIMEOUT_S = 15.0  # is the memory service (the machine) still the same one?
RUN_STEPS = 1024  # steps per Run call at most (the CPU takes up to 4096)


class CpuLeft(FailedPrecondition):
    """A CPU a scenario's step needed left the run (killed, unreachable, or fenced and
    not back in time)."""

    def __init__(self, message: str):
        super().__init__(message, REASON_CPU_LEFT)


def machine_lost(e: grpc.aio.AioRpcError) -> bool:
    """The memory service restarted (or another run reset it): the run cannot go on. Said
    by the reason the memory service attaches (relayed by a CPU), not by the wording."""
    return reason_of(e) in (REASON_MACHINE_LOST, REASON_RUN_RESET)


def run_lost(e: grpc.aio.AioRpcError) -> FailedPrecondition:
    """The error that ends a run whose machine is gone, with the service's reason."""
    return FailedPrecondition(e.details() or "the simulated machine was lost", reason_of(e))


@dataclasses.dataclass
class RunConfig:
    scenario: str
    policy: Policy
    cpus: int = 4
    pages: int = 512
    rounds: int = 5
    seed: int = 0
    readers: bool = True
    duration: float | None = None  # seconds: run rounds until then, instead of --rounds
    ops: int | None = None         # or until this many accesses + system calls
    mix: str | None = None         # mixed: weights, e.g. "mmap=4,munmap=3,read=2"
    trace: str | None = None       # replay: the trace file
    speed: float = 0.0             # replay: 0 = as fast as possible, 1 = the recorded pace
    children: int = 2              # fork, shared-write, swapout: processes forked
    resident: int = 4096           # ...: pages the parent has resident before forking
    quantum_ns: int = DEFAULT_QUANTUM_NS  # --timing virtual: an access batch's longest turn

    def as_dict(self) -> dict:
        return {"cpus": self.cpus, "pages": self.pages, "rounds": self.rounds,
                "seed": self.seed, "readers": self.readers, "duration_s": self.duration,
                "ops": self.ops, "mix": self.mix, "trace": self.trace, "speed": self.speed,
                "children": self.children, "resident": self.resident,
                **self.policy.as_dict()}

    def progress_total(self) -> int:
        """What `progress` counts to: rounds, or per mille of --duration / --ops, or of a
        replay's events (one long replay is one round)."""
        return PERMILLE if self.duration or self.ops or self.trace else self.rounds


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
    fenced_waits: int = 0  # calls that found their CPU fenced and waited for it to rejoin
    rounds_done: int = 0
    audited_entries: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)
    # Every system call a Driver issued, by kind, and its latency seen by the client.
    syscalls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    syscall_latency_s: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    extra: dict = dataclasses.field(default_factory=dict)  # scenario-specific results
    vextra: dict = dataclasses.field(default_factory=dict)  # ... in virtual time
    # Shootdowns each kind of system call issued (modelled time attributes flush costs).
    syscall_shootdowns: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    # The machine's events at the end of a scenario's warm-up (loadgen/modelled.py): when
    # set, modelled time covers only what followed.
    modelled_from: Events | None = None
    # --timing virtual: each operation's virtual duration, by kind (fault, munmap,
    # madvise_dontneed, mprotect, fork, access_batch, ...), in ns.
    vlatency_ns: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))

    def add(self, r: cpu_pb2.AccessResponse) -> None:
        self.ops += r.accesses
        self.accesses += r.accesses
        self.hits += r.hits
        self.faults += r.faults
        self.segv += r.segv
        self.fault_latency_s.extend(r.fault_latency_s)
        self.vlatency_ns["fault"].extend(r.fault_vtime_ns)


Progress = Callable[[int], None]  # called with how far the run is, in progress_total() units
PERMILLE = 1000  # progress units of a --duration / --ops run, and of a replay


class Driver:
    """CPU calls that tolerate a CPU leaving mid-run (it is fenced, the run goes on)."""

    call_timeout_s = CALL_TIMEOUT_S  # every call's deadline (the soak sets its own)

    def __init__(self, cluster: Cluster, m: Measurements,
                 virtual: VirtualScheduler | None = None):
        self.cluster = cluster
        self.m = m
        self.virtual = virtual  # --timing virtual: work is issued in virtual-time order
        self.rejoin_s = cluster.liveness.rejoin_s  # a fenced CPU is waited for this long
        self.started = time.perf_counter()
        self.stopping = False  # Ctrl-C: finish the calls in flight, start no more rounds

    def done(self, cfg: RunConfig, rnd: int) -> float:
        """How far the run is: rounds, or the share of --duration / --ops used."""
        if cfg.duration:
            return (time.perf_counter() - self.started) / cfg.duration
        if cfg.ops:
            return self.m.ops / cfg.ops
        return rnd / cfg.rounds

    def rounds(self, cfg: RunConfig, progress: Progress) -> Iterator[int]:
        """Round numbers until --rounds, --duration or --ops is reached (at least one);
        after each round it records the rounds done and reports progress."""
        rnd = 0
        while not self.stopping and (rnd == 0 or self.done(cfg, rnd) < 1):
            yield rnd
            rnd += 1
            self.m.rounds_done = rnd
            progress(rnd if cfg.progress_total() != PERMILLE
                     else min(PERMILLE, int(self.done(cfg, rnd) * PERMILLE)))

    def time_left(self, cfg: RunConfig) -> bool:
        """Inside a round: False once --duration or --ops is reached (or on Ctrl-C)."""
        if self.stopping:
            return False
        if cfg.duration:
            return time.perf_counter() - self.started < cfg.duration
        if cfg.ops:
            return self.m.ops < cfg.ops
        return True

    def live(self, cpus: list[Cpu]) -> list[Cpu]:
        return [c for c in cpus if c.id not in self.m.lost_cpus]

    async def _call(self, cpu: Cpu, method, request, timeout: float | None = None):
        """One call to a CPU. Fenced (it flushes and re-registers by itself): call again
        until it is back, for up to `rejoin_s` — a fenced call did nothing (a system call
        checks first) or only served accesses, which may be served again. Killed or
        unreachable, or fenced for longer: it leaves the run (None)."""
        if cpu.id in self.m.lost_cpus:
            return None
        loop = asyncio.get_running_loop()
        give_up, backoff = None, REJOIN_BACKOFF_S[0]
        while True:
            try:
                return await self._attempt(method, request, timeout or self.call_timeout_s)
            except grpc.aio.AioRpcError as e:
                if machine_lost(e):
                    raise run_lost(e) from None
                if e.code() not in CPU_LOST:
                    raise
                if reason_of(e) == REASON_CPU_FENCED:
                    give_up = give_up or loop.time() + self.rejoin_s
                    if loop.time() < give_up:
                        if backoff == REJOIN_BACKOFF_S[0]:
                            self.m.fenced_waits += 1
                            log.info("cpu %d is fenced; waiting for it to rejoin: %s",
                                     cpu.id, e.details())
                        await asyncio.sleep(backoff)
                        backoff = min(2 * backoff, REJOIN_BACKOFF_S[1])
                        continue
                elif e.code() == grpc.StatusCode.UNAVAILABLE:
                    await self._machine_still_there()  # a memory restart: say that
                log.warning("cpu %d left the run: %s %s", cpu.id, e.code().name, e.details())
                self.m.lost_cpus.add(cpu.id)
                self.cpu_left(cpu)
                return None

    async def _attempt(self, method, request, timeout: float):
        return await method(request, timeout=timeout)

    def cpu_left(self, cpu: Cpu) -> None:
        """A hook: the soak counts them."""

    async def _machine_still_there(self) -> None:
        """A CPU unreachable may be a CPU whose memory service is gone (it relays the
        failure): if the memory service restarted, the run is over, and says so."""
        try:
            stats = await self.cluster.memory.Stats(memory_pb2.MemoryStatsRequest(),
                                                    timeout=PROBE_TIMEOUT_S,
                                                    wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise FailedPrecondition(f"the memory service is unreachable ({e.code().name}): "
                                     f"{MACHINE_LOST}", REASON_MACHINE_LOST) from None
        if self.cluster.epoch and stats.epoch >> 32 != self.cluster.epoch >> 32:
            raise FailedPrecondition(MACHINE_LOST, REASON_MACHINE_LOST)

    # --- concurrency, in wall-clock or virtual time ---------------------------------------
    async def gather(self, *coros: Awaitable[Any]) -> list[Any]:
        """Run a scenario's threads concurrently (in virtual time, one operation at a
        time, in virtual-time order: loadgen/vsched.py)."""
        if self.virtual is not None:
            return await self.virtual.gather(*coros)
        return list(await asyncio.gather(*coros))

    async def pause(self, cpu: Cpu, seconds: float) -> None:
        """The thread on `cpu` waits `seconds` (of virtual time, in a virtual run)."""
        if self.virtual is not None:
            self.virtual.pause(cpu.id, seconds)
        else:
            await asyncio.sleep(seconds)

    def start_together(self, cpus: list[Cpu], vt: int) -> None:
        """Virtual time: the threads on `cpus` start their next work no earlier than `vt`
        (they waited for each other)."""
        if self.virtual is not None:
            for c in cpus:
                self.virtual.reached(c.id, vt)

    @staticmethod
    def wall() -> float:
        return time.perf_counter()

    def now(self, cpu: Cpu) -> int:
        """The CPU's virtual clock, ns (0 in a wall-clock run)."""
        return self.virtual.clock[cpu.id] if self.virtual is not None else 0

    async def _timed(self, cpu: Cpu, method, request):
        """A call in the run's time: in virtual time it waits for its turn, starts at the
        CPU's clock and moves the clock to the answer's."""
        vs = self.virtual
        if vs is None:
            return await self._call(cpu, method, request)
        request.vtime_ns = await vs.turn(cpu.id)
        r = await self._call(cpu, method, request)
        if r is not None and r.HasField("vtime_ns"):
            vs.reached(cpu.id, r.vtime_ns)
        return r

    async def access(self, cpu: Cpu, addresses: list[int], write: bool = False,
                     stop_on_segv: bool = False,
                     writes: bytes = b"") -> cpu_pb2.AccessResponse | None:
        """`write` makes every access a write; `writes` gives one flag per address. In
        virtual time the batch runs a quantum at a time (each one a turn)."""
        writes = writes or (b"\x01" * len(addresses) if write else b"")
        vs = self.virtual
        if vs is None:
            req = cpu_pb2.AccessRequest(packed_addresses=pack_addresses(addresses),
                                        stop_on_segv=stop_on_segv, writes=writes)
            r = await self._call(cpu, cpu.stub.Access, req)
            if r is not None:
                self.m.add(r)
            return r
        total, done, start = cpu_pb2.AccessResponse(), 0, None
        while done < len(addresses):
            vt = await vs.turn(cpu.id)
            start = vt if start is None else start
            req = cpu_pb2.AccessRequest(packed_addresses=pack_addresses(addresses[done:]),
                                        writes=writes[done:],
                                        stop_on_segv=stop_on_segv, vtime_ns=vt,
                                        until_vtime_ns=vt + vs.quantum_ns)
            r = await self._call(cpu, cpu.stub.Access, req)
            if r is None:
                return None
            self.m.add(r)
            vs.reached(cpu.id, r.vtime_ns)
            for f in ("accesses", "hits", "misses", "faults", "segv"):
                setattr(total, f, getattr(total, f) + getattr(r, f))
            total.fault_latency_s.extend(r.fault_latency_s)
            total.fault_vtime_ns.extend(r.fault_vtime_ns)
            done += r.accesses
            if r.segv and stop_on_segv:
                break
        total.vtime_ns = vs.clock[cpu.id]
        self.m.vlatency_ns["access_batch"].append(total.vtime_ns - (start or 0))
        return total

    async def switch(self, cpu: Cpu, mm: int) -> None:
        await self._timed(cpu, cpu.stub.SwitchMm, cpu_pb2.SwitchMmRequest(mm=mm))

    async def syscall(self, cpu: Cpu, **call) -> common_pb2.SyscallResponse:
        """A system call on a CPU the scenario cannot do without."""
        return await self._syscall(cpu, common_pb2.SyscallRequest(**call))

    async def _syscall(self, cpu: Cpu, request: common_pb2.SyscallRequest
                       ) -> common_pb2.SyscallResponse:
        kind = request.WhichOneof("call")
        t0 = time.perf_counter()
        r = await self._timed(cpu, cpu.stub.Syscall, request)
        if r is None:
            raise CpuLeft(f"cpu {cpu.id}, which drives this scenario, left the run")
        if r.HasField("vtime_ns"):
            self.m.vlatency_ns[kind].append(r.vtime_ns - request.vtime_ns)
        self._syscall_done(kind, r, time.perf_counter() - t0)
        return r

    def _syscall_done(self, kind: str, r: common_pb2.SyscallResponse, latency_s: float) -> None:
        self.m.syscall_latency_s[kind].append(latency_s)
        self.m.syscalls[kind] += 1
        self.m.syscall_shootdowns[kind] += r.shootdowns
        self.m.ops += 1

    async def run(self, cpu: Cpu, steps: list[cpu_pb2.Step]) -> list[cpu_pb2.StepResult]:
        """A task's consecutive steps on `cpu`, in order, each measured as its own call
        would be. In wall-clock time they go in Run calls (up to RUN_STEPS each; a
        step's latency is then the CPU's: the call carries many); in virtual time each
        is its own call, taking its turn."""
        if self.virtual is not None:
            return [await self._step(cpu, step) for step in steps]
        results: list[cpu_pb2.StepResult] = []
        while len(results) < len(steps):
            r = await self._call(cpu, cpu.stub.Run, cpu_pb2.RunRequest(
                steps=steps[len(results):len(results) + RUN_STEPS]))
            if r is None:
                raise CpuLeft(f"cpu {cpu.id}, which drives this scenario, left the run")
            if not r.results:  # (a run fails at its first step: a status, not this)
                raise FailedPrecondition(f"cpu {cpu.id} answered a run doing nothing")
            for step, result in zip(steps[len(results):], r.results):
                if result.HasField("access"):
                    self.m.add(result.access)
                elif result.HasField("syscall"):
                    self._syscall_done(step.syscall.WhichOneof("call"), result.syscall,
                                       result.latency_s)
            results.extend(r.results)  # short of the steps: one failed; it is sent again
        return results

    async def _step(self, cpu: Cpu, step: cpu_pb2.Step) -> cpu_pb2.StepResult:
        """One step as its own call."""
        kind = step.WhichOneof("step")
        if kind == "syscall":
            return cpu_pb2.StepResult(syscall=await self._syscall(cpu, step.syscall))
        if kind == "switch_mm":
            await self.switch(cpu, step.switch_mm.mm)
            return cpu_pb2.StepResult(switch_mm=cpu_pb2.SwitchMmResponse())
        a = step.access
        r = await self.access(cpu, list(user_addresses(a.packed_addresses)), writes=a.writes,
                              stop_on_segv=a.stop_on_segv)
        if r is None:
            raise CpuLeft(f"cpu {cpu.id}, which drives this scenario, left the run")
        return cpu_pb2.StepResult(access=r)

    async def audit(self) -> None:
        """At a quiescent point: every TLB entry of every CPU against the page tables."""
        self.dumps: list[cpu_pb2.DumpTlbResponse] = []
        dumps = self.dumps
        for cpu in self.live(self.cluster.cpus):
            dump = await self._call(cpu, cpu.stub.DumpTlb, cpu_pb2.DumpTlbRequest(), timeout=10)
            if dump is not None:
                dumps.append(dump)
        r = await self._memory(self.cluster.memory.Audit, memory_pb2.AuditRequest(tlbs=dumps))
        self.m.audited_entries += r.entries_checked
        self.m.violations.extend(r.violations)

    async def _memory(self, method, request):
        """A call to the memory service about this run's machine (it names the epoch). A
        memory service restarting is waited for: it then refuses our epoch (lost)."""
        try:
            return await method(request, timeout=self.call_timeout_s,
                                metadata=self.cluster.meta(), wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            if machine_lost(e):
                raise run_lost(e) from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                await self._machine_still_there()
            raise

    async def create_mm(self) -> int:
        return (await self._memory(self.cluster.memory.CreateMm,
                                   memory_pb2.CreateMmRequest())).mm

    async def new_process(self, cpus: list[Cpu]) -> int:
        mm = await self.create_mm()
        await self.gather(*(self.switch(c, mm) for c in cpus))
        return mm


def pages_at(address: int, pages: int) -> list[int]:
    return [address + i * PAGE_SIZE for i in range(pages)]
