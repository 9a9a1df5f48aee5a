"""replay — a recorded trace of a real program (`tlbsim trace record`), replayed.

Burton & Kelly, and Re-Animator: a program's own memory-management calls (strace) and,
when recorded with --accesses, its page-level accesses (valgrind lackey), replayed on
the cluster: tasks go to CPUs round-robin (--cpus), threads of one process share an mm,
fork makes a copy-on-write mm (loadgen/trace/replay.py documents every mapping). Look at
`results.replay`: the calls as strace saw them next to what was replayed, and at
shootdowns, IPIs and faults per policy. --trace FILE names the trace; --speed 1 keeps
the recorded pace (0, the default, replays as fast as the cluster goes; in virtual time
the pace is the cost model's, and --speed is ignored).
"""
from __future__ import annotations

from loadgen.scenarios.base import PERMILLE, Driver, Progress, RunConfig
from loadgen.trace.fmt import read_trace
from loadgen.trace.replay import Replayer
from services.common.errors import InvalidArgument

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'rounds')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["shootdowns", "ipis", "faults", "tlb_hit_rate"]
LABELS = {"munmap_latency_ms": "munmap / madvise latency"}


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    if not cfg.trace:
        raise InvalidArgument("the replay scenario needs a trace file (--trace FILE)")
    header, events = read_trace(cfg.trace)
    cpus = d.cluster.cpus[:cfg.cpus]
    by_rounds = not (cfg.duration or cfg.ops)  # (those, d.rounds measures by themselves)
    for rnd in d.rounds(cfg, progress):
        def within(share: float, rnd: int = rnd) -> None:  # a long replay moves the bar
            progress(int((rnd + share) / cfg.rounds * PERMILLE))
        r = Replayer(d, cpus, header, events, cfg.speed if d.virtual is None else 0.0,
                     within if by_rounds else None)
        try:
            await r.replay()
        except ValueError as e:
            raise InvalidArgument(f"{cfg.trace}: {e}") from None
        finally:
            d.m.extra["replay"] = r.summary()
    # (No audit here: the run's final one, after the stats, checks this same state.)
