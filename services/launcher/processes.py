"""Local processes: the coordinator, the memory service and N CPUs started, watched,
killed and restarted as children of this one (`tlbsim up`, demo, bench, soak, chaos).

Signals, without --detach: every child stays in the launcher's process group,
so a Ctrl-C in the terminal sends SIGINT to the launcher and to each child at
once. Each child shuts down gracefully by itself; the launcher, on its
KeyboardInterrupt, sees that the SIGINT came from the terminal (its group is
the terminal's foreground group) and only waits for the children, SIGKILLing
any still there after the grace period, so no child is signalled twice. A
SIGTERM (or a SIGINT sent to the launcher alone) is passed on once, as SIGTERM,
to each child. If the launcher is killed outright, PR_SET_PDEATHSIG (set by
services/die_with_parent.py just before it execs each child) has the
kernel send each child SIGTERM, so none outlives it.

With --detach the children get a session of their own (no terminal, no death
signal), the state file records them, and `tlbsim down` stops them later.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import cohost, prometheus
from services.common.liveness import Liveness, ready_timeout_s
from services.common.mqtt import MqttUrl
from services.common.server import sync_channel
from services.launcher.brokers import free_port, mosquitto_binary, mosquitto_config, wait_listening
from services.launcher.errors import LauncherError, UsageError
from services.launcher.state import (MOSQUITTO_CONF, POLL_S, STOP_GRACE_S, ClusterInfo,
                                     is_our_service, wait_gone)

# 256 runs on 2 cores and 24 GiB with CPUs co-hosted (README "256 CPUs"); the ids the
# services accept go to 1023 (services/common/cohost.py MAX_CPU_ID).
MAX_CPUS = 256


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    stdout: Path  # holds the ready line; a file, so no pipe can fill or break
    stderr: Path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr.read_text(errors="replace")
        except OSError:
            return "(no stderr log)"
        return "\n".join(text.splitlines()[-lines:]) or "(stderr is empty)"

    def last_line(self) -> str:
        lines = [line for line in self.tail(50).splitlines() if line.strip()]
        return lines[-1].strip()[:200] if lines else "(stderr is empty)"

    def died_error(self) -> LauncherError:
        return LauncherError(
            f"{self.name} exited with code {self.proc.returncode} before it was ready "
            f"({self.last_line()}); logs in {self.stderr.parent}, see {self.stderr.name}")


def _sigint_reached_children() -> bool:
    """True if a SIGINT came from the terminal, which signals the whole
    foreground process group: the (non-detached) children got it too."""
    try:
        with open("/dev/tty", "rb") as tty:
            return os.tcgetpgrp(tty.fileno()) == os.getpgrp()
    except OSError:
        return False


class LocalCluster:
    """The coordinator, the memory service and N CPUs as child processes."""

    def __init__(self, *, detach: bool = False, ready_timeout: float | None = None) -> None:
        self._detach = detach
        self._ready_timeout = ready_timeout  # None: derived from the cluster's size
        self._children: list[_Child] = []
        self.info: ClusterInfo | None = None  # what start() started (or adopt() was given)

    @classmethod
    def adopt(cls, info: ClusterInfo) -> LocalCluster:
        """A cluster another process started (`tlbsim up --detach`, its state file): its
        services are known by pid; those restarted here are detached as well."""
        cluster = cls(detach=True)
        cluster.info = info
        return cluster

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.stop_after(exc)

    def start(self, cpus: int, log_dir: Path | None = None, mqtt: bool = False,
              liveness: Liveness | None = None,
              per_process: int | None = None) -> ClusterInfo:
        """Start the cluster: `per_process` CPUs in each CPU process (default: chosen by
        the number of CPUs, cohost.default_per_process)."""
        if self._children:
            raise LauncherError("this cluster is already running")
        if not 1 <= cpus <= MAX_CPUS:
            raise UsageError(f"--cpus must be between 1 and {MAX_CPUS}, got {cpus}")
        per_process = cohost.default_per_process(cpus) if per_process is None else per_process
        if not 1 <= per_process <= cpus:
            raise UsageError(f"--cpus-per-process {per_process}: must be between 1 and "
                             f"--cpus ({cpus})")
        log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="tlbsim-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        groups = cohost.split(cpus, per_process)
        if self._ready_timeout is None:
            self._ready_timeout = _env_ready_timeout() or ready_timeout_s(cpus, len(groups))
        deadline = time.monotonic() + self._ready_timeout
        try:
            return self._start(groups, log_dir.resolve(), deadline,
                               mqtt, liveness or Liveness.for_cluster(cpus))
        except BaseException as exc:
            self.stop_after(exc)
            raise

    @property
    def ready_timeout(self) -> float | None:
        """Seconds each service of this cluster has to be ready (None before `start`)."""
        return self._ready_timeout

    def _start(self, groups: list[list[int]], log_dir: Path, deadline: float, mqtt: bool,
               liveness: Liveness) -> ClusterInfo:
        mqtt_url = self._start_mosquitto(log_dir, deadline) if mqtt else ""
        broker = ["--mqtt-url", mqtt_url] if mqtt_url else []
        broker += _liveness_flags(liveness)  # the coordinator and every CPU
        coordinator = self._wait_ready([self._spawn("coordinator", broker, log_dir)], deadline)
        coordinator_address = coordinator["coordinator"]["address"]
        memory = self._wait_ready(
            [self._spawn("memory", ["--coordinator", coordinator_address], log_dir)], deadline
        )
        memory_address = memory["memory"]["address"]
        # The CPUs only need memory and the coordinator, so they start together.
        cpu_children = [
            self._spawn(cohost.process_name(ids),
                        [*_ids_flags(ids), "--memory", memory_address,
                         "--coordinator", coordinator_address, *broker],
                        log_dir, service="cpu")
            for ids in groups
        ]
        ready = {**coordinator, **memory}
        for line in self._wait_ready(cpu_children, deadline).values():
            ready.update(_cpu_lines(line))
        names = ["coordinator", "memory", *(f"cpu{i}" for ids in groups for i in ids)]
        info = ClusterInfo(
            coordinator=coordinator_address,
            memory=memory_address,
            cpus={i: ready[f"cpu{i}"]["address"] for ids in groups for i in ids},
            metrics={name: int(ready[name]["metrics_port"]) for name in names},
            pids={child.name: child.proc.pid for child in self._children},
            log_dir=log_dir,
            mqtt=mqtt_url,
            liveness=liveness.as_dict(),
            hosts={cohost.process_name(ids): ids for ids in groups if len(ids) > 1},
        )
        self._wait_serving(info, info.addresses(), deadline)
        self.info = info
        return info

    def _start_mosquitto(self, log_dir: Path, deadline: float) -> str:
        """`up --mqtt`: a broker of this cluster's own on a free loopback port; returns its URL."""
        port = free_port()
        (log_dir / MOSQUITTO_CONF).write_text(mosquitto_config(port))
        self._spawn_mosquitto(log_dir, port, deadline)
        return f"mqtt://127.0.0.1:{port}/tlbsim/v1/cluster"

    def _spawn_mosquitto(self, log_dir: Path, port: int, deadline: float) -> _Child:
        """Start the broker of the configuration in `log_dir` (at start and at a restart)
        and wait until it listens on `port`."""
        binary = mosquitto_binary()
        if binary is None:
            raise LauncherError("--mqtt needs mosquitto (Debian: apt-get install mosquitto; "
                                "tools/setup-debian.sh installs it)")
        conf = log_dir / MOSQUITTO_CONF
        child = self._spawn("mosquitto", [], log_dir, cmd=[binary, "-c", str(conf)])
        if not wait_listening("127.0.0.1", port, deadline, child.proc):
            raise child.died_error() if child.proc.poll() is not None else LauncherError(
                f"mosquitto is not listening on 127.0.0.1:{port} after "
                f"{self._ready_timeout:g} s; logs in {log_dir}, see {child.stderr.name}")
        return child

    def start_prometheus(self, info: ClusterInfo) -> str:
        """`up --prometheus`: Debian's prometheus on a free loopback port, scraping every
        service of `info` with the shipped alert rules; returns its URL."""
        binary = prometheus.binary()
        if binary is None:
            raise LauncherError("--prometheus needs prometheus (Debian: apt-get install "
                                "prometheus; tools/setup-debian.sh installs it)")
        port = free_port()
        conf = info.log_dir / prometheus.CONFIG_NAME
        conf.write_text(prometheus.config(info.metrics))
        cmd = prometheus.command(binary, conf, info.log_dir / "prometheus-data", port)
        child = self._spawn("prometheus", [], info.log_dir, cmd=cmd)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + (self._ready_timeout or ready_timeout_s(0))
        if not prometheus.wait_ready(url, deadline, lambda: child.proc.poll() is None):
            raise child.died_error() if child.proc.poll() is not None else LauncherError(
                f"prometheus is not ready at {url}; logs in {info.log_dir}, see "
                f"{child.stderr.name}")
        info.pids["prometheus"] = child.proc.pid
        info.prometheus = url
        return url

    def _spawn(self, name: str, extra: list[str], log_dir: Path,
               cmd: list[str] | None = None, service: str | None = None) -> _Child:
        service = service or name.rstrip("0123456789")
        cmd = cmd or [sys.executable, "-m", "services", "serve", service,
                      "--listen", "127.0.0.1:0", "--metrics-port", "0", *extra]
        stdout, stderr = log_dir / f"{name}.out", log_dir / f"{name}.log"
        # The death signal belongs to the thread that forks: set it only from
        # the main thread, or a finished worker thread would kill the child.
        in_main = threading.current_thread() is threading.main_thread()
        use_pdeathsig = not self._detach and in_main and sys.platform == "linux"
        if use_pdeathsig:  # see services/die_with_parent.py for why not a preexec_fn
            cmd = [sys.executable, "-m", "services.die_with_parent", str(os.getpid()), *cmd]
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                # A file is block-buffered: make the ready line appear at once.
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=self._detach,
            )
        child = _Child(name, proc, stdout, stderr)
        self._children.append(child)
        return child

    def _wait_ready(self, children: list[_Child], deadline: float) -> dict[str, dict]:
        """Wait for each child's ready line; return them by child name."""
        ready: dict[str, dict] = {}
        while len(ready) < len(children):
            for child in children:
                if child.name in ready:
                    continue
                line = _read_ready_line(child.stdout)
                if line is not None:
                    ready[child.name] = line
                elif child.proc.poll() is not None:
                    raise child.died_error()
                elif time.monotonic() > deadline:
                    waiting = [c.name for c in children if c.name not in ready]
                    raise LauncherError(
                        f"{child.name}{f' and {len(waiting) - 1} more' if len(waiting) > 1 else ''}"
                        f" not ready after {self._ready_timeout:g} s (the ready timeout: "
                        f"--ready-timeout, TLBSIM_READY_TIMEOUT); logs in "
                        f"{child.stderr.parent}, see {child.stderr.name}")
            time.sleep(POLL_S * max(1, len(children) // 8))  # 64 files: less often
        return ready

    def _wait_serving(self, info: ClusterInfo, addresses: dict[str, str],
                      deadline: float) -> None:
        """Every service of `addresses` (by name: cpuN, memory, ...) answers SERVING."""
        by_process = {child.name: child for child in self._children}
        children = {name: by_process[info.process_running(name)] for name in addresses}
        for name, address in addresses.items():
            with sync_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while (status := _health_status(stub)) != "SERVING":
                    if children[name].proc.poll() is not None:
                        raise children[name].died_error()
                    if time.monotonic() > deadline:
                        raise LauncherError(
                            f"{name} at {address} is not SERVING after "
                            f"{self._ready_timeout:g} s (last: {status}); logs in "
                            f"{children[name].stderr.parent}, see {children[name].stderr.name}")
                    time.sleep(POLL_S)

    # --- process-level faults (services/common/chaos.py KINDS) -------------------------
    # A CPU that shares its process (`up --cpus-per-process K`) cannot die alone: killing
    # or restarting "cpuN" kills or restarts its whole process, every CPU in it (K CPU
    # failures, fenced and rejoining as one would). `cpus_killed` says which.
    def process_for(self, name: str) -> str:
        """The process a service name (coordinator, memory, cpuN, cpusA-B, mosquitto)
        runs in: for a co-hosted CPU, the process it shares."""
        info = self._require_info()
        process = info.process_running(name)
        if process not in info.pids:
            raise LauncherError(f"no {name} in this cluster (has {', '.join(info.pids)})")
        return process

    def cpus_killed(self, name: str) -> list[int]:
        """The CPUs a kill or restart of `name` takes down with it."""
        return self._require_info().cpus_of(self.process_for(name))

    def kill(self, name: str) -> None:
        """SIGKILL one service's process (coordinator, memory, cpuN and every CPU it
        shares a process with, mosquitto) and wait until it is gone: no goodbye, as a
        crash. Only a process that is still ours is signalled."""
        info = self._require_info()
        name = self.process_for(name)
        pid = info.pids[name]
        child = next((c for c in self._children if c.name == name), None)
        if child is not None:
            if child.proc.poll() is None:
                child.proc.kill()
            child.proc.wait()
            self._children.remove(child)
        elif is_our_service(pid):
            os.kill(pid, signal.SIGKILL)
            if wait_gone([pid], STOP_GRACE_S):
                raise LauncherError(f"{name} (pid {pid}) did not die on SIGKILL")

    def restart(self, name: str, kill: bool = True) -> float:
        """(SIGKILL and) start a service's process again (a co-hosted CPU: its whole
        process) at its addresses and metrics ports, so every peer finds each service
        where it was; wait until they serve. Returns the seconds it took."""
        info = self._require_info()
        t0 = time.monotonic()
        if name != "mosquitto":  # a stopped broker is started again where it was
            name = self.process_for(name)
        if kill:
            self.kill(name)
        deadline = t0 + (self._ready_timeout or ready_timeout_s(1))
        self._rotate_logs(name)
        if name == "mosquitto":
            if not info.mqtt or not (info.log_dir / MOSQUITTO_CONF).exists():
                raise LauncherError("this cluster has no MQTT broker to start")
            child = self._spawn_mosquitto(info.log_dir, MqttUrl.parse(info.mqtt).port, deadline)
            info.pids[name] = child.proc.pid
            return time.monotonic() - t0
        cpus = info.cpus_of(name)
        services = [f"cpu{i}" for i in cpus] or [name]
        addresses = {s: a for s, a in info.addresses().items() if s in services}
        if len(addresses) != len(services):
            raise LauncherError(f"no {name} in this cluster")
        broker = ["--mqtt-url", info.mqtt] if info.mqtt else []
        broker += _liveness_flags(info.liveness_settings())  # as it was started
        if name == "coordinator":
            extra = broker
        elif name == "memory":
            extra = ["--coordinator", info.coordinator]
        else:
            extra = [*_ids_flags(cpus), "--memory", info.memory, "--coordinator",
                     info.coordinator, *broker]
        extra += ["--listen", ",".join(addresses.values()), "--metrics-port",
                  ",".join(str(info.metrics.get(s, 0)) for s in services)]
        child = self._spawn(name, extra, info.log_dir, service="cpu" if cpus else None)
        self._wait_ready([child], deadline)
        self._wait_serving(info, addresses, deadline)
        info.pids[name] = child.proc.pid
        return time.monotonic() - t0

    def _require_info(self) -> ClusterInfo:
        if self.info is None:
            raise LauncherError("this cluster is not running")
        return self.info

    def _rotate_logs(self, name: str) -> None:
        """Keep the previous incarnation's logs as NAME.N.out/.log (the ready line is read
        from NAME.out, which must start empty)."""
        log_dir = self._require_info().log_dir
        n = 1
        while (log_dir / f"{name}.{n}.log").exists():
            n += 1
        for ext in ("out", "log"):
            old = log_dir / f"{name}.{ext}"
            if old.exists():
                old.rename(log_dir / f"{name}.{n}.{ext}")

    def first_exit(self) -> tuple[str, int, Path] | None:
        """Name, exit code and stderr log of a child that has exited, if any."""
        for child in self._children:
            if child.proc.poll() is not None:
                return child.name, child.proc.returncode, child.stderr
        return None

    def stop_after(self, exc: BaseException | None) -> None:
        """Stop, without re-signalling children that a terminal Ctrl-C reached."""
        reached = isinstance(exc, KeyboardInterrupt) and not self._detach and _sigint_reached_children()
        self.stop(already_signalled=reached)

    def stop(self, *, already_signalled: bool = False) -> None:
        """SIGTERM every child (unless already signalled), wait, SIGKILL leftovers."""
        children, self._children = self._children, []
        if not already_signalled:
            for child in reversed(children):
                if child.proc.poll() is None:
                    child.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def _env_ready_timeout() -> float | None:
    """TLBSIM_READY_TIMEOUT: every command that starts a cluster (up, bench, demo, soak)."""
    value = os.environ.get("TLBSIM_READY_TIMEOUT")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LauncherError(f"TLBSIM_READY_TIMEOUT={value!r}: must be a positive number "
                            "of seconds")
    return seconds


def _ids_flags(ids: list[int]) -> list[str]:
    """How `serve cpu` is told its CPUs: --id N for one (as always), --ids for several."""
    return ["--id", str(ids[0])] if len(ids) == 1 else ["--ids", cohost.format_ids(ids)]


def _cpu_lines(line: dict) -> dict[str, dict]:
    """A CPU process's ready line as one line per CPU it hosts, by service name."""
    return {f"cpu{node['id']}": node for node in line.get("nodes") or [line]}


def _liveness_flags(liveness: Liveness) -> list[str]:
    return ["--heartbeat-interval", f"{liveness.heartbeat_s:g}",
            "--heartbeat-timeout", f"{liveness.heartbeat_timeout_s:g}",
            "--lease", f"{liveness.lease_s:g}"]


def _read_ready_line(path: Path) -> dict | None:
    """The first complete `{"event": "ready", ...}` line in path, if any yet."""
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # still being written
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("event") == "ready":
            return data
    return None


def _health_status(stub: health_pb2_grpc.HealthStub) -> str:
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError as exc:
        return str(exc.code())
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
