"""Issue 4, points 1, 2 and 4: the shipped Prometheus files pass promtool; every live
scrape passes `promtool check metrics`; the dashboards pass the main rules of Grafana's
dashboard linter; and every query of every dashboard panel and alert rule returns data
from a real Prometheus scraping a real cluster under load."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common import prometheus
from services.common.policy import Policy
from tests.observability.conftest import Prometheus, requires_prometheus, sample_names, scrape

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROM = ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
RATE_FUNCS = re.compile(r"\b(rate|irate|increase|delta|idelta|deriv)\s*\(")
# What Grafana substitutes when every variable is "All" (allValue .+).
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$job": ".+", "$instance": ".+",
             "$cpu": ".+"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def panel_exprs() -> list[tuple[str, str, str]]:
    return [(d.name, p["title"], t["expr"]) for d in DASHBOARDS for p in panels(load(d))
            for t in p.get("targets", [])]


def rules() -> list[dict]:
    import yaml  # noqa: PLC0415 - only for reading rule files
    return [r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
            for r in g["rules"]]


def substitute(expr: str) -> str:
    for var, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown variable left in {expr}"
    return expr


def as_bool(expr: str) -> str:
    """An alert's expression with its threshold comparisons made `bool`, so it returns
    the measurement's series whether or not the alert would fire."""
    return re.sub(r"\)\s*(>=|<=|==|!=|>|<)\s*(-?[\d.]+)", r") \1 bool \2", expr)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(tlbsim_[a-z0-9_]+|up)\b(?=\s*[{\[)]|\s*$)", expr))


# --- point 1: promtool ------------------------------------------------------------------
def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


@requires_prometheus
def test_promtool_checks_the_shipped_config_and_rules():
    r = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert RULE_FILES
    r = promtool("check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


@requires_prometheus
def test_promtool_checks_the_config_tlbsim_up_generates(tmp_path):
    conf = tmp_path / prometheus.CONFIG_NAME
    conf.write_text(prometheus.config({"coordinator": 9100, "memory": 9101, "cpu0": 9102}))
    r = promtool("check", "config", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr


@requires_prometheus
async def test_promtool_finds_no_problem_in_a_live_scrape_of_each_service(cluster, exporters):
    await run(cluster.client, RunConfig("munmap", Policy(deadline_s=10.0), cpus=4, pages=64,
                                        rounds=2))
    assert set(exporters.ports) == {"coordinator", "memory", "cpu0", "cpu1", "cpu2", "cpu3"}
    for name, port in exporters.ports.items():
        text = scrape(port)
        assert "tlbsim_build_info" in text, name
        r = promtool("check", "metrics", stdin=text)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), \
            f"{name}: {r.stdout}{r.stderr}"


def test_histograms_use_log_buckets_from_1us_to_10s_and_names_follow_conventions():
    from prometheus_client.parser import text_string_to_metric_families
    from services.coordinator.service import CoordinatorNode
    from services.cpu.service import CpuNode
    from services.memory.service import MemoryNode
    from prometheus_client import generate_latest
    nodes = [CoordinatorNode(), MemoryNode("127.0.0.1:1"), CpuNode(0, "127.0.0.1:1", "127.0.0.1:1")]
    nodes[1].kernel.stats.fault_latency_s.append(3e-6)
    checked = 0
    for node in nodes:
        for family in text_string_to_metric_families(generate_latest(node.registry).decode()):
            assert family.name.startswith("tlbsim_"), family.name
            assert family.documentation, family.name
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
            assert family.type != "summary", family.name
            if family.type == "histogram" and family.name.endswith("_seconds"):
                les = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
                if not les:
                    continue  # a labelled histogram nothing observed yet
                checked += 1
                assert les[:3] == ["1e-06", "2.5e-06", "5e-06"] and les[-2:] == ["10.0", "+Inf"]
                assert len(set(les)) == 23, family.name
            for s in family.samples:
                for label in s.labels:
                    assert label not in {"vpn", "address", "pfn", "mm", "shootdown_id", "tid"}
    assert checked >= 5


def test_list_histogram_counts_each_observation_once_across_scrapes():
    from services.common.metrics import ListHistogram
    h, source = ListHistogram("x_seconds", "x", []), [2e-6, 0.3]
    h.update((), source)
    h.family()
    source += [(0.3, 4)]  # a weighted item: four frames waited 0.3 s
    h.update((), source)
    samples = {(s.name, s.labels.get("le")): s.value for s in h.family().samples}
    assert samples["x_seconds_count", None] == 6
    assert samples["x_seconds_bucket", "2.5e-06"] == 1
    assert samples["x_seconds_bucket", "0.25"] == 1 and samples["x_seconds_bucket", "0.5"] == 6
    assert samples["x_seconds_sum", None] == pytest.approx(2e-6 + 0.3 * 5)
    h.update((), [])  # the machine was reset: a new list, the series restarts
    assert {s.name: s.value for s in h.family().samples}["x_seconds_count"] == 0


# --- point 4: the dashboard linter's main rules -------------------------------------------
def test_dashboards_are_what_the_generator_writes():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build", GRAFANA / "build_dashboards.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    rendered = build.render()
    assert sorted(rendered) == [d.name for d in DASHBOARDS]
    for d in DASHBOARDS:
        assert d.read_text() == rendered[d.name], \
            f"{d.name} is stale: run python deploy/grafana/build_dashboards.py"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_passes_the_linter_rules(path):
    d = load(path)
    assert d["id"] is None and d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    tpl = {v["name"]: v for v in d["templating"]["list"]}
    # template-datasource-rule
    ds = tpl.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    # template-job-rule / template-instance-rule
    for name, query in (("job", "label_values(up, job)"),
                        ("instance", 'label_values(up{job=~"$job"}, instance)')):
        v = tpl.get(name)
        assert v and v["type"] == "query", name
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        assert v["query"]["query"] == query and v["multi"] and v["includeAll"], name
        assert v["allValue"] == ".+", name
    seen_ids = set()
    for p in panels(d):
        where = f"{path.name}: {p.get('title')!r}"
        assert p.get("title") and p.get("description"), where  # panel-title/description
        assert p["id"] not in seen_ids, f"{where}: duplicate panel id {p['id']}"
        seen_ids.add(p["id"])
        if p["type"] == "row":
            continue
        assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"  # panel-units
        # panel-datasource-rule: the datasource variable, never a fixed name
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["targets"], where
        for t in p["targets"]:
            expr = t["expr"]
            assert t.get("datasource", p["datasource"]) == p["datasource"], where
            # target-rate-interval-rule: every range of a rate-like function
            for m in RATE_FUNCS.finditer(expr):
                rng = re.match(r"[^\[]*\[([^\]]+)\]", expr[m.end():])
                assert rng and rng.group(1) == "$__rate_interval", f"{where}: {expr}"
            # target-job-rule / target-instance-rule: every selector is filtered
            for selector in re.findall(r"\b(?:tlbsim_[a-z0-9_]+|up)\{([^}]*)\}", expr):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, \
                    f"{where}: {expr}"
            assert not re.search(r"\btlbsim_[a-z0-9_]+(?![a-z0-9_{])", expr), \
                f"{where}: unfiltered selector in {expr}"
            # histogram_quantile over sum by (le, ...) (aggregation-rule)
            for m in re.finditer(r"histogram_quantile\(\s*[\d.]+\s*,\s*(\w+)\s*(by\s*\(([^)]*)\))?",
                                 expr):
                assert m.group(1) == "sum" and "le" in [x.strip() for x in
                                                       (m.group(3) or "").split(",")], \
                    f"{where}: {expr}"
    if path.name == "tlbsim-cpu.json":
        assert tpl["cpu"]["query"]["query"].startswith("label_values(tlbsim_tlb_lookups_total")


def test_the_linter_test_catches_a_bad_panel(tmp_path):
    """The rules above fail on a panel with a fixed interval, no unit and a fixed datasource."""
    d = load(DASHBOARDS[0])
    p = next(p for p in d["panels"] if "$__rate_interval" in p["targets"][0]["expr"])
    p["targets"][0]["expr"] = p["targets"][0]["expr"].replace("$__rate_interval", "5m")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(AssertionError, match="rate"):
        test_dashboard_passes_the_linter_rules(bad)
    del p["fieldConfig"]["defaults"]["unit"]
    bad.write_text(json.dumps(d))
    with pytest.raises(AssertionError, match="no unit"):
        test_dashboard_passes_the_linter_rules(bad)


# Issue 20's panels, and the metrics each must show > 0 after the live test's runs
# (the MQTT and redelivery panels: tests/observability/test_delivery_metrics.py).
ISSUE_20_PANELS = {
    "Shootdowns/s by transport": True, "IPIs/s per target CPU": True, "Fault latency": True,
    "munmap latency": True, "Lock hold p99 by class": True, "Lock-order inversions": True,
    "Reclaim and swap/s": True, "Frames free and used": True, "Frames pending free": False,
    "Frames freed before their flush": False, "Audit violations": False,
    "MQTT fallbacks and gRPC-only shootdowns/s": False, "MQTT broker down": False,
    "Redeliveries and unknown targets/s": False,
    # Issue 16: virtual time (the live test's last run is a virtual one).
    "Virtual time per CPU": True, "Virtual throughput": True,
}


def test_overview_has_the_panels_the_issues_list():
    d = load(GRAFANA / "dashboards" / "tlbsim-overview.json")
    titles = {p["title"]: p for p in panels(d)}
    for t in ("Stale accesses", "Shootdowns/s by reason", "IPIs/s by transport",
              "Shootdown latency by transport", "Pages per shootdown", "TLB hit rate per CPU",
              "Faults/s by kind", "Lock wait p99 by class", *ISSUE_20_PANELS):
        assert t in titles, t
    for t in ("Stale accesses", "Frames freed before their flush", "Audit violations",
              "Lock-order inversions"):
        assert titles[t]["type"] == "stat", t
        steps = titles[t]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["color"] for s in steps] == ["green", "red"], t
    # Free frames (millions) and frames pending free (a handful) have an axis each.
    assert [t["expr"] for t in titles["Frames pending free"]["targets"]] == [
        'sum(tlbsim_frames_pending_free{job=~"$job",instance=~"$instance"})']
    # Firing alerts are marked on every panel of both dashboards.
    for path in DASHBOARDS:
        (note,) = load(path)["annotations"]["list"]
        assert note["enable"] and note["expr"].startswith('ALERTS{alertstate="firing"'), path
    assert "IPIs received/s" in {p["title"] for p in panels(
        load(GRAFANA / "dashboards" / "tlbsim-cpu.json"))}


def test_provisioning_refers_to_the_datasource_uid_and_dashboard_dir():
    import yaml
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus" and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tlbsim.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    uids = [load(d)["uid"] for d in DASHBOARDS]
    assert len(uids) == len(set(uids))


# --- point 2: every query returns data from a live cluster ---------------------------------
@requires_prometheus
@pytest.mark.slow
async def test_every_dashboard_and_alert_query_returns_data_on_a_live_cluster(
        cluster, exporters, prom):
    await prom.wait_scraped(len(exporters.ports))
    policy = Policy(deadline_s=10.0)
    await run(cluster.client, RunConfig("fault-scaling", policy, cpus=4, pages=64, rounds=2))
    await prom.wait_scraped(len(exporters.ports))  # each run's counts, before a reset
    await run(cluster.client, RunConfig("shared-write", Policy(
        deadline_s=10.0, fork="share", lock="lock-all-sharers-unordered"), cpus=4, pages=8,
        rounds=1, resident=1024))
    await prom.wait_scraped(len(exporters.ports))
    await run(cluster.client, RunConfig("swapout", Policy(
        deadline_s=10.0, fork="share", frames=2048), cpus=4, pages=512, rounds=1,
        resident=1536, children=1))
    await prom.wait_scraped(len(exporters.ports))
    await run(cluster.client, RunConfig("munmap", policy, cpus=4, pages=64, rounds=3))
    await prom.wait_scraped(len(exporters.ports))
    # Last, so that the virtual clocks are what the CPUs show when the queries run.
    await run(cluster.client, RunConfig("munmap", Policy(deadline_s=10.0, timing="virtual"),
                                        cpus=4, pages=64, rounds=1))
    await prom.wait_scraped(len(exporters.ports))

    live = set().union(*(sample_names(scrape(p)) for p in exporters.ports.values()))
    live.add("up")
    empty, missing = [], []
    for dash, title, expr in panel_exprs():
        missing += [(dash, title, n) for n in metric_names(expr) if n not in live]
        if not prom.query(substitute(expr)):
            empty.append((dash, title, expr))
    for r in rules():
        expr = as_bool(r["expr"])
        missing += [("rules", r["alert"], n) for n in metric_names(expr) if n not in live]
        if not prom.query(expr):
            empty.append(("rules", r["alert"], expr))
    assert not missing, f"metrics not in a live scrape: {missing}"
    assert not empty, "queries with no data:\n" + "\n".join(map(str, empty))
    assert len(panel_exprs()) > 30

    loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules()}
    assert all(r["health"] == "ok" for r in loaded), loaded
    # The data is live: the overview's shootdown rate and hit rate are positive.
    shootdowns = prom.query(substitute(
        'sum(rate(tlbsim_shootdowns_total{job=~"$job"}[$__rate_interval]))'))
    assert float(shootdowns[0]["value"][1]) > 0
    # Issue 20's panels show what the runs did: every target of each is above 0.
    overview = {p["title"]: p for p in panels(load(GRAFANA / "dashboards" /
                                                    "tlbsim-overview.json"))}
    zero = []
    for title, positive in ISSUE_20_PANELS.items():
        for t in overview[title]["targets"] if positive else []:
            values = [float(r["value"][1]) for r in prom.query(substitute(t["expr"]))]
            if not values or max(values) <= 0:
                zero.append((title, t["legendFormat"], values))
    assert not zero, zero
    per_cpu = prom.query(substitute(overview["IPIs/s per target CPU"]["targets"][0]["expr"]))
    assert {r["metric"]["cpu"] for r in per_cpu if float(r["value"][1]) > 0} >= {"1", "2", "3"}
    firing = [a for a in prom.alerts() if a["labels"]["alertname"] == "TlbsimStaleAccess"]
    assert not firing, firing


