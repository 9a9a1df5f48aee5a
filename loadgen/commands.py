"""`tlbsim load compare`, `tlbsim load replay`, `tlbsim trace record` (issue 5)."""
from __future__ import annotations

import argparse
import asyncio
import copy
import os

from loadgen import output
from loadgen.cluster import Cluster
from loadgen.scenarios import DOCS, SCENARIOS
from services.common import exitcodes
from services.common.errors import InvalidArgument


def add_load_commands(load_sub) -> None:
    from loadgen.cli import add_cluster_options, add_policy_options, add_workload_options

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


def add_trace_command(sub) -> None:
    from loadgen.trace.record import DEFAULT_LIMIT
    t = sub.add_parser("trace", help="record traces of real programs",
                       description="Record traces of real programs for `tlbsim load replay`.")
    t_sub = t.add_subparsers(dest="trace_command", required=True, metavar="COMMAND")
    rec = t_sub.add_parser(
        "record", help="run a command under strace (and valgrind lackey) and write a trace",
        description="Run CMD under `strace -f` (memory-management calls, clone/fork/vfork, "
                    "execve, exit) and write one gzip-compressed trace file (the format is "
                    "documented in loadgen/trace/__init__.py). With --accesses the command "
                    "also runs under valgrind's lackey tool, and the trace holds that run's "
                    "calls and its page-level data accesses (consecutive accesses to the same "
                    "page collapsed), plus what strace saw natively.",
        usage="tlbsim trace record -o FILE [--accesses] -- CMD [ARGS...]",
        epilog="Exits 5 when the traced command fails (a non-zero exit, a signal) or was cut "
               "at --accesses-limit; the trace is written all the same.")
    rec.add_argument("-o", "--output", required=True, metavar="FILE", help="the trace file")
    rec.add_argument("--accesses", action="store_true",
                     help="also capture page-level accesses with valgrind --tool=lackey")
    rec.add_argument("--quiet", action="store_true", help="discard the command's output")
    rec.add_argument("--accesses-limit", default=DEFAULT_LIMIT, metavar="SIZE",
                     help="with --accesses: stop the command once valgrind's lackey log (read "
                          "as it is written, never stored) passes SIZE, and write what was read "
                          "as a trace marked truncated (exit 5) "
                          f"(default {DEFAULT_LIMIT}; K, M, G)")
    rec.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    rec.set_defaults(func=_record)


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
        try:
            typed = action.type(value) if action.type else value
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
    from loadgen.cli import check_outputs, config_from

    if not 1 <= args.repeat <= 1000:
        raise InvalidArgument("--repeat must be 1..1000")
    check_outputs(args)
    scenario, base = _target(args)
    parser = args.parser

    def sides(sweep_spec: str = "") -> tuple[cmp.Side, cmp.Side]:
        swept = apply_overrides(parser, base, sweep_spec)
        return tuple(cmp.Side(label, spec, config_from(apply_overrides(parser, swept, spec),
                                                        scenario))
                     for label, spec in (("A", args.a), ("B", args.b)))

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
    from loadgen.cli import coordinator_address

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
    from loadgen.cli import _run
    from loadgen.trace.fmt import read_trace
    read_trace(args.file)  # a malformed trace is an error before the cluster is touched
    args.scenario = "replay"
    args.trace = args.file
    return _run(args)


def _record(args: argparse.Namespace) -> int:
    from loadgen.trace.record import Stopped, parse_size, record
    from services.common.paths import check_writable_file
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    limit = parse_size(args.accesses_limit)
    check_writable_file(args.output, "-o")
    try:
        with output.byte_progress("lackey log", shown=args.accesses) as progress:
            header = record(args.output, argv, accesses=args.accesses, quiet=args.quiet,
                            limit=limit, progress=progress)
    except Stopped as e:
        output.err_console.print(f"trace record: stopped by signal {e.signum}; "
                                 "temporary files removed, no trace written")
        return 128 + e.signum
    size = os.path.getsize(args.output)
    calls = ", ".join(f"{k} {v}" for k, v in header["syscalls"].items())
    output.err_console.print(
        f"{args.output}: {header['events']} events ({header['source']}), {size:,} bytes; "
        f"exit status {header['exit_status']}; calls: {calls}"
        + (f"; access pages: {header['access_pages']:,}" if header["access_pages"] else "")
        + (f"; not simulated: {header['unknown_syscalls']}" if header["unknown_syscalls"] else ""),
        markup=False)
    status = header["exit_status"]
    if header.get("truncated"):
        output.err_console.print(f"trace record: {header['truncated']}; the trace holds "
                                 "what was read before", markup=False)
        return exitcodes.TRACED_FAILED
    if status != 0:
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        output.err_console.print(f"trace record: the traced command {how} (the trace is "
                                 "written)", markup=False)
        return exitcodes.TRACED_FAILED
    return exitcodes.OK
