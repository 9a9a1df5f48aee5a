"""Shared pieces of the fuzz tests: how many cases, hypothesis settings, message
strategies built from the protobuf descriptors, and a cluster driven from sync code.

    TLBSIM_FUZZ_EXAMPLES=N   cases per fuzz test (default 100: `make test` stays short;
                             the long mode, N=2500, runs >= 10,000 cases in all)
"""
from __future__ import annotations

import asyncio
import os

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("TLBSIM_FUZZ_EXAMPLES", "100"))
# TLBSIM_FUZZ_SHRINK=0: report the first failing case as found (shrinking re-runs calls).
PHASES = [p for p in Phase if os.environ.get("TLBSIM_FUZZ_SHRINK", "1") != "0"
          or p not in (Phase.shrink, Phase.explain)]

# Reproducible in CI: the same cases every run, no example database on disk.
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])

PAGE = 4096
MAPPED_BASE = 0x1000_0000  # where the first mmap of a fresh mm lands (MMAP_BASE_VPN)

U64_EDGES = [0, 1, 2, PAGE - 1, PAGE, 2**31, 2**32 - 1, 2**32, 2**35, 2**36, 2**47 - PAGE,
             2**47, 2**48, 2**63 - 1, 2**63, 2**64 - 1, 0x0000_9000_0000_0000,
             0xFFFF_8000_0000_0000]
U32_EDGES = [0, 1, 2, 3, 7, 64, 512, 1023, 1024, 2**16, 2**31 - 1, 2**31, 2**32 - 1]

u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1), st.integers(0, 4096))
u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1), st.integers(0, 16))
# Addresses mostly near the mapped region, so accepted calls exercise real paths too.
address = st.one_of(
    st.builds(lambda i, off: MAPPED_BASE + i * PAGE + off, st.integers(-8, 80),
              st.sampled_from([0, 0, 0, 1, PAGE - 1])),
    st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
pages = st.one_of(st.integers(0, 80), st.sampled_from(U64_EDGES), st.sampled_from(
    [2**20, 2**30, 2**35, 2**36]))

SCALARS = {
    F.TYPE_UINT64: u64, F.TYPE_FIXED64: u64,
    F.TYPE_UINT32: u32, F.TYPE_FIXED32: u32,
    F.TYPE_INT64: st.integers(-2**63, 2**63 - 1), F.TYPE_SINT64: st.integers(-2**63, 2**63 - 1),
    F.TYPE_INT32: st.integers(-2**31, 2**31 - 1), F.TYPE_SINT32: st.integers(-2**31, 2**31 - 1),
    F.TYPE_DOUBLE: st.one_of(st.floats(), st.sampled_from([0.0, 1e-9, 0.5, 600.0, 601.0])),
    F.TYPE_FLOAT: st.floats(width=32),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_STRING: st.text(max_size=24),
    F.TYPE_BYTES: st.binary(max_size=48),
}
BY_NAME = {"address": address, "addresses": address, "pages": pages}


def field_strategy(field, overrides: dict, depth: int):
    if field.name in overrides:
        return overrides[field.name]
    if field.message_type is not None:
        return message_strategy(field.message_type, overrides, depth + 1)
    if field.enum_type is not None:  # known values, and unknown ones (proto3 keeps them)
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-2**31, 2**31 - 1))
    return BY_NAME.get(field.name, SCALARS[field.type])


def message_strategy(desc, overrides: dict | None = None, depth: int = 0):
    """Random messages of a descriptor's type: any subset of fields, each random or a
    boundary value, nested messages up to three levels, repeated fields up to 8 long.
    `overrides` maps a field name to the strategy to use instead (at every level)."""
    overrides = overrides or {}
    from google.protobuf import message_factory
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())

    @st.composite
    def build(draw):
        msg = cls()
        fields = [f for f in desc.fields if f.containing_oneof is None]
        for oneof in desc.oneofs:  # at most one member, as a sender would
            choice = draw(st.sampled_from([None, *oneof.fields]))
            if choice is not None:
                fields.append(choice)
        for f in fields:
            if not draw(st.booleans()):
                continue
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                key = field_strategy(f.message_type.fields_by_name["key"], overrides, depth)
                value_field = f.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    continue
                value = field_strategy(value_field, overrides, depth)
                getattr(msg, f.name).update(draw(st.dictionaries(key, value, max_size=4)))
                continue
            one = field_strategy(f, overrides, depth)
            if f.is_repeated:
                getattr(msg, f.name).extend(draw(st.lists(one, max_size=8)))
            elif f.message_type is not None:
                getattr(msg, f.name).CopyFrom(draw(one))
            else:
                setattr(msg, f.name, draw(one))
        return msg

    return build()


class OwnLoop:
    """An event loop owned by a sync test, so hypothesis (sync) can drive async calls."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)  # grpc.aio binds channels to the current loop

    def run(self, coro, timeout: float = 60.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        pending = asyncio.all_tasks(self.loop)  # servers' leftovers: end them on this loop
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
        asyncio.set_event_loop(None)
