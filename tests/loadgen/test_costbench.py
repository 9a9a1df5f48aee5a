"""Modelled time over real gRPC (issue 9): the range-flush crossover of the x86 cost model
lies near the kernel's 33 pages, broadcast invalidation moves it, and reports and
compare tables carry modelled time next to wall time."""
from loadgen import output
from loadgen.compare import Side, compare
from loadgen.costbench import ceiling_sweep, crossover
from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common import costmodel
from services.common.policy import Policy


def test_crossover_is_the_first_page_count_where_full_is_no_dearer():
    points = [{"pages": 8, "ranged_ns": 1, "full_ns": 9}, {"pages": 40, "ranged_ns": 9,
                                                            "full_ns": 9},
              {"pages": 33, "ranged_ns": 5, "full_ns": 4}]
    assert crossover(points) == 33
    assert crossover(points[:1]) is None


async def test_x86_ranged_flush_wins_below_about_33_pages_and_loses_above(cluster):
    result = await ceiling_sweep(cluster.client, pages=(24, 48), rounds=1)
    n = result["crossover_pages"]
    assert 24 < n <= 48
    by_pages = {p["pages"]: p for p in result["points"]}
    assert by_pages[n]["full_ns"] <= by_pages[n]["ranged_ns"]
    assert by_pages[n - 1]["ranged_ns"] < by_pages[n - 1]["full_ns"]  # bisected exactly
    assert all(p["ranged_full_flushes"] == 0 and p["full_full_flushes"] > 0
               for p in result["points"])  # the ceiling really chose the flush


async def test_broadcast_invalidation_keeps_ranged_cheaper_at_48_pages(cluster):
    """One INVLPGB per page covers every CPU, while a full flush's refills are paid on
    each: the crossover moves up."""
    result = await ceiling_sweep(cluster.client, pages=(48,), rounds=1, model="invlpgb")
    (point,) = result["points"]
    assert point["ranged_ns"] < point["full_ns"] and result["crossover_pages"] is None


async def test_report_and_compare_carry_modelled_time_next_to_wall_time(cluster):
    def side(label: str, model: str) -> Side:
        return Side(label, f"cost_model={model}",
                    RunConfig("munmap", Policy(deadline_s=10.0,
                                               cost_model=costmodel.load(model)),
                              cpus=4, pages=16, rounds=1, readers=False))

    result = await compare(cluster.client, side("A", "x86"), side("B", "invlpgb"), repeat=1)
    a, b = result["a"]["reports"][0]["results"], result["b"]["reports"][0]["results"]
    assert a["modelled"]["cost_model"]["name"] == "x86" and b["ipis"] == a["ipis"] > 0
    assert a["modelled"]["components_us"]["ipi"] > 0 == b["modelled"]["components_us"]["ipi"]
    assert a["modelled"]["syscall_ns"]["munmap"] > b["modelled"]["syscall_ns"]["munmap"] > 0
    rows = {r["metric"]: r for r in result["metrics"]}
    assert rows["modelled.total_us"]["ratio"] < 1  # broadcast is cheaper on this workload
    assert rows["modelled.syscall_ns.munmap"]["a"] == a["modelled"]["syscall_ns"]["munmap"]
    with output.console.capture() as cap:
        output.print_compare(result)
        output.print_report(result["a"]["reports"][0])
    text = cap.get()
    assert "modelled work per munmap (ns)" in text and "munmap latency p50 (ms)" in text
    assert "modelled work: event counts x costs, summed (cost model x86" in text and "per munmap" in text


async def test_flush_ceiling_prices_only_the_rounds(cluster):
    cfg = RunConfig("flush-ceiling", Policy(ceiling=0), cpus=2, pages=4, rounds=2,
                    resident=64)
    r = (await run(cluster.client, cfg))["results"]
    md = r["modelled"]
    assert md["from_warm"] and r["stale_accesses"] == 0
    # Every round: one full flush on each of the 2 CPUs and 64 refills each.
    assert md["events"]["full_flushes"] == 4 and md["events"]["misses"] >= 2 * 2 * 64
    assert md["events"]["faults"] < 64  # the warm-up's 64 faults are not priced
