"""Which misses of a read-ahead window may be faulted in one batch (pure): shared by the
CPU, which sends the window, and the memory service, which walks it and faults the batch
in the same call (services/cpu/core.py, services/memory/kernel.py `walk_and_fault`)."""
from __future__ import annotations

from typing import Mapping, Sequence

Pte = tuple[int, bool, int] | None  # (pfn, writable, tid) of a present PTE
# One access of the window, in order: (vpn, write, held). held: the CPU's TLB holds a live
# entry for the page (or an earlier batch's answer for it is pending); False for the
# access that missed, which starts the window.
Touch = tuple[int, bool, bool]


def batchable(touches: Sequence[Touch], ptes: Mapping[int, Pte]) -> list[tuple[int, bool]]:
    """The misses of `touches` that will surely need the fault handler, each page's first
    touch with its write flag, in access order, up to the first access that might need
    it but cannot go in the batch: so the faults run in the order one at a time would.

    A page the walk (`ptes`) found absent, or read-only for the write that first touches
    it, goes in if the TLB does not hold it (nothing but its own fill can put it there,
    so that touch misses). The batch ends before a page the TLB holds that the walk
    cannot serve (it may hit or, evicted meanwhile, fault: its touch decides), and
    before a later write to a page first read, unless the walk found it writable (that
    write is a fault of its own, later). Any other access needs no fault whatever
    happens: a hit, a fill from the walk, or a walk of a PTE the batch made present."""
    first_write: dict[int, bool] = {}
    batch: list[tuple[int, bool]] = []
    for page, write, held in touches:
        pte = ptes.get(page)
        if page in first_write:  # a later touch
            if write and not first_write[page] and not (pte is not None and pte[1]):
                break
            continue
        first_write[page] = write
        if pte is not None and (not write or pte[1]):
            continue  # a hit, or a fill from the walk
        if held:
            break
        batch.append((page, write))
    return batch


def decisive(pages: Sequence[int], writes: Sequence[int]) -> list[tuple[int, bool]]:
    """The accesses of a window that `batchable` can act on, (page, write) in access
    order: each page's first touch and, for a page first read, its first write. It
    passes over every other access whatever the PTEs say — a later read, a later write
    to a page first written, a write after the page's first later write (which asked
    the same question and did not stop the batch) — so these give the batch the whole
    window gives, and the CPU can read far ahead at the cost of the window's distinct
    pages, not of its accesses. `writes` empty: all reads."""
    if not writes:
        return [(page, False) for page in dict.fromkeys(pages)]  # first touches, in order
    order = range(len(pages) - 1, -1, -1)  # newest first: each dict keeps the oldest
    first = dict(zip(map(pages.__getitem__, order), order))  # page -> its first touch
    written = [k for k in order if writes[k]]
    first_write = dict(zip(map(pages.__getitem__, written), written))
    marks = [(k, page, bool(writes[k])) for page, k in first.items()]
    marks += [(k, page, True) for page, k in first_write.items() if k > first[page]]
    return [(page, write) for _, page, write in sorted(marks)]
