"""The safety oracle (DESIGN.md §6): counts stale accesses exactly.

Every present PTE state has a translation id (tid), unique for the run
(pagetable.py). A translation stops being usable — any use of it from then on
is a *stale access*, on real hardware memory corruption — at the first of:

1. **its flush completed** (every target CPU acknowledged or was fenced), for
   every CPU (`flushed`); or its frame was freed, if that came first (the
   deliberately unsafe free-before-flush order);
2. **the system call that removed or downgraded it returned** to its caller,
   for the CPUs of that mm (`returned`): Linux's guarantee — once munmap,
   madvise(DONTNEED), mprotect or fork has returned, no thread uses the old
   translation or rights, even when another party's flush of the same PTE
   (reclaim's batched flush, a concurrent madvise) is still in flight. The
   kernel keeps that guarantee with flush_tlb_batched_pending and
   mm_tlb_flush_nested; the oracle checks it: the translations of in-flight
   batches (`Batch`) that a returning call covers end at its return;
3. **its mm stopped mapping its page table** (unshare, or a shared table
   dropped whole), for that mm's CPUs (`left_table`);
4. **copy-on-write installed another frame** for the same page while it was
   still live (`superseded`): two CPUs must never be served different frames
   for one (mm, page) at once, which is why wp_page_copy clears and flushes
   before it installs the copy. A supersede of a live translation is itself a
   violation (`incoherent`), and the old translation ends there.

What ends: every use (unmap, COW copy, free), only writes (write-protect), or
nothing (a permission upgrade: the old read-only entry stays valid, followed
through its successors).

Hits, fills, and the time of a run. A CPU reports every access it serves from
its TLB *and every TLB fill* (a batched walk's entry or a fault's result) as a
word, tid << 1 | write, tid 0 meaning "no translation" (always stale: a fill of
nothing), with the number of accesses it stands for (services/common/hits.py).
Words come in runs of (words, first_ns, last_ns), served in one synchronous
stretch; a fill is a run of its own. A run is atomic in the
simulated machine: a CPU takes flush requests, and checks its lease, only
between runs (services/cpu/core.py), so the run is judged at its start,
first_ns. That is exact for every CPU that acknowledged its flush (the ack is
sent between two runs, and the revocation is stamped after it), and for a CPU
fenced by its lease (it starts no run past its lease, and the coordinator
stamps the revocation only after the lease ran out). A revocation that falls
inside a run (the unsafe order, a CPU fenced at its deadline mid-run) leaves
that run's hits on the tid unjudged as stale — the next run catches the CPU —
and counts them in `straddled`. Because a run carries its own time, a report may
arrive after its Access answered — a CPU sends an Access's report after the answer
when its walks promised it (services/memory/promises.py) — without changing a verdict.

Cost: a report is judged in O(words) with one lookup per distinct word (and
per run that holds a suspect); `judge` works through it in chunks of CHUNK_WORDS,
a few ms each, so the memory service's event loop is never held for long. `revoked` grows with every translation that ends (~160 B each)
until the run's reset and is not trimmed: a CPU that kept an entry past its flush
(the bug this oracle exists to catch) may hit it at any later time.
"""
from __future__ import annotations

import collections
import enum
from itertools import repeat
from operator import gt, rshift
from typing import Iterable, Iterator, NamedTuple, Sequence

from services.common.errors import InvalidArgument
from services.memory.pagetable import tid_seq, tid_table

# Words judged between two turns of the caller's event loop (a few ms of work).
CHUNK_WORDS = 1 << 13


class Revokes(enum.IntEnum):
    NOTHING = 0   # the old state's entries stay valid (e.g. read-only -> writable)
    WRITES = 1    # writes through the old entry are stale (write-protect)
    ALL = 2       # any use of the old entry is stale (unmap, COW copy, free)


class Revocation(NamedTuple):
    at_ns: int
    revokes: Revokes
    successor: int  # the tid of the PTE's next state (0: none)


