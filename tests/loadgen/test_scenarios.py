"""Every scenario, a short run on a whole cluster over real gRPC (issue 5, point 3)."""

import pytest

from loadgen.runner import failed, run
from loadgen.scenarios import SCENARIOS, RunConfig
from loadgen.scenarios.mixed import parse_mix
from services.common.errors import InvalidArgument
from services.common.policy import Policy


def cfg(scenario, cpus=4, **kw) -> RunConfig:
    policy = {k: kw.pop(k) for k in list(kw) if k in Policy.__dataclass_fields__}
    policy.setdefault("deadline_s", 10.0)  # exact counts must not depend on machine load
    return RunConfig(scenario, Policy(**policy), cpus=cpus, **kw)


def safe(report) -> dict:
    r = report["results"]
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0, report["violations"]
    assert not failed(report)
    return r


def test_every_scenario_is_registered_with_a_doc():
    from loadgen.scenarios import DOCS
    for name in ("munmap", "tlb-flush", "fault-scaling", "mprotect", "mixed", "replay"):
        assert name in SCENARIOS and DOCS[name].startswith(name.split("-")[0])


async def test_tlb_flush_is_one_shootdown_per_madvise(cluster):
    r = safe(await run(cluster.client, cfg("tlb-flush", pages=8, rounds=2)))
    assert r["syscalls"] == {"mmap": 4, "madvise_dontneed": 4 * 8 * 2}
    assert r["shootdowns"] == 4 * 8 * 2       # every madvise cleared one written PTE
    assert r["ipis"] == 3 * r["shootdowns"]  # to the other three threads' CPUs
    assert r["faults"] == 4 * 8 * 2 and r["madvise_per_s"] > 0
    assert r["munmap_latency_ms"]["p50"] > 0


async def test_mprotect_downgrade_flushes_and_upgrade_does_not(cluster):
    r = safe(await run(cluster.client, cfg("mprotect", pages=64, rounds=1)))
    assert r["syscalls"] == {"mmap": 1, "mprotect": 2 * 4}   # 4 chunks of 16, RO then RW
    assert r["shootdowns"] == 4 and r["full_flushes"] == 0  # 16 pages < ceiling 33: ranged
    assert r["syscall_latency_ms"]["mprotect"]["p50"] > 0
    assert r["audit_entries_checked"] > 0


async def test_mprotect_above_the_ceiling_is_a_full_flush(cluster):
    r = safe(await run(cluster.client, cfg("mprotect", pages=32, rounds=1, ceiling=8)))
    assert r["shootdowns"] == 2 and r["full_flushes"] == 2


async def test_fault_scaling_reports_the_faulters_rate(steady_cluster):
    client = steady_cluster.client
    for lock in ("mm", "split"):
        r = safe(await run(client, cfg("fault-scaling", pages=512, rounds=1, lock=lock)))
        assert r["faults"] >= 2 * 512          # two faulters, a 2 MiB region each
        assert r["faulting_faults_per_s"] > 0
        assert r["syscalls"]["madvise_dontneed"] >= 1 and r["shootdowns"] >= 1
        if lock == "split":
            assert r["contended_locks"] == 0   # the churners' tables are not the faulters'


async def test_mixed_is_deterministic_in_its_calls_and_safe(steady_cluster):
    client = steady_cluster.client
    a = safe(await run(client, cfg("mixed", pages=32, rounds=2, seed=7)))
    b = safe(await run(client, cfg("mixed", pages=32, rounds=2, seed=7)))
    assert a["syscalls"] == b["syscalls"]     # the same seed draws the same operations
    assert {"mmap", "munmap"} <= set(a["syscalls"])
    assert a["shootdowns"] > 0 and a["ops"] > 4 * 2 * 20
    only_reads = safe(await run(client, cfg("mixed", pages=16, rounds=1, mix="read=1")))
    assert only_reads["syscalls"] == {"mmap": 1} and only_reads["shootdowns"] == 0


def test_mix_weights_are_checked():
    assert parse_mix("mmap=1,read=0") == {"mmap": 1, "read": 0}
    for bad in ("fork=1", "mmap", "mmap=x", "mmap=-1", "read=0"):
        with pytest.raises(InvalidArgument):
            parse_mix(bad)


async def test_munmap_runs_for_a_duration(cluster):
    r = safe(await run(cluster.client, cfg("munmap", pages=16, rounds=1000, duration=0.5)))
    assert 1 <= r["rounds"] < 1000 and r["duration_s"] >= 0.5
    assert r["syscalls"] == {"mmap": r["rounds"], "munmap": r["rounds"]}


async def test_tlb_flush_stops_at_ops(cluster):
    r = safe(await run(cluster.client, cfg("tlb-flush", pages=64, rounds=1000, ops=50)))
    assert 50 <= r["ops"] < 50 + 4 * 2 + 4   # each thread finishes the call it is in
    assert r["rounds"] == 1
