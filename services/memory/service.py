"""The memory service: a thin gRPC adapter around the Kernel."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

import grpc

from services.common import wire
from services.common.chaos import check_epoch, epoch_of, new_boot
from services.common.costmodel import Events, memory_events
from services.common.errors import InvalidArgument, Unavailable
from services.common.hits import HitReport
from services.common.metrics import ListHistogram, labelled, node_registry
from services.common.policy import Policy, SharedFlush
from services.common.server import channel, completes, rpc
from services.common.stats import COUNT_BUCKETS
from services.memory.digest import kernel_digest
from services.memory.kernel import (DEFAULT_FRAMES, FlushOrder, Kernel, ShootdownResult,
                                    SyscallResult)
from services.memory.promises import Promises
from tlbsim.v1 import (common_pb2, coordinator_pb2, coordinator_pb2_grpc, memory_pb2 as pb,
                       memory_pb2_grpc)

log = logging.getLogger("tlbsim.memory")

SHOOTDOWN_MARGIN_S = 5.0  # the coordinator answers by the deadline; this covers the hop
MAX_WALK_PAGES = 1 << 16  # per Walk: bounded work (CPUs read ahead 64 pages at a time)
# and a coordinator restart: a Shootdown that failed is sent again (the same flush: it is
# idempotent by generation) until deadline + margin; frames wait for its completion.
RETRY_BACKOFF_S = (0.05, 0.5)
ANNOUNCE_S = 1.0  # the memory service re-announces itself: a restarted coordinator learns it
# --unsafe free-before-flush: the IPI is slow, as if the interconnect were busy: it leaves
# only once every target ran (reported accesses) again — with translations to frames
# already freed, as the bug lets them — or after this long, if one runs nothing.
UNSAFE_IPI_DELAY_MAX_S = 1.0
# Stats waits this long for the access reports CPUs promised (services/memory/promises.py):
# one arrives within milliseconds of its Access's answer; a CPU that died in between never
# sends it (one that restarted drops it sooner: its next walk's new incarnation), nor does
# a client that only claims to be a CPU. One that comes later still is judged then.
PROMISE_WAIT_S = 2.0
# Why the RPC being served shoots down (a metrics label): the system call, or "cow" for a
# fault. A context variable, because concurrent RPCs interleave on one event loop.
FAULT_KINDS = ("anon", "cow", "prot", "segv")


class MemoryNode(memory_pb2_grpc.MemoryServiceServicer):
    service_names = (pb.DESCRIPTOR.services_by_name["MemoryService"].full_name,)

    def __init__(self, coordinator: str, frames: int | None = None, metrics: bool = True):
        self.coordinator_address = coordinator
        self.frames = frames
        self.boot = new_boot()  # a restarted service is another machine: another epoch
        self.runs = 0
        self.epoch = epoch_of(self.boot, 0)
        self.shootdown_retries = 0
        # How long past its deadline the coordinator may hold a shootdown for a fenced
        # target to settle (its lease + margin; it says so when we register).
        self.settle_s = 2.5
        self._coordinator: coordinator_pb2_grpc.CoordinatorServiceStub | None = None
        self._channel: grpc.aio.Channel | None = None
        self.kernel = self._new_kernel(Policy())
        self.registry = node_registry(metrics, "memory", lambda: self.kernel.policy,
                                      self._metrics, self._events)
        self._hist = {
            "wait": ListHistogram("tlbsim_lock_wait_seconds",
                                  "Time to acquire a lock, by lock class and lock policy",
                                  ["lock_class", "policy"]),
            "hold": ListHistogram("tlbsim_lock_hold_seconds",
                                  "Time a lock was held, by lock class and lock policy",
                                  ["lock_class", "policy"]),
            "fault": ListHistogram("tlbsim_fault_duration_seconds",
                                   "Page faults handled at the memory service", []),
            "munmap": ListHistogram("tlbsim_munmap_duration_seconds",
                                    "munmap calls at the memory service", []),
            "fork": ListHistogram("tlbsim_fork_duration_seconds", "fork calls, by fork mode",
                                  ["mode"]),
            "flush_wait": ListHistogram(
                "tlbsim_frame_flush_wait_seconds",
                "Per frame: from the gather taking it off the page tables until its "
                "shootdown completed", []),
            "flush_pages": ListHistogram(
                "tlbsim_shootdown_pages", "PTEs cleared or write-protected per shootdown",
                ["flush"], COUNT_BUCKETS),
        }
        self._announce: asyncio.Task | None = None
        # Reports of accesses per CPU (--unsafe free-before-flush waits on them), and
        # those promised but not yet sent (Stats waits on them).
        self._reports: collections.Counter = collections.Counter()
        self._reported = asyncio.Condition()
        self._promises = Promises()

    def _new_kernel(self, policy: Policy) -> Kernel:
        return Kernel(policy, self._shootdown, self.frames or DEFAULT_FRAMES)

    # --- lifecycle ---------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(self, server)

    async def start(self, address: str) -> None:
        self._channel = channel(self.coordinator_address)
        self._coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._announce = asyncio.create_task(self._register(address))

    async def _register(self, address: str) -> None:
        """Tell the coordinator where memory is, which epoch and policy the machine has;
        it may start after us, or restart (with nothing), so keep telling it."""
        while True:
            try:
                reply = await self._coordinator_stub().RegisterMemory(
                    coordinator_pb2.RegisterMemoryRequest(
                        address=address, epoch=self.epoch,
                        policy=wire.policy_to_proto(self.kernel.policy)),
                    timeout=5, wait_for_ready=True)
                self.settle_s = reply.settle_s or self.settle_s
                await asyncio.sleep(ANNOUNCE_S)
            except grpc.aio.AioRpcError as e:
                log.warning("cannot register with the coordinator: %s", e.code().name)
                await asyncio.sleep(0.5)

    def _coordinator_stub(self) -> coordinator_pb2_grpc.CoordinatorServiceStub:
        assert self._coordinator is not None, "start() first"
        return self._coordinator

    async def stop(self) -> None:
        if self._announce is not None:
            self._announce.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def _shootdown(self, order: FlushOrder, targets: list[int]) -> ShootdownResult:
        """One shootdown through the coordinator. It completes only when every target
        acked or was fenced; a coordinator that fails (restarts) gets the same request
        again, with the deadline fixed at the first try, until deadline + margin."""
        if self.kernel.policy.free_before_flush:
            await self._until_ran(targets)
        deadline = self.kernel.policy.deadline_s
        flush = wire.flush_to_proto(order)
        flush.deadline_unix_s = time.time() + deadline
        request = coordinator_pb2.ShootdownRequest(flush=flush, targets=targets,
                                                   reason=order.reason, scope=self._scope(order))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline + self.settle_s + SHOOTDOWN_MARGIN_S
        backoff = RETRY_BACKOFF_S[0]
        while True:
            try:
                reply = await self._coordinator_stub().Shootdown(
                    request, timeout=max(0.01, give_up - loop.time()), wait_for_ready=True)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or loop.time() + backoff >= give_up:
                    raise Unavailable(
                        f"shootdown {order.shootdown_id} of mm {order.mm} did not complete "
                        f"by its deadline + {self.settle_s + SHOOTDOWN_MARGIN_S:g} s "
                        f"({e.code().name}: the coordinator is unreachable); its frames "
                        "stay allocated") from None
                self.shootdown_retries += 1
                log.warning("shootdown %d: coordinator %s; retrying", order.shootdown_id,
                            e.code().name)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, RETRY_BACKOFF_S[1])
        acked, fenced = [a.cpu for a in reply.acks], list(reply.fenced)
        missing = set(targets) - set(acked) - set(fenced)
        if missing:  # never free a frame on a shootdown some target did not answer for
            raise Unavailable(f"shootdown {order.shootdown_id}: the coordinator reported "
                              f"neither an ack nor a fence for cpus {sorted(missing)}")
        return ShootdownResult(acked=acked, fenced=fenced,
                               not_loaded=[a.cpu for a in reply.acks if wire.not_loaded(a)],
                               done_vt=reply.done_vtime_ns
                               if reply.HasField("done_vtime_ns") else None)

    def _check_epoch(self, context) -> None:
        """State from another epoch (a restarted machine): refuse it (common/chaos.py)."""
        if context is not None:
            check_epoch(self.epoch, context.invocation_metadata())

    # --- RPCs ----------------------------------------------------------------------------
    @rpc
    async def Reset(self, request, context):
        policy = wire.policy_from_proto(request.policy)
        self.kernel = self._new_kernel(policy)
        self._promises = Promises()  # the old machine's reports are refused (its epoch)
        self.runs += 1
        self.epoch = epoch_of(self.boot, self.runs)
        return pb.MemoryResetResponse(epoch=self.epoch)

    @rpc
    async def CreateMm(self, request, context):
        self._check_epoch(context)
        return pb.CreateMmResponse(mm=self.kernel.create_mm())

    @rpc
    async def SwitchMm(self, request, context):
        self._check_epoch(context)
        lazy = request.mm == 0 and self.kernel.policy.lazy_tlb and \
            bool(self.kernel.cpu_mm.get(request.cpu))
        gen = self.kernel.switch_mm(request.cpu, request.mm)
        return pb.MemSwitchMmResponse(tlb_gen=gen, lazy=lazy)

    @rpc
    @completes
    async def Walk(self, request, context):
        self._check_epoch(context)
        response = await self._walk(request)
        self._promised(request)  # only an answered walk: a refused call changes nothing
        return response

    async def _walk(self, request) -> pb.WalkResponse:
        if len(request.vpns) > MAX_WALK_PAGES:
            raise InvalidArgument(f"walk of {len(request.vpns)} pages: at most {MAX_WALK_PAGES}")
        n = len(request.touch_vpns)
        if len(request.touch_writes) != n or len(request.touch_held) != n:
            raise InvalidArgument(f"touches: {n} vpns, {len(request.touch_writes)} write "
                                  f"flags, {len(request.touch_held)} held flags")
        vpns = list(request.vpns)
        if not n:
            ptes = self.kernel.walk(request.cpu, request.mm, vpns)
            return pb.WalkResponse(ptes=_ptes(ptes))
        ptes, batch, results, error = await self.kernel.walk_and_fault(
            request.cpu, request.mm, vpns,
            list(zip(request.touch_vpns, request.touch_writes, request.touch_held)))
        return pb.WalkResponse(
            ptes=_ptes(ptes), missed_vpns=[v for v, _ in batch],
            missed_writes=[w for _, w in batch],
            misses=[pb.HandleMissResponse(outcome=wire.MISS_OUTCOMES[r.outcome], pfn=r.pfn,
                                          writable=r.writable, tid=r.tid,
                                          local_flushes=wire.flushes_to_proto(r.local_flushes),
                                          overtaken=r.overtaken) for r in results],
            error=pb.MissError(code=error.code.value, message=error.message,
                               reason=error.reason) if error is not None else None)

    @rpc
    @completes
    async def HandleMiss(self, request, context):
        self._check_epoch(context)
        r = await self.kernel.handle_miss(request.cpu, request.mm, request.vpn, request.write,
                                          _vtime(request))
        self._promised(request)
        return pb.HandleMissResponse(outcome=wire.MISS_OUTCOMES[r.outcome], pfn=r.pfn,
                                     writable=r.writable, tid=r.tid,
                                     local_flushes=wire.flushes_to_proto(r.local_flushes),
                                     vtime_ns=r.vt)

    @rpc
    @completes
    async def Syscall(self, request, context):
        self._check_epoch(context)
        r = await syscall(self.kernel, request.cpu, request.mm, request.call)
        result = common_pb2.SyscallResponse(address=r.address, child_mm=r.child_mm,
                                            shootdowns=r.shootdowns, pages_freed=r.pages_freed,
                                            latency_s=r.latency_s, vtime_ns=r.vt)
        return pb.MemSyscallResponse(result=result,
                                     local_flushes=wire.flushes_to_proto(r.local_flushes))

    async def _until_ran(self, cpus: list[int]) -> None:
        """Until each of `cpus` reported accesses again (or UNSAFE_IPI_DELAY_MAX_S)."""
        seen = {c: self._reports[c] for c in cpus}

        def ran() -> bool:
            return all(self._reports[c] > n for c, n in seen.items())

        async with self._reported:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reported.wait_for(ran), UNSAFE_IPI_DELAY_MAX_S)

    @rpc
    async def ReportAccesses(self, request, context):
        self._check_epoch(context)
        parts = self.kernel.judge_accesses(
            HitReport(request.tids, request.runs, request.counts), request.mm)
        stale = 0
        # In chunks, giving the loop a turn in between: a report of a million stale
        # hits must not hold up every other call while it is judged.
        for part in parts:
            stale += part
            await asyncio.sleep(0)
        self._reports[request.cpu] += 1
        if request.token:
            self._promises.kept(request.cpu, request.token)
        async with self._reported:
            self._reported.notify_all()
        return pb.ReportAccessesResponse(stale=stale)

    @rpc
    async def Audit(self, request, context):
        self._check_epoch(context)
        checked, violations = self.kernel.audit(wire.tlb_dumps_from_proto(request.tlbs))
        return pb.AuditResponse(entries_checked=checked, violations=violations)

    def _promised(self, request) -> None:
        if request.report_token:
            self._promises.promise(request.cpu, request.report_token)

    async def _reports_in(self) -> None:
        """Until the reports promised so far arrived (services/memory/promises.py), or
        PROMISE_WAIT_S: then they are lost (a CPU died between its answer and its report)."""
        promises = self._promises
        mark = promises.mark()
        if not promises.owed_before(mark):
            return
        async with self._reported:
            try:
                await asyncio.wait_for(
                    self._reported.wait_for(lambda: not promises.owed_before(mark)),
                    PROMISE_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("gave up waiting for %d promised access reports",
                            promises.give_up(mark))

    @rpc
    async def Stats(self, request, context):
        await self._reports_in()  # the stale count covers every Access answered so far
        k = self.kernel
        s = k.stats
        return pb.MemoryStats(
            epoch=self.epoch, policy=wire.policy_to_proto(k.policy), faults=dict(s.faults),
            shootdowns=s.shootdowns, full_flushes=s.full_flushes, pages_freed=s.pages_freed,
            tables_freed=s.tables_freed, stale_accesses=k.oracle.stale,
            audit_violations=s.audit_violations,
            lock_order_violations=len(k.validator.reports), free_frames=k.frames.free_count,
            used_frames=k.frames.used, lock_wait_s=wire.percentiles(k.lock_stats.all_waits()),
            fault_latency_s=wire.percentiles(s.fault_latency_s),
            munmap_latency_s=wire.percentiles(s.munmap_latency_s), ipis=s.ipis,
            fenced=len(s.fenced), contended_acquisitions=k.lock_stats.contended,
            fork_latency_s=wire.percentiles(s.fork_latency_s),
            tables_allocated=dict(s.tables_allocated), unshares=s.unshares,
            tables_dropped=s.tables_dropped, shared_tables=s.shared_tables,
            reclaimed_pages=s.reclaimed_pages, swap_outs=s.swap_outs, swap_ins=s.swap_ins,
            swap_reads=s.swap_reads, reports_lost=self._promises.lost,
            reclaim_shootdowns=s.reclaim_shootdowns, reclaim_ipis=s.reclaim_ipis,
            lock_order_reports=k.validator.reports[:10],
            frames_freed_without_ack=s.frames_freed_without_ack,
            shootdown_retries=self.shootdown_retries,
            lock_acquisitions=k.lock_stats.acquisitions,
            range_pages=s.range_pages,
            lock_wait_vtime_ns=wire.percentiles(k.lock_stats.all_vwaits()),
            shootdown_vtime_ns=wire.percentiles(s.shootdown_vt_ns),
            lock_inversions=k.lock_stats.inversions, broadcasts=s.broadcasts,
            broadcast_full=s.broadcast_full, broadcast_pages=s.broadcast_pages,
            digest=kernel_digest(k) if request.digest else "")

    def _scope(self, order: FlushOrder) -> str:
        """Whose CPUs a shootdown targets (a metrics label): this mm's, or, for a changed
        shared table, every CPU or the sharers' CPUs as the shared-flush policy says."""
        if not order.all_mms:
            return "mm"
        return {SharedFlush.ALL_CPUS: "all", SharedFlush.SHARER_UNION: "sharers"}.get(
            self.kernel.policy.shared_flush, "mm")

    def _events(self) -> Events:
        k, s = self.kernel, self.kernel.stats
        return memory_events(s.faults, s.shootdowns, s.full_flushes, s.range_pages,
                             k.lock_stats.acquisitions, s.broadcasts, s.broadcast_full,
                             s.broadcast_pages)

    def _metrics(self):
        """Read at scrape time. The kernel's counts restart when a run resets the machine."""
        k, s = self.kernel, self.kernel.stats
        p = k.policy
        yield "counter", "tlbsim_stale_accesses", \
            "TLB hits on revoked translations (the oracle; must stay 0)", k.oracle.stale
        yield "counter", "tlbsim_accesses_checked", "TLB hits the oracle checked", \
            k.oracle.checked
        yield "counter", "tlbsim_audit_violations", "TLB entries the audits found stale", \
            s.audit_violations
        faults = {kind: s.faults.get(kind, 0) for kind in FAULT_KINDS}
        faults["spurious"] = s.faults.get("walked", 0)  # the PTE was there when locked
        yield labelled("counter", "tlbsim_faults", "Page faults by kind", ["kind"],
                       [((kind,), n) for kind, n in faults.items()])
        yield labelled("counter", "tlbsim_memory_shootdowns",
                       "Shootdowns the memory service issued, by flush policy", ["flush"],
                       [((p.flush,), s.shootdowns)])
        yield "counter", "tlbsim_full_flushes", "Shootdowns that flushed the whole mm", \
            s.full_flushes
        yield "counter", "tlbsim_shootdown_range_pages", \
            "Pages named by ranged shootdowns (one broadcast invalidation each)", s.range_pages
        yield "counter", "tlbsim_lazy_cpus_skipped", \
            "Lazy CPUs left out of a shootdown (they catch up at switch_mm)", s.lazy_skipped
        yield "counter", "tlbsim_pages_freed", "Data pages returned to the allocator", \
            s.pages_freed
        yield "counter", "tlbsim_frames_freed_without_ack", \
            "Frames freed before their shootdown completed (a target neither acked nor " \
            "was fenced); must stay 0", s.frames_freed_without_ack
        yield "counter", "tlbsim_shootdown_retries", \
            "Shootdowns sent to the coordinator again after it failed", self.shootdown_retries
        yield "counter", "tlbsim_page_tables_freed", "Page-table frames freed", s.tables_freed
        yield "counter", "tlbsim_pages_reclaimed", "Pages reclaimed", \
            s.reclaimed_pages
        yield "counter", "tlbsim_swap_outs", "PTEs reclaim turned into swap entries", \
            s.swap_outs
        yield "counter", "tlbsim_swap_ins", "Pages brought back from swap by a fault", \
            s.swap_ins
        yield "counter", "tlbsim_swap_reads", \
            "Of the swap-ins, pages read from swap (not found in the swap cache)", s.swap_reads
        yield "counter", "tlbsim_reclaim_shootdowns", \
            "Reclaim's batched flushes (one per batch of pages unmapped)", s.reclaim_shootdowns
        yield "counter", "tlbsim_reclaim_ipis", \
            "Deliveries of reclaim's flushes (also counted in the coordinator's IPIs)", \
            s.reclaim_ipis
        yield "gauge", "tlbsim_shared_page_tables", "PTE tables shared by more than one mm", \
            s.shared_tables
        yield "counter", "tlbsim_unshares", "Shared page tables unshared (table COW)", \
            s.unshares
        yield "gauge", "tlbsim_frames_free", "Frames free", k.frames.free_count
        yield "gauge", "tlbsim_frames_used", "Frames in use", k.frames.used
        yield "gauge", "tlbsim_frames_pending_free", \
            "Frames off the page tables, waiting for their shootdown before being freed", \
            s.frames_pending_free
        yield "counter", "tlbsim_lock_order_violations", "Lock-order inversions refused", \
            len(k.validator.reports)
        by_class = k.lock_stats.by_class
        yield labelled("counter", "tlbsim_lock_acquisitions", "Lock acquisitions",
                       ["lock_class", "policy"],
                       [((c.label, p.lock), st.acquisitions) for c, st in by_class.items()])
        yield labelled("counter", "tlbsim_lock_contended", "Acquisitions that had to wait",
                       ["lock_class", "policy"],
                       [((c.label, p.lock), st.contended) for c, st in by_class.items()])
        h = self._hist
        for c, st in by_class.items():
            h["wait"].update((c.label, p.lock), st.wait_s)
            h["hold"].update((c.label, p.lock), st.hold_s)
        h["fault"].update((), s.fault_latency_s)
        h["munmap"].update((), s.munmap_latency_s)
        h["fork"].update((p.fork,), s.fork_latency_s)
        h["flush_wait"].update((), s.flush_waits)
        h["flush_pages"].update((p.flush,), s.flush_pages)
        for hist in h.values():
            yield hist.family()


