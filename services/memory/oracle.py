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

The time of a hit is known to within its run. A CPU records one word per hit
(tid << 1 | write) and one (hits, first_ns, last_ns) triple per run of at most
RUN_HITS hits served in one synchronous stretch (services/cpu/core.py): every
hit of the run happened within [first_ns, last_ns]. A hit is judged at its
run's last_ns. Staleness only grows with time (revocations accumulate), so this
never misses a stale hit, and is exact unless a revocation falls inside the
run; then the whole run's hits on that tid count (at most RUN_HITS - 1 too
many; `straddled` counts them). That cannot happen in a safe run: the memory
service stamps a revocation only after every CPU that may hold the entry
acknowledged its flush, and a CPU acknowledges between runs, never during one
(its event loop is busy running it), so its runs on the old tid ended before
the stamp; the initiator flushes itself inside its own system call, when it
runs no accesses. It can happen when a CPU is fenced mid-run (its hits after
the fence are stale anyway) and in the deliberately unsafe free-before-flush
order, whose revocation lands at the free, at any moment.

`revoked` grows with every translation that ends (about 160 bytes each) until
the run's reset, and is not trimmed: the memory service cannot know when no TLB
holds a tid any more. A CPU that kept an entry past its flush (the bug this
oracle exists to catch) may hit it at any later time, and that hit must still
count; and an entry whose state changed revoking nothing stays valid for ever,
its successor chain walked by `entry_valid` and `is_stale`.
"""
from __future__ import annotations

import enum
from typing import Iterable, NamedTuple, Sequence

from services.common.errors import InvalidArgument
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
        self.straddled = 0  # of `stale`: hits in a run a revocation fell inside

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

    def check_hits(self, words: Sequence[int], runs: Sequence[int]) -> int:
        """Count stale hits among `words` (tid << 1 | write), served in `runs`: flat
        (hits, first_ns, last_ns) triples that cover the words in order."""
        if len(runs) % 3 or any(h <= 0 for h in runs[0::3]) or sum(runs[0::3]) != len(words):
            raise InvalidArgument("hit report: runs must be (hits > 0, first_ns, last_ns) "
                                  "triples whose hits add up to the words")
        if any(runs[k + 1] > runs[k + 2] for k in range(0, len(runs), 3)):
            raise InvalidArgument("hit report: a run ends before it starts")
        self.checked += len(words)
        revoked, table_wp = self.revoked, self.table_wp
        # Almost every hit is on a live translation: look each distinct word up once.
        suspects = {w for w in set(words) if w >> 1 in revoked or (w & 1 and table_wp)}
        if not suspects:
            return 0
        stale = pos = 0
        for k in range(0, len(runs), 3):
            hits, first_ns, last_ns = runs[k:k + 3]
            run = words[pos:pos + hits]
            pos += hits
            for w in suspects.intersection(run):
                tid, write = w >> 1, bool(w & 1)
                if self.is_stale(tid, write, last_ns):
                    n = run.count(w)
                    stale += n
                    if not self.is_stale(tid, write, first_ns):
                        self.straddled += n
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
