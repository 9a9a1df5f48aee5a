"""`python -m services serve SERVICE`: one service in the foreground, and the options
every tlbsim command line shares (--log-level, the security flags, liveness).

This parses only `serve`, so a CPU, memory or coordinator process loads nothing of the
load generator; the `tlbsim` command (loadgen/cli/main.py) adds `serve` to its own root.
Errors are one line on stderr."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from services.common import cohost, exitcodes
from services.common.errors import InvalidArgument, SimError


def _env(name: str, default=None):
    return os.environ.get(f"TLBSIM_{name}", default)


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="run one service (cpu, memory or coordinator) in the foreground",
        description="Run one tlbsim service (or, `serve cpu --ids`, several CPUs) until "
                    "SIGTERM/SIGINT. When ready it prints one JSON line to stdout: `nodes`, "
                    "each hosted service's id, address and metrics port (one service's are "
                    "also at the top level). Every flag can also be given as a TLBSIM_* "
                    "environment variable (shown in brackets).")
    p.add_argument("service", choices=["cpu", "memory", "coordinator"])
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--id", type=int, default=_env("CPU_ID"),
                     help="the CPU's id, 0..1023 (cpu only) [TLBSIM_CPU_ID]")
    ids.add_argument("--ids", default=_env("CPU_IDS"), metavar="LIST",
                     help="several CPUs in this one process, e.g. 0-15 or 0-3,8: each its "
                          "own gRPC server, port, TLB, registration, lease and metrics "
                          "port; they stop (or die) together (cpu only) [TLBSIM_CPU_IDS]")
    p.add_argument("--listen", default=_env("LISTEN", "127.0.0.1:0"),
                   help="gRPC listen address; port 0 picks a free port. With --ids: one "
                        "address per CPU (comma-separated), or one for all: port 0 a free "
                        "port each, port P the ports P, P+1, ... [TLBSIM_LISTEN]")
    p.add_argument("--advertise", default=_env("ADVERTISE"),
                   help="address other services reach this one at, HOST[:PORT] (default: "
                        "the listen address, 0.0.0.0 meaning 127.0.0.1); containers set "
                        "their service name. With --ids: HOST alone (each CPU's port), or "
                        "one HOST:PORT per CPU [TLBSIM_ADVERTISE]")
    p.add_argument("--metrics-port", default=_env("METRICS_PORT", "0"), metavar="PORT",
                   help="Prometheus metrics port; 0 picks a free one, -1 disables. With "
                        "--ids: one per CPU, or one for all (0, -1, or P: P, P+1, ...) "
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
    add_liveness_options(p, "cpu, coordinator: ")
    p.add_argument("--cluster-size", type=int, default=_env("CLUSTER_SIZE", 1), metavar="N",
                   help="CPUs in the cluster; the liveness settings not given are derived "
                        "from it (README \"Liveness at scale\"; `tlbsim up` sets it) "
                        "[TLBSIM_CLUSTER_SIZE]")
    p.set_defaults(func=_serve, parser=p)


def add_liveness_options(p, who: str = "") -> None:
    """Heartbeats and the lease (services/common/liveness.py): derived from the cluster
    size unless given."""
    p.add_argument("--heartbeat-interval", type=float, metavar="S",
                   default=_env("HEARTBEAT_INTERVAL"),
                   help=f"{who}seconds between a CPU's heartbeats (default: the cluster size "
                        "/ 32, at least 0.25) [TLBSIM_HEARTBEAT_INTERVAL]")
    p.add_argument("--heartbeat-timeout", type=float, metavar="S",
                   default=_env("HEARTBEAT_TIMEOUT"),
                   help=f"{who}seconds a heartbeat is waited for (default: 2 intervals) "
                        "[TLBSIM_HEARTBEAT_TIMEOUT]")
    p.add_argument("--lease", type=float, metavar="S", default=_env("LEASE"),
                   help=f"{who}seconds a CPU may run on after its last answered heartbeat "
                        "was sent, before it flushes its TLB and stops (default: 3 heartbeat "
                        "timeouts) [TLBSIM_LEASE]")


def liveness_from(args, cpus: int):
    """The Liveness the options ask for (InvalidArgument if they contradict)."""
    from services.common.liveness import Liveness

    def seconds(value):
        return None if value is None else float(value)

    return Liveness.for_cluster(int(cpus), seconds(args.heartbeat_interval),
                                seconds(args.heartbeat_timeout), seconds(args.lease))


def _serve(args) -> int:
    from services.common.server import Hosted, Node, serve_all

    liveness = liveness_from(args, args.cluster_size)
    if args.service != "cpu" and args.ids is not None:
        raise InvalidArgument(f"--ids is for serve cpu, not serve {args.service}")
    # Bad lists are InvalidArgument: one line on stderr, exit 2 (services/cli.py main).
    cpus = _cpu_ids(args) if args.service == "cpu" else [0]
    listens = cohost.listen_addresses(args.listen, len(cpus))
    metrics = cohost.metrics_ports(args.metrics_port, len(cpus))
    advertised = cohost.advertise_addresses(args.advertise, len(cpus))
    nodes: list[tuple[Node, dict]]
    if args.service == "cpu":
        from services.cpu.service import CpuNode
        if not args.memory or not args.coordinator:
            args.parser.error("serve cpu needs --memory and --coordinator addresses")
        nodes = [(CpuNode(cpu, args.memory, args.coordinator, mqtt_url=args.mqtt_url,
                          liveness=liveness), {"id": cpu}) for cpu in cpus]
        ready = {"service": "cpu"}
    elif args.service == "memory":
        from services.memory.service import MemoryNode
        if not args.coordinator:
            args.parser.error("serve memory needs --coordinator")
        from services.common.policy import MIN_FRAMES
        frames = int(args.frames) if args.frames else None
        if frames is not None and frames < MIN_FRAMES:
            args.parser.error(f"--frames must be at least {MIN_FRAMES}")
        nodes = [(MemoryNode(args.coordinator, frames), {})]
        ready = {"service": "memory"}
    else:
        from services.coordinator.service import CoordinatorNode
        nodes = [(CoordinatorNode(mqtt_url=args.mqtt_url, liveness=liveness), {})]
        ready = {"service": "coordinator"}
    hosted = [Hosted(node, listen, None if port < 0 else port, advertise, fields)
              for (node, fields), listen, port, advertise
              in zip(nodes, listens, metrics, advertised)]
    try:
        asyncio.run(serve_all(hosted, ready))
    except OSError as e:  # the address or the metrics port is taken or not ours
        print(f"tlbsim serve {args.service}: {e.strerror or e}", file=sys.stderr)
        return exitcodes.USAGE
    return exitcodes.OK


def _cpu_ids(args) -> list[int]:
    """The CPUs `serve cpu` hosts: --ids or --id (each also a variable; both at once,
    from flags or variables, is an error rather than a guess)."""
    if args.ids is not None and args.id is not None:
        raise InvalidArgument("serve cpu takes --id or --ids, not both (TLBSIM_CPU_ID, "
                              "TLBSIM_CPU_IDS)")
    if args.ids is not None:
        return cohost.parse_ids(args.ids)
    if args.id is None or not 0 <= int(args.id) <= cohost.MAX_CPU_ID:
        raise InvalidArgument(f"serve cpu needs --id between 0 and {cohost.MAX_CPU_ID} "
                              "(or --ids LIST)")
    return [int(args.id)]


# Security options, for every command (README "Security").
SECURITY_FLAGS = {"token": "TOKEN", "token_file": "TOKEN_FILE", "tls_cert": "TLS_CERT",
                  "tls_key": "TLS_KEY", "tls_ca": "TLS_CA", "tls_server_name": "TLS_SERVER_NAME",
                  "mqtt_username": "MQTT_USERNAME", "mqtt_password_file": "MQTT_PASSWORD_FILE"}


class Parser(argparse.ArgumentParser):
    """Every tlbsim parser (subparsers inherit the class): options are never matched by
    prefix, so `up --mqtt` is `--mqtt`, not an ambiguous `--mqtt-username`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_globals(parser: argparse.ArgumentParser, inherited: bool = False) -> None:
    """--log-level and the security flags. On a subcommand (`inherited`) they are hidden
    and default to nothing, so a flag after the subcommand overrides the top-level one
    and an absent one leaves it alone."""
    def env(name: str, default=None):
        return argparse.SUPPRESS if inherited else _env(name, default)

    def hide(text: str) -> str:
        return argparse.SUPPRESS if inherited else text

    parser.add_argument("--log-level", default=env("LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help=hide("log level of messages on stderr [TLBSIM_LOG_LEVEL]"))
    g = parser if inherited else parser.add_argument_group(
        "security", "the admin token, TLS and MQTT credentials (README \"Security\")")
    g.add_argument("--token", default=env("TOKEN"), metavar="TOKEN",
                   help=hide("the shared token admin calls (Reset, Chaos) need; required "
                             "when a service listens beyond loopback. On the command line "
                             "`ps` shows it: prefer the variable or --token-file "
                             "[TLBSIM_TOKEN]"))
    g.add_argument("--token-file", default=env("TOKEN_FILE"), metavar="FILE",
                   help=hide("a file holding the token [TLBSIM_TOKEN_FILE]"))
    g.add_argument("--tls-cert", default=env("TLS_CERT"), metavar="PEM",
                   help=hide("this node's certificate: servers serve TLS, clients present "
                             "it [TLBSIM_TLS_CERT]"))
    g.add_argument("--tls-key", default=env("TLS_KEY"), metavar="PEM",
                   help=hide("its private key [TLBSIM_TLS_KEY]"))
    g.add_argument("--tls-ca", default=env("TLS_CA"), metavar="PEM",
                   help=hide("the CA clients verify servers with (turns TLS on for "
                             "clients) [TLBSIM_TLS_CA]"))
    g.add_argument("--tls-client-auth", action="store_true",
                   default=argparse.SUPPRESS if inherited
                   else _env("TLS_CLIENT_AUTH", "") in ("1", "true", "yes"),
                   help=hide("servers require client certificates signed by --tls-ca "
                             "(mutual TLS) [TLBSIM_TLS_CLIENT_AUTH=1]"))
    g.add_argument("--tls-server-name", default=env("TLS_SERVER_NAME"), metavar="NAME",
                   help=hide("the name server certificates carry, when not the address "
                             "[TLBSIM_TLS_SERVER_NAME]"))
    g.add_argument("--mqtt-username", default=env("MQTT_USERNAME"), metavar="USER",
                   help=hide("MQTT broker user [TLBSIM_MQTT_USERNAME]"))
    g.add_argument("--mqtt-password-file", default=env("MQTT_PASSWORD_FILE"), metavar="FILE",
                   help=hide("a file holding the MQTT password [TLBSIM_MQTT_PASSWORD_FILE, "
                             "or TLBSIM_MQTT_PASSWORD itself]"))


GLOBALS_EPILOG = ("--log-level and the security options of `tlbsim --help` (--token, "
                  "--tls-*, --mqtt-username, --mqtt-password-file) may also follow the "
                  "command.")


def share_globals(parser: argparse.ArgumentParser) -> None:
    """Accept the global flags after every subcommand, at every depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                add_globals(sub, inherited=True)
                sub.epilog = f"{sub.epilog}\n\n{GLOBALS_EPILOG}" if sub.epilog \
                    else GLOBALS_EPILOG
                share_globals(sub)


def export_security(args) -> None:
    """Flags become the variables every server and client here, and every service `up`
    starts, read (services/common/security.py, services/common/mqtt.py)."""
    for attr, var in SECURITY_FLAGS.items():
        if getattr(args, attr, None):
            os.environ[f"TLBSIM_{var}"] = getattr(args, attr)
    if getattr(args, "tls_client_auth", False):
        os.environ["TLBSIM_TLS_CLIENT_AUTH"] = "1"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m services",
                    description="Run one tlbsim service (the `tlbsim` command has the rest).")
    add_globals(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve(sub)
    share_globals(parser)
    return parser


def setup(args) -> None:
    """What every tlbsim command does with the global flags before it runs."""
    export_security(args)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except SimError as e:  # a bad --mqtt-url, contradicting liveness options, ...
        print(f"tlbsim: {e.message}", file=sys.stderr)
        return exitcodes.for_error(e.code.value, e.reason)
