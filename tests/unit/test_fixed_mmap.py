"""mmap at a requested address (MAP_FIXED_NOREPLACE): only into unmapped space, and the
kernel's own placement steps past such mappings. The trace replayer maps a program's
segments at the program's own addresses this way."""
import pytest
from hypothesis import given, strategies as st

from services.common.errors import AlreadyExists, InvalidArgument, OutOfRange
from services.memory.mm import HUGE_ALIGN_PAGES, MMAP_BASE_VPN, Mm, Vma
from services.memory.pagetable import Directory
from tests.unit.machine import make_machine

PAGE = 4096
BASE = MMAP_BASE_VPN * PAGE


async def machine_running(ncpus: int = 2, **policy):
    m = make_machine(ncpus, **policy)
    mm = m.kernel.create_mm()
    for c in range(ncpus):
        await m.switch(c, mm)
    return m, mm


def state(m, mm):
    k = m.kernel
    return (k.frames.used, [(v.start, v.end, v.writable) for v in k.mms[mm].vmas],
            k.mms[mm].next_vpn, k.stats.shootdowns)


async def test_a_fixed_mapping_lands_where_asked_and_placement_steps_past_it():
    m, mm = await machine_running(1)
    at = 0x7F00_0000_0000
    r = await m.syscall(0, "mmap", 4, True, address=at)
    assert r.address == at
    assert (await m.access(0, [at + i * PAGE for i in range(4)], write=True)).faults == 4
    # In the way of the kernel's next pick: that pick goes past it.
    r = await m.syscall(0, "mmap", 8, True, address=BASE)
    assert r.address == BASE
    picked = await m.syscall(0, "mmap", 2, True)
    assert picked.address == BASE + 8 * PAGE
    assert m.kernel.oracle.stale == 0


@pytest.mark.parametrize("address,pages", [(BASE, 4), (BASE + 3 * PAGE, 1),
                                           (BASE - PAGE, 2), (BASE - 8 * PAGE, 64)])
async def test_a_fixed_mapping_over_a_mapping_is_refused_and_changes_nothing(address, pages):
    m, mm = await machine_running(1)
    await m.syscall(0, "mmap", 4, True, address=BASE)
    await m.access(0, [BASE + i * PAGE for i in range(4)], write=True)
    before = state(m, mm)
    with pytest.raises(AlreadyExists, match="MAP_FIXED_NOREPLACE"):
        await m.syscall(0, "mmap", pages, True, address=address)
    assert state(m, mm) == before


@pytest.mark.parametrize("address,pages,error", [
    (BASE + 1, 1, InvalidArgument),            # unaligned
    (0x1000, 1, InvalidArgument),              # below mmap_min_addr
    (0, 1, InvalidArgument),                   # the NULL page
    (0x7FFF_FFFF_F000, 2, OutOfRange),         # runs past 47 bits
    (0xFFFF_8000_0000_0000, 1, OutOfRange),    # kernel half
])
async def test_bad_fixed_addresses_are_refused_and_change_nothing(address, pages, error):
    m, mm = await machine_running(1)
    before = state(m, mm)
    with pytest.raises(error):
        await m.syscall(0, "mmap", pages, True, address=address)
    assert state(m, mm) == before


@pytest.mark.parametrize("unsafe", ["none", "free-before-flush"])
async def test_an_address_mapped_again_after_munmap_serves_no_stale_translation(unsafe):
    """A program reuses its addresses (the bump placement never does): the new
    mapping's translations must be the only ones served, and the oracle must see a
    CPU that kept the old ones."""
    m, mm = await machine_running(2, unsafe=unsafe)
    at = 0x7F00_0000_0000
    addrs = [at + i * PAGE for i in range(4)]
    await m.syscall(0, "mmap", 4, True, address=at)
    for c in (0, 1):
        await m.access(c, addrs, write=True)
    old = {a: m.cpus[1].tlb.lookup(mm, a >> 12).tid for a in addrs}
    real_port = m.kernel.shootdown
    stale_seen = []

    async def port(order, targets):  # CPU 1 hits every page before its flush lands
        core = m.cpus[1]
        words = [core.tlb.lookup(mm, a >> 12).tid << 1 for a in addrs]
        core.record_hits(words, core.clock(), core.clock())
        stale_seen.append(m.report(core.take_hits()))
        return await real_port(order, targets)

    m.kernel.shootdown = port
    await m.syscall(0, "munmap", at, 4)
    m.kernel.shootdown = real_port
    await m.syscall(0, "mmap", 4, True, address=at)
    for c in (0, 1):
        await m.access(c, addrs, write=True)
    new = {a: m.cpus[1].tlb.lookup(mm, a >> 12).tid for a in addrs}
    assert all(new[a] != old[a] for a in addrs)  # fresh translations, not the old ones
    assert stale_seen == ([4] if unsafe != "none" else [0])
    assert m.kernel.oracle.stale == (4 if unsafe != "none" else 0)
    _, violations = m.kernel.audit(m.dumps())
    assert violations == []


SPACE = 4096  # pages of a small address space for the placement property


@given(st.lists(st.tuples(st.integers(0, SPACE - 1), st.integers(1, 700)), max_size=8),
       st.integers(0, SPACE), st.integers(1, 1100))
def test_placement_picks_the_lowest_free_range_at_or_past_the_last_pick(fixed, bump, pages):
    mm = Mm(1, Directory(0, 4, 0, 0))
    for start, n in fixed:
        end = min(SPACE, start + n)
        if not mm.overlaps(start, end):
            mm.insert(Vma(start, end, True))
    mm.next_vpn = bump
    vmas = list(mm.vmas)

    def fits(s: int) -> bool:
        aligned = pages < HUGE_ALIGN_PAGES or s % HUGE_ALIGN_PAGES == 0
        return aligned and s + pages <= SPACE and not mm.overlaps(s, s + pages)

    want = next((s for s in range(bump, SPACE) if fits(s)), None)
    got = mm.place(pages, SPACE)
    assert got == want
    assert mm.vmas == vmas
    assert mm.next_vpn == (bump if want is None else want + pages)
