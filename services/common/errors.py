"""Domain errors. Each carries the gRPC status code it maps to, so the domain
stays free of gRPC while the adapters translate errors in one place."""
from __future__ import annotations

import enum


class Code(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


# Machine-readable reasons an error carries to the client (the adapters send them as
# trailing metadata, REASON_KEY): what to do about it must not hang on message wording.
REASON_KEY = "tlbsim-reason"
REASON_MACHINE_LOST = "machine-lost"  # memory restarted: the simulated machine is gone
REASON_RUN_RESET = "run-reset"        # another run reset the cluster: this run's state is gone
REASON_CPU_FENCED = "cpu-fenced"      # the CPU is fenced: it flushes, re-registers, runs again
REASON_CPU_LEFT = "cpu-left"          # a CPU the run could not do without left it (loadgen)


class SimError(Exception):
    code: Code = Code.FAILED_PRECONDITION

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.message = message
        self.reason = reason  # one of the reasons above, or ""


class InvalidArgument(SimError):
    code = Code.INVALID_ARGUMENT


class NotFound(SimError):
    code = Code.NOT_FOUND


class AlreadyExists(SimError):
    code = Code.ALREADY_EXISTS


class OutOfRange(SimError):
    code = Code.OUT_OF_RANGE


class FailedPrecondition(SimError):
    code = Code.FAILED_PRECONDITION


class Aborted(SimError):
    code = Code.ABORTED


class ResourceExhausted(SimError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(SimError):
    code = Code.UNAVAILABLE


def error_of(code: str, message: str, reason: str = "") -> SimError:
    """The domain error a status code name stands for (an error carried as data, e.g. one
    miss of a batch): what the adapters map back to the same code."""
    kinds = {cls.code.value: cls for cls in SimError.__subclasses__()}
    return kinds.get(code, SimError)(message, reason)
