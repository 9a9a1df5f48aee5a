"""Batched misses through the services over real gRPC: an Access of fresh pages makes one
read-ahead walk and one HandleMisses call, counts each fault, reports each fill to the
oracle, and leaves the TLB as one-at-a-time would have."""
from services.common.policy import Policy
from tests.harness import InProcessCluster
from tlbsim.v1 import common_pb2, cpu_pb2, memory_pb2

PAGE = 4096


async def test_an_access_of_fresh_pages_is_one_walk_and_one_batch_of_faults():
    async with InProcessCluster(cpus=1) as c:
        cl = c.client
        await cl.reset(Policy(), 1)
        node = c.cpus[0].node
        mm = (await cl.memory.CreateMm(memory_pb2.CreateMmRequest())).mm
        cpu = cl.cpus[0].stub
        await cpu.SwitchMm(cpu_pb2.SwitchMmRequest(mm=mm))
        base = (await cpu.Syscall(common_pb2.SyscallRequest(
            mmap=common_pb2.MmapArgs(pages=64, writable=True)))).address
        addresses = [base + i * PAGE for i in range(64)]
        # page 0 read first (the zero page), written at the end: its own fault, later
        r = await cpu.Access(cpu_pb2.AccessRequest(addresses=addresses + [base],
                                                   writes=b"\x00" + b"\x01" * 63 + b"\x01"))
        assert (r.accesses, r.misses, r.faults, r.segv) == (65, 65, 65, 0)
        assert len(r.fault_latency_s) == 65
        assert node.walks == {"batch": 0, "misses": 1, "miss": 1}  # each call one kind
        timed = {k: node.registry.get_sample_value("tlbsim_page_walk_duration_seconds_count",
                                                   {"cpu": "0", "kind": k})
                 for k in node.walks}
        assert timed == {"batch": 0, "misses": 1, "miss": 1}  # each round trip timed once
        stats = await cl.memory.Stats(memory_pb2.MemoryStatsRequest())
        assert stats.faults["anon"] == 64 and stats.faults["cow"] == 1  # the zero page's copy
        assert stats.stale_accesses == 0
        dump = await cpu.DumpTlb(cpu_pb2.DumpTlbRequest())
        assert len(dump.entries) == 64 and all(e.writable for e in dump.entries)
        r = await cpu.Access(cpu_pb2.AccessRequest(addresses=addresses))
        assert (r.hits, r.misses) == (64, 0)  # every fill is in the TLB
        checked = (await cl.memory.Stats(memory_pb2.MemoryStatsRequest())).faults
        assert checked == stats.faults
