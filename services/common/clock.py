"""Time, injected: the domain reads no clock of its own.

A `Clock` is a callable returning nanoseconds that never go backwards. Services pass
`monotonic` (CLOCK_MONOTONIC, which every process on one host shares: the oracle
compares CPU and memory times); domain tests pass a `ManualClock` they move by hand.
"""
from __future__ import annotations

import time
from typing import Callable

Clock = Callable[[], int]

monotonic: Clock = time.monotonic_ns


class ManualClock:
    """A clock for tests: it stands still until told to move."""

    def __init__(self, start_ns: int = 0):
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, ns: int) -> int:
        if ns < 0:
            raise ValueError("a clock does not go backwards")
        self.now_ns += ns
        return self.now_ns


def seconds(ns: int) -> float:
    return ns / 1e9
