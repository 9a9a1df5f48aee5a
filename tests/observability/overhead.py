"""Metric overhead: access throughput with metrics on versus off, in one run.

One in-process cluster of 4 CPUs runs the same workload with metrics on and off
alternately, round by round in ABBA order (so machine noise hits both alike): each of the 4 CPUs reads 1,024 mapped pages 8 times
(the first pass faults or walks, the rest hit in its 1,536-entry TLB: the hot path), then
the range is unmapped (one gathered shootdown to 3 CPUs); throughput is accesses/s. "On": every node has its registry, the
per-RPC histograms observe, and every registry is scraped over HTTP every
SCRAPE_EVERY_S (ten times the shipped 5 s scrape interval). "Off": the per-RPC
histograms do not observe and nobody scrapes (collectors cost nothing unscraped; nodes
built with metrics=False have none at all). The
domain's own counters exist either way: they are the simulator's statistics.

    .venv/bin/python -m tests.observability.overhead [--rounds 10]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
import urllib.request

from loadgen.scenarios.base import Driver, Measurements, pages_at
from services.common.policy import Policy
from services.common.server import start_server
from services.coordinator.service import CoordinatorNode
from services.cpu.service import CpuNode
from services.memory.service import MemoryNode
from tests.harness import InProcessCluster

SCRAPE_EVERY_S = 0.5


class Cluster(InProcessCluster):
    def __init__(self, metrics: bool, cpus: int = 4):
        super().__init__(cpus)
        self.metrics = metrics

    async def start_cpu(self, cpu: int):
        self.cpus[cpu] = await start_server(CpuNode(
            cpu, self.memory.address, self.coordinator.address, metrics=self.metrics))
        return self.cpus[cpu]

    async def __aenter__(self):
        from loadgen.cluster import Cluster as Client
        self.coordinator = await start_server(CoordinatorNode(metrics=self.metrics))
        self.memory = await start_server(MemoryNode(self.coordinator.address,
                                                    metrics=self.metrics))
        for i in range(self.ncpus):
            await self.start_cpu(i)
        self.client = Client(self.coordinator.address)
        await self.client.discover(self.ncpus)
        return self


class Scraper(threading.Thread):
    """What Prometheus does, only more often: GET /metrics of every node."""

    def __init__(self, ports: list[int], every_s: float):
        super().__init__(daemon=True)
        self.ports, self.stopping, self.scrapes = ports, threading.Event(), 0
        self.every_s = every_s
        self.paused = False

    def run(self):
        while not self.stopping.wait(self.every_s):
            for port in [] if self.paused else self.ports:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
                self.scrapes += 1


PAGES, PASSES = 1024, 8


async def access_round(c: Cluster) -> float:
    """One round on a freshly reset machine; returns accesses per second."""
    await c.client.reset(Policy(deadline_s=10.0), c.ncpus)
    d = Driver(c.client, Measurements())
    cpus = c.client.cpus
    await d.new_process(cpus)
    address = (await d.syscall(cpus[0], mmap={"pages": PAGES, "writable": True})).address
    addresses = pages_at(address, PAGES) * PASSES
    t0 = time.perf_counter()
    replies = await asyncio.gather(*(d.access(cpu, addresses) for cpu in cpus))
    await d.syscall(cpus[0], munmap={"address": address, "pages": PAGES})
    elapsed = time.perf_counter() - t0
    return sum(r.accesses for r in replies) / elapsed


def switch(c: Cluster, on: bool, saved: dict) -> None:
    """Metrics on or off on one running cluster: the per-RPC histogram observations
    (the scraper is paused separately). Collectors cost nothing unless scraped."""
    coord = c.coordinator.node
    if not saved:
        saved["latency"] = coord._latency
        saved["walks"] = {i: s.node._walk_timers for i, s in c.cpus.items()}
    coord._latency = saved["latency"] if on else None
    for i, s in c.cpus.items():
        s.node._walk_timers = saved["walks"][i] if on else {}


async def measure(rounds: int = 10, scrape_every_s: float = SCRAPE_EVERY_S) -> dict:
    """One cluster, metrics switched on and off round by round (ABBA order)."""
    from tests.observability.conftest import Exporters
    async with Cluster(metrics=True) as c:
        exporters = Exporters(c)
        scraper = Scraper(list(exporters.ports.values()), scrape_every_s)
        scraper.start()
        saved: dict = {}
        try:
            await access_round(c)  # warm up
            rates = {"on": [], "off": []}
            for i in range(rounds):
                for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    switch(c, name == "on", saved)
                    scraper.paused = name == "off"
                    rates[name].append(await access_round(c))
        finally:
            scraper.stopping.set()
            scraper.join(10)
            exporters.close()
    ratios = [a / b for a, b in zip(rates["on"], rates["off"])]
    on_median, off_median = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"rounds": rounds, "scrape_every_s": scrape_every_s, "scrapes": scraper.scrapes,
            "accesses_per_s_on": round(on_median, 1), "accesses_per_s_off": round(off_median, 1),
            "ratio_median": round(statistics.median(ratios), 4),
            "overhead": round(1 - on_median / off_median, 4),
            "ratios": [round(r, 4) for r in ratios]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--scrape-every", type=float, default=SCRAPE_EVERY_S,
                    help="seconds between scrapes of every node (the shipped config: 5)")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(measure(args.rounds, args.scrape_every)), indent=2))


if __name__ == "__main__":
    main()
