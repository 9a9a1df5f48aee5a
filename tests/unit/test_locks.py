"""Lock-order validation (lockdep-style) and wait accounting."""
import asyncio

import pytest

from services.common.errors import Aborted
from services.memory.locks import (LockClass, LockStats, LockValidator, OpContext, RwLock,
                                   SimLock)


def ctx(validator=None, stats=None):
    return OpContext(validator or LockValidator(), stats or LockStats())


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
    stats = LockStats()
    lock = SimLock(LockClass.PTL, "ptl:1", 1)
    holder, waiter = ctx(stats=stats), ctx(stats=stats)
    await lock.acquire(holder)

    async def wait():
        async with waiter.locked(lock):
            pass

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    lock.release(holder)
    await task
    s = stats.by_class[LockClass.PTL]
    assert s.acquisitions == 2 and s.contended == 1
    assert max(s.wait_s) >= 0.009


async def test_rwlock_writer_excludes_readers_until_downgrade():
    lock = RwLock("mmap_lock:1", 1)
    order = []
    w = ctx()

    async def reader():
        async with lock.read(ctx()):
            order.append("read")

    async with lock.write(w) as held:
        task = asyncio.create_task(reader())
        await asyncio.sleep(0.01)
        assert order == []
        await held.downgrade()
        await asyncio.sleep(0.01)
        assert order == ["read"]  # shared after the downgrade
    await task
