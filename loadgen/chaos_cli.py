"""`tlbsim chaos KIND …`: inject one fault into a cluster started by `tlbsim up --detach`
(its state file names every process). The kinds and their designed outcomes are in
services/common/chaos.py and the README."""
from __future__ import annotations

import argparse
import asyncio

from loadgen.faults import Injector
from services.common.chaos import KINDS, FaultPlan
from services.common import exitcodes
from services.common.errors import InvalidArgument, Unavailable
from services.common.paths import check_writable_dir, check_writable_file

CPU_KINDS = ("delay-acks", "drop-flushes", "partition")


def add_commands(sub) -> None:
    c = sub.add_parser(
        "chaos", help="inject a fault into a running `tlbsim up --detach` cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Inject one fault into the cluster of the state file (`tlbsim up "
                    "--detach`). CPU faults (delay-acks, drop-flushes, partition) stay until "
                    "`tlbsim chaos heal`, or for --for SECONDS; process faults kill a "
                    "service with SIGKILL and start it again at its address.\n\nkinds and "
                    "their designed outcome:\n"
                    + "\n".join(f"  {k:20} {v}" for k, v in KINDS.items())
                    + "\n  heal                 clear the fault plan of --cpu (default: every "
                      "CPU)\n  start-broker         start the MQTT broker stopped by "
                      "stop-broker")
    c.add_argument("kind", choices=[*KINDS, "heal", "start-broker"], metavar="KIND",
                   help="one of: " + ", ".join([*KINDS, "heal", "start-broker"]))
    c.add_argument("--cpu", type=int, help="the CPU (kill-cpu, delay-acks, drop-flushes, "
                                           "partition; heal: default every CPU)")
    c.add_argument("--delay", type=float, default=2.0,
                   help="delay-acks: seconds each ack is held (default 2.0, past the default "
                        "1 s deadline)")
    c.add_argument("--fraction", type=float, default=0.5,
                   help="drop-flushes: share of deliveries lost, 0..1 (default 0.5)")
    c.add_argument("--seed", type=int, default=0, help="drop-flushes: seed of the losses")
    c.add_argument("--for", dest="hold", type=float, metavar="SECONDS",
                   help="CPU faults and stop-broker: heal (restart the broker) after this "
                        "long, then exit; default: leave the fault in place")
    c.add_argument("--state", metavar="PATH", help="state file of `tlbsim up --detach`")
    c.set_defaults(func=_chaos)


def _chaos(args: argparse.Namespace) -> int:
    from services.launcher import (LauncherError, LocalCluster, UsageError, load_state,
                                   state_path, write_state)
    if args.hold is not None and not 0 < args.hold <= 3600:
        raise InvalidArgument("--for must be in (0, 3600] seconds")
    needs_cpu = args.kind in (*CPU_KINDS, "kill-cpu")
    if needs_cpu and args.cpu is None:
        raise InvalidArgument(f"chaos {args.kind} needs --cpu N")
    try:
        info = load_state(args.state)
    except UsageError as e:
        raise InvalidArgument(str(e)) from None
    except LauncherError as e:
        raise Unavailable(str(e)) from None
    local = LocalCluster.adopt(info)
    faults = Injector(local)
    plan = {"delay-acks": lambda: FaultPlan(ack_delay_s=args.delay),
            "drop-flushes": lambda: FaultPlan(drop_fraction=args.fraction, seed=args.seed),
            "partition": lambda: FaultPlan(partitioned=True)}.get(args.kind, lambda: None)()

    async def main() -> str:
        if plan is not None:
            await faults.set_plan(args.cpu, plan)
            if args.hold is None:
                return f"cpu {args.cpu}: {args.kind} until `tlbsim chaos heal --cpu {args.cpu}`"
            await asyncio.sleep(args.hold)
            await faults.set_plan(args.cpu, FaultPlan())
            return f"cpu {args.cpu}: {args.kind} for {args.hold:g} s, healed"
        if args.kind == "heal":
            cpus = [args.cpu] if args.cpu is not None else faults.cpus()
            await asyncio.gather(*(faults.set_plan(c, FaultPlan()) for c in cpus))
            return f"healed cpus {cpus}"
        if args.kind == "kill-cpu":
            faults._cpu_address(args.cpu)  # a known CPU
            took = await faults.restart(f"cpu{args.cpu}")
            return f"cpu {args.cpu} killed and serving again after {took:.1f} s"
        if args.kind in ("restart-coordinator", "restart-memory"):
            name = args.kind.split("-", 1)[1]
            took = await faults.restart(name)
            lost = " (the simulated machine is lost: start a new run)" \
                if name == "memory" else ""
            return f"{name} killed and serving again after {took:.1f} s{lost}"
        if args.kind == "stop-broker":
            await faults.stop_broker()
            if args.hold is None:
                return "MQTT broker stopped until `tlbsim chaos start-broker`"
            await asyncio.sleep(args.hold)
            await faults.start_broker()
            return f"MQTT broker stopped for {args.hold:g} s, started again"
        await faults.start_broker()
        return "MQTT broker started"

    try:
        print(asyncio.run(main()))
    finally:
        write_state(state_path(args.state), info)  # restarted processes have new pids
    return 0


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a duration (e.g. 90s, 10m)") from None
    if not 0 < seconds <= 7 * 86400:
        raise InvalidArgument(f"duration {text!r} must be positive and at most a week")
    return seconds


