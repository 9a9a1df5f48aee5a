"""`load compare`: the A/B table, its JSON and CSV, sweeps, and the PNG plot (issue 5)."""

import argparse
import csv
import json
import struct

import pytest

from loadgen import output
from loadgen.cli.options import add_policy_options, add_workload_options, config_from
from loadgen.cli.load import apply_overrides
from loadgen.compare import Side, compare, disagrees, summarize, sweep, write_csv
from loadgen.metrics import metric, ratio_text, spread_text
from loadgen.plot import plot_compare, plot_report
from loadgen.scenarios import RunConfig
from services.common.errors import InvalidArgument
from services.common.policy import Policy

PNG = b"\x89PNG\r\n\x1a\n"
CONFIG = RunConfig("munmap", Policy(), cpus=4, pages=16, rounds=2).as_dict()


def side(label, spec, **kw) -> Side:
    policy = {k: kw.pop(k) for k in list(kw) if k in Policy.__dataclass_fields__}
    return Side(label, spec, RunConfig("munmap", Policy(deadline_s=10.0, **policy), cpus=4,
                                       pages=16, rounds=2, **kw))


def check_png(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100 and len(data) > 5000
    return width, height


async def test_compare_per_page_vs_gather(cluster, tmp_path):
    result = await compare(cluster.client, side("A", "flush=per-page", flush="per-page"),
                           side("B", "flush=gather"), repeat=2)
    assert result["pairs"] == 2 and not result["interrupted"] and not result["unsafe"]
    assert [r["config"]["flush"] for r in result["a"]["reports"]] == ["per-page"] * 2
    rows = {row["metric"]: row for row in result["metrics"]}
    # Per page: 16 shootdowns a munmap (the last also covers the freed tables); gathered:
    # 1. Each to the 3 other CPUs.
    assert rows["ipis"]["a"] == 2 * 16 * 3 and rows["ipis"]["b"] == 2 * 3
    assert rows["ipis"]["ratio"] == pytest.approx(1 / 16)
    assert rows["ipis"]["ratio_min"] == rows["ipis"]["ratio_max"] == pytest.approx(1 / 16)
    assert rows["stale_accesses"]["a"] == rows["stale_accesses"]["b"] == 0
    assert rows["munmap_latency_ms.p50"]["ratio"] < 1

    # The JSON document is plain JSON and holds every run's full report.
    path = tmp_path / "c.json"
    output.write_json(result, str(path))
    back = json.loads(path.read_text())
    assert back["kind"] == "compare" and len(back["b"]["reports"]) == 2
    assert back["a"]["reports"][0]["results"]["shootdowns"] == 2 * 16

    # The table shows each metric with A, B and the ratio.
    with output.console.capture() as cap:
        output.print_compare(result)
    text = cap.get()
    assert "IPIs" in text and "1/16" in text and "flush=per-page" in text
    assert "2 alternating pairs" in text
    # The headline comes first, labelled with units; the hit rate is a percentage.
    lines = [line for line in text.splitlines() if "│" in line]
    assert lines[0].split("│")[1].strip() == "shootdowns"
    assert "munmap latency p50 (ms)" in text and "%" in text

    csv_path = tmp_path / "c.csv"
    write_csv(result, str(csv_path))
    rows_csv = list(csv.DictReader(csv_path.open()))
    assert [r["side"] for r in rows_csv] == ["A", "A", "B", "B"]
    assert {r["ipis"] for r in rows_csv} == {str(float(16 * 3 * 2)), str(float(3 * 2))}

    png = tmp_path / "c.png"
    plot_compare(result, str(png))
    check_png(png)


async def test_sweep_produces_a_series(cluster, tmp_path):
    def sides(value):
        return (side("A", "flush=per-page", flush="per-page", readers=False),
                side("B", "flush=gather", readers=False))

    def at(value):
        a, b = sides(value)
        a.cfg.pages = b.cfg.pages = int(value)
        return a, b

    result = await sweep(cluster.client, "pages", ["1", "8"], at, repeat=1)
    assert [p["value"] for p in result["points"]] == ["1", "8"]
    ipis = [{row["metric"]: row for row in p["metrics"]}["ipis"] for p in result["points"]]
    assert [row["a"] for row in ipis] == [2 * 1 * 3, 2 * 8 * 3]  # one per page
    assert [row["b"] for row in ipis] == [2 * 3, 2 * 3]
    with output.console.capture() as cap:
        output.print_sweep(result)
    text = " ".join(cap.get().split())
    # One table per headline metric, each titled with its name, never a raw key.
    assert "IPIs (flush deliveries)" in text and "munmap latency p50 (ms)" in text
    assert "munmap_lat" not in text and "1 alternating pair per value" in text
    assert "1, 8 pages" in text  # the caption names the swept values
    csv_path = tmp_path / "s.csv"
    write_csv(result, str(csv_path))
    assert [r["sweep_value"] for r in csv.DictReader(csv_path.open())] == ["1", "1", "8", "8"]
    png = tmp_path / "s.png"
    plot_compare(result, str(png))
    check_png(png)


async def test_single_report_plot(cluster, tmp_path):
    from loadgen.runner import run
    report = await run(cluster.client, side("A", "").cfg)
    assert report["samples"]["munmap_latency_ms"] and report["samples"]["fault_latency_ms"]
    png = tmp_path / "r.png"
    plot_report(report, str(png))
    check_png(png)


def test_summary_ratio_is_the_median_of_pairs():
    reps = lambda *xs: [{"results": {"ipis": x}} for x in xs]  # noqa: E731
    ipis = [metric("ipis")]
    (row,) = summarize(reps(10, 20, 40), reps(5, 20, 10), ipis)
    assert row["a"] == 20 and row["b"] == 10
    assert row["ratio"] == 0.5 and row["ratio_min"] == 0.25 and row["ratio_max"] == 1.0
    assert row["ratio_of_medians"] == 0.5 and not disagrees(row)
    (row,) = summarize(reps(0), reps(0), ipis, first=1)
    assert row["ratio"] is None  # no ratio of zeros
    assert summarize(reps(0), reps(0), ipis) == []  # all zero and not a headline: left out
    safe = [{"results": {"stale_accesses": 0}}]
    (row,) = summarize(safe, safe, [metric("stale_accesses")])
    assert row["a"] == 0  # a safety count is shown at 0


def test_a_ratio_of_medians_that_contradicts_the_pairs_is_flagged():
    """The issue's case: medians A 62.3 ms, B 48.1 ms, and a median pair ratio of 2.19x.
    The table marks the row and says why the two differ."""
    reps = lambda *xs: [{"results": {"munmap_latency_ms": {"p50": x}}} for x in xs]  # noqa
    (row,) = summarize(reps(1.0, 62.3, 100.0), reps(48.1, 136.4, 10.0),
                       [metric("munmap_latency_ms.p50")])
    assert row["a"] == 62.3 and row["b"] == 48.1
    assert row["ratio"] == pytest.approx(2.19, abs=0.01) and row["ratio_of_medians"] < 1
    assert disagrees(row)
    result = {"scenario": "munmap", "pairs": 3, "metrics": [row],
              "a": {"spec": "x", "config": CONFIG, "reports": []},
              "b": {"spec": "y", "config": CONFIG, "reports": []}}
    with output.console.capture() as cap:
        output.print_compare(result)
    text = cap.get()
    assert "2.19x*" in text and "the median of the pair ratios and the ratio of the " \
        "medians disagree" in " ".join(text.split())


def test_ratios_read_as_factors_and_fractions():
    assert ratio_text(2.1875) == "2.19x" and ratio_text(0.977) == "0.977x"
    assert ratio_text(1 / 16) == "1/16" and ratio_text(1 / 4.5) == "1/4.5"
    assert ratio_text(None) == "-" and spread_text(2.0, 2.0) == ""
    assert spread_text(1 / 134, 1 / 101) == "1/134–1/101"
    assert metric("tlb_hit_rate").text(0.106) == "10.60%"  # run and compare alike
    assert metric("ipis").text(7680.0) == "7,680" and metric("x").text(0.0456) == "0.0456"


def parser():
    p = argparse.ArgumentParser()
    add_workload_options(p)
    add_policy_options(p)
    return p


def test_overrides_are_typed_and_checked():
    p = parser()
    base = p.parse_args([])
    args = apply_overrides(p, base, "flush=per-page, cpus=2,lazy-tlb=off")
    assert args.flush == "per-page" and args.cpus == 2 and args.lazy_tlb == "off"
    assert base.flush == "gather"  # the base is not changed
    cfg = config_from(args, "munmap")
    assert cfg.policy.flush == "per-page" and cfg.cpus == 2 and not cfg.policy.lazy_tlb
    for bad in ("flush=sometimes", "cpus=two", "colour=red", "flush"):
        with pytest.raises(InvalidArgument):
            apply_overrides(p, base, bad)
