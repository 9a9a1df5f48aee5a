"""The hit report: what a CPU served from its TLB, for the oracle (services/memory/
oracle.py judges it; proto/tlbsim/v1/memory.proto ReportAccessesRequest carries it).

A CPU reports, per run of accesses served without a pause (a TLB fill is a run of its
own), each distinct word it served — tid << 1 | write, tid 0 meaning "no translation" —
with the number of accesses it served (`counts`), and the run as (words in the run,
CLOCK_MONOTONIC ns before its first access, after its last). A run is judged as one
instant, so which access came when inside it carries nothing the oracle uses: the
counts keep every verdict and stale count exact, in a report the size of the TLB's
working set instead of one word per access (102,400 hits of 1,024 pages in runs of
4,096 after a ramp from 16: 27,648 words, not 102,400)."""
from __future__ import annotations

from array import array
from typing import Iterable, NamedTuple

from services.common.errors import InvalidArgument


class HitReport(NamedTuple):
    """A report as it crosses the wire: little-endian uint64 words, uint32 counts
    (one per word), int64 run triples."""
    words: bytes = b""
    runs: bytes = b""
    counts: bytes = b""

    def decode(self) -> tuple[array, array, array | None]:
        """(words, runs, counts or None: one access each). Raises InvalidArgument on
        sizes that do not divide; Oracle.validate checks what they say."""
        if len(self.words) % 8 or len(self.runs) % 24 or len(self.counts) % 4:
            raise InvalidArgument("hit report: words must be 8-byte values, counts 4-byte "
                                  "values and runs 24-byte triples")
        words, runs, counts = array("Q"), array("q"), array("I")
        words.frombytes(self.words)
        runs.frombytes(self.runs)
        counts.frombytes(self.counts)
        return words, runs, counts if self.counts else None


class HitLog:
    """The words a CPU has served since its last report, in runs."""
    __slots__ = ("words", "counts", "runs")

    def __init__(self) -> None:
        self.words, self.counts, self.runs = array("Q"), array("I"), array("q")

    def run(self, first_ns: int, last_ns: int, since: int) -> None:
        """Close the run of the words added since len(words) was `since`."""
        self.runs.extend((len(self.words) - since, first_ns, last_ns))

    def add(self, words: Iterable[int], first_ns: int, last_ns: int) -> None:
        """A run of accesses given one word each."""
        since = len(self.words)
        self.words.extend(words)
        self.counts.extend([1] * (len(self.words) - since))
        self.run(first_ns, last_ns, since)

    def take(self) -> HitReport:
        report = HitReport(self.words.tobytes(), self.runs.tobytes(), self.counts.tobytes())
        self.words, self.counts, self.runs = array("Q"), array("I"), array("q")
        return report
