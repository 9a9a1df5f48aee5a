"""The state file of a detached cluster (`tlbsim up --detach`): what runs where, by pid,
and how to stop processes known only by their pid."""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common import prometheus
from services.common.liveness import Liveness
from services.launcher.errors import LauncherError, UsageError

MOSQUITTO_CONF = "tlbsim-mosquitto.conf"  # also how `tlbsim down` recognises our broker
STOP_GRACE_S = 5.0
POLL_S = 0.02


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
    # Which process hosts which CPUs: process name (its key in pids) -> CPU ids, for the
    # processes of `up --cpus-per-process K` > 1 (named cpusFIRST-LAST). A CPU in none of
    # them has a process of its own, named cpuN.
    hosts: dict[str, list[int]] = field(default_factory=dict)

    def process_of(self, cpu: int) -> str:
        """The name (in pids) of the process hosting CPU `cpu`."""
        return next((name for name, ids in self.hosts.items() if cpu in ids), f"cpu{cpu}")

    def process_running(self, service: str) -> str:
        """The process a service (coordinator, memory, cpuN, ...) runs in: for cpuN the
        one hosting CPU N; any other name is a process of its own."""
        tail = service[3:] if service.startswith("cpu") else ""
        return self.process_of(int(tail)) if tail.isdigit() else service

    def cpus_of(self, process: str) -> list[int]:
        """The CPUs process `process` hosts ([] for coordinator, memory, ...)."""
        if process in self.hosts:
            return list(self.hosts[process])
        tail = process[3:] if process.startswith("cpu") else ""
        return [int(tail)] if tail.isdigit() and int(tail) in self.cpus else []

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
            hosts={name: [int(i) for i in ids]
                   for name, ids in (data.get("hosts") or {}).items()},
        )



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


# --- processes known only by pid (tlbsim down, chaos on an adopted cluster) ---------------
def is_our_service(pid: int) -> bool:
    """Alive and running `services serve` (the pid may have been reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    ours = b"services serve" in cmdline or MOSQUITTO_CONF.encode() in cmdline \
        or prometheus.CONFIG_NAME.encode() in cmdline
    return ours and is_alive(pid)


def is_alive(pid: int) -> bool:
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


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for the pids to exit; return those still alive after timeout."""
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if is_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return alive


def stop_pids(pids: dict[str, int]) -> int:
    """SIGTERM our services among pids, SIGKILL them after the grace period;
    return how many were running."""
    ours = [pid for pid in pids.values() if is_our_service(pid)]
    _signal_all(ours, signal.SIGTERM)
    leftovers = wait_gone(ours, STOP_GRACE_S)
    _signal_all(leftovers, signal.SIGKILL)
    wait_gone(leftovers, 1.0)
    return len(ours)


def down_command(file: Path) -> str:
    """How to stop the cluster of this state file."""
    return "tlbsim down" if file == state_path(None) else f"tlbsim down --state {file}"
