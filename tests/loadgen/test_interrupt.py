"""Ctrl-C stops a run cleanly and still reports what was measured (issue 5)."""

import asyncio
import json
import os
import signal
import sys

from tests.harness import InProcessCluster
from tlbsim.v1 import memory_pb2

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


# A shell that started the tests in the background may have set SIGINT to "ignore",
# which children inherit: restore the default before exec (no preexec_fn: forking a
# process with gRPC threads is unsafe).
EXEC_WITH_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execv(sys.executable, [sys.executable, '-m', 'loadgen', *sys.argv[1:]])")


async def test_ctrl_c_prints_and_writes_what_ran(tmp_path):
    async with InProcessCluster(cpus=4) as c:
        before = (await c.client.memory.Stats(memory_pb2.MemoryStatsRequest())).epoch
        out = tmp_path / "r.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", EXEC_WITH_SIGINT, "load", "run", "munmap", "--cluster",
            c.coordinator.address, "--pages", "16", "--rounds", "100000", "--json", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        for _ in range(1200):  # until the run has reset the cluster and done some rounds
            stats = await c.client.memory.Stats(memory_pb2.MemoryStatsRequest())
            if stats.epoch > before and stats.shootdowns >= 3:
                break
            assert proc.returncode is None, (await proc.communicate())[1].decode()
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, stderr.decode()  # interrupted (README "Exit codes")
    assert "interrupted" in stderr.decode() and "stale accesses" in stdout.decode()
    report = json.loads(out.read_text())
    assert report["interrupted"] is True
    assert 2 <= report["results"]["rounds"] < 100000  # 3 munmaps were seen
    assert report["results"]["stale_accesses"] == 0
