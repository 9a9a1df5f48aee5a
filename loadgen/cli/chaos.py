"""`tlbsim chaos KIND …`: inject one fault into a cluster started by `tlbsim up --detach`
(its state file names every process). The kinds and their designed outcomes are in
services/common/chaos.py and the README."""
from __future__ import annotations

import argparse
import asyncio

from loadgen.injector import Injector, Settings, lasting
from services.common.chaos import CPU_KINDS, KINDS, ChaosPlan
from services.common.errors import InvalidArgument


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
    from services.launcher import LocalCluster, load_state, state_path, write_state
    if args.hold is not None and not 0 < args.hold <= 3600:
        raise InvalidArgument("--for must be in (0, 3600] seconds")
    if args.kind in (*CPU_KINDS, "kill-cpu") and args.cpu is None:
        raise InvalidArgument(f"chaos {args.kind} needs --cpu N")
    info = load_state(args.state)  # a broken file: usage (2); none: no cluster (4)
    injector = Injector(LocalCluster.adopt(info))
    settings = Settings(ack_delay_s=args.delay, drop_fraction=args.fraction, seed=args.seed)

    async def main() -> str:
        if args.kind == "heal":
            cpus = [args.cpu] if args.cpu is not None else injector.cpus()
            await asyncio.gather(*(injector.set_plan(c, ChaosPlan()) for c in cpus))
            return f"healed cpus {cpus}"
        if args.kind == "start-broker":
            await injector.start_broker()
            return "MQTT broker started"
        what = await injector.inject(args.kind, args.cpu, settings)
        if not lasting(args.kind):
            return what
        if args.hold is None:
            heal = f"heal --cpu {args.cpu}" if args.kind in CPU_KINDS else "start-broker"
            return f"{what} until `tlbsim chaos {heal}`"
        await asyncio.sleep(args.hold)
        await injector.heal(args.kind, args.cpu)
        return f"{what} for {args.hold:g} s, " + \
            ("healed" if args.kind in CPU_KINDS else "started again")

    try:
        print(asyncio.run(main()))
    finally:
        write_state(state_path(args.state), info)  # restarted processes have new pids
    return 0
