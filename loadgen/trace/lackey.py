"""Parse a valgrind log written with `--tool=lackey --trace-mem=yes --trace-syscalls=yes`
into trace events: the guest's memory-management calls (valgrind's syscall trace, with
numeric arguments) and its data accesses (lackey's ` L|S|M addr,size` lines) in program
order, in one address space. Consecutive accesses to the same page are collapsed into one
(written if any of them wrote). Lackey does not say which thread made an access: each
access is given to the thread of the latest system call (valgrind runs one thread at a
time and switches mostly at system calls). Instruction fetches (`I`) are not counted.
A call whose result valgrind writes on the next line (fork and clone:
`SYSCALL[..] sys_fork ( )   fork: process 1 created child 2` then
` --> [pre-success] Success(0x2)`) takes its result from that line. The log must be the
traced process's alone (`trace record` runs valgrind with --child-silent-after-fork=yes:
a forked child's accesses have no pid to tell them apart).
Strict: any other line is an error naming its number. Lines can be fed in pieces (a
log read while valgrind writes it); `finish()` ends the log."""
from __future__ import annotations

import collections
import re
from typing import Iterable

from loadgen.trace.fmt import Pages, TraceError
from loadgen.trace.strace import HANDLED, MEMORY_UNSIMULATED

PAGE_SHIFT = 12
MAX_PAGES_PER_EVENT = 1024
_SYSCALL = re.compile(r"^SYSCALL\[(\d+),(\d+)\]\((\d+)\) (.*)$")
_ACCESS = re.compile(r"^(?:I  | ([LSM]) )([0-9a-f]+),(\d+)$")
# `sys_NAME ( ARGS ) ...`; a variant in brackets (`sys_fcntl[ARG3=='arg']`) is dropped.
_CALL = re.compile(r"^(?:sys_)?(\w+)(?:\[[^\]]*\])? ?\( ?(.*?) ?\)(.*)$")
# Arguments valgrind prints in hex without a 0x (syswrap-linux.c: "sys_clone ( %lx, ...").
HEX_WITHOUT_PREFIX = {("clone", 0)}
_DONE = re.compile(r"(?:\[[\w-]+\] )?--> (?:\[[\w-]+\] )?(Success|Failure)\(0x([0-9a-f]+)\)")
_VG_MESSAGE = re.compile(r"==(\d+)==")
_CONTINUATION = re.compile(r"^\s*-->")
# The fast path of `feed` (nearly every line of a log is one of these two).
_INSTRUCTION_LINE = re.compile(r"I  [0-9a-f]+,\d+\n?")
_DATA_LINE = re.compile(r" ([LSM]) ([0-9a-f]+),(\d+)\n?")
MAP_FIXED = 0x10
CLONE_VM, CLONE_VFORK, CLONE_THREAD = 0x100, 0x4000, 0x10000
MADV = {0: "MADV_NORMAL", 1: "MADV_RANDOM", 2: "MADV_SEQUENTIAL", 3: "MADV_WILLNEED",
        4: "MADV_DONTNEED", 8: "MADV_FREE", 14: "MADV_HUGEPAGE", 15: "MADV_NOHUGEPAGE"}


def _prot(v: int) -> str:
    names = [n for bit, n in ((1, "PROT_READ"), (2, "PROT_WRITE"), (4, "PROT_EXEC")) if v & bit]
    return "|".join(names) or "PROT_NONE"


def _clone_flags(v: int) -> str:
    names = [n for bit, n in ((CLONE_VM, "CLONE_VM"), (CLONE_VFORK, "CLONE_VFORK"),
                              (CLONE_THREAD, "CLONE_THREAD")) if v & bit]
    return "|".join(names + [hex(v)])


