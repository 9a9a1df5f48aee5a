"""A local Prometheus for a local cluster: the scrape config for its metrics ports and
the shipped alert rules, and the command line of Debian's `prometheus` binary.
Used by `tlbsim up --prometheus` and by the observability tests."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Mapping

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "tlbsim.rules.yml"
CONFIG_NAME = "tlbsim-prometheus.yml"  # also how `tlbsim down` recognises our Prometheus
JOB = "tlbsim"


def binary() -> str | None:
    return shutil.which("prometheus")


def service_of(name: str) -> str:
    """cpu3 -> cpu; coordinator -> coordinator."""
    return name.rstrip("0123456789")


def config(metrics: Mapping[str, int], *, host: str = "127.0.0.1", scrape_interval: str = "5s",
           evaluation_interval: str = "5s", rules: Path = RULES) -> str:
    """prometheus.yml for services at host:port, one target each, labelled by service
    (JSON is YAML, so no YAML library is needed)."""
    targets = [{"targets": [f"{host}:{port}"],
                "labels": {"service": service_of(name), "node": name}}
               for name, port in sorted(metrics.items())]
    doc = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval,
                   "scrape_timeout": scrape_interval},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": JOB, "static_configs": targets}],
    }
    return json.dumps(doc, indent=2) + "\n"


def command(prometheus: str, config_file: Path, data_dir: Path, port: int,
            host: str = "127.0.0.1") -> list[str]:
    return [prometheus, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address={host}:{port}", "--storage.tsdb.retention.time=1d",
            "--log.level=warn"]


def ready(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(url: str, deadline: float, alive=lambda: True) -> bool:
    """Poll /-/ready until the deadline (time.monotonic()) or until alive() is False."""
    while time.monotonic() < deadline and alive():
        if ready(url):
            return True
        time.sleep(0.05)
    return False
