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
