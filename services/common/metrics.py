"""Prometheus plumbing shared by the services: one registry per service instance,
domain counters read at scrape time (hot paths never pay a metric call)."""
from __future__ import annotations

import bisect
import itertools
from typing import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

VERSION = "0.1.0"

Sample = tuple[str, str, str, float]  # kind ("counter" | "gauge"), name, help, value
# A collector's read() yields Samples or ready metric families (see labelled, ListHistogram).


class NodeCollector(Collector):
    """Reads plain numbers from the domain when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Iterable[Sample]]):
        self._read = read

    def collect(self):
        for item in self._read():
            if not isinstance(item, tuple):  # a ready metric family (labelled, histogram)
                yield item
                continue
            kind, name, help_text, value = item
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=value)


class _BuildInfo(Collector):
    def __init__(self, service: str, policy: Callable[[], object]):
        self._service = service
        self._policy = policy

    def collect(self):
        p = self._policy()
        labels = {"version": VERSION, "service": self._service,
                  **{k: str(v) for k, v in p.as_dict().items()}}
        yield InfoMetricFamily("tlbsim_build", "Version and active policy", value=labels)


def build_info(registry: CollectorRegistry, service: str, policy: Callable[[], object]) -> None:
    registry.register(_BuildInfo(service, policy))


# --- histograms and labelled families read at scrape time ----------------------------------

# Log-spaced 1-2.5-5 buckets per decade from 1 µs to 10 s (python-ecosystem.md §3).
SECONDS_BUCKETS = tuple(float(f"{m}e{e}") for e in range(-6, 1) for m in (1, 2.5, 5)) + (10.0,)
# Counts (targets, pages per shootdown): powers of two up to a full gather (9,698 pages).
COUNT_BUCKETS = tuple(float(1 << i) for i in range(15))


def labelled(kind: str, name: str, help_text: str, labelnames: Sequence[str],
             values: Iterable[tuple[Sequence[str], float]]):
    """A counter or gauge family with one sample per label-value tuple."""
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
        name, help_text, labels=list(labelnames))
    for label_values, value in values:
        family.add_metric([str(v) for v in label_values], value)
    return family


class ListHistogram:
    """A histogram fed from append-only lists the domain keeps (latencies it records
    anyway), bucketed incrementally at scrape time: the domain pays one list append per
    event and no metric call. Items are seconds, or (value, weight) pairs. When the
    domain replaces a list (a run's reset), the series restarts from zero, like every
    domain counter; Prometheus treats it as a counter reset."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = SECONDS_BUCKETS):
        self.name, self.help, self.labelnames = name, help_text, list(labelnames)
        self.bounds = list(buckets)
        self._series: dict[tuple, list] = {}  # labels -> [source, consumed, counts, sum, n]
        self._seen: set[tuple] = set()  # exported: the series updated since the last scrape

    def update(self, label_values: Sequence[str], source: list) -> None:
        key = tuple(str(v) for v in label_values)
        self._seen.add(key)
        s = self._series.get(key)
        if s is None or s[0] is not source:
            s = self._series[key] = [source, 0, [0] * (len(self.bounds) + 1), 0.0, 0]
        counts, bounds = s[2], self.bounds
        end = len(source)
        total, n = s[3], s[4]
        for item in itertools.islice(source, s[1], end):
            value, weight = item if isinstance(item, tuple) else (item, 1)
            counts[bisect.bisect_left(bounds, value)] += weight
            total += value * weight
            n += weight
        s[1], s[3], s[4] = end, total, n

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labelnames)
        for key in [k for k in self._series if k not in self._seen]:
            del self._series[key]  # its source is gone (the machine was reset)
        self._seen = set()
        for key, (_, _, counts, total, _) in sorted(self._series.items()):
            cumulative, acc = [], 0
            for bound, c in zip(self.bounds, counts):
                acc += c
                cumulative.append((floatToGoString(bound), acc))
            cumulative.append(("+Inf", acc + counts[-1]))
            family.add_metric(list(key), cumulative, total)
        return family


def histogram(name: str, help_text: str, labelnames: Sequence[str], registry,
              buckets: Sequence[float] = SECONDS_BUCKETS) -> Histogram | None:
    """A prometheus-client Histogram for events observed once per RPC (never per
    TLB lookup); None without a registry, so callers skip observing when metrics are off."""
    if registry is None:
        return None
    return Histogram(name, help_text, labelnames=list(labelnames), buckets=buckets,
                     registry=registry)


def node_registry(enabled: bool, service: str, policy: Callable[[], object],
                  read: Callable[[], Iterable]) -> CollectorRegistry:
    """A service instance's own registry (so several services share one process):
    build info and the scrape-time collector, or nothing when metrics are off."""
    registry = CollectorRegistry()
    if enabled:
        build_info(registry, service, policy)
        registry.register(NodeCollector(read))
    return registry
