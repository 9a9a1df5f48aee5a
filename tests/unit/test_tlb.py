"""The TLB alone: LRU, epochs, and the x86 flush generation rule (flush_tlb_func)."""
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.hits import HitLog
from services.cpu.tlb import ELIDED, FULL, RANGE, Entry, Tlb


def filled(mm=1, vpns=range(8), entries=64, ways=4) -> Tlb:
    tlb = Tlb(entries, ways)
    tlb.switch_to(mm, 0)  # the mm gets an ASID
    for v in vpns:
        tlb.fill(mm, v, Entry(100 + v, True, 1000 + v))
    return tlb


def test_hit_miss_and_lru_eviction_within_a_set():
    tlb = Tlb(2, 2)  # one set of two ways
    tlb.fill(1, 10, Entry(1, True, 1))
    tlb.fill(1, 11, Entry(2, True, 2))
    assert tlb.lookup(1, 10).pfn == 1  # 10 becomes most recent
    tlb.fill(1, 12, Entry(3, True, 3))  # evicts 11, the least recently used
    assert tlb.lookup(1, 11) is None
    assert tlb.lookup(1, 10) is not None and tlb.lookup(1, 12) is not None
    assert tlb.counters.evictions == 1 and len(tlb) == 2


def test_a_range_flush_needs_the_next_generation_exactly():
    tlb = filled()
    assert tlb.apply_flush(1, 2, 2, new_gen=1, mm_gen=1) == (RANGE, 2)
    assert tlb.lookup(1, 2) is None and tlb.lookup(1, 4) is not None
    assert tlb.local_gen[1] == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2), st.integers(0, 300)), max_size=80),
       st.integers(1, 2), st.integers(0, 300), st.integers(1, 400))
def test_a_range_invalidates_what_page_by_page_would(held, mm, start, pages):
    """Longer than the TLB is large (64 entries), a range is invalidated by a pass over
    the entries instead: the same entries go."""
    def tlb_holding() -> Tlb:
        tlb = Tlb(64, 4)
        for m in (1, 2):
            tlb.switch_to(m, 0)
        for m, v in held:
            tlb.fill(m, v, Entry(v, True, v))
        return tlb

    ranged, by_page = tlb_holding(), tlb_holding()
    removed = ranged.invalidate_range(mm, start, pages)
    assert removed == sum(by_page.invalidate_page(mm, v) for v in range(start, start + pages))
    assert sorted(ranged.entries()) == sorted(by_page.entries())


def test_a_flush_naming_two_to_the_forty_pages_takes_one_pass_over_the_tlb():
    """(Found by the RPC fuzzer: a Flush of 2^40 pages looped over them, and the CPU
    service stopped answering.)"""
    tlb = filled(vpns=range(8))
    assert tlb.apply_flush(1, 4, 1 << 40, new_gen=1, mm_gen=1) == (RANGE, 4)
    assert tlb.invalidate_range(1, 0, 1 << 40) == 4 and len(tlb) == 0


def test_a_range_flush_that_would_skip_a_generation_becomes_full():
    tlb = filled()
    # Flush 2 arrives first while the mm is already at 2: flush 1 may still be in flight.
    assert tlb.apply_flush(1, 5, 1, new_gen=2, mm_gen=2) == (FULL, 8)
    assert len(tlb) == 0
    # Flush 1 arrives late: already covered.
    assert tlb.apply_flush(1, 0, 1, new_gen=1, mm_gen=2) == (ELIDED, 0)
    assert tlb.counters.flush_elided == 1


def test_a_range_flush_for_a_stale_mm_generation_is_full():
    tlb = filled()
    # new == local + 1 but the mm is further ahead: catch up completely.
    assert tlb.apply_flush(1, 0, 1, new_gen=1, mm_gen=3)[0] == FULL
    assert tlb.local_gen[1] == 3


def test_full_flush_is_per_mm_and_o1():
    tlb = filled(mm=1)
    tlb.switch_to(2, 0)
    for v in range(4):
        tlb.fill(2, v, Entry(v, False, v))
    assert tlb.apply_flush(1, 0, 0, new_gen=1, mm_gen=1) == (FULL, 8)
    assert len(tlb) == 4 and all(mm == 2 for mm, _, _ in tlb.entries())
    tlb.fill(1, 3, Entry(9, True, 9))  # new fills after a full flush are live
    assert tlb.lookup(1, 3).pfn == 9 and len(tlb) == 5


def test_switch_flushes_only_when_behind():
    tlb = filled()
    assert tlb.switch_to(1, 0) is False and len(tlb) == 8
    assert tlb.switch_to(1, 4) is True and len(tlb) == 0
    assert tlb.local_gen[1] == 4


