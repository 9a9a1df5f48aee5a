"""The mm struct and its VMAs."""
from __future__ import annotations

import bisect
import dataclasses
import operator

from services.memory.locks import LockClass, RwLock, SimLock
from services.memory.pagetable import Directory

MMAP_BASE_VPN = 0x10000          # first mmap address: 256 MiB
MMAP_MIN_VPN = 0x10              # mmap_min_addr (64 KiB): no mapping below it
HUGE_ALIGN_PAGES = 512           # mappings of 2 MiB or more start on a 2 MiB boundary


_START = operator.attrgetter("start")


@dataclasses.dataclass
class Vma:
    start: int  # first vpn
    end: int    # one past the last vpn
    writable: bool


class Mm:
    def __init__(self, mm_id: int, pgd: Directory):
        self.id = mm_id
        self.pgd = pgd
        self.vmas: list[Vma] = []
        self.mmap_lock = RwLock(f"mmap_lock:{mm_id}", key=mm_id)
        self.page_table_lock = SimLock(LockClass.PAGE_TABLE, f"page_table_lock:{mm_id}", key=mm_id)
        self.cpumask: set[int] = set()
        self.tlb_gen = 0
        self.tlb_flush_pending = 0  # gathers in flight (mm_tlb_flush_nested reads it)
        # Reclaim's deferred flushes (mm->tlb_flush_batched): PTEs cleared with their
        # flush batched, and how many of those flush_tlb_batched_pending has flushed.
        self.tlb_batch_pending = 0
        self.tlb_batch_flushed = 0
        self.trim_at_ns = 0  # should_trim_cpumask: the next flush that trims stale members
        self.exited = False
        self.next_vpn = MMAP_BASE_VPN
        self.family = mm_id  # the fork family whose members may map this mm's pages

    # --- VMAs ------------------------------------------------------------------------
    def find_vma(self, vpn: int) -> Vma | None:
        i = bisect.bisect_right(self.vmas, vpn, key=_START) - 1
        if i >= 0 and self.vmas[i].start <= vpn < self.vmas[i].end:
            return self.vmas[i]
        return None

    def covered(self, start: int, end: int) -> bool:
        """Is every page of [start, end) inside some VMA?"""
        at = start
        for v in self.vmas:
            if v.end <= at:
                continue
            if v.start > at:
                return False
            at = v.end
            if at >= end:
                return True
        return at >= end

    def overlaps(self, start: int, end: int) -> bool:
        return any(v.start < end and start < v.end for v in self.vmas)

    def place(self, pages: int, limit: int) -> int | None:
        """Pick an unmapped range for a new mapping below `limit`, or None: the first
        at or above the last one picked (bump allocation: freed space is not reused),
        past any mapping made at a fixed address there."""
        start, vmas = self.next_vpn, self.vmas
        i = max(0, bisect.bisect_right(vmas, start, key=_START) - 1)
        while True:
            if pages >= HUGE_ALIGN_PAGES:
                start = -(-start // HUGE_ALIGN_PAGES) * HUGE_ALIGN_PAGES
            while i < len(vmas) and vmas[i].end <= start:
                i += 1
            if i == len(vmas) or vmas[i].start >= start + pages:
                break
            start = vmas[i].end  # it overlaps a mapping: try past it
        if start + pages > limit:
            return None
        self.next_vpn = start + pages
        return start

    def insert(self, vma: Vma) -> None:
        bisect.insort(self.vmas, vma, key=_START)

    def carve(self, start: int, end: int) -> list[Vma]:
        """Split VMAs at the range's edges; return the pieces inside it (still listed)."""
        out: list[Vma] = []
        for v in list(self.vmas):
            if v.end <= start or v.start >= end:
                continue
            self.vmas.remove(v)
            for piece in (Vma(v.start, max(v.start, start), v.writable),
                          Vma(max(v.start, start), min(v.end, end), v.writable),
                          Vma(min(v.end, end), v.end, v.writable)):
                if piece.start < piece.end:
                    self.insert(piece)
                    if start <= piece.start and piece.end <= end:
                        out.append(piece)
        return out

    def remove(self, start: int, end: int) -> bool:
        """munmap's VMA part: drop [start, end); return True if anything was mapped."""
        inside = self.carve(start, end)
        for v in inside:
            self.vmas.remove(v)
        return bool(inside)

    def merge(self) -> None:
        """Re-join neighbours with equal permissions (as vma_merge does)."""
        merged: list[Vma] = []
        for v in self.vmas:
            if merged and merged[-1].end == v.start and merged[-1].writable == v.writable:
                merged[-1] = Vma(merged[-1].start, v.end, v.writable)
            else:
                merged.append(v)
        self.vmas = merged
