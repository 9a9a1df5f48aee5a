"""Small statistics shared by services and the load generator."""
from __future__ import annotations

import bisect
import random
from typing import Iterable, Iterator, Sequence

# Log-spaced 1-2.5-5 buckets per decade from 1 µs to 10 s (python-ecosystem.md §3).
SECONDS_BUCKETS = tuple(float(f"{m}e{e}") for e in range(-6, 1) for m in (1, 2.5, 5)) + (10.0,)
# Counts (targets, pages per shootdown): powers of two up to a full gather (9,698 pages).
COUNT_BUCKETS = tuple(float(1 << i) for i in range(15))
KEEP = 1 << 16  # values kept for percentiles: exact up to here, a uniform sample beyond


class Samples:
    """Measurements a service records on its own paths (latencies, sizes), in bounded
    memory however long it runs: an exact count and sum; exact counts per bucket of
    fixed bounds (what a Prometheus histogram exports); and, for percentiles, every
    value up to KEEP of them, then a uniform sample of KEEP (Vitter's algorithm R,
    seeded: the same values give the same sample). A weight counts one value several
    times (e.g. a flush wait shared by that many frames) in the count, sum and buckets."""
    __slots__ = ("bounds", "buckets", "count", "total", "appended", "_kept", "_keep", "_rng")

    def __init__(self, bounds: Sequence[float] = SECONDS_BUCKETS, keep: int = KEEP):
        self.bounds = tuple(bounds)
        self.buckets = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.count = 0
        self.total = 0.0
        self.appended = 0  # values offered to the sample (weights aside)
        self._kept: list[float] = []
        self._keep = keep
        self._rng = random.Random(0)

    def append(self, value: float, weight: int = 1) -> None:
        self.count += weight
        self.total += value * weight
        self.buckets[bisect.bisect_left(self.bounds, value)] += weight
        self.appended += 1
        if len(self._kept) < self._keep:
            self._kept.append(value)
        else:
            slot = self._rng.randrange(self.appended)
            if slot < self._keep:
                self._kept[slot] = value

    @classmethod
    def merged(cls, parts: Iterable[Samples]) -> Samples:
        """One record of several (same bounds): exact counts; the kept values pooled."""
        parts = list(parts)
        out = cls(parts[0].bounds if parts else SECONDS_BUCKETS)
        for p in parts:
            out.count += p.count
            out.total += p.total
            out.appended += p.appended
            out.buckets = [a + b for a, b in zip(out.buckets, p.buckets)]
            out._kept.extend(p._kept)
        return out

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[float]:
        """The kept values (all of them while there are at most KEEP)."""
        return iter(self._kept)

    def percentile(self, q: float) -> float:
        return percentile(self._kept, q)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no samples."""
    return _ranked(sorted(samples), q)


def _ranked(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def p50_p99(samples: Sequence[float] | Samples) -> tuple[float, float, int]:
    """p50, p99 and how many (of a Samples: its exact count, percentiles of what it kept).
    One sort for both: `Stats` reads several records of up to KEEP values each, and the
    memory service serves nothing else meanwhile."""
    ordered = sorted(samples)
    return _ranked(ordered, 50), _ranked(ordered, 99), len(samples)
