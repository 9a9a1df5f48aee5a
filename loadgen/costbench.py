"""The range-flush ceiling from modelled time (issue 9): sweep the pages a flush covers,
ranged (ceiling above them) against full (ceiling 0), on the flush-ceiling scenario, and
find where the full flush starts to win. With the x86 cost model this reproduces the
kernel's own trade-off, tlb_single_page_flush_ceiling = 33 (README, "Cost model")."""
from __future__ import annotations

from loadgen.cluster import Cluster
from loadgen.runner import run
from loadgen.scenarios import RunConfig
from loadgen.scenarios.flush_ceiling import DEFAULT_WORKING_SET
from services.common import costmodel
from services.common.policy import Policy

# A coarse sweep, dense around the kernel's 33; the crossover is then found exactly by
# bisecting between the last page count where ranged won and the first where it lost.
SWEEP_PAGES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
KERNEL_CEILING = 33


def crossover(points: list[dict]) -> int | None:
    """The smallest swept page count at which the full flush costs no more than the
    ranged one (None: ranged won everywhere)."""
    for p in sorted(points, key=lambda p: p["pages"]):
        if p["full_ns"] <= p["ranged_ns"]:
            return p["pages"]
    return None


async def ceiling_sweep(cluster: Cluster, pages: tuple[int, ...] = SWEEP_PAGES,
                        cpus: int = 2, working_set: int = DEFAULT_WORKING_SET,
                        rounds: int = 2, model: str = "x86") -> dict:
    """Per page count: modelled ns per round, ranged vs full, and the crossover."""
    cost_model = costmodel.load(model)
    ranged_ceiling = max(pages)

    async def point(n: int) -> dict:
        row = {"pages": n}
        for arm, ceiling in (("ranged", ranged_ceiling), ("full", 0)):
            cfg = RunConfig("flush-ceiling", Policy(ceiling=ceiling, cost_model=cost_model),
                            cpus=cpus, pages=n, rounds=rounds, resident=working_set)
            r = (await run(cluster, cfg))["results"]
            if r["stale_accesses"] or r["audit_violations"]:
                raise AssertionError(f"flush-ceiling pages={n} {arm}: the oracle fired")
            row[f"{arm}_ns"] = r["modelled"]["ns_per_round"]
            row[f"{arm}_full_flushes"] = r["full_flushes"]
        return row

    points = [await point(n) for n in pages]
    found = crossover(points)
    while found is not None:  # bisect the gap below the first page count ranged lost
        below = max((p["pages"] for p in points if p["pages"] < found), default=found)
        if found - below <= 1:
            break
        points.append(await point((below + found) // 2))
        found = crossover(points)
    points.sort(key=lambda p: p["pages"])
    return {"cost_model": cost_model.as_dict(), "cpus": cpus,
            "working_set_pages": working_set, "rounds": rounds, "points": points,
            "crossover_pages": crossover(points), "kernel_ceiling": KERNEL_CEILING}


def print_sweep(result: dict) -> None:
    from rich.table import Table

    from loadgen import output
    t = Table(title=f"ranged vs full flush, modelled ns per round (cost model "
                    f"{result['cost_model']['name']}, {result['cpus']} CPUs, working set "
                    f"{result['working_set_pages']} pages)")
    for col in ("pages", "ranged", "full", "full/ranged", "cheaper"):
        t.add_column(col, justify="right")
    for p in result["points"]:
        ratio = p["full_ns"] / p["ranged_ns"] if p["ranged_ns"] else 0.0
        t.add_row(str(p["pages"]), f"{p['ranged_ns']:,.0f}", f"{p['full_ns']:,.0f}",
                  f"{ratio:.2f}x", "ranged" if p["ranged_ns"] < p["full_ns"] else "full")
    output.console.print(t)
    n = result["crossover_pages"]
    output.console.print(
        f"crossover: the full flush wins from {n} pages" if n else
        "crossover: none in the sweep (ranged won everywhere)",
        f"(the kernel's tlb_single_page_flush_ceiling: ranged up to {result['kernel_ceiling']})")
