"""`--plot PATH.png`: latency CDFs, per-policy bars and sweep lines (matplotlib, no display)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadgen.compare import headline, metric  # noqa: E402

BARS = [("shootdowns", "shootdowns"), ("IPIs", "ipis"), ("faults/s", "faults_per_s"),
        ("ops/s", "ops_per_s")]


def _cdf(ax, series: list[tuple[str, list[float]]], title: str) -> None:
    drawn = False
    for label, samples in series:
        if samples:
            xs = sorted(samples)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction")
    if drawn:
        ax.set_xscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)


def _samples(reports: list[dict], key: str) -> list[float]:
    return [x for r in reports for x in r.get("samples", {}).get(key, [])]


def plot_runs(groups: list[tuple[str, list[dict]]], title: str, path: str) -> None:
    """Latency CDFs and bars for one or more labelled groups of reports."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    _cdf(axes[0], [(label, _samples(reps, "munmap_latency_ms")) for label, reps in groups],
         "munmap / madvise latency CDF")
    _cdf(axes[1], [(label, _samples(reps, "fault_latency_ms")) for label, reps in groups],
         "fault latency CDF")
    ax = axes[2]
    width = 0.8 / max(1, len(groups))
    for g, (label, reps) in enumerate(groups):
        values = []
        for _, key in BARS:
            vals = [metric(r, key) or 0.0 for r in reps]
            values.append(sorted(vals)[len(vals) // 2] if vals else 0.0)
        ax.bar([i + g * width for i in range(len(BARS))], values, width, label=label)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(BARS))],
                  [name for name, _ in BARS])
    ax.set_yscale("symlog")
    ax.set_title("per policy (median of runs)")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_compare(result: dict, path: str) -> None:
    if result["kind"] == "sweep":
        plot_sweep(result, path)
        return
    plot_runs([(f"A: {result['a']['spec']}", result["a"]["reports"]),
               (f"B: {result['b']['spec']}", result["b"]["reports"])],
              f"{result['scenario']}: A vs B ({result['pairs']} pairs)", path)


def plot_sweep(result: dict, path: str) -> None:
    keys = headline(result["scenario"] or "")
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    xs = [p["value"] for p in result["points"]]
    for ax, key in zip(axes[0], keys):
        for side in ("a", "b"):
            ys = []
            for p in result["points"]:
                vals = [metric(r, key) for r in p[side]["reports"]]
                vals = sorted(v for v in vals if v is not None)
                ys.append(vals[len(vals) // 2] if vals else float("nan"))
            ax.plot(xs, ys, marker="o", label=f"{side.upper()}: {result[side + '_spec']}")
        ax.set_xlabel(result["key"])
        ax.set_title(key)
        ax.legend()
    fig.suptitle(f"{result['scenario']}: sweep of {result['key']}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_report(report: dict, path: str) -> None:
    cfg = report["config"]
    plot_runs([(f"flush={cfg['flush']} lock={cfg['lock']}", [report])],
              f"{report['scenario']}", path)
