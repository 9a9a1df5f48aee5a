"""The compact reclaim FIFO (services/memory/lru.py `Lru`) against the OrderedDict it
replaced: random add / remove / oldest sequences give the same answers, in the same
order, with compaction forced often (a small min_compact)."""
from __future__ import annotations

from collections import OrderedDict

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from services.memory.lru import Lru

PFNS = st.integers(0, 40)  # few pfns: re-adds and removes of listed pages are common


class OrderedDictLru:
    """The Lru as it was: an OrderedDict of pfns, the reference for the order semantics."""

    def __init__(self) -> None:
        self._pages: OrderedDict[int, None] = OrderedDict()

    def add(self, pfn: int) -> None:
        self._pages[pfn] = None
        self._pages.move_to_end(pfn)

    def remove(self, pfn: int) -> None:
        self._pages.pop(pfn, None)

    def oldest(self, n: int) -> list[int]:
        out: list[int] = []
        while self._pages and len(out) < n:
            out.append(self._pages.popitem(last=False)[0])
        return out

    def __len__(self) -> int:
        return len(self._pages)


class SameAsOrderedDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lru = Lru(min_compact=4)
        self.model = OrderedDictLru()

    @rule(pfn=PFNS)
    def add(self, pfn: int) -> None:
        self.lru.add(pfn)
        self.model.add(pfn)

    @rule(pfns=st.lists(PFNS, max_size=30))
    def add_many(self, pfns: list[int]) -> None:
        for pfn in pfns:
            self.lru.add(pfn)
            self.model.add(pfn)

    @rule(pfn=PFNS)
    def remove(self, pfn: int) -> None:
        self.lru.remove(pfn)
        self.model.remove(pfn)

    @rule(n=st.integers(0, 50))
    def oldest(self, n: int) -> None:
        assert self.lru.oldest(n) == self.model.oldest(n)

    @invariant()
    def same_pages_in_the_same_order(self) -> None:
        assert len(self.lru) == len(self.model)
        assert list(self.lru) == list(self.model._pages)
        assert all((p in self.lru) == (p in self.model._pages) for p in range(45))


TestSameAsOrderedDict = SameAsOrderedDict.TestCase
TestSameAsOrderedDict.settings = settings(max_examples=300, stateful_step_count=60,
                                          deadline=None)


def test_the_queue_stays_bounded_by_its_live_pages():
    """Re-adding and removing leaves dead entries; compaction keeps them at most about
    as many as the live ones (plus min_compact), so memory follows the resident pages."""
    lru = Lru(min_compact=16)
    for pfn in range(100):
        lru.add(pfn)
    for _ in range(50):
        for pfn in range(100):
            lru.add(pfn)     # every entry is re-added: its old one dies
    for pfn in range(0, 100, 2):
        lru.remove(pfn)
    assert len(lru) == 50 and list(lru) == list(range(1, 100, 2))
    assert len(lru._queue) - lru._head <= 2 * len(lru) + 16
    assert lru.oldest(3) == [1, 3, 5] and 1 not in lru and 7 in lru
