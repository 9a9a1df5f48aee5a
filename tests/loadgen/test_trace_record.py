"""`tlbsim trace record --accesses` on real programs that fork, its bounded log, and its
clean-up on signals (issue 19). Real strace and valgrind, real processes."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from loadgen.runner import failed, run
from loadgen.scenarios import RunConfig
from loadgen.trace.fmt import read_trace
from services.common.policy import Policy
from tests.harness import InProcessCluster

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TLBSIM = [sys.executable, "-m", "loadgen"]
needs_tools = pytest.mark.skipif(not (shutil.which("strace") and shutil.which("valgrind")),
                                 reason="strace and valgrind are not installed")


def record(tmp_path, *argv, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*TLBSIM, "trace", "record", *argv], cwd=tmp_path, text=True,
                          capture_output=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


async def replayed(path: str) -> dict:
    async with InProcessCluster(cpus=4) as c:
        report = await run(c.client, RunConfig("replay", Policy(deadline_s=10.0), cpus=4,
                                                rounds=1, trace=path))
    assert not failed(report), report["violations"]
    return report["results"]


@needs_tools
@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed")
async def test_gcc_is_recorded_with_its_forks_and_replays_safely(tmp_path):
    (tmp_path / "hello.c").write_text('#include <stdio.h>\nint main(void) '
                                      '{ puts("hello"); return 0; }\n')
    done = record(tmp_path, "--accesses", "-o", "g.tlbt.gz", "--", "gcc", "-o", "hello",
                  "hello.c")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hello").exists()  # gcc itself worked under valgrind
    header, events = read_trace(str(tmp_path / "g.tlbt.gz"))
    assert header["source"] == "valgrind-lackey" and header["exit_status"] == 0
    # gcc forks cc1, as and collect2; it is the traced process, its children are not.
    assert header["syscalls"]["fork"] + header["syscalls"].get("clone", 0) >= 3
    assert header["access_pages"] > 10_000 and "truncated" not in header
    assert {e["tid"] for e in events} == {events[0]["tid"]}
    r = await replayed(str(tmp_path / "g.tlbt.gz"))
    assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
    assert r["replay"]["replayed"]["fork"] == header["syscalls"]["fork"]


@needs_tools
@pytest.mark.skipif(not shutil.which("cc"), reason="a C compiler is not installed")
async def test_the_shipped_multi_threaded_program_records_threads_that_share_pages(tmp_path):
    """tests/fixtures/programs/threads-munmap.c, built and recorded as its comment says
    (the fixture trace is this recording): every thread's writes land in its own task,
    so the replay puts the mapping in four TLBs and its munmaps send IPIs (issue 20)."""
    source = os.path.join(ROOT, "tests", "fixtures", "programs", "threads-munmap.c")
    subprocess.run(["cc", "-O1", "-pthread", "-o", str(tmp_path / "threads-munmap"), source],
                   check=True, timeout=120)
    done = record(tmp_path, "--accesses", "-o", "t.tlbt.gz", "--", "./threads-munmap")
    assert done.returncode == 0, done.stderr
    header, events = read_trace(str(tmp_path / "t.tlbt.gz"))
    assert header["syscalls"]["clone"] == 3 and header["syscalls"]["munmap"] >= 4
    writers = {e["tid"] for e in events if e["op"] == "access"
               and any(write for _, write in e["pages"])}
    assert len(writers) == 4  # the main thread and its three threads
    r = await replayed(str(tmp_path / "t.tlbt.gz"))
    assert r["replay"]["address_spaces_on_several_cpus"] == 1
    assert r["ipis"] >= 4 * 3  # each munmap of the shared mapping reaches the 3 others


@needs_tools
async def test_a_shell_that_forks_twice(tmp_path):
    done = record(tmp_path, "--accesses", "-o", "sh.tlbt.gz", "--", "/bin/sh", "-c",
                  "/bin/true; /bin/true")
    assert done.returncode == 0, done.stderr  # was: rc 2, "fork without a result"
    header, events = read_trace(str(tmp_path / "sh.tlbt.gz"))
    assert [e["call"] for e in events if e["op"] == "clone"] == ["fork", "fork"]
    r = await replayed(str(tmp_path / "sh.tlbt.gz"))
    assert r["replay"]["replayed"]["fork"] == 2 and r["stale_accesses"] == 0


@needs_tools
def test_the_lackey_log_is_bounded_and_the_trace_says_it_was_cut(tmp_path):
    done = record(tmp_path, "--accesses", "--accesses-limit", "2M", "-o", "ls.tlbt.gz",
                  "--", "/bin/ls", "/")
    assert done.returncode == 5, done.stderr  # cut short: the traced command's code
    assert "passed --accesses-limit" in done.stderr
    header, events = read_trace(str(tmp_path / "ls.tlbt.gz"))
    assert "2,097,152 bytes" in header["truncated"] and header["access_pages"] > 0
    whole = record(tmp_path, "--accesses", "-o", "all.tlbt.gz", "--", "/bin/ls", "/")
    assert whole.returncode == 0, whole.stderr
    assert read_trace(str(tmp_path / "all.tlbt.gz"))[0]["access_pages"] > \
        header["access_pages"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(check, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@needs_tools
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("phase", ["strace", "valgrind"])
def test_a_signal_stops_the_command_and_removes_the_temporary_files(tmp_path, sig, phase):
    """The first run (strace) marks that it ran; the second (valgrind) sleeps, so each
    phase can be caught in the middle. The command writes its pid."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ("if [ -e strace-done ]; then echo $$ > pid.valgrind; exec sleep 60; fi; "
              "touch strace-done; "
              f"if [ {phase} = strace ]; then echo $$ > pid.strace; exec sleep 60; fi")
    proc = subprocess.Popen([*TLBSIM, "trace", "record", "--accesses", "-o", "x.tlbt.gz",
                             "--", "sh", "-c", script], cwd=tmp_path, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pidfile = tmp_path / f"pid.{phase}"
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
        pid = int(pidfile.read_text())
        assert os.listdir(tmp), "the temporary folder exists while it runs"
        time.sleep(0.5)  # the command is asleep in the phase under test
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "temporary files removed" in err
    assert os.listdir(tmp) == []
    wait_for(lambda: not alive(pid), 10)  # the traced command did not outlive it
    assert not (tmp_path / "x.tlbt.gz").exists()


def test_a_command_that_does_not_exist_is_refused_before_anything_runs(tmp_path):
    for cmd, words in ((["/nonexistent/binary"], "no such file"),
                       (["no-such-command-tlbsim"], "command not found")):
        done = record(tmp_path, "-o", "t.tlbt.gz", "--", *cmd)
        assert done.returncode == 2 and words in done.stderr, done.stderr
    assert not (tmp_path / "t.tlbt.gz").exists()
