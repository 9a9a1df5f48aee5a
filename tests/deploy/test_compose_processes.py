"""What the containers would run, run here as processes (points 2 and 3 of issue 7).

Every compose service is started with exactly its compose command line and environment
(on top of the image's ENTRYPOINT and ENV), compose names and container ports mapped to
127.0.0.1 and free ports, in depends_on order, each waited for with its own compose
healthcheck command; then the loadgen service's command runs a load against it. The
image's HEALTHCHECK command is run against a live service."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.stack import (ROOT, TLBSIM, LoopbackMap, Processes, clean_env, compose,
                                exec_form, image_env, start_order, wait_until)

pytestmark = pytest.mark.slow

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)
TLBSIM_SERVICES = {"coordinator", "memory", "cpu0", "cpu1", "cpu2", "cpu3"}


def python_argv(argv: list[str]) -> list[str]:
    """The image's `python` is this interpreter."""
    return [sys.executable, *argv[1:]] if argv and argv[0] == "python" else argv


def healthcheck_argv(test: list[str]) -> list[str]:
    assert test[0] == "CMD", test
    return python_argv(test[1:])


def mosquitto_conf(ports: LoopbackMap, tmp: Path) -> Path:
    """deploy/mosquitto/mosquitto.conf as mounted, its listener on the mapped port."""
    svc = compose()["services"]["mosquitto"]
    mount = next(v for v in svc["volumes"] if v.endswith(":/mosquitto/config/mosquitto.conf:ro"))
    text = (ROOT / mount.split(":", 1)[0]).read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("listener "):
            port = int(line.split()[1])
            line = f"listener {ports.port('mosquitto', port)} 127.0.0.1"
        lines.append(line)
    conf = tmp / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def run_check(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=20)


@pytest.mark.skipif(MOSQUITTO is None, reason="needs mosquitto (apt-get install mosquitto)")
def test_compose_services_run_as_processes_and_the_loadgen_command_runs_a_load(tmp_path):
    services = compose()["services"]
    ports = LoopbackMap(list(services))
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint == ["tlbsim"]
    base_env = {**clean_env(), **image_env()}
    procs = Processes(tmp_path)
    started = []
    try:
        for name in start_order(services):
            svc = services[name]
            if "profiles" in svc:  # loadgen: `docker compose --profile load run` below
                continue
            if name == "mosquitto":
                p = procs.start(name, [MOSQUITTO, "-c", str(mosquitto_conf(ports, tmp_path))],
                                base_env)
                port = ports.port("mosquitto", 1883)
                wait_until(lambda: _connects(port), 20, "mosquitto", lambda: p.poll() is None)
                continue
            if name not in TLBSIM_SERVICES:
                continue  # prometheus, grafana: other images; test_static checks their config
            argv = TLBSIM + ports.argv(name, svc["command"])
            env = {**base_env, **ports.env(name, svc.get("environment", {}))}
            p = procs.start(name, argv, env)
            check = healthcheck_argv(ports.argv(name, svc["healthcheck"]["test"]))
            wait_until(lambda: run_check(check).returncode == 0, 30,
                       f"{name} healthcheck {check}", lambda: p.poll() is None)
            started.append(name)
        assert set(started) == TLBSIM_SERVICES

        # Prometheus would scrape each service at NAME:9100: the mapped metrics port serves.
        for name in TLBSIM_SERVICES:
            port = ports.port(name, int(services[name]["environment"]["TLBSIM_METRICS_PORT"]))
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            assert b"tlbsim_" in body, name

        # The loadgen service's command, as `docker compose --profile load run loadgen`.
        loadgen = services["loadgen"]
        argv = ports.argv("loadgen", loadgen["entrypoint"] + loadgen["command"])
        assert argv[0] == "tlbsim"
        env = {**base_env, **ports.env("loadgen", loadgen["environment"])}
        reports = []
        for extra in ([], ["--transport", "mqtt"]):  # the broker carries shootdowns too
            r = subprocess.run(TLBSIM + argv[1:] + extra + ["--json", "-"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, (extra, r.stdout[-3000:], r.stderr[-3000:],
                                       {n: procs.log(n) for n in started})
            report = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
            assert report["config"]["cpus"] == 4  # all four compose CPUs registered themselves
            assert report["config"]["transport"] == (extra[1] if extra else "grpc")
            reports.append(report)
        assert len(reports) == 2
    finally:
        codes = procs.stop()
    # graceful stop on SIGTERM: every tlbsim service exits 0 (compose's grace is 10 s)
    assert {n: codes[n] for n in started} == {n: 0 for n in started}, \
        {n: procs.log(n) for n in started}


def _connects(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_image_healthcheck_command_against_a_live_service(tmp_path):
    """The Dockerfile's HEALTHCHECK, run against a coordinator started with the image's
    environment: 0 while it serves; 1 with one line once it stopped."""
    ports = LoopbackMap(["coordinator"])
    check = ports.argv("coordinator", python_argv(exec_form("HEALTHCHECK")))
    env = {**clean_env(), **ports.env("coordinator", image_env())}
    assert env["TLBSIM_LISTEN"].startswith("127.0.0.1:")
    procs = Processes(tmp_path)
    try:
        p = procs.start("coordinator", TLBSIM + exec_form("ENTRYPOINT")[1:]
                        + ["serve", "coordinator"], env)
        wait_until(lambda: "ready" in (tmp_path / "coordinator.out").read_text(), 30,
                   "coordinator ready", lambda: p.poll() is None)
        r = run_check(check)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        r = run_check(check + ["--service", "tlbsim.v1.CoordinatorService"])
        assert r.returncode == 0, r.stderr
        r = run_check(check + ["--service", "tlbsim.v1.NoSuchService"])
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1 and "NOT_FOUND" in r.stderr, r.stderr
    finally:
        assert procs.stop() == {"coordinator": 0}
    r = run_check(check)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "UNAVAILABLE" in r.stderr, r.stderr
