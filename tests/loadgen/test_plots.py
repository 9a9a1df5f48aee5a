"""The figures of `--plot` (issue 20), read back from matplotlib's own objects: labelled
axes with units, log where values span decades, a numeric x for sweeps, step CDFs, the
ratio and its spread, the configuration in the caption. Built from reports made here,
so each expectation is exact (tests/loadgen/test_compare.py plots real runs)."""
import matplotlib.pyplot as plt
import pytest

from loadgen.compare import compared, summarize
from loadgen.plot import MIN_CDF, compare_figure, report_figure, sweep_figure
from loadgen.scenarios import RunConfig, headline
from services.common.policy import Policy


def run_report(cfg: RunConfig, munmap_ms: list[float], **results) -> dict:
    r = {"shootdowns": 0, "ipis": 0, "stale_accesses": 0, "audit_violations": 0,
         "munmap_latency_ms": {"p50": sorted(munmap_ms)[len(munmap_ms) // 2],
                               "p99": max(munmap_ms)}}
    r.update(results)
    return {"config": cfg.as_dict(), "results": r,
            "samples": {"munmap_latency_ms": sorted(munmap_ms), "fault_latency_ms": []}}


def compare_result(a: list[dict], b: list[dict], scenario: str = "munmap",
                   specs=("flush=per-page", "flush=gather")) -> dict:
    rows = summarize(a, b, compared(scenario), first=len(headline(scenario)))
    return {"kind": "compare", "scenario": scenario, "pairs": len(a), "metrics": rows,
            "a": {"spec": specs[0], "config": a[0]["config"], "reports": a},
            "b": {"spec": specs[1], "config": b[0]["config"], "reports": b}}


def per_page_vs_gather(munmaps: int = 5, pages: int = 512) -> dict:
    a_cfg = RunConfig("munmap", Policy(flush="per-page"), pages=pages, rounds=munmaps)
    b_cfg = RunConfig("munmap", Policy(), pages=pages, rounds=munmaps)
    a = [run_report(a_cfg, [1500.0 + 10 * i + j for j in range(munmaps)],
                    shootdowns=pages * munmaps, ipis=3 * pages * munmaps) for i in range(3)]
    b = [run_report(b_cfg, [15.0 + i + j for j in range(munmaps)], shootdowns=munmaps,
                    ipis=3 * munmaps) for i in range(3)]
    return compare_result(a, b)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def text_of(fig) -> str:
    return " ".join(" ".join(t.get_text() for t in [*fig.texts, *(
        a for ax in fig.axes for a in ax.texts)]).split())


def test_a_comparison_has_a_panel_per_headline_metric_and_step_cdfs():
    fig = compare_figure(per_page_vs_gather())
    panels = axes_by_title(fig)
    assert list(panels) == ["shootdowns", "IPIs (flush deliveries)", "munmap latency"]
    ipis = panels["IPIs (flush deliveries)"]
    assert ipis.get_yscale() == "log"  # 7,680 against 15: a linear axis flattens B to 0
    assert panels["munmap latency"].get_ylabel() == "munmap latency (ms)"
    assert [t.get_text() for t in ipis.get_xticklabels()] == ["A", "B"]
    assert not ipis.get_legend()  # nothing drawn over the data
    (cdf,) = [ax for ax in fig.axes if ax.get_xlabel() == "munmap latency (ms)"]
    lines = cdf.get_lines()
    assert len(lines) == 2 and all(ln.get_drawstyle().startswith("steps") for ln in lines)
    assert cdf.get_xscale() == "log" and "(n=15)" in cdf.get_legend().get_texts()[0].get_text()
    text = text_of(fig)
    assert "B/A 1/512" in text  # under the IPIs panel: the ratio, every pair the same
    assert "A: 4 CPUs, 512 pages, 5 rounds; flush=per-page lock=split transport=grpc" in text
    assert "3 alternating pairs" in text and "median of the pair ratios" in text


def test_a_spread_is_drawn_and_a_cdf_needs_enough_samples():
    fig = compare_figure(per_page_vs_gather(munmaps=1))
    text = text_of(fig)
    assert "B/A 1/" in text and "(1/" in text  # the munmap latency ratio varies: a spread
    assert all(ax.get_xlabel() != "munmap latency (ms)" for ax in fig.axes)  # 3 < MIN_CDF
    assert MIN_CDF > 3


def sweep_result(scenario: str, key: str, values: list, measure) -> dict:
    points = []
    for v in values:
        sides = []
        for flush in ("per-page", "gather"):
            cfg = RunConfig(scenario, Policy(flush=flush), pages=int(v), rounds=2)
            sides.append([run_report(cfg, [10.0, 11.0], **measure(flush, int(v)))])
        points.append({"value": str(v), **compare_result(*sides, scenario=scenario)})
    return {"kind": "sweep", "scenario": scenario, "key": key,
            "values": [str(v) for v in values], "points": points,
            "a_spec": "flush=per-page", "b_spec": "flush=gather"}


def test_a_sweep_has_a_numeric_x_and_a_ratio_panel_under_each_metric():
    result = sweep_result("munmap", "pages", [1, 8, 64, 512], lambda flush, pages: {
        "ipis": 3 * 2 * (pages if flush == "per-page" else 1),
        "shootdowns": 2 * (pages if flush == "per-page" else 1)})
    fig = sweep_figure(result)
    top = axes_by_title(fig)["IPIs (flush deliveries)"]
    assert top.get_yscale() == "log"  # 6 to 3,072
    ratio = next(ax for ax in fig.axes if ax.get_ylabel() == "B/A"
                 and ax.get_subplotspec().colspan == top.get_subplotspec().colspan)
    assert ratio.get_xscale() == "log" and list(ratio.get_xticks()) == [1, 8, 64, 512]
    (b_over_a, *_) = ratio.get_lines()
    assert list(b_over_a.get_ydata()) == pytest.approx([1, 1 / 8, 1 / 64, 1 / 512])
    assert "A: 4 CPUs, 1, 8, 64, 512 pages, 2 rounds;" in text_of(fig)


def test_close_values_keep_their_distances_on_the_x_axis():
    """flush-ceiling's crossover sweep: 16, 32, 34, 35, 36, 48 at their values, not six
    evenly spaced categories; labels that would overlap are left blank."""
    values = [16, 32, 34, 35, 36, 48]
    result = sweep_result("munmap", "pages", values, lambda flush, pages: {
        "ipis": pages * 3, "shootdowns": pages})
    fig = sweep_figure(result)
    ratio = next(ax for ax in fig.axes if ax.get_ylabel() == "B/A")
    assert ratio.get_xscale() == "linear" and list(ratio.get_xticks()) == values
    labels = [t.get_text() for t in ratio.get_xticklabels()]
    assert labels[0] == "16" and labels[-1] == "48" and "" in labels


def test_a_single_run_plot_names_its_trace_and_says_what_it_cannot_show():
    cfg = RunConfig("replay", Policy(), trace="/somewhere/ls-accesses.tlbt.gz", rounds=1)
    rep = run_report(cfg, [1.0] * 8, replay={"command": ["/bin/ls", "/"], "access_pages": 9,
                                             "address_spaces_on_several_cpus": 0})
    for key in ("ops", "duration_s", "rounds", "full_flushes", "pages_freed", "faults",
                "faults_per_s", "tlb_hit_rate", "frames_freed_without_ack",
                "deadline_misses"):
        rep["results"].setdefault(key, 0)
    rep["scenario"] = "replay"
    fig = report_figure(rep)
    assert fig._suptitle.get_text() == "replay of ls-accesses.tlbt.gz (/bin/ls /)"
    assert "IPIs are 0 whatever the policy" in text_of(fig)
    (cdf,) = [ax for ax in fig.axes if ax.get_xlabel()]
    assert cdf.get_xlabel() == "munmap / madvise latency (ms)"
