"""The `tlbsim` command: serve a service, run a local cluster, drive load.

Every subcommand returns an exit code; errors are one line on stderr."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from services.common.errors import SimError


def _env(name: str, default=None):
    return os.environ.get(f"TLBSIM_{name}", default)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="run one service (cpu, memory or coordinator) in the foreground",
        description="Run one tlbsim service until SIGTERM/SIGINT. When ready it prints one "
                    "JSON line to stdout with its address and metrics port. Every flag can "
                    "also be given as a TLBSIM_* environment variable (shown in brackets).")
    p.add_argument("service", choices=["cpu", "memory", "coordinator"])
    p.add_argument("--id", type=int, default=_env("CPU_ID"),
                   help="the CPU's id, 0..1023 (cpu only) [TLBSIM_CPU_ID]")
    p.add_argument("--listen", default=_env("LISTEN", "127.0.0.1:0"),
                   help="gRPC listen address; port 0 picks a free port [TLBSIM_LISTEN]")
    p.add_argument("--advertise", default=_env("ADVERTISE"),
                   help="address other services reach this one at, HOST[:PORT] (default: "
                        "the listen address, 0.0.0.0 meaning 127.0.0.1); containers set "
                        "their service name [TLBSIM_ADVERTISE]")
    p.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", 0),
                   help="Prometheus metrics port; 0 picks a free one, -1 disables "
                        "[TLBSIM_METRICS_PORT]")
    p.add_argument("--memory", default=_env("MEMORY"),
                   help="the memory service's address (cpu) [TLBSIM_MEMORY]")
    p.add_argument("--coordinator", default=_env("COORDINATOR"),
                   help="the coordinator's address (cpu, memory) [TLBSIM_COORDINATOR]")
    p.add_argument("--frames", type=int, default=_env("FRAMES"),
                   help="physical frames of the simulated machine (memory) [TLBSIM_FRAMES]")
    p.add_argument("--mqtt-url", default=_env("MQTT_URL"),
                   help="MQTT broker for the mqtt transport, mqtt://HOST:PORT[/TOPIC-ROOT] "
                        "(cpu, coordinator; the root names the cluster's topics) "
                        "[TLBSIM_MQTT_URL]")
    p.set_defaults(func=_serve, parser=p)


def _serve(args) -> int:
    from services.common.server import serve

    if args.service == "cpu":
        from services.cpu.service import CpuNode
        if args.id is None or not 0 <= int(args.id) < 1024:
            args.parser.error("serve cpu needs --id between 0 and 1023")
        if not args.memory or not args.coordinator:
            args.parser.error("serve cpu needs --memory and --coordinator addresses")
        node = CpuNode(int(args.id), args.memory, args.coordinator, mqtt_url=args.mqtt_url)
        ready = {"service": "cpu", "id": int(args.id)}
    elif args.service == "memory":
        from services.memory.service import MemoryNode
        if not args.coordinator:
            args.parser.error("serve memory needs --coordinator")
        frames = int(args.frames) if args.frames else None
        if frames is not None and frames < 1:
            args.parser.error("--frames must be at least 1")
        node = MemoryNode(args.coordinator, frames)
        ready = {"service": "memory"}
    else:
        from services.coordinator.service import CoordinatorNode
        node = CoordinatorNode(mqtt_url=args.mqtt_url)
        ready = {"service": "coordinator"}
    metrics_port = int(args.metrics_port)
    try:
        asyncio.run(serve(node, args.listen, None if metrics_port < 0 else metrics_port, ready,
                          args.advertise or None))
    except OSError as e:
        print(f"tlbsim serve {args.service}: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from loadgen import cli as load_cli
    from services import launcher

    parser = argparse.ArgumentParser(
        prog="tlbsim",
        description="Simulate how a multi-CPU machine keeps TLBs coherent with its page "
                    "tables: CPU services with TLBs, a memory service with page tables and "
                    "per-table locks, a shootdown coordinator, and a load generator.")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of messages on stderr [TLBSIM_LOG_LEVEL]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    launcher.add_commands(sub)
    load_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except SimError as e:
        print(f"tlbsim: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
