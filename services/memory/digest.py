"""A fingerprint of the simulated machine's state, for tests that check a rejected
call changed nothing: page tables, frames, mms and their VMAs, loaded mms, swap,
and the oracle's and kernel's counters. Pure; O(state), so tests ask for it
explicitly (MemoryStatsRequest.digest) rather than with every Stats call."""
from __future__ import annotations

import hashlib

from services.common.stats import Samples  # timings, not state (and no stable repr)
from services.memory.pagetable import PageTable, PteTable


def _table(h, table: PageTable) -> None:
    h.update(repr((table.level, table.base_vpn, table.pfn, table.present)).encode())
    if isinstance(table, PteTable):
        h.update(repr((table.share_count, table.wp, table.seq, table.sharers)).encode())
        h.update(table.entries.tobytes())
        h.update(table.tids.tobytes())
        return
    for slot, child in enumerate(table.entries):
        if child is not None:
            h.update(slot.to_bytes(2, "little"))
            _table(h, child)


def kernel_digest(kernel) -> str:
    h = hashlib.blake2b(digest_size=16)
    f = kernel.frames
    h.update(repr((f.budget, f.used, f.freed_total, len(f._free))).encode())
    for column in (f.refcount, f.mapcount, f.gen, f.rmap_vpn, f.rmap_family):
        h.update(column.tobytes())
    for mm_id in sorted(kernel.mms):
        mm = kernel.mms[mm_id]
        h.update(repr((mm_id, mm.exited, mm.tlb_gen, mm.tlb_flush_pending, sorted(mm.cpumask),
                       mm.next_vpn, mm.family,
                       [(v.start, v.end, v.writable) for v in mm.vmas])).encode())
        _table(h, mm.pgd)
    s = kernel.stats
    counters = [(k, sorted(v.items()) if isinstance(v, dict) else
                 sorted(v) if isinstance(v, set) else v)
                for k, v in sorted(vars(s).items()) if not isinstance(v, (list, Samples))]
    h.update(repr((sorted(kernel.cpu_mm.items()), counters,
                   sorted(kernel.swap._refs.items()), sorted(kernel.swap._cache.items()),
                   len(kernel.lru),
                   kernel.oracle.stale, kernel.oracle.checked,
                   len(kernel.oracle.revoked))).encode())
    return h.hexdigest()
