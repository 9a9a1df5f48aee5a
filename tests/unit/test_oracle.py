"""The oracle's hit report: words, for the hits and fills of each translation, in
timed runs (oracle.py docstring, services/common/hits.py). A run is atomic: judged at
its start; a revocation inside it leaves the run's hits unjudged as stale, and counts
them as straddling."""
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.memory.oracle import CHUNK_WORDS, Oracle, Revokes
from services.memory.pagetable import TID_SEQ_BITS

READ, WRITE = 0, 1


def word(tid: int, write: int = READ) -> int:
    return tid << 1 | write


def runs(*triples) -> list[int]:
    return [x for t in triples for x in t]


@pytest.mark.parametrize("first,last,stale,straddled", [
    (10, 20, 0, 0),    # the whole run before the revocation at 100
    (100, 120, 3, 0),  # starts at the revocation: every hit is stale
    (150, 160, 3, 0),  # after it
    (90, 100, 0, 3),   # began before it: atomic, judged at its start; counted straddling
])
def test_a_run_is_judged_at_its_start(first, last, stale, straddled):
    o = Oracle()
    o.revoke([7], 100)
    words = [word(7), word(8), word(7), word(7, WRITE)]
    assert o.check_hits(words, runs((4, first, last))) == stale
    assert o.stale == stale and o.checked == 4
    assert o.straddled == straddled


def test_runs_cover_the_words_in_order():
    o = Oracle()
    o.revoke([7], 100)
    words = [word(7)] * 2 + [word(7)] * 5 + [word(9)]
    # 2 hits before the revocation, 5 after, 1 on a live tid
    assert o.check_hits(words, runs((2, 50, 60), (5, 100, 110), (1, 120, 130))) == 5
    assert o.straddled == 0


def test_a_write_revocation_makes_only_writes_stale():
    o = Oracle()
    o.transition(7, 8, 100, Revokes.WRITES)
    words = [word(7), word(7, WRITE), word(7, WRITE)]
    assert o.check_hits(words, runs((3, 200, 210))) == 2
    assert o.check_hits(words, runs((3, 10, 20))) == 0


def test_a_revocation_of_nothing_keeps_the_old_entry_valid_until_its_successor_goes():
    o = Oracle()
    o.transition(7, 8, 100, Revokes.NOTHING)  # e.g. read-only -> writable
    o.revoke([8], 300)
    assert o.check_hits([word(7)], runs((1, 200, 210))) == 0
    assert o.check_hits([word(7)], runs((1, 300, 310))) == 1


def test_a_write_protected_table_revokes_writes_of_tids_issued_before_it():
    o = Oracle()
    table = 5
    old, new = table << TID_SEQ_BITS | 3, table << TID_SEQ_BITS | 4
    o.write_protect_table(table, upto_seq=3, at_ns=100)
    words = [word(old, WRITE), word(old), word(new, WRITE)]
    assert o.check_hits(words, runs((3, 10, 20))) == 0
    assert o.check_hits(words, runs((3, 100, 110))) == 1  # only the write through `old`


def test_an_empty_report_checks_nothing():
    o = Oracle()
    assert o.check_hits([], []) == 0 and o.checked == 0


@pytest.mark.parametrize("words,bad", [
    ([word(1)] * 2, runs((1, 0, 1))),            # hits do not add up to the words
    ([word(1)], [1, 0]),                          # not triples
    ([word(1)], runs((0, 0, 1), (1, 0, 1))),      # an empty run
    ([word(1)], runs((1, 5, 4))),                 # ends before it starts
])
def test_a_malformed_report_is_rejected_and_changes_nothing(words, bad):
    o = Oracle()
    o.revoke([1], 0)
    with pytest.raises(InvalidArgument):
        o.check_hits(words, bad)
    assert o.stale == 0 and o.checked == 0


def test_a_fill_of_no_translation_is_stale():
    o = Oracle()
    assert o.check_hits([word(0)], runs((1, 5, 5))) == 1


