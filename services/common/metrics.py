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

from services.common.costmodel import CostModel, Events

# The bucket bounds live with Samples, which counts per bucket as the domain records.
from services.common.stats import SECONDS_BUCKETS, Samples

VERSION = "0.1.0"

Sample = tuple[str, str, str, float]  # kind ("counter" | "gauge"), name, help, value
# A collector's read() yields Samples or ready metric families (see labelled, ListHistogram).


class NodeCollector(Collector):
    """Reads plain numbers from the domain when Prometheus scrapes, and prices the
    service's events (services/common/costmodel.py, the one counter-to-event mapping)
    with the run's cost model (`modelled_time`)."""

    def __init__(self, read: Callable[[], Iterable[Sample]],
                 policy: Callable[[], object] = lambda: None,
                 events: Callable[[], Events] = Events):
        self._read = read
        self._policy = policy
        self._events = events

    def collect(self):
        for item in self._read():
            if isinstance(item, tuple):
                kind, name, help_text, value = item
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                item = family(name, help_text, value=value)
            yield item
        model = getattr(self._policy(), "cost_model", None)
        if model is not None:
            yield modelled_time(model, self._events())


def modelled_time(model: CostModel, events: Events) -> CounterMetricFamily:
    """`tlbsim_modelled_seconds_total{component,cost_model}`: what this service's events
    would cost on the modelled hardware (walk, fault, invalidate, ipi, lock)."""
    family = CounterMetricFamily(
        "tlbsim_modelled_seconds",
        "Modelled hardware time of the events this service counted, by component "
        "(services/common/costmodel.py); sum over services for the machine",
        labels=["component", "cost_model"])
    for component, ns in model.breakdown(events).items():
        family.add_metric([component, model.name], ns * 1e-9)
    return family


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



def labelled(kind: str, name: str, help_text: str, labelnames: Sequence[str],
             values: Iterable[tuple[Sequence[str], float]]):
    """A counter or gauge family with one sample per label-value tuple."""
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
        name, help_text, labels=list(labelnames))
    for label_values, value in values:
        family.add_metric([str(v) for v in label_values], value)
    return family


class ListHistogram:
    """A histogram fed from the Samples the domain keeps (latencies it records anyway,
    bucketed as recorded: no metric call on its paths), or from append-only lists,
    bucketed incrementally at scrape time (items: seconds, or (value, weight)). When the
    domain replaces a list (a run's reset), the series restarts from zero, like every
    domain counter; Prometheus treats it as a counter reset."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 buckets: Sequence[float] = SECONDS_BUCKETS):
        self.name, self.help, self.labelnames = name, help_text, list(labelnames)
        self.bounds = list(buckets)
        self._series: dict[tuple, list] = {}  # labels -> [source, consumed, counts, sum, n]
        self._seen: set[tuple] = set()  # exported: the series updated since the last scrape

    def update(self, label_values: Sequence[str], source: list | Samples) -> None:
        key = tuple(str(v) for v in label_values)
        self._seen.add(key)
        if isinstance(source, Samples):  # bucketed as it was recorded: copy its counts
            if source.bounds != tuple(self.bounds):
                raise ValueError(f"{self.name}: the samples have other bucket bounds")
            self._series[key] = [source, source.count, list(source.buckets), source.total,
                                 source.count]
            return
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
                  read: Callable[[], Iterable], events: Callable[[], Events]) -> CollectorRegistry:
    """A service instance's own registry (so several services share one process):
    build info and the scrape-time collector, or nothing when metrics are off. `events`:
    the service's counts as cost-model events (services/common/costmodel.py)."""
    registry = CollectorRegistry()
    if enabled:
        build_info(registry, service, policy)
        registry.register(NodeCollector(read, policy, events))
    return registry
