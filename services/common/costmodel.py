"""Modelled hardware time: what the events a run counted would cost on a real machine.

Wall-clock time measures Python and gRPC, not hardware. A cost model prices each event
the simulator counts (TLB misses and their page walks, single-page invalidations, full
flushes, IPIs, broadcast invalidations, faults, lock acquisitions) in nanoseconds; the
modelled time of a run is the sum. It is computed from counters when a report is made
or a metric is scraped, never on a hot path.

Presets ship as TOML files next to this module (`costmodels/x86.toml`: IPIs, as
Linux's `flush_tlb_multi`; `costmodels/invlpgb.toml`: AMD INVLPGB / ARM `TLBI ...IS`
broadcast invalidation); each constant's source is cited there and in the README. Any
other TOML file with the same keys is a model of its own. Every cost may be given in
nanoseconds (`KEY_ns`) or in cycles (`KEY_cycles`, converted with `clock_ghz`).

Two invalidation styles:
- IPIs (`broadcast = false`): every CPU that applies a flush pays per page
  (`invlpg`) or for a full flush (`full_flush`); the initiator pays `ipi_send` per
  target and each target `ipi_receive` (interrupt entry, the handler, the ack).
- broadcast (`broadcast = true`): the initiator issues one broadcast invalidation per
  page of a ranged shootdown (`broadcast_page`) or one for a full flush
  (`broadcast_full`), then waits once (`broadcast_sync`, TLBSYNC / DSB ISH); no
  interrupts, the other CPUs' TLBs are invalidated by the hardware at no charge.
Either way the TLB refills a flush causes are real simulated misses, charged as page
walks (`walk_levels` x `walk_level`): a full flush costs `full_flush` plus every miss
its dropped entries cause later, which is the trade-off Linux's
`tlb_single_page_flush_ceiling` balances.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from pathlib import Path
from typing import Mapping, Protocol

from services.common.errors import InvalidArgument

PRESET_DIR = Path(__file__).with_name("costmodels")
PRESETS = ("x86", "invlpgb", "altix-2005")
DEFAULT_PRESET = "x86"

# The per-event costs a model prices, in ns (a TOML file may give KEY_ns or KEY_cycles).
COSTS = ("tlb_hit", "walk_level", "fault", "invlpg", "full_flush", "ipi_send", "ipi_receive",
         "broadcast_page", "broadcast_full", "broadcast_sync", "lock",
         # Virtual time only (--timing virtual, services/common/vtime.py): what the work of
         # an operation costs where the summed model above counts events, and what a
         # contended resource costs to hand over.
         "syscall", "flush_call", "page_alloc", "page_zero", "page_copy", "pte_install",
         "pte_clear", "pte_copy", "table_alloc", "lock_handoff", "lock_handoff_waiter",
         "rwsem", "rwsem_handoff_waiter", "broadcast_contention", "ack")


@dataclasses.dataclass(frozen=True)
class CostModel:
    name: str = DEFAULT_PRESET
    clock_ghz: float = 2.0
    broadcast: bool = False
    walk_levels: int = 4
    tlb_hit_ns: float = 0.0
    walk_level_ns: float = 0.0
    fault_ns: float = 0.0
    invlpg_ns: float = 0.0
    full_flush_ns: float = 0.0
    ipi_send_ns: float = 0.0
    ipi_receive_ns: float = 0.0
    broadcast_page_ns: float = 0.0
    broadcast_full_ns: float = 0.0
    broadcast_sync_ns: float = 0.0
    lock_ns: float = 0.0
    syscall_ns: float = 0.0              # system call entry and exit
    flush_call_ns: float = 0.0           # flush_tlb_mm_range's own work, per call
    page_alloc_ns: float = 0.0           # allocating a data frame (outside the lock)
    page_zero_ns: float = 0.0            # zero-filling it (outside the lock)
    page_copy_ns: float = 0.0            # copying a page (COW)
    pte_install_ns: float = 0.0          # setting a PTE and the rmap (under the PTE lock)
    pte_clear_ns: float = 0.0            # clearing one PTE into the gather (under the lock)
    pte_copy_ns: float = 0.0             # fork copying one PTE
    table_alloc_ns: float = 0.0          # allocating and hooking a page table
    lock_handoff_ns: float = 0.0         # a contended lock's cache line to the next holder
    lock_handoff_waiter_ns: float = 0.0  # ... and more per request already queued
    rwsem_ns: float = 0.0                # mmap_lock taken for read (the counter's atomic)
    rwsem_handoff_waiter_ns: float = 0.0  # ... per CPU bouncing that line at once
    broadcast_contention_ns: float = 0.0  # the invalidation fabric, per sender queued ahead
    ack_ns: float = 0.0                   # a target's ack reaching the initiator

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgument("cost model: name must not be empty")
        if not 0 < self.clock_ghz <= 100:
            raise InvalidArgument(f"cost model {self.name}: clock_ghz {self.clock_ghz} must "
                                  "be in (0, 100]")
        if not 1 <= self.walk_levels <= 6:
            raise InvalidArgument(f"cost model {self.name}: walk_levels {self.walk_levels} "
                                  "must be 1..6")
        for cost in COSTS:
            value = getattr(self, f"{cost}_ns")
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"cost model {self.name}: {cost} must be a "
                                      f"non-negative number of ns, not {value}")

    @property
    def walk_ns(self) -> float:
        """One TLB miss: a page walk through every level."""
        return self.walk_levels * self.walk_level_ns

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- pricing ---------------------------------------------------------------------
    def breakdown(self, e: "Events") -> dict[str, float]:
        """Modelled ns of every component for these event counts."""
        if self.broadcast:
            invalidate = (e.range_shootdown_pages * self.broadcast_page_ns
                          + e.full_shootdowns * self.broadcast_full_ns
                          + e.shootdowns * self.broadcast_sync_ns)
            ipi = 0.0
        else:
            # IPIs, except the shootdowns --broadcast hw sent as INVLPGB (an mm with a
            # global ASID): those the initiator pays as broadcasts; their targets pay nothing.
            invalidate = (e.pages_invalidated * self.invlpg_ns + e.full_flushes * self.full_flush_ns
                          + e.hw_range_pages * self.broadcast_page_ns
                          + e.hw_full_shootdowns * self.broadcast_full_ns
                          + e.hw_shootdowns * self.broadcast_sync_ns)
            ipi = e.ipis * (self.ipi_send_ns + self.ipi_receive_ns)
        return {"walk": e.hits * self.tlb_hit_ns + e.misses * self.walk_ns,
                "fault": e.faults * self.fault_ns, "invalidate": invalidate, "ipi": ipi,
                "lock": e.lock_acquisitions * self.lock_ns}

    def total_ns(self, e: "Events") -> float:
        return sum(self.breakdown(e).values())


@dataclasses.dataclass
class Events:
    """What a run counted, summed over the machine (the inputs of `breakdown`)."""
    hits: int = 0                # TLB hits, every CPU
    misses: int = 0              # TLB misses (each one a page walk), every CPU
    faults: int = 0
    pages_invalidated: int = 0   # pages invalidated one by one by ranged flushes, every CPU
    full_flushes: int = 0        # full flushes applied, every CPU (incl. switch_mm catch-up)
    ipis: int = 0                # flush deliveries to target CPUs (IPIs; not hardware ones)
    shootdowns: int = 0          # flushes the kernel issued (one broadcast + sync each)
    full_shootdowns: int = 0     # of those, full flushes of the mm
    range_shootdown_pages: int = 0  # pages named by the ranged ones
    lock_acquisitions: int = 0
    # Of the shootdowns, those --broadcast hw sent as hardware broadcasts (INVLPGB), with
    # their full ones and their ranged ones' pages: broadcasts under any cost model.
    hw_shootdowns: int = 0
    hw_full_shootdowns: int = 0
    hw_range_pages: int = 0

    def __sub__(self, other: "Events") -> "Events":
        return Events(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                         for f in dataclasses.fields(self)})

    def __add__(self, other: "Events") -> "Events":
        return Events(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                         for f in dataclasses.fields(self)})


# --- which service counter is which event: the one mapping, for the metrics each service
# exports (services/common/metrics.py) and for a run's report (loadgen/modelled.py). Every
# event is counted by exactly one service, so the machine's events are the sum.
class TlbCounts(Protocol):
    """A CPU's TLB counters: services/cpu/tlb.py Counters, or the TlbCounters proto."""
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def flush_page(self) -> int: ...
    @property
    def flush_full(self) -> int: ...


