"""The trace parsers and the trace file: strict, honest, with line numbers (issue 5)."""

import gc
import gzip
import json
import re

import pytest

from loadgen.trace.fmt import PAGE_LIMIT, Pages, TraceError, parse_lines, read_trace, write_trace
from loadgen.trace.lackey import parse_lackey
from loadgen.trace.strace import parse_strace

STRACE = """\
100 1000.000000 execve("/bin/sh", ["sh", "-c", "x = (1, 2)"], 0x7ffd /* 3 vars */) = 0
100 1000.000100 brk(NULL)               = 0x5600000
100 1000.000200 mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000000000
100 1000.000300 mlock(0x7f0000000000, 4096) = 0
100 1000.000400 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD <unfinished ...>
101 1000.000500 munmap(0x7f0000000000, 8192) = 0
100 1000.000600 <... clone resumed>, child_tidptr=0x7f00) = 101
101 1000.000700 mmap(0x7f0000100000, 4096, PROT_READ, MAP_PRIVATE|MAP_FIXED, 3, 0) = -1 ENOMEM (Cannot allocate memory)
101 1000.000800 madvise(0x7f0000000000, 4096, MADV_DONTNEED) = 0
101 1000.000900 clone3({flags=CLONE_VM|CLONE_THREAD|CLONE_SIGHAND, exit_signal=0, stack=0x7f00, stack_size=0x1000}, 88) = 102
102 1000.001000 exit(0)                 = ?
102 1000.001100 +++ exited with 0 +++
101 1000.001200 --- SIGCHLD {si_signo=SIGCHLD} ---
101 1000.001300 exit_group(0)           = ?
101 1000.001400 +++ exited with 0 +++
100 1000.001500 exit_group(0)           = ?
100 1000.001600 +++ exited with 0 +++
"""


def test_strace_parser_reads_every_form():
    p = parse_strace(STRACE.splitlines())
    assert dict(p.syscalls) == {"execve": 1, "brk": 1, "mmap": 2, "mlock": 1, "clone": 1,
                                "munmap": 1, "madvise": 1, "clone3": 1, "exit": 1,
                                "exit_group": 2}
    assert dict(p.unknown) == {"mlock": 1}  # counted and listed, not dropped
    assert p.signals == 1
    ops = [(e["tid"], e["op"]) for e in p.events]
    # The child's munmap was printed before its parent's clone returned: it follows it.
    assert ops.index((100, "clone")) < ops.index((101, "munmap"))
    clone = next(e for e in p.events if e["op"] == "clone" and e["call"] == "clone")
    assert clone["ret"] == 101 and "CLONE_VM" not in clone["flags"]
    thread = next(e for e in p.events if e.get("call") == "clone3")
    assert thread["ret"] == 102 and "CLONE_VM" in thread["flags"].split("|")
    failed = [e for e in p.events if "err" in e]
    assert len(failed) == 1 and failed[0]["err"] == "ENOMEM" and failed[0]["fd"] == 3
    execve = p.events[0]
    assert execve["path"] == "/bin/sh" and execve["ret"] == 0  # '=' inside a string is fine
    assert [e["tid"] for e in p.events if e["op"] == "end"] == [102, 101, 100]


@pytest.mark.parametrize("text, where", [
    ("100 1000.0 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, -1, 0) = 0x1000\ngarbage\n",
     "line 2"),
    ("100 1000.0 munmap(0x1000, 4096 = 0\n", "line 1"),                   # no ')'
    ("100 1000.0 munmap(0x1000, 4096) = what\n", "line 1"),              # bad result
    ("100 1000.0 mmap(NULL, 4096) = 0x1000\n", "line 1"),                # too few args
    ("100 1000.0 munmap(zzz, 4096) = 0\n", "line 1"),                    # not a number
    ("100 1000.0 brk(NULL <unfinished ...>\n", "line 1"),                # never resumed
    ("100 1000.0 <... brk resumed>) = 0\n", "line 1"),                   # resumed from nowhere
])
def test_strace_parser_rejects_malformed_lines_with_their_number(text, where):
    with pytest.raises(TraceError, match=where):
        parse_strace(text.splitlines())


def test_strace_parser_rejects_a_task_nobody_created():
    with pytest.raises(TraceError, match="task 7"):
        parse_strace(["1 1.0 brk(NULL) = 0x1000", "7 1.1 brk(NULL) = 0x2000"])


LACKEY = """\
==42== Lackey, an example Valgrind tool
I  04013a8e,2
 L 1fff000a5d,1
 S 1fff000a58,8
SYSCALL[42,1](12) sys_brk ( 0x0 ) --> [pre-success] Success(0x4035000) 
SYSCALL[42,1](257) sys_openat ( 4294967196, 0x4034bb0(/x.so), 524288 ) --> [async] ... 
SYSCALL[42,1](257) ... [async] --> Success(0x4) 
SYSCALL[42,1](9) sys_mmap ( 0x0, 8192, 3, 34, 4294967295, 0 ) --> [pre-success] Success(0x4835000) 
 M 4835000,8
 L 4835008,8
 L 4836ffc,8
SYSCALL[42,1](11) sys_munmap ( 0x4835000, 8192 )[sync] --> Success(0x0) 
SYSCALL[42,1](28) sys_madvise ( 0x4835000, 4096, 4 )[sync] --> Failure(0xc) 
SYSCALL[42,1](231) exit_group( 0 ) --> [pre-success] Success(0x0) ==42== 
==42== Exit code:       0
"""


