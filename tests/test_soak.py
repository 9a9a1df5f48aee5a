"""A 60-second soak with chaos on a 4-CPU cluster of real processes: every fault kind is
injected at least once, and nothing goes wrong — no stale access, no audit violation,
no hung call, no frame freed before its shootdown completed, every CPU rejoins."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.chaos import SOAK_KINDS
from services.launcher import mosquitto_binary

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_a_minute_of_chaos_on_four_cpus(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadgen", "load", "soak", "--duration", "60s", "--chaos",
         "--chaos-every", "2s", "--segment", "15s", "--cpus", "4", "--seed", "1",
         "--log-dir", str(tmp_path / "logs"), "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(report.read_text())
    r = doc["results"]
    assert doc["ok"] and doc["violations"] == []
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
    assert r["hung_calls"] == 0 and r["frames_freed_without_ack"] == 0
    assert r["audit_entries_checked"] > 0 and r["ops"] > 1000 and r["segments"] >= 3
    kinds = [k for k in SOAK_KINDS if k != "stop-broker" or mosquitto_binary()]
    assert {k: r["injected"].get(k, 0) >= 1 for k in kinds} == {k: True for k in kinds}
    assert r["rejoined"] == r["fenced_seen"] > 0
