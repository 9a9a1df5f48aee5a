"""Fixtures the whole suite shares (a directory's own conftest.py adds what only it needs).

- `cluster`: a real four-CPU cluster in this process, each service its own gRPC server on
  port 0 (tests/harness.py); a test that needs another size or options builds its own
  `InProcessCluster`.
- `steady_cluster`: the same with leases that outlast the test (harness.STEADY), for
  tests whose counts a CPU fencing itself on a starved event loop would change.
- `broker`: a real mosquitto per test on a free loopback port (tests/broker.py); skipped
  where mosquitto is not installed.
"""
from __future__ import annotations

import pytest

from tests.broker import BINARY, Broker
from tests.harness import STEADY, InProcessCluster


@pytest.fixture
async def cluster():
    async with InProcessCluster(cpus=4) as c:
        yield c


@pytest.fixture
async def steady_cluster():
    async with InProcessCluster(cpus=4, liveness=STEADY) as c:
        yield c


@pytest.fixture
def broker(tmp_path):
    if BINARY is None:
        pytest.skip("mosquitto is not installed (tools/setup-debian.sh installs it)")
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()
