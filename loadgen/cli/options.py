"""The options the load commands share (policy, workload, where the cluster is, output
paths) and the checks that turn them into a RunConfig before anything touches a cluster."""
from __future__ import annotations

import argparse
import os

from loadgen.scenarios import OPTIONS, RunConfig
from loadgen.scenarios import check as check_scenario
from loadgen.scenarios.flush_ceiling import DEFAULT_WORKING_SET
from services.common import costmodel
from services.common import policy as pol
from loadgen.vsched import DEFAULT_QUANTUM_NS, VIRTUAL_DEADLINE_S
from services.common.errors import InvalidArgument, Unavailable
from services.common.paths import check_writable_file

MAX_CPU_ID = 1023


def add_policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (chosen per run; the cluster is reset, not restarted)")
    d = pol.Policy()
    g.add_argument("--lock", choices=pol.choices(pol.LockMode), default=d.lock.value,
                   help="page-table locking: mm takes the mm's one page_table_lock for every "
                        "table change; split takes each PTE table's own lock; "
                        "lock-all-sharers changes a shared table holding every sharer mm's "
                        "page_table_lock in mm-id order; lock-all-sharers-unordered takes "
                        "them in the wrong order, which the lock validator refuses "
                        f"(default {d.lock})")
    g.add_argument("--flush", choices=pol.choices(pol.FlushMode), default=d.flush.value,
                   help=f"one shootdown per page, or mmu_gather batching (default {d.flush})")
    g.add_argument("--ceiling", type=int, default=d.ceiling,
                   help="ranges above this many pages become a full flush (default 33)")
    g.add_argument("--batch", type=int, default=d.batch,
                   help="gather batch-page size; a gather holds 8 + 19 batches before it "
                        "must flush (default 510)")
    g.add_argument("--lazy-tlb", choices=["on", "off"], default="on",
                   help="idle CPUs keep the mm loaded and skip flushes (default on)")
    g.add_argument("--transport", choices=pol.choices(pol.Transport), default=d.transport.value,
                   help="shootdown delivery: a unary call per CPU, a stream per CPU, or one "
                        "MQTT broadcast with acks and a gRPC fallback (needs `tlbsim up --mqtt`)")
    g.add_argument("--mqtt-qos", type=int, choices=list(pol.MQTT_QOS), default=d.mqtt_qos,
                   help=f"MQTT QoS of broadcasts and acks (default {d.mqtt_qos}: acks are "
                        "end-to-end either way)")
    g.add_argument("--tlb-entries", type=int, default=d.tlb_entries,
                   help=f"TLB entries per CPU (default {d.tlb_entries})")
    g.add_argument("--tlb-ways", type=int, default=d.tlb_ways,
                   help=f"TLB associativity (default {d.tlb_ways})")
    g.add_argument("--unsafe", choices=pol.choices(pol.Unsafe), default=d.unsafe.value,
                   help="deliberately wrong orders, to show the oracle firing")
    g.add_argument("--fork", choices=pol.choices(pol.ForkMode), default=None,
                   help="fork copies every PTE, or shares the PTE tables copy-on-write "
                        f"(default {d.fork}; shared-write and swapout: share)")
    g.add_argument("--shared-flush", choices=pol.choices(pol.SharedFlush),
                   default=d.shared_flush.value,
                   help="who is flushed when a still-shared table changes (reclaim): every CPU "
                        "(Linus 2002), the union of the sharers' CPUs, or only the changing "
                        f"mm's (wrong on purpose) (default {d.shared_flush})")
    g.add_argument("--frames", type=int, default=None,
                   help="physical frames of the machine; reclaim starts below 1/32 free "
                        "(default 0: the memory service's own, effectively unlimited; "
                        f"swapout: {SCENARIO_DEFAULTS['swapout']['frames']})")
    g.add_argument("--zero-page", choices=["on", "off"], default="on",
                   help="read faults map the shared zero page read-only and the first write "
                        "copies it, as Linux does (default on); off: a read allocates a page")
    g.add_argument("--broadcast", choices=["ipi", "hw"], default="ipi",
                   help="shootdowns as IPIs (x86), or, for an mm running on 4 or more CPUs, "
                        "as hardware broadcasts: AMD INVLPGB with a global ASID, no handler on "
                        "the targets, the initiator waits for its TLBSYNC (default ipi)")
    g.add_argument("--timing", choices=pol.choices(pol.Timing), default=d.timing.value,
                   help="wall: latencies are what the simulator took; virtual: every CPU has a "
                        "clock the cost model advances, work is issued in virtual-time order, "
                        "and the answers are deterministic under a seed (default wall)")
    g.add_argument("--quantum-ns", type=int, default=DEFAULT_QUANTUM_NS, metavar="NS",
                   help="--timing virtual: the longest an access batch runs before another "
                        f"CPU gets a turn (default {DEFAULT_QUANTUM_NS} ns, below the "
                        "fastest cross-CPU effect, an IPI)")
    g.add_argument("--asids", type=int, default=d.asids,
                   help="ASIDs (PCIDs) each CPU keeps, as x86's TLB_NR_DYN_ASIDS (default "
                        f"{d.asids}): switching back to an mm that still has one keeps its "
                        "entries; 0: no PCID, every switch to another mm flushes the TLB")
    g.add_argument("--reclaim-batch", type=int, default=d.reclaim_batch,
                   help="pages reclaim unmaps per batched flush, as Linux's SWAP_CLUSTER_MAX "
                        f"(default {d.reclaim_batch}); 0 puts everything it frees into one flush")
    g.add_argument("--deadline", type=float, default=None,
                   help="seconds a CPU has to acknowledge a shootdown before it is fenced "
                        f"(default {d.deadline_s:g}; with --timing virtual "
                        f"{VIRTUAL_DEADLINE_S:g}: a fence changes the run, and a loaded "
                        "host must not change a virtual-time answer)")
    g.add_argument("--cost-model", default=d.cost_model.name, metavar="x86|invlpgb|PATH",
                   help="prices every counted event in ns for the report's modelled time: "
                        "x86 (IPIs, invlpg per page, refills after a full flush), invlpgb "
                        "(broadcast invalidation, AMD INVLPGB / ARM TLBI IS: no IPIs), or a "
                        "TOML file with the same keys (services/common/costmodels/) "
                        f"(default {d.cost_model.name})")


