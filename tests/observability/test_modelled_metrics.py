"""Modelled time on a live scrape (issue 9): every service prices its own events with the
run's cost model, and the sum over services is the report's modelled time."""
import collections

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common import costmodel
from services.common.policy import Policy
from tests.observability.conftest import scrape


def modelled(exporters) -> dict[tuple[str, str], float]:
    """tlbsim_modelled_seconds_total summed over every service, by (cost model, component)."""
    total = collections.defaultdict(float)
    for port in exporters.ports.values():
        for family in text_string_to_metric_families(scrape(port)):
            for s in family.samples:
                if s.name == "tlbsim_modelled_seconds_total":
                    total[s.labels["cost_model"], s.labels["component"]] += s.value
    return total


@pytest.mark.parametrize("model", ["x86", "invlpgb"])
async def test_scraped_modelled_time_is_the_reports(cluster, exporters, model):
    cfg = RunConfig("munmap", Policy(deadline_s=10.0, cost_model=costmodel.load(model)),
                    cpus=4, pages=64, rounds=2, readers=False)
    report = await run(cluster.client, cfg)
    parts = report["results"]["modelled"]["components_us"]
    scraped = modelled(exporters)
    assert {m for m, _ in scraped} == {model}  # every service prices with the run's model
    for component, us in parts.items():
        assert scraped[model, component] * 1e6 == pytest.approx(us, abs=2e-3), component
    assert parts["walk"] > 0 and parts["invalidate"] > 0 and parts["lock"] > 0
    assert (parts["ipi"] > 0) == (model == "x86")


async def test_hardware_broadcasts_are_counted_and_priced_as_broadcasts(cluster, exporters):
    """--broadcast hw on 4 CPUs (an mm on 4 CPUs has a global ASID): each shootdown is one
    INVLPGB, no IPIs. The coordinator still delivers it to every target (the simulator's
    plumbing), but counts and prices no IPI; the targets count no invlpg of their own; the
    memory service prices each broadcast at the initiator, under the x86 model too."""
    model = costmodel.load("x86")
    cfg = RunConfig("munmap", Policy(deadline_s=10.0, cost_model=model, hw_broadcast=True),
                    cpus=4, pages=64, rounds=2, readers=True)
    report = await run(cluster.client, cfg)
    r = report["results"]
    e = r["modelled"]["events"]
    assert r["shootdowns"] > 0 and r["broadcasts"] == r["shootdowns"]
    assert r["ipis"] == 0 and e["ipis"] == 0
    assert e["hw_shootdowns"] == r["shootdowns"] and e["hw_full_shootdowns"] == r["full_flushes"]
    parts = r["modelled"]["components_us"]
    assert parts["ipi"] == 0
    broadcast_ns = (e["hw_range_pages"] * model.broadcast_page_ns
                    + e["hw_full_shootdowns"] * model.broadcast_full_ns
                    + e["hw_shootdowns"] * model.broadcast_sync_ns)
    local_ns = e["pages_invalidated"] * model.invlpg_ns + e["full_flushes"] * model.full_flush_ns
    assert parts["invalidate"] * 1e3 == pytest.approx(broadcast_ns + local_ns, abs=2)
    received = sum(s.value for port in exporters.ports.values()
                   for family in text_string_to_metric_families(scrape(port))
                   for s in family.samples
                   if s.name == "tlbsim_tlb_flushes_total" and s.labels["kind"] == "hardware")
    assert received == 3 * r["shootdowns"]  # every target heard it, with no handler
    scraped = modelled(exporters)
    for component, us in parts.items():
        assert scraped["x86", component] * 1e6 == pytest.approx(us, abs=2e-3), component