def test_lackey_parser_collapses_pages_and_keeps_program_order():
    p = parse_lackey(LACKEY.splitlines())
    assert dict(p.syscalls) == {"brk": 1, "mmap": 1, "munmap": 1, "madvise": 1, "exit_group": 1}
    assert p.other == 1 and p.instructions == 1
    ops = [e["op"] for e in p.events]
    assert ops == ["access", "brk", "mmap", "access", "munmap", "madvise", "exit"]
    assert p.events[0]["pages"] == [[0x1fff000, 1]]          # L then S, same page: written
    # 0x4835000 (M = write), 0x4835008 same page, then 0x4836ffc..0x4837003 spans two pages.
    assert p.events[3]["pages"] == [[0x4835, 1], [0x4836, 0], [0x4837, 0]]
    mmap = p.events[2]
    assert mmap["prot"] == "PROT_READ|PROT_WRITE" and mmap["fd"] == -1 and mmap["ret"] == 0x4835000
    assert p.events[5]["err"] == "errno 12" and p.events[5]["advice"] == "MADV_DONTNEED"


def test_lackey_parser_rejects_what_it_cannot_read():
    with pytest.raises(TraceError, match="line 2"):
        parse_lackey(["==1== hello", "something else"])
    with pytest.raises(TraceError, match="line 1"):
        parse_lackey(["SYSCALL[1,1](9) sys_mmap ( 0x0, zz, 3, 34, 0, 0 ) --> Success(0x1000)"])


def _trace_lines(evs, announced=None, **header) -> list[str]:
    head = {"format": "tlbsim-trace", "version": 1, "source": "strace",
            "events": len(evs) if announced is None else announced,
            **header}
    return [json.dumps(head)] + [json.dumps(e) for e in evs]


def test_trace_file_round_trip(tmp_path):
    path = str(tmp_path / "t.tlbt.gz")
    events = parse_strace(STRACE.splitlines()).events
    header = write_trace(path, {"source": "strace", "command": ["sh"]}, events)
    assert header["events"] == len(events)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip
    h, back = read_trace(path)
    assert back == events and h["command"] == ["sh"]


@pytest.mark.parametrize("lines, where", [
    ([], "line 1"),
    (['{"format": "other"}'], "line 1"),
    (_trace_lines([{"op": "munmap", "tid": 1, "addr": 0, "len": 4096, "ret": 0}])[:1]
     + ["{not json"], "line 2"),
    (_trace_lines([{"op": "mmap", "tid": 1, "addr": 0, "len": 4096, "ret": 0}]), "line 2"),
    (_trace_lines([{"op": "munmap", "tid": 1, "addr": 0, "len": 4096}]), "line 2"),
    (_trace_lines([{"op": "munmap", "tid": 1, "addr": 0, "len": 1, "ret": 0},
                   {"op": "teleport", "tid": 1}]), "line 3"),
    (_trace_lines([{"op": "access", "tid": 1, "pages": [[1, 2]]}]), "line 2"),
    (_trace_lines([{"op": "brk", "tid": 1, "addr": 0, "ret": 0}], announced=5), "announces"),
])
def test_trace_reader_rejects_malformed_files_with_the_line(lines, where):
    with pytest.raises(TraceError, match=where):
        parse_lines(lines)


@pytest.mark.parametrize("bad", [[1, 2], [1], [-1, 0], "x", [1.5, 0], [1, 0, 0], ["1", 0]])
def test_a_bad_access_page_is_named_among_good_ones(bad):
    pages = [[7, 0], [8, 1]] * 50 + [bad] + [[9, 0]]
    with pytest.raises(TraceError, match=re.escape(f"line 2: access pages must be [page, "
                                                   f"0|1] pairs, got {bad!r}")):
        parse_lines(_trace_lines([{"op": "access", "tid": 1, "pages": pages}]))
    _, events = parse_lines(_trace_lines([{"op": "access", "tid": 1, "pages": pages[:100]}]))
    assert events[0]["pages"] == pages[:100]  # the good ones alone pass


def test_access_pages_are_packed_and_a_page_past_64_bits_is_named():
    pages = [[7, 0], [8, 1], [PAGE_LIMIT - 1, 1], [True, False]]
    _, events = parse_lines(_trace_lines([{"op": "access", "tid": 1, "pages": pages}]))
    got = events[0]["pages"]
    assert isinstance(got, Pages) and got == pages
    assert list(got.packed) == [14, 17, (PAGE_LIMIT - 1) << 1 | 1, 2]
    with pytest.raises(TraceError, match=re.escape(f"line 3: access page {PAGE_LIMIT:#x} is "
                                                   "past any 64-bit address's")):
        parse_lines(_trace_lines([{"op": "access", "tid": 1, "pages": pages},
                                  {"op": "access", "tid": 1, "pages": [[PAGE_LIMIT, 0]]}]))


