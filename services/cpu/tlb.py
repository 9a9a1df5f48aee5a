"""A set-associative, LRU TLB with per-mm flush generations and x86's per-CPU ASIDs
(pure, no I/O).

The generation rule is Linux's `flush_tlb_func` (DESIGN.md §2): a flush request
for generation g, on a CPU whose local generation for the mm is l, while the mm
is at generation m:
  - g <= l: elided (a newer flush already covered it);
  - l == m: elided (a concurrent flush caught up);
  - a range flush only when g == l + 1 == m, otherwise a full flush of the mm —
    two flushes can arrive in either order, so a partial flush must never skip
    a generation;
  - then l = m.

ASIDs (PCIDs) follow choose_new_asid (arch/x86/mm/tlb.c): a CPU keeps TLB_NR_DYN_ASIDS
(6) slots; an mm that has one keeps its entries across switches and flushes only if
its generation is behind; one that has none takes the next slot round-robin, which
flushes what that slot held. With 0 ASIDs (no PCID) every switch to another mm
flushes the whole TLB (a CR3 write).
"""
from __future__ import annotations

import dataclasses
from collections import Counter, OrderedDict, deque
from itertools import repeat
from operator import and_, attrgetter, gt, itemgetter, lshift, mod, or_, rshift, xor
from typing import Any, Iterator, NamedTuple, Sequence

from services.common.addresses import PAGE_SHIFT
from services.common.hits import HitLog


class Entry(NamedTuple):
    pfn: int
    writable: bool
    tid: int  # the translation's identity at fill time (the oracle's key)


class _Slot(NamedTuple):
    entry: Entry
    epoch: int  # the mm's flush epoch at fill time; older epochs are dead


# C-level field getters for the TLB's hot path (Tlb._serve_all maps them)
_ENTRY, _EPOCH = itemgetter(0), itemgetter(1)
_WRITABLE, _TID = attrgetter("writable"), attrgetter("tid")


@dataclasses.dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    flush_page: int = 0      # single pages invalidated by range flushes
    flush_range: int = 0
    flush_full: int = 0
    flush_elided: int = 0
    flush_not_loaded: int = 0  # requests for an mm the CPU no longer runs (or runs lazily)
    flush_hardware: int = 0  # hardware broadcasts (INVLPGB) received: no invlpg, no handler
    flush_requests: int = 0
    evictions: int = 0


RANGE, FULL, ELIDED = "range", "full", "elided"
NOT_LOADED = "not-loaded"  # the CPU does not run the mm: nothing flushed (flush_tlb_func)
TLB_NR_DYN_ASIDS = 6


