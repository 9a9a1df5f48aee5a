"""Parse `strace -f -ttt` output into trace events (strict: a line it cannot read is an
error with its number; a system call it does not simulate is counted and listed)."""
from __future__ import annotations

import collections
import re
from typing import Iterable

from loadgen.trace.fmt import TraceError

# What `trace record` asks strace for: every memory-management call (%memory) and the
# calls that create, replace and end tasks. Calls of %memory that the simulator has no
# model for (mlock, msync, mincore, ...) are counted as unknown.
TRACE_EXPR = "%memory,clone,clone3,fork,vfork,execve,execveat,exit,exit_group"
HANDLED = {"mmap", "munmap", "mprotect", "madvise", "brk", "mremap", "clone", "clone3",
           "fork", "vfork", "execve", "execveat", "exit", "exit_group"}

# strace's %memory class beyond what the simulator handles (strace -e trace=%memory).
MEMORY_UNSIMULATED = {"mlock", "mlock2", "mlockall", "munlock", "munlockall", "msync", "mincore",
                      "mbind", "set_mempolicy", "get_mempolicy", "set_mempolicy_home_node",
                      "migrate_pages", "move_pages", "remap_file_pages", "pkey_mprotect",
                      "pkey_alloc", "pkey_free", "process_madvise", "process_mrelease", "mseal",
                      "map_shadow_stack", "shmat", "shmdt", "cachestat", "memfd_secret"}

_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_END = re.compile(r"^\+\+\+ (exited with -?\d+|killed by SIG\w+(?: \(core dumped\))?) \+\+\+$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$")
_RET = re.compile(r"^\s*=\s*(-?\d+|0x[0-9a-f]+|\?)(?:\s+(E[A-Z0-9_]+)\b.*|\s+<unavailable>)?$")
UNFINISHED = " <unfinished ...>"


def _split_args(text: str, n: int) -> tuple[list[str], str]:
    """Split `a, b, [c, d], "e)"...) = 3` at top-level commas up to the closing paren;
    return the arguments and what follows the paren."""
    args: list[str] = []
    cur: list[str] = []
    depth, i, quote = 0, 0, False
    while i < len(text):
        ch = text[i]
        if quote:
            cur.append(ch)
            if ch == "\\" and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
            cur.append(ch)
        elif text.startswith("/*", i):
            end = text.find("*/", i)
            if end < 0:
                raise TraceError(f"line {n}: unterminated comment")
            cur.append(text[i:end + 2])
            i = end + 1
        elif ch in "([{":
            depth += 1
            cur.append(ch)
        elif ch in "}]" or (ch == ")" and depth > 0):
            depth -= 1
            cur.append(ch)
        elif ch == ")":
            last = "".join(cur).strip()
            if last or args:
                args.append(last)
            return args, text[i + 1:]
        elif ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    raise TraceError(f"line {n}: no closing parenthesis in the argument list")


def _int(text: str, n: int, what: str) -> int:
    text = text.strip()
    if text == "NULL":
        return 0
    try:
        return int(text, 0)
    except ValueError:
        raise TraceError(f"line {n}: {what}: expected a number, got {text!r}") from None


def _field(args: list[str], name: str) -> str | None:
    """`flags=CLONE_VM|...` inside clone's arguments or clone3's struct."""
    for a in args:
        for part in re.split(r"[{},]\s*", a):
            if part.startswith(name + "="):
                return part[len(name) + 1:]
    return None


