"""A CPU that dies mid-run: the shootdown in flight completes at the deadline, the CPU
is fenced, nothing goes stale, and it rejoins with an empty TLB when restarted."""
import asyncio

from loadgen.runner import run
from loadgen.scenarios import RunConfig
from services.common.policy import Policy
from tests.harness import InProcessCluster
from tlbsim.v1 import coordinator_pb2, cpu_pb2

DEADLINE = 0.5


async def test_killed_cpu_is_fenced_and_rejoins_flushed():
    async with InProcessCluster(cpus=4) as c:
        cfg = RunConfig("munmap", Policy(deadline_s=DEADLINE), cpus=4, pages=64, rounds=3)
        killed = asyncio.Event()

        def progress(done: int) -> None:
            if done == 1 and not killed.is_set():
                killed.set()
                asyncio.get_running_loop().create_task(c.stop_cpu(3))

        report = await run(c.client, cfg, progress)
        r = report["results"]
        assert r["rounds"] == 3
        assert 3 in r["fenced_cpus"] and r["deadline_misses"] >= 1
        assert r["munmap_latency_ms"]["p99"] >= DEADLINE * 1000  # waited for the deadline
        assert r["stale_accesses"] == 0 and r["audit_violations"] == 0
        assert r["pages_freed"] == 3 * 64  # the frames were freed once it was fenced

        cpus = await c.client.coordinator.ListCpus(coordinator_pb2.ListCpusRequest())
        assert [x.fenced for x in cpus.cpus if x.cpu == 3] == [True]

        restarted = await c.start_cpu(3)
        for _ in range(100):  # it registers by itself
            cpus = await c.client.coordinator.ListCpus(coordinator_pb2.ListCpusRequest())
            if [x.fenced for x in cpus.cpus if x.cpu == 3] == [False]:
                break
            await asyncio.sleep(0.05)
        assert [(x.fenced, x.address) for x in cpus.cpus if x.cpu == 3] == \
            [(False, restarted.address)]
        dump = await restarted.node.DumpTlb(cpu_pb2.DumpTlbRequest(), None)
        assert list(dump.entries) == [] and not dump.fenced

        again = await run(c.client, RunConfig("munmap", Policy(), cpus=4, pages=64, rounds=1))
        assert again["results"]["ipis"] == 3 and again["results"]["fenced_cpus"] == []
