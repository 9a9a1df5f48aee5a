"""`tlbsim bench`'s throughput and memory rows over real gRPC (small sizes: the
numbers come from the bench itself, never from a timed test)."""
import os
import subprocess
import sys
from pathlib import Path

from loadgen.bench import (FRESH_PAGES, cluster_sizes, cpu_faults_vs_floor, faults_vs_floor,
                           memory_rss_per_page, replay_vs_floor, tlb_hits_vs_floor)
from tests.harness import InProcessCluster
from tlbsim.v1 import memory_pb2


async def test_throughput_and_rss_rows_measure_what_they_name():
    async with InProcessCluster(cpus=1) as c:
        hits = await tlb_hits_vs_floor(c.client, rounds=1)  # raises if one access missed
        assert hits["accesses_per_request"] == 102_400
        assert hits["hits_per_s"] > 0 and hits["floor_hits_per_s"] > 0 and hits["ratio"] > 0
        faults = await faults_vs_floor(c.client, pages=20, rounds=1)  # raises unless each
        assert faults["faults_per_s"] > 0 and faults["floor_walks_per_s"] > 0  # call faulted
        through = await cpu_faults_vs_floor(c.client, rounds=2)  # raises unless each faulted
        assert through["pages"] == FRESH_PAGES and through["faults_per_s"] > 0
        assert through["floor_domain_faults_per_s"] > 0 and through["floor_rpc_items_per_s"] > 0
        cpu_stats = await c.client.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert cpu_stats.faults["anon"] == 2 * FRESH_PAGES  # the service's: not the floor's
        rss = await memory_rss_per_page(c.client, os.getpid(), sizes=(2000, 4000))
        assert [r["pages"] for r in rss["rows"]] == [2000, 4000]
        assert rss["empty_rss_mib"] > 0 and all(r["rss_mib"] > 0 for r in rss["rows"])
        first, both = (r["populate_s"] for r in rss["rows"])  # cumulative: 4000 took longer
        assert 0 < first < both
        stats = await c.client.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.used_frames == 1  # the RSS row handed its frames back (the zero page stays)


async def test_the_replay_row_replays_the_trace_on_the_cluster_and_in_process():
    async with InProcessCluster(cpus=4) as c:
        replay = await replay_vs_floor(c.client, rounds=2)  # raises if the two differ in ops
        assert replay["ops"] == 89_192 and replay["cpus"] == 4  # 89,130 accesses, 62 calls
        assert replay["ops_per_s"] > 0 and replay["floor_in_process_ops_per_s"] > 0
        stats = await c.client.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert sum(stats.faults.values()) == 151  # the cluster's last replay, not the floor's


def test_the_rss_script_prints_only_the_rss_rows_of_its_own_cluster():
    """tools/rss_per_page.py: a 1-CPU cluster of real processes, the rows asked for."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "tools" / "rss_per_page.py"), "3000", "1500"],
                         capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    assert "memory service RSS per resident page" in out.stdout
    assert out.stdout.index("1,500") < out.stdout.index("3,000")  # in order of size
    assert "shootdown" not in out.stdout  # none of the bench's other rows


def test_the_cluster_rows_start_each_size_as_asked_and_shoot_down_every_other_cpu():
    """Real processes: 3 CPUs one to a process, then all three in one."""
    apart, together = cluster_sizes(((3, 1), (3, 3)))
    assert (apart["per_process"], apart["cpu_processes"]) == (1, 3)
    assert (together["per_process"], together["cpu_processes"]) == (3, 1)
    for row in (apart, together):
        assert row["ipis"] == 2 and row["stale_accesses"] == 0  # the munmap's two targets
        assert row["ready_s"] > 0 and row["munmap_s"] > 0 and row["shootdown_ms"]["p50"] > 0
    assert together["rss_mib"] < apart["rss_mib"]  # one process's imports, not three
