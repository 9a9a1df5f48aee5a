"""`--plot PATH.png`: figures laid out for a paper (matplotlib, no display).

- compare: one panel per headline metric of the scenario (the median of each side as a
  bar, every run as a dot, B/A with its spread above), and step CDFs of every latency
  sample the runs kept;
- sweep: per headline metric the medians of A and B against the swept value (a numeric
  axis; error bars from the fastest to the slowest run), and under it B/A (the median of
  the pair ratios, shaded from its smallest to its largest);
- one run: step CDFs of its latency samples and its headline numbers.

Axes carry the metric's name and unit (loadgen/metrics.py); an axis is logarithmic when
its values span more than SPAN_FOR_LOG; the caption holds the configuration.
"""
from __future__ import annotations

import statistics
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import (FuncFormatter, LogLocator, MaxNLocator,  # noqa: E402
                               NullFormatter, NullLocator)

from loadgen.metrics import LATENCIES, Metric, number, ratio_text, spread_text  # noqa: E402
from loadgen.scenarios import HEADLINES, LABELS, headline  # noqa: E402

SPAN_FOR_LOG = 20  # max/min of the positive values above which an axis is logarithmic
COLORS = {"A": "#1f77b4", "B": "#d62728"}  # matplotlib's blue and red: apart in greyscale too
SAMPLE_KEYS = ("munmap_latency_ms", "fault_latency_ms")  # the report's `samples`
MIN_CDF = 5  # samples a side needs for its CDF to say more than the p50 and p99 do
DPI = 120
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
                     "axes.spines.right": False})


# --- helpers ----------------------------------------------------------------------------
def _log_worthy(values) -> bool:
    pos = [v for v in values if v is not None and v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) > SPAN_FOR_LOG \
        and all(v is None or v > 0 for v in values)


def _plain_ticks(ax, axis: str = "y") -> None:
    """Ticks as plain numbers with thousands separators (1, 10, 1,000, 0.01), not 10^k;
    a log axis spanning less than two decades also gets its 2s and 5s."""
    which = getattr(ax, f"{axis}axis")
    if which.get_scale() == "log":
        lo, hi = sorted(getattr(ax, f"get_{axis}lim")())
        if lo > 0 and hi / lo < 100:
            which.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    which.set_major_formatter(FuncFormatter(lambda v, _pos: number(v) if v else "0"))
    which.set_minor_formatter(NullFormatter())


def _samples(reports: list[dict], key: str) -> list[float]:
    return [x for r in reports for x in r.get("samples", {}).get(key, [])]


def _title(scenario: str, reports: list[dict]) -> str:
    from loadgen.output import named
    return named(scenario, reports)


def _notes(reports: list[dict]) -> list[str]:
    from loadgen.output import trace_notes
    return trace_notes(reports[0]["results"].get("replay") if reports else None)


def _caption(fig, lines: list[str]) -> None:
    """The configuration under the figure, wrapped to its width."""
    width = int(fig.get_figwidth() * 14)
    text = "\n".join(textwrap.fill(line, width) for line in lines)
    fig.text(0.01, 0.005, text, ha="left", va="bottom", fontsize=8, color="#333333")


def _layout(fig, caption_lines: int) -> None:
    bottom = min(0.45, (0.15 + 0.14 * caption_lines) / fig.get_figheight())
    fig.tight_layout(rect=(0, bottom, 1, 0.95))


def _describe(scenario: str, cfg: dict) -> str:
    from loadgen.output import describe
    return describe(scenario, cfg)


def _panels(scenario: str) -> list[tuple[str, str, list[Metric]]]:
    """(title, axis label, metrics) per headline key: a latency key is one panel of its
    p50 and p99."""
    labels = LABELS.get(scenario, {})
    by_path = {m.path: m for m in headline(scenario)}
    out = []
    for key in HEADLINES[scenario]:
        if key in LATENCIES:
            name = labels.get(key, LATENCIES[key])
            out.append((name, f"{name} (ms)", [by_path[f"{key}.p50"], by_path[f"{key}.p99"]]))
        else:
            m = by_path[key]
            out.append((m.label, m.axis, [m]))
    return out


