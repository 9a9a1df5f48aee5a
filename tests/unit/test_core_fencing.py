"""The CPU core's half of fencing (services/cpu/core.py): a fenced CPU, or one whose
lease ran out, serves no translation — not even the one a walk or a fault already in
flight brings back. On a fake clock: nothing sleeps."""
import pytest

from services.common.errors import FailedPrecondition
from services.common.hits import HitReport
from tests.unit.machine import make_machine

PAGE = 4096


class FakeClock:
    """Advances `step` ns at every reading, as time passes while the core works."""

    def __init__(self, step: int = 1_000):
        self.now, self.step = 0, step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


async def cached_process(pages: int):
    """CPU 0 runs an mm whose `pages` pages are all in its TLB."""
    m = make_machine(1)
    mm = m.kernel.create_mm()
    await m.switch(0, mm)
    r = await m.syscall(0, "mmap", pages, True)
    addrs = [r.address + i * PAGE for i in range(pages)]
    await m.access(0, addrs)
    return m, mm, addrs


def handlers(m, cpu: int, before_reply=None):
    """The memory side of a miss and of a batched walk; `before_reply` runs while the
    request is out (what happens to the CPU meanwhile)."""
    core = m.cpus[cpu]

    async def miss(vpn, write, vt=None):
        r = await m.kernel.handle_miss(cpu, core.loaded_mm, vpn, write)
        if before_reply:
            before_reply()
        return r

    async def walk(vpns):
        r = m.kernel.walk(cpu, core.loaded_mm, vpns)
        if before_reply:
            before_reply()
        return r

    return miss, walk


async def test_a_lease_that_runs_out_during_a_long_access_stops_it_at_the_next_run():
    m, mm, addrs = await cached_process(64)
    core = m.cpus[0]
    core.take_hits()
    clock = core.clock = FakeClock(step=1_000)
    core.lease_until_ns = clock.now + 20_000  # ~10 clock readings from now
    miss, walk = handlers(m, 0)
    with pytest.raises(FailedPrecondition, match="lease ran out"):
        await core.run_accesses(addrs * 2000, b"", miss, walk)
    assert core.fenced and core.fence_reason == "lease"
    assert len(core.tlb) == 0  # flushed: nothing old can be served any more
    runs = core.take_hits().runs
    from array import array
    r = array("q")
    r.frombytes(runs)
    starts = r[1::3]
    assert starts and max(starts) < core.lease_until_ns  # no run began past the lease
    assert sum(r[0::3]) < len(addrs) * 2000  # it did stop


async def test_a_cpu_whose_lease_ran_out_refuses_new_work():
    m, mm, addrs = await cached_process(4)
    core = m.cpus[0]
    core.clock = FakeClock()
    core.lease_until_ns = 0
    with pytest.raises(FailedPrecondition, match="lease"):
        core.require_runnable()
    assert core.fenced and len(core.tlb) == 0


@pytest.mark.parametrize("path", ["walk", "fault"])
async def test_a_cpu_fenced_while_its_walk_or_fault_is_out_fills_nothing(path):
    m = make_machine(1)
    mm = m.kernel.create_mm()
    await m.switch(0, mm)
    r = await m.syscall(0, "mmap", 8, True)
    addrs = [r.address + i * PAGE for i in range(8)]
    if path == "walk":  # present PTEs: the batched walk serves the misses
        await m.access(0, addrs)
        m.cpus[0].tlb.invalidate_all()
    core = m.cpus[0]
    miss, walk = handlers(m, 0, before_reply=lambda: core.fence("deadline"))
    with pytest.raises(FailedPrecondition, match="missed a shootdown deadline"):
        await core.run_accesses(addrs, b"", miss, walk)
    assert len(core.tlb) == 0 and core.take_hits() == HitReport()


async def test_a_long_access_gives_the_event_loop_a_turn_between_runs():
    m, mm, addrs = await cached_process(64)
    core = m.cpus[0]
    core.clock = FakeClock(step=500_000)  # 0.5 ms per reading: a pause every ~4
    turns = []

    async def pause():
        turns.append(core.clock.now)

    miss, walk = handlers(m, 0)
    stats = await core.run_accesses(addrs * 100, b"", miss, walk, pause=pause)
    assert stats.hits == 6400 and len(turns) >= 2
    assert all(b - a >= 2_000_000 for a, b in zip(turns, turns[1:]))


async def test_unfenced_after_reregistering_the_cpu_runs_again_from_an_empty_tlb():
    m, mm, addrs = await cached_process(4)
    core = m.cpus[0]
    core.fence("coordinator")
    with pytest.raises(FailedPrecondition, match="the coordinator fenced it"):
        core.require_runnable()
    core.unfence()
    stats = await m.access(0, addrs)
    assert stats.hits == 0 and stats.misses == 4 and m.kernel.oracle.stale == 0