class StraceParser:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.syscalls: collections.Counter = collections.Counter()
        self.unknown: collections.Counter = collections.Counter()
        self.signals = 0
        self._pending: dict[int, tuple[str, str, float, int]] = {}
        self._known: set[int] = set()      # tasks created by a traced call, or the first
        self._held: dict[int, list[dict]] = collections.defaultdict(list)
        self._t0: float | None = None

    def feed(self, lines: Iterable[str]) -> "StraceParser":
        for n, raw in enumerate(lines, start=1):
            line = raw.rstrip("\n")
            if line.strip():
                self._line(line, n)
        return self

    def finish(self) -> list[dict]:
        if self._pending:
            tid, (name, *_rest) = next(iter(self._pending.items()))
            raise TraceError(f"line {_rest[2]}: task {tid}: {name} never resumed "
                             "(truncated strace output?)")
        if self._held:
            tid, events = next(iter(self._held.items()))
            raise TraceError(f"task {tid} has events but no traced clone/fork created it")
        return self.events

    # --- one line --------------------------------------------------------------------
    def _line(self, line: str, n: int) -> None:
        m = _LINE.match(line)
        if not m:
            raise TraceError(f"line {n}: expected 'PID SECONDS.MICROS SYSCALL(...) = RESULT' "
                             f"(strace -f -ttt), got {line[:80]!r}")
        tid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if self._t0 is None:
            self._t0 = t
            self._known.add(tid)
        t = round(t - self._t0, 6)
        if rest.startswith("--- ") and rest.endswith(" ---"):
            self.signals += 1
            return
        if end := _END.match(rest):
            self._emit({"op": "end", "tid": tid, "t": t, "status": end.group(1)})
            return
        if resumed := _RESUMED.match(rest):
            name = resumed.group(1)
            if tid not in self._pending or self._pending[tid][0] != name:
                raise TraceError(f"line {n}: {name} resumed in task {tid}, which had no "
                                 f"unfinished {name}")
            _, head, t, _ = self._pending.pop(tid)
            self._call(tid, t, name, head + resumed.group(2), n)
            return
        call = _CALL.match(rest)
        if not call:
            raise TraceError(f"line {n}: not a system call: {rest[:80]!r}")
        name, tail = call.groups()
        if tail.endswith(UNFINISHED):
            if tid in self._pending:
                raise TraceError(f"line {n}: task {tid} starts {name} with "
                                 f"{self._pending[tid][0]} still unfinished")
            self._pending[tid] = (name, tail[:-len(UNFINISHED)], t, n)
            return
        self._call(tid, t, name, tail, n)

    def _call(self, tid: int, t: float, name: str, tail: str, n: int) -> None:
        args, after = _split_args(tail, n)
        r = _RET.match(after)
        if not r:
            raise TraceError(f"line {n}: {name}: cannot read the result {after.strip()!r}")
        self.syscalls[name] += 1
        if name not in HANDLED:
            self.unknown[name] += 1
            return
        value, errno = r.group(1), r.group(2)
        e: dict = {"tid": tid, "t": t}
        if name not in ("exit", "exit_group"):
            if value == "?" or errno:
                e["err"] = errno or "unknown"
            else:
                e["ret"] = _int(value, n, f"{name} result")

        def need(k: int) -> None:
            if len(args) < k:
                raise TraceError(f"line {n}: {name} with {len(args)} arguments, expected {k}")

        if name == "mmap":
            need(6)
            e.update(op="mmap", addr=_int(args[0], n, "mmap addr"), len=_int(args[1], n, "len"),
                     prot=args[2], flags=args[3], fd=_int(args[4], n, "fd"))
        elif name == "munmap":
            need(2)
            e.update(op="munmap", addr=_int(args[0], n, "addr"), len=_int(args[1], n, "len"))
        elif name == "mprotect":
            need(3)
            e.update(op="mprotect", addr=_int(args[0], n, "addr"), len=_int(args[1], n, "len"),
                     prot=args[2])
        elif name == "madvise":
            need(3)
            e.update(op="madvise", addr=_int(args[0], n, "addr"), len=_int(args[1], n, "len"),
                     advice=args[2])
        elif name == "brk":
            need(1)
            e.update(op="brk", addr=_int(args[0], n, "brk addr"))
        elif name == "mremap":
            need(4)
            e.update(op="mremap", addr=_int(args[0], n, "addr"),
                     old_len=_int(args[1], n, "old_len"), new_len=_int(args[2], n, "new_len"),
                     flags=args[3])
            if len(args) > 4:
                e["new_addr"] = _int(args[4], n, "new_addr")
        elif name in ("clone", "clone3", "fork", "vfork"):
            flags = _field(args, "flags") if name in ("clone", "clone3") else None
            if name in ("clone", "clone3") and flags is None:
                raise TraceError(f"line {n}: {name} without flags=")
            e.update(op="clone", call=name, flags=flags or "")
        elif name in ("execve", "execveat"):
            path = args[1 if name == "execveat" else 0] if args else ""
            e.update(op="execve", call=name, path=path.strip('"'))
        else:
            e.update(op="exit", call=name)
        self._emit(e)
        if e["op"] == "clone" and "ret" in e:
            child = e["ret"]
            self._known.add(child)
            # The child may have run (and been printed) before its parent's clone returned.
            for held in self._held.pop(child, []):
                self.events.append(held)

    def _emit(self, e: dict) -> None:
        if e["tid"] in self._known:
            self.events.append(e)
        else:
            self._held[e["tid"]].append(e)


def parse_strace(lines: Iterable[str]) -> StraceParser:
    p = StraceParser().feed(lines)
    p.finish()
    return p
