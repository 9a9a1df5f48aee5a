"""`tlbsim bench`: each measurement next to its floor, from one run.

- Shootdown latency to 1, 2, 4 and 8 target CPUs per transport, measured inside the
  coordinator, interleaved round by round with a bare ping fan-out to the same
  CPUs over the same transport (the floor: what delivery alone costs). mqtt rows
  need a cluster with a broker (`tlbsim up --mqtt`; the bench's own cluster has one
  when mosquitto is installed) and are skipped, with a note, otherwise.
- munmap of 512 pages, one shootdown per page vs gathered (the quiet LATR variant).
- A recorded trace (`/bin/ls` with --accesses) replayed on 4 CPUs vs the same replay
  in this process (services/machine.py: no RPC).
- TLB-hit accesses per second in one CPU service vs its TLB alone in this process;
  faults per second at the memory service vs the same call on present pages; faults
  through a CPU service (an Access of 64 fresh pages) vs the domain in this process and
  vs one gRPC call moving as many items; the
  memory service's RSS per resident page at 100k and 1M pages (`--quick`: 100k only).
- Several CPUs per process and scale: 16 CPUs one process each (the floor) and eight to a
  process, and 256 CPUs as `tlbsim up` hosts them: ready time, cluster RSS, a munmap
  shootdown to every other CPU (fresh clusters of their own, so not with --cluster).
These machines are shared and noisy: compare the ratios, not the absolute numbers.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any, cast

import grpc

from loadgen import costbench, output
from loadgen.cluster import Cluster, Cpu
from loadgen.runner import run
from loadgen.scenarios import RunConfig
from loadgen.trace.fmt import read_trace
from loadgen.trace.replay import Replayer
from loadgen.vsched import VirtualScheduler
from services.common import wire
from services.common.addresses import pack_addresses, user_addresses
from services.common.policy import FlushMode, ForkMode, Policy, Transport
from services.common.stats import p50_p99
from services.cpu.core import CpuCore
from services.cpu.tlb import Entry
from services.machine import Machine, make_machine
from services.memory.service import syscall as memory_syscall
from tlbsim.v1 import common_pb2, coordinator_pb2, cpu_pb2, memory_pb2

TARGETS = (1, 2, 4, 8)
BENCH_CPUS = 1 + max(TARGETS)  # the initiator plus the largest target set
HIT_PAGES, HIT_REPEATS = 1024, 100  # 102,400 reads per request, all TLB hits
RSS_PAGES = (100_000, 1_000_000)
# Several CPUs per process, and scale: fresh local clusters of (CPUs, CPUs per process;
# None: `tlbsim up`'s default). 16 CPUs one process each is the floor beside the row that
# co-hosts them; 256 is issue 17's scale.
CLUSTER_ROWS: tuple[tuple[int, int | None], ...] = ((16, 1), (16, 8), (256, None))
CLUSTER_PAGES = 64  # the munmap each cluster runs: one shootdown to every other CPU
POPULATE_CHUNK = 100_000  # pages per populating mmap: bounded work per call
# The replay row: `/bin/ls` recorded with --accesses (89,130 page accesses), on 4 CPUs.
BENCH_TRACE = Path(__file__).resolve().parents[1] / "tests/fixtures/traces/ls-accesses.tlbt.gz"
REPLAY_CPUS = 4
REPLAY_ROUNDS = 5


async def _process_on(cluster: Cluster, cpu: int = 0) -> int:
    mm = (await cluster.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
    await cluster.cpus[cpu].stub.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
    return mm


async def tlb_hits_vs_floor(cluster: Cluster, rounds: int) -> dict:
    """TLB-hit accesses per second in one CPU service: `Access` requests of 102,400 reads
    of 1,024 pages its TLB holds, timed at the client, interleaved round by round with
    the floor: the same accesses run by a `CpuCore` in this process (the TLB and the
    run bookkeeping alone: no decoding, no RPC, no report to the oracle)."""
    policy = Policy()
    await cluster.reset(policy, 1)
    cpu = cluster.cpus[0].stub
    await _process_on(cluster)
    base = (await cpu.Syscall(common_pb2.SyscallRequest(
        mmap=common_pb2.MmapArgs(pages=HIT_PAGES, writable=True)))).address
    pages = [base + i * 4096 for i in range(HIT_PAGES)]
    await cpu.Access(cpu_pb2.AccessRequest(addresses=pages))  # fault in, fill the TLB
    addresses = pages * HIT_REPEATS
    request = cpu_pb2.AccessRequest(packed_addresses=pack_addresses(addresses))
    floor_core = CpuCore(0, policy.tlb_entries, policy.tlb_ways)
    floor_core.switch(1, 0)
    for i, address in enumerate(pages):
        floor_core.tlb.fill(1, address >> 12, Entry(i + 1, True, i + 1))
    served, floor = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = await cpu.Access(request)
        served.append(r.hits / (time.perf_counter() - t0))
        if r.hits != len(addresses):
            raise AssertionError(f"{len(addresses) - r.hits} of the accesses missed the TLB")
        t0 = time.perf_counter()
        s = await floor_core.run_accesses(addresses, b"", _no_miss)
        floor_core.take_hits()
        floor.append(s.hits / (time.perf_counter() - t0))
    service, alone = statistics.median(served), statistics.median(floor)
    return {"accesses_per_request": len(addresses), "pages": HIT_PAGES, "rounds": rounds,
            "hits_per_s": service, "floor_hits_per_s": alone,
            "ratio": service / alone if alone else 0.0}


async def _no_miss(vpn: int, write: bool, vt: int | None):
    raise AssertionError(f"the floor's TLB missed page {vpn:#x}")


async def faults_vs_floor(cluster: Cluster, pages: int, rounds: int) -> dict:
    """Faults per second at the memory service: `HandleMiss` on each page of a fresh
    anonymous mapping, one call after another (each a fault: a frame allocated and a
    PTE set), next to the floor: the same calls on the same pages once present (the
    round trip and the walk without the fault)."""
    await cluster.reset(Policy(), 1)
    cpu = cluster.cpus[0]
    mm = await _process_on(cluster)
    memory = cluster.memory
    fault_rates: list[float] = []
    walk_rates: list[float] = []
    for _ in range(rounds):
        base = (await cpu.stub.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=pages, writable=True)))).address
        requests = [memory_pb2.HandleMissRequest(cpu=cpu.id, mm=mm, vpn=(base >> 12) + i,
                                                 write=True) for i in range(pages)]
        for rates, outcome in ((fault_rates, memory_pb2.MISS_OUTCOME_FAULT_ANON),
                               (walk_rates, memory_pb2.MISS_OUTCOME_WALKED)):
            t0 = time.perf_counter()
            for req in requests:
                r = await memory.HandleMiss(req)
                if r.outcome != outcome:
                    raise AssertionError(f"page {req.vpn:#x}: outcome {r.outcome}, "
                                         f"expected {outcome}")
            rates.append(pages / (time.perf_counter() - t0))
    faults, walks = statistics.median(fault_rates), statistics.median(walk_rates)
    return {"pages": pages, "rounds": rounds, "faults_per_s": faults,
            "floor_walks_per_s": walks, "ratio": faults / walks if walks else 0.0}


FRESH_PAGES = 64  # an Access of this many fresh pages: one read-ahead window


async def cpu_faults_vs_floor(cluster: Cluster, rounds: int) -> dict:
    """Faults per second through a CPU service: `Access` writes to FRESH_PAGES fresh
    pages (one CPU), timed at the client, interleaved round by round with two floors:
    the same accesses on the machine in this process (services/machine.py: the domain
    alone, no RPC), and a `Walk` of as many pages in one gRPC call (what moving a batch of that
    size costs), in items per second."""
    policy = Policy()
    await cluster.reset(policy, 1)
    cpu = cluster.cpus[0]
    mm = await _process_on(cluster)
    machine = make_machine(1)
    local_mm = machine.kernel.create_mm()
    await machine.switch(0, local_mm)
    served: list[float] = []
    floor: list[float] = []
    rpc_items: list[float] = []
    writes = b"\x01" * FRESH_PAGES
    for _ in range(rounds):
        base = (await cpu.stub.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=FRESH_PAGES, writable=True)))).address
        request = cpu_pb2.AccessRequest(packed_addresses=pack_addresses(
            base + i * 4096 for i in range(FRESH_PAGES)), writes=writes)
        t0 = time.perf_counter()
        r = await cpu.stub.Access(request)
        served.append(r.faults / (time.perf_counter() - t0))
        if r.faults != FRESH_PAGES:
            raise AssertionError(f"{FRESH_PAGES - r.faults} of the fresh pages did not fault")
        # The Access's report follows its answer (services/memory/promises.py): Stats
        # waits for it, so it is not judged while the floor is timed, slowing the floor.
        await cluster.memory.Stats(memory_pb2.MemoryStatsRequest(), metadata=cluster.meta())
        local = (await machine.syscall(0, "mmap", FRESH_PAGES, True)).address
        addresses = [local + i * 4096 for i in range(FRESH_PAGES)]
        t0 = time.perf_counter()
        s = await machine.access(0, addresses, write=writes)  # and reports what it served
        floor.append(s.faults / (time.perf_counter() - t0))
        if s.faults != FRESH_PAGES:
            raise AssertionError(f"the floor faulted {s.faults} of {FRESH_PAGES} pages")
        walk = memory_pb2.WalkRequest(cpu=cpu.id, mm=mm,
                                      vpns=[(base >> 12) + i for i in range(FRESH_PAGES)])
        t0 = time.perf_counter()
        w = await cluster.memory.Walk(walk)
        rpc_items.append(len(w.ptes) / (time.perf_counter() - t0))
    service, domain = statistics.median(served), statistics.median(floor)
    return {"pages": FRESH_PAGES, "rounds": rounds, "faults_per_s": service,
            "floor_domain_faults_per_s": domain,
            "floor_rpc_items_per_s": statistics.median(rpc_items),
            "ratio": service / domain if domain else 0.0}


async def replay_vs_floor(cluster: Cluster, rounds: int, trace: Path = BENCH_TRACE) -> dict:
    """A recorded trace replayed on REPLAY_CPUS CPUs of the cluster (the report's
    ops/s: accesses and system calls), interleaved round by round with the same replay
    in this process (the replayer, kernel and cores of services/machine.py: no RPC)."""
    header, events = read_trace(str(trace))
    served: list[float] = []
    floor: list[float] = []
    for _ in range(rounds):
        report = await run(cluster, RunConfig("replay", Policy(), cpus=REPLAY_CPUS, rounds=1,
                                              trace=str(trace)))
        r = report["results"]
        if r["stale_accesses"] or r["audit_violations"]:
            raise AssertionError(f"the replay of {trace.name}: {r['stale_accesses']} stale "
                                 f"accesses, {r['audit_violations']} audit violations")
        served.append(r["ops_per_s"])
        local = _InProcess(make_machine(REPLAY_CPUS))
        t0 = time.perf_counter()
        cpus = [Cpu(i, cast(Any, None)) for i in range(REPLAY_CPUS)]  # (no service to call)
        await Replayer(local, cpus, header, events).replay()
        floor.append(local.ops / (time.perf_counter() - t0))
        if local.ops != r["ops"]:
            raise AssertionError(f"the in-process replay did {local.ops} operations, the "
                                 f"cluster's {r['ops']}")
    service, domain = statistics.median(served), statistics.median(floor)
    return {"trace": trace.name, "cpus": REPLAY_CPUS, "rounds": rounds,
            "ops": local.ops, "ops_per_s": service,
            "floor_in_process_ops_per_s": domain,
            "ratio": service / domain if domain else 0.0}


class _InProcess:
    """What the replayer needs of a Driver, on the whole machine in this process: each
    step as the CPU service does it, without the services."""
    virtual: VirtualScheduler | None = None  # wall-clock time
    stopping = False

    def __init__(self, machine: Machine):
        self.machine = machine
        self.ops = 0  # accesses and system calls, as the report counts them

    async def create_mm(self) -> int:
        return self.machine.kernel.create_mm()

    async def run(self, cpu: Cpu, steps: list[cpu_pb2.Step]) -> list[cpu_pb2.StepResult]:
        m, out = self.machine, []
        for step in steps:
            kind = step.WhichOneof("step")
            if kind == "switch_mm":
                await m.switch(cpu.id, step.switch_mm.mm)
                out.append(cpu_pb2.StepResult(switch_mm=cpu_pb2.SwitchMmResponse()))
            elif kind == "access":
                a = step.access
                s = await m.access(cpu.id, user_addresses(a.packed_addresses), write=a.writes)
                self.ops += s.accesses
                out.append(cpu_pb2.StepResult(access=cpu_pb2.AccessResponse(
                    accesses=s.accesses, hits=s.hits, misses=s.misses, faults=s.faults,
                    segv=s.segv)))
            else:
                r = await memory_syscall(m.kernel, cpu.id, m.cpus[cpu.id].loaded_mm,
                                         step.syscall)
                m.returned(cpu.id, step.syscall.WhichOneof("call"), r)
                self.ops += 1
                out.append(cpu_pb2.StepResult(syscall=common_pb2.SyscallResponse(
                    address=r.address, child_mm=r.child_mm)))
        return out


def vm_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for process {pid}")


async def memory_rss_per_page(cluster: Cluster, pid: int, sizes=RSS_PAGES) -> dict:
    """The memory service's RSS per resident page: its VmRSS (from /proc) above the
    freshly reset machine, after one process has populated `sizes` pages in turn.
    Run first: a Python process keeps memory it freed, which would hide the growth."""
    await cluster.reset(Policy(frames=2 * max(sizes)), 1)
    cpu = cluster.cpus[0]
    mm = await _process_on(cluster)
    empty = vm_rss_bytes(pid)
    rows, resident, populating = [], 0, 0.0
    for size in sizes:
        t0 = time.perf_counter()
        while resident < size:
            chunk = min(POPULATE_CHUNK, size - resident)
            await cluster.memory.Syscall(memory_pb2.MemSyscallRequest(
                cpu=cpu.id, mm=mm, call=common_pb2.SyscallRequest(mmap=common_pb2.MmapArgs(
                    pages=chunk, writable=True, populate=True))), timeout=600)
            resident += chunk
        populating += time.perf_counter() - t0
        rss = vm_rss_bytes(pid)
        rows.append({"pages": size, "rss_mib": rss / 2**20,
                     "bytes_per_page": (rss - empty) / size, "populate_s": populating})
    await cluster.reset(Policy(), 1)  # hand the frames back
    return {"empty_rss_mib": empty / 2**20, "rows": rows}


async def shootdown_vs_floor(cluster: Cluster, transport: Transport, targets: int,
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
                                             transport=wire.transport_to_proto(transport),
                                             rounds=1)
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
            targets=[c.id for c in cluster.cpus],
            transport=wire.transport_to_proto(Transport.MQTT), rounds=1))
        return True
    except grpc.aio.AioRpcError:
        return False


async def munmap_per_page_vs_gather(cluster: Cluster, rounds: int) -> dict:
    out: dict[str, dict] = {}
    for flush in FlushMode:  # per-page, then gather
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
    out: dict[str, dict] = {}
    for mode in ForkMode:  # copy, then share
        cfg = RunConfig("fork", Policy(fork=mode, deadline_s=10.0), cpus=4, rounds=1,
                        resident=resident, children=children)
        out[mode] = (await run(cluster, cfg))["results"]
    a, b = (out[m]["fork_latency_ms"]["p50"] for m in ("copy", "share"))
    return {"resident": resident, "children": children, "copy": out["copy"],
            "share": out["share"], "speedup_p50": a / b if b else 0.0}


async def bench(coordinator: str, rounds: int, munmap_rounds: int,
                cost_model: str = "x86", *, memory_pid: int | None = None,
                quick: bool = False) -> dict:
    t0 = time.perf_counter()
    async with Cluster(coordinator) as cluster:
        await cluster.discover(BENCH_CPUS, wait_s=30)
        rss = None  # first: before the other rows leave freed memory in the process
        if memory_pid is not None:
            rss = await memory_rss_per_page(cluster, memory_pid,
                                            RSS_PAGES[:1] if quick else RSS_PAGES)
        hits = await tlb_hits_vs_floor(cluster, rounds=10)
        faults = await faults_vs_floor(cluster, pages=1000, rounds=3)
        cpu_faults = await cpu_faults_vs_floor(cluster, rounds=rounds)
        replay = await replay_vs_floor(cluster, rounds=REPLAY_ROUNDS)
        shootdowns, skipped = [], []
        for transport in Transport:
            if transport is Transport.MQTT and not await _has_broker(cluster):
                skipped.append(transport)
                continue
            for targets in TARGETS:
                shootdowns.append(await shootdown_vs_floor(cluster, transport, targets, rounds))
        munmap = await munmap_per_page_vs_gather(cluster, munmap_rounds)
        fork = await fork_share_vs_copy(cluster)
        flush_ceiling = await costbench.ceiling_sweep(cluster, model=cost_model)  # issue 9
    return {"shootdown": shootdowns, "skipped_transports": skipped, "munmap_512": munmap,
            "fork": fork, "flush_ceiling": flush_ceiling, "tlb_hits": hits, "faults": faults,
            "cpu_faults": cpu_faults, "replay": replay,
            "memory_rss": rss,
            "elapsed_s": round(time.perf_counter() - t0, 2)}


def cluster_sizes(rows=CLUSTER_ROWS) -> list[dict]:
    """For each (CPUs, K) a fresh local cluster of real processes, K CPUs to a process:
    how long until every service was ready, the cluster's RSS (VmRSS summed over its
    processes: shared library pages count in each), and one round of a munmap of
    CLUSTER_PAGES pages on every CPU (its shootdown goes to all the others; raises
    unless stale accesses and audit violations are 0). Blocking: run it outside a loop."""
    from services.common.cohost import default_per_process
    from services.launcher import LocalCluster

    out = []
    for cpus, per_process in rows:
        k = default_per_process(cpus) if per_process is None else per_process
        with LocalCluster() as local:
            t0 = time.perf_counter()
            info = local.start(cpus, per_process=k)
            ready_s = time.perf_counter() - t0
            rss = sum(vm_rss_bytes(pid) for pid in info.pids.values())
            report = asyncio.run(_munmap_on_every_cpu(info.coordinator, cpus))
        r = report["results"]
        if r["stale_accesses"] or r["audit_violations"]:
            raise AssertionError(f"{cpus} CPUs, {k} a process: {r['stale_accesses']} stale "
                                 f"accesses, {r['audit_violations']} audit violations")
        processes = sum(1 for name in info.pids if info.cpus_of(name))
        out.append({"cpus": cpus, "per_process": k, "cpu_processes": processes,
                    "ready_s": round(ready_s, 2), "rss_mib": round(rss / 2**20, 1),
                    "rss_mib_per_cpu": round(rss / 2**20 / cpus, 2),
                    "munmap_s": r["duration_s"], "ipis": r["ipis"],
                    "shootdown_ms": r["shootdown_latency_ms"], "stale_accesses": 0})
    return out


async def _munmap_on_every_cpu(coordinator: str, cpus: int) -> dict:
    async with Cluster(coordinator) as cluster:
        return await run(cluster, RunConfig("munmap", Policy(), cpus=cpus,
                                            pages=CLUSTER_PAGES, rounds=1))


def print_cluster_sizes(rows: list[dict]) -> None:
    from rich.table import Table
    t = Table(title=f"CPUs per process and scale (fresh clusters; a munmap of {CLUSTER_PAGES} "
                    "pages on every CPU, its shootdown's p50; RSS MiB in all and per CPU; "
                    "stale accesses 0 in each, or the bench fails)")
    for col in ("CPUs", "per proc", "procs", "ready s", "RSS", "per CPU", "munmap s", "IPIs",
                "p50 ms"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["cpus"]), str(r["per_process"]), str(r["cpu_processes"]),
                  f"{r['ready_s']:.1f}", f"{r['rss_mib']:,.0f}", f"{r['rss_mib_per_cpu']:.1f}",
                  f"{r['munmap_s']:.2f}", str(r["ipis"]), f"{r['shootdown_ms']['p50']:.1f}")
    output.console.print(t)


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
    costbench.print_sweep(result["flush_ceiling"])
    print_throughput(result)
    if result.get("clusters"):
        print_cluster_sizes(result["clusters"])
    else:
        output.console.print("CPUs per process and scale: skipped (they start clusters of "
                             "their own: run the bench without --cluster)")


def print_throughput(result: dict) -> None:
    from rich.table import Table
    h, f = result["tlb_hits"], result["faults"]
    t = Table(title="throughput vs its floor (median of the rounds)")
    for col in ("measurement", "rate /s", "floor", "floor /s", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("TLB hits in one CPU service", f"{h['hits_per_s']:,.0f}", "its TLB, in-process",
              f"{h['floor_hits_per_s']:,.0f}", f"{h['ratio']:.2f}x")
    t.add_row("faults at the memory service", f"{f['faults_per_s']:,.0f}", "page present",
              f"{f['floor_walks_per_s']:,.0f}", f"{f['ratio']:.2f}x")
    c = result.get("cpu_faults")
    if c is not None:
        t.add_row(f"faults through a CPU service (Access of {c['pages']} fresh pages)",
                  f"{c['faults_per_s']:,.0f}", "the domain, in-process",
                  f"{c['floor_domain_faults_per_s']:,.0f}", f"{c['ratio']:.2f}x")
        t.add_row("", "", f"a Walk of {c['pages']} pages per gRPC call (items)",
                  f"{c['floor_rpc_items_per_s']:,.0f}", "")
    p = result.get("replay")
    if p is not None:
        t.add_row(f"trace replay on {p['cpus']} CPUs (ops: accesses and calls)",
                  f"{p['ops_per_s']:,.0f}", "the same replay, in-process",
                  f"{p['floor_in_process_ops_per_s']:,.0f}", f"{p['ratio']:.2f}x")
    output.console.print(t)
    rss = result.get("memory_rss")
    if rss is None:
        output.console.print("memory RSS: skipped (the memory service's process is not "
                             "known here: run the bench's own cluster, or `tlbsim up`)")
        return
    print_rss(rss)


def print_rss(rss: dict) -> None:
    from rich.table import Table
    t = Table(title=f"memory service RSS per resident page (empty: {rss['empty_rss_mib']:.0f} MiB)")
    for col in ("resident pages", "RSS (MiB)", "bytes per page", "populating them (s)"):
        t.add_column(col, justify="right")
    for r in rss["rows"]:
        t.add_row(f"{r['pages']:,}", f"{r['rss_mib']:.0f}", f"{r['bytes_per_page']:.0f}",
                  f"{r['populate_s']:.1f}")
    output.console.print(t)


def _local_memory_pid(coordinator: str) -> int | None:
    """The memory service's pid when the cluster is the one `tlbsim up` recorded here."""
    from services.launcher import LauncherError, load_state
    try:
        info = load_state(None)
    except LauncherError:
        return None
    pid = info.pids.get("memory")
    return pid if info.coordinator == coordinator and pid and Path(f"/proc/{pid}").exists() \
        else None


def main(cluster_address: str | None, rounds: int, munmap_rounds: int,
         json_path: str | None, cost_model: str = "x86", quick: bool = False) -> int:
    from services.launcher import LocalCluster, mosquitto_binary

    if cluster_address is not None:
        result = asyncio.run(bench(cluster_address, rounds, munmap_rounds, cost_model,
                                   memory_pid=_local_memory_pid(cluster_address), quick=quick))
    else:
        with LocalCluster() as local:  # stops every process, also on Ctrl-C
            # One CPU per process, as the bench always measured (its 9 CPUs would
            # otherwise be co-hosted two by two: `up --cpus-per-process`).
            info = local.start(BENCH_CPUS, mqtt=mosquitto_binary() is not None,
                               per_process=1)
            result = asyncio.run(bench(info.coordinator, rounds, munmap_rounds, cost_model,
                                       memory_pid=info.pids["memory"], quick=quick))
        result["clusters"] = cluster_sizes()  # each its own cluster, the bench's stopped
    print_bench(result)
    output.write_json(result, json_path)
    return 0