def policy_from(args: argparse.Namespace, scenario: str | None = None) -> pol.Policy:
    values = resolved(args, scenario)
    return pol.Policy(lock=args.lock, flush=args.flush, ceiling=args.ceiling, batch=args.batch,
                      lazy_tlb=args.lazy_tlb == "on", transport=args.transport,
                      tlb_entries=args.tlb_entries, tlb_ways=args.tlb_ways, unsafe=args.unsafe,
                      deadline_s=args.deadline if args.deadline is not None else
                      VIRTUAL_DEADLINE_S if args.timing == "virtual" else pol.DEFAULT_DEADLINE_S,
                      mqtt_qos=args.mqtt_qos, fork=values["fork"],
                      shared_flush=args.shared_flush, frames=values["frames"],
                      reclaim_batch=args.reclaim_batch, asids=args.asids,
                      zero_page=args.zero_page == "on", hw_broadcast=args.broadcast == "hw",
                      timing=args.timing,
                      cost_model=costmodel.load(args.cost_model))


def resolved(args: argparse.Namespace, scenario: str | None) -> dict:
    """The values of the options whose default depends on the scenario: given on the
    command line, else the scenario's own default, else the common one."""
    own = SCENARIO_DEFAULTS.get(scenario or "", {})
    return {key: value if (value := getattr(args, key, None)) is not None
            else own.get(key, common) for key, common in COMMON_DEFAULTS.items()}


def defaults_text(scenario: str) -> str:
    """`pages 64, rounds 3`: what a scenario runs with when no option is given."""
    values = {**COMMON_DEFAULTS, **SCENARIO_DEFAULTS.get(scenario, {})}
    shown = ("cpus", "pages", "rounds", "resident", "children", "fork", "frames")
    uses = SCENARIO_USES.get(scenario, shown)
    return ", ".join(f"{k} {values[k]}" for k in shown if k in uses)


