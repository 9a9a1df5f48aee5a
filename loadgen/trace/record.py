"""`tlbsim trace record -o FILE -- CMD ARGS...`: run a real command under strace -f (and,
with --accesses, under valgrind's lackey) and write one trace file."""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile

from loadgen.trace.fmt import write_trace
from loadgen.trace.lackey import parse_lackey
from loadgen.trace.strace import TRACE_EXPR, parse_strace
from services.common.errors import FailedPrecondition, InvalidArgument


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FailedPrecondition(f"{name} is not installed (tools/setup-debian.sh installs it)")
    return path


def _version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip()


def record(output: str, argv: list[str], accesses: bool = False,
           quiet: bool = False) -> dict:
    if not argv:
        raise InvalidArgument("trace record needs a command after --")
    strace = _tool("strace")
    sink = subprocess.DEVNULL if quiet else None
    with tempfile.TemporaryDirectory(prefix="tlbsim-trace-") as tmp:
        log = os.path.join(tmp, "strace.txt")
        # Signals stay in (counted, not replayed): with -e signal=none strace also drops
        # "+++ killed by SIG... +++", the only end a task killed by a signal has.
        rc = subprocess.run([strace, "-f", "-q", "-ttt", "-o", log, "-e", f"trace={TRACE_EXPR}",
                             "--", *argv], stdout=sink, stderr=sink).returncode
        with open(log, encoding="utf-8", errors="replace") as f:
            p = parse_strace(f)
        header = {"source": "strace", "command": argv,
                  "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "tool": _version([strace, "-V"]), "page_size": 4096, "exit_status": rc,
                  "syscalls": dict(sorted(p.syscalls.items())),
                  "unknown_syscalls": dict(sorted(p.unknown.items())), "signals": p.signals}
        events = p.events
        if accesses:
            valgrind = _tool("valgrind")
            vlog = os.path.join(tmp, "lackey.txt")
            vrc = subprocess.run([valgrind, "--tool=lackey", "--trace-mem=yes",
                                  "--trace-syscalls=yes", "--trace-children=no",
                                  f"--log-file={vlog}", "--", *argv],
                                 stdout=sink, stderr=sink).returncode
            with open(vlog, encoding="utf-8", errors="replace") as f:
                v = parse_lackey(f)
            header.update(source="valgrind-lackey", tool=_version([valgrind, "--version"]),
                          exit_status=vrc, strace_syscalls=header["syscalls"],
                          syscalls=dict(sorted(v.syscalls.items())),
                          unknown_syscalls=dict(sorted(v.unknown.items())),
                          instructions=v.instructions, other_syscalls=v.other,
                          note="events from one run under valgrind (its own address layout; "
                               "children are not followed); strace_syscalls: a native run")
            events = v.events
    return write_trace(output, header, events)
