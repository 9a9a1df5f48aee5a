"""Samples: exact counts and buckets, percentiles in bounded memory."""
import random

import pytest

from services.common.metrics import ListHistogram
from services.common.stats import COUNT_BUCKETS, Samples, p50_p99


def test_counts_sum_and_buckets_are_exact_and_weighted():
    s = Samples(bounds=(1.0, 10.0))
    for v, w in ((0.5, 1), (1.0, 2), (5.0, 1), (50.0, 3)):
        s.append(v, w)
    assert s.count == len(s) == 7 and s.total == pytest.approx(0.5 + 2 + 5 + 150)
    assert s.buckets == [3, 1, 3]  # <= 1, <= 10, above (a bound is inclusive, like `le`)


def test_percentiles_are_exact_while_every_value_is_kept():
    s = Samples()
    values = [i / 1000 for i in range(1, 1001)]
    for v in reversed(values):
        s.append(v)
    assert p50_p99(s) == p50_p99(values) == (0.5, 0.99, 1000)


def test_memory_stays_bounded_and_percentiles_stay_close_past_the_bound():
    s, rng = Samples(keep=2000), random.Random(1)
    for _ in range(100_000):
        s.append(rng.random())
    assert len(list(s)) == 2000 and s.count == 100_000
    p50, p99, n = p50_p99(s)
    assert abs(p50 - 0.5) < 0.05 and abs(p99 - 0.99) < 0.01 and n == 100_000


def test_merged_adds_counts_and_pools_the_kept_values():
    a, b = Samples(COUNT_BUCKETS), Samples(COUNT_BUCKETS)
    a.append(1)
    b.append(3, 2)
    m = Samples.merged([a, b])
    assert m.count == 3 and m.total == 7 and sorted(m) == [1, 3]
    assert m.buckets == [x + y for x, y in zip(a.buckets, b.buckets)]
    assert Samples.merged([]).count == 0


def test_a_histogram_reads_samples_as_it_reads_lists():
    values = [(2e-6, 1), (0.3, 4), (20.0, 1)]
    from_list, from_samples = ListHistogram("x_seconds", "x", []), ListHistogram("x_seconds",
                                                                                 "x", [])
    s = Samples()
    for v, w in values:
        s.append(v, w)
    from_list.update((), list(values))
    from_samples.update((), s)
    assert from_samples.family().samples == from_list.family().samples
    with pytest.raises(ValueError, match="bounds"):
        from_samples.update((), Samples(COUNT_BUCKETS))
