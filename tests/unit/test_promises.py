"""The memory service's book of access reports promised by walks and not yet sent."""
from services.memory.promises import INCARNATION_SHIFT, Promises

A, B = 3 << INCARNATION_SHIFT, 5 << INCARNATION_SHIFT  # two incarnations of one CPU


def test_a_reader_waits_for_the_promises_made_before_it_only():
    p = Promises()
    p.promise(0, A | 1)
    mark = p.mark()
    p.promise(1, A | 1)  # another CPU, after the reader started
    assert p.owed_before(mark)
    p.kept(0, A | 1)
    assert not p.owed_before(mark) and len(p) == 1 and p.lost == 0


def test_the_walks_of_one_access_make_one_promise():
    p = Promises()
    p.promise(0, A | 1)
    p.promise(0, A | 1)
    p.kept(0, A | 1)
    assert len(p) == 0 and not p.owed_before(p.mark())


def test_a_restarted_cpu_drops_what_its_old_process_promised_as_lost():
    p = Promises()
    p.promise(0, A | 1)
    p.promise(0, A | 2)
    p.promise(1, A | 1)   # CPU 1's own incarnation: untouched
    p.promise(0, B | 1)
    assert p.lost == 2 and len(p) == 2
    p.kept(0, A | 1)      # the old process's report arriving late after all
    assert p.lost == 1 and len(p) == 2


def test_giving_up_counts_the_promises_up_to_the_mark_lost():
    p = Promises()
    p.promise(0, A | 1)
    mark = p.mark()
    p.promise(0, A | 2)
    assert p.give_up(mark) == 1 and p.lost == 1
    assert not p.owed_before(mark) and p.owed_before(p.mark())
    p.kept(0, A | 1)  # late, but judged after all: no longer lost
    assert p.lost == 0
    p.kept(0, A | 1)  # once only
    assert p.lost == 0
