"""Several CPUs in one process (`up --cpus-per-process K`, `serve cpu --ids`), as real
processes: each CPU its own server, port, registration and metrics; a kill of the
process is K CPU failures, fenced and rejoining as one would; chaos kill-cpu of a CPU
that shares its process restarts the whole process and says so."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from loadgen.cluster import Cluster
from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common.liveness import ready_timeout_s
from services.common.policy import Policy
from services.launcher import LocalCluster, free_port, load_state
from tlbsim.v1 import cpu_pb2
from tests.processes import ROOT, all_rejoined, listing, tlbsim

pytestmark = pytest.mark.slow


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_cohosted_cpus_are_each_their_own_service_and_stop_together(tmp_path: Path) -> None:
    with LocalCluster() as local:
        info = local.start(4, tmp_path, per_process=2)
        assert set(info.pids) == {"coordinator", "memory", "cpus0-1", "cpus2-3"}
        assert info.hosts == {"cpus0-1": [0, 1], "cpus2-3": [2, 3]}
        if "TLBSIM_READY_TIMEOUT" not in os.environ:  # the imports are per process: two
            assert local.ready_timeout == ready_timeout_s(4, processes=2)
        assert load_state_round_trip(info, tmp_path).hosts == info.hosts
        assert len(set(info.cpus.values())) == 4  # a port each

        async def scenario():
            async with Cluster(info.coordinator) as cluster:
                await all_rejoined(cluster, 4)
                cpus = await listing(cluster)
                report = await run(cluster, RunConfig("munmap", Policy(), cpus=4, pages=32,
                                                      rounds=2))
                return cpus, report

        cpus, report = asyncio.run(scenario())
        assert {i: c.address for i, c in cpus.items()} == info.cpus  # each registered itself
        r = report["results"]
        assert r["stale_accesses"] == 0 and r["ipis"] == 2 * 3
        for cpu in range(4):  # each CPU's metrics on its own port, with its own label
            text = scrape(info.metrics[f"cpu{cpu}"])
            assert f'cpu="{cpu}"' in text
            assert not any(f'cpu="{other}"' in text for other in range(4) if other != cpu)

        # SIGTERM: the process stops both its CPUs gracefully (exit 0, ports closed).
        process = next(c for c in local._children if c.name == "cpus2-3")
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(15) == 0
        for cpu in (2, 3):
            host, port = info.cpus[cpu].rsplit(":", 1)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, int(port)), timeout=5).close()


def load_state_round_trip(info, tmp_path: Path):
    from services.launcher import write_state
    write_state(tmp_path / "state.json", info)
    return load_state(str(tmp_path / "state.json"))


def test_a_killed_process_of_two_cpus_is_two_failures_then_both_rejoin(tmp_path: Path) -> None:
    with LocalCluster() as local:
        info = local.start(4, tmp_path, per_process=2)
        before = dict(info.pids)
        assert local.cpus_killed("cpu3") == [2, 3]
        kills: list[threading.Thread] = []

        async def scenario():
            async with Cluster(info.coordinator) as cluster:
                def progress(done: int) -> None:
                    if done == 1 and not kills:  # restart "cpu2": its whole process
                        kills.append(threading.Thread(target=local.restart, args=("cpu2",),
                                                      daemon=True))
                        kills[0].start()
                cfg = RunConfig("munmap", Policy(deadline_s=0.5), cpus=4, pages=64, rounds=6)
                report = await run(cluster, cfg, progress)
                kills[0].join(60)
                await all_rejoined(cluster, 4)
                await cluster.discover(4)
                # wait_for_ready: the channel to the killed process may still be backing
                # off from its refused connections, and would fail at once without it.
                dumps = [await cluster.cpus[i].stub.DumpTlb(cpu_pb2.DumpTlbRequest(),
                                                            timeout=10, wait_for_ready=True)
                         for i in (2, 3)]
                again = await run(cluster, RunConfig("munmap", Policy(), cpus=4, pages=64,
                                                     rounds=1))
                return report, dumps, again

        report, dumps, again = asyncio.run(scenario())
        r = report["results"]
        assert {2, 3} <= set(r["fenced_cpus"])  # both left the run (0 and 1 may too, late
        # under load at a 0.5 s deadline: that is not what this checks)
        assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
        assert all(list(d.entries) == [] and not d.fenced for d in dumps)
        assert again["results"]["ipis"] == 3 and again["results"]["stale_accesses"] == 0
        assert info.pids["cpus2-3"] != before["cpus2-3"]  # one new process for both
        assert info.pids["cpus0-1"] == before["cpus0-1"]


def test_chaos_kill_cpu_of_a_shared_process_restarts_all_of_it(tmp_path: Path) -> None:
    state = tmp_path / "cluster.json"
    up = tlbsim("up", "--cpus", "3", "--cpus-per-process", "2", "--detach", "--state",
                str(state), "--log-dir", str(tmp_path / "logs"))
    assert up.returncode == 0, up.stderr
    try:
        before = load_state(str(state))
        assert before.hosts == {"cpus0-1": [0, 1]} and set(before.pids) == \
            {"coordinator", "memory", "cpus0-1", "cpu2"}
        killed = tlbsim("chaos", "kill-cpu", "--cpu", "1", "--state", str(state), timeout=120)
        assert killed.returncode == 0, killed.stderr
        assert killed.stdout.startswith("cpus 0-1 (cpu 1 shares one process with them) "
                                        "killed and serving again"), killed.stdout
        alone = tlbsim("chaos", "kill-cpu", "--cpu", "2", "--state", str(state), timeout=120)
        assert alone.stdout.startswith("cpu 2 killed"), alone.stdout
        after = load_state(str(state))
        assert after.pids["cpus0-1"] != before.pids["cpus0-1"]
        assert after.pids["cpu2"] != before.pids["cpu2"]
        assert after.cpus == before.cpus and after.metrics == before.metrics  # in place
        report = tmp_path / "r.json"
        ok = tlbsim("load", "run", "munmap", "--state", str(state), "--cpus", "3", "--pages",
                    "32", "--rounds", "2", "--json", str(report))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(report.read_text())["results"]["stale_accesses"] == 0
    finally:
        down = tlbsim("down", "--state", str(state))
        assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "stopped 4 of 4 processes"


def consecutive_free_ports(count: int) -> int:
    """A port P with P..P+count-1 free on loopback just now."""
    for _ in range(100):
        base = free_port()
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError("no run of free ports")


def test_the_container_knob_cpu_ids_with_one_listen_and_metrics_port(tmp_path: Path) -> None:
    """README "Several CPUs in one container": TLBSIM_CPU_IDS, one listen port and one
    metrics port for all, the advertised host alone: consecutive ports, each CPU its own."""
    with LocalCluster() as local:
        info = local.start(1, tmp_path)
        grpc_base, metrics_base = consecutive_free_ports(2), consecutive_free_ports(2)
        env = {**os.environ, "TLBSIM_CPU_IDS": "4-5",
               "TLBSIM_LISTEN": f"127.0.0.1:{grpc_base}", "TLBSIM_ADVERTISE": "127.0.0.1",
               "TLBSIM_METRICS_PORT": str(metrics_base), "TLBSIM_MEMORY": info.memory,
               "TLBSIM_COORDINATOR": info.coordinator}
        env.pop("TLBSIM_CPU_ID", None)
        served = subprocess.Popen([sys.executable, "-m", "services", "serve", "cpu"], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, stdin=subprocess.DEVNULL)
        try:
            ready = json.loads(served.stdout.readline())
            assert ready["event"] == "ready" and "address" not in ready  # two: see nodes
            assert ready["nodes"] == [
                {"id": 4, "address": f"127.0.0.1:{grpc_base}", "metrics_port": metrics_base},
                {"id": 5, "address": f"127.0.0.1:{grpc_base + 1}",
                 "metrics_port": metrics_base + 1}]

            async def registered() -> dict[int, str]:
                async with Cluster(info.coordinator) as cluster:
                    for _ in range(300):
                        cpus = await listing(cluster)
                        if all(i in cpus and not cpus[i].fenced for i in (4, 5)):
                            return {i: cpus[i].address for i in (4, 5)}
                        await asyncio.sleep(0.05)
                raise AssertionError("cpus 4 and 5 did not register")

            assert asyncio.run(registered()) == {4: f"127.0.0.1:{grpc_base}",
                                                 5: f"127.0.0.1:{grpc_base + 1}"}
            assert 'cpu="5"' in scrape(metrics_base + 1)
            served.send_signal(signal.SIGTERM)
            assert served.wait(15) == 0
        finally:
            if served.poll() is None:
                served.kill()
                served.wait()