def _cdf(ax, series: list[tuple[str, str, list[float]]], xlabel: str) -> None:
    """Step CDFs (every sample a step), log x when the samples span decades."""
    everything = [x for _, _, xs in series for x in xs]
    for label, color, xs in series:
        if xs:
            ax.ecdf(xs, label=f"{label} (n={len(xs):,})", color=color, linewidth=1.4)
    if _log_worthy(everything):
        ax.set_xscale("log")
        _plain_ticks(ax, "x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)


def _save(fig, path: str) -> None:
    fig.savefig(path, format="png", dpi=DPI)
    plt.close(fig)


# --- compare ----------------------------------------------------------------------------
def plot_compare(result: dict, path: str) -> None:
    """A comparison or a sweep as a PNG."""
    _save(compare_figure(result) if result["kind"] == "compare" else sweep_figure(result),
          path)


def plot_report(report: dict, path: str) -> None:
    _save(report_figure(report), path)


def compare_figure(result: dict):
    scenario = result["scenario"]
    sides = {"A": result["a"], "B": result["b"]}
    rows = {row["metric"]: row for row in result["metrics"]}
    panels = [panel for panel in _panels(scenario) if any(m.path in rows for m in panel[2])]
    cdfs = [k for k in SAMPLE_KEYS
            if any(len(_samples(s["reports"], k)) >= MIN_CDF for s in sides.values())]
    ncols = max(len(panels), len(cdfs), 1)
    fig = plt.figure(figsize=(max(9.0, 3.3 * ncols), 8.2 if cdfs else 5.0))
    grid = fig.add_gridspec(2 if cdfs else 1, 2 * ncols)
    # Panels centred in their row when a row has fewer than ncols.
    for i, (title, axis, ms) in enumerate(panels):
        start = (ncols - len(panels)) + 2 * i
        _bars(fig.add_subplot(grid[0, start:start + 2]), title, axis, ms, rows, sides)
    labels = LABELS.get(scenario, {})
    for i, key in enumerate(cdfs):
        start = (ncols - len(cdfs)) + 2 * i
        ax = fig.add_subplot(grid[1, start:start + 2])
        _cdf(ax, [(f"{s}: {sides[s]['spec'] or 'defaults'}", COLORS[s],
                   _samples(sides[s]["reports"], key)) for s in sides],
             f"{labels.get(key, LATENCIES[key])} (ms)")
    reports = result["a"]["reports"] + result["b"]["reports"]
    fig.suptitle(f"{_title(scenario, reports)}: A = {result['a']['spec'] or 'defaults'}"
                 f" vs B = {result['b']['spec'] or 'defaults'}", fontsize=12)
    lines = [f"A: {_describe(scenario, result['a']['config'])}",
             f"B: {_describe(scenario, result['b']['config'])}",
             f"{result['pairs']} alternating pair{'s' * (result['pairs'] != 1)} (A, B, A, B, "
             "...) on one cluster and seed. Bars (lines on a log axis): median of the runs; "
             "dots: each run; "
             "B/A: median of the pair ratios (min–max over the pairs)."
             + (" CDFs: every kept latency sample of every run." if cdfs else "")]
    lines += _notes(result["a"]["reports"])
    _caption(fig, lines)
    _layout(fig, len(lines) + 2)
    return fig


def _bars(ax, title: str, axis: str, metrics: list[Metric], rows: dict,
          sides: dict) -> None:
    """Each side's median (one group per metric: p50, p99) as a bar, or as a line on a
    log axis; every run a dot; under each group its name and B/A with the spread."""
    width = 0.38
    runs_of = {(g, side): [v * (100 if m.percent else 1)
                           for v in (m.value(r) for r in sides[side]["reports"]) if v is not None]
               for g, m in enumerate(metrics) for side in ("A", "B")}
    values = [v for runs in runs_of.values() for v in runs]
    log = _log_worthy(values)
    ticks, names = [], []
    for g, m in enumerate(metrics):
        for j, side in enumerate(("A", "B")):
            runs = runs_of[g, side]
            x = g + (j - 0.5) * width
            ticks.append(x)
            names.append(side)
            if not runs:
                continue
            med = statistics.median(runs)
            if log:  # a bar's length means nothing on a log axis: the median as a line
                ax.hlines(med, x - width * 0.42, x + width * 0.42, color=COLORS[side],
                          linewidth=3)
            else:
                ax.bar(x, med, width * 0.92, color=COLORS[side], alpha=0.8)
            ax.plot([x] * len(runs), runs, "o", color="black" if not log else COLORS[side],
                    markersize=3 if not log else 4, zorder=3,
                    markerfacecolor="black" if not log else "white")
        row = rows.get(m.path)
        group = m.path.rsplit(".", 1)[-1] + "\n" if len(metrics) > 1 else ""
        ratio = ""
        if row is not None and row["ratio"] is not None:
            ratio = f"B/A {ratio_text(row['ratio'])}"
            if row["ratio_min"] != row["ratio_max"]:
                ratio += f"\n({spread_text(row['ratio_min'], row['ratio_max'])})"
        ax.annotate(group + ratio, (g, 0), xycoords=("data", "axes fraction"),
                    xytext=(0, -16), textcoords="offset points", ha="center", va="top",
                    fontsize=8)
    if log:
        ax.set_yscale("log")
        lo, hi = min(values), max(values)
        ax.set_ylim(lo / 1.6, hi * 1.6)
    elif all(not m.unit and not m.percent for m in metrics):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count
    _plain_ticks(ax)
    ax.set_xticks(ticks, names)
    ax.set_xlim(-0.7, len(metrics) - 0.3)
    ax.set_ylabel(axis)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)


