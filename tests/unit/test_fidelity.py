"""Counts that follow Linux (≈ v6.18): the shared notes' count divergences
(attacks/test_attacks.py D-T), rewritten to assert what the kernel does, each with the
kernel function it follows. In-process machine, no network."""
import pytest

from tests.unit.machine import make_machine

PAGE = 4096


async def proc(m, cpus, pages, write=True, vma_writable=True):
    mm = m.kernel.create_mm()
    for c in cpus:
        await m.switch(c, mm)
    r = await m.syscall(cpus[0], "mmap", pages, vma_writable)
    addrs = [r.address + i * PAGE for i in range(pages)]
    for c in cpus:
        await m.access(c, addrs, write=write)
    return mm, r.address, addrs


# O. mm/vmscan.c shrink_folio_list: try_to_unmap_flush() before free_unref_folios, once per
#    call, and a call takes at most SWAP_CLUSTER_MAX (32) isolated folios.
@pytest.mark.parametrize("batch,per_flush", [(32, (16, 32)), (0, (512, 10**9))])
async def test_O_reclaim_flushes_once_per_32_pages_unless_told_otherwise(batch, per_flush):
    m = make_machine(2, frames=16384, reclaim_batch=batch)
    k = m.kernel
    await proc(m, (0, 1), 16384 - 600)
    more = await m.syscall(0, "mmap", 2000, True)
    await m.access(0, [more.address + i * PAGE for i in range(2000)], write=True)
    pages_per_flush = k.stats.swap_outs / k.stats.reclaim_shootdowns
    assert per_flush[0] <= pages_per_flush <= per_flush[1]
    assert k.oracle.stale == 0 and k.audit(m.dumps())[1] == []
