"""Run one scenario against a cluster and turn what every service counted into
the JSON report (the format is documented in the README and stable)."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import time

from loadgen.cluster import Cluster
from loadgen.modelled import machine_events, modelled_results
from loadgen.scenarios import SCENARIOS, Driver, Measurements, Progress, RunConfig
from loadgen.vsched import VirtualScheduler
from services.common.stats import p50_p99
from tlbsim.v1 import coordinator_pb2, memory_pb2

REPORT_VERSION = 1


def _ms(samples: list[float]) -> dict:
    p50, p99, _ = p50_p99(samples)
    return {"p50": round(p50 * 1e3, 4), "p99": round(p99 * 1e3, 4)}


def _samples_ms(samples: list[float], keep: int = 2000) -> list[float]:
    """Sorted samples for latency CDFs (plots), thinned evenly to at most `keep`."""
    ordered = sorted(samples)
    step = max(1, -(-len(ordered) // keep))
    return [round(x * 1e3, 4) for x in ordered[::step]]


def _ms_from(p) -> dict:
    return {"p50": round(p.p50 * 1e3, 4), "p99": round(p.p99 * 1e3, 4)}


async def run(cluster: Cluster, cfg: RunConfig, progress: Progress = lambda n: None) -> dict:
    """Reset the cluster under the run's policy, drive the scenario, audit, report."""
    scenario = SCENARIOS[cfg.scenario]
    virtual = VirtualScheduler(cfg.quantum_ns) if cfg.policy.virtual else None
    epoch = await cluster.reset(cfg.policy, cfg.cpus)
    m = Measurements()
    d = Driver(cluster, m, virtual)
    t0 = time.perf_counter()
    interrupted = False
    task = asyncio.ensure_future(scenario(d, cfg, progress))
    with _ctrl_c(d, task):
        try:
            await task
        except (asyncio.CancelledError, KeyboardInterrupt):
            interrupted = True  # still report what was measured
    interrupted |= d.stopping
    duration = time.perf_counter() - t0
    return await collect(cluster, cfg, m, duration, epoch, interrupted, virtual)