class Batch:
    """Translations on their way out: cleared or write-protected, their flush not yet
    complete (a gather's batch, a reclaim batch). Registered with the oracle at its
    first entry, so that a call returning meanwhile can end them for its mm."""
    __slots__ = ("mms", "revoked", "downgraded", "protected", "tables_left", "_inflight")

    def __init__(self, oracle: "Oracle", mms: Iterable[int]):
        self.mms = set(mms)  # whose CPUs may hold the translations (reclaim adds to it)
        self.revoked: list[tuple[int, int]] = []              # (vpn, tid): every use ends
        self.downgraded: list[tuple[int, int, int]] = []      # (vpn, old, new): writes end
        self.protected: list[tuple[int, int]] = []            # (table uid, upto seq)
        self.tables_left: list[int] = []  # table uids the mms stopped mapping
        self._inflight = oracle.inflight

    def _track(self) -> None:
        self._inflight.add(self)

    def clear(self, vpn: int, tid: int) -> None:
        self._track()
        self.revoked.append((vpn, tid))

    def downgrade(self, vpn: int, old: int, new: int) -> None:
        self._track()
        self.downgraded.append((vpn, old, new))

    def protect_table(self, uid: int, upto_seq: int) -> None:
        """A whole table made read-only (fork sharing it). Not ended by `returned`:
        only fork protects whole tables, and it holds the parent's mmap_lock for write
        until its flush completed, so no other call of the parent returns meanwhile."""
        self._track()
        self.protected.append((uid, upto_seq))

    def leave_table(self, uid: int) -> None:
        """The mms stopped mapping table `uid` (unshare, drop): its translations end for
        their CPUs at the flush. Nothing else about them changes, so not tracked."""
        self.tables_left.append(uid)

    def __bool__(self) -> bool:
        return bool(self.revoked or self.downgraded or self.protected or self.tables_left)


