"""Recorded traces of real programs, replayed on a 4-CPU cluster (issue 5, point 2)."""

import asyncio
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from loadgen import output
from loadgen.output import trace_notes
from loadgen.runner import failed, run
from loadgen.scenarios import Driver, RunConfig
from loadgen.trace.fmt import Pages, read_trace, write_trace
from services.common.errors import InvalidArgument
from services.common.policy import Policy
from tlbsim.v1 import cpu_pb2

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "traces")
TRACES = sorted(f for f in os.listdir(FIXTURES) if f.endswith(".tlbt.gz"))
TLBSIM = [sys.executable, "-m", "loadgen"]


async def replay(cluster, path, **policy) -> dict:
    policy.setdefault("deadline_s", 10.0)
    report = await run(cluster.client, RunConfig("replay", Policy(**policy), cpus=4, rounds=1,
                                                 trace=path))
    r = report["results"]
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0, report["violations"]
    assert not failed(report)
    return report


def test_fixtures_are_small_and_made_by_trace_record():
    assert len(TRACES) >= 2
    for name in TRACES:
        path = os.path.join(FIXTURES, name)
        assert os.path.getsize(path) < 300_000
        header, events = read_trace(path)
        assert header["events"] == len(events) and header["exit_status"] == 0


@pytest.mark.parametrize("name", TRACES)
async def test_fixture_replays_every_call_strace_saw(cluster, name):
    path = os.path.join(FIXTURES, name)
    header, events = read_trace(path)
    rep = (await replay(cluster, path))["results"]["replay"]
    # Every memory-management call the trace holds was read and accounted for.
    assert rep["calls"] == {k: v for k, v in header["syscalls"].items()
                            if k not in header["unknown_syscalls"]}
    for name_, seen in rep["calls"].items():
        done = (rep["replayed"].get(name_, 0) + rep["failed_in_trace"].get(name_, 0)
                + rep["no_effect"].get(name_, 0))
        assert done == seen, name_
    assert rep["replayed"].get("mmap", 0) + rep["failed_in_trace"].get("mmap", 0) \
        == header["syscalls"]["mmap"]
    assert rep["tasks_alive_at_end"] == 0
    assert rep["access_pages"] == header["access_pages"]


async def test_shell_pipeline_forks_as_strace_saw(cluster):
    path = os.path.join(FIXTURES, "sh-seq-sort.tlbt.gz")
    header, events = read_trace(path)
    report = await replay(cluster, path)
    r = report["results"]
    forks = [e for e in events if e["op"] == "clone" and "CLONE_VM" not in e["flags"]]
    assert r["syscalls"]["fork"] == len(forks) == header["syscalls"]["clone"]
    # Every process's mm ends: one exit per address space that was used.
    assert r["syscalls"]["exit"] == r["replay"]["mms_created"] + len(forks)
    assert r["replay"]["address_spaces"] == 1 + len(forks) + header["syscalls"]["execve"]


async def test_thread_shares_the_mm_on_another_cpu(cluster):
    path = os.path.join(FIXTURES, "python-json-thread.tlbt.gz")
    report = await replay(cluster, path)
    rep = report["results"]["replay"]
    assert rep["tasks"] == 2 and "fork" not in report["results"]["syscalls"]
    # The thread ran on CPU 1: the process's mm was loaded on two CPUs, so the munmaps
    # after the thread started had a target.
    assert report["results"]["ipis"] >= 1


async def test_accesses_are_replayed_and_fault(cluster):
    path = os.path.join(FIXTURES, "ls-accesses.tlbt.gz")
    report = await replay(cluster, path, lock="mm", flush="per-page")
    r = report["results"]
    assert r["replay"]["access_pages"] > 10_000
    assert r["faults"] > 100 and r["segv"] == 0
    assert r["tlb_hit_rate"] > 0.5


async def test_consecutive_access_events_of_a_task_go_in_one_access(cluster):
    """At full speed the accesses between two other events are one Access call (up to
    ACCESS_BATCH); paced, each recorded batch is its own. The same accesses either way:
    the same faults, hits and misses."""
    path = os.path.join(FIXTURES, "ls-accesses.tlbt.gz")
    _, events = read_trace(path)
    access_events = sum(e["op"] == "access" for e in events)
    spans = sum(e["op"] == "access" and (k == 0 or events[k - 1]["op"] != "access")
                for k, e in enumerate(events))  # one task: runs of access events
    merged = (await replay(cluster, path))["results"]
    paced = (await run(cluster.client, RunConfig(
        "replay", Policy(deadline_s=10.0), cpus=4, rounds=1, trace=path,
        speed=1e9)))["results"]  # paced so fast that nothing waits
    outside = merged["replay"]["accesses_outside_mappings"]  # each splits a batch
    assert spans <= merged["replay"]["access_batches"] <= spans + outside
    assert access_events <= paced["replay"]["access_batches"] <= access_events + outside
    for key in ("faults", "segv", "tlb_hit_rate", "stale_accesses"):
        assert merged[key] == paced[key], key
    assert merged["replay"]["access_pages"] == paced["replay"]["access_pages"]


