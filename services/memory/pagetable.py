"""Four-level page tables (pgd -> pud -> pmd -> pte), each one a frame.

A PTE table stores, per slot, an int `pfn << 1 | writable` (0 = none) and the
translation id (`tid`) of that state: every change of a present PTE gives it a
new tid, and the oracle remembers when each old tid stopped being valid.
The table's lock (`ptl`) and `share_count` live in its descriptor, as Linus
proposed: "the lock we have is the lock that we've always had in struct page".
"""
from __future__ import annotations

from typing import Iterator

from services.common.addresses import PTRS_PER_TABLE, table_index


class PageTable:
    __slots__ = ("pfn", "level", "base_vpn", "entries", "tids", "ptl", "share_count", "present")

    def __init__(self, pfn: int, level: int, base_vpn: int, ptl=None):
        self.pfn = pfn
        self.level = level            # 1 = PTE table ... 4 = PGD
        self.base_vpn = base_vpn      # first vpn this table maps
        self.entries: list = [0 if level == 1 else None] * PTRS_PER_TABLE
        self.tids: list[int] | None = [0] * PTRS_PER_TABLE if level == 1 else None
        self.ptl = ptl                # the split page-table lock (PTE tables only)
        self.share_count = 0          # extra sharers; 0 = exclusive (kept apart from refcount)
        self.present = 0              # populated slots, so emptiness is O(1)

    @property
    def span(self) -> int:
        """Pages mapped by this table."""
        return PTRS_PER_TABLE ** self.level

    def slot(self, vpn: int) -> int:
        return table_index(vpn, self.level)


def pte_pfn(pte: int) -> int:
    return pte >> 1


def pte_writable(pte: int) -> bool:
    return bool(pte & 1)


def make_pte(pfn: int, writable: bool) -> int:
    return pfn << 1 | int(writable)


def present_ptes(table: PageTable, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(vpn, slot, pte) of each present PTE of a PTE table inside [start, end)."""
    base = table.base_vpn
    for vpn in range(max(start, base), min(end, base + PTRS_PER_TABLE)):
        pte = table.entries[vpn - base]
        if pte:
            yield vpn, vpn - base, pte


def walk(pgd: PageTable, vpn: int) -> PageTable | None:
    """The PTE table that maps `vpn`, or None; lockless, like a hardware walker."""
    table = pgd
    while table.level > 1:
        table = table.entries[table.slot(vpn)]
        if table is None:
            return None
    return table