def tlb_events(c: TlbCounts) -> Events:
    """A CPU: its hits and misses (page walks), pages invalidated one by one, full flushes
    (switch_mm catch-up included)."""
    return Events(hits=c.hits, misses=c.misses, pages_invalidated=c.flush_page,
                  full_flushes=c.flush_full)


def delivery_events(ipis: int) -> Events:
    """The coordinator: every flush it delivered to a target CPU as an IPI (a hardware
    broadcast's deliveries are the simulator's plumbing, not interrupts)."""
    return Events(ipis=ipis)


SPURIOUS_FAULT = "walked"  # a miss whose PTE was there when locked: a walk, not a fault


def memory_events(faults: Mapping[str, int], shootdowns: int, full_shootdowns: int,
                  range_pages: int, lock_acquisitions: int, hw_shootdowns: int = 0,
                  hw_full_shootdowns: int = 0, hw_range_pages: int = 0) -> Events:
    """The memory service: faults by kind (a spurious one is no fault), the shootdowns it
    issued, of them the full ones, the pages the ranged ones named, lock acquisitions;
    and the hardware-broadcast subset of the shootdowns, likewise."""
    return Events(faults=sum(n for kind, n in faults.items() if kind != SPURIOUS_FAULT),
                  shootdowns=shootdowns, full_shootdowns=full_shootdowns,
                  range_shootdown_pages=range_pages, lock_acquisitions=lock_acquisitions,
                  hw_shootdowns=hw_shootdowns, hw_full_shootdowns=hw_full_shootdowns,
                  hw_range_pages=hw_range_pages)


