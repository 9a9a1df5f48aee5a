"""Locks with lockdep-style order validation and wait/hold accounting.

The order (DESIGN.md §5): mmap_lock -> sharer-list (rmap) lock ->
page_table_lock -> table ptl. Taking a lock of an earlier class while holding
a later one, or two locks of one class out of key order, is an inversion: it
is recorded with both orders seen and refused (Aborted) instead of risking a
silent deadlock.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from typing import AsyncIterator

from services.common.clock import Clock, monotonic
from services.common.errors import Aborted
from services.common.stats import Samples
from services.common.vtime import Handoff, RwServer, Server


class LockClass(enum.IntEnum):
    MMAP = 0
    RMAP = 1
    PAGE_TABLE = 2
    PTL = 3

    @property
    def label(self) -> str:
        return {0: "mmap_lock", 1: "rmap", 2: "page_table_lock", 3: "ptl"}[self.value]


@dataclasses.dataclass
class ClassStats:
    acquisitions: int = 0
    contended: int = 0
    wait_s: Samples = dataclasses.field(default_factory=Samples)
    hold_s: Samples = dataclasses.field(default_factory=Samples)
    vwait_ns: Samples = dataclasses.field(default_factory=Samples)  # virtual time


class LockStats:
    def __init__(self) -> None:
        self.by_class: dict[LockClass, ClassStats] = {c: ClassStats() for c in LockClass}
        self.inversions = 0  # virtual time: grants out of request order (vtime.Server)

    def all_waits(self) -> Samples:
        return Samples.merged(s.wait_s for s in self.by_class.values())

    def all_vwaits(self) -> Samples:
        return Samples.merged(s.vwait_ns for s in self.by_class.values())

    @property
    def contended(self) -> int:
        return sum(s.contended for s in self.by_class.values())

    @property
    def acquisitions(self) -> int:
        return sum(s.acquisitions for s in self.by_class.values())


class LockValidator:
    """Like lockdep, it learns which class orders occur; every acquisition must come
    after the last lock held (which, because each one had to, is the greatest)."""

    def __init__(self) -> None:
        self.orders_seen: set[tuple[LockClass, LockClass]] = set()
        self.reports: list[str] = []

    def check(self, held: list["SimLock"], lock: "SimLock") -> None:
        if not held:
            return
        h = held[-1]
        self.orders_seen.add((h.cls, lock.cls))
        if (h.cls, h.key) >= (lock.cls, lock.key):
            report = (f"lock order inversion: acquiring {lock.name} ({lock.cls.label}) "
                      f"while holding {h.name} ({h.cls.label}); "
                      f"order seen: {h.name} -> {lock.name}; "
                      f"required: mmap_lock -> rmap -> page_table_lock -> ptl, "
                      f"same class by ascending key")
            self.reports.append(report)
            raise Aborted(report)


class OpContext:
    """The locks one operation holds, in acquisition order; `clock` times the waits
    and holds (the kernel's clock). In virtual time (`vt` not None) it is also the
    operation's clock: `spend` advances it by a cost, and every lock is a FIFO server
    (services/common/vtime.py) that grants it at its virtual time; `handoff` and
    `rwsem` price a contended lock's and mmap_lock's cache-line transfers."""

    def __init__(self, validator: LockValidator, stats: LockStats, clock: Clock = monotonic,
                 vt: int | None = None, handoff: Handoff = Handoff(),
                 rwsem: Handoff = Handoff()):
        self.validator = validator
        self.stats = stats
        self.clock = clock
        self.held: list[SimLock] = []
        self.vt = vt
        self.handoff = handoff
        self.rwsem = rwsem

    def spend(self, ns: float) -> None:
        """The operation does `ns` of work (virtual time only)."""
        if self.vt is not None:
            self.vt += round(ns)

    def _granted(self, cls: LockClass, request: int, grant: int, contended: bool,
                 inverted: bool = False) -> None:
        self.stats.inversions += inverted
        stats = self.stats.by_class[cls]
        stats.vwait_ns.append(grant - request)
        stats.contended += contended
        self.vt = grant

    def locked(self, lock: "SimLock") -> "_Locked":
        return _Locked(self, lock)

    def locked_once(self, lock: "SimLock"):
        """`locked`, unless this operation already holds the lock (the lock-all-sharers
        modes hold this mm's page_table_lock among the sharers'): locks do not nest."""
        return contextlib.nullcontext() if lock in self.held else self.locked(lock)


class _Locked:
    """`async with ctx.locked(lock)`: a plain class, not a generator (fork takes one
    per shared table, so the per-acquisition cost shows)."""
    __slots__ = ("ctx", "lock")

    def __init__(self, ctx: OpContext, lock: "SimLock"):
        self.ctx, self.lock = ctx, lock

    async def __aenter__(self) -> None:
        await self.lock.acquire(self.ctx)

    async def __aexit__(self, *exc) -> None:
        self.lock.release(self.ctx)


class SimLock:
    """A mutex of a lock class; `key` orders locks within one class."""

    def __init__(self, cls: LockClass, name: str, key: int = 0):
        self.cls = cls
        self.name = name
        self.key = key
        self._lock = asyncio.Lock()
        self._since = 0
        self.server = Server()  # the lock in virtual time

    async def acquire(self, ctx: OpContext) -> None:
        ctx.validator.check(ctx.held, self)
        stats = ctx.stats.by_class[self.cls]
        stats.acquisitions += 1
        if self._lock.locked() and ctx.vt is None:
            stats.contended += 1
        t0 = ctx.clock()
        await self._lock.acquire()
        self._since = ctx.clock()
        stats.wait_s.append((self._since - t0) / 1e9)
        ctx.held.append(self)
        if ctx.vt is not None:
            server, inversions = self.server, self.server.inversions
            contended = server.free_at > ctx.vt
            ctx._granted(self.cls, ctx.vt, server.acquire(ctx.vt, ctx.handoff), contended,
                         server.inversions > inversions)

    def release(self, ctx: OpContext) -> None:
        ctx.held.remove(self)
        ctx.stats.by_class[self.cls].hold_s.append((ctx.clock() - self._since) / 1e9)
        if ctx.vt is not None:
            self.server.release(ctx.vt)
        self._lock.release()


class RwLock:
    """mmap_lock: shared for faults and zaps, exclusive for VMA changes."""

    def __init__(self, name: str, key: int = 0):
        self.cls = LockClass.MMAP
        self.name = name
        self.key = key
        self._readers = 0
        self._writer = False
        self._cond = asyncio.Condition()
        self.server = RwServer()  # the lock in virtual time

    @contextlib.asynccontextmanager
    async def read(self, ctx: OpContext) -> AsyncIterator[None]:
        await self._acquire(ctx, write=False)
        try:
            yield
        finally:
            await self._release(ctx, write=False)

    @contextlib.asynccontextmanager
    async def write(self, ctx: OpContext) -> AsyncIterator["RwLock"]:
        """Exclusive; the holder may `downgrade()` to shared, as munmap does for the zap."""
        await self._acquire(ctx, write=True)
        self._held_write = True
        try:
            yield self
        finally:
            await self._release(ctx, write=self._held_write)

    async def downgrade(self, ctx: OpContext | None = None) -> None:
        if ctx is not None and ctx.vt is not None:
            self.server.write_done(ctx.vt)
        async with self._cond:
            self._writer = False
            self._readers += 1
            self._held_write = False
            self._cond.notify_all()

    async def _acquire(self, ctx: OpContext, write: bool) -> None:
        ctx.validator.check(ctx.held, self)  # type: ignore[arg-type]
        stats = ctx.stats.by_class[self.cls]
        stats.acquisitions += 1
        t0 = ctx.clock()
        async with self._cond:
            busy = self._writer or (write and self._readers)
            if busy:
                stats.contended += 1
            await self._cond.wait_for(
                lambda: not self._writer and (not write or self._readers == 0))
            if write:
                self._writer = True
            else:
                self._readers += 1
        stats.wait_s.append((ctx.clock() - t0) / 1e9)
        ctx.held.append(self)  # type: ignore[arg-type]
        if ctx.vt is not None:
            request = ctx.vt
            busy = (self.server.writer_free_at > request if not write else
                    max(self.server.writer_free_at, self.server.readers_until) > request)
            grant = (self.server.write(request, ctx.handoff) if write else
                     self.server.read(request, ctx.rwsem))
            ctx._granted(self.cls, request, grant, busy)

    async def _release(self, ctx: OpContext, write: bool) -> None:
        ctx.held.remove(self)  # type: ignore[arg-type]
        if ctx.vt is not None:
            if write:
                self.server.write_done(ctx.vt)
            else:
                self.server.read_done(ctx.vt)
        async with self._cond:
            if write:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()
