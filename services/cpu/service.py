"""The CPU service: a thin gRPC adapter around CpuCore.

It executes one task at a time (a CPU runs one thing), forwards misses and
system calls to the memory service naming itself, answers flushes at any
moment (they interrupt between accesses that wait on the memory service), and
keeps its membership with the coordinator: register, attach a flush stream,
heartbeat; when fenced, flush everything and register again. The membership's rules
(when to flush, when the lease runs, what a registration claims) are
services/cpu/membership.py; here are the calls and one timer for the lease.

An Access that called the memory service sends its hit report after answering (its
walks promised it: services/memory/promises.py); one that did not awaits it. A Run (a
task's consecutive steps in one call) reports once for all its access steps.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Sequence

import grpc

from services.common import wire
from services.common.addresses import USER_VA_END, user_addresses, vpn_of
from services.common.costmodel import CostModel, tlb_events
from services.common.chaos import ChaosCounts, ChaosPlan, epoch_metadata
from services.common.errors import (REASON_CPU_FENCED, FailedPrecondition, InvalidArgument,
                                   SimError, error_of)
from services.common.liveness import Liveness
from services.common.metrics import histogram, labelled, node_registry
from services.common.policy import Policy
from services.common.server import channel, completes, rpc
from services.cpu.core import FAULTED, FENCE_REASONS, CpuCore
from services.cpu.membership import UNREGISTERED, FenceNotice, Membership
from services.cpu.tlb import ELIDED
from tlbsim.v1 import (common_pb2, coordinator_pb2, coordinator_pb2_grpc, cpu_pb2 as pb,
                       cpu_pb2_grpc, memory_pb2, memory_pb2_grpc)

if TYPE_CHECKING:  # aiomqtt is imported only when a CPU uses it
    from services.common.mqtt import MqttLink, MqttUrl

log = logging.getLogger("tlbsim.cpu")

RPC_TIMEOUT_S = 30.0
REPORT_DRAIN_S = 5.0  # a stopping CPU waits this long for its last access report
MAX_ACCESSES = 1 << 20  # per request (a Run's access steps together): bounded work and memory
MAX_RUN_STEPS = 4096


async def _yield() -> None:
    """A long Access lets heartbeats and flushes in (services/cpu/core.py)."""
    await asyncio.sleep(0)


class _Miss:
    """A HandleMissResponse seen through the core's Translation protocol."""
    __slots__ = ("outcome", "pfn", "writable", "tid", "local_flushes", "vt", "overtaken")

    def __init__(self, r: memory_pb2.HandleMissResponse):
        self.outcome = wire.miss_outcome(r.outcome)
        self.pfn, self.writable, self.tid = r.pfn, r.writable, r.tid
        self.local_flushes = r.local_flushes
        self.vt = r.vtime_ns if r.HasField("vtime_ns") else None
        self.overtaken = r.overtaken


def reachable(fn):
    """A partitioned CPU (chaos) answers nothing: every RPC but Chaos is refused."""
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        if self.plan.partitioned:
            self.chaos_counts.calls_refused += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"cpu {self.id} is unreachable (chaos partition)")
        return await fn(self, request, context)
    return wrapper


