"""Replay a trace's memory-management calls and accesses on the cluster's CPUs.

How each recorded call maps onto what the simulated machine has (it has mmap, munmap,
mprotect, madvise(DONTNEED), fork and exit). Every mapping is made at the program's own
address (MAP_FIXED_NOREPLACE), so the page tables are laid out as the program's were
and its accesses go to the addresses it used; each address space keeps the program's
mapped segments, to know what a call covers:
- mmap → mmap of as many pages at the same address (file mappings are simulated as
  anonymous memory; writable when PROT_WRITE); a MAP_FIXED mapping over mapped pages
  first munmaps them, as the kernel does (counted as `implicit_munmaps`).
- munmap / mprotect / madvise(MADV_DONTNEED) → the same call on every simulated piece
  of the range; parts the simulator never saw mapped (the ELF image and the stack, mapped
  by the kernel at execve) have no effect (`no_effect`). Other madvise advice changes no
  page table and has no effect (`advice_without_effect`).
- brk → growth is an mmap of the new heap pages, shrinking a munmap of the dropped ones.
- mremap → in place: growth is an mmap of the added pages, shrinking a munmap of the tail;
  moved: a new mapping of the new size plus a munmap of the old range (the pages' contents
  are not moved: the next accesses fault them afresh).
- clone with CLONE_VM → a thread: a task of the same address space on another CPU;
  fork, vfork and clone without CLONE_VM → `fork` (a new mm, copy-on-write).
- execve → a new, empty mm for the task; the old one exits when no task uses it.
- exit / exit_group (or the task's end as strace saw it) → when the last task of an
  address space ends, `exit` of its mm.
- access batches (valgrind lackey) → accesses on the task's CPU; a page outside every
  traced mapping (the image, the stack) gets an implicit mapping of the gap around it
  within its 2 MiB block (`implicit_mappings`), so it is simulated, not dropped.
A task's consecutive steps (switching its CPU to its mm, system calls, accesses) go to
its CPU together in one Run call (wall-clock time, at full speed: nothing the replayer
needs comes back from them but a fork's child mm). One run is in flight at a time, in
the trace's order; while it runs the replayer translates the events after it, and sends
what is ready once it is answered (or another CPU's task takes over, or RUN_ACCESSES
accumulate). Paced (--speed), each event's steps go at its time; in virtual time each
step is its own call, taking its turn.
Tasks are placed on CPUs round-robin in the order they appear; a CPU shared by tasks of
different address spaces switches mm before each of their calls, and a CPU loads a
new mm after execve (`mm_switches`).
Failed calls (`err` in the trace) changed nothing in the kernel and are skipped.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import operator
import time
from itertools import repeat
from operator import and_, lshift, rshift
from typing import TYPE_CHECKING, Callable, Protocol

from loadgen.trace.fmt import Pages
from services.common.addresses import (PAGE_SHIFT, PAGE_SIZE, PTE_TABLE_PAGES, USER_VPN_END,
                                       pack_addresses)
from services.memory.mm import MMAP_MIN_VPN
from tlbsim.v1 import common_pb2, cpu_pb2

if TYPE_CHECKING:  # the scenarios import this module
    from loadgen.scenarios.base import Cpu
    from loadgen.vsched import VirtualScheduler


class Stepper(Protocol):
    """What the replayer needs of a Driver (loadgen/scenarios/base.py; `tlbsim bench`
    has one on the machine in its own process, the replay's floor)."""
    virtual: VirtualScheduler | None
    stopping: bool

    async def create_mm(self) -> int: ...

    async def run(self, cpu: Cpu, steps: list[cpu_pb2.Step]) -> list[cpu_pb2.StepResult]: ...


# Accesses per access step at most. In wall-clock time, at full speed, the accesses of
# consecutive access events of one task (lackey writes a batch per 1,024 pages or fewer)
# go in one step, up to this many: nothing happens between them in the trace.
ACCESS_BATCH = 1 << 16
# How often the replayer, translating the events that follow a run in flight, looks
# whether the CPU answered (to send what is ready): a look gives the event loop a turn.
LOOK_EVERY_S = 0.0005
# A run is sent once its access steps hold this many accesses (bounded messages; the
# CPU takes up to 2^20 in one Run).
RUN_ACCESSES = 1 << 18


def pages_of(length: int) -> int:
    return -(-length // PAGE_SIZE)


@dataclasses.dataclass
class Seg:
    start: int     # the first page (the program's, and the simulator's mapping's)
    end: int       # one past the last page
    writable: bool


_START = operator.attrgetter("start")


class PageMap:
    """The program's mapped pages, as sorted non-overlapping segments."""

    def __init__(self, segs: list[Seg] | None = None):
        self.segs: list[Seg] = segs or []
        self._starts: list[int] | None = None  # the segments' starts, for a keyless bisect
        self._mapped: set[int] = set()  # pages found inside a segment, as translated

    def copy(self) -> "PageMap":
        return PageMap([dataclasses.replace(s) for s in self.segs])

    def _changed(self) -> None:
        self._starts = None
        self._mapped.clear()

    def _index(self, page: int) -> int:
        """The index of the segment holding `page`, or -1."""
        if self._starts is None:
            self._starts = [s.start for s in self.segs]
        i = bisect.bisect_right(self._starts, page) - 1
        return i if i >= 0 and page < self.segs[i].end else -1

    def _split(self, at: int) -> None:
        i = self._index(at)
        if i >= 0 and self.segs[i].start < at:
            s = self.segs[i]
            self.segs.insert(i + 1, Seg(at, s.end, s.writable))
            s.end = at
            self._changed()

    def pieces(self, start: int, end: int) -> list[Seg]:
        """The segments inside [start, end), split at its edges."""
        self._split(start)
        self._split(end)
        return [s for s in self.segs if start <= s.start and s.end <= end]

    def remove(self, start: int, end: int) -> list[Seg]:
        gone = self.pieces(start, end)
        self.segs = [s for s in self.segs if not (start <= s.start and s.end <= end)]
        self._changed()
        return gone

    def add(self, seg: Seg) -> None:
        bisect.insort(self.segs, seg, key=_START)
        self._changed()

    def lookup(self, page: int) -> Seg | None:
        i = self._index(page)
        return self.segs[i] if i >= 0 else None

    def translate(self, pages: Pages, i: int, stop: int, addresses: list[int],
                  writes: bytearray) -> int:
        """Append the byte address and the write flag of each of pages[i:stop] up to the
        first page outside every segment; return its index (`stop` if there is none).
        The replay's inner loop, so in C-level passes: a program's accesses revisit few
        pages, each looked up once until the segments change."""
        chunk = pages.packed[i:stop]
        numbers = list(map(rshift, chunk, repeat(1)))
        mapped = self._mapped
        unseen = set(numbers) - mapped
        outside = {page for page in unseen if self._index(page) < 0}
        mapped |= unseen - outside
        if outside:
            cut = next(k for k, page in enumerate(numbers) if page in outside)
            numbers, chunk = numbers[:cut], chunk[:cut]
        addresses.extend(map(lshift, numbers, repeat(PAGE_SHIFT)))
        writes.extend(map(and_, chunk, repeat(1)))
        return i + len(numbers)

    def gap(self, page: int) -> tuple[int, int]:
        """The unmapped pages around `page` within its 2 MiB block (and user space)."""
        if not MMAP_MIN_VPN <= page < USER_VPN_END:
            raise ValueError(f"an access to page {page:#x}, outside the simulated user "
                             f"space (pages {MMAP_MIN_VPN:#x} to {USER_VPN_END:#x})")
        block = page - page % PTE_TABLE_PAGES
        lo, hi = max(MMAP_MIN_VPN, block), block + PTE_TABLE_PAGES
        for s in self.segs:
            if s.end <= page:
                lo = max(lo, s.end)
            elif s.start > page:
                hi = min(hi, s.start)
                break
        return lo, hi


@dataclasses.dataclass
class Space:
    """One address space (an mm) of the program."""
    id: int
    pages: PageMap = dataclasses.field(default_factory=PageMap)
    mm: int = 0                     # the simulator's mm, created on first use
    users: set[int] = dataclasses.field(default_factory=set)
    brk: int | None = None          # the program's current heap end, in pages
    exited: bool = False
    cpus: set[int] = dataclasses.field(default_factory=set)  # CPUs that touched its pages


@dataclasses.dataclass
class Task:
    tid: int
    group: int
    space: Space
    cpu: Cpu
    ended: bool = False


class Replayer:
    def __init__(self, d: Stepper, cpus: list[Cpu], header: dict, events: list[dict],
                 speed: float = 0.0, on_progress: Callable[[float], None] | None = None):
        self.d, self.cpus, self.header, self.events, self.speed = d, cpus, header, events, speed
        self.on_progress = on_progress  # the share of the events replayed, every percent
        self.tasks: dict[int, Task] = {}
        self.loaded: dict[int, int] = {}       # cpu id → mm it runs
        self._next_cpu = 0
        self._spaces = 0
        self.spaces: list[Space] = []
        Counts = collections.Counter[str]
        self.calls: Counts = collections.Counter()     # by strace's name, as read from the trace
        self.replayed: Counts = collections.Counter()
        self.failed: Counts = collections.Counter()    # failed in the trace: skipped
        self.no_effect: Counts = collections.Counter()
        self.advice: Counts = collections.Counter()    # madvise advice without a simulated effect
        self.counters: Counts = collections.Counter()  # implicit_munmaps, implicit_mappings, ...
        # In virtual time each recorded batch keeps its own turns of the scheduler; paced
        # (--speed), its own time.
        self.merge = speed <= 0 and d.virtual is None
        self._held: tuple[Task, list[int], bytearray] | None = None  # accesses not yet a step
        self._run: tuple[Cpu, list[cpu_pb2.Step]] | None = None  # steps not yet sent
        self._run_accesses = 0
        self._inflight: asyncio.Future[list[cpu_pb2.StepResult]] | None = None
        self._answered: list[cpu_pb2.StepResult] = []  # the last run answered, its results

    # --- tasks, CPUs and mms ---------------------------------------------------------------
    def _space(self) -> Space:
        self._spaces += 1
        self.spaces.append(Space(self._spaces))
        return self.spaces[-1]

    def _place(self) -> Cpu:
        cpu = self.cpus[self._next_cpu % len(self.cpus)]
        self._next_cpu += 1
        return cpu

    def _task(self, tid: int) -> Task:
        if tid not in self.tasks:
            if self.tasks:
                raise ValueError(f"task {tid} appears without a clone that created it")
            space = self._space()  # the traced command itself
            self.tasks[tid] = Task(tid, tid, space, self._place())
            space.users.add(tid)
        return self.tasks[tid]

    async def _run_on(self, task: Task) -> Cpu:
        """Make the task's CPU run the task's mm (creating the mm on first use)."""
        space = task.space
        if not space.mm:
            space.mm = await self.d.create_mm()
            self.counters["mms_created"] += 1
        if self.loaded.get(task.cpu.id) != space.mm:
            if task.cpu.id in self.loaded:
                self.counters["mm_switches"] += 1
            await self._step(task.cpu, cpu_pb2.Step(
                switch_mm=cpu_pb2.SwitchMmRequest(mm=space.mm)))
            self.loaded[task.cpu.id] = space.mm
        return task.cpu

    async def _sys(self, task: Task, answer: bool = False,
                   **call) -> common_pb2.SyscallResponse | None:
        """A system call of the task; with `answer`, sent now and its result returned."""
        cpu = await self._run_on(task)
        await self._step(cpu, cpu_pb2.Step(syscall=common_pb2.SyscallRequest(**call)))
        if "exit" in call:
            self.loaded[cpu.id] = 0
        if not answer:
            return None
        await self._send(wait=True)
        return self._answered[-1].syscall  # the call was the last step of the last run

    # --- runs ----------------------------------------------------------------------------
    async def _step(self, cpu: Cpu, step: cpu_pb2.Step) -> None:
        """The next step, on `cpu`: the steps before it on another CPU go first."""
        if self._run is not None and self._run[0] is not cpu:
            await self._send()
        if self._run is None:
            self._run = (cpu, [])
        self._run[1].append(step)
        if step.HasField("access"):
            self._run_accesses += len(step.access.packed_addresses) // 8
            if self._run_accesses >= RUN_ACCESSES:
                await self._send()

    async def _send(self, wait: bool = False) -> None:
        """The steps not yet sent, as one run on their CPU once the run in flight is
        answered (runs keep the trace's order); meanwhile the replayer goes on with the
        events that follow. `wait`: until this one is answered too (`_answered`)."""
        await self._landed()
        run, self._run, self._run_accesses = self._run, None, 0
        if run is not None:
            self._inflight = asyncio.ensure_future(self.d.run(*run))
            await asyncio.sleep(0)  # it starts: its request goes out
        if wait:
            await self._landed()

    async def _landed(self) -> None:
        """Until the run in flight is answered (raising what it raised)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self._answered = await inflight

    async def _map(self, task: Task, start: int, pages: int, writable: bool,
                   implicit: bool = False) -> None:
        if not (MMAP_MIN_VPN <= start and start + pages <= USER_VPN_END):
            raise ValueError(f"a mapping of pages {start:#x}-{start + pages:#x}, outside the "
                             f"simulated user space (pages {MMAP_MIN_VPN:#x} to "
                             f"{USER_VPN_END:#x})")
        for seg in task.space.pages.remove(start, start + pages):  # MAP_FIXED over a mapping
            await self._munmap_seg(task, seg)
            self.counters["implicit_munmaps"] += 1
        await self._sys(task, mmap=common_pb2.MmapArgs(pages=pages, writable=writable,
                                                       address=start << PAGE_SHIFT))
        task.space.pages.add(Seg(start, start + pages, writable))
        if implicit:
            self.counters["implicit_mappings"] += 1

    async def _munmap_seg(self, task: Task, seg: Seg) -> None:
        await self._sys(task, munmap=common_pb2.RangeArgs(address=seg.start << PAGE_SHIFT,
                                                          pages=seg.end - seg.start))

    async def _unmap(self, task: Task, start: int, end: int) -> int:
        gone = task.space.pages.remove(start, end)
        for seg in gone:
            await self._munmap_seg(task, seg)
        return len(gone)

    async def _end(self, task: Task) -> None:
        if task.ended:
            return
        task.ended = True
        space = task.space
        space.users.discard(task.tid)
        if not space.users and space.mm and not space.exited:
            await self._sys(task, exit=common_pb2.ExitArgs())
            space.exited = True

    # --- events ------------------------------------------------------------------------------
    async def replay(self) -> None:
        try:
            await self._replay()
        finally:  # an event failed: the run in flight still lands before that is told
            if self._inflight is not None:
                with contextlib.suppress(Exception):
                    await self._landed()

    async def _replay(self) -> None:
        t0 = look_at = time.perf_counter()
        n = len(self.events)
        step = max(1, n // 100)
        for k, e in enumerate(self.events):
            if self.d.stopping:  # Ctrl-C: the report covers the events replayed so far
                break
            if self.speed > 0 and "t" in e:
                delay = t0 + e["t"] / self.speed - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            try:
                await self.event(e)
            except ValueError as error:  # the header is line 1
                raise ValueError(f"line {k + 2}: {error}") from None
            if not self.merge:
                await self._send(wait=True)  # paced, or virtual: the event's steps go now
            elif time.perf_counter() >= look_at:  # is the run in flight answered?
                await asyncio.sleep(0)  # (only the event loop can tell)
                look_at = time.perf_counter() + LOOK_EVERY_S
                if self._inflight is None or self._inflight.done():
                    await self._step_held()  # the CPU is free: what is ready goes
                    await self._send()
            if self.on_progress is not None and k % step == step - 1 and k + 1 < n:
                self.on_progress((k + 1) / n)
        await self._step_held()
        await self._send(wait=True)

    async def event(self, e: dict) -> None:
        task = self._task(e["tid"])
        op = e["op"]
        if self._held is not None and (op != "access" or self._held[0] is not task):
            await self._step_held()
        if op == "access":
            await self._access(task, e["pages"])
            return
        if op == "end":
            await self._end(task)
            return
        name = e.get("call", op)
        self.calls[name] += 1
        if "err" in e:
            self.failed[name] += 1
            return
        effect = await getattr(self, "_" + op)(task, e)
        if effect is False:
            self.no_effect[name] += 1
        else:
            self.replayed[name] += 1

    async def _mmap(self, task: Task, e: dict) -> bool:
        await self._map(task, e["ret"] >> PAGE_SHIFT, max(1, pages_of(e["len"])),
                        "PROT_WRITE" in e["prot"])
        return True

    async def _munmap(self, task: Task, e: dict) -> bool:
        start = e["addr"] >> PAGE_SHIFT
        return await self._unmap(task, start, start + pages_of(e["len"])) > 0

    async def _mprotect(self, task: Task, e: dict) -> bool:
        start = e["addr"] >> PAGE_SHIFT
        writable = "PROT_WRITE" in e["prot"]
        pieces = task.space.pages.pieces(start, start + pages_of(e["len"]))
        for seg in pieces:
            await self._sys(task, mprotect=common_pb2.MprotectArgs(
                address=seg.start << PAGE_SHIFT, pages=seg.end - seg.start, writable=writable))
            seg.writable = writable
        return bool(pieces)

    async def _madvise(self, task: Task, e: dict) -> bool:
        if e["advice"] != "MADV_DONTNEED":
            self.advice[e["advice"]] += 1
            return False
        start = e["addr"] >> PAGE_SHIFT
        pieces = task.space.pages.pieces(start, start + pages_of(e["len"]))
        for seg in pieces:
            await self._sys(task, madvise_dontneed=common_pb2.RangeArgs(
                address=seg.start << PAGE_SHIFT, pages=seg.end - seg.start))
        return bool(pieces)

    async def _brk(self, task: Task, e: dict) -> bool:
        space = task.space
        top = pages_of(e["ret"])
        if space.brk is None or top == space.brk:  # a query, or a failed change
            space.brk = top
            return False
        old, space.brk = space.brk, top
        if top > old:
            await self._map(task, old, top - old, True)
        else:
            await self._unmap(task, top, old)
        return True

    async def _mremap(self, task: Task, e: dict) -> bool:
        old_start = e["addr"] >> PAGE_SHIFT
        old_end = old_start + pages_of(e["old_len"])
        new_start = e["ret"] >> PAGE_SHIFT
        new_end = new_start + pages_of(e["new_len"])
        seg = task.space.pages.lookup(old_start)
        writable = seg.writable if seg else True
        if new_start == old_start:
            if new_end > old_end:
                await self._map(task, old_end, new_end - old_end, writable)
            elif new_end < old_end:
                await self._unmap(task, new_end, old_end)
            return True
        await self._map(task, new_start, new_end - new_start, writable)
        await self._unmap(task, old_start, old_end)
        return True

    async def _clone(self, task: Task, e: dict) -> bool:
        child = e["ret"]
        flags = e["flags"].split("|")
        if e["call"] in ("clone", "clone3") and "CLONE_VM" in flags:
            space = task.space  # a thread (or a vfork-style child sharing the mm)
            group = task.group if "CLONE_THREAD" in flags else child
        else:
            r = await self._sys(task, answer=True, fork=common_pb2.ForkArgs())
            assert r is not None
            space = self._space()
            space.mm = r.child_mm
            space.pages = task.space.pages.copy()
            space.brk = task.space.brk
            group = child
        space.users.add(child)
        self.tasks[child] = Task(child, group, space, self._place())
        return True

    async def _execve(self, task: Task, e: dict) -> bool:
        old = task.space
        old.users.discard(task.tid)
        if not old.users and old.mm and not old.exited:
            await self._sys(task, exit=common_pb2.ExitArgs())
            old.exited = True
        task.space = self._space()
        task.space.users.add(task.tid)
        return True

    async def _exit(self, task: Task, e: dict) -> bool:
        if e["call"] == "exit_group":
            for other in list(self.tasks.values()):
                if other.group == task.group and other is not task and not other.ended:
                    await self._end(other)
        await self._end(task)
        return True

    async def _access(self, task: Task, pages: Pages) -> None:
        """The event's accesses, added to those held for the task (a step now unless
        consecutive events may be merged)."""
        if task.ended:
            raise ValueError(f"task {task.tid} accesses memory after it ended")
        space = task.space
        _, addresses, writes = self._held = self._held or (task, [], bytearray())
        i, n = 0, len(pages)
        while i < n:
            stop = min(n, i + ACCESS_BATCH - len(addresses))
            i = space.pages.translate(pages, i, stop, addresses, writes)
            if i < stop:  # outside every mapping
                lo, hi = space.pages.gap(pages.packed[i] >> 1)
                await self._step_held()
                await self._map(task, lo, hi - lo, True, implicit=True)
                assert space.pages.lookup(lo), "the gap was just mapped"
                self.counters["accesses_outside_mappings"] += 1
                _, addresses, writes = self._held = (task, [], bytearray())
            elif len(addresses) >= ACCESS_BATCH:
                await self._step_held()
                _, addresses, writes = self._held = (task, [], bytearray())
        self.counters["access_pages"] += n
        if not self.merge:
            await self._step_held()

    async def _step_held(self) -> None:
        """The accesses held, as one step on their task's CPU."""
        held, self._held = self._held, None
        if held is not None and held[1]:
            task, addresses, writes = held
            cpu = await self._run_on(task)
            await self._step(cpu, cpu_pb2.Step(access=cpu_pb2.AccessRequest(
                packed_addresses=pack_addresses(addresses), writes=bytes(writes))))
            self.counters["access_batches"] += 1
            task.space.cpus.add(cpu.id)

    def summary(self) -> dict:
        return {
            "source": self.header.get("source"),
            "command": self.header.get("command"),
            "strace_syscalls": dict(sorted(self.header.get(
                "strace_syscalls", self.header.get("syscalls", {})).items())),
            "calls": dict(sorted(self.calls.items())),
            "replayed": dict(sorted(self.replayed.items())),
            "failed_in_trace": dict(sorted(self.failed.items())),
            "no_effect": dict(sorted(self.no_effect.items())),
            "advice_without_effect": dict(sorted(self.advice.items())),
            "unknown_syscalls": dict(sorted(self.header.get("unknown_syscalls", {}).items())),
            "tasks": len(self.tasks),
            "address_spaces": self._spaces,
            # Only these can send an IPI: a shootdown targets the other CPUs of the mm.
            "address_spaces_on_several_cpus": sum(len(s.cpus) > 1 for s in self.spaces),
            "tasks_alive_at_end": sum(not t.ended for t in self.tasks.values()),
            **{k: self.counters[k] for k in (
                "mms_created", "mm_switches", "implicit_munmaps", "implicit_mappings",
                "accesses_outside_mappings", "access_pages", "access_batches")},
        }
