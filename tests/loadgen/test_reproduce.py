"""`tlbsim reproduce` (issue 16): a table on a real cluster gives the documented JSON with
its claims judged; the command's bad input is a one-line error."""
import subprocess
import sys

import pytest

from loadgen.reproduce import TABLES, Claim, reproduce


async def test_a_table_runs_in_virtual_time_and_judges_its_claims(cluster):
    seen = []
    doc = await reproduce(TABLES["odf-2021"], cluster.coordinator.address, True, seen.append)
    assert doc["table"] == "odf-2021" and doc["source"] and doc["unit"] and doc["quick"]
    assert doc["runs"] == 2 and len(seen) == 2  # progress: one line per run
    rows = {r["series"]: r for r in doc["rows"]}
    copy = rows["fork copy, ms per GB"]
    assert copy["published"] == 4.2 and 1.95 <= copy["simulated"] <= 6.6
    assert all(set(c) == {"claim", "holds", "value"} for c in doc["claims"])
    assert doc["holds"] is all(c["holds"] for c in doc["claims"]) is True


async def test_a_claim_that_fails_fails_the_table_and_says_what_the_model_lacks(cluster):
    async def never(runs, quick):
        return [], [Claim("impossible", False, 0), Claim("fine", True, 1)]
    from dataclasses import replace
    table = replace(TABLES["odf-2021"], measure=never, lacks="a mechanism")
    doc = await reproduce(table, cluster.coordinator.address, True, lambda text: None)
    assert doc["holds"] is False and doc["lacks"] == "a mechanism"


def tlbsim(*args):
    return subprocess.run([sys.executable, "-m", "loadgen", *args], capture_output=True,
                          text=True, timeout=60)


def test_list_names_every_table():
    r = tlbsim("reproduce", "--list")
    assert r.returncode == 0
    assert [line.split()[0] for line in r.stdout.splitlines()] == list(TABLES)


@pytest.mark.parametrize("args,message", [
    (("reproduce",), "name a table"),
    (("reproduce", "lameter"), "unknown table 'lameter'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = tlbsim(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
