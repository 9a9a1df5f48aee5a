"""The safety oracle (DESIGN.md §6): counts stale accesses exactly.

Every present PTE state has a translation id (tid). When a state ends, the
oracle records *when* the old tid stopped being usable — the moment the flush
that removes it completed (every target acknowledged or was fenced), or the
moment its frame was freed if that came first (the unsafe order) — and what it
revoked: every access, only writes, or nothing (a permission upgrade, whose
old read-only entry stays valid). A TLB hit on a tid at or after its
revocation is a stale access: on real hardware, memory corruption.

Hits are reported with the CPU's CLOCK_MONOTONIC time, which every process on
one host shares; hits before a CPU acknowledged its flush are, correctly, not
stale.
"""
from __future__ import annotations

import enum
from typing import Iterable, NamedTuple


class Revokes(enum.IntEnum):
    NOTHING = 0   # the old state's entries stay valid (e.g. read-only -> writable)
    WRITES = 1    # writes through the old entry are stale (write-protect)
    ALL = 2       # any use of the old entry is stale (unmap, COW copy, free)


class Revocation(NamedTuple):
    at_ns: int
    revokes: Revokes
    successor: int  # the tid of the PTE's next state (0: none)


class Oracle:
    def __init__(self) -> None:
        self.revoked: dict[int, Revocation] = {}
        self.stale = 0
        self.checked = 0

    def revoke(self, tids: Iterable[int], at_ns: int, revokes: Revokes = Revokes.ALL) -> None:
        for tid in tids:
            self.revoked.setdefault(tid, Revocation(at_ns, revokes, 0))

    def transition(self, old: int, new: int, at_ns: int, revokes: Revokes) -> None:
        self.revoked.setdefault(old, Revocation(at_ns, revokes, new))

    def is_stale(self, tid: int, write: bool, at_ns: int) -> bool:
        r = self.revoked.get(tid)
        while r is not None and r.at_ns <= at_ns:
            if r.revokes == Revokes.ALL or (r.revokes == Revokes.WRITES and write):
                return True
            r = self.revoked.get(r.successor) if r.successor else None
        return False

    def check_hits(self, words: Iterable[int], times: Iterable[int]) -> int:
        """Count stale hits among (tid << 1 | write, time) records."""
        stale = 0
        revoked = self.revoked
        for word, t in zip(words, times):
            self.checked += 1
            tid = word >> 1
            if tid in revoked and self.is_stale(tid, bool(word & 1), t):
                stale += 1
        self.stale += stale
        return stale

    def entry_valid(self, entry_tid: int, writable: bool, current_tid: int) -> bool:
        """May a TLB entry filled under `entry_tid` still be used, given the PTE's
        current tid? Only through transitions that revoked nothing (or only writes,
        for a read-only entry)."""
        tid = entry_tid
        while tid != current_tid:
            r = self.revoked.get(tid)
            if r is None or not r.successor or r.revokes == Revokes.ALL:
                return False
            if r.revokes == Revokes.WRITES and writable:
                return False
            tid = r.successor
        return True
