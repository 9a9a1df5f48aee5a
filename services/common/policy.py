"""The per-run policy (DESIGN.md §3-§5) as a plain value: what it is and what it means.

The choices are enums whose values are the CLI's spellings (`--lock split`, `--flush
gather`), so a report's JSON and a metric's label show them as they are typed. The rest
of the code asks the policy questions (`pte_lock_only`, `free_before_flush`, ...)
rather than comparing spellings: those live here only. The proto mapping is in
services/common/wire.py. Validation lives here so every service rejects the same things."""
from __future__ import annotations

import dataclasses
import enum

from services.common.costmodel import DEFAULT_PRESET, CostModel, preset
from services.common.errors import InvalidArgument


class LockMode(enum.StrEnum):
    MM = "mm"                  # one page_table_lock per mm guards every table
    SPLIT = "split"            # upper levels: page_table_lock; PTE tables: their own ptl
    LOCK_ALL_SHARERS = "lock-all-sharers"  # split; a shared table: every sharer's, by id
    LOCK_ALL_SHARERS_UNORDERED = "lock-all-sharers-unordered"  # the same, deadlock-prone


class FlushMode(enum.StrEnum):
    PER_PAGE = "per-page"  # one shootdown per cleared PTE
    GATHER = "gather"      # mmu_gather: clear a batch, one shootdown, then free


class Transport(enum.StrEnum):
    GRPC = "grpc"      # one unary Flush call per target CPU
    STREAM = "stream"  # one long-lived stream per CPU
    MQTT = "mqtt"      # one broadcast, acks on an ack topic, a gRPC fallback


class Unsafe(enum.StrEnum):
    NONE = "none"
    FREE_BEFORE_FLUSH = "free-before-flush"  # deliberately wrong: frees before the flush


class ForkMode(enum.StrEnum):
    COPY = "copy"    # copy every PTE, write-protecting both sides
    SHARE = "share"  # the child's pmd entries point at the parent's PTE tables


class Timing(enum.StrEnum):
    WALL = "wall"        # measured: Python and gRPC on this machine
    VIRTUAL = "virtual"  # modelled hardware time per CPU, deterministic (vtime.py)


class SharedFlush(enum.StrEnum):
    """Who is flushed when a table that is still shared changes in place (reclaim)."""
    ALL_CPUS = "all-cpus"              # Linus 2002: "any pmd with count > 1 ... all CPU's"
    SHARER_UNION = "sharer-union"      # the OR of every sharer's mm_cpumask
    UNSAFE_MM_ONLY = "unsafe-mm-only"  # only the mm that made the change: wrong on purpose


def choices(kind: type[enum.StrEnum]) -> list[str]:
    """An enum's spellings, in order (the CLI's `choices`)."""
    return [member.value for member in kind]


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
MAX_ASIDS = 4094   # MAX_ASID_AVAILABLE: 12 PCID bits, less two


