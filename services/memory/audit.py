"""The audit (DESIGN.md §6): at a quiescent point, every TLB entry of every CPU
against the page tables."""
from __future__ import annotations

from typing import TypedDict

from services.common.addresses import PTRS_PER_TABLE
from services.memory.pagetable import pte_pfn, tid_table, walk
from services.memory.state import KernelState

TlbEntry = tuple[int, int, int, bool, int]  # (mm, vpn, pfn, writable, tid)


class TlbDump(TypedDict):
    cpu: int
    fenced: bool
    loaded_mm: int
    lazy: bool
    local_gen: dict[int, int]
    entries: list[TlbEntry]


def audit(k: KernelState, dumps: list[TlbDump]) -> tuple[int, list[str]]:
    """Returns (entries checked, violations). An entry that no longer matches its PTE
    is a violation unless the CPU legitimately has not caught up: it is not running
    that mm (or is lazy) and its generation for the mm is behind — it flushes at its
    next switch_mm. A lazy CPU still has the mm's page tables loaded, and its page
    walker may walk them: it may hold nothing through a table the mm no longer maps
    (freed or unshared), which is why such flushes reach lazy CPUs. Fenced CPUs cannot
    execute and are skipped."""
    checked, violations = 0, []
    for d in dumps:
        if d["fenced"]:
            continue
        for mm_id, vpn, pfn, writable, tid in d["entries"]:
            checked += 1
            mm = k.mms.get(mm_id)
            where = f"cpu {d['cpu']}: mm {mm_id} vpn {vpn:#x} -> pfn {pfn}"
            if mm is None:
                violations.append(f"{where}: no such mm")
                continue
            table = None if mm.exited else walk(mm.pgd, vpn)
            behind = d["local_gen"].get(mm_id, 0) < mm.tlb_gen
            running = d["loaded_mm"] == mm_id and not d["lazy"]
            if behind and not running:
                if d["loaded_mm"] == mm_id and (table is None or table.uid != tid_table(tid)):
                    violations.append(f"{where}: a lazy CPU holds a translation through "
                                      "a page table the mm no longer maps")
                continue
            slot = vpn % PTRS_PER_TABLE
            pte = table.entries[slot] if table is not None else 0
            if table is None or pte <= 0 or pte_pfn(pte) != pfn:
                now = {0: "nothing"}.get(pte, "a swap entry" if pte < 0 else
                                         f"pfn {pte_pfn(pte)}")
                violations.append(f"{where}: the PTE now maps {now}")
            elif not k.oracle.entry_valid(tid, writable, table.tids[slot], mm_id):
                violations.append(f"{where}: translation {tid} was revoked"
                                  f"{' (writable, PTE read-only)' if writable else ''}")
    k.stats.audit_violations += len(violations)
    return checked, violations
