"""The whole simulated machine in one process: a Kernel and CpuCores wired directly,
as the services wire them over gRPC (the domain tests drive it; `tlbsim bench` measures
it as the floor under the services).

The shootdown port applies flushes to the real CPU cores (no network), records
an event log, and can simulate CPUs that never answer (fenced at once)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from services.common import vtime
from services.common.hits import HitReport
from services.common.policy import Policy
from services.cpu.core import CpuCore
from services.cpu.tlb import NOT_LOADED
from services.memory.kernel import FlushOrder, Kernel, ShootdownResult


@dataclasses.dataclass
class Machine:
    kernel: Kernel
    cpus: dict[int, CpuCore]
    log: list[tuple]
    dead: set[int]
    batch_walks: bool = True
    batch_misses: bool = True  # the walk's absent pages faulted in one call (wall clock)

    async def switch(self, cpu: int, mm: int) -> None:
        gen = self.kernel.switch_mm(cpu, mm)
        self.cpus[cpu].switch(mm, gen, lazy=not mm and self.kernel.policy.lazy_tlb)

    async def access(self, cpu: int, addresses: Sequence[int],
                     write: bool | list[bool] | bytes = False,
                     vt: int | None = None, until: int | None = None,
                     stop_on_segv: bool = False):
        """`vt`: in virtual time, the batch starts then (`until`: the quantum's end).
        `write`: for every access, or one flag per access (a list, or bytes)."""
        core = self.cpus[cpu]

        async def miss(vpn: int, w: bool, at: int | None):
            return await self.kernel.handle_miss(cpu, core.loaded_mm, vpn, w, at)

        async def walk(vpns: list[int]):
            return self.kernel.walk(cpu, core.loaded_mm, vpns)

        async def misses(vpns: list[int], touches):
            ptes, batch, results, error = await self.kernel.walk_and_fault(
                cpu, core.loaded_mm, vpns, touches)
            return ptes, batch, [*results, error] if error is not None else results

        writes: Sequence[int] = write if isinstance(write, bytes) else \
            [int(w) for w in write] if isinstance(write, list) else [int(write)] * len(addresses)
        mm = core.loaded_mm
        try:
            return await core.run_accesses(addresses, writes, miss,
                                           walk if self.batch_walks else None,
                                           stop_on_segv=stop_on_segv, vt=vt, until=until,
                                           misses=misses if self.batch_misses else None)
        finally:  # what was served is reported, also when the CPU stopped (fenced)
            self.report(core.take_hits(), mm)

    def report(self, report: HitReport, mm: int = 0) -> int:
        return self.kernel.report_accesses(report, mm)

    def returned(self, cpu: int, call: str, result, virtual: bool = False) -> None:
        """What the CPU service does when a system call returns: the initiator flushes
        itself, and after `exit` it runs no mm."""
        for f in result.local_flushes:
            self.cpus[cpu].local_flush(f, virtual)
        if call == "exit":
            self.cpus[cpu].switch(0, 0)

    async def syscall(self, cpu: int, name: str, *args, vt: int | None = None, **kw):
        """`vt`: in virtual time, the call starts then (the CPU's clock if later); the
        CPU's clock ends where the call did (the services' Syscall, in process)."""
        core = self.cpus[cpu]
        if vt is None:
            result = await getattr(self.kernel, name)(cpu, core.loaded_mm, *args, **kw)
            self.returned(cpu, name, result)
            return result
        core.v.start(vt)
        result = await getattr(self.kernel, name)(cpu, core.loaded_mm, *args, vt=core.v.clock,
                                                  **kw)
        core.v.advance(result.vt - core.v.clock)
        self.returned(cpu, name, result, virtual=True)
        return result

    def dumps(self) -> list[dict]:
        return [dict(cpu=c.id, fenced=c.fenced, loaded_mm=c.loaded_mm, lazy=c.lazy,
                     local_gen=dict(c.tlb.local_gen),
                     entries=[(mm, vpn, e.pfn, e.writable, e.tid)
                              for mm, vpn, e in c.tlb.entries()])
                for c in self.cpus.values()]


def make_machine(ncpus: int = 4, broken: frozenset = frozenset(), **policy) -> Machine:
    """`broken`: safety rules the kernel skips on purpose (services/memory/rules.py)."""
    log: list[tuple] = []
    dead: set[int] = set()
    cpus: dict[int, CpuCore] = {}

    async def port(order: FlushOrder, targets: list[int]) -> ShootdownResult:
        log.append(("shootdown", order.mm, order.start_vpn, order.pages, tuple(targets)))
        acked, fenced, handlers, left = [], [], [], []
        d = None if order.sent_vt is None else vtime.deliver(
            order.sent_vt, targets, order.hardware, order.pages, p.cost_model, fabric)
        for t in targets:
            if t in dead:
                cpus[t].fence()
                fenced.append(t)
            else:
                outcome, _, done = cpus[t].take_flush(order, d.arrivals[t] if d else None,
                                                      order.hardware)
                if done is not None:
                    handlers.append(done)
                if outcome == NOT_LOADED:
                    left.append(t)
                acked.append(t)
        return ShootdownResult(acked, fenced, d.done(handlers) if d else None, left)

    p = Policy(**policy)
    fabric = vtime.Server()
    kernel = Kernel(p, port, broken=broken)
    for i in range(ncpus):
        cpus[i] = CpuCore(i, p.tlb_entries, p.tlb_ways, asids=p.asids)
        cpus[i].costs = p.cost_model
    return Machine(kernel, cpus, log, dead)
