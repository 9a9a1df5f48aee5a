"""Run a tlbsim cluster on this machine as real processes (`tlbsim up` / `down`).

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

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from services.common.errors import Unavailable
from services.common.liveness import Liveness, ready_timeout_s
from services.common.mqtt import MqttUrl
from services.common.server import sync_channel

MAX_CPUS = 64
STOP_GRACE_S = 5.0
POLL_S = 0.02


class LauncherError(Unavailable):
    """A launcher failure with a one-line message meant for the user (a SimError, so
    every command that starts a cluster prints it as its one-line error)."""


class UsageError(LauncherError):
    """A bad option of `up`/`down`, or a state file that is not one (exit 2)."""


class AlreadyRunning(UsageError):
    """`tlbsim up` with a state file whose cluster still runs."""


class _Terminated(BaseException):
    """Raised in the main thread when `tlbsim up` receives SIGTERM."""


@dataclass
class ClusterInfo:
    coordinator: str
    memory: str
    cpus: dict[int, str]
    metrics: dict[str, int]  # service name (coordinator, memory, cpu0, ...) -> port
    pids: dict[str, int]
    log_dir: Path
    mqtt: str = ""  # the broker of `up --mqtt`, mqtt://127.0.0.1:PORT/ROOT; "" without one
    prometheus: str = ""  # `up --prometheus`: its URL, http://127.0.0.1:PORT; "" without one
    # Heartbeats and lease every CPU and the coordinator run with (Liveness.as_dict());
    # a restarted service gets the same. {}: derived from the number of CPUs.
    liveness: dict = field(default_factory=dict)

    def liveness_settings(self) -> Liveness:
        return Liveness(**self.liveness) if self.liveness else \
            Liveness.for_cluster(max(1, len(self.cpus)))

    def addresses(self) -> dict[str, str]:
        """gRPC address of every service, by name, in start order."""
        cpus = {f"cpu{i}": address for i, address in sorted(self.cpus.items())}
        return {"coordinator": self.coordinator, "memory": self.memory, **cpus}

    def to_json(self) -> str:
        data = asdict(self)
        data["cpus"] = {str(i): address for i, address in self.cpus.items()}
        data["log_dir"] = str(self.log_dir)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterInfo:
        data = json.loads(text)
        return cls(
            coordinator=data["coordinator"],
            memory=data["memory"],
            cpus={int(i): address for i, address in data["cpus"].items()},
            metrics=dict(data["metrics"]),
            pids=dict(data["pids"]),
            log_dir=Path(data["log_dir"]),
            mqtt=data.get("mqtt", ""),
            prometheus=data.get("prometheus", ""),
            liveness=dict(data.get("liveness") or {}),
        )


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
              liveness: Liveness | None = None) -> ClusterInfo:
        if self._children:
            raise LauncherError("this cluster is already running")
        if not 1 <= cpus <= MAX_CPUS:
            raise LauncherError(f"cpus must be between 1 and {MAX_CPUS}, got {cpus}")
        log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="tlbsim-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        if self._ready_timeout is None:
            self._ready_timeout = _env_ready_timeout() or ready_timeout_s(cpus)
        deadline = time.monotonic() + self._ready_timeout
        try:
            return self._start(cpus, log_dir.resolve(), deadline, mqtt,
                               liveness or Liveness.for_cluster(cpus))
        except BaseException as exc:
            self.stop_after(exc)
            raise

    def _start(self, cpus: int, log_dir: Path, deadline: float, mqtt: bool,
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
            self._spawn(
                f"cpu{i}",
                ["--id", str(i), "--memory", memory_address, "--coordinator", coordinator_address,
                 *broker],
                log_dir,
            )
            for i in range(cpus)
        ]
        ready = {**coordinator, **memory, **self._wait_ready(cpu_children, deadline)}
        info = ClusterInfo(
            coordinator=coordinator_address,
            memory=memory_address,
            cpus={i: ready[f"cpu{i}"]["address"] for i in range(cpus)},
            metrics={name: int(line["metrics_port"]) for name, line in ready.items()},
            pids={child.name: child.proc.pid for child in self._children},
            log_dir=log_dir,
            mqtt=mqtt_url,
            liveness=liveness.as_dict(),
        )
        self._wait_serving(info.addresses(), deadline)
        self.info = info
        return info

    def _start_mosquitto(self, log_dir: Path, deadline: float) -> str:
        """`up --mqtt`: a broker of this cluster's own on a free loopback port; returns its URL."""
        binary = mosquitto_binary()
        if binary is None:
            raise LauncherError("--mqtt needs mosquitto (Debian: apt-get install mosquitto; "
                                "tools/setup-debian.sh installs it)")
        port = free_port()
        conf = log_dir / MOSQUITTO_CONF
        conf.write_text(mosquitto_config(port))
        child = self._spawn("mosquitto", [], log_dir, cmd=[binary, "-c", str(conf)])
        if not wait_listening("127.0.0.1", port, deadline, child.proc):
            raise child.died_error() if child.proc.poll() is not None else LauncherError(
                f"mosquitto is not listening on 127.0.0.1:{port} after "
                f"{self._ready_timeout:g} s; logs in {log_dir}, see {child.stderr.name}")
        return f"mqtt://127.0.0.1:{port}/tlbsim/v1/cluster"

    def start_prometheus(self, info: ClusterInfo) -> str:
        """`up --prometheus`: Debian's prometheus on a free loopback port, scraping every
        service of `info` with the shipped alert rules; returns its URL."""
        from services.common import prometheus

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
               cmd: list[str] | None = None) -> _Child:
        service = name.rstrip("0123456789")
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

    def _wait_serving(self, addresses: dict[str, str], deadline: float) -> None:
        children = {child.name: child for child in self._children}
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
    def kill(self, name: str) -> None:
        """SIGKILL one service (coordinator, memory, cpuN, mosquitto) and wait until it is
        gone: no goodbye, as a crash. Only a process that is still ours is signalled."""
        info = self._require_info()
        pid = info.pids.get(name)
        if pid is None:
            raise LauncherError(f"no {name} in this cluster (has {', '.join(info.pids)})")
        child = next((c for c in self._children if c.name == name), None)
        if child is not None:
            if child.proc.poll() is None:
                child.proc.kill()
            child.proc.wait()
            self._children.remove(child)
        elif _is_our_service(pid):
            os.kill(pid, signal.SIGKILL)
            if _wait_gone([pid], STOP_GRACE_S):
                raise LauncherError(f"{name} (pid {pid}) did not die on SIGKILL")

    def restart(self, name: str, kill: bool = True) -> float:
        """(SIGKILL and) start a service again at its address and metrics port, so every
        peer finds it where it was; wait until it serves. Returns the seconds it took."""
        info = self._require_info()
        t0 = time.monotonic()
        if kill:
            self.kill(name)
        deadline = t0 + (self._ready_timeout or ready_timeout_s(1))
        self._rotate_logs(name)
        if name == "mosquitto":
            conf = info.log_dir / MOSQUITTO_CONF
            binary = mosquitto_binary()
            if not info.mqtt or binary is None or not conf.exists():
                raise LauncherError("this cluster has no MQTT broker to start")
            port = MqttUrl.parse(info.mqtt).port
            child = self._spawn("mosquitto", [], info.log_dir, cmd=[binary, "-c", str(conf)])
            if not wait_listening("127.0.0.1", port, deadline, child.proc):
                raise child.died_error()
            info.pids[name] = child.proc.pid
            return time.monotonic() - t0
        address = info.addresses().get(name)
        if address is None:
            raise LauncherError(f"no {name} in this cluster")
        broker = ["--mqtt-url", info.mqtt] if info.mqtt else []
        broker += _liveness_flags(info.liveness_settings())  # as it was started
        if name == "coordinator":
            extra = broker
        elif name == "memory":
            extra = ["--coordinator", info.coordinator]
        else:
            extra = ["--id", name[3:], "--memory", info.memory, "--coordinator",
                     info.coordinator, *broker]
        extra += ["--listen", address, "--metrics-port", str(info.metrics.get(name, 0))]
        child = self._spawn(name, extra, info.log_dir)
        self._wait_ready([child], deadline)
        self._wait_serving({name: address}, deadline)
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


