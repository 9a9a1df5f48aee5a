"""The oracle's hit report: words, one per hit, in timed runs (oracle.py docstring).

A hit is judged at its run's last_ns: exact when no revocation falls inside the run,
never missing a stale hit when one does (then the run's hits on that tid count)."""
import pytest

from services.common.errors import InvalidArgument
from services.memory.oracle import Oracle, Revokes
from services.memory.pagetable import TID_SEQ_BITS

READ, WRITE = 0, 1


def word(tid: int, write: int = READ) -> int:
    return tid << 1 | write


def runs(*triples) -> list[int]:
    return [x for t in triples for x in t]


@pytest.mark.parametrize("first,last,stale", [
    (10, 20, 0),    # the whole run before the revocation at 100
    (100, 120, 3),  # starts at the revocation: every hit is stale
    (150, 160, 3),  # after it
    (90, 100, 3),   # ends at it: judged at last_ns (conservative), counted as straddling
])
def test_a_run_is_judged_at_its_last_time(first, last, stale):
    o = Oracle()
    o.revoke([7], 100)
    words = [word(7), word(8), word(7), word(7, WRITE)]
    assert o.check_hits(words, runs((4, first, last))) == stale
    assert o.stale == stale and o.checked == 4
    assert o.straddled == (stale if first < 100 <= last and first != 100 else 0)


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
