"""Lock-order validation (lockdep-style) and wait accounting, on a hand-moved clock: a\nwaiter is known to wait by an event it sets before it asks, not by sleeping."""
import asyncio

import pytest

from services.common.clock import ManualClock
from services.common.errors import Aborted
from services.memory.locks import (LockClass, LockStats, LockValidator, OpContext, RwLock,
                                   SimLock)


def ctx(validator=None, stats=None, clock=None):
    return OpContext(validator or LockValidator(), stats or LockStats(), clock or ManualClock())


async def test_the_documented_order_is_accepted():
    c = ctx()
    mmap, ptl_lock, pte = RwLock("mmap_lock:1", 1), SimLock(LockClass.PAGE_TABLE, "ptl_mm:1", 1), \
        SimLock(LockClass.PTL, "ptl:9", 9)
    async with mmap.read(c):
        async with c.locked(ptl_lock):
            async with c.locked(pte):
                assert [h.name for h in c.held] == ["mmap_lock:1", "ptl_mm:1", "ptl:9"]
    assert c.held == [] and c.validator.reports == []


async def test_an_inversion_is_refused_and_reported_with_both_orders():
    v = LockValidator()
    c = ctx(v)
    pte = SimLock(LockClass.PTL, "ptl:9", 9)
    mm_lock = SimLock(LockClass.PAGE_TABLE, "page_table_lock:1", 1)
    async with c.locked(pte):
        with pytest.raises(Aborted, match="acquiring page_table_lock:1 .* while holding ptl:9"):
            await mm_lock.acquire(c)
    assert len(v.reports) == 1 and (LockClass.PTL, LockClass.PAGE_TABLE) in v.orders_seen
    assert "ptl:9 -> page_table_lock:1" in v.reports[0]
    assert not mm_lock._lock.locked()  # refused before waiting: no deadlock, nothing held


async def test_same_class_must_go_by_ascending_key():
    c = ctx()
    a = SimLock(LockClass.PAGE_TABLE, "page_table_lock:1", 1)
    b = SimLock(LockClass.PAGE_TABLE, "page_table_lock:2", 2)
    async with c.locked(a):
        async with c.locked(b):
            pass
    async with c.locked(b):
        with pytest.raises(Aborted):
            await a.acquire(c)


async def test_waits_and_contention_are_counted():
    clock, stats = ManualClock(), LockStats()
    lock = SimLock(LockClass.PTL, "ptl:1", 1)
    holder, waiter = ctx(stats=stats, clock=clock), ctx(stats=stats, clock=clock)
    await lock.acquire(holder)
    asking = asyncio.Event()

    async def wait():
        asking.set()
        async with waiter.locked(lock):
            clock.advance(3_000_000)  # it holds the lock 3 ms

    task = asyncio.create_task(wait())
    await asyncio.wait_for(asking.wait(), 10)  # it ran up to the lock and waits there
    s = stats.by_class[LockClass.PTL]
    assert s.acquisitions == 2 and s.contended == 1 and not task.done()
    clock.advance(10_000_000)  # the holder keeps it 10 ms more
    lock.release(holder)
    await task
    assert list(s.wait_s) == [0.0, 0.010]  # the holder's own, the waiter's
    assert list(s.hold_s) == [0.010, 0.003]


async def test_rwlock_writer_excludes_readers_until_downgrade():
    lock = RwLock("mmap_lock:1", 1)
    stats = LockStats()
    asking, reading, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def reader():
        asking.set()
        async with lock.read(ctx(stats=stats)):
            reading.set()
            await done.wait()  # still inside when the writer checks

    async with lock.write(ctx()) as held:
        task = asyncio.create_task(reader())
        await asyncio.wait_for(asking.wait(), 10)  # the reader waits for the writer
        assert stats.by_class[LockClass.MMAP].contended == 1 and not reading.is_set()
        await held.downgrade()
        await asyncio.wait_for(reading.wait(), 10)  # shared after the downgrade: it got in
        done.set()
    await task
    assert lock._readers == 0 and not lock._writer