def add_workload_options(p: argparse.ArgumentParser, replay: bool = False) -> None:
    """The workload's options; `replay` (`load replay`) leaves out those a trace ignores."""
    g = p.add_argument_group("workload" if replay else
                             "workload (defaults per scenario: `tlbsim load run --help`)")
    g.add_argument("--cpus", type=int, help=f"CPUs to use (default {COMMON_DEFAULTS['cpus']})")
    if not replay:
        g.add_argument("--pages", type=int,
                       help="pages per mapping (default: per scenario)")
    g.add_argument("--rounds", type=int,
                   help="times the trace is replayed (default 1)" if replay
                   else "repetitions (default: per scenario; replay 1)")
    if not replay:
        g.add_argument("--seed", type=int, default=0, help="seed for randomised choices")
        g.add_argument("--readers", choices=["on", "off"], default="on",
                       help="munmap, mprotect: the other threads keep reading during the "
                            "munmap (default on; off is LATR's quiet variant)")
        g.add_argument("--children", type=int,
                       help=f"fork, shared-write, swapout: processes forked, at most "
                            f"{MAX_CHILDREN} (default: per scenario)")
        g.add_argument("--resident", type=int,
                       help="fork, shared-write, swapout: pages the parent has resident "
                            "before forking; flush-ceiling: the working set every CPU keeps "
                            "in its TLB (default: per scenario)")
    add_length_options(g, replay)


def add_length_options(g, replay: bool = False) -> None:
    """--duration / --ops instead of --rounds, and the scenario-specific knobs (issue 5)."""
    g.add_argument("--duration", type=float, metavar="SECONDS",
                   help="run rounds until this many seconds have passed (instead of --rounds)")
    g.add_argument("--ops", type=int, metavar="N",
                   help="run rounds until this many accesses + system calls (instead of --rounds)")
    if not replay:
        g.add_argument("--mix", metavar="WEIGHTS",
                       help="mixed: operation weights, e.g. mmap=4,munmap=3,madvise=1,"
                            "mprotect=1,read=6,write=3")
        g.add_argument("--trace", metavar="FILE",
                       help="replay: the trace file (tlbsim trace record)")
    g.add_argument("--speed", type=float, default=0.0,
                   help="replay: 1 = the recorded pace, 2 = twice as fast, 0 = as fast as the "
                        f"cluster goes (default 0; else {MIN_SPEED:g}..{MAX_SPEED:g})")


# Defaults shared by every scenario, and each scenario's own (small enough that a run
# with no option takes seconds, big enough that its headline metric means something).
COMMON_DEFAULTS = {"cpus": 4, "pages": 64, "rounds": 3, "children": 2, "resident": 4096,
                   "fork": pol.Policy.fork, "frames": pol.Policy.frames}
SCENARIO_DEFAULTS: dict[str, dict] = {
    "munmap": {"pages": 512},
    "tlb-flush": {"pages": 16, "rounds": 2},
    "fault-scaling": {"pages": 512, "rounds": 1},
    "fault-storm": {},  # 64 pages (its own PTE table) per thread, 3 rounds
    "mprotect": {"pages": 256, "rounds": 2},
    "mixed": {"rounds": 2},
    "fork": {"resident": 4096, "rounds": 2},
    "shared-write": {"fork": pol.ForkMode.SHARE, "pages": 16, "resident": 2048, "rounds": 2},
    "swapout": {"fork": pol.ForkMode.SHARE, "frames": 2048, "resident": 1536, "pages": 512,
                "children": 1, "rounds": 2},
    "flush-ceiling": {"pages": 16, "resident": DEFAULT_WORKING_SET},
    "replay": {"rounds": 1},
}
# The options each scenario reads (the others are accepted and ignored).
SCENARIO_USES = OPTIONS
MAX_PAGES = 1 << 20     # an Access of every page of a mapping: MAX_ACCESSES per request
MAX_ROUNDS = 1_000_000
MAX_CHILDREN = 1000     # each child is a fork (and, in `fork`, an exit) per round
MIN_SPEED, MAX_SPEED = 0.01, 10_000.0
LENGTH_OPTIONS = ("--rounds", "--duration", "--ops")


