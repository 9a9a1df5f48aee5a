"""The replay's page map (pure): its fast translation against a brute-force model of
the segments, through mappings, unmappings and splits, with pages outside them; and the
gaps it maps implicitly, inside user space."""
import pytest
from hypothesis import given, settings, strategies as st

from loadgen.trace.fmt import Pages
from loadgen.trace.replay import PageMap, Seg
from services.common.addresses import PAGE_SHIFT, USER_VPN_END
from services.memory.mm import MMAP_MIN_VPN

PAGES = 64  # a small program space: segments collide, split and cover most pages

ranges = st.tuples(st.integers(0, PAGES - 1), st.integers(1, 16)).map(
    lambda r: (r[0], min(PAGES, r[0] + r[1])))
ops = st.lists(st.tuples(st.sampled_from(["map", "unmap", "split"]), ranges), max_size=12)
accesses = st.lists(st.tuples(st.integers(0, PAGES - 1), st.integers(0, 1)), max_size=80)


def model(segs: list[Seg], page: int) -> bool:
    """Is `page` mapped? By a linear scan of what was mapped."""
    return any(s.start <= page < s.end for s in segs)


@settings(max_examples=300, deadline=None)
@given(ops, st.lists(accesses, min_size=1, max_size=4), st.integers(1, 100))
def test_translate_gives_each_page_its_segment_and_stops_outside_them(ops, batches, stop_at):
    pm = PageMap()
    for op, (start, end) in ops:
        if op == "map":  # as the replayer maps: over whatever was there
            pm.remove(start, end)
            pm.add(Seg(start, end, True))
        elif op == "unmap":
            pm.remove(start, end)
        else:
            pm.pieces(start, end)  # splits only: every page stays mapped
        for pages in batches:  # translations cached before a change must not survive it
            pairs = [list(p) for p in pages]
            packed = Pages()
            for page, write in pairs:
                packed.packed.append(page << 1 | write)  # uncollapsed, as a file has them
            stop = min(len(pairs), stop_at)
            addresses: list[int] = []
            writes = bytearray()
            got = pm.translate(packed, 0, stop, addresses, writes)
            want = next((k for k, (p, _) in enumerate(pairs[:stop])
                         if not model(pm.segs, p)), stop)
            assert got == want
            assert addresses == [p << PAGE_SHIFT for p, _ in pairs[:want]]
            assert list(writes) == [w for _, w in pairs[:want]]
            for page in range(PAGES):
                assert (pm.lookup(page) is not None) == model(pm.segs, page)


def test_translate_resumes_at_its_index_and_appends():
    pm = PageMap()
    pm.add(Seg(10, 12, True))
    addresses, writes = [0x1000], bytearray(b"\x01")
    pairs = Pages()
    for page, write in [[10, 1], [11, 0], [10, 0], [99, 1], [11, 1]]:
        pairs.add(page, bool(write))
    assert pm.translate(pairs, 1, 5, addresses, writes) == 3  # page 99 is outside
    assert addresses == [0x1000, 11 << PAGE_SHIFT, 10 << PAGE_SHIFT]
    assert writes == b"\x01\x00\x00"
    pm.add(Seg(99, 100, True))  # the replayer maps it, then goes on from there
    assert pm.translate(pairs, 3, 5, addresses, writes) == 5
    assert addresses[3:] == [99 << PAGE_SHIFT, 11 << PAGE_SHIFT] and writes[3:] == b"\x01\x01"


def test_a_gap_is_the_unmapped_part_of_its_2mib_block_inside_user_space():
    pm = PageMap([Seg(0x1000, 0x1010, True), Seg(0x1100, 0x1200, True)])
    assert pm.gap(0x1050) == (0x1010, 0x1100)
    assert pm.gap(0x1300) == (0x1200, 0x1400)
    assert pm.gap(0x20) == (MMAP_MIN_VPN, 0x200)  # never below mmap_min_addr
    for page in (0, MMAP_MIN_VPN - 1, USER_VPN_END):
        with pytest.raises(ValueError, match="outside the simulated user space"):
            pm.gap(page)
