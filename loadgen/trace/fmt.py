"""Write and read trace files (the format is in the package docstring)."""
from __future__ import annotations

import contextlib
import gc
import gzip
import json
import os
from array import array
from itertools import chain, repeat
from operator import lshift, or_
from typing import Iterable, Iterator

from services.common.errors import InvalidArgument

FORMAT = "tlbsim-trace"
VERSION = 1
SOURCES = ("strace", "valgrind-lackey")

# op → fields every event of that op must carry (besides `op` and `tid`), and their types.
INT = int
REQUIRED: dict[str, dict[str, type]] = {
    "mmap": {"addr": INT, "len": INT, "prot": str, "flags": str, "fd": INT},
    "munmap": {"addr": INT, "len": INT},
    "mprotect": {"addr": INT, "len": INT, "prot": str},
    "madvise": {"addr": INT, "len": INT, "advice": str},
    "brk": {"addr": INT},
    "mremap": {"addr": INT, "old_len": INT, "new_len": INT, "flags": str},
    "clone": {"call": str, "flags": str},
    "execve": {"call": str, "path": str},
    "exit": {"call": str},
    "end": {"status": str},
    "access": {"pages": list},
}
RESULT_OPS = {"mmap", "munmap", "mprotect", "madvise", "brk", "mremap", "clone", "execve"}
PAGE_LIMIT = 1 << 52  # no page of a 64-bit address is this large


class TraceError(InvalidArgument):
    """A malformed trace or strace/valgrind log; the message names the line."""


class Pages:
    """The pages of an access event as a recorder holds them: 8 bytes each (page << 1 |
    written) instead of a Python list per page, so millions of them fit in memory. Reads
    and compares as the file's `[[page, 1 if written else 0], ...]`."""
    __slots__ = ("_packed",)

    def __init__(self, packed: array | None = None) -> None:
        self._packed = array("Q") if packed is None else packed

    @property
    def packed(self) -> array:
        """page << 1 | written, one per access."""
        return self._packed

    def add(self, page: int, written: bool) -> None:
        """Another access; one to the same page as the last is collapsed into it."""
        if self._packed and self._packed[-1] >> 1 == page:
            self._packed[-1] |= written
        else:
            self._packed.append(page << 1 | written)

    def __len__(self) -> int:
        return len(self._packed)

    def __iter__(self) -> Iterator[list[int]]:
        return ([v >> 1, v & 1] for v in self._packed)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, Pages)) else NotImplemented

    def __repr__(self) -> str:
        return f"Pages({list(self)!r})"


def write_trace(path: str, header: dict, events: Iterable[dict]) -> dict:
    """Write header + events; fills header["events"] / ["access_pages"]. Returns header."""
    events = list(events)
    header = {"format": FORMAT, "version": VERSION, **header,
              "events": len(events),
              "access_pages": sum(len(e["pages"]) for e in events if e["op"] == "access")}
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write(json.dumps(header, sort_keys=True) + "\n")
        for e in events:
            f.write(json.dumps(e, separators=(",", ":"), default=list) + "\n")  # Pages
    return header


def check_event(e: object, n: int) -> dict:
    if not isinstance(e, dict):
        raise TraceError(f"line {n}: an event must be a JSON object")
    op = e.get("op")
    if not isinstance(op, str) or op not in REQUIRED:
        raise TraceError(f"line {n}: unknown op {op!r} (expected one of {', '.join(REQUIRED)})")
    if not isinstance(e.get("tid"), int) or isinstance(e.get("tid"), bool):
        raise TraceError(f"line {n}: {op} event without an integer tid")
    for field, kind in REQUIRED[op].items():
        value = e.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TraceError(f"line {n}: {op} event: field {field!r} must be "
                             f"{kind.__name__}, got {value!r}")
    if op in RESULT_OPS and ("ret" in e) == ("err" in e):
        raise TraceError(f"line {n}: {op} event needs exactly one of 'ret' and 'err'")
    if "ret" in e and not isinstance(e["ret"], int):
        raise TraceError(f"line {n}: {op} event: 'ret' must be an integer")
    if op == "access":
        packed = _packed_pairs(e["pages"])
        if packed is None:
            raise TraceError(f"line {n}: {_bad_pair(e['pages'])}")
        e["pages"] = Pages(packed)  # 8 bytes an access, and nothing for the GC to visit
    return e


def _packed_pairs(pages: list) -> array | None:
    """`pages` as Pages packs them, if all are [page, 0|1] pairs of ints with 0 <= page <
    PAGE_LIMIT, else None (the caller finds the first bad one). In C-level passes, not a
    pair at a time (that took ~50 ms for the 89,130 pairs of ls-accesses.tlbt.gz): anything
    but an int (or a bool) fails the shift or the or, a negative page the unsigned array."""
    if set(map(type, pages)) - {list} or set(map(len, pages)) - {2}:
        return None
    flat = list(chain.from_iterable(pages))
    numbers, written = flat[0::2], flat[1::2]
    try:
        if set(written) - {0, 1} or (numbers and max(numbers) >= PAGE_LIMIT):
            return None
        return array("Q", map(or_, map(lshift, numbers, repeat(1)), written))
    except (TypeError, OverflowError):  # unhashable, unordered, not an int, negative
        return None


def _bad_pair(pages: list) -> str:
    for p in pages:
        if (not isinstance(p, list) or len(p) != 2 or not all(isinstance(x, int) for x in p)
                or p[0] < 0 or p[1] not in (0, 1)):
            return f"access pages must be [page, 0|1] pairs, got {p!r}"
        if p[0] >= PAGE_LIMIT:
            return f"access page {p[0]:#x} is past any 64-bit address's (< {PAGE_LIMIT:#x})"
    raise AssertionError("_packed_pairs refused pages that are all good")


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Parsing builds a small list per access (a million for `sort` of 2,000 lines): with
    the collector on, its passes over them took ~2/3 of the time. Each list is freed as
    its event is packed, by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_last_read: tuple[tuple, tuple[dict, list[dict]]] | None = None


def read_trace(path: str) -> tuple[dict, list[dict]]:
    """The header and every event, checked; TraceError names the first bad line. The last
    trace read is kept while its file is unchanged: `load replay` checks the file before
    it touches the cluster, then the run reads it (and `load compare` once per policy)."""
    global _last_read
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, st.st_ino)
        if _last_read is not None and _last_read[0] == key:
            return _last_read[1]
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: not a readable gzip-compressed trace ({e})") from None
    trace = parse_lines(lines)
    _last_read = key, trace
    return trace


def parse_lines(lines: list[str]) -> tuple[dict, list[dict]]:
    if not lines:
        raise TraceError("line 1: empty trace (no header)")
    header = _json(lines[0], 1)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TraceError(f"line 1: not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise TraceError(f"line 1: trace version {header.get('version')!r}, "
                         f"this tlbsim reads version {VERSION}")
    if header.get("source") not in SOURCES:
        raise TraceError(f"line 1: unknown source {header.get('source')!r}")
    with _no_gc():
        events = [check_event(_json(line, n), n) for n, line in enumerate(lines[1:], start=2)]
    if header.get("events") != len(events):
        raise TraceError(f"line {len(lines)}: the header announces {header.get('events')} "
                         f"events, the file has {len(events)} (truncated?)")
    return header, events


def _json(line: str, n: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"line {n}: not JSON ({e.msg} at column {e.colno})") from None