class Oracle:
    def __init__(self) -> None:
        self.revoked: dict[int, Revocation] = {}
        # Ended for one mm's CPUs only: mm -> tid -> revocation (a call returned), and
        # mm -> table uid -> when the mm stopped mapping the table.
        self.revoked_for: dict[int, dict[int, Revocation]] = collections.defaultdict(dict)
        self.left: dict[int, dict[int, int]] = collections.defaultdict(dict)
        # Whole tables write-protected at once (fork sharing them): table uid ->
        # [(tids issued up to this seq, revoked at)]; later tids were filled read-only.
        self.table_wp: dict[int, list[tuple[int, int]]] = {}
        self.inflight: set[Batch] = set()
        self.stale = 0
        self.checked = 0
        self.straddled = 0   # hits in a run a revocation fell inside (not counted stale)
        self.incoherent = 0  # COW supersedes of a still-live translation (must stay 0)

    # --- what the kernel tells it ---------------------------------------------------------
    def batch(self, mms: Iterable[int]) -> Batch:
        return Batch(self, mms)

    def flushed(self, batch: Batch, at_ns: int) -> None:
        """The batch's flush completed (or, unsafe, its frames were freed)."""
        self.inflight.discard(batch)
        for _, tid in batch.revoked:
            self.revoked.setdefault(tid, Revocation(at_ns, Revokes.ALL, 0))
        for _, old, new in batch.downgraded:
            self.revoked.setdefault(old, Revocation(at_ns, Revokes.WRITES, new))
        for uid, seq in batch.protected:
            self.table_wp.setdefault(uid, []).append((seq, at_ns))
        for uid in batch.tables_left:
            for mm in batch.mms:
                self.left_table(uid, mm, at_ns)

    def revoke(self, tids: Iterable[int], at_ns: int, revokes: Revokes = Revokes.ALL) -> None:
        for tid in tids:
            self.revoked.setdefault(tid, Revocation(at_ns, revokes, 0))

    def transition(self, old: int, new: int, at_ns: int, revokes: Revokes) -> None:
        self.revoked.setdefault(old, Revocation(at_ns, revokes, new))

    def returned(self, mm: int, start_vpn: int, end_vpn: int, at_ns: int,
                 revokes: Revokes) -> None:
        """A call of `mm` over [start_vpn, end_vpn) that removes (ALL) or write-protects
        (WRITES) returned: what an in-flight batch still holds there ends for mm now."""
        mine = self.revoked_for[mm]
        for batch in self.inflight:
            if mm not in batch.mms:
                continue
            for vpn, tid in batch.revoked:
                if start_vpn <= vpn < end_vpn:
                    mine.setdefault(tid, Revocation(at_ns, revokes, 0))
            for vpn, old, new in batch.downgraded:
                if start_vpn <= vpn < end_vpn:
                    mine.setdefault(old, Revocation(at_ns, Revokes.WRITES, new))

    def left_table(self, uid: int, mm: int, at_ns: int) -> None:
        """`mm` no longer maps the table `uid` (unshared or dropped): its CPUs may not
        use the table's translations from `at_ns` (the flush of its CPUs completed)."""
        self.left[mm].setdefault(uid, at_ns)

    def superseded(self, old: int, at_ns: int) -> None:
        """Copy-on-write installs another frame for the page `old` translated: `old`
        must be dead by now. If it is not, that is incoherence; it ends here."""
        r = self.revoked.get(old)
        if old and (r is None or r.at_ns > at_ns or r.revokes != Revokes.ALL):
            self.incoherent += 1
            self.revoked[old] = Revocation(at_ns, Revokes.ALL, 0)

    def write_protect_table(self, uid: int, upto_seq: int, at_ns: int) -> None:
        self.table_wp.setdefault(uid, []).append((upto_seq, at_ns))

    # --- judging ---------------------------------------------------------------------------
    def _table_write_revoked(self, tid: int, at_ns: int | None) -> bool:
        """Was `tid` write-revoked by a table-wide protection (at or before at_ns)?"""
        for upto, when in self.table_wp.get(tid_table(tid), ()):
            if tid_seq(tid) <= upto and (at_ns is None or when <= at_ns):
                return True
        return False

    def is_stale(self, tid: int, write: bool, at_ns: int, mm: int = 0) -> bool:
        """Is a use of `tid` (a write, or not) at `at_ns` by a CPU running `mm` stale?
        `mm` 0: unknown, only what ends for every CPU applies."""
        if tid == 0:
            return True
        if write and self._table_write_revoked(tid, at_ns):
            return True
        mine = self.revoked_for.get(mm) if mm else None
        if mm:
            left = self.left.get(mm)
            if left and left.get(tid_table(tid), at_ns + 1) <= at_ns:
                return True
        while tid:
            for r in (self.revoked.get(tid), mine.get(tid) if mine else None):
                if r is not None and r.at_ns <= at_ns and (
                        r.revokes == Revokes.ALL or (r.revokes == Revokes.WRITES and write)):
                    return True
            r = self.revoked.get(tid)
            tid = r.successor if r is not None and r.at_ns <= at_ns else 0
        return False

    def _suspect(self, w: int, mm: int) -> bool:
        """Could a use of word `w` (tid << 1 | write) by a CPU running `mm` be stale?
        Almost every hit is on a live translation: each distinct word is asked once."""
        tid = w >> 1
        if tid == 0 or tid in self.revoked:
            return True
        if w & 1 and tid_table(tid) in self.table_wp:
            return True
        if mm:
            mine, left = self.revoked_for.get(mm), self.left.get(mm)
            return bool(mine and tid in mine) or bool(left and tid_table(tid) in left)
        return False

    def _suspects(self, words: set[int], mm: int) -> set[int]:
        """The words that `_suspect` picks, with C-level set work when only `revoked`
        (or tid 0) can make one stale: the common case, judged for every report."""
        if self.table_wp or (mm and (self.revoked_for.get(mm) or self.left.get(mm))):
            return {w for w in words if self._suspect(w, mm)}
        tids = set(map(rshift, words, repeat(1)))
        ended = set(filter(self.revoked.__contains__, tids))
        if 0 in tids:
            ended.add(0)
        return {w for w in words if w >> 1 in ended} if ended else set()

    @staticmethod
    def validate(words: Sequence[int], runs: Sequence[int],
                 counts: Sequence[int] | None = None) -> None:
        if len(runs) % 3 or (runs and min(runs[0::3]) <= 0) or sum(runs[0::3]) != len(words):
            raise InvalidArgument("hit report: runs must be (words > 0, first_ns, last_ns) "
                                  "triples whose words add up to the report's")
        if any(map(gt, runs[1::3], runs[2::3])):
            raise InvalidArgument("hit report: a run ends before it starts")
        if counts is not None and (len(counts) != len(words) or 0 in counts):
            raise InvalidArgument("hit report: counts must give each word the accesses "
                                  "(> 0) it stands for")

    def judge(self, words: Sequence[int], runs: Sequence[int], mm: int = 0,
              counts: Sequence[int] | None = None) -> Iterator[int]:
        """Judge a report of `words` (tid << 1 | write), each standing for counts[i]
        accesses (None: one each), served in `runs` (flat (words, first_ns, last_ns)
        triples covering the words in order) by a CPU running `mm`; yields after every
        CHUNK_WORDS words or so (the stale count found since the last yield), so the
        caller can give its event loop a turn in between. Validates first: a bad report
        changes nothing. Revocations made between chunks are stamped later than every
        hit already reported, so chunking changes no verdict."""
        self.validate(words, runs, counts)
        self.checked += sum(counts) if counts is not None else len(words)
        seen: set[int] = set()
        suspects: set[int] = set()
        for at in range(0, len(words), CHUNK_WORDS):  # which distinct words could be stale
            fresh = set(words[at:at + CHUNK_WORDS]) - seen
            seen |= fresh
            suspects |= self._suspects(fresh, mm)
            yield 0
        if not suspects:
            return
        stale = pos = done = 0
        for k in range(0, len(runs), 3):
            n, first_ns, last_ns = runs[k:k + 3]
            run = words[pos:pos + n]
            found = suspects.intersection(run)
            if found:
                weights = counts[pos:pos + n] if counts is not None else None
                for w, hits in self._tally(run, weights, found).items():
                    tid, write = w >> 1, bool(w & 1)
                    if self.is_stale(tid, write, first_ns, mm):
                        stale += hits
                    elif self.is_stale(tid, write, last_ns, mm):
                        self.straddled += hits
            pos += n
            done += n
            if done >= CHUNK_WORDS:
                self.stale += stale
                yield stale
                stale = done = 0
        self.stale += stale
        yield stale

    @staticmethod
    def _tally(run: Sequence[int], counts: Sequence[int] | None,
               found: set[int]) -> dict[int, int]:
        """The accesses in `run` of each word in `found`."""
        if counts is None:
            if len(found) > 8:
                every = collections.Counter(run)
                return {w: every[w] for w in found}
            return {w: run.count(w) for w in found}
        tally: dict[int, int] = {}
        for w, c in zip(run, counts):
            if w in found:
                tally[w] = tally.get(w, 0) + c
        return tally

    def check_hits(self, words: Sequence[int], runs: Sequence[int], mm: int = 0,
                   counts: Sequence[int] | None = None) -> int:
        """`judge` in one go: the stale count."""
        return sum(self.judge(words, runs, mm, counts))

    def entry_valid(self, entry_tid: int, writable: bool, current_tid: int,
                    mm: int = 0) -> bool:
        """May a TLB entry of `mm` filled under `entry_tid` still be used, given the PTE's
        current tid? Only through transitions that revoked nothing (or only writes,
        for a read-only entry), and not ended for `mm` alone."""
        if writable and self._table_write_revoked(entry_tid, None):
            return False
        mine = self.revoked_for.get(mm, {}) if mm else {}
        tid = entry_tid
        while True:
            r = mine.get(tid)
            if r is not None and (r.revokes == Revokes.ALL or
                                  (r.revokes == Revokes.WRITES and writable)):
                return False
            if tid == current_tid:
                return True
            r = self.revoked.get(tid)
            if r is None or not r.successor or r.revokes == Revokes.ALL:
                return False
            if r.revokes == Revokes.WRITES and writable:
                return False
            tid = r.successor
