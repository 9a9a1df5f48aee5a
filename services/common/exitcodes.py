"""What a `tlbsim` exit code means: one meaning per code (README "Exit codes").

Pure: the CLI maps what went wrong to a code here; gRPC status codes arrive by name."""
from __future__ import annotations

OK = 0
UNSAFE = 1       # the oracle counted a stale access, an audit found a stale TLB entry
USAGE = 2        # a bad option or value, an unusable input or output path: nothing ran
REFUSED = 3      # the cluster refused what was asked (a gRPC status, or too few CPUs)
NO_CLUSTER = 4   # no cluster found, unreachable, not started, or lost during the run
TRACED_FAILED = 5  # trace record: the traced command failed or was cut short
INTERNAL = 70    # a bug in tlbsim (EX_SOFTWARE); --log-level DEBUG shows the traceback
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); what ran is still reported

TABLE = {
    OK: "success",
    UNSAFE: "unsafe: a stale access or a stale TLB entry (soak: any violation)",
    USAGE: "usage: a bad option, value or path; nothing ran",
    REFUSED: "refused: the cluster answered, but refused the request",
    NO_CLUSTER: "no cluster: none found, unreachable, not started, or lost mid-run",
    TRACED_FAILED: "trace record: the traced command failed or was cut short "
                   "(the trace is still written)",
    INTERNAL: "internal error: a bug in tlbsim",
    INTERRUPTED: "interrupted by Ctrl-C (the partial report is still written)",
}

# Statuses that mean the cluster (or the part of it a call needed) is not there.
UNREACHABLE_STATUSES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
# The memory service's words when a restart lost the simulated machine
# (services/common/chaos.py MACHINE_LOST), and when another run reset it.
MACHINE_LOST_WORDS = ("memory service restarted", "reset by another run")


def machine_lost(details: str) -> bool:
    return any(words in details for words in MACHINE_LOST_WORDS)


def for_status(status: str, details: str = "") -> int:
    """The exit code of a call the cluster failed with gRPC status `status` (its name)."""
    if status in UNREACHABLE_STATUSES or machine_lost(details):
        return NO_CLUSTER
    return REFUSED
