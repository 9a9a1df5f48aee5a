"""Reading the deployment files the way Docker and Kubernetes would, and running what the
containers would run as local processes (no Docker engine exists on the build machines)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from services.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
MORE_CPUS = ROOT / "deploy" / "compose" / "more-cpus.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
TLBSIM = [str(Path(sys.executable).with_name("tlbsim"))]


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())  # resolves anchors and << merges, as compose does


def merged_compose(*paths: Path) -> dict:
    """`docker compose -f A -f B`: later files add services or replace their keys."""
    out: dict = {"services": {}}
    for p in paths:
        for name, svc in compose(p)["services"].items():
            out["services"].setdefault(name, {}).update(svc)
    return out


# --- Dockerfile ------------------------------------------------------------------------
def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    lines, current = [], ""
    for raw in text.splitlines():
        if not current and (raw.lstrip().startswith("#") or not raw.strip()):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        lines.append(current.strip())
        current = ""
    out = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    instrs = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for k, rest in runtime_stage():
        if k == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def exec_form(k: str) -> list[str]:
    """The exec-form (JSON array) argument of ENTRYPOINT, CMD or HEALTHCHECK's CMD."""
    for instr, rest in runtime_stage():
        if instr == k:
            if k == "HEALTHCHECK":
                rest = rest[rest.index("CMD ") + 4:]
            return json.loads(rest)
    raise AssertionError(f"the Dockerfile has no {k}")


# --- processes ---------------------------------------------------------------------------
class LoopbackMap:
    """Every (service, container port) of the compose network becomes 127.0.0.1 and a free
    port of this machine; values are rewritten with it, nothing else changes."""

    def __init__(self, services: list[str]) -> None:
        self.services = services
        self.ports: dict[tuple[str, int], int] = {}

    def port(self, service: str, port: int) -> int:
        return self.ports.setdefault((service, port), free_port())

    def value(self, service: str, value: str, own_port_var: bool = False) -> str:
        if own_port_var and value.isdigit() and int(value) > 0:
            return str(self.port(service, int(value)))  # TLBSIM_METRICS_PORT=9100

        def host_port(m: re.Match) -> str:
            host, port = m.group(1), int(m.group(2))
            if host in ("0.0.0.0", "127.0.0.1", "localhost"):
                return f"127.0.0.1:{self.port(service, port)}"
            if host in self.services:
                return f"127.0.0.1:{self.port(host, port)}"
            return m.group(0)
        return re.sub(r"(?<![\w.-])([\w.-]+):(\d+)\b", host_port, value)

    def env(self, service: str, env: dict[str, str]) -> dict[str, str]:
        return {k: self.value(service, str(v), own_port_var=k.endswith("_PORT"))
                for k, v in env.items()}

    def argv(self, service: str, argv: list[str]) -> list[str]:
        return [self.value(service, a) for a in argv]


def start_order(services: dict[str, dict]) -> list[str]:
    """depends_on order (a topological sort), as compose starts them."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...] = ()) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join(path + (name,))}"
        if name in order:
            return
        for dep in services[name].get("depends_on", {}):
            visit(dep, path + (name,))
        order.append(name)
    for name in services:
        visit(name)
    return order


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TLBSIM_")}


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.out", "w")
        err = open(self.log_dir / f"{name}.err", "w")
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return "".join((self.log_dir / f"{name}.{s}").read_text()[-3000:] for s in ("out", "err"))

    def stop(self) -> dict[str, int]:
        """SIGTERM all (as `docker compose down`), wait, SIGKILL leftovers; exit codes."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        return codes


def wait_until(check, timeout: float, what: str, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        assert alive(), f"{what}: the process exited"
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout:.0f}s")