async def test_a_replay_reports_its_progress_through_its_events(cluster):
    """One long replay is one round: the bar moves with its events, in per mille of the
    run, round by round."""
    path = os.path.join(FIXTURES, "ls-accesses.tlbt.gz")
    cfg = RunConfig("replay", Policy(deadline_s=10.0), cpus=4, rounds=2, trace=path)
    seen: list[int] = []
    await run(cluster.client, cfg, seen.append)
    assert cfg.progress_total() == 1000
    assert seen == sorted(seen) and seen[-1] == 1000 and 500 in seen
    assert len([p for p in seen if 0 < p < 500]) >= 50  # the first round, percent by percent


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed")
async def test_record_then_replay_sort_matches_an_independent_strace_count(cluster, tmp_path):
    data = tmp_path / "numbers.txt"
    data.write_text("".join(f"{(i * 7919) % 10007}\n" for i in range(20000)))
    out = tmp_path / "sort.tlbt.gz"
    cmd = ["/usr/bin/sort", "-n", str(data), "-o", str(tmp_path / "sorted.txt")]
    subprocess.run([*TLBSIM, "trace", "record", "--quiet", "-o", str(out), "--", *cmd],
                   check=True, cwd=os.path.dirname(FIXTURES))
    # strace's own summary (-c) of a second run counts the calls independently.
    summary = subprocess.run(["strace", "-f", "-c", "-o", str(tmp_path / "c.txt"),
                              "-e", "trace=mmap,munmap,mprotect,brk,clone,clone3,fork,vfork",
                              *cmd], check=True)
    counts = {}
    for line in (tmp_path / "c.txt").read_text().splitlines():
        m = re.match(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1))
    assert summary.returncode == 0 and counts["mmap"] > 5
    header, _ = read_trace(str(out))
    for name, n in counts.items():
        assert header["syscalls"][name] == n, name
    rep = (await replay(cluster, str(out)))["results"]["replay"]
    for name, n in counts.items():
        assert rep["calls"][name] == n, name


def test_replay_of_a_malformed_trace_names_the_line(tmp_path):
    path = tmp_path / "bad.tlbt.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"format": "tlbsim-trace", "version": 1, "source": "strace",
                            "events": 1}) + "\n")
        f.write('{"op": "munmap", "tid": 1, "addr": 4096}\n')
    p = subprocess.run([*TLBSIM, "load", "replay", str(path), "--cluster", "127.0.0.1:1"],
                       capture_output=True, text=True, cwd=os.path.dirname(FIXTURES))
    assert p.returncode == 2
    assert "line 2" in p.stderr and "len" in p.stderr


async def test_a_multi_threaded_trace_sends_ipis_that_gathering_cuts(cluster):
    """threads-munmap: four threads write a 64-page mapping, the first unmaps it, four
    times (tests/fixtures/programs/threads-munmap.c). Per page, every munmap sends 64
    shootdowns to the 3 other CPUs; gathered, one (issue 20)."""
    path = os.path.join(FIXTURES, "threads-munmap.tlbt.gz")
    per_page = (await replay(cluster, path, flush="per-page"))["results"]
    gathered = (await replay(cluster, path))["results"]
    assert per_page["replay"]["address_spaces_on_several_cpus"] == 1
    assert per_page["ipis"] >= 4 * 64 * 3 and gathered["ipis"] * 20 < per_page["ipis"]
    assert trace_notes(per_page["replay"]) == []


@pytest.mark.parametrize("name, says", [
    ("ls-accesses.tlbt.gz", "IPIs are 0 whatever the policy"),
    ("sh-seq-sort.tlbt.gz", "holds no page accesses"),
    ("python-json-thread.tlbt.gz", "holds no page accesses")])
async def test_a_trace_that_cannot_show_a_policy_says_so(cluster, name, says):
    report = await replay(cluster, os.path.join(FIXTURES, name), flush="per-page")
    r = report["results"]
    if name.startswith("ls"):
        assert r["ipis"] == 0 and r["shootdowns"] > 0  # one CPU's mm: no other target
    else:
        assert r["faults"] == 0  # nothing touched: no PTE to clear page by page
    (note,) = trace_notes(r["replay"])
    assert says in note
    with output.console.capture() as cap:
        output.print_report(report)
    assert says in " ".join(cap.get().split())


