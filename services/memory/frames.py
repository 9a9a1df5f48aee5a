"""Physical frames and their descriptors (the `struct page` analogue).

Columns in compact arrays indexed by pfn keep a million resident pages cheap.
Page-table frames also get a descriptor object (`PageTable`) holding the lock
and the share count; see pagetable.py. Frame 0 is never handed out, so a PTE
value of 0 can mean "none".
"""
from __future__ import annotations

from array import array

from services.common.errors import ResourceExhausted


class Frames:
    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError("a machine needs at least one frame")
        self.budget = budget
        self.refcount = array("I", [0])
        self.mapcount = array("I", [0])
        self.gen = array("I", [0])       # bumped every time the frame is freed
        # The reverse map of an anonymous page (page->index and anon_vma): the address
        # it was mapped at and its mm's fork family, whose members may map it there.
        self.rmap_vpn = array("Q", [0])
        self.rmap_family = array("I", [0])
        self._free = array("I")          # LIFO: a freed frame is the next one reused
        self.used = 0
        self.freed_total = 0

    @property
    def free_count(self) -> int:
        return self.budget - self.used

    def alloc(self) -> int:
        if self._free:
            pfn = self._free.pop()
        elif len(self.refcount) <= self.budget:
            pfn = len(self.refcount)
            self.refcount.append(0)
            self.mapcount.append(0)
            self.gen.append(0)
            self.rmap_vpn.append(0)
            self.rmap_family.append(0)
        else:
            raise ResourceExhausted(f"out of frames: all {self.budget} are in use")
        self.refcount[pfn] = 1
        self.used += 1
        return pfn

    def get(self, pfn: int) -> None:
        self.refcount[pfn] += 1

    def put(self, pfn: int) -> bool:
        """Drop a reference; return True when it was the last one (caller frees)."""
        self.refcount[pfn] -= 1
        return self.refcount[pfn] == 0

    def free(self, pfn: int) -> None:
        if self.refcount[pfn] != 0 or self.mapcount[pfn] != 0:
            raise AssertionError(f"freeing frame {pfn} that is still referenced")
        self.gen[pfn] += 1
        self.used -= 1
        self.freed_total += 1
        self._free.append(pfn)

    def is_free(self, pfn: int) -> bool:
        return self.refcount[pfn] == 0
