"""What the real-process tests share: the CLI as a subprocess, and waiting for every CPU
to be registered and unfenced again after a kill."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from loadgen.cluster import Cluster
from tlbsim.v1 import coordinator_pb2

ROOT = Path(__file__).resolve().parents[1]


def tlbsim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadgen", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


async def listing(cluster: Cluster) -> dict[int, coordinator_pb2.CpuInfo]:
    response = await cluster.coordinator.ListCpus(coordinator_pb2.ListCpusRequest(),
                                                  timeout=5, wait_for_ready=True)
    return {c.cpu: c for c in response.cpus}


async def all_rejoined(cluster: Cluster, n: int, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.1)):
        if sum(not c.fenced for c in (await listing(cluster)).values()) >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the CPUs did not all rejoin")
