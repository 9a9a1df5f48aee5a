"""The CPU service: a thin gRPC adapter around CpuCore.

It executes one task at a time (a CPU runs one thing), forwards misses and
system calls to the memory service naming itself, answers flushes at any
moment (they interrupt between accesses that wait on the memory service), and
keeps its membership with the coordinator: register, attach a flush stream,
heartbeat; when fenced, flush everything and register again.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from services.common.addresses import vpn_of
from services.common.errors import InvalidArgument
from services.common.metrics import histogram, labelled, node_registry
from services.common.mqtt import MqttLink, MqttUrl
from services.common.policy import Policy
from services.common.server import channel, completes, rpc
from services.cpu.core import CpuCore
from services.cpu.tlb import ELIDED, FULL, RANGE
from tlbsim.v1 import (common_pb2, coordinator_pb2, coordinator_pb2_grpc, cpu_pb2 as pb,
                       cpu_pb2_grpc, memory_pb2, memory_pb2_grpc)

log = logging.getLogger("tlbsim.cpu")

OUTCOME = {RANGE: common_pb2.FLUSH_OUTCOME_RANGE, FULL: common_pb2.FLUSH_OUTCOME_FULL,
           ELIDED: common_pb2.FLUSH_OUTCOME_ELIDED}
MISS = {memory_pb2.MISS_OUTCOME_WALKED: "walked", memory_pb2.MISS_OUTCOME_FAULT_ANON: "anon",
        memory_pb2.MISS_OUTCOME_FAULT_COW: "cow", memory_pb2.MISS_OUTCOME_FAULT_PROT: "prot",
        memory_pb2.MISS_OUTCOME_SEGV: "segv", memory_pb2.MISS_OUTCOME_SWAP_IN: "swapin"}
HEARTBEAT_S = 0.25
RPC_TIMEOUT_S = 30.0
MAX_ACCESSES = 1 << 20  # per request: bounded work and memory


class _Miss:
    """A HandleMissResponse seen through the core's Translation protocol."""
    __slots__ = ("outcome", "pfn", "writable", "tid", "local_flushes")

    def __init__(self, r: memory_pb2.HandleMissResponse):
        self.outcome = MISS[r.outcome]
        self.pfn, self.writable, self.tid = r.pfn, r.writable, r.tid
        self.local_flushes = r.local_flushes