def add_soak_command(load_sub) -> None:
    s = load_sub.add_parser(
        "soak", help="the mixed workload for a long time, with periodic faults (--chaos)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the mixed workload in segments (one run each: reset, load, audit; "
                    "the transport rotates grpc, stream, mqtt) on a local cluster the soak "
                    "starts (or the `tlbsim up --detach` one of --state), and with --chaos "
                    "inject a fault every --chaos-every seconds, in a seeded cycle over: "
                    "kill-cpu, delay-acks, drop-flushes, partition, restart-coordinator, "
                    "stop-broker (when the cluster has MQTT). It checks the oracle, every "
                    "segment's audit, frames freed without acknowledgement, hung calls, and "
                    "that every CPU rejoins; it prints ops, faults by kind and violations, "
                    "and exits 1 on any violation.\n\n"
                    "example:\n  tlbsim load soak --duration 10m --chaos --cpus 4 --json soak.json")
    s.add_argument("--duration", default="60s", help="how long, e.g. 90s, 10m (default 60s)")
    s.add_argument("--chaos", action="store_true", help="inject faults periodically")
    s.add_argument("--chaos-every", default="5s",
                   help="pause between two faults (default 5s)")
    s.add_argument("--cpus", type=int, default=4, help="CPUs (default 4)")
    s.add_argument("--seed", type=int, default=0, help="seed of the workload and the faults")
    s.add_argument("--segment", default="20s",
                   help="length of one run of the workload (default 20s)")
    s.add_argument("--deadline", type=float, default=1.0,
                   help="shootdown deadline in seconds (default 1.0)")
    s.add_argument("--pages", type=int, default=64,
                   help="pages of the shared region; buffers are up to 64 pages (default 64)")
    s.add_argument("--state", metavar="PATH",
                   help="soak the `tlbsim up --detach` cluster of this state file (default: "
                        "start one; the soak must be able to kill its processes)")
    s.add_argument("--log-dir", metavar="DIR", help="service logs of the soak's own cluster")
    s.add_argument("--json", metavar="PATH", help="write the JSON report here ('-' = stdout)")
    s.set_defaults(func=_soak)


def _soak(args: argparse.Namespace) -> int:
    from loadgen import output
    from loadgen.soak import SoakConfig, run_soak
    if not 1 <= args.cpus <= 64:
        raise InvalidArgument("--cpus must be between 1 and 64")
    if not 0.1 <= args.deadline <= 60:
        raise InvalidArgument("--deadline must be in [0.1, 60] seconds")
    if not 1 <= args.pages <= 1 << 16:
        raise InvalidArgument("--pages must be in [1, 65536]")
    check_writable_file(args.json, "--json", stdout_ok=True)
    check_writable_dir(args.log_dir, "--log-dir")
    cfg = SoakConfig(duration_s=parse_duration(args.duration), cpus=args.cpus,
                     chaos=args.chaos, chaos_every_s=parse_duration(args.chaos_every),
                     seed=args.seed, segment_s=parse_duration(args.segment),
                     deadline_s=args.deadline, pages=args.pages)
    report = run_soak(cfg, args.state, args.log_dir)
    print_soak(report)
    output.write_json(report, args.json)
    if not report["ok"]:
        return exitcodes.UNSAFE
    return exitcodes.INTERRUPTED if report.get("interrupted") else exitcodes.OK


def print_soak(report: dict) -> None:
    from rich.table import Table

    from loadgen.output import console, err_console
    r = report["results"]
    table = Table(title=f"soak: {report['config']['cpus']} CPUs, {r['duration_s']:.0f} s, "
                        f"{r['segments']} segments, chaos "
                        f"{'on' if report['config']['chaos'] else 'off'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("ops", "shootdowns", "faults_injected", "stale_accesses", "audit_violations",
                "audit_entries_checked", "frames_freed_without_ack", "hung_calls",
                "timed_out_calls", "deadline_misses", "cpus_left", "fenced_seen", "rejoined",
                "rejoin_s_max", "redeliveries", "unknown_targets", "shootdown_retries"):
        table.add_row(key.replace("_", " "), str(r[key]))
    for kind, n in r["faults"].items():
        table.add_row(f"  fault {kind}", str(n))
    for code, n in r["failed_calls"].items():
        table.add_row(f"  calls failed {code}", str(n))
    console.print(table)
    for text in report["errors"][:5]:
        err_console.print(f"note: {text}")
    for text in report["violations"]:
        err_console.print(f"violation: {text}")
    if not report["ok"]:
        err_console.print("soak: FAILED")
