"""Issue 20: the coordinator's delivery trouble on the overview dashboard — MQTT
fallbacks, shootdowns sent over gRPC while the broker was down, the time it was down,
redeliveries and unknown targets — each made to happen on a live cluster with a real
mosquitto, then read through the dashboard's own queries from a real Prometheus."""
from __future__ import annotations

import asyncio

import pytest

from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common.mqtt import Outages
from services.common.policy import Policy
from tests.harness import InProcessCluster, until
from tests.observability.conftest import Exporters, Prometheus, requires_prometheus
from tests.observability.test_dashboards import GRAFANA, load, panels, substitute
from tlbsim.v1 import common_pb2, coordinator_pb2, cpu_pb2

PANELS = ("MQTT fallbacks and gRPC-only shootdowns/s", "MQTT broker down",
          "Redeliveries and unknown targets/s")


def test_outages_count_the_time_without_the_broker():
    now = [100.0]
    o = Outages(lambda: now[0])
    assert o.seconds() == 0 and o.count == 0
    o.down()  # starting: down until the first connection
    now[0] += 0.5
    o.up()
    now[0] += 10
    assert o.seconds() == 0.5
    o.down()
    o.down()  # still the same outage
    now[0] += 2
    assert o.seconds() == 2.5 and o.count == 2  # an ongoing outage counts as it goes
    o.up()
    o.up()
    now[0] += 5
    assert o.seconds() == 2.5


@requires_prometheus
@pytest.mark.slow
async def test_delivery_panels_show_fallbacks_outages_redeliveries_and_unknown_targets(
        broker, tmp_path):
    async with InProcessCluster(cpus=3, mqtt_url=broker.url) as c:
        await c.stop_cpu(2)
        await c.start_cpu(2, mqtt=False)  # never hears a broadcast: a fallback each time
        await c.client.discover(3)
        exporters = Exporters(c)
        prom = Prometheus(exporters.ports, tmp_path)
        try:
            await prom.wait_scraped(len(exporters.ports))
            mqtt = Policy(transport="mqtt", deadline_s=2.0)
            r = (await run(c.client, RunConfig("munmap", mqtt, cpus=3, pages=16, rounds=2,
                                               readers=False)))["results"]
            assert r["stale_accesses"] == 0 and r["deadline_misses"] == 0
            await prom.wait_scraped(len(exporters.ports))  # each run's counts, before a reset

            broker.kill()  # shootdowns go over gRPC while it is down
            link = c.coordinator.node.mqtt
            await until(lambda: not link.connected, "the broker link going down")
            r = (await run(c.client, RunConfig("munmap", mqtt, cpus=3, pages=16, rounds=1,
                                               readers=False)))["results"]
            assert r["stale_accesses"] == 0
            await prom.wait_scraped(len(exporters.ports))
            await asyncio.to_thread(broker.start)

            # Half of CPU 1's flushes are lost and sent again.
            stub = next(x.stub for x in c.client.cpus if x.id == 1)
            await stub.Chaos(cpu_pb2.ChaosRequest(drop_fraction=0.5, seed=7), timeout=10)
            r = (await run(c.client, RunConfig("munmap", Policy(deadline_s=5.0), cpus=3,
                                               pages=32, rounds=4)))["results"]
            await stub.Chaos(cpu_pb2.ChaosRequest(), timeout=10)
            assert r["stale_accesses"] == 0 and r["deadline_misses"] == 0
            # A target the coordinator does not know: waited for, then counted as fenced.
            reply = await c.client.coordinator.Shootdown(coordinator_pb2.ShootdownRequest(
                flush=common_pb2.FlushRequest(shootdown_id=1 << 41, mm=1, pages=0),
                targets=[9]), timeout=30)
            assert list(reply.fenced) == [9]
            await prom.wait_scraped(len(exporters.ports))

            overview = {p["title"]: p for p in panels(load(GRAFANA / "dashboards" /
                                                            "tlbsim-overview.json"))}
            seen = {}
            for title in PANELS:
                for t in overview[title]["targets"]:
                    values = [float(x["value"][1]) for x in prom.query(substitute(t["expr"]))]
                    seen[title, t["legendFormat"]] = max(values, default=0.0)
        finally:
            prom.stop()
            exporters.close()
    assert all(v > 0 for v in seen.values()), seen
    assert len(seen) == 5  # fallbacks, gRPC-only shootdowns, down, redeliveries, unknown
