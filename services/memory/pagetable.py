"""Four-level page tables (pgd -> pud -> pmd -> pte), each one a frame.

A PTE table stores, per slot, a signed 64-bit word: `pfn << 1 | writable` for a present page,
0 for none, and a negative swap entry `-slot` for a page reclaimed to swap. It
also keeps the translation id (`tid`) of each present state: every change gives
the PTE a new tid, and the oracle remembers when each old tid stopped being valid.
A tid carries its table's uid in the high bits, so the oracle can revoke writes
for a whole table at once (a table write-protected when fork shares it). Tids
never alias within a run: a table uid has TID_UID_BITS, a table's change counter
TID_SEQ_BITS, and running out of either is refused, not wrapped.

The table's lock (`ptl`) and `share_count` live in its descriptor, as Linus
proposed: "the lock we have is the lock that we've always had in struct page".
A shared table also keeps its sharer list (the 2002 "pmd-rmap": which mms map it,
and where) under its own lock, which comes before page_table_lock.
"""
from __future__ import annotations

from array import array
from typing import Iterator

from services.common.addresses import PTRS_PER_TABLE, table_index
from services.common.errors import ResourceExhausted
from services.memory.locks import SimLock

# A tid is (table uid << TID_SEQ_BITS) | the table's change counter: 63 bits in all
# (a signed or unsigned 64-bit field carries it). 2^24 tables and 2^39 changes per
# table in one run are far beyond what a run does (a change a microsecond: 6 days).
TID_SEQ_BITS = 39
TID_UID_BITS = 24
MAX_TABLE_UID = (1 << TID_UID_BITS) - 1
EMPTY_SLOTS = bytes(8 * PTRS_PER_TABLE)  # a PTE table's slots, all 0 (none / no tid)


class Table:
    """What every table frame has: where it sits and what it maps."""
    __slots__ = ("pfn", "level", "base_vpn", "present", "uid")

    def __init__(self, pfn: int, level: int, base_vpn: int, uid: int):
        self.pfn = pfn
        self.level = level            # 1 = PTE table ... 4 = PGD
        self.base_vpn = base_vpn      # first vpn this table maps
        self.present = 0              # populated slots (present or swapped): emptiness is O(1)
        self.uid = uid                # unique for the table's lifetime (pfns are reused)

    @property
    def span(self) -> int:
        """Pages mapped by this table."""
        return PTRS_PER_TABLE ** self.level

    def slot(self, vpn: int) -> int:
        return table_index(vpn, self.level)


class Directory(Table):
    """A pgd, pud or pmd: each entry is the table one level down, or None."""
    __slots__ = ("entries",)

    def __init__(self, pfn: int, level: int, base_vpn: int, uid: int):
        super().__init__(pfn, level, base_vpn, uid)
        self.entries: list[PageTable | None] = [None] * PTRS_PER_TABLE


class PteTable(Table):
    """A PTE table: its entries, their translation ids, and in its descriptor the split
    lock and the sharing state."""
    __slots__ = ("entries", "tids", "ptl", "share_count", "seq", "wp", "sharers", "rmap_lock")

    def __init__(self, pfn: int, base_vpn: int, uid: int, ptl: SimLock, rmap_lock: SimLock):
        super().__init__(pfn, 1, base_vpn, uid)
        # Arrays, not lists of ints: 16 bytes a slot, where a list of Python ints is ~80
        # per present page. A tid is 63 bits, a PTE signed (a swap entry is negative).
        self.entries: array[int] = array("q", EMPTY_SLOTS)
        self.tids: array[int] = array("Q", EMPTY_SLOTS)
        self.ptl = ptl                # the split page-table lock
        self.share_count = 0          # extra sharers; 0 = exclusive (kept apart from refcount)
        self.seq = 0                  # changes so far: the low bits of the next tid
        self.wp = False               # write-protected as a whole (the pmd entry's RW bit)
        self.sharers: list[tuple[int, int]] | None = None  # (mm id, vpn) while shared
        self.rmap_lock = rmap_lock    # guards `sharers` and `share_count`

    def new_tid(self) -> int:
        if self.seq >= (1 << TID_SEQ_BITS) - 1:
            raise ResourceExhausted(f"page table {self.uid} changed 2^{TID_SEQ_BITS} times: "
                                    "translation ids would repeat; start a new run")
        self.seq += 1
        return self.uid << TID_SEQ_BITS | self.seq

    def writable(self, pte: int) -> bool:
        """Hardware ANDs the RW bits of every level: a write-protected table wins."""
        return pte > 0 and bool(pte & 1) and not self.wp


PageTable = Directory | PteTable


def tid_table(tid: int) -> int:
    """The uid of the table a tid was issued by."""
    return tid >> TID_SEQ_BITS


def tid_seq(tid: int) -> int:
    return tid & ((1 << TID_SEQ_BITS) - 1)


def pte_pfn(pte: int) -> int:
    return pte >> 1


def pte_writable(pte: int) -> bool:
    return bool(pte & 1)


def make_pte(pfn: int, writable: bool) -> int:
    return pfn << 1 | int(writable)


def present_ptes(table: PteTable, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(vpn, slot, pte) of each present PTE of a PTE table inside [start, end)."""
    base = table.base_vpn
    for vpn in range(max(start, base), min(end, base + PTRS_PER_TABLE)):
        pte = table.entries[vpn - base]
        if pte > 0:
            yield vpn, vpn - base, pte


def swapped_ptes(table: PteTable, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(vpn, slot, swap slot) of each swap entry of a PTE table inside [start, end)."""
    base = table.base_vpn
    for vpn in range(max(start, base), min(end, base + PTRS_PER_TABLE)):
        pte = table.entries[vpn - base]
        if pte < 0:
            yield vpn, vpn - base, -pte


def walk(pgd: Directory, vpn: int) -> PteTable | None:
    """The PTE table that maps `vpn`, or None; lockless, like a hardware walker."""
    table: PageTable | None = pgd
    while isinstance(table, Directory):
        table = table.entries[table.slot(vpn)]
    return table
