"""The load generator's side of `--timing virtual`: it issues the cluster's work in
virtual-time order, one operation at a time (DESIGN.md §7, services/common/vtime.py).

A scenario's concurrent threads are asyncio tasks. Each holds a *token* while it runs
Python between two operations; an operation starts only when no task holds one, and then
it is the pending operation with the smallest (virtual clock of its CPU, CPU id,
sequence number) that goes. So the cluster sees the same operations in the same order on
a quiet and on a loaded host, and every virtual figure is a function of the seed and the
configuration alone. Scenarios run their threads with `gather` (the caller lends its
token to the children and gets it back from the last one) and wait with `pause` (virtual
time passes on that CPU, nothing else happens).

A thread's operations are causally ordered even when they run on different CPUs (the
main task mmaps on one CPU, then reads on another): each thread carries the virtual
time its last operation ended, and its next one starts no earlier. Threads started by
`gather` inherit their parent's, and the parent resumes at the latest of theirs.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import itertools
from typing import Any, Awaitable

# The quantum: an access batch runs at most this far ahead of its start before another
# CPU gets a turn. No cross-CPU effect is faster (an IPI costs ~800 ns to send, ~1 us to
# take), so a flush is never more than a quantum late (results.virtual.late_flush_hits
# counts the accesses it was late for).
DEFAULT_QUANTUM_NS = 1000

# A virtual run's default shootdown deadline (wall seconds): a CPU fenced for missing one
# on a starved host would change the run (results.virtual.perturbed says so).
VIRTUAL_DEADLINE_S = 30.0

# The virtual time the current thread's last operation ended (asyncio copies it into
# every task a thread starts).
_thread_time: contextvars.ContextVar[int] = contextvars.ContextVar("thread_time", default=0)


class VirtualScheduler:
    def __init__(self, quantum_ns: int = DEFAULT_QUANTUM_NS):
        self.quantum_ns = quantum_ns
        self.clock: collections.Counter[int] = collections.Counter()  # each CPU's, ns
        self.started: dict[int, int] = {}  # each CPU's clock at its first operation
        self._tokens = 1  # the scenario's own task runs
        self._pending: list[tuple[int, int, int, asyncio.Future]] = []
        self._seq = itertools.count()

    async def turn(self, cpu: int) -> int:
        """Wait until this CPU's next operation is the earliest one pending; returns the
        virtual time it starts at. The caller holds the token again afterwards."""
        start = max(self.clock[cpu], _thread_time.get())
        self.clock[cpu] = start
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._pending, (start, cpu, next(self._seq), future))
        self._tokens -= 1
        self._dispatch()
        await future
        self.started.setdefault(cpu, start)
        return start

    def reached(self, cpu: int, vt: int) -> None:
        """The CPU's clock after an operation of this thread (the service's answer)."""
        self.clock[cpu] = max(self.clock[cpu], vt)
        _thread_time.set(max(_thread_time.get(), self.clock[cpu]))

    def pause(self, cpu: int, seconds: float) -> None:
        """The thread on `cpu` waits: virtual time passes on it."""
        self.reached(cpu, max(self.clock[cpu], _thread_time.get()) + round(seconds * 1e9))

    def _dispatch(self) -> None:
        if self._tokens == 0 and self._pending:
            *_, future = heapq.heappop(self._pending)
            self._tokens += 1
            future.set_result(None)

    async def gather(self, *coros: Awaitable[Any]) -> list[Any]:
        """Run `coros` as concurrent threads; returns their results (the first exception
        is raised once every one has finished, so no thread is left running)."""
        if not coros:
            return []
        left = len(coros)
        self._tokens += left - 1  # each child runs until its first turn; we wait

        ends: list[int] = []

        async def child(coro: Awaitable[Any]) -> Any:
            nonlocal left
            try:
                return await coro
            finally:
                ends.append(_thread_time.get())
                left -= 1
                if left:  # the last one hands its token back to the caller
                    self._tokens -= 1
                    self._dispatch()

        results = await asyncio.gather(*(child(c) for c in coros), return_exceptions=True)
        _thread_time.set(max([_thread_time.get(), *ends]))  # joined: after every child
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)

    @property
    def makespan_ns(self) -> int:
        return max(self.clock.values(), default=0)
