"""The `tlbsim` command: serve a service, run a local cluster, drive load.

Every subcommand returns an exit code (services/common/exitcodes.py); errors are one line
on stderr."""
from __future__ import annotations

import argparse
import logging
import sys

import grpc

from loadgen.cli import chaos, load, tools
from services import cli as service_cli
from services.common import exitcodes
from services.common.errors import SimError
from services.common.server import reason_of
from services.launcher import commands as launcher


def build_parser() -> argparse.ArgumentParser:
    parser = service_cli.Parser(
        prog="tlbsim",
        description="Simulate how a multi-CPU machine keeps TLBs coherent with its page "
                    "tables: CPU services with TLBs, a memory service with page tables and "
                    "per-table locks, a shootdown coordinator, and a load generator.")
    service_cli.add_globals(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    service_cli.add_serve(sub)
    launcher.add_commands(sub)
    load.add_commands(sub)
    tools.add_commands(sub)
    chaos.add_commands(sub)
    service_cli.share_globals(parser)
    return parser


def exit_code_of(exc: BaseException) -> int:
    """The one exit code (services/common/exitcodes.py) of what stopped a command: by
    its status code and reason, never by its wording."""
    if isinstance(exc, SimError):
        return exitcodes.for_error(exc.code.value, exc.reason)
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return exitcodes.for_status(getattr(code, "name", ""), reason_of(exc))
    return exitcodes.INTERNAL


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    service_cli.setup(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    except SimError as e:
        print(f"tlbsim: {e.message}", file=sys.stderr)
        return exit_code_of(e)
    except grpc.RpcError as e:  # a call the cluster refused: say why in one line
        code = e.code() if callable(getattr(e, "code", None)) else None
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        print(f"tlbsim: {getattr(code, 'name', 'RPC failed')}: {details}", file=sys.stderr)
        return exit_code_of(e)
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        logging.getLogger("tlbsim").debug("internal error", exc_info=True)
        print(f"tlbsim: internal error (a bug; --log-level DEBUG shows the traceback): "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return exitcodes.INTERNAL