# --- loading ------------------------------------------------------------------------------
_TOP_KEYS = {"name", "clock_ghz", "broadcast", "walk_levels", "description"}


def parse(doc: dict, origin: str) -> CostModel:
    """A model from a parsed TOML document; every mistake is a one-line InvalidArgument."""
    def fail(msg: str) -> InvalidArgument:
        return InvalidArgument(f"cost model {origin}: {msg}")

    values: dict = {}
    for key, value in doc.items():
        if key in _TOP_KEYS:
            if key == "description":
                continue
            types: dict[str, type | tuple[type, ...]] = {
                "name": str, "clock_ghz": (int, float), "broadcast": bool, "walk_levels": int}
            want = types[key]
            if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
                raise fail(f"{key} has the wrong type ({type(value).__name__})")
            values[key] = float(value) if key == "clock_ghz" else value
            continue
        cost, _, unit = key.rpartition("_")
        if cost not in COSTS or unit not in ("ns", "cycles"):
            raise fail(f"unknown key {key!r} (costs are {', '.join(COSTS)}, each as KEY_ns "
                       "or KEY_cycles; also name, clock_ghz, broadcast, walk_levels)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"{key} must be a number, not {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise fail(f"{key} must be a non-negative number, not {value}")
        if f"{cost}_ns" in values:
            raise fail(f"{cost} is given twice (as ns and as cycles)")
        values[f"{cost}_ns"] = (value, unit)
    ghz = values.get("clock_ghz", CostModel.clock_ghz)
    if not 0 < ghz <= 100:
        raise fail(f"clock_ghz {ghz} must be in (0, 100]")
    for key in [k for k in values if k.endswith("_ns")]:
        value, unit = values[key]
        values[key] = float(value) / ghz if unit == "cycles" else float(value)
    values.setdefault("name", Path(origin).stem)
    try:
        model = CostModel(**values)
    except InvalidArgument as e:  # say which file, not only which model
        raise fail(str(e).split(": ", 1)[-1]) from None
    if not any(key.endswith("_ns") for key in values):  # an empty file would price all at 0
        raise fail(f"prices nothing: give at least one cost ({', '.join(COSTS)}, each as "
                   "KEY_ns or KEY_cycles); a cost left out is 0")
    return model


def load(spec: str) -> CostModel:
    """A preset's name (x86, invlpgb) or the path of a TOML file."""
    path = PRESET_DIR / f"{spec}.toml" if spec in PRESETS else Path(spec)
    if spec not in PRESETS and not path.is_file():
        raise InvalidArgument(f"cost model {spec!r}: neither a preset ({', '.join(PRESETS)}) "
                              "nor a readable file")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"cost model {spec}: not valid TOML: {e}") from None
    except OSError as e:
        raise InvalidArgument(f"cost model {spec}: {e.strerror or e}") from None
    return parse(doc, spec if spec in PRESETS else os.fspath(path))


_presets: dict[str, CostModel] = {}


def preset(name: str) -> CostModel:
    if name not in _presets:
        _presets[name] = load(name)
    return _presets[name]