def test_the_collector_is_back_as_it_was_after_a_parse_good_or_bad():
    good = _trace_lines([{"op": "access", "tid": 1, "pages": [[1, 0]]}])
    bad = _trace_lines([{"op": "access", "tid": 1, "pages": [[1, 2]]}])
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            parse_lines(good)
            assert gc.isenabled() == enabled
            with pytest.raises(TraceError):
                parse_lines(bad)
            assert gc.isenabled() == enabled
        finally:
            gc.enable()


def test_the_last_trace_read_is_kept_only_while_its_file_is_unchanged(tmp_path):
    path = str(tmp_path / "t.tlbt.gz")
    one = {"op": "access", "tid": 1, "pages": [[1, 0]]}
    write_trace(path, {"source": "valgrind-lackey"}, [one])
    first = read_trace(path)
    assert read_trace(path) is first  # `load replay` checks, then the run reads
    write_trace(path, {"source": "valgrind-lackey"}, [one, {**one, "pages": [[2, 1]]}])
    header, events = read_trace(path)
    assert header["events"] == 2 and events[1]["pages"] == [[2, 1]]


def test_trace_reader_rejects_a_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "t.tlbt.gz"
    path.write_text("hello")
    with pytest.raises(TraceError, match="gzip"):
        read_trace(str(path))
    with gzip.open(path, "wt") as f:
        f.write("\n".join(_trace_lines([])) + "\n")
    assert read_trace(str(path))[1] == []


# What valgrind 3.19 writes for programs that fork (gcc, tar, sh -c): the result on the
# next line; clone's flags in hex without 0x; a call name with a variant in brackets.
LACKEY_FORKS = """\
==50== Lackey, an example Valgrind tool
SYSCALL[50,1](12) sys_brk ( 0x0 ) --> [pre-success] Success(0x4035000) 
 S 1fff000a58,8
SYSCALL[50,1](58) sys_fork ( )   fork: process 50 created child 51
 --> [pre-success] Success(0x33) 
SYSCALL[50,1](72) sys_fcntl[ARG3=='arg'] ( 3, 2, 1 )[sync] --> Success(0x0) 
SYSCALL[50,1](56) sys_clone ( 1200011, 0x0, 0x0, 0x4afb490, 0x0 )   clone(fork): process 50 created child 52
 --> [pre-success] Success(0x34) 
SYSCALL[50,1](56) sys_clone ( 3d0f00, 0x5b00000, 0x5b00990, 0x5b00990, 0x5b006c0 ) --> [pre-success] Success(0x35) 
SYSCALL[53,2](60) sys_exit( 0 ) --> [pre-success] Success(0x0) 
SYSCALL[50,1](231) exit_group( 0 ) --> [pre-success] Success(0x0) 
"""


def test_lackey_parser_reads_forks_whose_result_is_on_the_next_line():
    p = parse_lackey(LACKEY_FORKS.splitlines())
    clones = [e for e in p.events if e["op"] == "clone"]
    assert [(e["call"], e["ret"]) for e in clones] == [("fork", 0x33), ("clone", 0x34),
                                                       ("clone", 0x35)]
    # 0x1200011 (SIGCHLD|CLONE_CHILD_*): a fork; 0x3d0f00 (CLONE_VM|CLONE_THREAD|...): a
    # thread, whose valgrind thread 2 (pid 53 here) is the clone's child.
    assert clones[1]["flags"] == "0x1200011"
    assert clones[2]["flags"] == "CLONE_VM|CLONE_THREAD|0x3d0f00"
    assert [e["tid"] for e in p.events if e["op"] == "exit"] == [0x35, 50]
    assert p.other == 1 and dict(p.syscalls)["fork"] == 1


def test_lackey_parser_fed_in_pieces_reads_what_it_reads_whole():
    lines = (LACKEY + LACKEY_FORKS.split("\n", 1)[1]).splitlines()
    whole = parse_lackey(lines)
    for cut in range(len(lines) + 1):
        from loadgen.trace.lackey import LackeyParser
        pieces = LackeyParser().feed(lines[:cut]).feed(lines[cut:]).finish()
        assert pieces.events == whole.events, cut


def test_lackey_parser_wants_the_result_line_of_a_fork():
    with pytest.raises(TraceError, match=r"line 2: fork without a result \(line 3"):
        parse_lackey(["==1== x", "SYSCALL[1,1](58) sys_fork ( )   fork: created child 2",
                      "SYSCALL[1,1](12) sys_brk ( 0x0 ) --> [pre-success] Success(0x1)"])
    with pytest.raises(TraceError, match="line 2: fork without a result .the log ends"):
        parse_lackey(["==1== x", "SYSCALL[1,1](58) sys_fork ( )   fork: created child 2"])
