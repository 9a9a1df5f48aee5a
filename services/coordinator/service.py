"""The coordinator: CPU registry, shootdown fan-out, acknowledgements, fencing.

A shootdown goes to each target over the run's transport with one deadline.
A target that has not acknowledged by then is fenced: it may not execute again
until it has flushed its whole TLB and registered anew (DESIGN.md §4), so the
memory service may free the frames as soon as every target acked or was fenced.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry

from services.common.errors import InvalidArgument, NotFound
from services.common.metrics import NodeCollector, build_info
from services.common.policy import Policy
from services.common.server import channel, rpc
from services.common.stats import p50_p99
from tlbsim.v1 import common_pb2, coordinator_pb2 as pb, coordinator_pb2_grpc, cpu_pb2, cpu_pb2_grpc

log = logging.getLogger("tlbsim.coordinator")

PING = 0  # a FlushRequest for mm 0 is a ping: acknowledged without touching the TLB


@dataclasses.dataclass
class CpuLink:
    cpu: int
    address: str
    channel: grpc.aio.Channel
    stub: cpu_pb2_grpc.CpuServiceStub
    fenced: bool = False
    stream: asyncio.Queue | None = None  # flushes to push on the CPU's attached stream


@dataclasses.dataclass
class CoordinatorStats:
    shootdowns: int = 0
    ipis: int = 0
    ipis_elided: int = 0
    full_flushes: int = 0
    deadline_misses: int = 0
    latency_s: list[float] = dataclasses.field(default_factory=list)


class CoordinatorNode(coordinator_pb2_grpc.CoordinatorServiceServicer):
    service_names = (pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,)

    def __init__(self) -> None:
        self.policy = Policy()
        self.links: dict[int, CpuLink] = {}
        self.memory_address = ""
        self.stats = CoordinatorStats()
        self._acks: dict[tuple[int, int], asyncio.Future] = {}  # (shootdown id, cpu)
        self._ping_ids = iter(range(1 << 62, 1 << 63))
        self.registry = CollectorRegistry()
        build_info(self.registry, "coordinator", lambda: self.policy)
        self.registry.register(NodeCollector(self._metrics))

    # --- lifecycle ---------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(self, server)

    async def start(self, address: str) -> None:
        pass

    async def stop(self) -> None:
        for link in self.links.values():
            await link.channel.close()

    # --- membership --------------------------------------------------------------------
    @rpc
    async def Reset(self, request, context):
        self.policy = Policy.from_proto(request.policy)
        self.stats = CoordinatorStats()
        return pb.CoordinatorResetResponse()

    @rpc
    async def Register(self, request, context):
        if not request.address:
            raise InvalidArgument("register: the CPU's address is empty")
        old = self.links.get(request.cpu)
        if old is not None and old.address == request.address:
            old.fenced = False  # the CPU flushed everything before re-registering
            return pb.RegisterResponse()
        if old is not None:
            await old.channel.close()
        ch = channel(request.address)
        self.links[request.cpu] = CpuLink(request.cpu, request.address, ch,
                                          cpu_pb2_grpc.CpuServiceStub(ch))
        log.info("cpu %d registered at %s", request.cpu, request.address)
        return pb.RegisterResponse()

    @rpc
    async def RegisterMemory(self, request, context):
        if not request.address:
            raise InvalidArgument("register: the memory service's address is empty")
        self.memory_address = request.address
        return pb.RegisterMemoryResponse()

    @rpc
    async def Heartbeat(self, request, context):
        link = self.links.get(request.cpu)
        if link is None:
            raise NotFound(f"cpu {request.cpu} is not registered")
        return pb.HeartbeatResponse(fenced=link.fenced)

    async def Attach(self, request_iterator, context) -> AsyncIterator[common_pb2.FlushRequest]:
        first = await anext(request_iterator.__aiter__(), None)
        if first is None or first.WhichOneof("msg") != "hello_cpu":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "attach: the first message must say which CPU is attaching")
        link = self.links.get(first.hello_cpu)
        if link is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"attach: cpu {first.hello_cpu} must register first")
        queue: asyncio.Queue = asyncio.Queue()
        link.stream = queue

        async def read_acks() -> None:
            async for msg in request_iterator:
                if msg.WhichOneof("msg") == "ack":
                    self._resolve(msg.ack)

        reader = asyncio.create_task(read_acks())
        try:
            while not reader.done():
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    yield get.result()
                else:
                    get.cancel()
        finally:
            reader.cancel()
            if link.stream is queue:
                link.stream = None

    def _resolve(self, ack: common_pb2.FlushAck) -> None:
        future = self._acks.pop((ack.shootdown_id, ack.cpu), None)
        if future is not None and not future.done():
            future.set_result(ack)

    @rpc
    async def ListCpus(self, request, context):
        return pb.ListCpusResponse(
            memory_address=self.memory_address,
            cpus=[pb.CpuInfo(cpu=l.cpu, address=l.address, fenced=l.fenced,
                             attached=l.stream is not None)
                  for l in sorted(self.links.values(), key=lambda l: l.cpu)])

    # --- delivery ------------------------------------------------------------------------
    async def _deliver(self, link: CpuLink, flush: common_pb2.FlushRequest, transport: str,
                       timeout: float) -> common_pb2.FlushAck | None:
        """One flush to one CPU; None if it did not acknowledge in time."""
        try:
            if transport == "stream" and link.stream is not None:
                future = asyncio.get_running_loop().create_future()
                self._acks[(flush.shootdown_id, link.cpu)] = future
                link.stream.put_nowait(flush)
                try:
                    return await asyncio.wait_for(future, timeout)
                finally:
                    self._acks.pop((flush.shootdown_id, link.cpu), None)
            # Unary, and the stream transport's path to a CPU with no stream open.
            # wait_for_ready: a CPU restarting is waited for, up to the deadline.
            return await link.stub.Flush(flush, timeout=timeout, wait_for_ready=True)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError) as e:
            log.warning("cpu %d missed shootdown %d: %s", link.cpu, flush.shootdown_id,
                        getattr(e, "code", lambda: "timeout")())
            return None

    @rpc
    async def Shootdown(self, request, context):
        t0 = time.perf_counter()
        flush = common_pb2.FlushRequest()
        flush.CopyFrom(request.flush)
        deadline = self.policy.deadline_s
        flush.deadline_unix_s = time.time() + deadline
        live = [self.links[c] for c in request.targets
                if c in self.links and not self.links[c].fenced]
        fenced = sorted({c for c in request.targets
                         if c not in self.links or self.links[c].fenced})
        replies = await asyncio.gather(*(self._deliver(l, flush, self.policy.transport, deadline)
                                         for l in live))
        acks = []
        for link, ack in zip(live, replies):
            if ack is None:
                link.fenced = True  # it must flush everything and re-register
                self.stats.deadline_misses += 1
                fenced.append(link.cpu)
            else:
                acks.append(ack)
        latency = time.perf_counter() - t0
        s = self.stats
        s.shootdowns += 1
        s.ipis += len(live)
        s.ipis_elided += sum(a.outcome == common_pb2.FLUSH_OUTCOME_ELIDED for a in acks)
        s.full_flushes += flush.pages == 0
        s.latency_s.append(latency)
        return pb.ShootdownResponse(acks=acks, fenced=sorted(fenced), latency_s=latency)

    @rpc
    async def PingFanout(self, request, context):
        transport = {common_pb2.TRANSPORT_GRPC: "grpc",
                     common_pb2.TRANSPORT_STREAM: "stream"}.get(request.transport)
        if transport is None:
            raise InvalidArgument("ping fan-out: choose the grpc or stream transport")
        missing = [c for c in request.targets if c not in self.links]
        if missing:
            raise NotFound(f"ping fan-out: unknown cpus {missing}")
        links = [self.links[c] for c in request.targets]
        latencies = []
        for _ in range(max(1, request.rounds)):
            t0 = time.perf_counter()
            if transport == "grpc":
                await asyncio.gather(*(l.stub.Ping(cpu_pb2.PingRequest(), timeout=5)
                                       for l in links))
            else:
                ping = common_pb2.FlushRequest(shootdown_id=next(self._ping_ids), mm=PING)
                replies = await asyncio.gather(*(self._deliver(l, ping, "stream", 5)
                                                 for l in links))
                if any(r is None for r in replies):
                    raise NotFound("ping fan-out: a CPU did not answer on its stream")
            latencies.append(time.perf_counter() - t0)
        return pb.PingFanoutResponse(latency_s=latencies)

    @rpc
    async def Stats(self, request, context):
        s = self.stats
        p50, p99, n = p50_p99(s.latency_s)
        return pb.CoordinatorStats(
            shootdowns=s.shootdowns, ipis=s.ipis, ipis_elided=s.ipis_elided,
            full_flushes=s.full_flushes, deadline_misses=s.deadline_misses,
            fenced_cpus=sorted(c for c, l in self.links.items() if l.fenced),
            latency_s=common_pb2.Percentiles(p50=p50, p99=p99, count=n),
            cpus_online=sum(not l.fenced for l in self.links.values()))

    def _metrics(self):
        s = self.stats
        yield "counter", "tlbsim_shootdowns", "Shootdowns delivered", s.shootdowns
        yield "counter", "tlbsim_ipis", "Flush deliveries to target CPUs", s.ipis
        yield "counter", "tlbsim_ipis_elided", "Deliveries that found nothing to flush", \
            s.ipis_elided
        yield "counter", "tlbsim_deadline_misses", "Targets that missed a deadline", \
            s.deadline_misses
        yield "gauge", "tlbsim_cpus_online", "Registered CPUs not fenced", \
            sum(not l.fenced for l in self.links.values())