class CpuNode(cpu_pb2_grpc.CpuServiceServicer):
    service_names = (pb.DESCRIPTOR.services_by_name["CpuService"].full_name,)

    def __init__(self, cpu_id: int, memory: str, coordinator: str, metrics: bool = True,
                 *, mqtt_url: str | None = None):
        p = Policy()
        self.mqtt_url = MqttUrl.parse(mqtt_url) if mqtt_url else None
        self.mqtt: MqttLink | None = None  # the mqtt transport: broadcast flushes
        self.core = CpuCore(cpu_id, p.tlb_entries, p.tlb_ways)
        self.memory_address = memory
        self.coordinator_address = coordinator
        self.address = ""
        self._exec = asyncio.Lock()  # one task at a time
        self._tasks: list[asyncio.Task] = []
        self._channels: list[grpc.aio.Channel] = []
        # Metrics: the TLB counts in plain ints (read at scrape time); walks are counted
        # and timed once per memory-service round trip, never per lookup.
        self.walks = {"batch": 0, "miss": 0}
        self.registry = node_registry(metrics, "cpu", self._geometry, self._metrics)
        self._walk_seconds = histogram(
            "tlbsim_page_walk_duration_seconds",
            "Page walks at the memory service, round trip seen by the CPU (a batch walk "
            "reads up to 64 pages; a miss walk may fault)", ["cpu", "kind"],
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
            self.mqtt = MqttLink(self.mqtt_url, f"cpu{self.id}", [self.mqtt_url.shootdown_topic],
                                 self._on_broadcast, "flushes arrive by the gRPC fallback")
            await self.mqtt.start()

    async def stop(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ch in self._channels:
            await ch.close()

    async def _register(self) -> None:
        await self.coordinator.Register(
            coordinator_pb2.RegisterRequest(cpu=self.id, address=self.address),
            timeout=RPC_TIMEOUT_S, wait_for_ready=True)
        self.core.fenced = False

    async def _membership(self) -> None:
        """Stay registered, attached and unfenced, whatever happens to the coordinator."""
        stream: asyncio.Task | None = None
        while True:
            try:
                await self._register()
                stream = asyncio.create_task(self._attach())
                while not stream.done():
                    beat = await self.coordinator.Heartbeat(
                        coordinator_pb2.HeartbeatRequest(cpu=self.id), timeout=5)
                    if beat.fenced:
                        log.warning("cpu %d fenced: flushing the TLB and re-registering", self.id)
                        self.core.fence()
                        await self._register()
                    await asyncio.sleep(HEARTBEAT_S)
            except grpc.aio.AioRpcError as e:
                log.warning("cpu %d lost the coordinator (%s); retrying", self.id, e.code().name)
                await asyncio.sleep(HEARTBEAT_S)
            finally:
                if stream is not None:
                    stream.cancel()

    async def _attach(self) -> None:
        """The stream transport: flushes arrive on one stream, acks go back on it."""
        acks: asyncio.Queue = asyncio.Queue()

        async def outgoing():
            yield coordinator_pb2.AttachMessage(hello_cpu=self.id)
            while True:
                yield coordinator_pb2.AttachMessage(ack=await acks.get())

        call = self.coordinator.Attach(outgoing())
        async for flush in call:
            acks.put_nowait(self._flush(flush))

    # --- flushes -------------------------------------------------------------------------
    def _flush(self, f: common_pb2.FlushRequest) -> common_pb2.FlushAck:
        if f.mm == 0:  # a ping
            return common_pb2.FlushAck(shootdown_id=f.shootdown_id, cpu=self.id,
                                       outcome=common_pb2.FLUSH_OUTCOME_ELIDED)
        if f.deadline_unix_s and time.time() > f.deadline_unix_s:
            # Too late: the coordinator has fenced us and memory may free the frames.
            self.core.fence()
        outcome, removed = self.core.apply_flush(f)
        return common_pb2.FlushAck(shootdown_id=f.shootdown_id, cpu=self.id,
                                   outcome=OUTCOME[outcome], entries_removed=removed)

    @rpc
    async def Flush(self, request, context):
        return self._flush(request)

    async def _on_broadcast(self, message) -> None:
        """The mqtt transport: a shootdown for a target set. Not ours: ignore it. Ours: the
        same path as a Flush, so a duplicate elides by generation and acks again."""
        shootdown = coordinator_pb2.ShootdownRequest.FromString(message.payload)
        if self.id not in shootdown.targets:
            return
        ack = self._flush(shootdown.flush)
        # The ack goes at the broadcast's QoS: the run's --mqtt-qos governs both ways.
        self.mqtt.publish_soon(self.mqtt_url.ack_topic, ack.SerializeToString(), message.qos)

    # --- tasks ---------------------------------------------------------------------------
    @rpc
    @completes
    async def SwitchMm(self, request, context):
        async with self._exec:
            if self.core.fenced:
                self.core.require_runnable()
            r = await self.memory.SwitchMm(
                memory_pb2.MemSwitchMmRequest(cpu=self.id, mm=request.mm), timeout=RPC_TIMEOUT_S)
            return pb.SwitchMmResponse(flushed=self.core.switch(request.mm, r.tlb_gen, r.lazy))

    @rpc
    @completes
    async def Access(self, request, context):
        n = len(request.addresses)
        if n > MAX_ACCESSES:
            raise InvalidArgument(f"{n} accesses in one request: at most {MAX_ACCESSES}")
        if request.writes and len(request.writes) != n:
            raise InvalidArgument(f"writes has {len(request.writes)} flags for {n} addresses")
        vpns = [vpn_of(a) for a in request.addresses]
        async with self._exec:
            mm = self.core.require_runnable()
            fault_latency: list[float] = []

            async def miss(vpn: int, write: bool):
                t0 = time.perf_counter()
                r = await self.memory.HandleMiss(
                    memory_pb2.HandleMissRequest(cpu=self.id, mm=mm, vpn=vpn, write=write),
                    timeout=RPC_TIMEOUT_S)
                self._walked("miss", t0)
                if r.outcome in (memory_pb2.MISS_OUTCOME_FAULT_ANON,
                                 memory_pb2.MISS_OUTCOME_FAULT_COW,
                                 memory_pb2.MISS_OUTCOME_SWAP_IN):
                    fault_latency.append(time.perf_counter() - t0)
                return _Miss(r)

            async def walk(batch: list[int]):
                t0 = time.perf_counter()
                r = await self.memory.Walk(memory_pb2.WalkRequest(cpu=self.id, mm=mm, vpns=batch),
                                           timeout=RPC_TIMEOUT_S)
                self._walked("batch", t0)
                return [(p.pfn, p.writable, p.tid) if p.present else None for p in r.ptes]

            try:
                s = await self.core.run_accesses(vpns, request.writes, miss, walk,
                                                 request.stop_on_segv)
            finally:
                await self._report_hits()
            return pb.AccessResponse(accesses=s.accesses, hits=s.hits, misses=s.misses,
                                     faults=s.faults, segv=s.segv,
                                     fault_latency_s=fault_latency)

    async def _report_hits(self) -> None:
        words, times = self.core.take_hits()
        if words:
            await self.memory.ReportAccesses(
                memory_pb2.ReportAccessesRequest(cpu=self.id, tids=words, times=times),
                timeout=RPC_TIMEOUT_S)

    @rpc
    @completes
    async def Syscall(self, request, context):
        async with self._exec:
            mm = self.core.require_runnable()
            r = await self.memory.Syscall(
                memory_pb2.MemSyscallRequest(cpu=self.id, mm=mm, call=request),
                timeout=RPC_TIMEOUT_S)
            for f in r.local_flushes:  # the initiator flushes itself
                self.core.apply_flush(f)
            if request.WhichOneof("call") == "exit":
                self.core.switch(0, 0)
            return r.result

    @rpc
    async def DumpTlb(self, request, context):
        c = self.core
        counters = pb.TlbCounters(**vars(c.tlb.counters))
        return pb.DumpTlbResponse(
            cpu=self.id, loaded_mm=c.loaded_mm, lazy=c.lazy, fenced=c.fenced,
            local_tlb_gen=c.tlb.local_gen, counters=counters,
            entries=[pb.TlbEntry(mm=mm, vpn=vpn, pfn=e.pfn, writable=e.writable, tid=e.tid)
                     for mm, vpn, e in c.tlb.entries()])

    @rpc
    async def Reset(self, request, context):
        p = Policy(tlb_entries=request.tlb_entries, tlb_ways=request.tlb_ways)  # validates
        async with self._exec:
            self.core.reset(p.tlb_entries, p.tlb_ways)
        return pb.CpuResetResponse()

    async def Ping(self, request, context):
        return pb.PingResponse(payload=request.payload)

    # --- metrics ---------------------------------------------------------------------------
    def _walked(self, kind: str, t0: float) -> None:
        self.walks[kind] += 1
        timer = self._walk_timers.get(kind)
        if timer is not None:
            timer.observe(time.perf_counter() - t0)

    def _geometry(self) -> Policy:
        """What the CPU knows of the run's policy: its TLB's shape (build info)."""
        t = self.core.tlb
        return _TlbShape(t.nsets * t.ways, t.ways)

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
                       "incl. switch_mm catch-up), elided (generation already current)",
                       ["cpu", "kind"], [((cpu, "range"), c.flush_range),
                                         ((cpu, "full"), c.flush_full),
                                         ((cpu, "elided"), c.flush_elided)])
        yield labelled("counter", "tlbsim_tlb_page_invalidations",
                       "Single pages invalidated by range flushes", ["cpu"], [((cpu,), c.flush_page)])
        yield labelled("counter", "tlbsim_flush_requests", "Flush requests received",
                       ["cpu"], [((cpu,), c.flush_requests)])
        yield labelled("counter", "tlbsim_page_walks",
                       "Page walks at the memory service by kind (batch: read-ahead of up "
                       "to 64 pages; miss: one page, may fault)", ["cpu", "kind"],
                       [((cpu, k), n) for k, n in self.walks.items()])
        yield labelled("gauge", "tlbsim_cpu_fenced", "1 while the CPU is fenced", ["cpu"],
                       [((cpu,), int(self.core.fenced))])


class _TlbShape:
    def __init__(self, entries: int, ways: int):
        self.entries, self.ways = entries, ways

    def as_dict(self) -> dict:
        return {"tlb_entries": self.entries, "tlb_ways": self.ways}
