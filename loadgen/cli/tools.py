"""`tlbsim demo`, `tlbsim bench`, `tlbsim trace record`: the commands that bring their own
cluster (demo, bench) or none (trace record)."""
from __future__ import annotations

import argparse
import os

from loadgen import output
from services.common import costmodel, exitcodes
from services.common.errors import InvalidArgument
from services.common.paths import check_writable_file


def add_commands(sub) -> None:
    d = sub.add_parser(
        "demo", help="start a local cluster, compare policies side by side, stop it",
        description="Start memory, coordinator and CPUs as local processes on loopback, run "
                    "four short built-in comparisons — per-page vs gathered munmap "
                    "shootdowns, mm vs split page-table locks, fork copying vs sharing page "
                    "tables, reclaim flushing every CPU vs the sharers' CPUs (needs --cpus 4 "
                    "or more) — print the tables, and stop every process.")
    d.add_argument("--cpus", type=int, default=6,
                   help="CPUs (default 6: 3 fault while 3 madvise in the lock question)")
    d.add_argument("--rounds", type=int, default=2, help="rounds per configuration (default 2)")
    d.add_argument("--json", metavar="PATH",
                   help="write all reports as one JSON document ('-' = stdout)")
    d.set_defaults(func=_demo)

    b = sub.add_parser(
        "bench", help="shootdown latency vs the bare fan-out floor; per-page vs gathered munmap",
        description="Measure, in one run, shootdown latency to 1, 2, 4 and 8 CPUs per transport "
                    "next to a bare ping fan-out to the same CPUs (the floor), munmap of 512 "
                    "pages per-page vs gathered, fork copy vs share, TLB hits/s in one CPU vs "
                    "its TLB alone, faults/s at the memory service vs a walk, faults through "
                    "a CPU vs the domain in-process, the memory service's RSS per resident "
                    "page, and (without --cluster: each its own fresh cluster) 16 CPUs one "
                    "per process vs eight per process and 256 CPUs: ready time, RSS, a "
                    "shootdown to every other CPU. Starts its own local cluster unless "
                    "--cluster is given. Report ratios: these machines are noisy.")
    b.add_argument("--cluster", metavar="ADDR",
                   help="use a running cluster (needs 9 CPUs; `tlbsim up --mqtt` for mqtt rows)")
    b.add_argument("--rounds", type=int, default=200,
                   help="shootdowns per transport and CPU count (default 200)")
    b.add_argument("--munmap-rounds", type=int, default=3,
                   help="munmaps per flush mode (default 3)")
    b.add_argument("--json", metavar="PATH", help="write the results as JSON")
    b.add_argument("--quick", action="store_true",
                   help="measure the memory service's RSS at 100k resident pages only "
                        "(skips the 1M-page row, the slowest)")
    b.add_argument("--cost-model", default=costmodel.DEFAULT_PRESET, metavar="x86|invlpgb|PATH",
                   help="the cost model of the ranged-vs-full flush sweep's modelled time "
                        f"(default {costmodel.DEFAULT_PRESET})")
    b.set_defaults(func=_bench)
    add_reproduce_command(sub)
    add_trace_command(sub)


def add_reproduce_command(sub) -> None:
    from loadgen.reproduce import TABLES
    r = sub.add_parser(
        "reproduce", help="published measurements next to tlbsim's, in virtual time",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a local cluster, run the scenarios behind a published table in "
                    "virtual time on the preset of the machine it was measured on, print "
                    "published vs simulated side by side and check the table's claims. "
                    "Exits 0 when every claim holds, 1 when one does not (it says which, "
                    "and what the model lacks).\n\ntables:\n"
                    + "\n".join(f"  {t.name:14} {t.title}" for t in TABLES.values()))
    r.add_argument("table", nargs="?", metavar="TABLE",
                   help=f"one of {', '.join(TABLES)}, or all")
    r.add_argument("--list", action="store_true", help="name the tables and stop")
    r.add_argument("--quick", action="store_true",
                   help="fewer points and smaller runs (up to 16 CPUs): a check, not the table")
    r.add_argument("--json", metavar="PATH", help="write the tables as JSON ('-' = stdout)")
    r.set_defaults(func=_reproduce)


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


def _bench(args: argparse.Namespace) -> int:
    from loadgen.bench import main
    if not 1 <= args.rounds <= 100_000 or not 1 <= args.munmap_rounds <= 1000:
        raise InvalidArgument("bench --rounds must be 1..100000 and --munmap-rounds 1..1000")
    costmodel.load(args.cost_model)  # a bad model is an error before anything starts
    check_writable_file(args.json, "--json", stdout_ok=True)
    return main(args.cluster, args.rounds, args.munmap_rounds, args.json, args.cost_model,
                args.quick)


def _demo(args: argparse.Namespace) -> int:
    from loadgen.demo import demo
    if not 2 <= args.cpus <= 16:
        raise InvalidArgument("demo --cpus must be between 2 and 16")
    if not 1 <= args.rounds <= 100:
        raise InvalidArgument("demo --rounds must be between 1 and 100")
    check_writable_file(args.json, "--json", stdout_ok=True)
    return demo(args.cpus, args.rounds, args.json)


def _record(args: argparse.Namespace) -> int:
    from loadgen.trace.record import Stopped, parse_size, record
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


def _reproduce(args: argparse.Namespace) -> int:
    from loadgen.reproduce import TABLES, main
    if args.list:
        for t in TABLES.values():  # one line each, tab-separated: a script can read it
            print(f"{t.name}\t{t.title}\t{t.source}")
        return 0
    if args.table is None:
        raise InvalidArgument(f"name a table ({', '.join(TABLES)}, or all), or give --list")
    if args.table != "all" and args.table not in TABLES:
        raise InvalidArgument(f"unknown table {args.table!r}: choose from "
                              f"{', '.join(TABLES)}, or all")
    check_writable_file(args.json, "--json", stdout_ok=True)
    names = list(TABLES) if args.table == "all" else [args.table]
    return main([TABLES[n] for n in names], args.quick, args.json)
