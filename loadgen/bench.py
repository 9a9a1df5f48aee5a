"""`tlbsim bench`: each measurement next to its floor, from one run.

- Shootdown latency to 1, 2, 4 and 8 target CPUs per transport, measured inside the
  coordinator, interleaved round by round with a bare ping fan-out to the same
  CPUs over the same transport (the floor: what delivery alone costs). mqtt rows
  need a cluster with a broker (`tlbsim up --mqtt`; the bench's own cluster has one
  when mosquitto is installed) and are skipped, with a note, otherwise.
- munmap of 512 pages, one shootdown per page vs gathered (the quiet LATR variant).
These machines are shared and noisy: compare the ratios, not the absolute numbers.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from loadgen import output
from loadgen.cluster import Cluster
from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common.policy import TRANSPORTS, Policy
from services.common.stats import p50_p99
from tlbsim.v1 import common_pb2, coordinator_pb2, cpu_pb2, memory_pb2

TARGETS = (1, 2, 4, 8)
BENCH_CPUS = 1 + max(TARGETS)  # the initiator plus the largest target set


async def shootdown_vs_floor(cluster: Cluster, transport: str, targets: int,
                             rounds: int) -> dict:
    """Interleave one single-page munmap (one shootdown) with one ping fan-out."""
    policy = Policy(transport=transport)
    await cluster.reset(policy, BENCH_CPUS)
    cpus = cluster.cpus[:targets + 1]
    mm = (await cluster.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
    for c in cpus:
        await c.stub.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
    initiator = cpus[0].stub
    anchor = (await initiator.Syscall(common_pb2.SyscallRequest(
        mmap=common_pb2.MmapArgs(pages=512, writable=True)))).address
    ping = coordinator_pb2.PingFanoutRequest(targets=[c.id for c in cpus[1:]],
                                             transport=TRANSPORTS[transport], rounds=1)
    floor: list[float] = []
    for i in range(rounds):
        address = anchor + (i % 511 + 1) * 4096  # page 0 keeps the table alive
        for j, c in enumerate(cpus):
            await c.stub.Access(cpu_pb2.AccessRequest(addresses=[address],
                                                      writes=b"\x01" if j == 0 else b""))
        await initiator.Syscall(common_pb2.SyscallRequest(
            madvise_dontneed=common_pb2.RangeArgs(address=address, pages=1)))
        floor.extend((await cluster.coordinator.PingFanout(ping)).latency_s)
    stats = await cluster.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest())
    f50, f99, _ = p50_p99(floor)
    return {"transport": transport, "targets": targets, "rounds": rounds,
            "shootdown_ms": {"p50": stats.latency_s.p50 * 1e3, "p99": stats.latency_s.p99 * 1e3},
            "floor_ms": {"p50": f50 * 1e3, "p99": f99 * 1e3},
            "ratio_p50": stats.latency_s.p50 / f50 if f50 else 0.0}


async def _has_broker(cluster: Cluster) -> bool:
    """Does the coordinator have an MQTT broker that reaches the CPUs?"""
    try:
        await cluster.coordinator.PingFanout(coordinator_pb2.PingFanoutRequest(
            targets=[c.id for c in cluster.cpus], transport=TRANSPORTS["mqtt"], rounds=1))
        return True
    except grpc.aio.AioRpcError:
        return False


async def munmap_per_page_vs_gather(cluster: Cluster, rounds: int) -> dict:
    out = {}
    for flush in ("per-page", "gather"):
        cfg = RunConfig("munmap", Policy(flush=flush), cpus=4, pages=512, rounds=rounds,
                        readers=False)
        out[flush] = (await run(cluster, cfg))["results"]
    a, b = (out[f]["munmap_latency_ms"]["p50"] for f in ("per-page", "gather"))
    return {"per_page": out["per-page"], "gather": out["gather"],
            "speedup_p50": a / b if b else 0.0}


async def fork_share_vs_copy(cluster: Cluster, resident: int = 65536,
                             children: int = 10) -> dict:
    """On-Demand-Fork's measurement: fork a large process, copying its PTEs vs sharing
    its PTE tables (memory-side fork latency; the same cluster, one after the other)."""
    out = {}
    for mode in ("copy", "share"):
        cfg = RunConfig("fork", Policy(fork=mode, deadline_s=10.0), cpus=4, rounds=1,
                        resident=resident, children=children)
        out[mode] = (await run(cluster, cfg))["results"]
    a, b = (out[m]["fork_latency_ms"]["p50"] for m in ("copy", "share"))
    return {"resident": resident, "children": children, "copy": out["copy"],
            "share": out["share"], "speedup_p50": a / b if b else 0.0}


async def bench(coordinator: str, rounds: int, munmap_rounds: int) -> dict:
    t0 = time.perf_counter()
    async with Cluster(coordinator) as cluster:
        await cluster.discover(BENCH_CPUS, wait_s=30)
        shootdowns, skipped = [], []
        for transport in TRANSPORTS:
            if transport == "mqtt" and not await _has_broker(cluster):
                skipped.append(transport)
                continue
            for targets in TARGETS:
                shootdowns.append(await shootdown_vs_floor(cluster, transport, targets, rounds))
        munmap = await munmap_per_page_vs_gather(cluster, munmap_rounds)
        fork = await fork_share_vs_copy(cluster)
    return {"shootdown": shootdowns, "skipped_transports": skipped, "munmap_512": munmap,
            "fork": fork,
            "elapsed_s": round(time.perf_counter() - t0, 2)}


def print_bench(result: dict) -> None:
    from rich.table import Table
    t = Table(title="shootdown latency vs bare fan-out floor (coordinator-side, ms)")
    for col in ("transport", "targets", "shootdown p50 / p99", "floor p50 / p99", "p50 ratio"):
        t.add_column(col, justify="right")
    for r in result["shootdown"]:
        t.add_row(r["transport"], str(r["targets"]),
                  f"{r['shootdown_ms']['p50']:.3f} / {r['shootdown_ms']['p99']:.3f}",
                  f"{r['floor_ms']['p50']:.3f} / {r['floor_ms']['p99']:.3f}",
                  f"{r['ratio_p50']:.2f}x")
    output.console.print(t)
    for transport in result.get("skipped_transports", []):
        output.console.print(f"{transport}: skipped (no MQTT broker: `tlbsim up --mqtt`, or "
                             "install mosquitto for the bench's own cluster)")
    m = result["munmap_512"]
    t = Table(title="munmap of 512 pages on 4 CPUs: per-page vs gathered")
    for col in ("flush", "shootdowns", "IPIs", "munmap p50 / p99 (ms)"):
        t.add_column(col, justify="right")
    for flush, key in (("per-page", "per_page"), ("gather", "gather")):
        r = m[key]
        t.add_row(flush, str(r["shootdowns"]), str(r["ipis"]),
                  f"{r['munmap_latency_ms']['p50']:.3f} / {r['munmap_latency_ms']['p99']:.3f}")
    output.console.print(t)
    output.console.print(f"gathered munmap is {m['speedup_p50']:.1f}x faster (p50)")
    f = result["fork"]
    t = Table(title=f"fork of a process with {f['resident']} resident pages, "
                    f"{f['children']} children: copy vs share")
    for col in ("fork", "fork p50 / p99 (ms)", "PTE tables allocated"):
        t.add_column(col, justify="right")
    for mode in ("copy", "share"):
        r = f[mode]
        t.add_row(mode, f"{r['fork_latency_ms']['p50']:.3f} / {r['fork_latency_ms']['p99']:.3f}",
                  str(r["pte_tables_allocated"]))
    output.console.print(t)
    output.console.print(f"sharing page tables forks {f['speedup_p50']:.1f}x faster (p50); "
                         f"elapsed {result['elapsed_s']} s")


def main(cluster_address: str | None, rounds: int, munmap_rounds: int,
         json_path: str | None) -> int:
    from services.launcher import LocalCluster, mosquitto_binary

    if cluster_address is not None:
        result = asyncio.run(bench(cluster_address, rounds, munmap_rounds))
    else:
        with LocalCluster() as local:  # stops every process, also on Ctrl-C
            address = local.start(BENCH_CPUS, mqtt=mosquitto_binary() is not None).coordinator
            result = asyncio.run(bench(address, rounds, munmap_rounds))
    print_bench(result)
    output.write_json(result, json_path)
    return 0

