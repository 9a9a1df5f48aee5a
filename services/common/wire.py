"""The wire boundary: every conversion between the protos and the domain's values.

The domain (services/memory, services/cpu/core.py and tlb.py, services/common/policy.py
and costmodel.py) knows no protobuf; the gRPC adapters call these functions and nothing
else to cross. Policy fields map by name: an enum field to the proto enum whose values
are `PREFIX_` + the member's name (LockMode.LOCK_ALL_SHARERS <->
LOCK_MODE_LOCK_ALL_SHARERS), an `optional` proto field left unset to the Policy's
default — so a new Policy field needs its proto field of the same name and nothing here.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Iterable, cast

from services.common.costmodel import DEFAULT_PRESET, CostModel, preset
from services.common.errors import InvalidArgument
from services.common.policy import ENUM_FIELDS, Policy, Transport
from services.common.stats import Samples, p50_p99
from services.cpu.tlb import ELIDED, FULL, NOT_LOADED, RANGE, Counters
from services.memory.audit import TlbDump
from services.memory.state import FlushOrder
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

_POLICY_FIELDS = common_pb2.Policy.DESCRIPTOR.fields_by_name


def _enum_values(kind: type[enum.StrEnum], proto_enum) -> dict[enum.StrEnum, int]:
    """member -> proto number, by name: the proto's values are PREFIX_UNSPECIFIED, then
    PREFIX_ + each member's name."""
    prefix = proto_enum.values[0].name.removesuffix("UNSPECIFIED")
    return {member: proto_enum.values_by_name[prefix + member.name].number for member in kind}


# Policy's enum fields: member -> number, and back.
_TO_PROTO = {name: _enum_values(kind, _POLICY_FIELDS[name].enum_type)
             for name, kind in ENUM_FIELDS.items()}
_FROM_PROTO = {name: {n: m for m, n in values.items()} for name, values in _TO_PROTO.items()}


# --- Policy and CostModel (the run's choices, sent with every Reset) -----------------------
def cost_model_to_proto(model: CostModel) -> common_pb2.CostModel:
    return common_pb2.CostModel(**model.as_dict())


def cost_model_from_proto(p: common_pb2.CostModel) -> CostModel:
    """A Policy without a model (an older client) gets the default preset."""
    if not p.name:
        return preset(DEFAULT_PRESET)
    return CostModel(**{f.name: getattr(p, f.name) for f in dataclasses.fields(CostModel)})


def policy_to_proto(policy: Policy) -> common_pb2.Policy:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Policy):
        value = getattr(policy, f.name)
        if f.name in _TO_PROTO:
            value = _TO_PROTO[f.name][value]
        elif f.name == "cost_model":
            value = cost_model_to_proto(value)
        values[f.name] = value
    return common_pb2.Policy(**values)


