"""`tlbsim demo`: a local cluster, four built-in comparisons, nothing left running."""
from __future__ import annotations

import asyncio
import dataclasses

from loadgen import output
from loadgen.cluster import Cluster
from loadgen.runner import run
from loadgen.scenarios import HEADLINES, RunConfig
from services.common.policy import FlushMode, ForkMode, LockMode, Policy, SharedFlush, Timing

# Each comparison shows its scenario's headline, then the oracle's verdict.
SAFETY = ["stale_accesses", "audit_violations"]
MUNMAP_ROWS = HEADLINES["munmap"] + ["full_flushes"] + SAFETY
LOCK_ROWS = HEADLINES["fault-scaling"] + SAFETY
FORK_ROWS = HEADLINES["fork"] + SAFETY
SWAPOUT_ROWS = HEADLINES["swapout"] + SAFETY


# What each question's answer is in virtual time (loadgen/metrics.py VIRTUAL_KEYS).
VIRTUAL_ROWS = {
    "munmap": ["virtual.latency_ns.munmap", "virtual.shootdown_ns", "virtual.ipi_handler_ns"],
    "fault-scaling": ["virtual.faulting_faults_per_s", "virtual.latency_ns.fault",
                      "virtual.lock_wait_ns"],
    "fork": ["virtual.latency_ns.fork", "virtual.latency_ns.exit"],
    "swapout": ["virtual.makespan_ns", "virtual.interrupts", "virtual.ipi_handler_ns"],
}


def comparisons(cpus: int, rounds: int) -> list[tuple[str, list[tuple[str, RunConfig]], list]]:
    base = Policy()
    return [
        (f"munmap of 512 pages on {cpus} CPUs: one shootdown per page vs mmu_gather",
         [("A: per-page", RunConfig("munmap", dataclasses.replace(base, flush=FlushMode.PER_PAGE),
                                    cpus=cpus, pages=512, rounds=rounds)),
          ("B: gather", RunConfig("munmap", base, cpus=cpus, pages=512, rounds=rounds))],
         MUNMAP_ROWS),
        (f"faults on {cpus - max(1, cpus // 2)} CPUs while {max(1, cpus // 2)} madvise: "
         "page_table_lock vs split PTE locks",
         [("A: lock=mm", RunConfig("fault-scaling", dataclasses.replace(base, lock=LockMode.MM),
                                   cpus=cpus, pages=512, rounds=rounds)),
          ("B: lock=split", RunConfig("fault-scaling", base, cpus=cpus, pages=512,
                                      rounds=rounds))],
         LOCK_ROWS),
        ("fork of a process with 8192 resident pages, 3 children: copy PTEs vs share tables",
         [(f"{ab}: fork={mode}", RunConfig("fork", dataclasses.replace(base, fork=mode),
                                          cpus=cpus, rounds=1, resident=8192, children=3))
          for ab, mode in (("A", ForkMode.COPY), ("B", ForkMode.SHARE))],
         FORK_ROWS),
    ] + ([] if cpus < 4 else [
        ("reclaim through shared tables: flush every CPU vs the sharers' CPUs",
         [(f"{ab}: {flush}", RunConfig("swapout", dataclasses.replace(
             base, fork=ForkMode.SHARE, frames=2048, shared_flush=flush), cpus=cpus, pages=512,
             rounds=rounds, resident=1536, children=1))
          for ab, flush in (("A", SharedFlush.ALL_CPUS), ("B", SharedFlush.SHARER_UNION))],
         SWAPOUT_ROWS)])


def demo(cpus: int, rounds: int, json_path: str | None) -> int:
    from services.launcher import LocalCluster

    with LocalCluster() as cluster:  # stops every process, also on Ctrl-C
        info = cluster.start(cpus)
        output.console.print(f"local cluster: coordinator {info.coordinator}, memory "
                             f"{info.memory}, {cpus} CPUs")
        return asyncio.run(_compare(info.coordinator, cpus, rounds, json_path))


async def _compare(coordinator: str, cpus: int, rounds: int, json_path: str | None) -> int:
    everything, unsafe = [], False
    async with Cluster(coordinator) as cluster:
        for title, configs, rows in comparisons(cpus, rounds):
            reports, virtual = [], []
            for label, cfg in configs:
                # Each configuration twice: in virtual time (the answer) and wall clock.
                vcfg = dataclasses.replace(cfg, policy=dataclasses.replace(
                    cfg.policy, timing=Timing.VIRTUAL))
                with output.progress(cfg.rounds, f"{label} (virtual time)") as advance:
                    virtual.append(await run(cluster, vcfg, advance))
                with output.progress(cfg.rounds, f"{label} (wall clock)") as advance:
                    reports.append(await run(cluster, cfg, advance))
            scenario = configs[0][1].scenario
            output.print_comparison(title, [label for label, _ in configs], reports, rows,
                                    virtual, VIRTUAL_ROWS[scenario])
            everything.extend(virtual + reports)
            unsafe |= any(output.verdict(r) for r in virtual + reports)
    output.write_json({"reports": everything}, json_path)
    return 1 if unsafe else 0
