"""mmu_gather: collect cleared PTEs, flush once per batch, free only after.

Follows include/asm-generic/tlb.h: the range widens with every cleared PTE
(`__tlb_adjust_range`); nothing cleared and no table freed means no flush
(`tlb_flush_mmu_tlbonly`); a range over the ceiling, or a full-mm teardown,
becomes a full flush (x86 `tlb_single_page_flush_ceiling`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from services.memory.oracle import Batch
from services.memory.pagetable import PageTable, PteTable


@dataclasses.dataclass(frozen=True)
class FlushSpec:
    start_vpn: int
    pages: int          # 0 = full flush of the mm
    freed_tables: bool

    @property
    def full(self) -> bool:
        return self.pages == 0


# A gather queues pages in batch pages of MAX_GATHER_BATCH (510) entries, plus 8
# on-stack slots, and chains at most MAX_GATHER_BATCH_COUNT (19) batch pages —
# "10K pages freed at once should be safe" — before it must flush.
BUNDLE = 8
MAX_BATCH_COUNT = 19


def capacity(batch: int) -> int:
    """Pages a gather holds before a forced flush, for a batch-page size."""
    return BUNDLE + MAX_BATCH_COUNT * batch


class Gather:
    """One mmu_gather. `new_batch` gives the oracle's record of the translations the
    next flush ends; `clock` stamps when a range opened (metrics)."""

    def __init__(self, batch: int, ceiling: int, new_batch: Callable[[], Batch],
                 clock: Callable[[], int], fullmm: bool = False):
        self.batch = batch  # pages queued before a forced flush
        self.ceiling = ceiling
        self.fullmm = fullmm
        self._new_batch = new_batch
        self._clock = clock
        self._reset_range()
        self.pages: list[int] = []          # frames to put after the flush
        self.tables: list[PageTable] = []   # table frames to free after the flush
        self.ends = new_batch()             # the translations the next flush ends

    def _reset_range(self) -> None:
        self.start: int | None = None
        self.end = 0
        self.opened = 0  # clock ns at the first change of this range (metrics)
        self.cleared = False
        self.freed_tables = False
        self.forced = False  # whole_mm(): the flush is full and reaches lazy CPUs

    def _adjust(self, vpn: int, pages: int = 1) -> None:
        if self.start is None:
            self.opened = self._clock()
        self.start = vpn if self.start is None else min(self.start, vpn)
        self.end = max(self.end, vpn + pages)

    @property
    def full(self) -> bool:
        """No room for another page: flush before queueing one more. (Checked before
        adding, so the last batch waits for the end and goes with any freed tables.)"""
        return len(self.pages) >= self.batch

    def clear_pte(self, vpn: int, tid: int, pfn: int | None) -> None:
        """A PTE was cleared; queue its page."""
        self._adjust(vpn)
        self.cleared = True
        self.ends.clear(vpn, tid)
        if pfn is not None:
            self.pages.append(pfn)

    def protect_pte(self, vpn: int, old_tid: int, new_tid: int) -> None:
        """A PTE lost write permission (mprotect, COW at fork): flush, nothing to free."""
        self._adjust(vpn)
        self.cleared = True
        self.ends.downgrade(vpn, old_tid, new_tid)

    def protect_table(self, table: PteTable) -> None:
        """A whole table lost write permission (fork sharing it): one entry per table."""
        self._adjust(table.base_vpn, table.span)
        self.cleared = True
        self.ends.protect_table(table.uid, table.seq)

    def unshare_table(self, table: PteTable) -> None:
        """This mm stopped mapping a shared table (unshare, or drop). Its CPUs may cache
        the table's translations and walk through it: flush them, lazy ones too, as for
        freed tables (Linux passes `freed_tables || unshared_tables`)."""
        self._adjust(table.base_vpn, table.span)
        self.freed_tables = True
        self.ends.leave_table(table.uid)

    def whole_mm(self) -> None:
        """Flush the whole mm, lazy CPUs too, whatever this gather holds: flush_tlb_mm
        (freed_tables set), as fork, flush_tlb_batched_pending and a nested
        tlb_finish_mmu do."""
        if self.start is None:
            self.opened = self._clock()
            self.start = self.end = 0
        self.forced = True
        self.freed_tables = True

    def free_table(self, table: PageTable, vpn: int) -> None:
        """A table was unhooked at `vpn` (pte_free_tlb: the range widens by one page)."""
        self._adjust(vpn, 1)
        self.tables.append(table)
        self.freed_tables = True

    def flush_spec(self) -> FlushSpec | None:
        """What to invalidate now, or None when nothing needs a flush."""
        if not (self.cleared or self.freed_tables):
            return None
        assert self.start is not None
        pages = self.end - self.start
        full = self.fullmm or self.forced or pages > self.ceiling
        return FlushSpec(start_vpn=0 if full else self.start, pages=0 if full else pages,
                         freed_tables=self.freed_tables)

    def take(self) -> tuple[list[int], list[PageTable], Batch]:
        """At a flush: hand over what may be freed once it completed and what it ends,
        and start a new range."""
        taken = self.pages, self.tables, self.ends
        self.pages, self.tables, self.ends = [], [], self._new_batch()
        self._reset_range()
        return taken