def config_from(args: argparse.Namespace, scenario: str) -> RunConfig:
    """A checked RunConfig: every bound and combination is refused here, before the
    cluster is touched (InvalidArgument: exit 2)."""
    values = resolved(args, scenario)
    duration, ops = getattr(args, "duration", None), getattr(args, "ops", None)
    given = [name for name, v in zip(LENGTH_OPTIONS, (getattr(args, "rounds", None),
                                                      duration, ops)) if v is not None]
    if len(given) > 1:
        raise InvalidArgument(f"give only one of --rounds, --duration and --ops (got "
                              f"{', '.join(given)})")
    for name in ("cpus", "pages", "rounds", "children", "resident"):
        if values[name] < 1:
            raise InvalidArgument(f"--{name} must be at least 1")
    for name, most in (("pages", MAX_PAGES), ("resident", MAX_PAGES),
                       ("rounds", MAX_ROUNDS), ("children", MAX_CHILDREN),
                       ("cpus", MAX_CPU_ID + 1)):
        if values[name] > most:
            raise InvalidArgument(f"--{name} {values[name]}: at most {most}")
    if duration is not None and not 0 < duration <= 86400:
        raise InvalidArgument("--duration must be in (0, 86400] seconds")
    if ops is not None and not 1 <= ops <= 10 ** 9:
        raise InvalidArgument("--ops must be between 1 and 1000000000")
    speed = getattr(args, "speed", 0.0)
    if speed != 0 and not MIN_SPEED <= speed <= MAX_SPEED:
        raise InvalidArgument(f"--speed {speed:g}: 0 (as fast as the cluster goes) or "
                              f"{MIN_SPEED:g}..{MAX_SPEED:g} times the recorded pace")
    if scenario == "replay" and not getattr(args, "trace", None):
        raise InvalidArgument("the replay scenario needs --trace FILE")
    if scenario == "mixed":
        from loadgen.scenarios.mixed import parse_mix
        parse_mix(getattr(args, "mix", None))
    cfg = RunConfig(scenario, policy_from(args, scenario), cpus=values["cpus"],
                    pages=values["pages"], rounds=values["rounds"],
                    seed=getattr(args, "seed", 0), readers=getattr(args, "readers", "on") == "on",
                    duration=duration, ops=ops, mix=getattr(args, "mix", None),
                    trace=getattr(args, "trace", None), speed=speed,
                    children=values["children"], resident=values["resident"],
                    quantum_ns=getattr(args, "quantum_ns", DEFAULT_QUANTUM_NS))
    if not 1 <= cfg.quantum_ns <= 10 ** 9:
        raise InvalidArgument(f"--quantum-ns {cfg.quantum_ns}: must be 1..1000000000")
    check_scenario(cfg)
    return cfg


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """Where the cluster is: --cluster (or TLBSIM_CLUSTER, as containers set it), else
    the state file `tlbsim up` wrote."""
    p.add_argument("--cluster", metavar="ADDR", default=os.environ.get("TLBSIM_CLUSTER"),
                   help="the coordinator's address [TLBSIM_CLUSTER] (default: the state "
                        "file of `tlbsim up`)")
    p.add_argument("--state", metavar="PATH", help="state file of `tlbsim up --detach`")


def coordinator_address(args: argparse.Namespace) -> str:
    """--cluster wins; otherwise the state file `tlbsim up` wrote."""
    if args.cluster:
        return args.cluster
    from services.launcher import LauncherError, UsageError, load_state
    try:
        return load_state(args.state).coordinator
    except UsageError:  # a folder, an unreadable or broken file: a usage error as it is
        raise
    except LauncherError as e:  # its message says how to start one; --cluster is the other way
        hint = " or pass --cluster ADDR" if "start one with" in str(e) else ""
        raise Unavailable(f"{e}{hint}") from None


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path of a run, before the run (a bad one would lose its results)."""
    check_writable_file(getattr(args, "json", None), "--json", stdout_ok=True)
    for option in ("plot", "csv"):
        check_writable_file(getattr(args, option, None), f"--{option}")


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
