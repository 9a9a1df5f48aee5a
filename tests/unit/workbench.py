"""A machine whose CPUs keep running while a shootdown is in flight, for the mutation
and property tests.

On hardware an IPI takes time to arrive and the targets execute meanwhile; after
taking it they execute again. The workbench's shootdown port does the same: each
target CPU with a working set accesses it before its flush is applied and again
after, as tasks of their own that the port lets run (a number of event-loop turns)
but does not wait for — an access that needs a lock the shooter holds waits for it,
as it would. A CPU runs one access batch or system call at a time, as the CPU
service does. Everything is deterministic: one thread, no sleeps, no clocks read
but the kernel's.

Unsafe, for the tests: the oracle counted a stale access or an incoherent COW, or the
audit found a stale entry.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Awaitable, Callable

from services.common.errors import SimError
from services.memory.kernel import FlushOrder, ShootdownResult
from services.memory.rules import Rule
from tests.unit.machine import Machine, make_machine, proc


@dataclasses.dataclass
class WorkingSet:
    addresses: list[int]
    write: bool = False


class Workbench:
    def __init__(self, ncpus: int = 4, broken: frozenset[Rule] = frozenset(),
                 turns: Callable[[], int] = lambda: 20, **policy):
        self.m: Machine = make_machine(ncpus, broken=broken, **policy)
        self.k = self.kernel = self.m.kernel  # `kernel`: machine.proc runs on this too
        self.turns = turns  # event-loop turns the port gives the targets, each time
        self.ws: dict[int, WorkingSet] = {}
        self.tasks: list[asyncio.Task] = []
        self.errors: list[str] = []  # domain refusals of background accesses (fine)
        self._busy = {c: asyncio.Lock() for c in self.m.cpus}
        self._deliver = self.k.shootdown
        self.k.shootdown = self._port
        self.hooks: list[Callable[[FlushOrder], Awaitable[None] | None]] = []

    # --- the CPUs ---------------------------------------------------------------------------
    async def switch(self, cpu: int, mm: int) -> None:
        async with self._busy[cpu]:
            await self.m.switch(cpu, mm)

    async def access(self, cpu: int, addresses: list[int], write: bool = False):
        async with self._busy[cpu]:
            return await self.m.access(cpu, addresses, write)

    async def syscall(self, cpu: int, name: str, *args):
        async with self._busy[cpu]:
            return await self.m.syscall(cpu, name, *args)

    async def process(self, cpus, pages: int, write: bool = True, writable: bool = True):
        """A process on `cpus`, each of which touched its `pages` pages and keeps them as
        its working set."""
        mm, base, addrs = await proc(self, cpus, pages, write, writable)
        for c in cpus:
            self.ws[c] = WorkingSet(addrs, write)
        return mm, base, addrs

    def background(self, cpu: int) -> None:
        """The CPU runs its working set once more, in the background."""
        ws = self.ws.get(cpu)
        if ws is None or self.m.cpus[cpu].loaded_mm == 0:
            return
        self.tasks.append(asyncio.ensure_future(self._quietly(cpu, ws)))

    async def _quietly(self, cpu: int, ws: WorkingSet) -> None:
        try:
            await self.access(cpu, ws.addresses, ws.write)
        except SimError as e:  # e.g. the mm exited, the VMA is gone: the program's problem
            self.errors.append(f"cpu {cpu}: {e.message}")

    async def settle(self, turns: int | None = None) -> None:
        for _ in range(self.turns() if turns is None else turns):
            await asyncio.sleep(0)

    async def quiesce(self) -> None:
        """Until nothing runs in the background any more."""
        while self.tasks:
            tasks, self.tasks = self.tasks, []
            await asyncio.gather(*tasks)

    async def everyone_runs(self) -> None:
        """Every CPU with a working set runs it, and the machine quiesces."""
        for c in self.ws:
            self.background(c)
        await self.quiesce()

    # --- the slow IPI ---------------------------------------------------------------------------
    async def _port(self, order: FlushOrder, targets: list[int]) -> ShootdownResult:
        for hook in self.hooks:
            done = hook(order)
            if done is not None:
                await done
        for t in targets:   # the IPI is on its way: the targets run on
            self.background(t)
        await self.settle()
        result = await self._deliver(order, targets)
        for t in targets:   # and after taking it
            self.background(t)
        await self.settle()
        return result

    # --- verdict ------------------------------------------------------------------------------
    def findings(self) -> list[str]:
        """What the safety net saw: stale accesses, incoherent COWs, audit violations."""
        o = self.k.oracle
        out = []
        if o.stale:
            out.append(f"oracle: {o.stale} stale accesses")
        if o.incoherent:
            out.append(f"oracle: {o.incoherent} incoherent COWs")
        _, violations = self.k.audit(self.m.dumps())
        if violations:
            out.append(f"audit: {len(violations)} violations, e.g. {violations[0]}")
        return out
