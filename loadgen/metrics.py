"""What every number of a report is called, in which unit, and how it is written: the one
catalogue the run table, the compare and sweep tables, the CSV and the plots read.

A metric is a path into a report's `results` (`munmap_latency_ms.p50`). A scenario names
its headline metrics (`HEADLINE` in its module) as result keys; a latency key such as
`fork_latency_ms` stands for its p50 and p99.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Metric:
    path: str            # into results, dotted
    label: str           # what a reader calls it, without the unit
    unit: str = ""       # "ms", "ns", "µs", "s", "faults/s", ..., or "" for a count
    percent: bool = False  # a fraction shown as a percentage
    safety: bool = False   # shown even when it is zero: zero is the news

    @property
    def heading(self) -> str:
        """The label with its unit, for a table row (a percentage says so itself)."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @property
    def axis(self) -> str:
        """The label with its unit, for a plot's axis."""
        return f"{self.label} (%)" if self.percent else self.heading

    def value(self, report: dict) -> float | None:
        return lookup(report.get("results", {}), self.path)

    def text(self, value: float | None, with_unit: bool = False) -> str:
        if value is None:
            return "-"
        if self.percent:
            return f"{value * 100:.2f}%"
        shown = number(value)
        return f"{shown} {self.unit}".rstrip() if with_unit and self.unit else shown


def lookup(results: dict, path: str) -> float | None:
    value = results
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def number(v: float) -> str:
    """1,234 for whole numbers; three significant digits otherwise (12.3, 0.0456,
    4,512)."""
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def ratio_text(r: float | None, unit: str = "x") -> str:
    """B/A as a factor: 2.19x, 0.977x; below 1/2 as a fraction, 1/64, 1/4.5 (which a
    reader compares at a glance with the other side of 1)."""
    if r is None:
        return "-"
    if 0 < r < 0.5:
        inverse = 1 / r
        return f"1/{inverse:.0f}" if inverse >= 10 else f"1/{inverse:.2g}"
    return f"{r:.3g}{unit}"


def spread_text(lo: float | None, hi: float | None) -> str:
    """The spread of the pair ratios, `2.14–2.8` or `1/134–1/101`; empty when every
    pair gave the same ratio."""
    if lo is None or hi is None or lo == hi:
        return ""
    return f"{ratio_text(lo, '')}–{ratio_text(hi, '')}"


# Latencies: a key of the report holding {p50, p99}.
LATENCIES = {
    "munmap_latency_ms": "munmap latency",
    "fault_latency_ms": "fault latency",
    "lock_wait_ms": "lock wait",
    "shootdown_latency_ms": "shootdown latency",
    "fork_latency_ms": "fork latency",
    "syscall_latency_ms.mprotect": "mprotect latency",
    "syscall_latency_ms.madvise_dontneed": "madvise latency",
    "syscall_latency_ms.munmap": "munmap call latency",
}

_SCALARS = [
    Metric("ops", "ops (accesses + calls)"),
    Metric("ops_per_s", "throughput", "ops/s"),
    Metric("duration_s", "duration", "s"),
    Metric("rounds", "rounds"),
    Metric("shootdowns", "shootdowns"),
    Metric("full_flushes", "full flushes"),
    Metric("ipis", "IPIs (flush deliveries)"),
    Metric("ipis_elided", "IPIs that found nothing"),
    Metric("broadcasts", "hardware broadcasts (no IPIs)"),
    Metric("pages_freed", "pages freed"),
    Metric("tables_freed", "page tables freed"),
    Metric("faults", "faults"),
    Metric("faults_per_s", "fault rate", "faults/s"),
    Metric("segv", "accesses outside every mapping"),
    Metric("tlb_hit_rate", "TLB hit rate", percent=True),
    Metric("contended_locks", "contended lock acquisitions"),
    # Scenario results.
    Metric("madvise_per_s", "madvise rate", "calls/s"),
    Metric("faulting_faults_per_s", "faulters' fault rate", "faults/s"),
    Metric("pte_tables_allocated", "PTE tables allocated"),
    Metric("tlb_entries_flushed", "TLB entries the forks flushed"),
    Metric("unshares", "unshares (shared tables copied)"),
    Metric("tables_dropped", "shared tables dropped whole"),
    Metric("aborted_writes", "writes refused (lock order)"),
    Metric("lock_order_violations", "lock-order inversions refused"),
    Metric("reports_lost", "access reports lost (unjudged: a CPU died)"),
    Metric("reclaimed_pages", "pages reclaimed"),
    Metric("reclaim_ipis_per_page", "reclaim IPIs per reclaimed page"),
    Metric("reclaim_flushes_per_page", "reclaim flushes per reclaimed page"),
    Metric("reclaim_shootdowns", "reclaim flushes"),
    Metric("reclaim_ipis", "reclaim IPIs"),
    Metric("swap_outs", "PTEs swapped out"),
    Metric("swap_ins", "pages swapped in"),
    Metric("swap_reads", "pages read from swap"),
    # Safety: always shown.
    Metric("stale_accesses", "stale accesses", safety=True),
    Metric("audit_violations", "audit violations", safety=True),
    Metric("frames_freed_without_ack", "frames freed before the flush", safety=True),
    Metric("deadline_misses", "deadline misses (fences)", safety=True),
    # Modelled hardware time (the run's cost model).
    # Modelled work: event counts times the cost model's prices, summed (no parallelism,
    # no contention: not elapsed time; --timing virtual gives that).
    Metric("modelled.total_us", "modelled work", "µs"),
    Metric("modelled.ns_per_round", "modelled work per round", "ns"),
    Metric("modelled.access_ns", "modelled work per access", "ns"),
    Metric("modelled.flush_ns_per_shootdown", "modelled work per shootdown", "ns"),
    Metric("modelled.syscall_ns.munmap", "modelled work per munmap", "ns"),
    Metric("modelled.syscall_ns.madvise_dontneed", "modelled work per madvise", "ns"),
    Metric("modelled.syscall_ns.mprotect", "modelled work per mprotect", "ns"),
]

