"""Every scenario with only its defaults (issue 19): `tlbsim load run SCENARIO` exits 0,
is safe, and its headline number is not trivial — the defaults measure something; and
the printed table shows that headline first, with the values of the JSON (issue 20)."""
import asyncio
import json
import os
import re

import pytest

from loadgen import output
from loadgen.cli.options import SCENARIO_DEFAULTS
from loadgen.output import key_row
from loadgen.scenarios import HEADLINES, LABELS, SCENARIOS
from loadgen.cli.main import main
from tests.harness import InProcessCluster

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "traces")

# What each scenario's defaults must show (results of the JSON report).
HEADLINE = {
    "munmap": lambda r: r["shootdowns"] == r["rounds"] == 3 and r["ipis"] >= 3 * 3,
    "tlb-flush": lambda r: r["madvise_per_s"] > 0 and r["shootdowns"] == 4 * 16 * 2,
    "fault-scaling": lambda r: r["faulting_faults_per_s"] > 0 and r["shootdowns"] > 0,
    # Every thread faults its own table, one round each: cpus x pages faults.
    "fault-storm": lambda r: r["faulting_faults_per_s"] > 0 and r["faults"] == 4 * 64 * 3,
    "mprotect": lambda r: r["syscalls"]["mprotect"] > 0 and r["shootdowns"] > 0
    and r["full_flushes"] == 0,  # 16-page chunks: ranged flushes
    "mixed": lambda r: r["ops"] > 0 and r["shootdowns"] > 0,
    "fork": lambda r: r["pte_tables_allocated"] > 0 and r["fork_latency_ms"]["p50"] > 0,
    "shared-write": lambda r: r["unshares"] > 0,
    "swapout": lambda r: r["reclaimed_pages"] > 0 and r["reclaim_ipis"] > 0,
    "flush-ceiling": lambda r: r["shootdowns"] - r["full_flushes"] > 0,  # some ranged
    "replay": lambda r: sum(r["replay"]["replayed"].values()) > 0 and r["faults"] > 0,
}


def test_every_scenario_has_a_headline_and_its_own_defaults():
    assert set(HEADLINE) == set(SCENARIOS) == set(SCENARIO_DEFAULTS)


def test_every_headline_names_a_metric_the_reports_have():
    for scenario, keys in HEADLINES.items():
        assert keys and set(LABELS[scenario]) <= set(keys) | {"munmap_latency_ms"}, scenario


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_defaults_run_safely_and_measure_something(scenario, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(output.console, "width", 160)  # no wrapped cells
    out = tmp_path / "r.json"
    async with InProcessCluster(cpus=4) as c:
        argv = ["load", "run", scenario, "--cluster", c.coordinator.address, "--json", str(out)]
        if scenario == "replay":  # a trace is the one thing it cannot default
            argv = ["load", "replay", os.path.join(FIXTURES, "ls-accesses.tlbt.gz"),
                    "--cluster", c.coordinator.address, "--json", str(out)]
        code = await asyncio.to_thread(main, argv)  # the command itself, beside the cluster
    report = json.loads(out.read_text())
    r = report["results"]
    assert code == 0, (r["stale_accesses"], r["audit_violations"], report["violations"])
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
    assert HEADLINE[scenario](r), r
    assert report["config"]["rounds"] == SCENARIO_DEFAULTS[scenario].get("rounds", 3)

    # The table: its headline block comes first and holds every headline metric with
    # the report's value; the title names what the scenario ran with.
    table = capsys.readouterr().out
    title, _, rest = table.partition("headline")
    first_block = rest.partition("the run")[0]
    assert first_block and "safety" in rest
    title = " ".join(title.split())  # the title wraps to the table's width
    for key in HEADLINES[scenario]:
        label, value = key_row(r, key, LABELS[scenario].get(key))
        # The row whose label cell is exactly the label ("reclaim IPIs" is also the start
        # of "reclaim IPIs per reclaimed page").
        line = next((x for x in first_block.splitlines()
                     if re.search(rf"│\s+{re.escape(label)}\s+│", x)), None)
        assert line is not None and value in line, (key, label, value, first_block)
    cfg = report["config"]
    if scenario in ("fork", "shared-write", "swapout"):
        assert f"{cfg['resident']:,} resident pages" in title, title
    if scenario == "fork":
        assert " pages," not in title.replace("resident pages", "")  # fork maps no --pages
    if scenario == "replay":
        assert "ls-accesses.tlbt.gz" in title
