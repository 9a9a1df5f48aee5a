"""Prometheus plumbing shared by the services: one registry per service instance,
domain counters read at scrape time (hot paths never pay a metric call)."""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

VERSION = "0.1.0"

Sample = tuple[str, str, str, float]  # kind ("counter" | "gauge"), name, help, value


class NodeCollector(Collector):
    """Reads plain numbers from the domain when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Iterable[Sample]]):
        self._read = read

    def collect(self):
        for kind, name, help_text, value in self._read():
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
