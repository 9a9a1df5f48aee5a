"""The pure parts of reclaim: which pages go first, where they go, when to start.

Reclaim itself (unmap through the reverse map, one batched flush, then free) is
in reclaim.py, because it takes locks and shoots down."""
from __future__ import annotations

from array import array
from typing import Iterator


def watermarks(frames: int) -> tuple[int, int]:
    """(low, high) free-frame watermarks: reclaim starts below low and stops at high.
    Like the kernel's min/low/high, a small fraction of memory, with a floor that
    leaves room for page tables (which never wait for reclaim). A machine needs at
    least 2 * high frames (Policy's MIN_FRAMES) or reclaim would run at every fault."""
    low = max(16, frames // 32)
    return low, max(2 * low, frames // 16)


class Lru:
    """Resident data pages, oldest first. TLB hits never reach the memory service, so
    there is no accessed bit to age by: this is FIFO, the clock with no second chance.

    Compact, for a million resident pages: a queue of pfns in an array with lazy
    deletion. `_where[pfn]` is 1 + the queue index of the pfn's live entry (0: not on
    the list); an entry whose index is not its pfn's `_where` is dead (removed, or
    added again later) and skipped when it reaches the head. The queue is rebuilt
    from its live entries once the dead and the consumed ones outnumber them, so each
    operation is O(1) amortised. Pfns and indexes fit 32 bits (MAX_FRAMES is 2^28)."""

    def __init__(self, min_compact: int = 4096) -> None:
        self._queue = array("I")    # pfns in order of their (last) add; dead ones included
        self._head = 0              # entries before it are consumed
        self._where = array("I")    # pfn -> 1 + index of its live entry in _queue, or 0
        self._live = 0
        self._min_compact = min_compact  # below this much waste, never rebuild

    def add(self, pfn: int) -> None:
        where = self._where
        if pfn >= len(where):  # grown by an eighth at least, as a list grows
            where.frombytes(bytes(4 * max(pfn + 1 - len(where), len(where) >> 3, 64)))
        readded = bool(where[pfn])
        self._queue.append(pfn)
        where[pfn] = len(self._queue)  # its older entry, if any, is dead now
        if readded:
            self._maybe_compact()
        else:
            self._live += 1

    def remove(self, pfn: int) -> None:
        if pfn < len(self._where) and self._where[pfn]:
            self._where[pfn] = 0
            self._live -= 1
            self._maybe_compact()

    def oldest(self, n: int) -> list[int]:
        """Take up to n of the oldest pages off the list."""
        out: list[int] = []
        queue, where, head = self._queue, self._where, self._head
        n = min(n, self._live)
        while len(out) < n:
            pfn = queue[head]
            head += 1
            if where[pfn] == head:  # live: its entry is at index head - 1
                where[pfn] = 0
                out.append(pfn)
        self._head = head
        self._live -= len(out)
        self._maybe_compact()
        return out

    def __len__(self) -> int:
        return self._live

    def __iter__(self) -> Iterator[int]:
        """The live pfns, oldest first."""
        where = self._where
        for i in range(self._head, len(self._queue)):
            pfn = self._queue[i]
            if where[pfn] == i + 1:
                yield pfn

    def __contains__(self, pfn: object) -> bool:
        return isinstance(pfn, int) and 0 <= pfn < len(self._where) and bool(self._where[pfn])

    def _maybe_compact(self) -> None:
        waste = len(self._queue) - self._live  # consumed + dead entries
        if waste > self._live and waste >= self._min_compact:
            live = array("I", self)
            for i, pfn in enumerate(live, 1):
                self._where[pfn] = i
            self._queue, self._head = live, 0


class SwapSpace:
    """Swap, one slot per swapped-out page (mm/swapfile.c, ≈ v6.18), and the swap cache.

    A page gets ONE slot when reclaim first unmaps it (folio_alloc_swap); every PTE
    that mapped it gets that same entry (try_to_unmap_one), and the slot counts the
    PTEs holding it — the swap count: fork's and unsharing's copies add one
    (copy_nonpresent_pte: swap_duplicate), a swap-in or a zap drops one (swap_free,
    free_swap_and_cache). While the page's frame is resident it is in the swap cache
    (slot -> frame), so each mm that faults on the entry maps that one frame
    (do_swap_page: swap_cache_get_folio). The cache holds no frame reference here: a
    frame leaves it when its last mapping goes (reclaim freeing it, or a zap or COW
    unmapping it: Linux keeps a clean unmapped swap-cache page until reclaim takes it;
    here it goes at once, so a later swap-in reads it again), or when no PTE holds its
    slot any more and the fault that maps it frees the slot (folio_free_swap). A slot
    lives while a PTE holds it or its page is cached.

    `exclusive`: the slot's one PTE was the page's only mapping (pte_swp_exclusive,
    set from PageAnonExclusive); any second reference clears it."""

    def __init__(self) -> None:
        self._refs: dict[int, int] = {}      # slot -> PTEs holding it (> 0 only)
        self._cache: dict[int, int] = {}     # slot -> its frame, while resident
        self._slot_of: dict[int, int] = {}   # frame -> its slot (folio->swap)
        self._exclusive: set[int] = set()
        self._next = 1

    def unmap(self, pfn: int, exclusive: bool) -> int:
        """One PTE of `pfn` becomes a swap entry: the page's slot (allocated and the frame
        cached on its first unmap), with one reference more. Returns the slot."""
        slot = self._slot_of.get(pfn, 0)
        if not slot:  # folio_alloc_swap: add_to_swap puts the folio in the swap cache
            slot, self._next = self._next, self._next + 1
            self._cache[slot], self._slot_of[pfn] = pfn, slot
        refs = self._refs.get(slot, 0)
        if exclusive and not refs:
            self._exclusive.add(slot)
        else:
            self._exclusive.discard(slot)
        self._refs[slot] = refs + 1
        return slot

    def dup(self, slot: int) -> None:
        """swap_duplicate: a copied PTE holds the slot too (and it is no one's alone)."""
        self._refs[slot] += 1
        self._exclusive.discard(slot)

    def drop(self, slot: int) -> None:
        """swap_free: a PTE no longer holds the slot."""
        self._refs[slot] -= 1
        if not self._refs[slot]:
            del self._refs[slot]
            self._exclusive.discard(slot)

    def refs(self, slot: int) -> int:
        return self._refs.get(slot, 0)

    def exclusive(self, slot: int) -> bool:
        return slot in self._exclusive

    def cached(self, slot: int) -> int:
        """swap_cache_get_folio: the slot's resident frame, or 0."""
        return self._cache.get(slot, 0)

    def add_to_cache(self, slot: int, pfn: int) -> None:
        """A frame just read from `slot` (swapin_readahead -> swap_cache_add_folio)."""
        self._cache[slot], self._slot_of[pfn] = pfn, slot

    def uncache(self, pfn: int) -> None:
        """The frame leaves the swap cache (__swap_cache_del_folio); its slot stays
        while PTEs hold it."""
        slot = self._slot_of.pop(pfn, 0)
        if slot:
            del self._cache[slot]

    def free_swap(self, pfn: int) -> bool:
        """folio_free_swap: drop the frame's slot if no PTE holds it any more; True when
        the frame is then no longer in the swap cache."""
        slot = self._slot_of.get(pfn, 0)
        if slot and self.refs(slot):
            return False
        self.uncache(pfn)
        return True

    @property
    def allocated(self) -> int:
        """Slots allocated so far: one per swapped-out page, however many PTEs map it."""
        return self._next - 1

    def __len__(self) -> int:
        """Slots in use: held by a PTE or with their page cached."""
        return len(self._refs.keys() | self._cache.keys())
