"""`tlbsim load …`: run a scenario, compare two configurations (or sweep), replay a trace,
soak the cluster. Every subcommand of `load` is registered here."""
from __future__ import annotations

import argparse
import asyncio
import copy
import os

from loadgen import output
from loadgen.cli.options import (add_cluster_options, add_policy_options,
                                 add_workload_options, check_outputs, config_from,
                                 coordinator_address, defaults_text, parse_duration)
from loadgen.cluster import Cluster
from loadgen.runner import run
from loadgen.scenarios import DOCS, SCENARIOS
from services.common import exitcodes
from services.common.errors import InvalidArgument
from services.common.paths import check_writable_dir, check_writable_file


def add_commands(sub) -> None:
    load = sub.add_parser("load", help="drive workloads against a running cluster",
                          description="Drive workloads against a running cluster.")
    load_sub = load.add_subparsers(dest="load_command", required=True, metavar="COMMAND")
    p = load_sub.add_parser(
        "run", help="run one scenario and report (exit 1 if the oracle saw a stale access)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one scenario against a running cluster, print a table, and write "
                    "the JSON report with --json. Exits 1 when the safety oracle counted a "
                    "stale access or the final audit found a stale TLB entry (the README's "
                    "\"Exit codes\" lists the others).\n\n"
                    "scenarios (loadgen/scenarios/ says what each reproduces) and what each "
                    "runs with when no option is given:\n"
                    + "\n".join(f"  {name:14} {doc.split(' — ', 1)[-1]}\n"
                                f"  {'':14} ({defaults_text(name)})"
                                for name, doc in DOCS.items()))
    p.add_argument("scenario", choices=list(SCENARIOS))
    add_cluster_options(p)
    p.add_argument("--json", metavar="PATH", help="write the JSON report here ('-' = stdout)")
    p.add_argument("--plot", metavar="PATH.png", help="write latency CDFs and bars (PNG)")
    add_workload_options(p)
    add_policy_options(p)
    p.set_defaults(func=_run)

    c = load_sub.add_parser(
        "compare", help="two configurations side by side: medians, B/A ratio and its spread",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run SCENARIO (or a trace file) under configuration A and B on the same "
                    "cluster and seed, alternating A, B, A, B (--repeat pairs), and print each "
                    "metric's median for A and B and the median ratio B/A of the pairs with its "
                    "spread. --a/--b take KEY=VALUE,... over any option below (lock=mm, "
                    "flush=per-page, cpus=2, pages=64, transport=stream, ...). --sweep "
                    "KEY=V1,V2,... repeats the comparison for each value (a series; --csv "
                    "writes one row per run). Exits 1 when any run was unsafe.\n\n"
                    "examples:\n"
                    "  tlbsim load compare munmap --a flush=per-page --b flush=gather --cpus 4\n"
                    "  tlbsim load compare fault-scaling --a lock=mm --b lock=split --repeat 3\n"
                    "  tlbsim load compare munmap --a flush=per-page --b flush=gather "
                    "--sweep pages=1,8,64,512\n\nscenarios:\n"
                    + "\n".join(f"  {name:14} {doc.split(' — ', 1)[-1]}"
                                for name, doc in DOCS.items()))
    c.add_argument("scenario", metavar="SCENARIO|TRACE",
                   help=f"one of {', '.join(SCENARIOS)}, or a trace file to replay")
    c.add_argument("--a", default="", metavar="KEY=VALUE,...",
                   help="configuration A: overrides of the options below")
    c.add_argument("--b", default="", metavar="KEY=VALUE,...",
                   help="configuration B: overrides of the options below")
    c.add_argument("--repeat", type=int, default=1, help="A/B pairs to run (default 1)")
    c.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="compare once per value of KEY (e.g. cpus=1,2,4 or pages=1,64,512)")
    add_cluster_options(c)
    c.add_argument("--json", metavar="PATH", help="write the comparison as JSON ('-' = stdout)")
    c.add_argument("--csv", metavar="PATH", help="write one CSV row per run")
    c.add_argument("--plot", metavar="PATH.png",
                   help="write latency CDFs and per-policy bars, or sweep lines (PNG)")
    add_workload_options(c)
    add_policy_options(c)
    c.set_defaults(func=_compare, parser=c)

    r = load_sub.add_parser(
        "replay", help="replay a recorded trace of a real program on the cluster",
        description="Replay a trace written by `tlbsim trace record`: its processes and "
                    "threads go to the cluster's CPUs (round-robin over --cpus), every "
                    "memory-management call and access is replayed, and the report says how "
                    "many calls of each kind the trace holds and what became of them. "
                    "loadgen/trace/replay.py documents how brk, mremap, execve and clone map "
                    "onto the simulator. Exits 1 when the oracle saw a stale access.")
    r.add_argument("file", metavar="TRACE", help="the trace file")
    add_cluster_options(r)
    r.add_argument("--json", metavar="PATH", help="write the JSON report here ('-' = stdout)")
    r.add_argument("--plot", metavar="PATH.png", help="write latency CDFs and bars (PNG)")
    add_workload_options(r, replay=True)
    add_policy_options(r)
    r.set_defaults(func=_replay)

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
                    "that every CPU rejoins; it prints ops, injected faults by kind and violations, "
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