# --timing virtual: results.virtual (loadgen/runner.py), in virtual (modelled hardware)
# time. Rates are per virtual second. These come first in a virtual run's tables.
VIRTUAL_LATENCIES = {
    "virtual.latency_ns.fault": "fault",
    "virtual.latency_ns.munmap": "munmap",
    "virtual.latency_ns.madvise_dontneed": "madvise",
    "virtual.latency_ns.mprotect": "mprotect",
    "virtual.latency_ns.fork": "fork",
    "virtual.latency_ns.exit": "exit",
    "virtual.latency_ns.access_batch": "access batch",
    "virtual.lock_wait_ns": "lock wait",
    "virtual.shootdown_ns": "shootdown",
}
_VIRTUAL_SCALARS = [
    Metric("virtual.faulting_faults_per_s", "faulters' fault rate", "faults/s"),
    Metric("virtual.madvise_per_s", "madvise rate", "calls/s"),
    Metric("virtual.ops_per_s", "throughput", "ops/s"),
    Metric("virtual.faults_per_s", "fault rate", "faults/s"),
    Metric("virtual.makespan_ns", "makespan (the last CPU's clock)", "ns"),
    Metric("virtual.ipi_handler_ns", "IPI handlers (the victims' time)", "ns"),
    Metric("virtual.interrupts", "interrupts taken"),
    Metric("virtual.late_flush_hits", "accesses after their flush's arrival (quantum error)"),
    Metric("virtual.lock_inversions", "lock grants out of request order"),
]
VIRTUAL_KEYS = [m.path for m in _VIRTUAL_SCALARS[:5]] + list(VIRTUAL_LATENCIES) + [
    m.path for m in _VIRTUAL_SCALARS[5:]]

CATALOGUE: dict[str, Metric] = {m.path: m for m in _SCALARS + _VIRTUAL_SCALARS}
for _key, _label in LATENCIES.items():
    for _q in ("p50", "p99"):
        CATALOGUE[f"{_key}.{_q}"] = Metric(f"{_key}.{_q}", f"{_label} {_q}", "ms")
for _key, _label in VIRTUAL_LATENCIES.items():
    for _q in ("p50", "p99"):
        CATALOGUE[f"{_key}.{_q}"] = Metric(f"{_key}.{_q}", f"{_label} {_q}", "ns")


def metric(path: str, label: str | None = None) -> Metric:
    """The catalogue's metric for a path (a path it does not know is shown as itself)."""
    m = CATALOGUE.get(path) or Metric(path, path.replace("_", " ").replace(".", " "))
    return dataclasses.replace(m, label=label) if label else m


# What `load compare` reports for every scenario, after the scenario's headline.
COMPARED = [
    "ops_per_s", "duration_s", "shootdowns", "ipis", "ipis_elided", "broadcasts", "full_flushes",
    "pages_freed", "faults", "faults_per_s", "tlb_hit_rate",
    "munmap_latency_ms", "fault_latency_ms", "lock_wait_ms", "contended_locks",
    "shootdown_latency_ms",
    "stale_accesses", "audit_violations", "frames_freed_without_ack", "deadline_misses",
    "modelled.total_us", "modelled.ns_per_round", "modelled.access_ns",
    "modelled.flush_ns_per_shootdown", "modelled.syscall_ns.munmap",
    "modelled.syscall_ns.madvise_dontneed", "modelled.syscall_ns.mprotect",
]


def expand(keys, labels: dict[str, str] | None = None) -> list[Metric]:
    """Result keys as metrics: a latency key becomes its p50 and p99."""
    labels = labels or {}
    out = []
    for key in keys:
        if key in LATENCIES or key in VIRTUAL_LATENCIES:
            name = labels.get(key, LATENCIES.get(key) or VIRTUAL_LATENCIES[key])
            out += [metric(f"{key}.{q}", f"{name} {q}") for q in ("p50", "p99")]
        else:
            out.append(metric(key, labels.get(key)))
    return out
