"""Process-level faults on real processes (services/launcher.py LocalCluster): a CPU killed
and restarted, the coordinator restarted during a munmap-heavy run, the MQTT broker
stopped and started, the memory service restarted (a new epoch: a clear error, then a
new run recovers), and `tlbsim chaos` against a `tlbsim up --detach` cluster."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from loadgen.cluster import Cluster
from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common import exitcodes
from services.common.chaos import MACHINE_LOST
from services.common.policy import Policy
from services.launcher import LocalCluster, load_state, mosquitto_binary
from tlbsim.v1 import common_pb2, coordinator_pb2, cpu_pb2, memory_pb2
from tests.processes import ROOT, all_rejoined, tlbsim

pytestmark = pytest.mark.slow


def in_background(fn, *args) -> threading.Thread:
    """A blocking launcher operation while the load runs (it waits for the new process)."""
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


async def memory_stats(cluster: Cluster) -> memory_pb2.MemoryStats:
    return await cluster.memory.Stats(memory_pb2.MemoryStatsRequest(), timeout=10)


def test_coordinator_restarted_during_munmaps_loses_no_shootdown(tmp_path: Path) -> None:
    with LocalCluster() as local:
        info = local.start(4, tmp_path)
        first_pid = info.pids["coordinator"]
        restarts: list[threading.Thread] = []

        async def scenario():
            async with Cluster(info.coordinator) as cluster:
                def progress(done: int) -> None:
                    if done == 2 and not restarts:
                        restarts.append(in_background(local.restart, "coordinator"))
                cfg = RunConfig("munmap", Policy(deadline_s=1.0), cpus=4, pages=64, rounds=25)
                report = await run(cluster, cfg, progress)
                restarts[0].join(60)
                return report, await memory_stats(cluster)

        report, mem = asyncio.run(scenario())
        r = report["results"]
        assert r["rounds"] == 25  # the run went on through the restart
        assert r["fenced_cpus"] == []  # a CPU fenced meanwhile rejoined: none left the run
        assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
        assert mem.frames_freed_without_ack == 0
        assert r["pages_freed"] == 25 * 64  # every munmap completed and freed its frames
        assert info.pids["coordinator"] != first_pid  # the process was replaced


def test_killed_cpu_restarted_in_place_rejoins_with_an_empty_tlb(tmp_path: Path) -> None:
    with LocalCluster() as local:
        info = local.start(4, tmp_path)
        kills: list[threading.Thread] = []

        async def scenario():
            async with Cluster(info.coordinator) as cluster:
                def progress(done: int) -> None:
                    if done == 1 and not kills:
                        kills.append(in_background(local.restart, "cpu2"))
                cfg = RunConfig("munmap", Policy(deadline_s=0.5), cpus=4, pages=64, rounds=6)
                report = await run(cluster, cfg, progress)
                kills[0].join(60)
                await all_rejoined(cluster, 4)
                await cluster.discover(4)
                dump = await cluster.cpus[2].stub.DumpTlb(cpu_pb2.DumpTlbRequest(), timeout=10)
                again = await run(cluster, RunConfig("munmap", Policy(), cpus=4, pages=64,
                                                     rounds=1))
                return report, dump, again, await memory_stats(cluster)

        report, dump, again, mem = asyncio.run(scenario())
        r = report["results"]
        assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
        assert 2 in r["fenced_cpus"]  # it left the run
        assert list(dump.entries) == [] and not dump.fenced
        assert again["results"]["ipis"] == 3 and again["results"]["stale_accesses"] == 0
        assert mem.frames_freed_without_ack == 0


@pytest.mark.skipif(mosquitto_binary() is None, reason="needs mosquitto")
def test_broker_stopped_and_started_mqtt_shootdowns_go_on(tmp_path: Path) -> None:
    with LocalCluster() as local:
        info = local.start(3, tmp_path, mqtt=True)
        steps: list[threading.Thread] = []

        def outage() -> None:
            local.kill("mosquitto")
            time.sleep(1.5)
            local.restart("mosquitto", kill=False)

        async def scenario():
            async with Cluster(info.coordinator) as cluster:
                def progress(done: int) -> None:
                    if done == 2 and not steps:
                        steps.append(in_background(outage))
                cfg = RunConfig("munmap", Policy(transport="mqtt", deadline_s=1.0), cpus=3,
                                pages=32, rounds=30)
                report = await run(cluster, cfg, progress)
                steps[0].join(60)
                coord = await cluster.coordinator.Stats(
                    coordinator_pb2.CoordinatorStatsRequest(), timeout=10)
                return report, coord

        report, coord = asyncio.run(scenario())
        r = report["results"]
        assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
        assert r["rounds"] == 30 and r["pages_freed"] == 30 * 32
        assert coord.broker_down + coord.fallbacks >= 1  # gRPC carried them meanwhile


def test_memory_restart_is_a_clear_error_and_a_new_run_recovers(tmp_path: Path) -> None:
    with LocalCluster() as local:
        info = local.start(2, tmp_path)
        load = subprocess.Popen(
            [sys.executable, "-m", "loadgen", "load", "run", "mixed", "--cluster",
             info.coordinator, "--cpus", "2", "--duration", "60", "--pages", "32"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL)
        try:
            time.sleep(4)
            assert load.poll() is None, load.communicate()
            local.restart("memory")
            _, err = load.communicate(timeout=60)
        finally:
            if load.poll() is None:
                load.kill()
        assert load.returncode == exitcodes.NO_CLUSTER, err  # the documented error
        lines = err.strip().splitlines()
        assert len(lines) >= 1 and lines[-1].endswith(MACHINE_LOST), err
        assert "Traceback" not in err

        async def old_state_refused_then_new_run():
            async with Cluster(info.coordinator) as cluster:
                await cluster.discover(2)
                # A CPU still holds the lost machine's state: its calls are refused.
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await cluster.cpus[0].stub.Syscall(
                        common_pb2.SyscallRequest(mmap=common_pb2.MmapArgs(pages=1)), timeout=10)
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert e.value.details() == MACHINE_LOST
                return await run(cluster, RunConfig("munmap", Policy(), cpus=2, pages=32,
                                                    rounds=2))

        again = asyncio.run(old_state_refused_then_new_run())["results"]
        assert again["stale_accesses"] == 0 and again["pages_freed"] == 2 * 32


def test_chaos_cli_against_a_detached_cluster(tmp_path: Path) -> None:
    state = tmp_path / "cluster.json"
    up = tlbsim("up", "--cpus", "2", "--detach", "--state", str(state), "--log-dir",
                str(tmp_path / "logs"))
    assert up.returncode == 0, up.stderr
    try:
        before = load_state(str(state)).pids
        for args in (["partition", "--cpu", "1", "--for", "1"],
                     ["delay-acks", "--cpu", "0", "--delay", "0.5"], ["heal"],
                     ["kill-cpu", "--cpu", "0"], ["restart-coordinator"]):
            done = tlbsim("chaos", *args, "--state", str(state), timeout=120)
            assert done.returncode == 0, (args, done.stderr)
        after = load_state(str(state)).pids
        assert after["cpu0"] != before["cpu0"] and after["coordinator"] != before["coordinator"]
        assert after["cpu1"] == before["cpu1"]
        report = tmp_path / "r.json"
        ok = tlbsim("load", "run", "munmap", "--state", str(state), "--cpus", "2", "--pages",
                    "32", "--rounds", "2", "--json", str(report))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(report.read_text())["results"]["stale_accesses"] == 0
        # 2: a bad option; 3: the cluster cannot do it (README "Exit codes").
        for args, message, code in ((["stop-broker"], "no MQTT broker", 3),
                                    (["partition"], "needs --cpu", 2),
                                    (["drop-flushes", "--cpu", "0", "--fraction", "2"],
                                     "[0, 1]", 2),
                                    (["kill-cpu", "--cpu", "7"], "no cpu 7", 2)):
            bad = tlbsim("chaos", *args, "--state", str(state), timeout=60)
            assert bad.returncode == code, (args, bad.stderr)
            lines = bad.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0], (args, bad.stderr)
    finally:
        down = tlbsim("down", "--state", str(state))
        assert down.returncode == 0, down.stderr
