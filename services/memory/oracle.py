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

from services.memory.pagetable import tid_seq, tid_table


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
        # Whole tables write-protected at once (fork sharing them): table uid ->
        # [(tids issued up to this seq, revoked at)]; later tids were filled read-only.
        self.table_wp: dict[int, list[tuple[int, int]]] = {}
        self.stale = 0
        self.checked = 0

    def write_protect_table(self, uid: int, upto_seq: int, at_ns: int) -> None:
        self.table_wp.setdefault(uid, []).append((upto_seq, at_ns))

    def _table_write_revoked(self, tid: int, at_ns: int | None) -> bool:
        """Was `tid` write-revoked by a table-wide protection (at or before at_ns)?"""
        for upto, when in self.table_wp.get(tid_table(tid), ()):
            if tid_seq(tid) <= upto and (at_ns is None or when <= at_ns):
                return True
        return False

    def revoke(self, tids: Iterable[int], at_ns: int, revokes: Revokes = Revokes.ALL) -> None:
        for tid in tids:
            self.revoked.setdefault(tid, Revocation(at_ns, revokes, 0))

    def transition(self, old: int, new: int, at_ns: int, revokes: Revokes) -> None:
        self.revoked.setdefault(old, Revocation(at_ns, revokes, new))

    def is_stale(self, tid: int, write: bool, at_ns: int) -> bool:
        if write and self._table_write_revoked(tid, at_ns):
            return True
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
            if (tid in revoked or (word & 1 and self.table_wp)) and \
                    self.is_stale(tid, bool(word & 1), t):
                stale += 1
        self.stale += stale
        return stale

    def entry_valid(self, entry_tid: int, writable: bool, current_tid: int) -> bool:
        """May a TLB entry filled under `entry_tid` still be used, given the PTE's
        current tid? Only through transitions that revoked nothing (or only writes,
        for a read-only entry)."""
        if writable and self._table_write_revoked(entry_tid, None):
            return False
        tid = entry_tid
        while tid != current_tid:
            r = self.revoked.get(tid)
            if r is None or not r.successor or r.revokes == Revokes.ALL:
                return False
            if r.revokes == Revokes.WRITES and writable:
                return False
            tid = r.successor
        return True
