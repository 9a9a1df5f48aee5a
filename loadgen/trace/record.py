"""`tlbsim trace record -o FILE -- CMD ARGS...`: run a real command under strace -f (and,
with --accesses, under valgrind's lackey) and write one trace file.

Valgrind's lackey log is read from a pipe while the command runs (`--log-fd`), parsed as
it comes and never stored: a long program's gigabytes of text use no disk. Its children
are silent after fork (`--child-silent-after-fork=yes`: the parent is followed, and a
child's accesses, which lackey cannot tell apart, never mix into its log). The log is
bounded (`limit` bytes, `--accesses-limit`): past it the command is stopped and the
trace holds what was read, marked `truncated`. strace and valgrind run in a process
group of their own, so on SIGTERM, SIGHUP or SIGQUIT (and Ctrl-C, which reaches only
tlbsim) the whole traced command is stopped and the temporary folder removed before
tlbsim exits. Only SIGKILL leaves the folder behind: it holds strace's log, which is
small (memory calls only); the lackey log is never on disk."""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Callable, Iterator

from loadgen.trace.fmt import write_trace
from loadgen.trace.lackey import LackeyParser
from loadgen.trace.strace import TRACE_EXPR, parse_strace
from services.common.errors import InvalidArgument, NotFound

# About 13 million page accesses (README: a sqlite insert, 389 s): still replayable.
DEFAULT_LIMIT = "1G"
READ_CHUNK = 1 << 20
STOP_GRACE_S = 5.0
# Signals that end `trace record` after cleaning up (Ctrl-C is a KeyboardInterrupt).
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Stopped(BaseException):
    """trace record received one of CLEANUP_SIGNALS; it exits 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def parse_size(text: str) -> int:
    """'500M', '2G', '1024' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise InvalidArgument(f"--accesses-limit {text!r}: expected a size such as 500M or 2G")
    size = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
    if size < 1 << 20:
        raise InvalidArgument(f"--accesses-limit {text!r}: at least 1M")
    return size


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NotFound(f"{name} is not installed (tools/setup-debian.sh installs it)")
    return path


def check_command(argv: list[str]) -> None:
    """The command exists and can be run: else strace would trace its own error."""
    if not argv:
        raise InvalidArgument("trace record needs a command after --")
    name = argv[0]
    if "/" in name:
        if not os.path.isfile(name):
            raise NotFound(f"{name}: no such file")
        if not os.access(name, os.X_OK):
            raise InvalidArgument(f"{name}: not executable")
    elif shutil.which(name) is None:
        raise NotFound(f"{name}: command not found on PATH")


def _version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip()


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM, SIGHUP, SIGQUIT raise Stopped here, so every `with` below unwinds (the
    command is stopped, the temporary folder removed); the old handlers come back."""
    def stop(signum, frame):
        raise Stopped(signum)

    previous = {}
    for sig in CLEANUP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: signals cannot be caught here
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _running(cmd: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """A child in a process group of its own that never outlives the block: when the
    block ends early (a signal, Ctrl-C, the log limit) the whole group — strace or
    valgrind and the traced command's own children — gets SIGTERM, then SIGKILL."""
    proc = subprocess.Popen(cmd, process_group=0, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)  # and whatever it left behind
            proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


Progress = Callable[[int, int], None]  # (bytes of lackey log read, access pages so far)


def record(output: str, argv: list[str], accesses: bool = False, quiet: bool = False,
           limit: int = parse_size(DEFAULT_LIMIT),
           progress: Progress = lambda read, pages: None) -> dict:
    check_command(argv)
    strace = _tool("strace")
    valgrind = _tool("valgrind") if accesses else ""
    sink = subprocess.DEVNULL if quiet else None
    with _signals_stop(), tempfile.TemporaryDirectory(prefix="tlbsim-trace-") as tmp:
        log = os.path.join(tmp, "strace.txt")
        # Signals stay in (counted, not replayed): with -e signal=none strace also drops
        # "+++ killed by SIG... +++", the only end a task killed by a signal has.
        with _running([strace, "-f", "-q", "-ttt", "-o", log, "-e", f"trace={TRACE_EXPR}",
                       "--", *argv], stdout=sink, stderr=sink) as proc:
            rc = proc.wait()
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
            v, vrc, truncated = _lackey(valgrind, argv, sink, limit, progress)
            header.update(source="valgrind-lackey", tool=_version([valgrind, "--version"]),
                          exit_status=vrc, strace_syscalls=header["syscalls"],
                          syscalls=dict(sorted(v.syscalls.items())),
                          unknown_syscalls=dict(sorted(v.unknown.items())),
                          instructions=v.instructions, other_syscalls=v.other,
                          note="events from one run under valgrind (its own address layout; "
                               "children are not followed); strace_syscalls: a native run")
            if truncated:
                header["truncated"] = truncated
            events = v.events
    try:
        return write_trace(output, header, events)
    except OSError as e:
        raise InvalidArgument(f"-o {output}: {e.strerror or e}") from None


def _lackey(valgrind: str, argv: list[str], sink, limit: int,
            progress: Progress) -> tuple[LackeyParser, int, str]:
    """Run the command under lackey, parsing its log from a pipe as it is written.
    Returns the parser, the exit status and why the log was cut ('' if it was not)."""
    parser = LackeyParser()
    read_fd, write_fd = os.pipe()
    truncated = ""
    try:
        with _running([valgrind, "--tool=lackey", "--trace-mem=yes", "--trace-syscalls=yes",
                       "--trace-children=no", "--child-silent-after-fork=yes",
                       f"--log-fd={write_fd}", "--", *argv],
                      stdout=sink, stderr=sink, pass_fds=(write_fd,)) as proc:
            os.close(write_fd)
            write_fd = -1
            read, pending, last = 0, "", 0.0
            while True:
                if select.select([read_fd], [], [], 0.5)[0]:
                    chunk = os.read(read_fd, READ_CHUNK)
                    if not chunk:
                        break
                elif proc.poll() is not None:
                    # Exited with its log drained: a forked child that never exec'd may
                    # still hold the pipe open (silent), so do not wait for end-of-file.
                    break
                else:
                    chunk = b""
                read += len(chunk)
                pending += chunk.decode("utf-8", errors="replace")
                lines = pending.split("\n")
                pending = lines.pop()
                parser.feed(lines)
                if read > limit:
                    truncated = (f"the lackey log passed --accesses-limit ({limit:,} "
                                 "bytes): the command was stopped")
                    _signal_group(proc.pid, signal.SIGKILL)
                    break
                if (now := time.monotonic()) - last > 0.5:
                    progress(read, parser.access_pages)
                    last = now
            if pending and not truncated:
                parser.feed([pending])
            rc = proc.wait()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
    if truncated:
        parser.drop_unfinished()  # a call cut off with the log
    return parser.finish(), rc, truncated
