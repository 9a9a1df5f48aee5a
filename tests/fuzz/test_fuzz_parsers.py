"""Fuzzing the trace parsers and the CLI's argument parsing (issue 8).

Trace input, whatever it holds, parses or raises the parser's own TraceError; every
error about a line names it. Any argv gives parsed arguments, a usage error (exit 2,
one line naming the problem after the usage) or --help (exit 0), never a traceback.
Only the parser is exercised: no command runs, so no cluster starts."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from loadgen.trace.fmt import FORMAT, VERSION, TraceError, parse_lines
from loadgen.trace.lackey import parse_lackey
from loadgen.trace.strace import parse_strace
from loadgen.cli.main import build_parser
from tests.fuzz.fuzzing import FUZZ_SETTINGS

STRACE_LINES = [
    '100 1000.000000 execve("/bin/sh", ["sh", "-c", "x = (1, 2)"], 0x7ffd /* 3 vars */) = 0',
    "100 1000.000100 brk(NULL)               = 0x5600000",
    "100 1000.000200 mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)"
    " = 0x7f0000000000",
    "100 1000.000400 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|SIGCHLD <unfinished ...>",
    "101 1000.000500 munmap(0x7f0000000000, 8192) = 0",
    "100 1000.000600 <... clone resumed>, child_tidptr=0x7f00) = 101",
    "101 1000.000800 madvise(0x7f0000000000, 4096, MADV_DONTNEED) = 0",
    "101 1000.000700 mmap(0x7f0000100000, 4096, PROT_READ, MAP_PRIVATE|MAP_FIXED, 3, 0) = -1"
    " ENOMEM (Cannot allocate memory)",
    "102 1000.001000 exit(0)                 = ?",
    "102 1000.001100 +++ exited with 0 +++",
    "101 1000.001200 --- SIGCHLD {si_signo=SIGCHLD} ---",
    "100 1000.001500 exit_group(0)           = ?",
]
LACKEY_LINES = [
    "==4242== Lackey, an example Valgrind tool",
    "==4242== Command: ./a.out",
    "SYSCALL[4242,1](12) sys_brk ( 0x0 ) --> [async] ... ",
    "SYSCALL[4242,1](12) ... [async] --> Success(0x5000000) ",
    "SYSCALL[4242,1](9) sys_mmap ( 0x0, 8192, 3, 34, -1, 0 ) --> Success(0x4000000) ",
    " S 04000000,8",
    " L 04001008,4",
    "I  0400d7d4,3",
    "SYSCALL[4242,1](11) sys_munmap ( 0x4000000, 8192 ) --> Success(0x0) ",
    "SYSCALL[4242,1](231) sys_exit_group ( 0 ) --> [async] ... ",
]


def mutated(lines: list[str]):
    """Valid lines, some cut, spliced, duplicated or replaced by random text."""
    one = st.one_of(
        st.sampled_from(lines),
        st.tuples(st.sampled_from(lines), st.integers(0, 120)).map(lambda t: t[0][:t[1]]),
        st.tuples(st.sampled_from(lines), st.integers(0, 120), st.text(max_size=12)).map(
            lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:]),
        st.text(max_size=60))
    return st.lists(one, max_size=12)


def names_a_line(message: str) -> bool:
    return bool(re.match(r"(line \d+|task \d+|valgrind thread \d+|[^:]+: not a readable)",
                         message))


@FUZZ_SETTINGS
@given(mutated(STRACE_LINES))
def test_strace_parser_fuzz(lines):
    try:
        parse_strace(lines)
    except TraceError as e:
        assert names_a_line(e.message), e.message


@FUZZ_SETTINGS
@given(mutated(LACKEY_LINES))
def test_lackey_parser_fuzz(lines):
    try:
        parse_lackey(lines)
    except TraceError as e:
        assert names_a_line(e.message), e.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                              max_size=4), max_leaves=12)
EVENT_KEYS = ["op", "tid", "addr", "len", "prot", "flags", "fd", "ret", "err", "pages",
              "call", "path", "status", "advice", "old_len", "new_len"]
events = st.one_of(
    st.dictionaries(st.sampled_from(EVENT_KEYS), json_values, max_size=8),
    st.fixed_dictionaries({"op": st.sampled_from(["mmap", "munmap", "access", "end", "x"]),
                           "tid": st.integers(-1, 5)},
                          optional={"addr": json_values, "len": json_values,
                                    "pages": st.lists(st.lists(json_values, max_size=3),
                                                      max_size=3),
                                    "ret": json_values, "status": json_values}),
    json_values)


@FUZZ_SETTINGS
@given(st.lists(events, max_size=6), st.lists(st.text(max_size=20), max_size=2),
       st.sampled_from(["strace", "valgrind-lackey", "other"]), st.integers(0, 8))
def test_trace_file_parser_fuzz(evs, junk, source, announced):
    header = {"format": FORMAT, "version": VERSION, "source": source, "events": announced}
    lines = [json.dumps(header), *(json.dumps(e) for e in evs), *junk]
    try:
        parse_lines(lines)
    except TraceError as e:
        assert re.match(r"line \d+: ", e.message), e.message


# --- the CLI -----------------------------------------------------------------------------
WORDS = ["serve", "cpu", "memory", "coordinator", "up", "down", "status", "run", "compare",
         "trace", "record", "replay", "demo", "bench", "--help", "-h", "--id", "--listen",
         "--metrics-port", "--frames", "--cpus", "--log-level", "DEBUG", "--mqtt-url",
         "--policy", "--scenario", "--seed", "--duration", "--json", "--", "-", "0", "-1",
         "1e9", "99999999999999999999", "127.0.0.1:0", "x=y", "--token-file", "--tls-cert"]


def parse(argv: list[str]) -> tuple[int, str, str]:
    """Parse only: build_parser().parse_args, as main() does before running anything."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


ERROR_LINE = re.compile(r"^tlbsim[\w -]*: error: ", re.M)


def one_usage_error(err: str) -> bool:
    """The usage, then one error line (which may echo an argument holding a newline)."""
    return err.startswith("usage: tlbsim") and len(ERROR_LINE.findall(err)) == 1 and \
        ERROR_LINE.search(err).start() > 0


@FUZZ_SETTINGS
@given(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=10)), max_size=6))
@example(["up", "\x1e", "serve"])  # long-run finds: characters that end lines for
@example(["up", "\n0"])            # str.splitlines(), echoed in the error message
def test_cli_argument_parsing_fuzz(argv):
    code, out, err = parse(argv)
    assert "Traceback" not in out + err
    if code == 2:  # argparse's usage error
        assert one_usage_error(err), err
    else:
        assert code == 0, (code, err)
        assert err == ""


@pytest.mark.parametrize("argv", [[], ["serve"], ["serve", "gpu"], ["--log-level", "LOUD"],
                                  ["serve", "cpu", "--id", "one"]])
def test_cli_usage_errors_are_one_line(argv):
    code, out, err = parse(argv)
    assert code == 2 and out == ""
    assert one_usage_error(err) and err.rstrip("\n").split("\n")[-1].startswith("tlbsim")
