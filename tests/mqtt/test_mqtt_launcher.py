"""`tlbsim up --mqtt` as real processes: a broker of the cluster's own, used by the mqtt
transport, and stopped with the cluster."""
from __future__ import annotations

import asyncio

import pytest

from loadgen.cluster import Cluster
from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services import launcher
from services.common.policy import Policy
from tests.mqtt.tap import Tap
from tlbsim.v1 import coordinator_pb2

pytestmark = pytest.mark.skipif(launcher.mosquitto_binary() is None,
                                reason="mosquitto is not installed (tools/setup-debian.sh)")


async def test_up_mqtt_starts_a_broker_the_cluster_uses_and_stops_it(tmp_path):
    cluster = launcher.LocalCluster()
    info = await asyncio.to_thread(cluster.start, 2, tmp_path, True)
    try:
        broker = info.pids["mosquitto"]
        assert launcher.is_our_service(broker)  # `tlbsim down` would stop it too
        assert info.mqtt.startswith("mqtt://127.0.0.1:")
        assert launcher.ClusterInfo.from_json(info.to_json()).mqtt == info.mqtt
        assert "set_tcp_nodelay true" in (tmp_path / launcher.MOSQUITTO_CONF).read_text()
        async with Cluster(info.coordinator) as client, Tap(info.mqtt) as tap:
            cfg = RunConfig("munmap", Policy(transport="mqtt", deadline_s=10.0), cpus=2,
                            pages=16, rounds=2, readers=False)
            r = (await run(client, cfg))["results"]
            s = await client.coordinator.Stats(coordinator_pb2.CoordinatorStatsRequest())
            assert r["stale_accesses"] == 0 and r["shootdowns"] == 2 and r["ipis"] == 2
            assert s.fallbacks == 0 and s.broker_down == 0
            assert len(tap.real_shootdowns()) == 2
    finally:
        await asyncio.to_thread(cluster.stop)
    assert not launcher.is_alive(broker)