class Tlb:
    def __init__(self, entries: int, ways: int, asids: int = TLB_NR_DYN_ASIDS):
        if entries < 1 or ways < 1 or entries % ways:
            raise ValueError(f"a TLB of {entries} entries cannot have {ways} ways")
        if asids < 0:
            raise ValueError(f"{asids} ASIDs: must be at least 0 (0: no PCID)")
        self.asids = asids
        self._slot_mm: list[int | None] = [None] * asids  # which mm each ASID slot holds
        self._next_asid = 0
        self.ways = ways
        self.nsets = entries // ways
        self._sets: list[OrderedDict[tuple[int, int], _Slot]] = [
            OrderedDict() for _ in range(self.nsets)]
        # A full flush of an mm bumps its epoch instead of visiting every set, the way
        # a PCID is retired: entries of an older epoch are dead and dropped when met.
        self._epoch: dict[int, int] = {}
        self._live: dict[int, int] = {}  # mm -> live entries
        self.local_gen: dict[int, int] = {}   # mm -> generation this TLB is current with
        self.mm_gen_seen: dict[int, int] = {}  # mm -> newest mm generation ever announced
        self.counters = Counters()
        self.flushes_applied = 0  # lets a walk in flight notice an invalidation that overtook it

    # --- lookups -----------------------------------------------------------------
    def _set(self, mm: int, vpn: int) -> OrderedDict[tuple[int, int], _Slot]:
        return self._sets[(vpn ^ (mm * 0x9E3779B1)) % self.nsets]

    def _alive(self, mm: int, slot: _Slot) -> bool:
        return slot.epoch == self._epoch.get(mm, 0)

    def lookup(self, mm: int, vpn: int) -> Entry | None:
        s = self._set(mm, vpn)
        key = (mm, vpn)
        slot = s.get(key)
        if slot is None or slot.epoch != self._epoch.get(mm, 0):
            if slot is not None:
                del s[key]
            self.counters.misses += 1
            return None
        s.move_to_end(key)
        self.counters.hits += 1
        return slot.entry

    def holds(self, mm: int, vpn: int) -> bool:
        """Is there a live entry for (mm, vpn)? No LRU move, no count: a peek."""
        slot = self._set(mm, vpn).get((mm, vpn))
        return slot is not None and self._alive(mm, slot)

    def hits_from(self, mm: int, addresses: Sequence[int], writes: Sequence[int], start: int,
                  stop: int, log: HitLog) -> int:
        """The hot path: from addresses[start] up to addresses[stop] (byte addresses),
        serve every access that hits a live entry permitting it, recording its word,
        tid << 1 | write, for the oracle (services/common/hits.py); stop at the first
        that does not and return its index (`stop` if none)."""
        if start < stop and not self.holds(mm, addresses[start] >> PAGE_SHIFT):
            return start  # after a miss the next access often misses too: no bulk attempt
        chunk = addresses[start:stop]
        written = writes[start:stop] if writes else b""
        served = self._serve_all(mm, chunk, written, log)
        if served < len(chunk):  # the accesses before the first non-hit were served
            return self._serve_each(mm, addresses, writes, start + served, stop, log)
        return stop

    def _serve_all(self, mm: int, addresses: Sequence[int], writes: Sequence[int],
                   log: HitLog) -> int:
        """Serve a run of accesses that all hit in one go: each distinct access (address,
        write) is looked up once, its page moved in its set's LRU order as one access
        after another would have left it, and its word logged once with how many
        accesses it served. If some would not hit, serve only the accesses before the
        first of them; return how many were served. Each step maps a C function over
        the distinct accesses: no Python bytecode runs per access."""
        sets, nsets, epoch = self._sets, self.nsets, self._epoch.get(mm, 0)
        # Each distinct access, newest first (by its last occurrence), with its count:
        # address << 1 | write, or the address alone when all are reads.
        if writes:
            counted = Counter(reversed(list(map(or_, map(lshift, addresses, repeat(1)),
                                                writes))))
            distinct = list(counted)
            vpns = list(map(rshift, distinct, repeat(PAGE_SHIFT + 1)))
        else:
            counted = Counter(reversed(addresses))
            distinct = list(counted)
            vpns = list(map(rshift, distinct, repeat(PAGE_SHIFT)))
        keys = list(zip(repeat(mm), vpns))
        where = list(map(sets.__getitem__, map(mod, map(
            xor, vpns, repeat(mm * 0x9E3779B1)), repeat(nsets))))
        slots: list[Any] = list(map(OrderedDict.get, where, keys))  # None: not held
        entries = list(map(_ENTRY, slots)) if None not in slots else None
        if entries is None or set(map(_EPOCH, slots)) - {epoch} or (writes and any(map(
                gt, map(and_, distinct, repeat(1)), map(_WRITABLE, entries)))):
            return self._serve_hitting(mm, addresses, writes, log, distinct, slots, epoch)
        deque(map(OrderedDict.move_to_end, reversed(where), reversed(keys)), maxlen=0)
        words = map(lshift, map(_TID, entries), repeat(1))
        log.words.extend(map(or_, words, map(and_, distinct, repeat(1))) if writes else words)
        log.counts.extend(counted.values())
        self.counters.hits += len(addresses)
        return len(addresses)

    def _serve_hitting(self, mm: int, addresses: Sequence[int], writes: Sequence[int],
                       log: HitLog, distinct: list[int], slots: list, epoch: int) -> int:
        """`_serve_all` of a run where some access would not hit: the accesses before
        the first of them (its first access to that address, or earlier)."""
        shift = 1 if writes else 0
        failing = [access >> shift for access, slot in zip(distinct, slots)
                   if slot is None or slot.epoch != epoch or
                   (access & shift and not slot.entry.writable)]
        first = min(map(addresses.index, failing))
        return self._serve_all(mm, addresses[:first], writes[:first], log) if first else 0

    def _serve_each(self, mm: int, addresses: Sequence[int], writes: Sequence[int],
                    start: int, stop: int, log: HitLog) -> int:
        """`hits_from` one access at a time (`lookup`'s work, inlined), up to the first
        access that does not hit: a word per access."""
        sets, nsets, epoch = self._sets, self.nsets, self._epoch.get(mm, 0)
        spread = mm * 0x9E3779B1
        record = log.words.append
        i = start
        while i < stop:
            vpn = addresses[i] >> PAGE_SHIFT
            key = (mm, vpn)
            s = sets[(vpn ^ spread) % nsets]
            slot = s.get(key)
            if slot is None or slot.epoch != epoch:
                break
            write = writes[i] if writes else 0
            if write and not slot.entry.writable:
                break
            s.move_to_end(key)
            record(slot.entry.tid << 1 | write)
            i += 1
        log.counts.extend([1] * (i - start))
        self.counters.hits += i - start
        return i

    def fill(self, mm: int, vpn: int, entry: Entry) -> None:
        s = self._set(mm, vpn)
        key = (mm, vpn)
        old = s.get(key)
        if old is None or not self._alive(mm, old):
            self._live[mm] = self._live.get(mm, 0) + 1
        s[key] = _Slot(entry, self._epoch.get(mm, 0))
        s.move_to_end(key)
        if len(s) > self.ways:
            (victim_mm, _), victim = s.popitem(last=False)
            if self._alive(victim_mm, victim):
                self._live[victim_mm] -= 1
                self.counters.evictions += 1

    def entries(self) -> Iterator[tuple[int, int, Entry]]:
        for s in self._sets:
            for (mm, vpn), slot in s.items():
                if self._alive(mm, slot):
                    yield mm, vpn, slot.entry

    def __len__(self) -> int:
        return sum(self._live.values())

    # --- invalidation --------------------------------------------------------------
    def invalidate_page(self, mm: int, vpn: int) -> int:
        slot = self._set(mm, vpn).pop((mm, vpn), None)
        if slot is None or not self._alive(mm, slot):
            return 0
        self._live[mm] -= 1
        return 1

    def invalidate_range(self, mm: int, start_vpn: int, pages: int) -> int:
        """`invalidate_page` of every page of the range: page by page when the range is
        no larger than the TLB, else in one pass over the entries (a flush naming 2^40
        pages must not take 2^40 steps)."""
        if pages > self.nsets * self.ways:
            end = start_vpn + pages
            held = [vpn for s in self._sets for m, vpn in s if m == mm and start_vpn <= vpn < end]
            return sum(self.invalidate_page(mm, vpn) for vpn in held)
        return sum(self.invalidate_page(mm, vpn) for vpn in range(start_vpn, start_vpn + pages))

    def invalidate_mm(self, mm: int) -> int:
        removed = self._live.pop(mm, 0)
        self._epoch[mm] = self._epoch.get(mm, 0) + 1
        return removed

    def invalidate_all(self) -> int:
        removed = len(self)
        self.flushes_applied += 1
        for s in self._sets:
            s.clear()
        self._live.clear()
        self.local_gen.clear()
        return removed

    def announce_gen(self, mm: int, gen: int) -> int:
        """Record that `mm` has reached `gen`; return the newest generation known."""
        newest = max(self.mm_gen_seen.get(mm, 0), gen)
        self.mm_gen_seen[mm] = newest
        return newest

    def apply_flush(self, mm: int, start_vpn: int, pages: int, new_gen: int,
                    mm_gen: int) -> tuple[str, int]:
        """Apply one flush request by the generation rule; return (outcome, entries removed)."""
        self.counters.flush_requests += 1
        self.flushes_applied += 1
        mm_gen = self.announce_gen(mm, max(mm_gen, new_gen))
        local = self.local_gen.get(mm, 0)
        if new_gen <= local or local == mm_gen:
            self.counters.flush_elided += 1
            return ELIDED, 0
        if pages and new_gen == local + 1 == mm_gen:
            removed = self.invalidate_range(mm, start_vpn, pages)
            self.counters.flush_range += 1
            self.counters.flush_page += pages
            outcome = RANGE
        else:
            removed = self.invalidate_mm(mm)
            self.counters.flush_full += 1
            outcome = FULL
        self.local_gen[mm] = mm_gen
        return outcome, removed

    def switch_to(self, mm: int, mm_gen: int, reload: bool = True) -> bool:
        """switch_mm to `mm` (`reload`: from another mm, a CR3 write; not when leaving
        lazy mode on the same mm). Returns True when it flushed: the mm's generation was
        behind, it had to take a new ASID, or there are no ASIDs and CR3 changed."""
        mm_gen = self.announce_gen(mm, mm_gen)
        if reload and not self.asids:  # no PCID: a CR3 write drops every entry
            self.invalidate_all()
            self.counters.flush_full += 1
            self.local_gen[mm] = mm_gen
            return True
        if reload and mm not in self._slot_mm:  # choose_new_asid: the next slot, flushed
            slot = self._next_asid
            self._next_asid = (slot + 1) % self.asids
            evicted = self._slot_mm[slot]
            if evicted is not None:
                self.invalidate_mm(evicted)
                self.local_gen.pop(evicted, None)
            self._slot_mm[slot] = mm
        elif self.local_gen.get(mm, 0) >= mm_gen:
            return False
        self.invalidate_mm(mm)
        self.flushes_applied += 1
        self.counters.flush_full += 1
        self.local_gen[mm] = mm_gen
        return True

    def flush_loaded(self, mm: int, mm_gen: int) -> int:
        """flush_tlb_func with no mm (reclaim's batched flush): a full flush of the mm the
        CPU runs, brought up to `mm_gen`; other mms' entries wait for their switch."""
        self.counters.flush_requests += 1
        self.counters.flush_full += 1
        self.flushes_applied += 1
        removed = self.invalidate_mm(mm)
        self.local_gen[mm] = self.announce_gen(mm, mm_gen)
        return removed