def _ptes(ptes) -> list[pb.Pte]:
    return [pb.Pte(present=True, pfn=p[0], writable=p[1], tid=p[2]) if p else pb.Pte()
            for p in ptes]


async def syscall(k: Kernel, cpu: int, mm: int, call: common_pb2.SyscallRequest
                  ) -> SyscallResult:
    """A SyscallRequest's call on the kernel, for `cpu` running `mm`."""
    which, vt = call.WhichOneof("call"), _vtime(call)
    if which == "mmap":
        a = call.mmap
        return await k.mmap(cpu, mm, a.pages, a.writable, a.populate, vt=vt,
                            address=a.address if a.HasField("address") else None)
    if which == "munmap":
        return await k.munmap(cpu, mm, call.munmap.address, call.munmap.pages, vt=vt)
    if which == "madvise_dontneed":
        a = call.madvise_dontneed
        return await k.madvise_dontneed(cpu, mm, a.address, a.pages, vt=vt)
    if which == "mprotect":
        a = call.mprotect
        return await k.mprotect(cpu, mm, a.address, a.pages, a.writable, vt=vt)
    if which == "fork":
        return await k.fork(cpu, mm, vt=vt)
    if which == "exit":
        return await k.exit(cpu, mm, vt=vt)
    raise InvalidArgument("syscall: no call given")


def _vtime(request) -> int | None:
    """The caller's virtual clock (--timing virtual), None in wall-clock runs."""
    return request.vtime_ns if request.HasField("vtime_ns") else None
