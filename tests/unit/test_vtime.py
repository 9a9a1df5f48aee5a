"""The virtual-time algebra (services/common/vtime.py) and its use by the pure domain:
FIFO grants, hand-offs that grow with waiters, shootdowns charged to their victims, a
flush holding its table lock until the last ack, the quantum cut of an access batch,
and the load generator's tie-breaking (loadgen/vsched.py). No gRPC, no wall clock."""
import asyncio
import dataclasses

import pytest

from loadgen.vsched import VirtualScheduler
from services.common import vtime
from services.common.costmodel import preset
from services.common.policy import Policy
from tests.unit.machine import make_machine


def test_a_server_grants_in_request_order_at_max_of_request_and_free():
    s = vtime.Server()
    assert s.acquire(100) == 100
    s.release(150)
    assert s.acquire(120) == 150  # waits for the holder
    s.release(200)
    assert s.acquire(300) == 300  # free by then: no wait
    assert (s.waits, s.contended, s.inversions) == (30, 1, 0)


def test_a_request_earlier_than_one_already_granted_is_an_inversion():
    s = vtime.Server()
    s.acquire(500)
    s.release(600)
    assert s.acquire(100) == 600  # the serial order's error: granted after a later one
    assert s.inversions == 1


def test_the_handoff_grows_with_the_requests_queued_ahead():
    h = vtime.Handoff(free=5, base=100, per_waiter=10)
    s = vtime.Server()
    assert s.acquire(0, h) == 5            # free: the uncontended price
    s.release(1000)
    grants = [s.acquire(10 * i, h) for i in range(1, 4)]  # three queue behind the holder
    # 1st: after the holder, 0 queued ahead of it; 2nd: 1 queued; 3rd: 2 queued.
    assert grants == [1100, 1100 + 110, 1100 + 110 + 120]


def test_a_reader_waits_for_a_writer_and_a_writer_for_every_reader():
    rw = vtime.RwServer()
    r1 = rw.read(0)
    rw.read_done(r1 + 500)
    w = rw.write(10)
    assert w == 500  # after the reader
    rw.write_done(w + 100)
    assert rw.read(550) == 600  # after the writer


def test_ipi_sends_are_serial_and_the_shootdown_ends_at_the_last_ack():
    sends = vtime.serial_sends(1000, 3, 800)
    assert sends == [1800, 2600, 3400]
    assert vtime.ipi_done(sends, [2900, 3700, 4500], ack_ns=60) == 4560
    assert vtime.ipi_done(sends, [], ack_ns=60) == 3400  # every target fenced


def test_broadcasts_queue_on_the_fabric_and_pay_per_sender_ahead():
    fabric = vtime.Server()
    one = vtime.broadcast(fabric, 0, 1, 100, 100, 500, 50)
    assert one == (100, 600)
    second = vtime.broadcast(fabric, 0, 1, 100, 100, 500, 50)  # a concurrent sender
    assert second == (600 + 50 + 100, 600 + 50 + 100 + 500)


def test_an_interrupt_in_the_cpus_future_is_taken_when_its_work_gets_there():
    irq = vtime.Interrupts()
    assert irq.take(now=100, arrival=500, cost=1000) == 100  # pending
    assert irq.run(400) == 400           # work ending before the arrival: untouched
    assert irq.run(600) == 1600          # work across it: 1000 ns longer
    assert irq.take(now=2000, arrival=1800, cost=300) == 2300  # in its past: at once


def virtual_machine(ncpus=3, **policy):
    policy.setdefault("cost_model", preset("x86"))
    return make_machine(ncpus, **policy)


async def write_and_share(m, mm_cpus, pages):
    for c in mm_cpus:
        await m.switch(c, 1)
    r = await m.syscall(0, "mmap", pages, True, vt=0)
    addresses = [r.address + i * 4096 for i in range(pages)]
    for c in mm_cpus:
        await m.access(c, addresses, write=True, vt=r.vt)
    return r.address


async def test_a_shootdown_charges_its_victims_not_only_the_initiator():
    m = virtual_machine(3)
    m.kernel.create_mm()
    base = await write_and_share(m, [0, 1, 2], 4)
    cm = m.kernel.policy.cost_model
    victims_before = [m.cpus[c].v.handler for c in (1, 2)]
    start = max(c.v.clock for c in m.cpus.values())
    r = await m.syscall(0, "munmap", base, 4, vt=start)
    handler = cm.ipi_receive_ns + 4 * cm.invlpg_ns
    assert [m.cpus[c].v.handler - b for c, b in zip((1, 2), victims_before)] == [handler] * 2
    assert m.cpus[0].v.handler == 0  # the initiator sent, it took no interrupt
    # It waited for the last ack: the second IPI's arrival, the handler, the ack back.
    assert r.vt >= start + 2 * cm.ipi_send_ns + handler + cm.ack_ns
    assert m.kernel.stats.shootdown_vt_ns.count == 1