@dataclasses.dataclass(frozen=True)
class Policy:
    """A run's choices. Enum fields also take their spellings (`Policy(lock="mm")`)."""
    lock: LockMode = LockMode.SPLIT
    flush: FlushMode = FlushMode.GATHER
    ceiling: int = DEFAULT_CEILING
    batch: int = DEFAULT_BATCH
    lazy_tlb: bool = True
    transport: Transport = Transport.GRPC
    tlb_entries: int = DEFAULT_TLB_ENTRIES
    tlb_ways: int = DEFAULT_TLB_WAYS
    unsafe: Unsafe = Unsafe.NONE
    deadline_s: float = DEFAULT_DEADLINE_S
    mqtt_qos: int = DEFAULT_MQTT_QOS
    fork: ForkMode = ForkMode.COPY
    shared_flush: SharedFlush = SharedFlush.ALL_CPUS
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
    # What answers are timed in (--timing): services/common/vtime.py.
    timing: Timing = Timing.WALL
    # What each event costs on hardware (modelled time, services/common/costmodel.py).
    cost_model: CostModel = dataclasses.field(default_factory=lambda: preset(DEFAULT_PRESET))

    def __post_init__(self) -> None:
        for name, kind in ENUM_FIELDS.items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                raise InvalidArgument(f"unknown {name.replace('_', '-')} {value!r}: choose "
                                      f"from {', '.join(choices(kind))}") from None
        if self.frames and not MIN_FRAMES <= self.frames <= MAX_FRAMES:
            raise InvalidArgument(
                f"frames {self.frames}: must be between {MIN_FRAMES} and {MAX_FRAMES} (0 = the "
                f"service's default); below {MIN_FRAMES}, reclaim's watermarks and the page "
                "tables leave no memory to run in")
        if not 1 <= self.batch <= MAX_UINT32:
            raise InvalidArgument(f"batch {self.batch}: must be 1..{MAX_UINT32} pages")
        if not 0 <= self.ceiling <= MAX_UINT32:
            raise InvalidArgument(f"ceiling {self.ceiling}: must be 0..{MAX_UINT32} pages")
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
        if self.timing is Timing.VIRTUAL and self.unsafe is Unsafe.FREE_BEFORE_FLUSH:
            raise InvalidArgument(
                "--unsafe free-before-flush needs --timing wall: a virtual-time run issues "
                "one operation at a time, so the window it opens (frames freed, the flush "
                "not yet delivered) never overlaps another CPU's access")
        if self.mqtt_qos not in MQTT_QOS:
            raise InvalidArgument(f"mqtt QoS {self.mqtt_qos}: choose 0 or 1")

    # --- what the policy means (the only place its spellings are compared) --------------
    @property
    def pte_lock_only(self) -> bool:
        """A PTE table's entries are guarded by its own ptl alone (split locks), not also
        by the mm's page_table_lock; a zap then holds no lock across its flush."""
        return self.lock is not LockMode.MM

    @property
    def locks_all_sharers(self) -> bool:
        """Changing a shared table takes every sharer mm's page_table_lock, not the
        tables' sharer-list (rmap) locks."""
        return self.lock in (LockMode.LOCK_ALL_SHARERS, LockMode.LOCK_ALL_SHARERS_UNORDERED)

    @property
    def sharers_locked_in_id_order(self) -> bool:
        """lock-all-sharers takes the sharers' locks in mm-id order; the unordered mode
        this mm's first, then the sharer lists' order (which the validator refuses)."""
        return self.lock is LockMode.LOCK_ALL_SHARERS

    @property
    def per_page_flush(self) -> bool:
        """One shootdown per cleared PTE instead of a gathered batch."""
        return self.flush is FlushMode.PER_PAGE

    @property
    def shares_tables_at_fork(self) -> bool:
        """fork points the child at the parent's PTE tables instead of copying them."""
        return self.fork is ForkMode.SHARE

    @property
    def free_before_flush(self) -> bool:
        """The deliberately unsafe order: frames are freed before their shootdown."""
        return self.unsafe is Unsafe.FREE_BEFORE_FLUSH

    @property
    def shared_change_flushes_every_cpu(self) -> bool:
        """A still-shared table changed: flush every CPU that ever ran anything."""
        return self.shared_flush is SharedFlush.ALL_CPUS

    @property
    def shared_change_flushes_changer_only(self) -> bool:
        """A still-shared table changed: flush only the changing mm's CPUs (wrong)."""
        return self.shared_flush is SharedFlush.UNSAFE_MM_ONLY

    @property
    def virtual(self) -> bool:
        """Answers in virtual (modelled hardware) time, issued in virtual-time order."""
        return self.timing is Timing.VIRTUAL

    @property
    def uses_mqtt(self) -> bool:
        return self.transport is Transport.MQTT

    def as_dict(self) -> dict:
        """Flat values (build-info labels, the report's config): enums by their spelling,
        the model by its name."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ENUM_FIELDS:
            d[name] = d[name].value
        d["cost_model"] = self.cost_model.name
        return d


# The fields that are choices, and their enums (Policy coerces spellings to members).
ENUM_FIELDS: dict[str, type[enum.StrEnum]] = {
    "lock": LockMode, "flush": FlushMode, "transport": Transport, "unsafe": Unsafe,
    "fork": ForkMode, "shared_flush": SharedFlush, "timing": Timing}