# --- the MQTT broker (up --mqtt; the tests start theirs with the same pieces) ---

MOSQUITTO_CONF = "tlbsim-mosquitto.conf"  # also how `tlbsim down` recognises our broker


def mosquitto_binary() -> str | None:
    """Debian installs it in /usr/sbin, which is not on every user's PATH."""
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    return found


def mosquitto_config(port: int) -> str:
    return (
        "# generated by tlbsim: the broker of one cluster's mqtt shootdown transport\n"
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true      # loopback only\n"
        "persistence false         # a simulation: nothing survives a restart\n"
        "set_tcp_nodelay true      # Nagle on: ~88 ms per shootdown instead of ~2\n"
        "max_queued_messages 10000\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, deadline: float, proc: subprocess.Popen) -> bool:
    """Wait until something accepts on host:port (False if proc exits or time runs out)."""
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(POLL_S)
    return False


# --- state file ------------------------------------------------------------

def state_path(path: str | None) -> Path:
    default = os.environ.get("TLBSIM_STATE") or Path.home() / ".tlbsim" / "cluster.json"
    return Path(path or default).expanduser()


def load_state(path: str | None) -> ClusterInfo:
    file = state_path(path)
    try:
        return ClusterInfo.from_json(file.read_text())
    except FileNotFoundError:
        raise LauncherError(f"no cluster state at {file}; start one with `tlbsim up --detach`") from None
    except OSError as exc:  # a folder, unreadable, ...
        raise UsageError(f"cannot read the cluster state {file}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"unreadable cluster state {file}: {exc!r}") from None


def write_state(file: Path, info: ClusterInfo) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(info.to_json() + "\n")
    tmp.replace(file)  # readers never see half a file


# --- processes known only by pid (tlbsim down) ------------------------------

def _is_our_service(pid: int) -> bool:
    """Alive and running `services serve` (the pid may have been reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    ours = b"services serve" in cmdline or MOSQUITTO_CONF.encode() in cmdline \
        or b"tlbsim-prometheus.yml" in cmdline  # services.common.prometheus.CONFIG_NAME
    return ours and _is_alive(pid)


def _is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for the pids to exit; return those still alive after timeout."""
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _is_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return alive


def stop_pids(pids: dict[str, int]) -> int:
    """SIGTERM our services among pids, SIGKILL them after the grace period;
    return how many were running."""
    ours = [pid for pid in pids.values() if _is_our_service(pid)]
    _signal_all(ours, signal.SIGTERM)
    leftovers = _wait_gone(ours, STOP_GRACE_S)
    _signal_all(leftovers, signal.SIGKILL)
    _wait_gone(leftovers, 1.0)
    return len(ours)


# --- commands ----------------------------------------------------------------

def _print_cluster(info: ClusterInfo) -> None:
    rows = [(name, address, str(info.metrics.get(name, "")), str(info.pids.get(name, "")))
            for name, address in info.addresses().items()]
    if not sys.stdout.isatty():
        for name, address, metrics, _ in rows:
            print(f"{name} {address} metrics {metrics}", flush=True)
        return
    table = Table("service", "address", "metrics port", "pid")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _refuse_if_running(file: Path) -> None:
    try:
        info = load_state(str(file))
    except LauncherError:
        return  # no state, or a broken one: nothing we could stop anyway
    if any(_is_our_service(pid) for pid in info.pids.values()):
        raise AlreadyRunning(f"a cluster is already running (state {file}); stop it with "
                             f"`{down_command(file)}`, or give another --state")


def down_command(file: Path) -> str:
    """How to stop the cluster of this state file."""
    return "tlbsim down" if file == state_path(None) else f"tlbsim down --state {file}"


def _supervise(cluster: LocalCluster) -> int:
    """Block until Ctrl-C/SIGTERM (exit 0) or a child dies (exit 1)."""
    try:
        while (exited := cluster.first_exit()) is None:
            time.sleep(0.2)
    except (KeyboardInterrupt, _Terminated) as exc:
        print("tlbsim up: stopping the cluster", file=sys.stderr)
        cluster.stop_after(exc)
        return 0
    name, code, log = exited
    print(f"tlbsim up: {name} exited unexpectedly with code {code} (log: {log}); "
          "stopping the rest", file=sys.stderr)
    cluster.stop()
    return 1


def _check_paths(file: Path, log_dir: Path | None) -> None:
    """The state file and the log folder can be written: checked before anything starts."""
    from services.common.errors import InvalidArgument
    from services.common.paths import check_writable_dir, check_writable_file
    try:
        check_writable_dir(file.parent, "--state")
        check_writable_file(file, "--state")
        check_writable_dir(log_dir, "--log-dir")
    except InvalidArgument as e:
        raise UsageError(e.message) from None


def cmd_up(args: argparse.Namespace) -> int:
    from services.common import exitcodes
    if not 1 <= args.cpus <= MAX_CPUS:
        print(f"tlbsim up: --cpus must be between 1 and {MAX_CPUS}, got {args.cpus}", file=sys.stderr)
        return exitcodes.USAGE
    from services.cli import liveness_from
    from services.common.errors import SimError
    file = state_path(args.state)
    try:
        liveness = liveness_from(args, args.cpus)
        ready_timeout = args.ready_timeout
        if ready_timeout is not None and not ready_timeout > 0:
            raise ValueError(f"--ready-timeout {ready_timeout:g}: must be positive")
    except (SimError, ValueError) as exc:
        print(f"tlbsim up: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return exitcodes.USAGE
    cluster = LocalCluster(detach=args.detach, ready_timeout=ready_timeout)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _check_paths(file, args.log_dir)
        _refuse_if_running(file)
        info = cluster.start(args.cpus, args.log_dir, mqtt=args.mqtt, liveness=liveness)
        if args.prometheus:
            cluster.start_prometheus(info)
    except LauncherError as exc:
        cluster.stop()
        print(f"tlbsim up: {exc}", file=sys.stderr)
        return exitcodes.USAGE if isinstance(exc, UsageError) else exitcodes.NO_CLUSTER
    except (KeyboardInterrupt, _Terminated):
        return exitcodes.INTERRUPTED  # start() has already stopped what it started
    write_state(file, info)
    _print_cluster(info)
    if info.mqtt:
        print(f"mqtt {info.mqtt}", flush=True)
    if info.prometheus:
        print(f"prometheus {info.prometheus}", flush=True)
    print(f"logs: {info.log_dir}  state: {file}", file=sys.stderr)
    if args.detach:
        print(f"detached; stop it with `{down_command(file)}`", file=sys.stderr)
        return exitcodes.OK
    print("running; Ctrl-C stops it", file=sys.stderr)
    try:
        return exitcodes.NO_CLUSTER if _supervise(cluster) else exitcodes.OK
    finally:
        file.unlink(missing_ok=True)


def cmd_down(args: argparse.Namespace) -> int:
    from services.common import exitcodes
    try:
        info = load_state(args.state)
    except LauncherError as exc:
        print(f"tlbsim down: {exc}", file=sys.stderr)
        return exitcodes.USAGE if isinstance(exc, UsageError) else exitcodes.NO_CLUSTER
    stopped = stop_pids(info.pids)
    state_path(args.state).unlink(missing_ok=True)
    print(f"stopped {stopped} of {len(info.pids)} processes")
    return exitcodes.OK


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `up` and `down` on the tlbsim CLI's subparsers."""
    state_help = "cluster state file (default: $TLBSIM_STATE or ~/.tlbsim/cluster.json)"

    up = subparsers.add_parser(
        "up",
        help="start a local cluster (coordinator, memory, N CPUs)",
        description="Start the coordinator, the memory service and N CPU services as "
                    "local processes, print their addresses, and run until Ctrl-C or "
                    "SIGTERM (or, with --detach, leave them running for `tlbsim down`).",
    )
    up.add_argument("--cpus", type=int, default=4, help=f"number of CPU services, 1..{MAX_CPUS} (default 4)")
    up.add_argument("--detach", action="store_true", help="leave the cluster running and exit")
    up.add_argument("--mqtt", action="store_true",
                    help="also start a mosquitto broker on a free loopback port (generated "
                         "config, TCP_NODELAY) for `--transport mqtt`; stopped with the cluster")
    up.add_argument("--prometheus", action="store_true",
                    help="also start a local Prometheus (Debian's prometheus binary) on a free "
                         "loopback port, scraping every service with the alert rules of "
                         "deploy/prometheus; prints its URL; stopped with the cluster")
    up.add_argument("--state", help=state_help)
    up.add_argument("--log-dir", type=Path, help="directory for each service's logs (default: a new temp dir)")
    from services.cli import add_liveness_options
    add_liveness_options(up)
    up.add_argument("--ready-timeout", type=float, metavar="S",
                    help="seconds every service has to be ready (default: 30 + 1.5 per CPU) "
                         "[TLBSIM_READY_TIMEOUT, which bench, demo and soak read too]")
    up.set_defaults(func=cmd_up)

    down = subparsers.add_parser(
        "down",
        help="stop a cluster started with `tlbsim up --detach`",
        description="Stop the processes recorded in the state file and remove it.",
    )
    down.add_argument("--state", help=state_help)
    down.set_defaults(func=cmd_down)