async def test_a_flush_under_the_mm_lock_holds_it_until_the_last_ack():
    """lock=mm: madvise's flush is issued under page_table_lock (DESIGN.md §5), so a
    fault of another CPU that wants the lock is granted only after the last ack."""
    m = virtual_machine(3, lock="mm")
    m.kernel.create_mm()
    base = await write_and_share(m, [0, 1, 2], 2)
    mm = m.kernel.mms[1]
    start = max(c.v.clock for c in m.cpus.values())
    r = await m.syscall(0, "madvise_dontneed", base, 1, vt=start)
    held_until = mm.page_table_lock.server.free_at
    cm = m.kernel.policy.cost_model
    assert held_until >= start + 2 * cm.ipi_send_ns + cm.ipi_receive_ns + cm.ack_ns
    assert r.vt >= held_until
    # CPU 2 faults the page madvise dropped, asking for the lock at `start`: granted
    # only when the madvise released it, after the last ack.
    s = await m.access(2, [base], write=True, vt=start)
    assert s.faults == 1 and m.cpus[2].v.clock > held_until


async def test_split_locks_flush_after_dropping_the_ptl_so_faults_do_not_wait_for_acks():
    m = virtual_machine(3, lock="split")
    m.kernel.create_mm()
    base = await write_and_share(m, [0, 1, 2], 2)
    start = max(c.v.clock for c in m.cpus.values())
    r = await m.syscall(0, "madvise_dontneed", base, 1, vt=start)
    pmd = m.kernel.tables.pmd_of(m.kernel.mms[1], base >> 12)
    table = pmd.entries[pmd.slot(base >> 12)]
    cm = m.kernel.policy.cost_model
    # Dropped before the shootdown went out: the IPIs and acks are not inside it.
    assert table.ptl.server.free_at < r.vt - 2 * cm.ipi_send_ns - cm.ipi_receive_ns
    s = await m.access(2, [base], write=True, vt=start)
    assert s.faults == 1


async def test_an_access_batch_stops_at_the_quantum():
    m = virtual_machine(2)
    m.kernel.create_mm()
    base = await write_and_share(m, [0], 8)
    core = m.cpus[0]
    start = core.v.clock
    # Hits cost nothing on x86: price them so that the quantum cuts the batch.
    core.costs = dataclasses.replace(core.costs, tlb_hit_ns=100.0)
    s = await m.access(0, [base + (i % 8) * 4096 for i in range(100)], vt=start,
                       until=start + 1000)
    assert 1 <= s.accesses < 100 and core.v.clock >= start + 1000
    assert core.v.clock - start <= 1000 + 100  # at most one access past the quantum


async def test_the_scheduler_issues_by_clock_then_cpu_id_then_sequence():
    vs = VirtualScheduler()
    order = []

    async def thread(cpu, ends):
        for end in ends:
            await vs.turn(cpu)
            order.append((cpu, vs.clock[cpu]))
            vs.reached(cpu, end)

    # CPU 2 and CPU 1 both start at 0: CPU 1 first (id); then each by its clock.
    await vs.gather(thread(2, [50, 300]), thread(1, [100, 200]))
    assert order == [(1, 0), (2, 0), (2, 50), (1, 100)]
    assert vs.makespan_ns == 300


async def test_a_thread_continues_where_it_left_off_on_another_cpu():
    vs = VirtualScheduler()
    await vs.turn(0)
    vs.reached(0, 5000)
    assert await vs.turn(1) == 5000  # causally after its own last operation


async def test_gather_resumes_the_parent_after_its_latest_child_and_raises_after_all():
    vs = VirtualScheduler()
    finished = []

    async def ok(cpu, end):
        await vs.turn(cpu)
        vs.reached(cpu, end)
        finished.append(cpu)

    async def boom():
        await vs.turn(3)
        raise RuntimeError("x")

    await vs.gather(ok(0, 100), ok(1, 700))
    assert await vs.turn(2) == 700
    with pytest.raises(RuntimeError):
        await vs.gather(boom(), ok(4, 10))
    assert 4 in finished  # the other thread ran to its end before the error surfaced
    await asyncio.wait_for(vs.turn(5), 1)  # and no token was lost


def test_free_before_flush_is_refused_in_virtual_time():
    from services.common.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="timing wall"):
        Policy(timing="virtual", unsafe="free-before-flush")
