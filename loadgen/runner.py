"""Run one scenario against a cluster and turn what every service counted into
the JSON report (the format is documented in the README and stable)."""
from __future__ import annotations

import asyncio
import time

from loadgen.cluster import Cluster
from loadgen.scenarios import SCENARIOS, Driver, Measurements, Progress, RunConfig
from services.common.stats import p50_p99
from tlbsim.v1 import coordinator_pb2, memory_pb2

REPORT_VERSION = 1


def _ms(samples: list[float]) -> dict:
    p50, p99, _ = p50_p99(samples)
    return {"p50": round(p50 * 1e3, 4), "p99": round(p99 * 1e3, 4)}


def _ms_from(p) -> dict:
    return {"p50": round(p.p50 * 1e3, 4), "p99": round(p.p99 * 1e3, 4)}


async def run(cluster: Cluster, cfg: RunConfig, progress: Progress = lambda n: None) -> dict:
    """Reset the cluster under the run's policy, drive the scenario, audit, report."""
    scenario = SCENARIOS[cfg.scenario]
    epoch = await cluster.reset(cfg.policy, cfg.cpus)
    m = Measurements()
    t0 = time.perf_counter()
    interrupted = False
    try:
        await scenario(Driver(cluster, m), cfg, progress)
    except (asyncio.CancelledError, KeyboardInterrupt):
        interrupted = True  # still report what was measured
    duration = time.perf_counter() - t0
    return await collect(cluster, cfg, m, duration, epoch, interrupted)


async def collect(cluster: Cluster, cfg: RunConfig, m: Measurements, duration: float,
                  epoch: int, interrupted: bool = False) -> dict:
    mem = await cluster.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=30)
    coord = await cluster.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest(), timeout=30)
    await Driver(cluster, m).audit()  # the final audit; a CPU that died since is skipped
    results = {
        "ops": m.ops,
        "duration_s": round(duration, 4),
        "rounds": m.rounds_done,
        "shootdowns": mem.shootdowns,
        "ipis": coord.ipis,
        "ipis_elided": coord.ipis_elided,
        "pages_freed": mem.pages_freed,
        "tables_freed": mem.tables_freed,
        "full_flushes": mem.full_flushes,
        "stale_accesses": mem.stale_accesses,
        "audit_violations": len(m.violations),
        "audit_entries_checked": m.audited_entries,
        "fenced_cpus": sorted(set(coord.fenced_cpus) | m.lost_cpus),
        "deadline_misses": coord.deadline_misses,
        "faults": m.faults,
        "faults_per_s": round(m.faults / duration, 1) if duration else 0.0,
        "segv": m.segv,
        "munmap_latency_ms": _ms(m.munmap_latency_s),
        "fault_latency_ms": _ms(m.fault_latency_s),
        "lock_wait_ms": _ms_from(mem.lock_wait_s),
        "contended_locks": mem.contended_acquisitions,
        "shootdown_latency_ms": _ms_from(coord.latency_s),
        "tlb_hit_rate": round(m.hits / m.accesses, 4) if m.accesses else 0.0,
    }
    return {"version": REPORT_VERSION, "scenario": cfg.scenario, "config": cfg.as_dict(),
            "epoch": epoch, "interrupted": interrupted, "results": results,
            "violations": m.violations[:20]}


def failed(report: dict) -> bool:
    """The oracle's verdict: any stale access or audit violation fails the run."""
    r = report["results"]
    return r["stale_accesses"] > 0 or r["audit_violations"] > 0