# --- sweep ------------------------------------------------------------------------------
def _numeric(values: list) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _spaced_labels(xs: list[float], labels: list[str], log: bool) -> list[str]:
    """Tick labels, blank where one would overlap the last shown (34, 35, 36 close
    together on an axis from 16 to 48); the ticks themselves stay."""
    import math
    pos = [math.log(x) if log else x for x in xs]
    span = (max(pos) - min(pos)) or 1
    shown, last = [], None
    for p, label in zip(pos, labels):
        if last is None or (p - last) / span >= 0.045 * max(1, len(label) / 2):
            shown.append(label)
            last = p
        else:
            shown.append("")
    return shown


def sweep_figure(result: dict):
    scenario = result["scenario"]
    points = result["points"]
    key = result["key"]
    xs_num = _numeric([p["value"] for p in points])
    xs = xs_num if xs_num is not None else list(range(len(points)))
    panels = _panels(scenario)
    fig, axes = plt.subplots(2, len(panels), figsize=(max(9.0, 4.2 * len(panels)), 7.4),
                             squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [2.2, 1]})
    for col, (title, axis, ms) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        values, ratios = [], []
        for m, style in zip(ms, ("-", "--")):
            for side in ("A", "B"):
                meds, lo, hi = [], [], []
                for p in points:
                    runs = [v for v in (m.value(r) for r in p[side.lower()]["reports"])
                            if v is not None]
                    scale = 100 if m.percent else 1
                    runs = [v * scale for v in runs]
                    meds.append(statistics.median(runs) if runs else float("nan"))
                    lo.append(min(runs) if runs else float("nan"))
                    hi.append(max(runs) if runs else float("nan"))
                    values += runs
                spec = result[f"{side.lower()}_spec"] or "defaults"
                suffix = f" {m.path.rsplit('.', 1)[-1]}" if len(ms) > 1 else f": {spec}"
                top.errorbar(xs, meds, yerr=[[m_ - l for m_, l in zip(meds, lo)],
                                             [h - m_ for m_, h in zip(meds, hi)]],
                             fmt=style + "o", color=COLORS[side], markersize=4, capsize=3,
                             label=f"{side}{suffix}")
            rows = [{r["metric"]: r for r in p["metrics"]}.get(m.path) for p in points]
            r_med = [r["ratio"] if r and r["ratio"] is not None else float("nan")
                     for r in rows]
            r_lo = [r["ratio_min"] if r and r["ratio"] is not None else float("nan")
                    for r in rows]
            r_hi = [r["ratio_max"] if r and r["ratio"] is not None else float("nan")
                    for r in rows]
            ratios += [v for v in r_lo + r_hi if v == v]
            bottom.plot(xs, r_med, style + "o", color="black", markersize=4,
                        label=f"B/A{' ' + m.path.rsplit('.', 1)[-1] if len(ms) > 1 else ''}")
            bottom.fill_between(xs, r_lo, r_hi, color="grey", alpha=0.25, linewidth=0)
        if _log_worthy(values):
            top.set_yscale("log")
        elif all(not m.unit and not m.percent for m in ms):
            top.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count
        _plain_ticks(top)
        top.set_ylabel(axis)
        top.set_title(title)
        top.grid(True, alpha=0.3)
        top.legend(fontsize=8, frameon=False, loc="best")
        bottom.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        if ratios and all(v > 0 for v in ratios) and max(ratios) / min(ratios) > 10:
            bottom.set_yscale("log")
            _plain_ticks(bottom)
        else:
            _plain_ticks(bottom)
        if not ratios:
            bottom.text(0.5, 0.5, "no B/A: A is 0 at every value", ha="center",
                        va="center", transform=bottom.transAxes, color="#555555")
        bottom.set_ylabel("B/A")
        bottom.grid(True, alpha=0.3)
        if len(ms) > 1:
            bottom.legend(fontsize=8, frameon=False, loc="best")
        if xs_num is not None and _log_worthy(xs_num):
            bottom.set_xscale("log")
        bottom.set_xticks(xs, _spaced_labels(xs, [str(p["value"]) for p in points],
                                             bottom.get_xscale() == "log"))
        bottom.xaxis.set_minor_locator(NullLocator())
        bottom.set_xlabel(key)
    first = points[0] if points else {}
    reports = first.get("a", {}).get("reports", []) if first else []
    fig.suptitle(f"{_title(scenario, reports)}: sweep of {key}; "
                 f"A = {result['a_spec'] or 'defaults'} vs B = {result['b_spec'] or 'defaults'}",
                 fontsize=12)
    pairs = first.get("pairs", 0)
    from loadgen.output import compare_caption, swept_values
    lines = compare_caption(first, swept_values(result)).split("\n") if first else []
    lines.append(f"{pairs} alternating pair{'s' * (pairs != 1)} per value of {key}. Top: "
                 "median of the runs, bars from the smallest to the largest run. Bottom: "
                 "B/A, the median of the pair ratios, shaded from the smallest to the "
                 "largest." + ("" if xs_num is not None else
                               f" The values of {key} are not numbers: evenly spaced."))
    lines += _notes(reports)
    _caption(fig, lines)
    _layout(fig, len(lines) + 2)
    return fig