class LackeyParser:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.syscalls: collections.Counter = collections.Counter()
        self.unknown: collections.Counter = collections.Counter()
        self.instructions = 0
        self.other = 0  # system calls that are neither memory management nor task life
        self._tid: int | None = None
        self._pending: dict[int, tuple[str, list[int], int]] = {}
        self._pages = Pages()
        self._vtid_to_tid: dict[int, int] = {}
        self._unclaimed_threads: list[int] = []
        self._n = 0  # lines read so far
        # A call whose result is on the next line: (tid, name, args, its line number).
        self._awaiting: tuple[int, str, list[int], int] | None = None

    def feed(self, lines: Iterable[str]) -> "LackeyParser":
        instruction, data = _INSTRUCTION_LINE.fullmatch, _DATA_LINE.fullmatch
        for raw in lines:
            self._n += 1
            if self._awaiting is None:
                if instruction(raw):
                    self.instructions += 1
                    continue
                if (a := data(raw)) and self._tid is not None:
                    self._access(*a.groups())
                    continue
            n = self._n
            line = raw.rstrip("\n")
            m = _VG_MESSAGE.search(line)
            if m:  # a valgrind message, possibly glued to the end of a SYSCALL line
                line = line[:m.start()]
                if self._tid is None:  # the first message names the traced process
                    self._tid = int(m.group(1))
            if line.strip():
                self._line(line, n)
        return self

    def finish(self) -> "LackeyParser":
        """The log ended: the last accesses become an event; a call still waiting for
        its result is an error."""
        if self._awaiting is not None:
            _, name, _, n = self._awaiting
            raise TraceError(f"line {n}: {name} without a result (the log ends)")
        self._flush_pages()
        return self

    def drop_unfinished(self) -> None:
        """The log was cut: a call still waiting for its result is dropped."""
        self._awaiting = None

    @property
    def access_pages(self) -> int:
        return sum(len(e["pages"]) for e in self.events if e["op"] == "access") \
            + len(self._pages)

    def _line(self, line: str, n: int) -> None:
        if self._awaiting is not None:
            tid, name, args, first = self._awaiting
            self._awaiting = None
            done = _DONE.search(line) if _CONTINUATION.match(line) else None
            if done is None:
                raise TraceError(f"line {first}: {name} without a result (line {n} is not "
                                 "its ` --> ` result)")
            self._emit(tid, name, args, done, first)
            return
        if a := _ACCESS.match(line):
            kind, address, size = a.groups()
            if kind is None:
                self.instructions += 1
                return
            if self._tid is None:
                raise TraceError(f"line {n}: a memory access before valgrind named the process")
            self._access(kind, address, size)
            return
        if s := _SYSCALL.match(line):
            self._syscall(int(s.group(1)), int(s.group(2)), s.group(4), n)
            return
        if line.strip().startswith("-->"):  # the result of an unimplemented syscall
            return
        raise TraceError(f"line {n}: not a valgrind/lackey line: {line[:80]!r}")

    def _access(self, kind: str, address: str, size: str) -> None:
        first = int(address, 16) >> PAGE_SHIFT
        last = (int(address, 16) + max(1, int(size)) - 1) >> PAGE_SHIFT
        for page in range(first, last + 1):
            self._page(page, kind != "L")

    def _page(self, page: int, write: bool) -> None:
        self._pages.add(page, write)
        if len(self._pages) >= MAX_PAGES_PER_EVENT:
            self._flush_pages()

    def _flush_pages(self) -> None:
        if self._pages:
            self.events.append({"op": "access", "tid": self._tid, "pages": self._pages})
            self._pages = Pages()

    def _task(self, pid: int, vtid: int) -> int:
        if vtid not in self._vtid_to_tid:
            if vtid == 1:
                self._vtid_to_tid[vtid] = pid
            elif self._unclaimed_threads:
                self._vtid_to_tid[vtid] = self._unclaimed_threads.pop(0)
            else:
                raise TraceError(f"valgrind thread {vtid} appears without a clone")
        return self._vtid_to_tid[vtid]

    def _syscall(self, pid: int, vtid: int, rest: str, n: int) -> None:
        self._flush_pages()  # accesses before the call stay before it
        self._tid = self._task(pid, vtid)
        tid = self._tid
        if rest.startswith("... [async]"):
            if vtid not in self._pending:
                raise TraceError(f"line {n}: an async result without its call")
            name, args, _ = self._pending.pop(vtid)
            if name not in HANDLED:
                return
            done = _DONE.search(rest)
            if not done:
                raise TraceError(f"line {n}: cannot read the result of {name}")
            self._emit(tid, name, args, done, n)
            return
        if rest.startswith("unimplemented"):
            self.other += 1
            return
        c = _CALL.match(rest)
        if not c:
            raise TraceError(f"line {n}: cannot read the system call {rest[:80]!r}")
        name, argtext, after = c.groups()
        if name not in HANDLED:
            # Like strace -e trace=%memory,...: memory calls are counted (and listed as
            # unknown when the simulator has no model); the rest are only counted.
            if name in MEMORY_UNSIMULATED:
                self.syscalls[name] += 1
                self.unknown[name] += 1
            else:
                self.other += 1
            if "[async]" in after and not _DONE.search(after):
                self._pending[vtid] = (name, [], n)
            return
        self.syscalls[name] += 1
        args = []
        for i, a in enumerate(argtext.split(", ") if argtext else []):
            try:
                args.append(int(a.split("(")[0], 16 if (name, i) in HEX_WITHOUT_PREFIX else 0))
            except ValueError:
                raise TraceError(f"line {n}: {name}: argument {a!r} is not a number") from None
        done = _DONE.search(after)
        if done:
            self._emit(tid, name, args, done, n)
        elif "[async]" in after:
            self._pending[vtid] = (name, args, n)
        elif name in ("execve", "execveat", "exit", "exit_group"):
            self._emit(tid, name, args, None, n)
        else:  # fork, clone: valgrind writes the result on the next line
            self._awaiting = (tid, name, args, n)

    def _emit(self, tid: int, name: str, a: list[int], done, n: int) -> None:
        e: dict = {"tid": tid}
        if name not in ("exit", "exit_group"):
            if done is None or done.group(1) == "Failure":
                e["err"] = f"errno {int(done.group(2), 16)}" if done else "unknown"
            else:
                e["ret"] = int(done.group(2), 16)

        def need(k: int) -> None:
            if len(a) < k:
                raise TraceError(f"line {n}: {name} with {len(a)} arguments, expected {k}")

        if name == "mmap":
            need(6)
            fd = a[4] if a[4] < 1 << 31 else a[4] - (1 << 32)
            e.update(op="mmap", addr=a[0], len=a[1], prot=_prot(a[2]),
                     flags="MAP_FIXED" if a[3] & MAP_FIXED else hex(a[3]), fd=fd)
        elif name in ("munmap", "mprotect", "madvise"):
            need(2 if name == "munmap" else 3)
            e.update(op=name, addr=a[0], len=a[1])
            if name == "mprotect":
                e["prot"] = _prot(a[2])
            elif name == "madvise":
                e["advice"] = MADV.get(a[2], f"MADV_{a[2]}")
        elif name == "brk":
            need(1)
            e.update(op="brk", addr=a[0])
        elif name == "mremap":
            need(4)
            e.update(op="mremap", addr=a[0], old_len=a[1], new_len=a[2], flags=hex(a[3]))
        elif name in ("clone", "clone3", "fork", "vfork"):
            flags = a[0] if name == "clone" and a else 0
            e.update(op="clone", call=name, flags=_clone_flags(flags) if name == "clone"
                     else "")
            if "ret" in e and flags & CLONE_VM:
                self._unclaimed_threads.append(e["ret"])
        elif name in ("execve", "execveat"):
            e.update(op="execve", call=name, path="")
            if done is None:  # it did not return: it succeeded
                e.pop("err", None)
                e["ret"] = 0
        else:
            e.update(op="exit", call=name)
        self.events.append(e)


def parse_lackey(lines: Iterable[str]) -> LackeyParser:
    return LackeyParser().feed(lines).finish()
