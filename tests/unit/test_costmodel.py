"""The cost model (issue 9): presets, TOML files and their one-line errors, the pricing
arithmetic for IPIs and for broadcast invalidation, and its trip through the Policy."""
import dataclasses

import pytest

from services.common import costmodel, wire
from services.common.costmodel import (CostModel, Events, delivery_events, memory_events,
                                       tlb_events)
from services.common.errors import InvalidArgument
from services.common.metrics import modelled_time
from services.common.policy import Policy
from services.cpu.tlb import Counters


def test_presets_carry_the_sourced_constants():
    x86 = costmodel.load("x86")
    assert (x86.name, x86.broadcast, x86.invlpg_ns, x86.full_flush_ns) == ("x86", False, 100, 100)
    assert x86.ipi_send_ns == 1600 / 2.0  # 1,600 cycles at 2 GHz
    assert x86.walk_ns == 4 * 3.5 / 2.0   # 14 cycles: Ingo Molnar's 10-20 per cached miss
    bcast = costmodel.load("invlpgb")
    assert bcast.broadcast and bcast.ipi_send_ns == 0 and bcast.broadcast_sync_ns == 500
    assert costmodel.preset("x86") is costmodel.preset("x86")  # loaded once


def test_a_file_is_a_model_and_cycles_use_its_clock(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('clock_ghz = 4.0\ninvlpg_cycles = 400\nipi_send_ns = 5\nwalk_levels = 5\n'
                 'walk_level_ns = 2\ndescription = "a test"\n')
    m = costmodel.load(str(f))
    assert (m.name, m.invlpg_ns, m.ipi_send_ns, m.walk_ns) == ("mine", 100.0, 5.0, 10.0)


@pytest.mark.parametrize("text, message", [
    ("invlpg_ns = -1", "invlpg_ns must be a non-negative number, not -1"),
    ("invlpgg_ns = 1", "unknown key 'invlpgg_ns'"),
    ("invlpg = 1", "unknown key 'invlpg'"),
    ("invlpg_ns = 1\ninvlpg_cycles = 2", "invlpg is given twice"),
    ('invlpg_ns = "fast"', "invlpg_ns must be a number, not str"),
    ("broadcast = 1", "broadcast has the wrong type"),
    ("clock_ghz = 0", "clock_ghz 0.0 must be in (0, 100]"),
    ("walk_levels = 9", "walk_levels 9 must be 1..6"),
    ("invlpg_ns = nan", "invlpg_ns must be a non-negative number, not nan"),
    ("invlpg_ns = [", "not valid TOML"),
    ("", "prices nothing: give at least one cost"),
    ('name = "empty"\nclock_ghz = 3.0', "prices nothing"),
])
def test_a_bad_file_is_a_one_line_error(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(InvalidArgument) as e:
        costmodel.load(str(f))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(f) in str(e.value)


def test_neither_a_preset_nor_a_file():
    with pytest.raises(InvalidArgument, match="neither a preset .x86, invlpgb, altix-2005. nor a readable"):
        costmodel.load("arm64")


MODEL = dict(walk_levels=4, walk_level_ns=2, invlpg_ns=100, full_flush_ns=50, ipi_send_ns=800,
             ipi_receive_ns=1000, broadcast_page_ns=30, broadcast_full_ns=40,
             broadcast_sync_ns=500, lock_ns=10, fault_ns=1000, tlb_hit_ns=1)
EVENTS = Events(hits=10, misses=20, faults=3, pages_invalidated=64, full_flushes=2, ipis=4,
                shootdowns=5, full_shootdowns=1, range_shootdown_pages=16, lock_acquisitions=7)


def test_ipis_price_every_cpus_invalidations_and_each_interrupt():
    parts = CostModel(name="t", **MODEL).breakdown(EVENTS)
    assert parts == {"walk": 10 * 1 + 20 * 8, "fault": 3000, "lock": 70,
                     "invalidate": 64 * 100 + 2 * 50, "ipi": 4 * 1800}
    assert CostModel(name="t", **MODEL).total_ns(EVENTS) == sum(parts.values())


def test_broadcast_prices_the_initiators_instructions_and_no_interrupt():
    parts = CostModel(name="t", broadcast=True, **MODEL).breakdown(EVENTS)
    assert parts["ipi"] == 0
    assert parts["invalidate"] == 16 * 30 + 1 * 40 + 5 * 500
    assert parts["walk"] == 10 * 1 + 20 * 8  # refills are misses either way


def test_hardware_broadcasts_under_an_ipi_model_are_priced_as_broadcasts():
    """--broadcast hw with the x86 model: the shootdowns sent as INVLPGB cost the initiator
    a broadcast per page (or one full) and a sync each, and no IPI; the rest stay IPIs. A
    broadcast model prices every shootdown as a broadcast already: nothing counted twice."""
    hw = dataclasses.replace(EVENTS, hw_shootdowns=3, hw_full_shootdowns=1, hw_range_pages=8)
    parts = CostModel(name="t", **MODEL).breakdown(hw)
    assert parts["invalidate"] == 64 * 100 + 2 * 50 + 8 * 30 + 1 * 40 + 3 * 500
    assert parts["ipi"] == 4 * 1800  # the IPIs the other shootdowns sent
    broadcast = CostModel(name="t", broadcast=True, **MODEL)
    assert broadcast.breakdown(hw) == broadcast.breakdown(EVENTS)


def test_events_subtract_to_what_followed_a_warm_up():
    later = Events(misses=50, ipis=6, range_shootdown_pages=20)
    assert later - Events(misses=20, ipis=4, range_shootdown_pages=16) == \
        Events(misses=30, ipis=2, range_shootdown_pages=4)


def test_the_model_travels_with_the_policy():
    p = Policy(cost_model=costmodel.load("invlpgb"))
    assert wire.policy_from_proto(wire.policy_to_proto(p)) == p
    assert p.as_dict()["cost_model"] == "invlpgb"  # a label value, the report's config
    assert Policy().cost_model == costmodel.preset("x86")
    old = wire.policy_to_proto(p)
    old.ClearField("cost_model")  # a client that predates the cost model
    assert wire.policy_from_proto(old).cost_model == costmodel.preset("x86")
    bad = wire.policy_to_proto(p)
    bad.cost_model.lock_ns = -5
    with pytest.raises(InvalidArgument, match="lock must be a non-negative"):
        wire.policy_from_proto(bad)


def test_the_metric_prices_a_services_own_events():
    """What a CPU counts (lookups, invalidations, full flushes) becomes walk and invalidate
    time; what it does not count (IPIs) costs nothing here."""
    counters = Counters(hits=10, misses=20, flush_page=64, flush_range=9, flush_full=2,
                        flush_elided=4, flush_requests=15)
    model = CostModel(name="t", **MODEL)
    family = modelled_time(model, tlb_events(counters))
    got = {s.labels["component"]: s.value for s in family.samples}
    assert family.samples[0].name == "tlbsim_modelled_seconds_total"
    assert {s.labels["cost_model"] for s in family.samples} == {"t"}
    assert got["walk"] == pytest.approx((10 * 1 + 20 * 8) * 1e-9)
    assert got["invalidate"] == pytest.approx((64 * 100 + 2 * 50) * 1e-9)
    assert got["ipi"] == got["fault"] == got["lock"] == 0


def test_one_mapping_reads_the_domain_and_the_wire_alike():
    """A CPU's counters and their proto give the same events; a spurious fault is none."""
    counters = Counters(hits=3, misses=2, flush_page=5, flush_full=1)
    assert tlb_events(wire.tlb_counters_to_proto(counters)) == tlb_events(counters)
    e = memory_events({"anon": 4, "cow": 1, "walked": 7}, 3, 1, 12, 9) + delivery_events(6)
    assert e == Events(faults=5, shootdowns=3, full_shootdowns=1, range_shootdown_pages=12,
                       lock_acquisitions=9, ipis=6)


@pytest.mark.parametrize("argv", [["load", "run", "munmap"], ["load", "compare", "munmap"],
                                  ["bench"]])
def test_the_command_line_takes_a_model_and_refuses_a_bad_file(tmp_path, capsys, argv):
    from loadgen.cli.main import main
    f = tmp_path / "typo.toml"
    f.write_text("invlpg_nss = 100\n")
    spec = ["--cost-model", str(f)] if argv[1:2] != ["compare"] else \
        ["--a", f"cost_model={f}"]
    assert main([*argv, *spec, "--cluster", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'invlpg_nss'" in err and len(err.splitlines()) == 1


def test_the_help_explains_the_models(capsys):
    from loadgen.cli.main import main
    with pytest.raises(SystemExit):
        main(["load", "run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--cost-model x86|invlpgb|PATH" in out and "INVLPGB" in out and "TOML" in out
