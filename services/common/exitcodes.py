"""What a `tlbsim` exit code means: one meaning per code (README "Exit codes").

Pure: the CLI maps what went wrong to a code here, by the error's status code (by name)
and its machine-readable reason (services/common/errors.py), never by its wording."""
from __future__ import annotations

from services.common.errors import (REASON_CPU_LEFT, REASON_MACHINE_LOST, REASON_RUN_RESET,
                                    Code)

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
# Reasons that mean the run lost what it ran on: the simulated machine (a memory restart,
# or another run's reset), or a CPU it could not do without.
LOST_REASONS = {REASON_MACHINE_LOST, REASON_RUN_RESET, REASON_CPU_LEFT}
# Local errors that mean the command itself was wrong: nothing ran.
USAGE_CODES = {Code.INVALID_ARGUMENT.value, Code.NOT_FOUND.value, Code.OUT_OF_RANGE.value}


def for_status(status: str, reason: str = "") -> int:
    """The exit code of a call the cluster failed with gRPC status `status` (its name)
    and the reason the service attached."""
    if status in UNREACHABLE_STATUSES or reason in LOST_REASONS:
        return NO_CLUSTER
    return REFUSED


def for_error(code: str, reason: str = "") -> int:
    """The exit code of a tlbsim error raised here (a SimError: its code's name, its
    reason): a bad option is usage; what the cluster said, as `for_status`."""
    if code in USAGE_CODES and reason not in LOST_REASONS:
        return USAGE
    return for_status(code, reason)
