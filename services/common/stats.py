"""Small statistics shared by services and the load generator."""
from __future__ import annotations

from typing import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def p50_p99(samples: Sequence[float]) -> tuple[float, float, int]:
    return percentile(samples, 50), percentile(samples, 99), len(samples)