def policy_from_proto(p: common_pb2.Policy) -> Policy:
    """The Policy a proto carries; an unset `optional` field is the Policy's default, an
    UNSPECIFIED (or unknown) choice is INVALID_ARGUMENT."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Policy):
        field = _POLICY_FIELDS[f.name]
        if field.has_presence and field.message_type is None and not p.HasField(f.name):
            continue  # the Policy's default
        value = getattr(p, f.name)
        if f.name in _FROM_PROTO:
            if value not in _FROM_PROTO[f.name]:
                raise InvalidArgument(f"{f.name.replace('_', '-')} is unspecified or unknown "
                                      f"({value})")
            value = _FROM_PROTO[f.name][value]
        elif f.name == "cost_model":
            value = cost_model_from_proto(value)
        values[f.name] = value
    return Policy(**values)


def transport_to_proto(transport: Transport | str) -> common_pb2.Transport:
    return cast(common_pb2.Transport, _TO_PROTO["transport"][Transport(transport)])


def transport_from_proto(number: int) -> Transport | None:
    """None for UNSPECIFIED or a number this build does not know."""
    member = _FROM_PROTO["transport"].get(number)
    return Transport(member) if member is not None else None


def cpu_reset_request(policy: Policy, epoch: int) -> cpu_pb2.CpuResetRequest:
    """What a CPU needs of the run's policy: its TLB's shape, ASIDs, the cost model."""
    return cpu_pb2.CpuResetRequest(tlb_entries=policy.tlb_entries, tlb_ways=policy.tlb_ways,
                                   epoch=epoch, cost_model=cost_model_to_proto(policy.cost_model),
                                   asids=policy.asids)


def cpu_policy_from_reset(r: cpu_pb2.CpuResetRequest) -> Policy:
    """The part of the policy a CpuResetRequest carries, validated as a Policy."""
    values: dict[str, Any] = {"tlb_entries": r.tlb_entries, "tlb_ways": r.tlb_ways,
                              "cost_model": cost_model_from_proto(r.cost_model)}
    if r.HasField("asids"):
        values["asids"] = r.asids
    return Policy(**values)


# --- flushes -----------------------------------------------------------------------------
def flush_to_proto(f: FlushOrder) -> common_pb2.FlushRequest:
    return common_pb2.FlushRequest(shootdown_id=f.shootdown_id, mm=f.mm, start_vpn=f.start_vpn,
                                   pages=f.pages, new_tlb_gen=f.new_tlb_gen,
                                   mm_tlb_gen=f.mm_tlb_gen, freed_tables=f.freed_tables,
                                   initiator=f.initiator, all_mms=f.all_mms,
                                   mm_gens=f.mm_gens, sent_vtime_ns=f.sent_vt,
                                   hardware=f.hardware)


def flushes_to_proto(orders: Iterable[FlushOrder]) -> list[common_pb2.FlushRequest]:
    return [flush_to_proto(f) for f in orders]


# What a CPU did with a flush (services/cpu/tlb.py) as a FlushAck says it.
FLUSH_OUTCOMES = {RANGE: common_pb2.FLUSH_OUTCOME_RANGE, FULL: common_pb2.FLUSH_OUTCOME_FULL,
                  ELIDED: common_pb2.FLUSH_OUTCOME_ELIDED,
                  NOT_LOADED: common_pb2.FLUSH_OUTCOME_NOT_LOADED}


def flush_ack(shootdown_id: int, cpu: int, outcome: str,
              entries_removed: int = 0) -> common_pb2.FlushAck:
    return common_pb2.FlushAck(shootdown_id=shootdown_id, cpu=cpu,
                               outcome=FLUSH_OUTCOMES[outcome], entries_removed=entries_removed)


def not_loaded(ack: common_pb2.FlushAck) -> bool:
    """The CPU did not run the mm when the flush arrived: it flushed nothing and left
    the mm (a lazy one switched to init_mm)."""
    return ack.outcome == common_pb2.FLUSH_OUTCOME_NOT_LOADED


def elided(ack: common_pb2.FlushAck) -> bool:
    """The CPU found nothing to flush (its generation was already current)."""
    return ack.outcome == common_pb2.FLUSH_OUTCOME_ELIDED


# --- misses (a HandleMiss answer: the kernel's outcome names <-> MissOutcome) ---------------
MISS_OUTCOMES = {"walked": memory_pb2.MISS_OUTCOME_WALKED,
                 "anon": memory_pb2.MISS_OUTCOME_FAULT_ANON,
                 "cow": memory_pb2.MISS_OUTCOME_FAULT_COW,
                 "prot": memory_pb2.MISS_OUTCOME_FAULT_PROT,
                 "segv": memory_pb2.MISS_OUTCOME_SEGV,
                 "swapin": memory_pb2.MISS_OUTCOME_SWAP_IN,
                 "retry": memory_pb2.MISS_OUTCOME_RETRY}
_MISS_NAMES: dict[int, str] = {number: name for name, number in MISS_OUTCOMES.items()}


def miss_outcome(number: int) -> str:
    """The kernel's name of a MissOutcome (INVALID_ARGUMENT if this build knows none)."""
    try:
        return _MISS_NAMES[number]
    except KeyError:
        raise InvalidArgument(f"miss outcome {number} is unknown") from None


# --- TLB dumps (a CPU's DumpTlb, the memory service's Audit) --------------------------------
def tlb_counters_to_proto(c: Counters) -> cpu_pb2.TlbCounters:
    return cpu_pb2.TlbCounters(**dataclasses.asdict(c))


def tlb_dump_from_proto(d: cpu_pb2.DumpTlbResponse) -> TlbDump:
    return TlbDump(cpu=d.cpu, fenced=d.fenced, loaded_mm=d.loaded_mm, lazy=d.lazy,
                   local_gen=dict(d.local_tlb_gen),
                   entries=[(e.mm, e.vpn, e.pfn, e.writable, e.tid) for e in d.entries])


def tlb_dumps_from_proto(dumps: Iterable[cpu_pb2.DumpTlbResponse]) -> list[TlbDump]:
    return [tlb_dump_from_proto(d) for d in dumps]


def percentiles(samples: Samples) -> common_pb2.Percentiles:
    p50, p99, n = p50_p99(samples)
    return common_pb2.Percentiles(p50=p50, p99=p99, count=n)