def test_a_call_that_returned_ends_what_an_in_flight_batch_holds_for_its_mm_only():
    o = Oracle()
    reclaim = o.batch([1, 2])               # reclaim cleared vpn 0x10 in a table of mms 1, 2
    reclaim.clear(0x10, 7)
    reclaim.clear(0x99, 8)                  # outside the call's range
    o.returned(1, 0x10, 0x20, 100, Revokes.ALL)  # mm 1's munmap of [0x10, 0x20) returned
    hit = [word(7)]
    assert o.check_hits(hit, runs((1, 150, 150)), mm=1) == 1     # mm 1's CPUs: stale
    assert o.check_hits(hit, runs((1, 150, 150)), mm=2) == 0     # mm 2's: not yet
    assert o.check_hits([word(8)], runs((1, 150, 150)), mm=1) == 0
    assert o.check_hits(hit, runs((1, 50, 50)), mm=1) == 0       # before the return
    o.flushed(reclaim, 200)                 # the reclaim flush completes: stale for all
    assert o.check_hits(hit, runs((1, 250, 250)), mm=2) == 1 and not o.inflight


def test_a_returned_mprotect_ends_only_writes():
    o = Oracle()
    b = o.batch([1])
    b.downgrade(0x10, 7, 9)
    o.returned(1, 0x10, 0x11, 100, Revokes.WRITES)
    assert o.check_hits([word(7), word(7, WRITE)], runs((2, 150, 150)), mm=1) == 1


def test_translations_of_a_table_the_mm_left_end_for_its_cpus():
    o = Oracle()
    table = 5
    tid = table << TID_SEQ_BITS | 3
    unshare = o.batch([1])
    unshare.leave_table(table)
    o.flushed(unshare, 100)
    assert o.check_hits([word(tid)], runs((1, 150, 150)), mm=1) == 1
    assert o.check_hits([word(tid)], runs((1, 150, 150)), mm=2) == 0  # a sharer still maps it
    assert o.check_hits([word(tid)], runs((1, 50, 50)), mm=1) == 0


def test_a_cow_that_supersedes_a_live_translation_is_incoherent_and_ends_it():
    o = Oracle()
    o.revoke([7], 100)
    o.superseded(7, 150)                 # cleared and flushed first: coherent
    assert o.incoherent == 0
    o.superseded(8, 150)                 # still live when the copy went in
    assert o.incoherent == 1
    assert o.check_hits([word(8)], runs((1, 160, 160))) == 1


def test_judging_a_million_stale_hits_is_chunked():
    """The memory service yields between chunks: a report of 1M stale hits holds its
    event loop for one chunk at a time (its speed is a `tlbsim bench` row)."""
    o = Oracle()
    distinct = 262_144
    o.revoke(range(1, distinct + 1), 100)
    words = [word(1 + i % distinct) for i in range(1 << 20)]
    rs = []
    for k in range(0, len(words), 4096):
        rs += [4096, 200 + k, 200 + k]
    chunks = list(o.judge(words, rs))
    assert sum(chunks) == o.stale == len(words)
    assert len(chunks) >= len(words) // CHUNK_WORDS
    assert max(chunks) <= CHUNK_WORDS + 4096  # a chunk ends at the first run past it


@settings(max_examples=200, deadline=None)
@given(revoked=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 60),
                                  st.sampled_from(list(Revokes))), max_size=6),
       report=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10),
                                 st.lists(st.tuples(st.integers(0, 6), st.booleans()),
                                          min_size=1, max_size=12)), max_size=8))
def test_a_report_with_counts_gets_the_verdicts_of_one_word_per_access(revoked, report):
    """What the CPU sends (one word per distinct translation in a run, with its count)
    is judged exactly as the report of one word per access it stands for."""
    def oracle():
        o = Oracle()
        for tid, at, revokes in revoked:
            o.revoke([tid], at, revokes)
        return o

    each, compact = oracle(), oracle()
    words, rs, counted, counts, crs = [], [], [], [], []
    for first, length, accesses in report:
        run = [word(tid, write) for tid, write in accesses]
        words += run
        rs += [len(run), first, first + length]
        tally = Counter(run)
        counted += tally
        counts += tally.values()
        crs += [len(tally), first, first + length]
    stale = each.check_hits(words, rs)
    assert compact.check_hits(counted, crs, counts=counts) == stale
    # the suspects' set-work shortcut picks what the word-by-word check would
    assert each._suspects(set(words), 0) == {w for w in words if each._suspect(w, 0)}
    assert (compact.stale, compact.checked, compact.straddled) == \
        (each.stale, each.checked, each.straddled)


@pytest.mark.parametrize("counts", [[1], [1, 0]])
def test_counts_must_give_each_word_its_accesses(counts):
    o = Oracle()
    with pytest.raises(InvalidArgument, match="counts"):
        o.check_hits([word(7), word(8)], runs((2, 10, 20)), counts=counts)
    assert o.checked == 0
