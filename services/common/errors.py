"""Domain errors. Each carries the gRPC status code it maps to, so the domain
stays free of gRPC while the adapters translate errors in one place."""
from __future__ import annotations

import enum


class Code(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


class SimError(Exception):
    code: Code = Code.FAILED_PRECONDITION

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(SimError):
    code = Code.INVALID_ARGUMENT


class NotFound(SimError):
    code = Code.NOT_FOUND


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
