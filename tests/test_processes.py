"""The cluster as real processes: a CPU killed mid-run, the demo, the load CLI."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadgen.cluster import Cluster
from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common.policy import Policy
from services.launcher import LocalCluster
from tlbsim.v1 import coordinator_pb2, cpu_pb2
from tests.processes import ROOT, tlbsim

pytestmark = pytest.mark.slow


def serving_processes() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"services\0serve" in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                pass
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_killed_cpu_process_is_fenced_and_rejoins_flushed(tmp_path: Path) -> None:
    with LocalCluster() as local:
        info = local.start(4, tmp_path)
        restarted = None

        async def scenario() -> dict:
            async with Cluster(info.coordinator) as cluster:
                def progress(done: int) -> None:
                    if done == 1:
                        os.kill(info.pids["cpu3"], signal.SIGKILL)
                cfg = RunConfig("munmap", Policy(deadline_s=0.5), cpus=4, pages=64, rounds=3)
                return await run(cluster, cfg, progress)

        try:
            r = asyncio.run(scenario())["results"]
            assert 3 in r["fenced_cpus"] and r["deadline_misses"] >= 1
            assert r["munmap_latency_ms"]["p99"] >= 500
            assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
            assert r["pages_freed"] == 3 * 64

            restarted = subprocess.Popen(
                [sys.executable, "-m", "services", "serve", "cpu", "--id", "3",
                 "--memory", info.memory, "--coordinator", info.coordinator],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            ready = json.loads(restarted.stdout.readline())

            async def rejoined() -> tuple[bool, int]:
                async with Cluster(info.coordinator) as cluster:
                    for _ in range(200):
                        listing = await cluster.coordinator.ListCpus(
                            coordinator_pb2.ListCpusRequest())
                        cpu3 = [c for c in listing.cpus if c.cpu == 3][0]
                        if not cpu3.fenced and cpu3.address == ready["address"]:
                            break
                        await asyncio.sleep(0.05)
                    await cluster.discover(4)
                    dump = await cluster.cpus[3].stub.DumpTlb(cpu_pb2.DumpTlbRequest())
                    again = await run(cluster, RunConfig("munmap", Policy(), cpus=4, pages=64,
                                                         rounds=1))
                    return cpu3.fenced or len(dump.entries) > 0, again["results"]["ipis"]

            stale_state, ipis = asyncio.run(rejoined())
            assert not stale_state  # unfenced, and its TLB starts empty
            assert ipis == 3        # and it takes part again
        finally:
            if restarted is not None:
                restarted.terminate()
                restarted.wait(10)


def test_demo_prints_its_comparisons_and_leaves_nothing_running() -> None:
    done = tlbsim("demo", "--cpus", "2", "--rounds", "1")
    assert done.returncode == 0, done.stderr
    for label in ("per-page", "gather", "lock=mm", "lock=split", "fork=copy", "fork=share"):
        assert label in done.stdout
    # Other clusters may run on this machine: look only for this demo's processes.
    coordinator = re.search(r"coordinator (127\.0\.0\.1:\d+)", done.stdout).group(1)
    time.sleep(0.5)
    assert [pid for pid in serving_processes() if coordinator in cmdline(pid)] == []
    with pytest.raises(OSError):
        socket.create_connection(coordinator.split(":"), timeout=2).close()


def test_load_run_cli_reports_and_fails_on_the_oracle(tmp_path: Path) -> None:
    with LocalCluster() as local:
        info = local.start(4, tmp_path / "logs")
        report = tmp_path / "r.json"
        ok = tlbsim("load", "run", "munmap", "--cluster", info.coordinator, "--pages", "512",
                    "--cpus", "4", "--rounds", "5", "--flush", "gather", "--deadline", "10",
                    "--json", str(report))
        assert ok.returncode == 0, ok.stderr
        r = json.loads(report.read_text())
        assert r["scenario"] == "munmap" and r["config"]["flush"] == "gather"
        assert (r["results"]["shootdowns"], r["results"]["ipis"]) == (5, 15)
        bad = tlbsim("load", "run", "munmap", "--cluster", info.coordinator, "--rounds", "10",
                     "--unsafe", "free-before-flush", "--json", str(report))
        assert bad.returncode == 1
        assert json.loads(report.read_text())["results"]["stale_accesses"] > 0
        assert "oracle:" in bad.stderr


@pytest.mark.parametrize("args,message,code", [
    (["--pages", "0"], "--pages must be at least 1", 2),                    # usage
    (["--tlb-entries", "100", "--tlb-ways", "12"], "not a multiple of 12 ways", 2),
    (["--cluster", "127.0.0.1:1"], "cannot reach the coordinator", 4),     # no cluster
    (["--state", "/nonexistent/state.json"], "no cluster state", 4),
])
def test_load_run_errors_are_one_line(args: list[str], message: str, code: int) -> None:
    done = tlbsim("load", "run", "munmap", *args, timeout=60)
    assert done.returncode == code
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
