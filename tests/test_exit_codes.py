"""One meaning per exit code (README "Exit codes", services/common/exitcodes.py), each
produced by a real `tlbsim` process against a real cluster (issue 19)."""
from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import sys

from loadgen.cli.main import exit_code_of
from services.common import exitcodes
from services.common.errors import InvalidArgument
from tlbsim.v1 import memory_pb2

ROOT = os.path.join(os.path.dirname(__file__), "..")
# Restore SIGINT's default before exec: a shell that started the tests in the background
# may have set it to "ignore", which children inherit (as tests/loadgen/test_interrupt.py).
EXEC_WITH_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execv(sys.executable, [sys.executable, '-m', 'loadgen', *sys.argv[1:]])")


async def tlbsim(*argv: str, cwd=ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EXEC_WITH_SIGINT, *argv, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("I1", "W1"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_codes_are_distinct_and_documented():
    codes = [exitcodes.OK, exitcodes.UNSAFE, exitcodes.USAGE, exitcodes.REFUSED,
             exitcodes.NO_CLUSTER, exitcodes.TRACED_FAILED, exitcodes.INTERNAL,
             exitcodes.INTERRUPTED]
    assert len(set(codes)) == len(codes) == len(exitcodes.TABLE)
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in codes:
        assert f"\n| {code} | " in table, code


async def epoch(c) -> int:
    return (await c.client.memory.Stats(memory_pb2.MemoryStatsRequest())).epoch


async def test_ok_unsafe_usage_refused_and_no_cluster(cluster, tmp_path):
    address = cluster.coordinator.address
    run = ["load", "run", "munmap", "--cluster", address, "--pages", "64", "--rounds", "2"]

    code, out, err = await tlbsim(*run, "--json", str(tmp_path / "ok.json"))
    assert code == exitcodes.OK, err
    assert json.loads((tmp_path / "ok.json").read_text())["results"]["stale_accesses"] == 0

    code, out, err = await tlbsim(*run, "--unsafe", "free-before-flush")
    assert code == exitcodes.UNSAFE, err
    assert "oracle:" in err and "the run is unsafe" in err

    # Usage: refused before anything ran (the cluster was not even reset).
    before = await epoch(cluster)
    for bad, words in ((["--json", str(tmp_path)], "is a directory"),
                       (["--ops", "10", "--duration", "5"], "only one of"),
                       (["--ceiling", "99999999999999999999"], "ceiling"),
                       (["--mqt"], "unrecognized arguments")):
        code, out, err = await tlbsim(*run, *bad)
        assert code == exitcodes.USAGE, (bad, err)
        assert words in err.strip().splitlines()[-1], (bad, err)
    assert await epoch(cluster) == before

    # Refused: the cluster answers, but it has no broker for the mqtt transport.
    code, out, err = await tlbsim(*run, "--transport", "mqtt")
    assert code == exitcodes.REFUSED, err
    assert "FAILED_PRECONDITION" in one_line(err)
    code, out, err = await tlbsim(*run, "--cpus", "8")
    assert code == exitcodes.REFUSED and "this run needs 8" in one_line(err)

    # No cluster: no state file, or nothing listening.
    code, out, err = await tlbsim("load", "run", "munmap", "--state",
                                  str(tmp_path / "none.json"))
    assert code == exitcodes.NO_CLUSTER and "no cluster state" in one_line(err)
    code, out, err = await tlbsim("down", "--state", str(tmp_path / "none.json"))
    assert code == exitcodes.NO_CLUSTER
    code, out, err = await tlbsim("load", "run", "munmap", "--cluster", "127.0.0.1:1")
    assert code == exitcodes.NO_CLUSTER and "cannot reach" in one_line(err)


async def test_ctrl_c_of_a_compare_is_130_and_still_writes_the_pairs(cluster, tmp_path):
    out = tmp_path / "c.json"
    before = await epoch(cluster)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EXEC_WITH_SIGINT, "load", "compare", "munmap", "--cluster",
        cluster.coordinator.address, "--a", "flush=per-page", "--b", "flush=gather",
        "--pages", "8", "--rounds", "2", "--repeat", "1000", "--json", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    for _ in range(1200):  # until a few runs (one reset each) are done
        if (await epoch(cluster)) >= before + 3:
            break
        assert proc.returncode is None, (await proc.communicate())[1].decode()
        await asyncio.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == exitcodes.INTERRUPTED, err.decode()
    result = json.loads(out.read_text())
    assert result["interrupted"] is True and 1 <= result["pairs"] < 1000


async def test_a_failing_traced_command_is_5_and_its_trace_is_written(tmp_path):
    trace = tmp_path / "t.tlbt.gz"
    code, out, err = await tlbsim("trace", "record", "-o", str(trace), "--", "sh", "-c",
                                  "exit 3")
    assert code == exitcodes.TRACED_FAILED, err
    assert "exited with status 3" in err
    with gzip.open(trace, "rt") as f:
        assert json.loads(f.readline())["exit_status"] == 3
    code, out, err = await tlbsim("trace", "record", "-o", str(tmp_path / "u.tlbt.gz"),
                                  "--", "/nonexistent/binary")
    assert code == exitcodes.USAGE and "no such file" in one_line(err)
    assert not (tmp_path / "u.tlbt.gz").exists()


def test_a_bug_is_one_line_and_70(monkeypatch, capsys):
    import loadgen.cli.load
    from loadgen.cli.main import main

    def bug(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(loadgen.cli.load, "_run", bug)
    assert main(["load", "run", "munmap"]) == exitcodes.INTERNAL
    err = capsys.readouterr().err
    assert one_line(err) == ("tlbsim: internal error (a bug; --log-level DEBUG shows the "
                             "traceback): ZeroDivisionError: a bug")


def test_grpc_statuses_map_to_refused_or_no_cluster():
    assert exitcodes.for_status("RESOURCE_EXHAUSTED") == exitcodes.REFUSED
    assert exitcodes.for_status("INVALID_ARGUMENT") == exitcodes.REFUSED
    assert exitcodes.for_status("UNAVAILABLE") == exitcodes.NO_CLUSTER
    assert exitcodes.for_status("DEADLINE_EXCEEDED") == exitcodes.NO_CLUSTER
    from services.common.errors import REASON_CPU_FENCED, REASON_MACHINE_LOST, REASON_RUN_RESET
    for lost in (REASON_MACHINE_LOST, REASON_RUN_RESET):  # by the reason, not the words
        assert exitcodes.for_status("FAILED_PRECONDITION", lost) == exitcodes.NO_CLUSTER
    assert exitcodes.for_status("FAILED_PRECONDITION", REASON_CPU_FENCED) == exitcodes.REFUSED
    assert exitcodes.for_status("FAILED_PRECONDITION") == exitcodes.REFUSED


def test_local_errors_map_by_their_code_and_reason():
    from loadgen.scenarios.base import CpuLeft
    from services.common.chaos import MACHINE_LOST
    from services.common.errors import REASON_MACHINE_LOST, FailedPrecondition
    from services.launcher import LauncherError, UsageError
    assert exit_code_of(InvalidArgument("bad --pages")) == exitcodes.USAGE
    assert exit_code_of(UsageError("a folder, not a state file")) == exitcodes.USAGE
    assert exit_code_of(LauncherError("no cluster state")) == exitcodes.NO_CLUSTER
    assert exit_code_of(CpuLeft("cpu 1 left")) == exitcodes.NO_CLUSTER
    assert exit_code_of(FailedPrecondition(MACHINE_LOST)) == exitcodes.REFUSED  # words alone
    assert exit_code_of(FailedPrecondition(MACHINE_LOST, REASON_MACHINE_LOST)) == \
        exitcodes.NO_CLUSTER