@requires_prometheus
async def test_compose_relabelling_names_the_node_of_a_cpu_found_by_dns(exporters, tmp_path):
    """prometheus-compose.yml finds CPUs by DNS (one A record each), which names no
    container: its relabelling, run by a real Prometheus on a target carrying what DNS
    discovery gives (`__meta_dns_name: cpus` and an address), sets `service` and `node`
    (the TlbsimServiceDown summary), and leaves the static targets' labels alone."""
    import yaml
    conf = yaml.safe_load((PROM / "prometheus-compose.yml").read_text())
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "tlbsim")
    discovered = tmp_path / "targets.json"
    discovered.write_text(json.dumps([
        {"targets": [f"127.0.0.1:{exporters.ports['cpu1']}"],
         "labels": {"__meta_dns_name": "cpus"}},
        {"targets": [f"127.0.0.1:{exporters.ports['memory']}"],
         "labels": {"service": "memory", "node": "memory"}}]))
    config = json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "tlbsim", "relabel_configs": job["relabel_configs"],
                            "file_sd_configs": [{"files": [str(discovered)]}]}]})
    prom = Prometheus(exporters.ports, tmp_path, config=config)
    try:
        await prom.wait_scraped(2)
        labels = {r["metric"]["service"]: r["metric"]["node"]
                  for r in prom.query('up{job="tlbsim"}')}
    finally:
        prom.stop()
    assert labels == {"cpu": "cpu@127.0.0.1", "memory": "memory"}
