"""The per-run policy (DESIGN.md §3-§5) as a plain value, with its proto mapping.

Names are the CLI's spellings (`--lock split`, `--flush gather`); the proto
carries enums. Validation lives here so every service rejects the same things."""
from __future__ import annotations

import dataclasses

from services.common.errors import InvalidArgument
from tlbsim.v1 import common_pb2 as pb

LOCKS = {"mm": pb.LOCK_MODE_MM, "split": pb.LOCK_MODE_SPLIT}
FLUSHES = {"per-page": pb.FLUSH_MODE_PER_PAGE, "gather": pb.FLUSH_MODE_GATHER}
TRANSPORTS = {"grpc": pb.TRANSPORT_GRPC, "stream": pb.TRANSPORT_STREAM}
UNSAFE = {"none": pb.UNSAFE_NONE, "free-before-flush": pb.UNSAFE_FREE_BEFORE_FLUSH}

# Linux's own defaults: tlb_single_page_flush_ceiling, MAX_GATHER_BATCH; a TLB
# shaped like a recent x86 second-level TLB (1536 entries, 12 ways).
DEFAULT_CEILING = 33
DEFAULT_BATCH = 510
DEFAULT_TLB_ENTRIES = 1536
DEFAULT_TLB_WAYS = 12
DEFAULT_DEADLINE_S = 1.0
MAX_TLB_ENTRIES = 1 << 20


def _name(table: dict[str, int], value: int, what: str) -> str:
    for name, v in table.items():
        if v == value:
            return name
    raise InvalidArgument(f"{what} is unspecified or unknown ({value})")


@dataclasses.dataclass(frozen=True)
class Policy:
    lock: str = "split"
    flush: str = "gather"
    ceiling: int = DEFAULT_CEILING
    batch: int = DEFAULT_BATCH
    lazy_tlb: bool = True
    transport: str = "grpc"
    tlb_entries: int = DEFAULT_TLB_ENTRIES
    tlb_ways: int = DEFAULT_TLB_WAYS
    unsafe: str = "none"
    deadline_s: float = DEFAULT_DEADLINE_S

    def __post_init__(self) -> None:
        for value, table, what in ((self.lock, LOCKS, "lock"), (self.flush, FLUSHES, "flush"),
                                   (self.transport, TRANSPORTS, "transport"),
                                   (self.unsafe, UNSAFE, "unsafe")):
            if value not in table:
                raise InvalidArgument(f"unknown {what} {value!r}: choose from {', '.join(table)}")
        if self.batch < 1:
            raise InvalidArgument(f"batch {self.batch}: must be at least 1 page")
        if self.ceiling < 0:
            raise InvalidArgument(f"ceiling {self.ceiling}: must not be negative")
        if not 1 <= self.tlb_ways <= self.tlb_entries <= MAX_TLB_ENTRIES:
            raise InvalidArgument(
                f"TLB of {self.tlb_entries} entries and {self.tlb_ways} ways: need "
                f"1 <= ways <= entries <= {MAX_TLB_ENTRIES}")
        if self.tlb_entries % self.tlb_ways:
            raise InvalidArgument(
                f"TLB of {self.tlb_entries} entries is not a multiple of {self.tlb_ways} ways")
        if not 0 < self.deadline_s <= 600:
            raise InvalidArgument(f"deadline {self.deadline_s}s: must be in (0, 600]")

    def to_proto(self) -> pb.Policy:
        return pb.Policy(lock=LOCKS[self.lock], flush=FLUSHES[self.flush], ceiling=self.ceiling,
                         batch=self.batch, lazy_tlb=self.lazy_tlb,
                         transport=TRANSPORTS[self.transport], tlb_entries=self.tlb_entries,
                         tlb_ways=self.tlb_ways, unsafe=UNSAFE[self.unsafe],
                         deadline_s=self.deadline_s)

    @classmethod
    def from_proto(cls, p: pb.Policy) -> "Policy":
        return cls(lock=_name(LOCKS, p.lock, "lock"), flush=_name(FLUSHES, p.flush, "flush"),
                   ceiling=p.ceiling, batch=p.batch, lazy_tlb=p.lazy_tlb,
                   transport=_name(TRANSPORTS, p.transport, "transport"),
                   tlb_entries=p.tlb_entries, tlb_ways=p.tlb_ways,
                   unsafe=_name(UNSAFE, p.unsafe, "unsafe"), deadline_s=p.deadline_s)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