# --- run -----------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    cfg = config_from(args, args.scenario)
    check_outputs(args)
    address = coordinator_address(args)

    async def main() -> dict:
        async with Cluster(address) as cluster:
            with output.progress(cfg.progress_total(), f"{cfg.scenario}") as advance:
                return await run(cluster, cfg, advance)

    report = asyncio.run(main())
    output.print_report(report)
    output.write_json(report, args.json)
    if args.plot:
        from loadgen.plot import plot_report
        output.write_plot(plot_report, report, args.plot)
    code = output.verdict(report)
    if code == exitcodes.OK and report.get("interrupted"):
        return exitcodes.INTERRUPTED
    return code


# --- compare ---------------------------------------------------------------------------------
def apply_overrides(parser: argparse.ArgumentParser, base: argparse.Namespace,
                    spec: str) -> argparse.Namespace:
    """KEY=VALUE,... over the namespace, typed and checked as the option itself would be."""
    args = copy.copy(base)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, value = part.partition("=")
        dest = key.strip().lstrip("-").replace("-", "_")
        if not sep or dest not in actions or dest in ("json", "csv", "plot", "a", "b",
                                                      "sweep", "repeat", "cluster", "state",
                                                      "help"):
            raise InvalidArgument(f"{part!r}: expected KEY=VALUE with KEY an option of this "
                                  "command (lock, flush, cpus, pages, transport, ...)")
        action = actions[dest]
        convert = action.type if callable(action.type) else None
        try:
            typed = convert(value) if convert else value
        except (TypeError, ValueError):
            raise InvalidArgument(f"{part!r}: {value!r} is not a valid {key}") from None
        if action.choices is not None and typed not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise InvalidArgument(f"{part!r}: choose {key} from {choices}")
        setattr(args, dest, typed)
    return args


def _target(args: argparse.Namespace) -> tuple[str, argparse.Namespace]:
    if args.scenario in SCENARIOS:
        return args.scenario, args
    if os.path.isfile(args.scenario):
        args = copy.copy(args)
        args.trace = args.scenario
        return "replay", args
    raise InvalidArgument(f"{args.scenario!r} is neither a scenario ({', '.join(SCENARIOS)}) "
                          "nor a trace file")


def plan_compare(args: argparse.Namespace):
    """Everything `load compare` checks before it runs: the target, the outputs, every
    side of every sweep point as a RunConfig. Returns (scenario, sides, sweep values)."""
    from loadgen import compare as cmp

    if not 1 <= args.repeat <= 1000:
        raise InvalidArgument("--repeat must be 1..1000")
    check_outputs(args)
    scenario, base = _target(args)
    parser = args.parser

    def sides(sweep_spec: str = "") -> tuple[cmp.Side, cmp.Side]:
        swept = apply_overrides(parser, base, sweep_spec)

        def side(label: str, spec: str) -> cmp.Side:
            return cmp.Side(label, spec, config_from(apply_overrides(parser, swept, spec),
                                                     scenario))
        return side("A", args.a), side("B", args.b)

    values: list[str] = []
    if args.sweep:
        key, sep, listed = args.sweep.partition("=")
        values = [v.strip() for v in listed.split(",") if v.strip()]
        if not sep or not values:
            raise InvalidArgument("--sweep expects KEY=V1,V2,...")
        for v in values:
            sides(f"{key}={v}")  # reject a bad value before anything runs
    else:
        sides()
    return scenario, sides, values


def _compare(args: argparse.Namespace) -> int:
    from loadgen import compare as cmp

    scenario, sides, values = plan_compare(args)
    address = coordinator_address(args)
    runs = 2 * args.repeat * max(1, len(values))

    async def main() -> dict:
        async with Cluster(address) as cluster:
            with output.progress(runs, scenario) as advance:
                count = 0

                def on_run(label: str, i: int) -> None:
                    nonlocal count
                    advance(count)
                    count += 1

                if args.sweep:
                    key = args.sweep.partition("=")[0]
                    return await cmp.sweep(cluster, key, values,
                                           lambda v: sides(f"{key}={v}"), args.repeat, on_run)
                a, b = sides()
                return await cmp.compare(cluster, a, b, args.repeat, on_run)

    result = asyncio.run(main())
    if result["kind"] == "sweep":
        output.print_sweep(result)
    else:
        output.print_compare(result)
    output.write_json(result, args.json)
    if args.csv:
        with output.written(args.csv, "--csv"):
            cmp.write_csv(result, args.csv)
    if args.plot:
        from loadgen.plot import plot_compare
        output.write_plot(plot_compare, result, args.plot)
    if result["unsafe"]:
        output.err_console.print("oracle: a run saw stale accesses or audit violations")
        return exitcodes.UNSAFE
    return exitcodes.INTERRUPTED if result.get("interrupted") else exitcodes.OK


def _replay(args: argparse.Namespace) -> int:
    from loadgen.trace.fmt import read_trace
    read_trace(args.file)  # a malformed trace is an error before the cluster is touched
    args.scenario = "replay"
    args.trace = args.file
    return _run(args)


# --- soak ---------------------------------------------------------------------------------
def _soak(args: argparse.Namespace) -> int:
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

    console, err_console = output.console, output.err_console
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
    for kind, n in r["injected"].items():
        table.add_row(f"  injected {kind}", str(n))
    for code, n in r["failed_calls"].items():
        table.add_row(f"  calls failed {code}", str(n))
    console.print(table)
    for text in report["errors"][:5]:
        err_console.print(f"note: {text}")
    for text in report["violations"]:
        err_console.print(f"violation: {text}")
    if not report["ok"]:
        err_console.print("soak: FAILED")
