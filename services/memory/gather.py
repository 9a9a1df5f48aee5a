"""mmu_gather: collect cleared PTEs, flush once per batch, free only after.

Follows include/asm-generic/tlb.h: the range widens with every cleared PTE
(`__tlb_adjust_range`); nothing cleared and no table freed means no flush
(`tlb_flush_mmu_tlbonly`); a range over the ceiling, or a full-mm teardown,
becomes a full flush (x86 `tlb_single_page_flush_ceiling`).
"""
from __future__ import annotations

import dataclasses
import time

from services.memory.pagetable import PageTable


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
    def __init__(self, batch: int, ceiling: int, fullmm: bool = False):
        self.batch = batch  # pages queued before a forced flush
        self.ceiling = ceiling
        self.fullmm = fullmm
        self._reset_range()
        self.pages: list[int] = []          # frames to put after the flush
        self.tables: list[PageTable] = []   # table frames to free after the flush
        self.revoked: list[int] = []        # tids that stop being valid at the flush
        self.write_revoked: list[tuple[int, int]] = []  # (old tid, new tid): writes revoked
        self.protected: list[tuple[int, int]] = []  # (table uid, seq): whole tables made read-only

    def _reset_range(self) -> None:
        self.start: int | None = None
        self.end = 0
        self.opened = 0.0  # perf_counter at the first change of this range (metrics)
        self.cleared = False
        self.freed_tables = False

    def _adjust(self, vpn: int, pages: int = 1) -> None:
        if self.start is None:
            self.opened = time.perf_counter()
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
        self.revoked.append(tid)
        if pfn is not None:
            self.pages.append(pfn)

    def protect_pte(self, vpn: int, old_tid: int, new_tid: int) -> None:
        """A PTE lost write permission (mprotect, COW at fork): flush, nothing to free."""
        self._adjust(vpn)
        self.cleared = True
        self.write_revoked.append((old_tid, new_tid))

    def protect_table(self, table: PageTable) -> None:
        """A whole table lost write permission (fork sharing it): one entry per table."""
        self._adjust(table.base_vpn, table.span)
        self.cleared = True
        self.protected.append((table.uid, table.seq))

    def unshare_table(self, table: PageTable) -> None:
        """This mm stopped mapping a shared table (unshare, or drop). Its CPUs may cache
        the table's translations and walk through it: flush them, lazy ones too, as for
        freed tables (Linux passes `freed_tables || unshared_tables`)."""
        self._adjust(table.base_vpn, table.span)
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
        full = self.fullmm or pages > self.ceiling
        return FlushSpec(start_vpn=0 if full else self.start, pages=0 if full else pages,
                         freed_tables=self.freed_tables)

    def take(self) -> tuple[list[int], list[PageTable], list[int], list[tuple[int, int]],
                            list[tuple[int, int]]]:
        """After a flush: hand over what may now be freed, and start a new range."""
        taken = self.pages, self.tables, self.revoked, self.write_revoked, self.protected
        self.pages, self.tables, self.revoked, self.write_revoked = [], [], [], []
        self.protected = []
        self._reset_range()
        return taken
