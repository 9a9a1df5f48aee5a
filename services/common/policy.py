"""The per-run policy (DESIGN.md §3-§5) as a plain value, with its proto mapping.

Names are the CLI's spellings (`--lock split`, `--flush gather`); the proto
carries enums. Validation lives here so every service rejects the same things."""
from __future__ import annotations

import dataclasses

from services.common.costmodel import DEFAULT_PRESET, CostModel, preset
from services.common.errors import InvalidArgument
from tlbsim.v1 import common_pb2 as pb

LOCKS = {"mm": pb.LOCK_MODE_MM, "split": pb.LOCK_MODE_SPLIT,
         "lock-all-sharers": pb.LOCK_MODE_LOCK_ALL_SHARERS,
         "lock-all-sharers-unordered": pb.LOCK_MODE_LOCK_ALL_SHARERS_UNORDERED}
FORKS = {"copy": pb.FORK_MODE_COPY, "share": pb.FORK_MODE_SHARE}
SHARED_FLUSHES = {"all-cpus": pb.SHARED_FLUSH_ALL_CPUS,
                  "sharer-union": pb.SHARED_FLUSH_SHARER_UNION,
                  "unsafe-mm-only": pb.SHARED_FLUSH_UNSAFE_MM_ONLY}
FLUSHES = {"per-page": pb.FLUSH_MODE_PER_PAGE, "gather": pb.FLUSH_MODE_GATHER}
TRANSPORTS = {"grpc": pb.TRANSPORT_GRPC, "stream": pb.TRANSPORT_STREAM,
              "mqtt": pb.TRANSPORT_MQTT}
UNSAFE = {"none": pb.UNSAFE_NONE, "free-before-flush": pb.UNSAFE_FREE_BEFORE_FLUSH}
SPLIT_LOCKS = ("split", "lock-all-sharers", "lock-all-sharers-unordered")  # PTE tables: own ptl

