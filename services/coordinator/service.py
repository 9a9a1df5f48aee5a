"""The coordinator: CPU registry, shootdown fan-out, acknowledgements, fencing.

A shootdown goes to each target over the run's transport with one deadline.
A target that has not acknowledged by then is fenced: it may not execute again
until it has flushed its whole TLB and registered anew (DESIGN.md §4). The shootdown
completes, and the memory service may free the frames, once every target acked or its
fence is settled: it flushed, or its lease ran out (services/coordinator/fencing.py,
the state machine; this module is its gRPC adapter and the delivery).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from typing import AsyncIterator

import grpc

from services.common.chaos import new_boot
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.costmodel import Events, delivery_events
from services.common.liveness import Liveness
from services.common.metrics import histogram, labelled, node_registry
from services.common.mqtt import MqttLink, MqttUnavailable, MqttUrl
from services.common import wire
from services.common.policy import Policy, Transport
from services.common.server import channel, rpc
from services.common.stats import COUNT_BUCKETS, Samples, p50_p99
from services.common import vtime
from services.coordinator.fencing import DEADLINE, Fencing
from tlbsim.v1 import common_pb2, coordinator_pb2 as pb, coordinator_pb2_grpc, cpu_pb2, cpu_pb2_grpc

log = logging.getLogger("tlbsim.coordinator")

PING = 0  # a FlushRequest for mm 0 is a ping: acknowledged without touching the TLB
MAX_PING_ROUNDS = 10_000  # per request: bounded work
MAX_TARGETS = 1024  # CPUs per shootdown or ping fan-out (CPU ids are 0..1023)
# mqtt: the broadcast's acks are awaited for this share of the deadline; targets still
# silent get a direct gRPC Flush with the rest, and only those that miss it too are fenced.
# A missed broadcast costs a cheap fallback (a duplicate elides by generation), a missed
# fallback a fence (a full TLB flush and re-registration): the fallback gets the larger
# share; a quarter of the default 1 s is still >100x the broadcast's p99 at 8 CPUs.
MQTT_SHARE = 0.25
# A failed delivery (a lost message, a CPU restarting) is sent again: a flush is idempotent
# by generation. Unary: after a short backoff; stream: after this share of the deadline.
REDELIVER_BACKOFF_S = (0.01, 0.1)
STREAM_RESEND_SHARE = 0.05
# A restarted coordinator knows no CPU. A target it does not know may still run with its
# TLB until its lease runs out: it is waited for (to register and take the flush) until
# its lease must have run out (liveness.settle_s after our start), only then counted as
# fenced, and told to flush when it registers.
BEAT_OK = pb.HeartbeatResponse()  # the common answer, built once


@dataclasses.dataclass
class CpuLink:
    """How to reach a registered CPU (its fencing state is in `Fencing`)."""
    cpu: int
    address: str
    channel: grpc.aio.Channel
    stub: cpu_pb2_grpc.CpuServiceStub
    stream: asyncio.Queue | None = None  # flushes to push on the CPU's attached stream


@dataclasses.dataclass
class CoordinatorStats:
    shootdowns: int = 0
    ipis: int = 0
    ipis_elided: int = 0
    broadcasts: int = 0   # shootdowns delivered as hardware broadcasts: no IPIs
    full_flushes: int = 0
    deadline_misses: int = 0
    fallbacks: int = 0    # mqtt: targets reached by the gRPC fallback
    broker_down: int = 0  # mqtt: shootdowns sent over gRPC because the broker was down
    redeliveries: int = 0     # flushes sent again after a failed delivery
    unknown_targets: int = 0  # targets not registered when their shootdown came
    fences_flushed: int = 0   # fenced targets waited for: settled by their flush
    fences_expired: int = 0   # ... by their lease running out
    latency_s: Samples = dataclasses.field(default_factory=Samples)


class CoordinatorNode(coordinator_pb2_grpc.CoordinatorServiceServicer):
    service_names = (pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,)

    def __init__(self, *, mqtt_url: str | None = None, metrics: bool = True,
                 liveness: Liveness | None = None) -> None:
        self.policy = Policy()
        self.liveness = liveness or Liveness.for_cluster(1)
        # Fence generations count up from a base unique to this start (fencing.py).
        self.fencing = Fencing(self.liveness, time.monotonic, new_boot() << 32)
        self.mqtt_url = MqttUrl.parse(mqtt_url) if mqtt_url else None
        self.mqtt: MqttLink | None = None  # the mqtt transport's broker link
        self.links: dict[int, CpuLink] = {}
        self.memory_address = ""
        self.stats = CoordinatorStats()
        # The run's memory epoch, handed to CPUs at registration; `configured` once a run
        # (or, after a restart of ours, the memory service's announcement) set the policy.
        self.epoch = 0
        self.configured = False
        self._arrivals: dict[int, asyncio.Event] = {}  # unknown targets awaited
        self.fabric = vtime.Server()  # --timing virtual: the broadcast invalidation fabric
        self._acks: dict[tuple[int, int], asyncio.Future] = {}  # (shootdown id, cpu)
        self._ping_ids = iter(range(1 << 62, 1 << 63))
        # Metrics: labelled counts for the process's lifetime (runs reset `stats`, not
        # these), plus two histograms observed once per shootdown.
        self.counts: collections.Counter = collections.Counter()
        self.registry = node_registry(metrics, "coordinator", lambda: self.policy, self._metrics,
                                      self._events)
        on = self.registry if metrics else None
        self._latency = histogram("tlbsim_shootdown_duration_seconds",
                                  "Shootdown latency: sent to every target until each acked "
                                  "or was fenced", ["transport", "scope"], on)
        self._targets = histogram("tlbsim_shootdown_targets", "Target CPUs per shootdown",
                                  ["transport"], on, COUNT_BUCKETS)

    # --- lifecycle ---------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(self, server)

    async def start(self, address: str) -> None:
        if self.mqtt_url is not None:
            self.mqtt = MqttLink(self.mqtt_url, "coordinator", [self.mqtt_url.ack_topic],
                                 self._on_mqtt_ack,
                                 "every mqtt shootdown goes over gRPC until it returns")
            await self.mqtt.start()

    async def stop(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.stop()
        for link in self.links.values():
            await link.channel.close()

    # --- membership --------------------------------------------------------------------
    @rpc
    async def Reset(self, request, context):
        policy = wire.policy_from_proto(request.policy)
        if policy.uses_mqtt and self.mqtt is None:
            raise FailedPrecondition("the mqtt transport needs a coordinator started with "
                                     "--mqtt-url (or `tlbsim up --mqtt`)")
        self.policy = policy
        self.stats = CoordinatorStats()
        self.fabric = vtime.Server()
        self.epoch, self.configured = request.epoch, True
        return pb.CoordinatorResetResponse()

    @rpc
    async def Register(self, request, context):
        if not request.address:
            raise InvalidArgument("register: the CPU's address is empty")
        cpu = request.cpu
        was_fenced = self.fencing.is_fenced(cpu)
        answer = self.fencing.register(cpu, request.address, request.flushed_through)
        await self._link(cpu, request.address)
        if answer.fenced:
            log.info("cpu %d registering: fenced (%s); it flushes through fence %d first",
                     cpu, answer.reason, answer.generation)
        elif was_fenced:
            log.info("cpu %d flushed through fence %d: unfenced", cpu,
                     request.flushed_through)
        arrival = self._arrivals.pop(cpu, None)
        if arrival is not None:
            arrival.set()
        return pb.RegisterResponse(fenced=answer.fenced, epoch=self.epoch,
                                   fence_generation=answer.generation,
                                   fence_reason=answer.reason, lease_s=self.liveness.lease_s)

    async def _link(self, cpu: int, address: str) -> CpuLink:
        old = self.links.get(cpu)
        if old is not None and old.address == address:
            return old
        ch = channel(address)
        link = self.links[cpu] = CpuLink(cpu, address, ch, cpu_pb2_grpc.CpuServiceStub(ch))
        log.info("cpu %d registered at %s", cpu, address)
        if old is not None:  # after the new one is in place: deliveries switch to it
            await old.channel.close()
        return link

    @rpc
    async def RegisterMemory(self, request, context):
        if not request.address:
            raise InvalidArgument("register: the memory service's address is empty")
        self.memory_address = request.address
        reply = pb.RegisterMemoryResponse(settle_s=self.liveness.settle_s)
        if not self.configured and request.HasField("policy"):
            # We restarted and lost the run's policy: the memory service still has it.
            self.policy = wire.policy_from_proto(request.policy)
            self.epoch, self.configured = request.epoch, True
            log.warning("adopted the running policy and epoch %d from the memory service",
                        request.epoch)
        elif request.epoch != self.epoch and request.epoch >> 32 != self.epoch >> 32:
            if self.epoch:
                log.warning("memory service restarted (epoch %d -> %d): the run is lost",
                            self.epoch, request.epoch)
                self.epoch = request.epoch  # log it once; CPUs already hold the old one
        return reply

    @rpc
    async def Heartbeat(self, request, context):
        answer = self.fencing.heartbeat(request.cpu)  # unfenced: its lease runs on
        if answer is None:
            raise NotFound(f"cpu {request.cpu} is not registered")
        if not answer.fenced:
            return BEAT_OK
        return pb.HeartbeatResponse(fenced=True, fence_generation=answer.generation,
                                    fence_reason=answer.reason)

    async def Attach(self, request_iterator, context) -> AsyncIterator[common_pb2.FlushRequest]:
        first = await anext(request_iterator.__aiter__(), None)
        if first is None or first.WhichOneof("msg") != "hello_cpu":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "attach: the first message must say which CPU is attaching")
            return  # (abort raises)
        link = self.links.get(first.hello_cpu)
        if link is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"attach: cpu {first.hello_cpu} must register first")
            return
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
            cpus=[pb.CpuInfo(cpu=m.cpu, address=m.address, fenced=m.fenced,
                             fence_reason=m.reason if m.fenced else "",
                             attached=self._attached(m.cpu))
                  for m in self.fencing.registered()],
            liveness=pb.Liveness(**self.liveness.as_dict()))

    def _attached(self, cpu: int) -> bool:
        link = self.links.get(cpu)
        return link is not None and link.stream is not None

    # --- the mqtt transport --------------------------------------------------------------
    async def _on_mqtt_ack(self, message) -> None:
        self._resolve(common_pb2.FlushAck.FromString(message.payload))

    async def _broadcast(self, flush: common_pb2.FlushRequest, cpus: list[int],
                         timeout: float) -> dict[int, common_pb2.FlushAck | None]:
        """Publish one message for all of `cpus`; wait up to `timeout` for exactly their
        acks. Raises MqttUnavailable if the broker is not connected."""
        loop = asyncio.get_running_loop()
        futures = {}
        for cpu in cpus:
            futures[cpu] = self._acks[(flush.shootdown_id, cpu)] = loop.create_future()
        try:
            if self.mqtt is None or self.mqtt_url is None:
                raise MqttUnavailable("this coordinator has no --mqtt-url")
            message = pb.ShootdownRequest(flush=flush, targets=cpus).SerializeToString()
            t_end = loop.time() + timeout
            await self.mqtt.publish(self.mqtt_url.shootdown_topic, message,
                                    self.policy.mqtt_qos, timeout)
            if futures:
                await asyncio.wait(futures.values(), timeout=max(0.0, t_end - loop.time()))
            return {cpu: f.result() if f.done() else None for cpu, f in futures.items()}
        finally:
            for cpu in cpus:
                self._acks.pop((flush.shootdown_id, cpu), None)

    async def _deliver_mqtt(self, live: list[CpuLink], flush: common_pb2.FlushRequest,
                            deadline: float) -> list[common_pb2.FlushAck | None]:
        """One broadcast; MQTT_SHARE of the deadline for its acks; then a direct gRPC Flush
        (a `fallback`) to each silent target with the rest. Broker down: all over gRPC."""
        if not live:
            return []
        loop = asyncio.get_running_loop()
        t_end = loop.time() + deadline
        acks: dict[int, common_pb2.FlushAck | None] = {l.cpu: None for l in live}
        broadcast = self.mqtt is not None and self.mqtt.connected
        if broadcast:
            try:
                acks = await self._broadcast(flush, list(acks), deadline * MQTT_SHARE)
            except MqttUnavailable:
                broadcast = False
        if not broadcast:
            self.stats.broker_down += 1
        missing = [l for l in live if acks[l.cpu] is None]
        if broadcast:
            self.stats.fallbacks += len(missing)
        replies = await asyncio.gather(*(self._deliver(l, flush, Transport.GRPC,
                                                       max(0.0, t_end - loop.time()))
                                         for l in missing))
        acks.update((l.cpu, r) for l, r in zip(missing, replies))
        return [acks[l.cpu] for l in live]

    # --- delivery ------------------------------------------------------------------------
    async def _deliver(self, link: CpuLink, flush: common_pb2.FlushRequest, transport: Transport,
                       timeout: float) -> common_pb2.FlushAck | None:
        """One flush to one CPU, delivered again while it fails (a flush is idempotent:
        a CPU that has it already elides it by generation); None if no ack came in time."""
        loop = asyncio.get_running_loop()
        t_end = loop.time() + timeout
        backoff = REDELIVER_BACKOFF_S[0]
        error: object = "timeout"
        first = True
        while first or loop.time() < t_end:
            if not first:
                self.stats.redeliveries += 1
                link = self.links.get(link.cpu, link)  # it may have registered anew
            first = False
            left = max(0.0, t_end - loop.time())
            try:
                if transport is Transport.STREAM and link.stream is not None:
                    return await self._deliver_stream(link, flush, left)
                # Unary, and the stream transport's path to a CPU with no stream open.
                # wait_for_ready: a CPU restarting is waited for, up to the deadline.
                return await link.stub.Flush(flush, timeout=left, wait_for_ready=True)
            except asyncio.TimeoutError:
                error = "timeout"  # the stream: resend
            except grpc.aio.AioRpcError as e:
                error = e.code()
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
                await asyncio.sleep(min(backoff, max(0.0, t_end - loop.time())))
                backoff = min(2 * backoff, REDELIVER_BACKOFF_S[1])
        log.warning("cpu %d missed shootdown %d: %s", link.cpu, flush.shootdown_id, error)
        return None

    async def _deliver_stream(self, link: CpuLink, flush: common_pb2.FlushRequest,
                              left: float) -> common_pb2.FlushAck:
        """Push the flush on the CPU's stream; wait a share of the deadline for the ack
        (TimeoutError: send it again)."""
        assert link.stream is not None, "only for a CPU with its stream attached"
        key = (flush.shootdown_id, link.cpu)
        future = self._acks.get(key)
        if future is None or future.done():
            future = self._acks[key] = asyncio.get_running_loop().create_future()
        link.stream.put_nowait(flush)
        wait = min(left, max(0.05, self.policy.deadline_s * STREAM_RESEND_SHARE))
        try:
            ack = await asyncio.wait_for(asyncio.shield(future), wait)
        except asyncio.TimeoutError:
            if wait >= left:
                self._acks.pop(key, None)
            raise
        self._acks.pop(key, None)
        return ack

    async def _await_unknown(self, cpu: int, flush: common_pb2.FlushRequest,
                             deadline: float) -> common_pb2.FlushAck | None:
        """A target we do not know (we restarted): wait for it to register, then deliver;
        None if it does not come in time (the caller fences it: it flushes when it
        registers) or registered fenced."""
        loop = asyncio.get_running_loop()  # its clock is time.monotonic(), as fencing's
        # It may run with its old TLB until its lease expires: wait at least that long.
        give_up = max(loop.time() + deadline, self.fencing.started + self.liveness.settle_s)
        if not self.fencing.known(cpu):
            arrival = self._arrivals.setdefault(cpu, asyncio.Event())  # set by Register
            try:
                await asyncio.wait_for(arrival.wait(), max(0.0, give_up - loop.time()))
            except asyncio.TimeoutError:
                pass
        if not self.fencing.known(cpu) or self.fencing.is_fenced(cpu):
            return None
        link = self.links[cpu]
        # Late (past the flush's deadline) it still goes: the CPU then fences itself.
        return await self._deliver(link, flush, Transport.GRPC,
                                   max(0.5, give_up - loop.time()))

    @rpc
    async def Shootdown(self, request, context):
        t0 = time.perf_counter()
        if len(request.targets) > MAX_TARGETS:
            raise InvalidArgument(f"shootdown: {len(request.targets)} targets, at most "
                                  f"{MAX_TARGETS} CPUs")
        flush = common_pb2.FlushRequest()
        flush.CopyFrom(request.flush)
        # The memory service fixes the deadline (a retried shootdown keeps it); a caller
        # that does not gets the policy's.
        if not flush.deadline_unix_s:
            flush.deadline_unix_s = time.time() + self.policy.deadline_s
        # Never longer than the policy's: a far-future (or infinite) deadline_unix_s
        # must not hold the call open for ever.
        deadline = min(max(0.0, flush.deadline_unix_s - time.time()), self.policy.deadline_s)
        f = self.fencing
        live = [self.links[c] for c in request.targets if f.known(c) and not f.is_fenced(c)]
        fenced = sorted({c for c in request.targets if f.known(c) and f.is_fenced(c)})
        unknown = sorted({c for c in request.targets if not f.known(c)})
        # Targets fenced before or during this shootdown: it completes once each one's
        # fence (the generation it was fenced at) is settled.
        settle = {c: f.members[c].generation for c in fenced}
        finish = self._virtual_arrivals(flush, list(request.targets))
        self.stats.unknown_targets += len(unknown)
        waits = asyncio.gather(*(self._await_unknown(c, flush, deadline) for c in unknown))
        if self.policy.uses_mqtt:
            replies = await self._deliver_mqtt(live, flush, deadline)
        else:
            replies = await asyncio.gather(*(self._deliver(l, flush, self.policy.transport,
                                                           deadline) for l in live))
        for cpu, ack in zip(unknown, await waits):
            if f.known(cpu):  # it registered meanwhile: an ack, or a miss (below)
                live.append(self.links[cpu])
                replies.append(ack)
            else:  # its lease has run out; it flushes when it registers
                settle[cpu] = f.fence_absent(cpu)
                fenced.append(cpu)
        acks = []
        for link, ack in zip(live, replies):
            if ack is None:  # it must flush everything and re-register
                was_fenced = f.is_fenced(link.cpu)
                settle[link.cpu] = f.fence(link.cpu, DEADLINE)
                log.warning("cpu %d fenced (fence %d): it missed the deadline of shootdown "
                            "%d", link.cpu, settle[link.cpu], flush.shootdown_id)
                if not was_fenced:
                    self._notify_fenced(link.cpu)
                self.stats.deadline_misses += 1
                fenced.append(link.cpu)
            else:
                acks.append(ack)
        # Frames may be freed only once no fenced target can still be using its TLB.
        await asyncio.gather(*(self._settled(c, g) for c, g in settle.items()))
        latency = time.perf_counter() - t0
        s = self.stats
        s.shootdowns += 1
        # A hardware broadcast (INVLPGB): its deliveries stand for the hardware's
        # invalidation, not for interrupts; it is counted as one broadcast, no IPIs.
        ipis = [] if flush.hardware else [link.cpu for link in live]
        s.broadcasts += flush.hardware
        s.ipis += len(ipis)
        elided = sum(wire.elided(a) for a in acks) if ipis else 0
        s.ipis_elided += elided
        s.full_flushes += flush.pages == 0
        s.latency_s.append(latency)
        self._count_shootdown(request, ipis, elided, len(live) - len(acks), latency)
        return pb.ShootdownResponse(acks=acks, fenced=sorted(fenced), latency_s=latency,
                                    done_vtime_ns=finish(acks) if finish else None)

    def _virtual_arrivals(self, flush: common_pb2.FlushRequest, targets: list[int]):
        """--timing virtual (services/common/vtime.py): stamp each target's arrival on the
        flush; returns how to tell when the initiator is done, given the acks (None in
        wall-clock runs)."""
        if not flush.HasField("sent_vtime_ns"):
            return None
        d = vtime.deliver(flush.sent_vtime_ns, targets, flush.hardware, flush.pages,
                          self.policy.cost_model, self.fabric)
        flush.arrival_vtime_ns.update(d.arrivals)
        return lambda acks: d.done([a.done_vtime_ns for a in acks
                                    if a.HasField("done_vtime_ns")])

    def _notify_fenced(self, cpu: int) -> None:
        """Tell a CPU on its flush stream that it is fenced, so it flushes and registers
        now rather than at its next heartbeat (which tells it too, if this is lost)."""
        link, m = self.links.get(cpu), self.fencing.members[cpu]
        if link is not None and link.stream is not None:
            link.stream.put_nowait(common_pb2.FlushRequest(fence_generation=m.generation,
                                                           fence_reason=m.reason))

    async def _settled(self, cpu: int, generation: int) -> None:
        """Until the CPU fenced at `generation` cannot use what its TLB held then: it
        registered having flushed through it, or its lease ran out."""
        f = self.fencing
        while not f.settled(cpu, generation):
            left = f.lease_ends(cpu) - time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(f.members[cpu].cleared.wait(), max(0.0, left))
        if f.members[cpu].flushed_through >= generation:
            self.stats.fences_flushed += 1
        else:
            self.stats.fences_expired += 1
            log.warning("cpu %d: fence %d settled by its lease running out", cpu, generation)

    @rpc
    async def PingFanout(self, request, context):
        transport = wire.transport_from_proto(request.transport)
        if transport is None:
            raise InvalidArgument("ping fan-out: choose the grpc, stream or mqtt transport")
        if len(request.targets) > MAX_TARGETS:
            raise InvalidArgument(f"ping fan-out: {len(request.targets)} targets, at most "
                                  f"{MAX_TARGETS}")
        if request.rounds > MAX_PING_ROUNDS:  # found by fuzzing: 2^32 rounds of nothing
            raise InvalidArgument(f"ping fan-out: {request.rounds} rounds, at most "
                                  f"{MAX_PING_ROUNDS}")  # held the event loop for hours
        if transport is Transport.MQTT and (self.mqtt is None or not self.mqtt.connected):
            raise FailedPrecondition("ping fan-out: no MQTT broker connected")
        missing = [c for c in request.targets if c not in self.links]
        if missing:
            raise NotFound(f"ping fan-out: unknown cpus {missing}")
        links = [self.links[c] for c in request.targets]
        latencies = []
        for _ in range(max(1, request.rounds)):
            t0 = time.perf_counter()
            if transport is Transport.GRPC:
                await asyncio.gather(*(l.stub.Ping(cpu_pb2.PingRequest(), timeout=5)
                                       for l in links))
            elif transport is Transport.MQTT:
                ping = common_pb2.FlushRequest(shootdown_id=next(self._ping_ids), mm=PING)
                try:
                    acks = await self._broadcast(ping, [l.cpu for l in links], 5)
                except MqttUnavailable as e:
                    raise FailedPrecondition(f"ping fan-out: MQTT broker lost: {e}") from None
                if any(a is None for a in acks.values()):
                    raise NotFound("ping fan-out: a CPU did not ack over MQTT: "
                                   f"{sorted(c for c, a in acks.items() if a is None)}")
            else:
                ping = common_pb2.FlushRequest(shootdown_id=next(self._ping_ids), mm=PING)
                replies = await asyncio.gather(*(self._deliver(l, ping, Transport.STREAM, 5)
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
            broadcasts=s.broadcasts, full_flushes=s.full_flushes, deadline_misses=s.deadline_misses,
            fenced_cpus=self.fencing.fenced_cpus(),
            latency_s=common_pb2.Percentiles(p50=p50, p99=p99, count=n),
            cpus_online=sum(not m.fenced for m in self.fencing.registered()),
            fallbacks=s.fallbacks, broker_down=s.broker_down, redeliveries=s.redeliveries,
            unknown_targets=s.unknown_targets, fences_flushed=s.fences_flushed,
            fences_expired=s.fences_expired)

    # --- metrics ---------------------------------------------------------------------------
    def _count_shootdown(self, request, sent: list[int], elided: int, missed: int,
                         latency: float) -> None:
        """`sent`: the CPUs the flush was delivered to (an IPI each)."""
        transport = self.policy.transport.value
        reason, scope = request.reason or "other", request.scope or "mm"
        c = self.counts
        c["shootdowns", reason, transport, scope] += 1
        for cpu in sent:
            c["ipis", transport, cpu] += 1
        c["elided", transport] += elided
        c["missed", transport] += missed
        if self._latency is not None and self._targets is not None:
            self._latency.labels(transport, scope).observe(latency)
            self._targets.labels(transport).observe(len(request.targets))

    def _events(self) -> Events:
        """The IPIs of the process's lifetime, as tlbsim_ipis_total counts them."""
        return delivery_events(sum(n for k, n in dict.copy(self.counts).items()
                                   if k[0] == "ipis"))

    def _metrics(self):
        """Read at scrape time; every transport's series exists from the start."""
        c = self.counts  # read from the metrics thread while the loop counts
        yield labelled("counter", "tlbsim_shootdowns", "Shootdowns delivered",
                       ["reason", "transport", "scope"],
                       [(k[1:], n) for k, n in sorted(dict.copy(c).items())
                        if k[0] == "shootdowns"])
        links = list(self.links.values())
        # Per target CPU: every registered CPU's series exists from the start.
        ipis = {(t.value, l.cpu): 0 for t in Transport for l in links}
        ipis.update({k[1:]: n for k, n in dict.copy(c).items() if k[0] == "ipis"})
        yield labelled("counter", "tlbsim_ipis",
                       "Flush deliveries (IPIs) sent to target CPUs, by transport and target",
                       ["transport", "cpu"], sorted(ipis.items()))
        for key, name, help_text in (
                ("elided", "tlbsim_ipis_elided",
                 "IPIs whose CPU found nothing to flush (generation already current)"),
                ("missed", "tlbsim_deadline_misses",
                 "Targets that missed a shootdown deadline and were fenced")):
            yield labelled("counter", name, help_text, ["transport"],
                           [((t.value,), c[key, t.value]) for t in Transport])
        # Delivery trouble, counted per run (like the memory service's counts, they
        # restart when a run resets the coordinator).
        s = self.stats
        yield "counter", "tlbsim_mqtt_fallbacks", \
            "mqtt: targets silent for the broadcast's share of the deadline, sent a gRPC Flush", \
            s.fallbacks
        yield "counter", "tlbsim_mqtt_broker_down_shootdowns", \
            "mqtt: shootdowns sent over gRPC because the broker was not connected", \
            s.broker_down
        yield "counter", "tlbsim_mqtt_broker_down_seconds", \
            "Time the coordinator's MQTT link was without its broker (0 with no --mqtt-url)", \
            self.mqtt.outages.seconds() if self.mqtt is not None else 0.0
        yield "counter", "tlbsim_redeliveries", \
            "Flushes sent again after a failed delivery (a lost message, a CPU restarting)", \
            s.redeliveries
        yield "counter", "tlbsim_unknown_targets", \
            "Shootdown targets the coordinator did not know (it restarted): waited for", \
            s.unknown_targets
        members = self.fencing.registered()
        yield "gauge", "tlbsim_cpus_online", "Registered CPUs not fenced", \
            sum(not m.fenced for m in members)
        yield "gauge", "tlbsim_cpus_registered", "CPUs registered with the coordinator", \
            len(members)
        yield labelled("gauge", "tlbsim_cpu_registered_fenced",
                       "Per registered CPU: 1 while fenced by the coordinator", ["cpu"],
                       [((m.cpu,), int(m.fenced)) for m in members])
