"""The pure parts of reclaim: which pages go first, where they go, when to start.

Reclaim itself (unmap through the reverse map, one batched flush, then free) is
in reclaim.py, because it takes locks and shoots down."""
from __future__ import annotations

from collections import OrderedDict


def watermarks(frames: int) -> tuple[int, int]:
    """(low, high) free-frame watermarks: reclaim starts below low and stops at high.
    Like the kernel's min/low/high, a small fraction of memory, with a floor that
    leaves room for page tables (which never wait for reclaim). A machine needs at
    least 2 * high frames (Policy's MIN_FRAMES) or reclaim would run at every fault."""
    low = max(16, frames // 32)
    return low, max(2 * low, frames // 16)


class Lru:
    """Resident data pages, oldest first. TLB hits never reach the memory service, so
    there is no accessed bit to age by: this is FIFO, the clock with no second chance."""

    def __init__(self) -> None:
        self._pages: OrderedDict[int, None] = OrderedDict()

    def add(self, pfn: int) -> None:
        self._pages[pfn] = None
        self._pages.move_to_end(pfn)

    def remove(self, pfn: int) -> None:
        self._pages.pop(pfn, None)

    def oldest(self, n: int) -> list[int]:
        """Take up to n of the oldest pages off the list."""
        out: list[int] = []
        while self._pages and len(out) < n:
            out.append(self._pages.popitem(last=False)[0])
        return out

    def __len__(self) -> int:
        return len(self._pages)


class SwapSpace:
    """Swap is a counter and a marker: a slot per swapped-out PTE, with a reference
    count (an unshared copy of a table duplicates its swap entries)."""

    def __init__(self) -> None:
        self._refs: dict[int, int] = {}
        self._next = 1

    def store(self) -> int:
        slot, self._next = self._next, self._next + 1
        self._refs[slot] = 1
        return slot

    def dup(self, slot: int) -> None:
        self._refs[slot] += 1

    def drop(self, slot: int) -> None:
        self._refs[slot] -= 1
        if not self._refs[slot]:
            del self._refs[slot]

    def __len__(self) -> int:
        return len(self._refs)
