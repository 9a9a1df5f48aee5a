"""services.launcher: a real local cluster, `tlbsim up --detach` / `tlbsim down`."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher import ClusterInfo, LauncherError, LocalCluster, add_commands, load_state

ROOT = Path(__file__).resolve().parents[1]


def is_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Detached services are reaped by init, not by us: give it a moment."""
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if not is_gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def health(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def tlbsim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tlbsim")
    add_commands(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cluster_info_json_round_trip(tmp_path: Path) -> None:
    info = ClusterInfo("127.0.0.1:1", "127.0.0.1:2", {0: "127.0.0.1:3", 1: "127.0.0.1:4"},
                       {"cpu0": 9000}, {"cpu0": 42}, tmp_path)
    assert ClusterInfo.from_json(info.to_json()) == info
    assert list(info.addresses()) == ["coordinator", "memory", "cpu0", "cpu1"]


def test_up_rejects_bad_cpu_count(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("up", "--cpus", "65")
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "between 1 and 64" in err and len(err.strip().splitlines()) == 1


def test_down_without_state_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("down", "--state", str(tmp_path / "missing.json"))
    assert args.func(args) == 4  # no cluster (README "Exit codes")
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(LauncherError, match="no cluster state"):
        load_state(str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_local_cluster_serves_then_stops(tmp_path: Path) -> None:
    with LocalCluster() as cluster:
        info = cluster.start(2, tmp_path)
        assert set(info.pids) == {"coordinator", "memory", "cpu0", "cpu1"}
        assert set(info.metrics) == set(info.pids)
        for name, address in info.addresses().items():
            assert health(address) == "SERVING", name
    cluster.stop()  # idempotent
    assert [name for name, pid in info.pids.items() if not is_gone(pid)] == []


@pytest.mark.slow
def test_up_detach_then_down(tmp_path: Path) -> None:
    state = tmp_path / "cluster.json"
    up = tlbsim("up", "--cpus", "1", "--detach", "--state", str(state), "--log-dir", str(tmp_path / "logs"))
    assert up.returncode == 0, up.stderr
    info = load_state(str(state))
    pids = list(info.pids.values())
    try:
        assert len(pids) == 3 and not any(is_gone(pid) for pid in pids)
        assert all(health(address) == "SERVING" for address in info.addresses().values())
        # Every service with its metrics port, and the way to stop this very cluster.
        for name, address in info.addresses().items():
            assert f"{name} {address} metrics {info.metrics[name]}" in up.stdout
        assert f"stop it with `tlbsim down --state {state}`" in up.stderr

        down = tlbsim("down", "--state", str(state))
        assert down.returncode == 0, down.stderr
        assert not state.exists()
        assert wait_gone(pids) == []
    finally:
        for pid in wait_gone(pids, timeout=0):
            os.kill(pid, signal.SIGKILL)
