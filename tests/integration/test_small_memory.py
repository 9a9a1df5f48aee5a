"""A machine with little memory: either the run is safe (reclaim thrashes, nothing goes
stale, nothing hangs) or it is refused up front with the minimum, in one line."""
import pytest

from loadgen.runner import run
from loadgen.scenarios import RunConfig
from loadgen.cli.main import main
from services.common.policy import MIN_FRAMES, Policy
from tests.harness import InProcessCluster


@pytest.mark.parametrize("frames", [2, 10, 16, 32, MIN_FRAMES - 1])
def test_too_little_memory_is_refused_in_one_line_before_any_work(frames, capsys):
    rc = main(["load", "run", "munmap", "--frames", str(frames), "--rounds", "1",
               "--pages", "4", "--cluster", "127.0.0.1:1"])  # nothing listens: not reached
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"between {MIN_FRAMES} and" in err


@pytest.mark.parametrize("frames", [MIN_FRAMES, MIN_FRAMES + 8, 2 * MIN_FRAMES])
async def test_the_smallest_machines_run_safely_under_reclaim(frames):
    async with InProcessCluster(cpus=4) as c:  # a working set of nearly all memory
        cfg = RunConfig("munmap", Policy(frames=frames, deadline_s=10.0), cpus=4,
                        pages=frames - 8, rounds=1)
        r = (await run(c.client, cfg))["results"]
    assert r["rounds"] == 1 and r["reclaimed_pages"] > 0
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
