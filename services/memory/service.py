"""The memory service: a thin gRPC adapter around the Kernel."""
from __future__ import annotations

import asyncio
import logging
from array import array

import grpc
from prometheus_client import CollectorRegistry

from services.common.errors import InvalidArgument
from services.common.metrics import NodeCollector, build_info
from services.common.policy import Policy
from services.common.server import channel, rpc
from services.common.stats import p50_p99
from services.memory.kernel import FlushOrder, Kernel, ShootdownResult
from tlbsim.v1 import (common_pb2, coordinator_pb2, coordinator_pb2_grpc, memory_pb2 as pb,
                       memory_pb2_grpc)

log = logging.getLogger("tlbsim.memory")

OUTCOMES = {"walked": pb.MISS_OUTCOME_WALKED, "anon": pb.MISS_OUTCOME_FAULT_ANON,
            "cow": pb.MISS_OUTCOME_FAULT_COW, "prot": pb.MISS_OUTCOME_FAULT_PROT,
            "segv": pb.MISS_OUTCOME_SEGV}
SHOOTDOWN_MARGIN_S = 5.0  # the coordinator answers by the deadline; this covers the hop


def flush_to_proto(f: FlushOrder) -> common_pb2.FlushRequest:
    return common_pb2.FlushRequest(shootdown_id=f.shootdown_id, mm=f.mm, start_vpn=f.start_vpn,
                                   pages=f.pages, new_tlb_gen=f.new_tlb_gen,
                                   mm_tlb_gen=f.mm_tlb_gen, freed_tables=f.freed_tables,
                                   initiator=f.initiator)


def percentiles(samples: list[float]) -> common_pb2.Percentiles:
    p50, p99, n = p50_p99(samples)
    return common_pb2.Percentiles(p50=p50, p99=p99, count=n)