@contextlib.contextmanager
def on_sigint(handler):
    """Run `handler` on Ctrl-C while in the block (the event loop's own handler), then
    restore the previous one. Off the main thread, where signals cannot be handled,
    nothing changes."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, previous)


def _ctrl_c(d: Driver, task: asyncio.Future):
    """The first Ctrl-C asks the scenario to stop after the calls in flight (cancelling a
    system call half-way would leave the cluster mid-operation and the audit would see
    it); the second cancels it at once."""
    def stop() -> None:
        if d.stopping:
            task.cancel()
        d.stopping = True
    return on_sigint(stop)


async def collect(cluster: Cluster, cfg: RunConfig, m: Measurements, duration: float,
                  epoch: int, interrupted: bool = False,
                  virtual: VirtualScheduler | None = None) -> dict:
    mem = await cluster.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=30)
    coord = await cluster.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest(), timeout=30)
    events = await machine_events(cluster, m.lost_cpus, mem, coord)
    if m.modelled_from is not None:
        events = events - m.modelled_from
    audit = Driver(cluster, m)
    await audit.audit()  # the final audit; a CPU that died since is skipped
    unmaps = m.munmap_latency_s or (m.syscall_latency_s.get("munmap", [])
                                    + m.syscall_latency_s.get("madvise_dontneed", []))
    results = {
        "ops": m.ops,
        "duration_s": round(duration, 4),
        "rounds": m.rounds_done,
        "shootdowns": mem.shootdowns,
        "ipis": coord.ipis,
        "ipis_elided": coord.ipis_elided,
        "broadcasts": coord.broadcasts,
        "pages_freed": mem.pages_freed,
        "tables_freed": mem.tables_freed,
        "full_flushes": mem.full_flushes,
        "stale_accesses": mem.stale_accesses,
        "frames_freed_without_ack": mem.frames_freed_without_ack,
        "audit_violations": len(m.violations),
        "audit_entries_checked": m.audited_entries,
        "fenced_cpus": sorted(set(coord.fenced_cpus) | m.lost_cpus),
        "deadline_misses": coord.deadline_misses,
        "fenced_waits": m.fenced_waits,
        "faults": m.faults,
        "faults_per_s": round(m.faults / duration, 1) if duration else 0.0,
        "segv": m.segv,
        "munmap_latency_ms": _ms(unmaps),
        "fault_latency_ms": _ms(m.fault_latency_s),
        "lock_wait_ms": _ms_from(mem.lock_wait_s),
        "contended_locks": mem.contended_acquisitions,
        "shootdown_latency_ms": _ms_from(coord.latency_s),
        "tlb_hit_rate": round(m.hits / m.accesses, 4) if m.accesses else 0.0,
        # Page-table sharing and reclaim.
        "fork_latency_ms": _ms_from(mem.fork_latency_s),
        "pte_tables_allocated": mem.tables_allocated.get(1, 0),
        "tables_allocated": {str(k): v for k, v in sorted(mem.tables_allocated.items())},
        "unshares": mem.unshares,
        "tables_dropped": mem.tables_dropped,
        "reclaimed_pages": mem.reclaimed_pages,
        "swap_outs": mem.swap_outs,
        "swap_ins": mem.swap_ins,
        "swap_reads": mem.swap_reads,
        "reclaim_shootdowns": mem.reclaim_shootdowns,
        "reclaim_ipis": mem.reclaim_ipis,
        "lock_order_violations": mem.lock_order_violations,
        # Access reports promised and never sent (a CPU died first): accesses unjudged.
        "reports_lost": mem.reports_lost,
        "lock_order_reports": list(mem.lock_order_reports),
        "ops_per_s": round(m.ops / duration, 1) if duration else 0.0,
        "syscalls": dict(sorted(m.syscalls.items())),
        "syscall_latency_ms": {k: _ms(v) for k, v in sorted(m.syscall_latency_s.items())},
        # Modelled hardware time (the run's cost model), next to the wall times above.
        "modelled": modelled_results(cfg.policy.cost_model, events, m.rounds_done, m.ops,
                                     m.syscalls, m.syscall_shootdowns,
                                     from_warm=m.modelled_from is not None),
        **m.extra,
    }
    if virtual is not None:
        results["virtual"] = virtual_results(virtual, m, mem, audit.dumps)
        # A fence (a wall-clock deadline or lease missed on a starved host) changes what
        # ran: the virtual figures are then not the configuration's alone.
        results["virtual"]["perturbed"] = bool(coord.deadline_misses or m.fenced_waits
                                               or results["fenced_cpus"])
    return {"version": REPORT_VERSION, "scenario": cfg.scenario, "config": cfg.as_dict(),
            "epoch": epoch, "interrupted": interrupted, "results": results,
            "violations": m.violations[:20],
            "samples": {"munmap_latency_ms": _samples_ms(unmaps),
                        "fault_latency_ms": _samples_ms(m.fault_latency_s)}}


def _ns(samples) -> dict:
    p50, p99, _ = p50_p99(samples)
    return {"p50": round(p50), "p99": round(p99)}


def virtual_results(vs: VirtualScheduler, m: Measurements, mem, dumps) -> dict:
    """results.virtual: the run's answers in virtual (modelled hardware) time. Rates are
    per virtual second of the makespan (the last CPU's clock)."""
    makespan = vs.makespan_ns
    cpus = {d.cpu: d.virtual for d in dumps}
    per_s = (lambda n: round(n * 1e9 / makespan, 1)) if makespan else (lambda n: 0.0)
    return {
        "makespan_ns": makespan,
        "ops_per_s": per_s(m.ops),
        "faults_per_s": per_s(m.faults),
        "latency_ns": {kind: _ns(v) for kind, v in sorted(m.vlatency_ns.items()) if v},
        "lock_wait_ns": {"p50": round(mem.lock_wait_vtime_ns.p50),
                         "p99": round(mem.lock_wait_vtime_ns.p99)},
        "shootdown_ns": {"p50": round(mem.shootdown_vtime_ns.p50),
                         "p99": round(mem.shootdown_vtime_ns.p99)},
        "ipi_handler_ns": sum(v.handler_ns for v in cpus.values()),
        "interrupts": sum(v.interrupts for v in cpus.values()),
        "cpu_busy_ns": {str(c): v.busy_ns for c, v in sorted(cpus.items())},
        "late_flush_hits": sum(v.late_flush_hits for v in cpus.values()),
        "lock_inversions": mem.lock_inversions,
        "quantum_ns": vs.quantum_ns,
        **m.vextra,
    }


def failed(report: dict) -> bool:
    """The oracle's verdict: any stale access or audit violation fails the run."""
    r = report["results"]
    return r["stale_accesses"] > 0 or r["audit_violations"] > 0
