"""A real cluster (in process, real gRPC on port 0), each service's registry served over
HTTP as `tlbsim serve --metrics-port` does, and a real Prometheus binary scraping it
with the shipped alert rules."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from services.common import prometheus
from services.launcher import free_port
from tests.harness import InProcessCluster

SCRAPE_S = 1  # the tests' scrape and rule-evaluation interval

requires_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package (prometheus, promtool) is not installed; "
           "tools/setup-debian.sh installs it")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


class Exporters:
    """Every node's registry on its own loopback metrics port."""

    def __init__(self, cluster: InProcessCluster):
        self.servers = []
        self.ports: dict[str, int] = {}
        nodes = {"coordinator": cluster.coordinator, "memory": cluster.memory,
                 **{f"cpu{i}": s for i, s in cluster.cpus.items()}}
        for name, running in nodes.items():
            server, thread = start_http_server(0, addr="127.0.0.1",
                                               registry=running.node.registry)
            self.servers.append((server, thread))
            self.ports[name] = server.server_port

    def close(self) -> None:
        for server, thread in self.servers:
            server.shutdown()
            server.server_close()
            thread.join(5)


class Prometheus:
    """Debian's prometheus on a free port; the HTTP API as plain functions."""

    def __init__(self, metrics_ports: dict[str, int], workdir: Path, config: str | None = None):
        """`config`: a whole prometheus.yml instead of tlbsim up's for these ports."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = workdir / prometheus.CONFIG_NAME
        conf.write_text(config or prometheus.config(
            metrics_ports, scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s"))
        self.config_file = conf
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            prometheus.command(prometheus.binary(), conf, workdir / "data", self.port),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        if not prometheus.wait_ready(self.url, time.monotonic() + 30,
                                     lambda: self.proc.poll() is None):
            self.stop()
            raise RuntimeError(f"prometheus did not become ready; log {workdir}/prometheus.log")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    async def wait_scraped(self, targets: int, timeout: float = 30) -> None:
        """Until every target has been scraped successfully at least twice since now."""
        since = time.time()
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            active = self.api("targets")["activeTargets"]
            fresh = [t for t in active if t["health"] == "up" and
                     _epoch(t["lastScrape"]) > since + SCRAPE_S]
            if len(fresh) >= targets:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"prometheus did not scrape all {targets} targets: "
                             f"{self.api('targets')['activeTargets']}")


def _epoch(rfc3339: str) -> float:
    # "2025-11-26T01:58:59.123456789Z" -> seconds; nanoseconds trimmed for strptime.
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", rfc3339)
    if not m:
        return 0.0
    from datetime import datetime
    base = datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
    return base.timestamp() + float(m.group(2) or 0)


@pytest.fixture
async def exporters(cluster):
    e = Exporters(cluster)
    yield e
    e.close()


@pytest.fixture
def prom(exporters, tmp_path):
    p = Prometheus(exporters.ports, tmp_path)
    yield p
    p.stop()