class MemoryNode(memory_pb2_grpc.MemoryServiceServicer):
    service_names = (pb.DESCRIPTOR.services_by_name["MemoryService"].full_name,)

    def __init__(self, coordinator: str, frames: int | None = None):
        self.coordinator_address = coordinator
        self.frames = frames
        self.epoch = 0
        self._coordinator: coordinator_pb2_grpc.CoordinatorServiceStub | None = None
        self._channel: grpc.aio.Channel | None = None
        self.kernel = self._new_kernel(Policy())
        self.registry = CollectorRegistry()
        build_info(self.registry, "memory", lambda: self.kernel.policy)
        self.registry.register(NodeCollector(self._metrics))
        self._announce: asyncio.Task | None = None

    def _new_kernel(self, policy: Policy) -> Kernel:
        kwargs = {"frames": self.frames} if self.frames else {}
        return Kernel(policy, self._shootdown, **kwargs)

    # --- lifecycle ---------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(self, server)

    async def start(self, address: str) -> None:
        self._channel = channel(self.coordinator_address)
        self._coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._announce = asyncio.create_task(self._register(address))

    async def _register(self, address: str) -> None:
        """Tell the coordinator where memory is; it may start after us, so keep trying."""
        while True:
            try:
                await self._coordinator.RegisterMemory(
                    coordinator_pb2.RegisterMemoryRequest(address=address), timeout=5,
                    wait_for_ready=True)
                return
            except grpc.aio.AioRpcError as e:
                log.warning("cannot register with the coordinator yet: %s", e.code().name)
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self._announce is not None:
            self._announce.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def _shootdown(self, order: FlushOrder, targets: list[int]) -> ShootdownResult:
        reply = await self._coordinator.Shootdown(
            coordinator_pb2.ShootdownRequest(flush=flush_to_proto(order), targets=targets),
            timeout=self.kernel.policy.deadline_s + SHOOTDOWN_MARGIN_S)
        return ShootdownResult(acked=[a.cpu for a in reply.acks], fenced=list(reply.fenced))

    # --- RPCs ----------------------------------------------------------------------------
    @rpc
    async def Reset(self, request, context):
        policy = Policy.from_proto(request.policy)
        self.kernel = self._new_kernel(policy)
        self.epoch += 1
        return pb.MemoryResetResponse(epoch=self.epoch)

    @rpc
    async def CreateMm(self, request, context):
        return pb.CreateMmResponse(mm=self.kernel.create_mm())

    @rpc
    async def SwitchMm(self, request, context):
        lazy = request.mm == 0 and self.kernel.policy.lazy_tlb and \
            bool(self.kernel.cpu_mm.get(request.cpu))
        gen = self.kernel.switch_mm(request.cpu, request.mm)
        return pb.MemSwitchMmResponse(tlb_gen=gen, lazy=lazy)

    @rpc
    async def Walk(self, request, context):
        ptes = self.kernel.walk(request.cpu, request.mm, list(request.vpns))
        return pb.WalkResponse(ptes=[pb.Pte(present=True, pfn=p[0], writable=p[1], tid=p[2])
                                     if p else pb.Pte() for p in ptes])

    @rpc
    async def HandleMiss(self, request, context):
        r = await self.kernel.handle_miss(request.cpu, request.mm, request.vpn, request.write)
        return pb.HandleMissResponse(outcome=OUTCOMES[r.outcome], pfn=r.pfn, writable=r.writable,
                                     tid=r.tid,
                                     local_flushes=[flush_to_proto(f) for f in r.local_flushes])

    @rpc
    async def Syscall(self, request, context):
        k, cpu, mm, call = self.kernel, request.cpu, request.mm, request.call
        which = call.WhichOneof("call")
        if which == "mmap":
            r = await k.mmap(cpu, mm, call.mmap.pages, call.mmap.writable)
        elif which == "munmap":
            r = await k.munmap(cpu, mm, call.munmap.address, call.munmap.pages)
        elif which == "madvise_dontneed":
            a = call.madvise_dontneed
            r = await k.madvise_dontneed(cpu, mm, a.address, a.pages)
        elif which == "mprotect":
            a = call.mprotect
            r = await k.mprotect(cpu, mm, a.address, a.pages, a.writable)
        elif which == "fork":
            r = await k.fork(cpu, mm)
        elif which == "exit":
            r = await k.exit(cpu, mm)
        else:
            raise InvalidArgument("syscall: no call given")
        result = common_pb2.SyscallResponse(address=r.address, child_mm=r.child_mm,
                                            shootdowns=r.shootdowns, pages_freed=r.pages_freed,
                                            latency_s=r.latency_s)
        return pb.MemSyscallResponse(result=result,
                                     local_flushes=[flush_to_proto(f) for f in r.local_flushes])

    @rpc
    async def ReportAccesses(self, request, context):
        words, times = array("Q"), array("q")
        if len(request.tids) % 8 or len(request.times) != len(request.tids):
            raise InvalidArgument("report: tids and times must be equal runs of 8-byte values")
        words.frombytes(request.tids)
        times.frombytes(request.times)
        return pb.ReportAccessesResponse(stale=self.kernel.report_accesses(words, times))

    @rpc
    async def Audit(self, request, context):
        dumps = [dict(cpu=d.cpu, fenced=d.fenced, loaded_mm=d.loaded_mm, lazy=d.lazy,
                      local_gen=dict(d.local_tlb_gen),
                      entries=[(e.mm, e.vpn, e.pfn, e.writable, e.tid) for e in d.entries])
                 for d in request.tlbs]
        checked, violations = self.kernel.audit(dumps)
        return pb.AuditResponse(entries_checked=checked, violations=violations)

    @rpc
    async def Stats(self, request, context):
        k = self.kernel
        s = k.stats
        return pb.MemoryStats(
            epoch=self.epoch, policy=k.policy.to_proto(), faults=dict(s.faults),
            shootdowns=s.shootdowns, full_flushes=s.full_flushes, pages_freed=s.pages_freed,
            tables_freed=s.tables_freed, stale_accesses=k.oracle.stale,
            audit_violations=s.audit_violations,
            lock_order_violations=len(k.validator.reports), free_frames=k.frames.free_count,
            used_frames=k.frames.used, lock_wait_s=percentiles(k.lock_stats.all_waits()),
            fault_latency_s=percentiles(s.fault_latency_s),
            munmap_latency_s=percentiles(s.munmap_latency_s), ipis=s.ipis,
            fenced=len(s.fenced), contended_acquisitions=k.lock_stats.contended)

    def _metrics(self):
        k = self.kernel
        yield "counter", "tlbsim_stale_accesses", "TLB hits on revoked translations", \
            k.oracle.stale
        yield "counter", "tlbsim_pages_freed", "Data pages returned to the allocator", \
            k.stats.pages_freed
        yield "counter", "tlbsim_memory_shootdowns", "Shootdowns the memory service issued", \
            k.stats.shootdowns
        yield "gauge", "tlbsim_free_frames", "Frames free", k.frames.free_count
        yield "counter", "tlbsim_lock_order_violations", "Lock-order inversions refused", \
            len(k.validator.reports)
