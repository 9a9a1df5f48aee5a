"""Access reports the CPUs have promised and not yet sent (no I/O, no clock).

A CPU that called the memory service during an Access (a walk, a fault) answers the
Access first and sends that Access's report to the oracle after it: one serial round
trip less per fault-bearing Access. Its walks carry a token, the *promise*; the report
carries it back. Judging later changes no verdict — the oracle judges a run at its
CLOCK_MONOTONIC start, against revocations it keeps until the run's reset
(services/memory/oracle.py) — but a reader of the stale count must not see it before
the reports of the Accesses it has seen answered: Stats waits for the promises made
before it (services/memory/service.py), so its count is exact, as if every report had
been awaited.

A CPU that dies between its answer and its report never keeps its promise. Tokens are
(incarnation << 32 | sequence), the incarnation drawn at the CPU's start: a promise
from a new incarnation of a CPU drops the old one's as lost; otherwise Stats gives
up after a bound and counts them lost (MemoryStats.reports_lost) until they arrive."""
from __future__ import annotations

INCARNATION_SHIFT = 32


class Promises:
    def __init__(self) -> None:
        self._owed: dict[int, dict[int, int]] = {}  # cpu -> token -> serial of the promise
        self._serial = 0
        self._given_up: set[tuple[int, int]] = set()  # (cpu, token): may still come
        self.lost = 0  # promised reports not (yet) arrived that a reader gave up on

    def promise(self, cpu: int, token: int) -> None:
        owed = self._owed.setdefault(cpu, {})
        if token in owed:  # another walk of the same Access
            return
        incarnation = token >> INCARNATION_SHIFT
        dead = [t for t in owed if t >> INCARNATION_SHIFT != incarnation]
        for t in dead:  # the CPU restarted: its old process will never report
            del owed[t]
            self._given_up.add((cpu, t))
        self.lost += len(dead)
        self._serial += 1
        owed[token] = self._serial

    def kept(self, cpu: int, token: int) -> None:
        """The report for `token` arrived (late, after a reader gave up: no longer lost;
        a token never promised: nothing)."""
        owed = self._owed.get(cpu)
        if owed is not None and owed.pop(token, None) is not None:
            return
        if (cpu, token) in self._given_up:
            self._given_up.discard((cpu, token))
            self.lost -= 1

    def mark(self) -> int:
        """Where a reader starts: the promises made so far are the ones it waits for."""
        return self._serial

    def owed_before(self, mark: int) -> bool:
        return any(s <= mark for owed in self._owed.values() for s in owed.values())

    def give_up(self, mark: int) -> int:
        """Stop waiting for the promises made up to `mark`: lost. Returns how many."""
        n = 0
        for cpu, owed in self._owed.items():
            late = [t for t, s in owed.items() if s <= mark]
            for t in late:
                del owed[t]
                self._given_up.add((cpu, t))
            n += len(late)
        self.lost += n
        return n

    def __len__(self) -> int:
        return sum(map(len, self._owed.values()))
