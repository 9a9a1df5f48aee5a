"""Modelled hardware time of a run (issue 9): the machine's event counts, read from every
service, priced by the run's cost model (services/common/costmodel.py), and attributed
to operations so a report shows it next to wall time."""
from __future__ import annotations

from collections.abc import Set

import grpc

from loadgen.cluster import Cluster
from services.common.costmodel import (CostModel, Events, delivery_events, memory_events,
                                       tlb_events)
from tlbsim.v1 import coordinator_pb2, cpu_pb2, memory_pb2

FLUSH_COMPONENTS = ("invalidate", "ipi")  # what a shootdown costs (refills are walks)


async def machine_events(cluster: Cluster, lost: Set[int] = frozenset(),
                         mem: memory_pb2.MemoryStats | None = None,
                         coord: coordinator_pb2.CoordinatorStats | None = None) -> Events:
    """Every service's counts since the run's reset, as cost-model events (the mapping of
    services/common/costmodel.py, which the services' metrics use too): the CPUs' TLB
    counters, the coordinator's deliveries, the memory service's shootdowns, faults and
    locks."""
    mem = mem or await cluster.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=30)
    coord = coord or await cluster.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest(),
                                                     timeout=30)
    e = delivery_events(coord.ipis) + memory_events(
        mem.faults, mem.shootdowns, mem.full_flushes, mem.range_pages, mem.lock_acquisitions,
        mem.broadcasts, mem.broadcast_full, mem.broadcast_pages)
    for cpu in cluster.cpus:
        if cpu.id in lost:
            continue
        try:
            dump = await cpu.stub.DumpTlb(cpu_pb2.DumpTlbRequest(), timeout=10)
        except grpc.aio.AioRpcError:
            continue  # a CPU that left the run: its counts are lost with it
        e += tlb_events(dump.counters)
    return e


def _us(ns: float) -> float:
    return round(ns / 1e3, 3)


def modelled_results(model: CostModel, events: Events, rounds: int, ops: int,
                     syscalls: dict[str, int],
                     syscall_shootdowns: dict[str, int], from_warm: bool = False) -> dict:
    """`results.modelled`: the total and its components, per round, per access, per
    shootdown, and per call of each kind of system call (the shootdowns it issued,
    priced as the flushes and IPIs of the run on average)."""
    parts = model.breakdown(events)
    total = sum(parts.values())
    flush = sum(parts[c] for c in FLUSH_COMPONENTS)
    per_shootdown = flush / events.shootdowns if events.shootdowns else 0.0
    lookups = events.hits + events.misses  # the accesses priced (after any warm-up)
    return {
        "cost_model": model.as_dict(),
        "from_warm": from_warm,  # true: only what followed the scenario's warm-up
        "total_us": _us(total),
        "components_us": {k: _us(v) for k, v in parts.items()},
        "ns_per_round": round(total / rounds, 1) if rounds else 0.0,
        "ns_per_op": round(total / ops, 1) if ops else 0.0,
        "access_ns": round((parts["walk"] + parts["fault"]) / lookups, 2) if lookups else 0.0,
        "flush_ns_per_shootdown": round(per_shootdown, 1),
        "syscall_ns": {kind: round(per_shootdown * syscall_shootdowns.get(kind, 0) / n, 1)
                       for kind, n in sorted(syscalls.items()) if n},
        "events": vars(events).copy(),
    }