class CpuNode(cpu_pb2_grpc.CpuServiceServicer):
    service_names = (pb.DESCRIPTOR.services_by_name["CpuService"].full_name,)

    def __init__(self, cpu_id: int, memory: str, coordinator: str, metrics: bool = True,
                 *, mqtt_url: str | None = None, liveness: Liveness | None = None):
        p = Policy()
        self.mqtt_url: MqttUrl | None = None
        if mqtt_url:  # imported only when used: 64 CPUs start faster without it
            from services.common.mqtt import MqttUrl
            self.mqtt_url = MqttUrl.parse(mqtt_url)
        self.mqtt: MqttLink | None = None  # the mqtt transport's link: broadcast flushes
        self.core = CpuCore(cpu_id, p.tlb_entries, p.tlb_ways)
        self.liveness = liveness or Liveness.for_cluster(1)
        self.member = Membership(self.core, self.liveness)  # fenced until registered
        self._beat = coordinator_pb2.HeartbeatRequest(cpu=cpu_id)  # the same every time
        self._lease_timer: asyncio.TimerHandle | None = None
        self._waker: asyncio.Future | None = None  # the heartbeat loop's sleep
        self.heartbeats_failed = 0
        self.cost_model = p.cost_model  # the run's, from Reset: prices the modelled-time metric
        self.memory_address = memory
        self.coordinator_address = coordinator
        self.address = ""
        self.epoch = 0  # the memory epoch this CPU's state belongs to (Reset, registration)
        self.plan = ChaosPlan()  # chaos: what this CPU does wrong on purpose
        self.chaos_counts = ChaosCounts()
        self._reachable = asyncio.Event()  # cleared while partitioned: nothing goes out
        self._reachable.set()
        self._exec = asyncio.Lock()  # one task at a time
        # Access reports sent after their Access answered (services/memory/promises.py):
        # tokens (incarnation << 32 | sequence), and the one in flight.
        self._incarnation = secrets.randbits(31) | 1
        self._reports_sent = 0
        self._report_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._channels: list[grpc.aio.Channel] = []
        # Metrics: the TLB counts in plain ints (read at scrape time); walks are counted
        # and timed once per memory-service round trip, never per lookup, under one kind:
        # batch (a read-ahead Walk), misses (a Walk that also faulted), miss (HandleMiss).
        self.walks = {"batch": 0, "miss": 0, "misses": 0}
        self.registry = node_registry(metrics, "cpu", self._geometry, self._metrics,
                                      lambda: tlb_events(self.core.tlb.counters))
        self._walk_seconds = histogram(
            "tlbsim_page_walk_duration_seconds",
            "Page walks at the memory service, round trip seen by the CPU (batch: a walk "
            "of up to 64 pages; misses: such a walk that also faulted the window's absent "
            "pages; miss: one page's walk, which may fault)", ["cpu", "kind"],
            self.registry if metrics else None)
        self._walk_timers = {k: self._walk_seconds.labels(str(cpu_id), k)
                             for k in self.walks} if self._walk_seconds else {}

    @property
    def id(self) -> int:
        return self.core.id

    # --- lifecycle ---------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        cpu_pb2_grpc.add_CpuServiceServicer_to_server(self, server)

    async def start(self, address: str) -> None:
        self.address = address
        mem, coord = channel(self.memory_address), channel(self.coordinator_address)
        self._channels = [mem, coord]
        self.memory = memory_pb2_grpc.MemoryServiceStub(mem)
        self.coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(coord)
        self._tasks = [asyncio.create_task(self._membership())]
        if self.mqtt_url is not None:
            from services.common.mqtt import MqttLink
            self.mqtt = mqtt = MqttLink(self.mqtt_url, f"cpu{self.id}", [self.mqtt_url.shootdown_topic],
                                 self._on_broadcast, "flushes arrive by the gRPC fallback")
            await mqtt.start()

    async def stop(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.stop()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._report_task is not None:  # the last Access's report goes out first
            await asyncio.wait([self._report_task], timeout=REPORT_DRAIN_S)
            self._report_task.cancel()
        for ch in self._channels:
            await ch.close()

    # --- membership (services/cpu/membership.py has the rules) ------------------------
    async def _register(self) -> None:
        """Register, naming the fence generation we flushed through; told to flush
        first (we are fenced), flush the whole TLB and register again."""
        while True:
            sent = self.core.clock()
            r = await self.coordinator.Register(
                coordinator_pb2.RegisterRequest(cpu=self.id, address=self.address,
                                                flushed_through=self.member.flushed_through),
                timeout=2 * self.liveness.heartbeat_timeout_s, wait_for_ready=True)
            if not self.epoch:  # a fresh process learns the run's memory epoch
                self.epoch = r.epoch
            if not r.fenced:
                was = self.core.fence_reason if self.core.fenced else ""
                self.member.registered_ok(sent, r.lease_s)
                self._arm_lease()
                if was and was != UNREGISTERED:
                    log.info("cpu %d registered again after its fence (%s)", self.id, was)
                return
            self._told_fenced(r.fence_generation, r.fence_reason)

    def _told_fenced(self, generation: int, reason: str) -> None:
        reason = reason or "deadline"
        log.warning("cpu %d is fenced by the coordinator (%s; fence %d): flushing the TLB "
                    "and registering again", self.id, FENCE_REASONS.get(reason, reason),
                    generation)
        self.member.told_fenced(FenceNotice(generation, reason))

    async def _membership(self) -> None:
        """Stay registered, attached and unfenced, whatever happens to the coordinator."""
        stream: asyncio.Task | None = None
        while True:
            try:
                await self._reachable.wait()  # a partitioned CPU sends nothing
                await self._register()
                if stream is None or stream.done():
                    stream = asyncio.create_task(self._attach())
                await self._heartbeats(stream)  # until we must register again
            except grpc.aio.AioRpcError as e:
                log.warning("cpu %d cannot register with the coordinator (%s); retrying",
                            self.id, e.code().name)
                if stream is not None:
                    stream.cancel()
                    stream = None
                await asyncio.sleep(self.liveness.heartbeat_s)

    async def _heartbeats(self, stream: asyncio.Task) -> None:
        """One heartbeat in flight at a time, each an interval after the last was sent (or
        when the last was answered, if later); returns when we must register again: told
        fenced, fenced ourselves, not known, or the flush stream ended."""
        loop = asyncio.get_running_loop()
        interval, timeout = self.liveness.heartbeat_s, self.liveness.heartbeat_timeout_s
        while not stream.done():
            await self._reachable.wait()
            if self.core.fenced:
                return
            sent = self.core.clock()
            try:
                beat = await self.coordinator.Heartbeat(self._beat, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # the coordinator restarted
                    self.member.not_registered()
                    return
                if e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.UNAVAILABLE):
                    raise
                # Late or down: the next heartbeat may be answered; the lease decides.
                self.heartbeats_failed += 1
                log.info("cpu %d: heartbeat failed (%s)", self.id, e.code().name)
            else:
                if beat.fenced:
                    self._told_fenced(beat.fence_generation, beat.fence_reason)
                    return
                if self.member.heartbeat_ok(sent):
                    return  # fenced itself meanwhile (lease, late flush): register
                self._arm_lease()
            await self._sleep(sent / 1e9 + interval - loop.time())

    async def _sleep(self, seconds: float) -> None:
        """The heartbeat loop's pause; `_wake` ends it early (we must register now)."""
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        self._waker = waker = loop.create_future()
        timer = loop.call_later(seconds, _resolve, waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._waker = None

    def _wake(self) -> None:
        if self._waker is not None:
            _resolve(self._waker)

    def _arm_lease(self) -> None:
        """One timer at the lease's end, moved on only when it fires early: an idle CPU
        whose lease runs out flushes then (a busy one stops at its next run or fill,
        services/cpu/core.py)."""
        until = self.core.lease_until_ns
        if self._lease_timer is None and until is not None:
            self._lease_timer = asyncio.get_running_loop().call_at(until / 1e9,
                                                                   self._lease_due)

    def _lease_due(self) -> None:
        self._lease_timer = None
        if self.member.lease_check(self.core.clock()) or self.member.observe():
            self._lease_ran_out()
        elif not self.core.fenced:
            self._arm_lease()  # renewed meanwhile (fenced: armed at the next registration)

    def _lease_ran_out(self) -> None:
        log.warning("cpu %d is fenced by its lease: no heartbeat answered for %.1f s; "
                    "flushing the TLB and registering again", self.id,
                    self.member.lease_ns / 1e9)
        self._wake()

    async def _attach(self) -> None:
        """The stream transport: flushes arrive on one stream, acks go back on it."""
        acks: asyncio.Queue = asyncio.Queue()

        async def outgoing():
            yield coordinator_pb2.AttachMessage(hello_cpu=self.id)
            while True:
                yield coordinator_pb2.AttachMessage(ack=await acks.get())

        call = self.coordinator.Attach(outgoing())
        async for flush in call:
            if flush.fence_generation:  # the coordinator fenced us: flush, register now
                if not self.plan.partitioned:
                    self._told_fenced(flush.fence_generation, flush.fence_reason)
                    self._wake()
                continue
            ack = self._delivered(flush)
            if ack is None:
                continue  # lost (chaos)
            if self.plan.ack_delay_s:
                self._later(self.plan.ack_delay_s, acks.put_nowait, ack)
            else:
                acks.put_nowait(ack)

    # --- flushes -------------------------------------------------------------------------
    def _apply_flush(self, f: common_pb2.FlushRequest) -> common_pb2.FlushAck:
        """Apply a flush delivered to this CPU and say what it did (the ack)."""
        if f.mm == 0:  # a ping
            return wire.flush_ack(f.shootdown_id, self.id, ELIDED)
        if f.deadline_unix_s and time.time() > f.deadline_unix_s and not self.core.fenced:
            # Too late: the coordinator has fenced us and memory may free the frames.
            log.warning("cpu %d: flush %d came after its deadline: flushing the TLB",
                        self.id, f.shootdown_id)
            self.member.late_flush()
            self._wake()
        arrival = f.arrival_vtime_ns.get(self.id) if f.HasField("sent_vtime_ns") else None
        outcome, removed, done = self.core.take_flush(f, arrival, f.hardware)
        ack = wire.flush_ack(f.shootdown_id, self.id, outcome, removed)
        if done is not None:
            ack.done_vtime_ns = done
        return ack

    def _delivered(self, f: common_pb2.FlushRequest) -> common_pb2.FlushAck | None:
        """A flush as delivered under the fault plan: None when it is lost on the way
        (partitioned, or dropped) — nothing applied, nothing acked."""
        if self.plan.partitioned or self.plan.drops():
            self.chaos_counts.deliveries_dropped += not self.plan.partitioned
            return None
        if self.plan.ack_delay_s:
            self.chaos_counts.acks_delayed += 1
        return self._apply_flush(f)

    def _later(self, delay: float, fn, *args) -> None:
        """chaos: an ack held back (the flush itself was applied at once)."""
        asyncio.get_running_loop().call_later(delay, fn, *args)

    @reachable
    @rpc
    async def Flush(self, request, context):
        ack = self._delivered(request)
        if ack is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"cpu {self.id}: flush delivery lost (chaos)")
        if self.plan.ack_delay_s:
            await asyncio.sleep(self.plan.ack_delay_s)
        return ack

    @rpc
    async def Chaos(self, request, context):
        """Replace the fault plan. Healing a partition first asks the coordinator whether
        we were fenced meanwhile (flushing if so), and only then lets work go on."""
        plan = ChaosPlan(ack_delay_s=request.ack_delay_s, drop_fraction=request.drop_fraction,
                         partitioned=request.partitioned, seed=request.seed)  # validates
        was_partitioned, self.plan = self.plan.partitioned, plan
        if plan.partitioned:
            self._reachable.clear()
        elif was_partitioned:
            sent = self.core.clock()
            try:
                beat = await self.coordinator.Heartbeat(
                    self._beat, timeout=self.liveness.heartbeat_timeout_s)
            except grpc.aio.AioRpcError:
                pass  # cannot tell: the lease decides (the core checks it before serving)
            else:
                if beat.fenced:
                    self._told_fenced(beat.fence_generation, beat.fence_reason)
                elif not self.member.heartbeat_ok(sent):
                    self._arm_lease()
            self._reachable.set()
        log.warning("cpu %d chaos: %s", self.id, plan.describe())
        f = self.chaos_counts
        return pb.ChaosResponse(acks_delayed=f.acks_delayed,
                                deliveries_dropped=f.deliveries_dropped,
                                calls_refused=f.calls_refused)

    async def _on_broadcast(self, message) -> None:
        """The mqtt transport: a shootdown for a target set. Not ours: ignore it. Ours: the
        same path as a Flush, so a duplicate elides by generation and acks again."""
        shootdown = coordinator_pb2.ShootdownRequest.FromString(message.payload)
        if self.id not in shootdown.targets or self.mqtt is None or self.mqtt_url is None:
            return
        ack = self._delivered(shootdown.flush)
        if ack is None:
            return  # lost (chaos)
        # The ack goes at the broadcast's QoS: the run's --mqtt-qos governs both ways.
        publish = functools.partial(self.mqtt.publish_soon, self.mqtt_url.ack_topic,
                                    ack.SerializeToString(), message.qos)
        if self.plan.ack_delay_s:
            self._later(self.plan.ack_delay_s, publish)
        else:
            publish()

    # --- tasks ---------------------------------------------------------------------------
    def _fenced_error(self, e: FailedPrecondition) -> None:
        """Called where a fence refused work, before any await (the CPU may flush and
        register again at the next one): the reason says it is fenced (the load
        generator waits for it to rejoin, then calls again)."""
        if self.core.fenced and not e.reason:
            e.reason = REASON_CPU_FENCED
            if self.member.observe():  # its lease ran out inside the core
                self._lease_ran_out()

    def _require_runnable(self) -> int:
        try:
            return self.core.require_runnable()
        except FailedPrecondition as e:
            self._fenced_error(e)
            raise

    @reachable
    @rpc
    @completes
    async def SwitchMm(self, request, context):
        return await self._switch_mm(request)

    async def _switch_mm(self, request) -> pb.SwitchMmResponse:
        async with self._exec:
            if self.core.fenced:
                self._require_runnable()
            r = await self._to_memory(self.memory.SwitchMm,
                memory_pb2.MemSwitchMmRequest(cpu=self.id, mm=request.mm))
            flushed = self.core.switch(request.mm, r.tlb_gen, r.lazy)
            response = pb.SwitchMmResponse(flushed=flushed)
            if request.HasField("vtime_ns"):
                v = self.core.v
                v.start(request.vtime_ns)
                v.advance(self.cost_model.full_flush_ns if flushed else 0)
                response.vtime_ns = v.clock
            return response

    @reachable
    @rpc
    @completes
    async def Access(self, request, context):
        return await self._access(request, _addresses(request, MAX_ACCESSES))

    async def _access(self, request, addresses: Sequence[int],
                      report: "_Report | None" = None) -> pb.AccessResponse:
        """`report`: a Run's, which reports for its steps (else this Access reports)."""
        own = report is None
        served = report or _Report(self._next_report_token())
        async with self._exec:
            mm = self._require_runnable()
            fault_latency: list[float] = []
            fault_vtime: list[int] = []
            virtual = request.HasField("vtime_ns")
            fence_epoch = self.member.fence_epoch

            def promise() -> int:
                """The report's token: it goes out after the Access (or Run) answers."""
                served.promised = True
                return served.token

            def not_fenced_since() -> None:
                """An Access in flight when the CPU is fenced stops before its next fill,
                even if the CPU has flushed and registered again meanwhile."""
                if self.member.fence_epoch != fence_epoch:
                    self._require_runnable()  # still fenced: says why
                    why = FENCE_REASONS.get(self.member.last_reason, self.member.last_reason)
                    raise FailedPrecondition(
                        f"cpu {self.id} was fenced during this access ({why}); it flushed "
                        "and registered again: call again", REASON_CPU_FENCED)

            async def miss(vpn: int, write: bool, vt: int | None):
                not_fenced_since()
                t0 = time.perf_counter()
                r = await self._to_memory(self.memory.HandleMiss,
                    memory_pb2.HandleMissRequest(cpu=self.id, mm=mm, vpn=vpn, write=write,
                                                 vtime_ns=vt, report_token=promise()))
                self._walked("miss", t0)
                translation = _Miss(r)
                if translation.outcome in FAULTED:
                    fault_latency.append(time.perf_counter() - t0)
                    if vt is not None and translation.vt is not None:
                        fault_vtime.append(translation.vt - vt)
                return translation

            async def walk(batch: list[int]):
                not_fenced_since()
                t0 = time.perf_counter()
                r = await self._to_memory(self.memory.Walk,
                    memory_pb2.WalkRequest(cpu=self.id, mm=mm, vpns=batch,
                                           report_token=promise()))
                self._walked("batch", t0)
                return [(p.pfn, p.writable, p.tid) if p.present else None for p in r.ptes]

            async def misses(vpns: list[int], touches: list[tuple[int, bool, bool]]):
                not_fenced_since()
                t0 = time.perf_counter()
                r = await self._to_memory(self.memory.Walk, memory_pb2.WalkRequest(
                    cpu=self.id, mm=mm, vpns=vpns, touch_vpns=[t[0] for t in touches],
                    touch_writes=[t[1] for t in touches],
                    touch_held=[t[2] for t in touches], report_token=promise()))
                answers: list = [_Miss(m) for m in r.misses]
                self._walked("misses" if answers else "batch", t0)  # one kind per call
                faulted = sum(1 for a in answers if a.outcome in FAULTED)
                if faulted:  # the program waited once for them all: each its share
                    fault_latency.extend([(time.perf_counter() - t0) / len(answers)] * faulted)
                if r.HasField("error"):
                    answers.append(error_of(r.error.code, r.error.message, r.error.reason))
                ptes = [(p.pfn, p.writable, p.tid) if p.present else None for p in r.ptes]
                return ptes, list(zip(r.missed_vpns, r.missed_writes)), answers

            try:
                s = await self.core.run_accesses(
                    addresses, request.writes, miss, walk, request.stop_on_segv, pause=_yield,
                    vt=request.vtime_ns if virtual else None,
                    until=request.until_vtime_ns if request.HasField("until_vtime_ns")
                    else None, misses=misses)
            except FailedPrecondition as e:
                self._fenced_error(e)  # fenced (or its lease ran out) inside the core
                raise
            finally:
                served.mm = mm
                if own:
                    await self._send_report(served)
            return pb.AccessResponse(accesses=s.accesses, hits=s.hits, misses=s.misses,
                                     faults=s.faults, segv=s.segv,
                                     fault_latency_s=fault_latency,
                                     fault_vtime_ns=fault_vtime,
                                     vtime_ns=self.core.v.clock if virtual else None)

    async def _to_memory(self, method, request, epoch: int | None = None):
        """Every call to the memory service: none leaves a partitioned CPU (it waits, as
        a real partition would hold it), each names the epoch our state belongs to, and
        each waits (up to its deadline) for a memory service that is restarting, so that
        it hears the new one's answer, not the gap between the two."""
        if not self._reachable.is_set():
            await self._reachable.wait()
        return await method(request, timeout=RPC_TIMEOUT_S, wait_for_ready=True,
                            metadata=epoch_metadata(self.epoch if epoch is None else epoch))

    async def _send_report(self, report: "_Report") -> None:
        """What was served under `report`: after the answer if a walk promised it (the
        memory service waits for it in Stats, not the caller), else now."""
        if report.promised:
            self._report_after(report.mm, report.token)
        elif report.mm:
            await self._report_hits(report.mm)

    async def _report_hits(self, mm: int) -> None:
        report = self.core.take_hits()
        if report.words:
            await self._to_memory(self.memory.ReportAccesses, memory_pb2.ReportAccessesRequest(
                cpu=self.id, tids=report.words, runs=report.runs, counts=report.counts, mm=mm))

    def _next_report_token(self) -> int:
        self._reports_sent = (self._reports_sent + 1) & 0xFFFF_FFFF
        return self._incarnation << 32 | self._reports_sent

    def _report_after(self, mm: int, token: int) -> None:
        """Send what the Access served, promised by `token`, once it has answered: one
        serial round trip less per Access that walked. Sent even if empty (the memory
        service waits for the token), one at a time, for the epoch the hits belong to."""
        report, epoch, previous = self.core.take_hits(), self.epoch, self._report_task
        request = memory_pb2.ReportAccessesRequest(
            cpu=self.id, tids=report.words, runs=report.runs, counts=report.counts, mm=mm,
            token=token)

        async def send() -> None:
            if previous is not None:  # in order; its failure (logged there) is not ours
                await asyncio.wait([previous])
            try:
                await self._to_memory(self.memory.ReportAccesses, request, epoch)
            except grpc.aio.AioRpcError as e:  # nothing to answer: the Access already did
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # not a bygone epoch's
                    log.warning("cpu %d: an access report was lost (%s): the memory "
                                "service counts it in reports_lost", self.id, e.code().name)
        self._report_task = asyncio.get_running_loop().create_task(send())

    @reachable
    @rpc
    @completes
    async def Syscall(self, request, context):
        return await self._syscall(request)

    async def _syscall(self, request) -> common_pb2.SyscallResponse:
        async with self._exec:
            mm = self._require_runnable()
            virtual = request.HasField("vtime_ns")
            v = self.core.v
            mark = v.mark()
            if virtual:  # the call starts at the CPU's clock (later if it took interrupts)
                v.start(request.vtime_ns)
                request.vtime_ns = v.clock
            try:
                r = await self._to_memory(self.memory.Syscall,
                    memory_pb2.MemSyscallRequest(cpu=self.id, mm=mm, call=request))
            except grpc.aio.AioRpcError:
                v.rewind(mark)  # refused: the memory service changed nothing, nor does the CPU
                raise
            if virtual and r.result.HasField("vtime_ns"):
                v.advance(r.result.vtime_ns - v.clock)  # interrupts meanwhile: taken during
            for f in r.local_flushes:  # the initiator flushes itself
                self.core.local_flush(f, virtual)
            if request.WhichOneof("call") == "exit":
                self.core.switch(0, 0)
            if virtual:
                r.result.vtime_ns = v.clock
            return r.result

    @reachable
    @rpc
    @completes
    async def Run(self, request, context):
        steps = _run_steps(request)  # all checked before any runs
        results: list[pb.StepResult] = []
        # One report for the run's accesses, not one per step (a report is of one mm:
        # a switch sends what was served before it).
        report = _Report(self._next_report_token())
        try:
            for kind, step, addresses in steps:
                t0 = time.perf_counter()
                try:
                    if kind == "access":
                        result = {"access": await self._access(step, addresses, report)}
                    elif kind == "syscall":
                        result = {"syscall": await self._syscall(step)}
                    else:
                        if report.mm:
                            await self._send_report(report)
                            report = _Report(self._next_report_token())
                        result = {"switch_mm": await self._switch_mm(step)}
                except (SimError, grpc.aio.AioRpcError):
                    if not results:
                        raise  # the run's first step: the call's own failure
                    break  # answered below; the caller starts again at this step
                results.append(pb.StepResult(latency_s=time.perf_counter() - t0, **result))
        finally:
            await self._send_report(report)
        return pb.RunResponse(results=results)

    @reachable
    @rpc
    async def DumpTlb(self, request, context):
        c = self.core
        if self.member.lease_check(c.clock()):  # an expired lease shows as fenced (flushed)
            self._lease_ran_out()
        return pb.DumpTlbResponse(
            cpu=self.id, loaded_mm=c.loaded_mm, lazy=c.lazy, fenced=c.fenced,
            local_tlb_gen=c.tlb.local_gen, counters=wire.tlb_counters_to_proto(c.tlb.counters),
            entries=[pb.TlbEntry(mm=mm, vpn=vpn, pfn=e.pfn, writable=e.writable, tid=e.tid)
                     for mm, vpn, e in c.tlb.entries()],
            virtual=pb.VirtualCpu(clock_ns=c.v.clock, busy_ns=c.v.busy, handler_ns=c.v.handler,
                                  late_flush_hits=c.v.late_flush_hits,
                                  interrupts=c.v.interrupts_taken))

    @reachable
    @rpc
    async def Reset(self, request, context):
        p = wire.cpu_policy_from_reset(request)  # validates
        async with self._exec:
            self.core.reset(p.tlb_entries, p.tlb_ways, p.asids, p.cost_model)
            self.epoch = request.epoch or self.epoch
            self.cost_model = p.cost_model
        return pb.CpuResetResponse()

    @reachable
    async def Ping(self, request, context):
        return pb.PingResponse(payload=request.payload)

    # --- metrics ---------------------------------------------------------------------------
    def _walked(self, kind: str, t0: float) -> None:
        self.walks[kind] += 1
        timer = self._walk_timers.get(kind)
        if timer is not None:
            timer.observe(time.perf_counter() - t0)

    def _geometry(self) -> "_TlbShape":
        """What the CPU knows of the run's policy: its TLB's shape (build info)."""
        t = self.core.tlb
        return _TlbShape(t.nsets * t.ways, t.ways, self.cost_model)

    def _metrics(self):
        """Read at scrape time. Counters restart when a run resets the CPU (a new TLB)."""
        c, cpu = self.core.tlb.counters, str(self.id)
        yield labelled("counter", "tlbsim_tlb_lookups", "TLB lookups by result", ["cpu", "result"],
                       [((cpu, "hit"), c.hits), ((cpu, "miss"), c.misses)])
        yield labelled("gauge", "tlbsim_tlb_entries", "Live entries in the TLB", ["cpu"],
                       [((cpu,), len(self.core.tlb))])
        yield labelled("counter", "tlbsim_tlb_evictions", "Live entries evicted by LRU",
                       ["cpu"], [((cpu,), c.evictions)])
        yield labelled("counter", "tlbsim_tlb_flushes",
                       "Flushes applied, by kind: range (page by page), full (the whole mm, "
                       "incl. switch_mm catch-up), elided (generation already current), not-loaded (the CPU no longer runs the mm), hardware (a broadcast's invalidation: no handler)",
                       ["cpu", "kind"], [((cpu, "range"), c.flush_range),
                                         ((cpu, "full"), c.flush_full),
                                         ((cpu, "elided"), c.flush_elided),
                                         ((cpu, "not-loaded"), c.flush_not_loaded),
                                         ((cpu, "hardware"), c.flush_hardware)])
        yield labelled("counter", "tlbsim_tlb_page_invalidations",
                       "Single pages invalidated by range flushes", ["cpu"], [((cpu,), c.flush_page)])
        yield labelled("counter", "tlbsim_flush_requests", "Flush requests received",
                       ["cpu"], [((cpu,), c.flush_requests)])
        yield labelled("counter", "tlbsim_page_walks",
                       "Page walks at the memory service by kind (batch: read-ahead of up "
                       "to 64 pages; miss: one page, may fault; misses: batch walks that also "
                       "faulted the window's absent pages)", ["cpu", "kind"],
                       [((cpu, k), n) for k, n in self.walks.items()])
        yield labelled("gauge", "tlbsim_cpu_fenced", "1 while the CPU is fenced", ["cpu"],
                       [((cpu,), int(self.core.fenced))])
        yield labelled("counter", "tlbsim_cpu_fences",
                       "Times the CPU was fenced, by rule: deadline (the coordinator said "
                       "it missed one), lease (no heartbeat answered in time)",
                       ["cpu", "reason"], [((cpu, r), dict(self.member.fences).get(r, 0))
                                           for r in ("deadline", "lease", "coordinator")])
        yield labelled("counter", "tlbsim_cpu_heartbeats_failed",
                       "Heartbeats not answered within the heartbeat timeout (or refused)",
                       ["cpu"], [((cpu,), self.heartbeats_failed)])
        v = self.core.v  # --timing virtual: the CPU's clock (0 in wall-clock runs)
        yield labelled("gauge", "tlbsim_cpu_virtual_clock_seconds",
                       "--timing virtual: the CPU's virtual clock since the run began",
                       ["cpu"], [((cpu,), v.clock / 1e9)])
        yield labelled("gauge", "tlbsim_cpu_virtual_busy_seconds",
                       "--timing virtual: virtual time the CPU worked (accesses, calls, "
                       "interrupts), by what: handler is the IPI handlers it ran (the "
                       "victim's cost of other CPUs' shootdowns)", ["cpu", "what"],
                       [((cpu, "all"), v.busy / 1e9), ((cpu, "handler"), v.handler / 1e9)])
        yield labelled("gauge", "tlbsim_cpu_virtual_accesses_per_second",
                       "--timing virtual: accesses per virtual second of this CPU's clock",
                       ["cpu"], [((cpu,), (c.hits + c.misses) * 1e9 / v.clock
                                  if v.clock else 0.0)])
        f = self.chaos_counts
        yield labelled("counter", "tlbsim_chaos_faults",
                       "Faults this CPU injected into itself (chaos), by kind", ["cpu", "kind"],
                       [((cpu, "ack_delayed"), f.acks_delayed),
                        ((cpu, "delivery_dropped"), f.deliveries_dropped),
                        ((cpu, "call_refused"), f.calls_refused)])


@dataclasses.dataclass
class _Report:
    """What an Access served, or a Run's access steps of one mm: reported once, with
    the token its walks promised (if any did)."""
    token: int
    mm: int = 0          # the mm it was served for (0: nothing ran yet)
    promised: bool = False


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _TlbShape:
    def __init__(self, entries: int, ways: int, cost_model: CostModel):
        self.entries, self.ways, self.cost_model = entries, ways, cost_model

    def as_dict(self) -> dict:
        return {"tlb_entries": self.entries, "tlb_ways": self.ways,
                "cost_model": self.cost_model.name}


def _addresses(request: pb.AccessRequest, limit: int) -> Sequence[int]:
    """An AccessRequest's addresses, checked (user space, at most `limit`, one write
    flag each if any)."""
    packed = request.packed_addresses
    if packed and request.addresses:
        raise InvalidArgument("addresses and packed_addresses: give one of the two")
    n = len(packed) // 8 if packed else len(request.addresses)
    if n > limit:
        raise InvalidArgument(f"{n} accesses in one request: at most {limit}")
    if request.writes and len(request.writes) != n:
        raise InvalidArgument(f"writes has {len(request.writes)} flags for {n} addresses")
    if packed:  # ~1 ms per 100k addresses; the repeated field's copy and max() ~6 ms
        return user_addresses(packed)
    addresses = request.addresses[:]  # a list: upb copies it out fastest
    if n and max(addresses) >= USER_VA_END:
        for a in addresses:
            vpn_of(a)  # raises, naming the first bad address
    return addresses


def _run_steps(request: pb.RunRequest) -> list[tuple[str, Any, Sequence[int]]]:
    """A Run's steps as (kind, request, an access step's addresses), all checked: a
    malformed one refuses the whole run before any step runs."""
    if len(request.steps) > MAX_RUN_STEPS:
        raise InvalidArgument(f"{len(request.steps)} steps in one run: at most {MAX_RUN_STEPS}")
    steps: list[tuple[str, Any, Sequence[int]]] = []
    total = 0
    for k, step in enumerate(request.steps):
        kind = step.WhichOneof("step")
        if kind is None:
            raise InvalidArgument(f"step {k} is empty: give switch_mm, access or syscall")
        inner = getattr(step, kind)
        if inner.HasField("vtime_ns") or (kind == "access" and inner.HasField("until_vtime_ns")):
            raise InvalidArgument(f"step {k} has a virtual time: a run is wall-clock only "
                                  "(in virtual time each step is its own call)")
        try:
            addresses = _addresses(inner, MAX_ACCESSES) if kind == "access" else ()
        except InvalidArgument as e:
            raise InvalidArgument(f"step {k}: {e.message}") from None
        total += len(addresses)
        steps.append((kind, inner, addresses))
    if total > MAX_ACCESSES:
        raise InvalidArgument(f"{total} accesses in one run: at most {MAX_ACCESSES}")
    return steps
