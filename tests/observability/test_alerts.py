"""Issue 4, point 3: the stale-access alert goes pending, then firing, seen through a
real Prometheus's API, when a run uses an unsafe policy, and never with a safe one; the
frames-freed-without-ack alert (issue 8) fires with it."""
from __future__ import annotations

import asyncio
import time

import pytest

from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common.policy import Policy
from tests.observability.conftest import requires_prometheus
from tests.observability.test_dashboards import DASHBOARDS, GRAFANA, load, panels, substitute

DASHBOARDS_DIR = GRAFANA / "dashboards"

ALERT = "TlbsimStaleAccess"
EARLY_FREE = "TlbsimFramesFreedWithoutAck"


def states(prom, alert: str = ALERT) -> set[str]:
    return {a["state"] for a in prom.alerts() if a["labels"]["alertname"] == alert}


async def watch(prom, seconds: float, until: str | None = None) -> list[str]:
    """The alert's states seen, in order, polling faster than rules are evaluated."""
    seen: list[str] = []
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        for s in sorted(states(prom)):
            if not seen or seen[-1] != s:
                seen.append(s)
        if until is not None and until in seen:
            break
        await asyncio.sleep(0.2)
    return seen


@requires_prometheus
@pytest.mark.slow
async def test_stale_access_alert_fires_for_an_unsafe_run_and_never_for_a_safe_one(
        cluster, exporters, prom):
    await prom.wait_scraped(len(exporters.ports))
    safe = await run(cluster.client, RunConfig(
        "munmap", Policy(deadline_s=10.0), cpus=4, pages=256, rounds=6))
    assert safe["results"]["stale_accesses"] == 0
    await prom.wait_scraped(len(exporters.ports))
    # Longer than the rule's `for: 5s` plus an evaluation: a safe run never even pends.
    assert await watch(prom, 8) == []
    assert states(prom, EARLY_FREE) == set()

    # Watch from the start: the run may take longer than the rule's `for`.
    watching = asyncio.create_task(watch(prom, 60, until="firing"))
    unsafe = await run(cluster.client, RunConfig(
        "munmap", Policy(deadline_s=10.0, unsafe="free-before-flush"), cpus=4, pages=512,
        rounds=10))
    stale = unsafe["results"]["stale_accesses"]
    assert stale > 0
    seen = await watching
    assert seen == ["pending", "firing"], seen
    # Once the last scrape and evaluation have caught up with the finished run, the
    # firing alert reports the oracle's exact count.
    await prom.wait_scraped(len(exporters.ports))
    give_up = time.monotonic() + 10
    while True:
        alert = next(a for a in prom.alerts() if a["labels"]["alertname"] == ALERT)
        if float(alert["value"]) == stale or time.monotonic() > give_up:
            break
        await asyncio.sleep(0.2)
    assert alert["state"] == "firing" and alert["labels"]["severity"] == "critical"
    assert float(alert["value"]) == stale
    # The unsafe order freed frames before their shootdown completed: its own alert.
    assert unsafe["results"]["frames_freed_without_ack"] > 0
    give_up = time.monotonic() + 15
    while "firing" not in states(prom, EARLY_FREE):
        assert time.monotonic() < give_up, f"{EARLY_FREE}: {states(prom, EARLY_FREE)}"
        await asyncio.sleep(0.2)

    # The dashboards show both (issue 20): their annotation query returns the firing
    # alerts, and the overview's stat panels count what the run did.
    for path in DASHBOARDS:
        (note,) = load(path)["annotations"]["list"]
        fired = {r["metric"]["alertname"] for r in prom.query(substitute(note["expr"]))}
        assert {ALERT, EARLY_FREE} <= fired, (path.name, fired)
    overview = {p["title"]: p for p in panels(load(DASHBOARDS_DIR / "tlbsim-overview.json"))}
    for title, expected in (("Stale accesses", stale),
                            ("Frames freed before their flush",
                             unsafe["results"]["frames_freed_without_ack"])):
        (result,) = prom.query(substitute(overview[title]["targets"][0]["expr"]))
        assert float(result["value"][1]) == expected, title
