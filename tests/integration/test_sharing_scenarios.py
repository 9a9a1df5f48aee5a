"""The sharing scenarios on a whole cluster over real gRPC: fork, shared-write, swapout."""
import pytest

from loadgen.runner import failed, run
from loadgen.scenarios import RunConfig
from services.common.policy import Policy


def cfg(scenario, rounds=1, pages=64, resident=2048, children=3, **policy) -> RunConfig:
    policy.setdefault("deadline_s", 10.0)
    return RunConfig(scenario, Policy(**policy), cpus=4, pages=pages, rounds=rounds,
                     resident=resident, children=children)


async def test_fork_share_allocates_no_pte_tables_copy_one_per_512_pages(cluster):
    copy = (await run(cluster.client, cfg("fork", resident=4096, fork="copy")))["results"]
    share = (await run(cluster.client, cfg("fork", resident=4096, fork="share")))["results"]
    assert copy["pte_tables_allocated"] == 3 * 4096 // 512
    assert share["pte_tables_allocated"] == 0
    for r in (copy, share):
        assert r["tlb_entries_flushed"] > 0  # the parent's writable entries went
        assert r["stale_accesses"] == 0 and r["audit_violations"] == 0


@pytest.mark.parametrize("fork", ["copy", "share"])
async def test_shared_write_is_safe_and_unshares_only_when_sharing(cluster, fork):
    report = await run(cluster.client, cfg("shared-write", rounds=2, fork=fork))
    r = report["results"]
    assert (r["unshares"] > 0) == (fork == "share")
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0 and not failed(report)


@pytest.mark.parametrize("lock,violations", [("lock-all-sharers", False),
                                             ("lock-all-sharers-unordered", True)])
async def test_lock_all_sharers_unordered_is_reported_not_hung(cluster, lock, violations):
    r = (await run(cluster.client, cfg("shared-write", pages=8, fork="share",
                                       lock=lock)))["results"]
    assert (r["lock_order_violations"] > 0) == violations
    assert (r["aborted_writes"] > 0) == violations
    if violations:
        assert "lock order inversion" in r["lock_order_reports"][0]
    assert r["stale_accesses"] == 0


@pytest.mark.parametrize("policy", ["all-cpus", "sharer-union", "unsafe-mm-only"])
async def test_swapout_flush_targets(cluster, policy):
    report = await run(cluster.client, cfg("swapout", rounds=2, pages=512, resident=1536,
                                           children=1, fork="share", frames=2048,
                                           shared_flush=policy))
    r = report["results"]
    assert r["reclaimed_pages"] > 0 and r["reclaim_ipis"] > 0
    assert 0 < r["swap_reads"] <= r["swap_ins"]  # the swap-ins not found in the swap cache
    if policy == "unsafe-mm-only":  # Linus's rule exists because of this
        assert r["stale_accesses"] > 0 and failed(report)
    else:
        assert r["stale_accesses"] == 0 and r["audit_violations"] == 0 and not failed(report)


async def test_sharer_union_sends_fewer_ipis_than_all_cpus(cluster):
    ipis = {}
    for policy in ("all-cpus", "sharer-union"):
        r = (await run(cluster.client, cfg("swapout", rounds=2, pages=512, resident=1536,
                                           children=1, fork="share", frames=2048,
                                           shared_flush=policy)))["results"]
        ipis[policy] = r["reclaim_ipis_per_page"]
    assert 0 < ipis["sharer-union"] < ipis["all-cpus"]
