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

from services.common import exitcodes
from services.launcher import ClusterInfo, LauncherError, LocalCluster, load_state
from services.launcher.commands import add_commands

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
        [sys.executable, "-m", "loadgen", *args],
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
    for argv, words in ((["--cpus", "257"], "--cpus must be between 1 and 256"),
                        (["--cpus", "4", "--cpus-per-process", "0"], "between 1 and --cpus"),
                        (["--cpus", "4", "--cpus-per-process", "5"], "between 1 and --cpus")):
        args = parse("up", *argv)
        assert args.func(args) == 2, argv
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


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


def test_a_start_that_times_out_is_one_line_naming_the_log_directory(tmp_path: Path) -> None:
    cluster = LocalCluster(ready_timeout=0.01)
    with pytest.raises(LauncherError) as e:
        cluster.start(2, tmp_path)
    message = str(e.value)
    assert "\n" not in message and "not ready after 0.01 s" in message
    assert f"logs in {tmp_path.resolve()}" in message and "coordinator.log" in message


def test_a_child_that_dies_before_it_is_ready_is_one_line_with_its_last_words(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLBSIM_TOKEN_FILE", str(tmp_path / "missing-token"))
    with pytest.raises(LauncherError) as e:
        LocalCluster().start(1, tmp_path)
    message = str(e.value)
    assert "\n" not in message and "exited with code 2 before it was ready" in message
    assert "missing-token" in message and f"logs in {tmp_path.resolve()}" in message


def test_bench_whose_cluster_cannot_start_is_a_one_line_error_not_a_traceback() -> None:
    bench = subprocess.run(
        [sys.executable, "-m", "loadgen", "bench", "--quick"], cwd=ROOT, capture_output=True,
        text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "TLBSIM_READY_TIMEOUT": "0.01"})
    assert bench.returncode == exitcodes.NO_CLUSTER, bench.stderr
    lines = bench.stderr.strip().splitlines()
    assert len(lines) == 1 and "after 0.01 s" in lines[0] and "logs in" in lines[0]
    assert "Traceback" not in bench.stderr


def test_up_derives_the_ready_timeout_and_liveness_from_the_cluster_size() -> None:
    from services.common.liveness import Liveness, ready_timeout_s
    args = parse("up", "--cpus", "64")
    from services.cli import liveness_from
    assert liveness_from(args, args.cpus) == Liveness.for_cluster(64)
    assert ready_timeout_s(64) == pytest.approx(132.4)  # a process each
    assert ready_timeout_s(256, processes=8) == pytest.approx(67.6)  # imports: per process
    args = parse("up", "--cpus", "4", "--lease", "9")
    assert liveness_from(args, args.cpus).lease_s == 9.0


def test_up_with_contradicting_liveness_is_a_one_line_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("up", "--cpus", "4", "--heartbeat-interval", "1", "--lease", "1")
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lease 1 s: must be at least" in err[0]
