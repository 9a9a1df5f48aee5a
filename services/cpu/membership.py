"""A CPU's half of fencing: registered or not, fenced or not, and its lease. Pure: it
drives a CpuCore (services/cpu/core.py) on the core's clock (ns); the CPU service does
the calls and feeds their answers in.

The states (the core's `fenced` flag is "serves nothing from its TLB"):

    unregistered ─ fenced: nothing served before the first registration
        │ register(flushed_through) answered "ok"
        ▼
    member ─ unfenced; lease = send time of the last answer "ok" + lease
        │ heartbeat answered "ok"          → member, lease renewed from its send time
        │ heartbeat failed (timeout, down) → member: the next heartbeat; the lease decides
        │ heartbeat: "not registered"      → member until registered again (lease runs)
        │ "fenced, generation g" (a heartbeat's┐
        │   answer, or a notice on the stream) │
        │ lease ran out (lease_check, or the   ├→ fenced: the whole TLB flushed at once;
        │   core inside an Access: observe)    │   register again
        │ a flush came after its deadline      ┘
        ▼
    fenced(reason) ─ nothing served; flushed_through = g when the coordinator named g
        │ register answered "flush through g first" → flush, flushed_through = g, again
        │ register answered "ok"                    → member (the only way out)

Every answer "ok" the coordinator gives renews the lease it counts on (services/
coordinator/fencing.py); this side renews from the *send* time of the request that was
answered, never later, so the lease here ends no later than the one the coordinator
waits for. The core checks `lease_until_ns` before every run of hits and every fill, so a
lease that runs out inside a long Access stops it there; `lease_check` (the service's
timer, and DumpTlb) fences a CPU that is idle when it runs out.
"""
from __future__ import annotations

import dataclasses

from services.common.liveness import Liveness
from services.cpu.core import CpuCore

UNREGISTERED = "it has not registered with the coordinator yet"
LEASE = "lease"


@dataclasses.dataclass(frozen=True)
class FenceNotice:
    """A coordinator's word that this CPU is fenced: flush through `generation`."""
    generation: int
    reason: str = "deadline"


class Membership:
    def __init__(self, core: CpuCore, liveness: Liveness):
        self.core = core
        self.lease_ns = int(liveness.lease_s * 1e9)
        self.registered = False
        self.flushed_through = 0  # the last fence generation the whole TLB was flushed for
        self.fences: dict[str, int] = {}  # how often, by reason (metrics and logs)
        core.fence(UNREGISTERED)  # an empty TLB; nothing served until registered
        core.lease_until_ns = 0
        self._counted = True  # this fence is in `fences` (the first is not a fence)
        self.fence_epoch = 0  # +1 at every fence: work in flight across one must stop
        self.last_reason = ""

    # --- answers ------------------------------------------------------------------------
    def registered_ok(self, sent_ns: int, coordinator_lease_s: float = 0.0) -> None:
        """A registration sent at `sent_ns` was answered "ok": unfenced, the lease runs.
        A coordinator that counts on a shorter lease than ours gets its own."""
        if coordinator_lease_s > 0:
            self.lease_ns = min(self.lease_ns, int(coordinator_lease_s * 1e9))
        self.registered = True
        self.core.unfence()
        self._counted = False
        self._renew(sent_ns)

    def told_fenced(self, notice: FenceNotice) -> None:
        """Fenced by the coordinator (an answer to a heartbeat or registration): flush the
        whole TLB now; the next registration names `generation` as flushed through."""
        self._fence(notice.reason)
        self.flushed_through = notice.generation

    def heartbeat_ok(self, sent_ns: int) -> bool:
        """A heartbeat sent at `sent_ns` was answered unfenced. True: register now (the
        CPU fenced itself meanwhile: only a registration unfences it)."""
        if self.core.fenced:
            return True
        self._renew(sent_ns)
        return False

    def not_registered(self) -> None:
        """The coordinator does not know us (it restarted): register again. The lease
        keeps running meanwhile; nothing is flushed unless it runs out."""
        self.registered = False

    # --- our own rules ------------------------------------------------------------------
    def lease_check(self, now_ns: int) -> bool:
        """Fence (flush everything) if the lease has run out. True if it did now."""
        until = self.core.lease_until_ns
        if self.core.fenced or until is None or now_ns < until:
            return False
        self._fence(LEASE)
        return True

    def observe(self) -> bool:
        """Count a fence the core made by itself (a lease that ran out inside an Access,
        services/cpu/core.py). True if it is one not counted yet: register again."""
        if not self.core.fenced or self._counted:
            return False
        self._count(self.core.fence_reason)
        return True

    def late_flush(self) -> None:
        """A flush arrived after its deadline: the coordinator has fenced us already."""
        self._fence("deadline")

    # --- internals ---------------------------------------------------------------------
    def _renew(self, sent_ns: int) -> None:
        until = sent_ns + self.lease_ns
        if self.core.lease_until_ns is None or until > self.core.lease_until_ns:
            self.core.lease_until_ns = until

    def _fence(self, reason: str) -> None:
        self.observe()  # one the core made, if any, first
        if not self.core.fenced:
            self._count(reason)
        self.core.fence(reason)  # drops every entry, even when fenced already

    def _count(self, reason: str) -> None:
        self.fences[reason] = self.fences.get(reason, 0) + 1
        self._counted = True
        self.fence_epoch += 1
        self.last_reason = reason