def test_an_mm_without_an_asid_takes_the_next_slot_round_robin_and_its_owner_loses_its_entries():
    tlb = Tlb(64, 4, asids=2)  # choose_new_asid, with 2 slots instead of 6
    for mm in (1, 2):
        assert tlb.switch_to(mm, 0) is True  # a new ASID is flushed
        tlb.fill(mm, 0, Entry(mm, True, mm))
    assert tlb.switch_to(1, 0) is False and len(tlb) == 2  # both keep their ASIDs
    assert tlb.switch_to(3, 0) is True  # slot 0 (mm 1's) goes to mm 3
    assert tlb.lookup(1, 0) is None and tlb.lookup(2, 0) is not None
    assert tlb.switch_to(1, 0) is True  # mm 1 takes slot 1 from mm 2 in turn
    assert tlb.lookup(2, 0) is None


def test_without_pcid_every_switch_to_another_mm_flushes_everything():
    tlb = Tlb(64, 4, asids=0)
    tlb.switch_to(1, 0)
    tlb.fill(1, 0, Entry(1, True, 1))
    assert tlb.switch_to(1, 0, reload=False) is False and len(tlb) == 1  # left lazy mode
    assert tlb.switch_to(2, 0) is True and len(tlb) == 0


def test_invalidate_all_counts_and_clears_generations():
    tlb = filled()
    tlb.apply_flush(1, 0, 1, 1, 1)
    assert tlb.invalidate_all() == 7
    assert len(tlb) == 0 and tlb.local_gen == {}


@pytest.mark.parametrize("entries,ways", [(0, 1), (10, 3), (4, 0)])
def test_bad_geometry(entries, ways):
    with pytest.raises(ValueError):
        Tlb(entries, ways)


def test_hits_from_serves_the_run_of_hits_and_stops_where_the_slow_path_starts():
    tlb = filled(vpns=range(4))
    tlb.fill(1, 9, Entry(9, False, 9))           # read-only
    log = HitLog()
    vpns = [a << 12 for a in (0, 1, 2, 9, 3, 5)]  # byte addresses of these pages
    # reads: 0,1,2 hit, 9 hits (read-only is fine), 3 hits, 5 misses
    assert tlb.hits_from(1, vpns, b"", 0, len(vpns), log) == 5
    assert served(log) == {1000 << 1: 1, 1001 << 1: 1, 1002 << 1: 1, 9 << 1: 1, 1003 << 1: 1}
    # a write to the read-only entry stops the run there
    log = HitLog()
    assert tlb.hits_from(1, vpns, b"\x01" * 6, 0, len(vpns), log) == 3
    assert served(log) == {1000 << 1 | 1: 1, 1001 << 1 | 1: 1, 1002 << 1 | 1: 1}
    # a run ends at `stop` even when more would hit
    assert tlb.hits_from(1, vpns, b"", 1, 2, log) == 2
    tlb.apply_flush(1, 0, 0, new_gen=1, mm_gen=1)  # full flush: every entry dead
    assert tlb.hits_from(1, vpns, b"", 0, len(vpns), log) == 0
    assert tlb.counters.hits == 5 + 3 + 1


def served(log: HitLog) -> Counter:
    """The accesses each word stands for in `log` (a word may come more than once)."""
    tally: Counter = Counter()
    for w, n in zip(log.words, log.counts, strict=True):
        tally[w] += n
    return tally


def test_a_run_of_hits_is_logged_as_one_word_per_distinct_access_with_its_count():
    tlb = filled(vpns=range(4))
    log = HitLog()
    addresses = [vpn << 12 for vpn in (0, 1, 0, 2)] * 3 + [8]
    writes = [0, 0, 1, 0] * 3 + [0]
    assert tlb.hits_from(1, addresses, writes, 0, len(addresses), log) == 13
    # page 0: 3 reads and 3 writes of one address, 1 read of another; pages 1, 2: 3 reads
    assert len(log.words) == 5
    assert served(log) == {1000 << 1: 4, 1000 << 1 | 1: 3, 1001 << 1: 3, 1002 << 1: 3}


@settings(max_examples=200, deadline=None)
@given(filled_pages=st.lists(st.tuples(st.integers(0, 11), st.booleans()), max_size=40),
       accesses=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 4095), st.booleans()),
                         max_size=60),
       with_writes=st.booleans())
def test_serving_a_run_in_bulk_equals_serving_it_access_by_access(filled_pages, accesses,
                                                                  with_writes):
    """Same stopping point, the same accesses for each oracle word, LRU order (hence
    later evictions) and counters."""
    def tlb():
        t = Tlb(16, 4)  # small: the fills evict, so LRU order matters
        for vpn, writable in filled_pages:
            t.fill(1, vpn, Entry(vpn + 100, writable, vpn + 1000))
        return t

    addresses = [vpn << 12 | offset for vpn, offset, _ in accesses]
    writes = bytes(int(w) for _, _, w in accesses) if with_writes else b""
    bulk, each = tlb(), tlb()
    bulk_log, each_log = HitLog(), HitLog()
    stop = bulk.hits_from(1, addresses, writes, 0, len(addresses), bulk_log)
    assert stop == each._serve_each(1, addresses, writes, 0, len(addresses), each_log)
    assert len(each_log.words) == stop and set(each_log.counts) <= {1}  # a word per access
    assert served(bulk_log) == served(each_log)
    assert [list(s) for s in bulk._sets] == [list(s) for s in each._sets]
    assert bulk.counters == each.counters