# Linux's own defaults: tlb_single_page_flush_ceiling, MAX_GATHER_BATCH; a TLB
# shaped like a recent x86 second-level TLB (1536 entries, 12 ways).
DEFAULT_CEILING = 33
DEFAULT_BATCH = 510
DEFAULT_TLB_ENTRIES = 1536
DEFAULT_TLB_WAYS = 12
DEFAULT_DEADLINE_S = 1.0
# QoS 0: acks are end-to-end and a missing one is followed by a gRPC Flush, so QoS 1
# buys nothing but a PUBACK per hop; measured ~25% slower (README, MQTT section).
DEFAULT_MQTT_QOS = 0
MQTT_QOS = (0, 1)
MAX_TLB_ENTRIES = 1 << 20
MAX_FRAMES = 1 << 28  # 1 TiB of simulated memory
# Reclaim starts below 16 free frames, which it keeps for page tables (they never wait
# for reclaim), and frees up to 32: a smaller machine would reclaim at every fault.
MIN_FRAMES = 64
MAX_UINT32 = (1 << 32) - 1  # ceiling and batch travel as uint32 (common.proto Policy)
DEFAULT_RECLAIM_BATCH = 32  # SWAP_CLUSTER_MAX (include/linux/swap.h)
DEFAULT_ASIDS = 6  # TLB_NR_DYN_ASIDS (arch/x86/include/asm/tlbflush.h)
TIMINGS = {"wall": pb.TIMING_WALL, "virtual": pb.TIMING_VIRTUAL}
MAX_ASIDS = 4094   # MAX_ASID_AVAILABLE: 12 PCID bits, less two


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
    mqtt_qos: int = DEFAULT_MQTT_QOS
    fork: str = "copy"
    shared_flush: str = "all-cpus"
    frames: int = 0  # 0: the memory service's default
    # Pages reclaim unmaps per flush (shrink_folio_list: SWAP_CLUSTER_MAX); 0: everything it
    # frees between the watermarks in one flush (tlbsim before it followed Linux).
    reclaim_batch: int = DEFAULT_RECLAIM_BATCH
    # ASIDs (PCIDs) each CPU keeps, so switching back to an mm keeps its entries; 0: no
    # PCID, every switch to another mm flushes the TLB.
    asids: int = DEFAULT_ASIDS
    # Read faults map the shared zero page read-only; the first write copies it (a COW
    # with a one-page flush to the mm's other CPUs). Off: a read allocates a page.
    zero_page: bool = True
    # Shootdowns of an mm active on 4+ CPUs as hardware broadcasts (INVLPGB, global ASID).
    hw_broadcast: bool = False
    # "wall" or "virtual" (--timing): services/common/vtime.py.
    timing: str = "wall"
    # What each event costs on hardware (modelled time, services/common/costmodel.py).
    cost_model: CostModel = dataclasses.field(default_factory=lambda: preset(DEFAULT_PRESET))

    def __post_init__(self) -> None:
        for value, table, what in ((self.lock, LOCKS, "lock"), (self.flush, FLUSHES, "flush"),
                                   (self.transport, TRANSPORTS, "transport"),
                                   (self.unsafe, UNSAFE, "unsafe"), (self.fork, FORKS, "fork"),
                                   (self.shared_flush, SHARED_FLUSHES, "shared-flush")):
            if value not in table:
                raise InvalidArgument(f"unknown {what} {value!r}: choose from {', '.join(table)}")
        if self.frames and not MIN_FRAMES <= self.frames <= MAX_FRAMES:
            raise InvalidArgument(
                f"frames {self.frames}: must be between {MIN_FRAMES} and {MAX_FRAMES} (0 = the "
                f"service's default); below {MIN_FRAMES}, reclaim's watermarks and the page "
                "tables leave no memory to run in")
        if not 1 <= self.batch <= MAX_UINT32:
            raise InvalidArgument(f"batch {self.batch}: must be 1..{MAX_UINT32} pages")
        if not 0 <= self.ceiling <= MAX_UINT32:
            raise InvalidArgument(f"ceiling {self.ceiling}: must be 0..{MAX_UINT32} pages")
        if self.timing not in TIMINGS:
            raise InvalidArgument(f"unknown timing {self.timing!r}: choose from "
                                  f"{', '.join(TIMINGS)}")
        if not 0 <= self.asids <= MAX_ASIDS:
            raise InvalidArgument(f"asids {self.asids}: must be 0..{MAX_ASIDS} (0: no PCID)")
        if not 0 <= self.reclaim_batch <= MAX_UINT32:
            raise InvalidArgument(f"reclaim batch {self.reclaim_batch}: must be 0..{MAX_UINT32} "
                                  "pages (0: one flush for everything reclaimed)")
        if not 1 <= self.tlb_ways <= self.tlb_entries <= MAX_TLB_ENTRIES:
            raise InvalidArgument(
                f"TLB of {self.tlb_entries} entries and {self.tlb_ways} ways: need "
                f"1 <= ways <= entries <= {MAX_TLB_ENTRIES}")
        if self.tlb_entries % self.tlb_ways:
            raise InvalidArgument(
                f"TLB of {self.tlb_entries} entries is not a multiple of {self.tlb_ways} ways")
        if not 0 < self.deadline_s <= 600:
            raise InvalidArgument(f"deadline {self.deadline_s}s: must be in (0, 600]")
        if self.mqtt_qos not in MQTT_QOS:
            raise InvalidArgument(f"mqtt QoS {self.mqtt_qos}: choose 0 or 1")

    def to_proto(self) -> pb.Policy:
        return pb.Policy(lock=LOCKS[self.lock], flush=FLUSHES[self.flush], ceiling=self.ceiling,
                         batch=self.batch, lazy_tlb=self.lazy_tlb,
                         transport=TRANSPORTS[self.transport], tlb_entries=self.tlb_entries,
                         tlb_ways=self.tlb_ways, unsafe=UNSAFE[self.unsafe],
                         deadline_s=self.deadline_s, mqtt_qos=self.mqtt_qos,
                         fork=FORKS[self.fork], shared_flush=SHARED_FLUSHES[self.shared_flush],
                         frames=self.frames, cost_model=self.cost_model.to_proto(),
                         reclaim_batch=self.reclaim_batch, asids=self.asids,
                         zero_page=self.zero_page, hw_broadcast=self.hw_broadcast,
                         timing=TIMINGS[self.timing])

    @classmethod
    def from_proto(cls, p: pb.Policy) -> "Policy":
        return cls(lock=_name(LOCKS, p.lock, "lock"), flush=_name(FLUSHES, p.flush, "flush"),
                   ceiling=p.ceiling, batch=p.batch, lazy_tlb=p.lazy_tlb,
                   transport=_name(TRANSPORTS, p.transport, "transport"),
                   tlb_entries=p.tlb_entries, tlb_ways=p.tlb_ways,
                   unsafe=_name(UNSAFE, p.unsafe, "unsafe"), deadline_s=p.deadline_s,
                   mqtt_qos=p.mqtt_qos, fork=_name(FORKS, p.fork, "fork"),
                   shared_flush=_name(SHARED_FLUSHES, p.shared_flush, "shared-flush"),
                   frames=p.frames, cost_model=CostModel.from_proto(p.cost_model),
                   reclaim_batch=p.reclaim_batch if p.HasField("reclaim_batch")
                   else DEFAULT_RECLAIM_BATCH,
                   asids=p.asids if p.HasField("asids") else DEFAULT_ASIDS,
                   zero_page=p.zero_page if p.HasField("zero_page") else True,
                   hw_broadcast=p.hw_broadcast, timing=_name(TIMINGS, p.timing, "timing"))

    def as_dict(self) -> dict:
        """Flat values (build-info labels, the report's config): the model by its name."""
        d = dataclasses.asdict(self)
        d["cost_model"] = self.cost_model.name
        return d
