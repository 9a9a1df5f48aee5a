"""`tlbsim up` and `tlbsim down`: a local cluster in the foreground, or detached with a
state file (the `tlbsim` root, loadgen/cli/main.py, registers them)."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.cli import add_liveness_options, liveness_from
from services.common import cohost, exitcodes
from services.common.errors import InvalidArgument, SimError
from services.common.paths import check_writable_dir, check_writable_file
from services.launcher.errors import AlreadyRunning, LauncherError, UsageError
from services.launcher.processes import MAX_CPUS, LocalCluster
from services.launcher.state import (ClusterInfo, down_command, is_our_service, load_state,
                                     state_path, stop_pids, write_state)


class _Terminated(BaseException):
    """Raised in the main thread when `tlbsim up` receives SIGTERM."""


def _print_cluster(info: ClusterInfo) -> None:
    rows = [(name, address, str(info.metrics.get(name, "")),
             str(info.pids.get(info.process_running(name), "")))
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
    if any(is_our_service(pid) for pid in info.pids.values()):
        raise AlreadyRunning(f"a cluster is already running (state {file}); stop it with "
                             f"`{down_command(file)}`, or give another --state")


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
    try:
        check_writable_dir(file.parent, "--state")
        check_writable_file(file, "--state")
        check_writable_dir(log_dir, "--log-dir")
    except InvalidArgument as e:
        raise UsageError(e.message) from None


def cmd_up(args: argparse.Namespace) -> int:
    if not 1 <= args.cpus <= MAX_CPUS:
        print(f"tlbsim up: --cpus must be between 1 and {MAX_CPUS}, got {args.cpus}", file=sys.stderr)
        return exitcodes.USAGE
    per_process = args.cpus_per_process
    if per_process is not None and not 1 <= per_process <= args.cpus:
        print(f"tlbsim up: --cpus-per-process {per_process}: must be between 1 and --cpus "
              f"({args.cpus})", file=sys.stderr)
        return exitcodes.USAGE
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
        info = cluster.start(args.cpus, args.log_dir, mqtt=args.mqtt, liveness=liveness,
                             per_process=per_process)
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
    up.add_argument(
        "--cpus-per-process", type=int, metavar="K",
        help="simulated CPUs hosted in each CPU process, each still its own gRPC server, "
             "port, TLB, lease and metrics port; a crash of the process is K CPU failures "
             "(chaos kill-cpu of one of them kills and restarts all K). Default: 1 up to "
             f"{cohost.SEPARATE_UP_TO} CPUs (a crash is one CPU), beyond that "
             f"ceil(N/{cohost.MAX_PROCESSES}), at most {cohost.MAX_PROCESSES} CPU processes: "
             "measured on 2 cores, a CPU process costs ~46 MiB and a CPU-second to start "
             "and a co-hosted CPU ~0.2 MiB, but one process is one core of Python "
             "(fault-scaling at 16 CPUs: 10-12 s in 16 or 4 processes, 24 s in one) "
             "(README \"256 CPUs\")")
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
    add_liveness_options(up)
    up.add_argument("--ready-timeout", type=float, metavar="S",
                    help="seconds every service has to be ready (default: 30 + 1.5 per CPU "
                         "process + 0.1 per CPU) "
                         "[TLBSIM_READY_TIMEOUT, which bench, demo and soak read too]")
    up.set_defaults(func=cmd_up)

    down = subparsers.add_parser(
        "down",
        help="stop a cluster started with `tlbsim up --detach`",
        description="Stop the processes recorded in the state file and remove it.",
    )
    down.add_argument("--state", help=state_help)
    down.set_defaults(func=cmd_down)
