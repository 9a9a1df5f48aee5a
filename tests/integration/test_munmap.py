"""The munmap scenario on a whole cluster over real gRPC (issue: what it must show, 2-3)."""

import pytest

from loadgen.runner import failed, run
from loadgen.scenarios import RunConfig
from services.common.policy import Policy


def cfg(pages=512, rounds=5, **policy) -> RunConfig:
    # A generous deadline: exact counts must not depend on how loaded the machine is.
    policy.setdefault("deadline_s", 10.0)
    return RunConfig("munmap", Policy(**policy), cpus=4, pages=pages, rounds=rounds)


@pytest.mark.parametrize("transport", ["grpc", "stream"])
async def test_gathered_munmap_is_one_full_shootdown_with_three_ipis(cluster, transport):
    report = await run(cluster.client, cfg(flush="gather", transport=transport))
    r = report["results"]
    assert r["shootdowns"] == 5          # one per munmap
    assert r["ipis"] == 15               # the three other CPUs, each time
    assert r["full_flushes"] == 5        # 512 pages > ceiling 33
    assert r["pages_freed"] == 5 * 512
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
    assert r["audit_entries_checked"] == 5 * 4 * 512  # each round, every CPU held the range
    assert not failed(report)


async def test_per_page_munmap_shoots_down_every_page(cluster):
    report = await run(cluster.client, cfg(rounds=2, flush="per-page"))
    r = report["results"]
    # 512 pages, one shootdown each (the last also covers the page tables freed).
    assert r["shootdowns"] == 2 * 512
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0


async def test_small_gathered_munmap_is_a_ranged_flush(cluster):
    report = await run(cluster.client, cfg(pages=16, rounds=3))
    r = report["results"]
    assert r["shootdowns"] == 3 and r["full_flushes"] == 0
    assert r["stale_accesses"] == 0


async def test_free_before_flush_fires_the_oracle(cluster):
    report = await run(cluster.client, cfg(rounds=10, unsafe="free-before-flush"))
    assert report["results"]["stale_accesses"] > 0
    assert failed(report)


async def test_policies_change_between_runs_without_restart(cluster):
    a = await run(cluster.client, cfg(rounds=1, flush="per-page", lock="mm"))
    b = await run(cluster.client, cfg(rounds=1, flush="gather", lock="split"))
    assert a["config"]["flush"] == "per-page" and b["config"]["flush"] == "gather"
    assert a["results"]["shootdowns"] > 500 and b["results"]["shootdowns"] == 1
    assert b["epoch"] == a["epoch"] + 1