def synthetic(tmp_path, *events) -> str:
    path = str(tmp_path / "synthetic.tlbt.gz")
    write_trace(path, {"source": "valgrind-lackey", "syscalls": {}}, events)
    return path


def mmap_event(address: int, pages: int) -> dict:
    return {"op": "mmap", "tid": 1, "addr": 0, "len": pages * 4096, "prot": "PROT_READ|PROT_WRITE",
            "flags": "MAP_PRIVATE|MAP_ANONYMOUS", "fd": -1, "ret": address}


def accesses(*pages: int) -> dict:
    packed = Pages()
    for page in pages:
        packed.add(page, True)
    return {"op": "access", "tid": 1, "pages": packed}


async def test_a_mapping_is_made_at_the_programs_own_address(cluster, tmp_path):
    """No translation: the pages the program touched are the simulator's (its page
    tables laid out as the program's were); a page outside every mapping gets its gap."""
    at = 0x7F12_3456_7000
    path = synthetic(tmp_path, mmap_event(at, 2), accesses(at >> 12, (at >> 12) + 1, 0x5555_5555))
    report = await replay(cluster, path)  # no exit: the mm, and the TLB, stay
    assert report["results"]["replay"]["implicit_mappings"] == 1
    dump = await cluster.client.cpus[0].stub.DumpTlb(cpu_pb2.DumpTlbRequest())
    assert {e.vpn for e in dump.entries} == {at >> 12, (at >> 12) + 1, 0x5555_5555}


@pytest.mark.parametrize("event, says", [
    (mmap_event(0x1000, 1), "line 2: a mapping of pages 0x1-0x2, outside the simulated user"),
    (accesses(3), "line 2: an access to page 0x3, outside the simulated user space")])
async def test_a_trace_outside_user_space_is_refused_naming_the_line(cluster, tmp_path,
                                                                     event, says):
    path = synthetic(tmp_path, event)
    with pytest.raises(InvalidArgument, match=re.escape(says)):
        await run(cluster.client, RunConfig("replay", Policy(), cpus=4, rounds=1, trace=path))


async def test_runs_go_one_at_a_time_in_the_traces_order(cluster, monkeypatch):
    """At full speed the replayer sends a run and goes on translating the events after
    it; the next run waits for its answer. The steps that reach the CPU are those of a
    paced replay (one event at a time), in the same order."""
    path = os.path.join(FIXTURES, "ls-accesses.tlbt.gz")
    real, sent, flying = Driver.run, [], []

    async def run_watched(self, cpu, steps):
        flying.append(1)
        assert len(flying) == 1, "two runs in flight"
        try:
            sent.append(list(steps))
            return await real(self, cpu, steps)
        finally:
            flying.pop()

    monkeypatch.setattr(Driver, "run", run_watched)
    merged = (await replay(cluster, path))["results"]
    runs, sent[:] = list(sent), []
    paced = (await run(cluster.client, RunConfig(
        "replay", Policy(deadline_s=10.0), cpus=4, rounds=1, trace=path,
        speed=1e9)))["results"]

    def calls(runs):
        steps = [s for r in runs for s in r]
        addresses = b"".join(s.access.packed_addresses for s in steps if s.HasField("access"))
        return [s for s in steps if not s.HasField("access")], addresses

    assert 2 <= len(runs) < merged["replay"]["access_batches"]
    assert calls(runs) == calls(sent)
    for key in ("faults", "segv", "tlb_hit_rate", "stale_accesses"):
        assert merged[key] == paced[key], key


async def test_a_failing_event_lets_the_run_in_flight_land_first(cluster, tmp_path):
    """The replayer sends a run and goes on; an event after it that is wrong ends the
    replay only once that run is answered: nothing of it is left running."""
    at = 0x7F00_0000_0000
    stranger = {"op": "access", "tid": 2, "pages": Pages()}
    stranger["pages"].add(at >> 12, False)
    path = synthetic(tmp_path, mmap_event(at, 64), accesses(*range(at >> 12, (at >> 12) + 64)),
                     stranger)
    with pytest.raises(InvalidArgument, match="line 4: task 2 appears without a clone"):
        await run(cluster.client, RunConfig("replay", Policy(), cpus=4, rounds=1, trace=path))
    flying = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Driver.run"]
    assert flying == []