# --- one run ----------------------------------------------------------------------------
def report_figure(report: dict):
    scenario = report["scenario"]
    kept = report.get("samples", {})
    cdfs = [k for k in SAMPLE_KEYS if len(kept.get(k, [])) >= MIN_CDF]
    few = [f"{LABELS.get(scenario, {}).get(k, LATENCIES[k])}: {len(kept[k])} "
           f"sample{'s' * (len(kept[k]) != 1)}" for k in SAMPLE_KEYS
           if 0 < len(kept.get(k, [])) < MIN_CDF]
    fig, axes = plt.subplots(1, len(cdfs) + 1, figsize=(4.6 * (len(cdfs) + 1) + 1, 4.8),
                             squeeze=False,
                             gridspec_kw={"width_ratios": [1.3] * len(cdfs) + [1]})
    labels = LABELS.get(scenario, {})
    for ax, key in zip(axes[0], cdfs):
        _cdf(ax, [("this run", COLORS["A"], report["samples"][key])],
                 f"{labels.get(key, LATENCIES[key])} (ms)")
    ax = axes[0][-1]
    ax.axis("off")
    from loadgen.output import report_blocks
    lines: list[tuple[str, str | None]] = []
    for title, rows in report_blocks(report):
        lines.append((title, None))
        lines += [(label, value) for label, value in rows]
    y = 1.0
    step = min(0.06, 1.0 / max(1, len(lines)))
    for label, value in lines:
        if value is None:
            ax.text(0.0, y, label, fontweight="bold", transform=ax.transAxes, va="top")
        else:
            ax.text(0.04, y, label, transform=ax.transAxes, va="top", fontsize=8)
            ax.text(1.0, y, value, transform=ax.transAxes, va="top", ha="right", fontsize=8)
        y -= step
    fig.suptitle(_title(scenario, [report]), fontsize=12)
    caption = [_describe(scenario, report["config"])]
    if few:
        caption.append(f"Too few for a CDF ({', '.join(few)}): see the numbers.")
    elif not cdfs:
        caption.append("This run timed no munmap, madvise or fault: only its numbers are "
                       "shown.")
    caption += _notes([report])
    _caption(fig, caption)
    _layout(fig, len(caption) + 2)
    return fig
