"""The safety rules the kernel keeps, each named after the Linux code it mirrors.

Every rule is a place in the kernel that a simulator could plausibly get wrong.
`Kernel(broken=...)` skips the named rules on purpose: the mutation test
(tests/unit/test_mutations.py) breaks each one alone and checks that the oracle
or the audit catches it, so that no rule is kept unobserved. The deliberately
unsafe policy `--unsafe free-before-flush` is FLUSH_BEFORE_FREE broken.
"""
from __future__ import annotations

import enum


class Rule(enum.Enum):
    # Flushes the kernel issues.
    ZAP_FLUSH = "zap-flush"
    """munmap, madvise(DONTNEED), exit: the gather's flush (tlb_flush_mmu)."""
    COW_FLUSH = "cow-flush"
    """A write fault copying a page flushes the old translation (wp_page_copy:
    ptep_clear_flush)."""
    MPROTECT_FLUSH = "mprotect-flush"
    """mprotect removing write permission flushes (change_protection: tlb_flush_mmu)."""
    FORK_FLUSH = "fork-flush"
    """fork flushes the parent's TLBs once it write-protected them (dup_mmap:
    flush_tlb_mm(oldmm))."""
    UNSHARE_FLUSH = "unshare-flush"
    """A mm that stops mapping a shared page table flushes its CPUs before the sharer
    list is unlocked (huge_pmd_unshare's flush under i_mmap_lock)."""
    RECLAIM_FLUSH = "reclaim-flush"
    """Reclaim flushes the PTEs it cleared before freeing the pages
    (try_to_unmap_flush before free_unref_folios)."""
    FREED_TABLES_LAZY = "freed-tables-lazy"
    """A flush that frees or unshares page tables reaches lazy CPUs too, whose page
    walker may still walk them (x86 should_flush_tlb: info->freed_tables)."""
    BATCHED_PENDING = "batched-pending"
    """A PTE change that finds a reclaim flush of the mm still pending flushes the mm
    first (flush_tlb_batched_pending, from zap_pte_range and change_pte_range)."""
    NESTED_FLUSH = "nested-flush"
    """A gather that ran while another gather of the mm was in flight flushes the
    whole mm at its end (tlb_finish_mmu: mm_tlb_flush_nested)."""
    # Orders.
    FLUSH_BEFORE_FREE = "flush-before-free"
    """Frames are freed only after the flush that removed their translations
    completed (tlb_flush_mmu_tlbonly, then tlb_batch_pages_flush)."""
    CLEAR_BEFORE_FLUSH = "clear-before-flush"
    """A PTE is cleared before its flush is sent, so no CPU can refill it after the
    flush (zap_pte_range: ptep_get_and_clear_full, then the gather's flush)."""
    COW_CLEAR_FIRST = "cow-clear-first"
    """Copy-on-write installs the copy only after the old PTE was cleared and flushed
    (wp_page_copy: "Clear the pte entry and flush it first, before updating the pte
    with the new entry")."""


class Rules:
    """Which rules hold: all of them, unless some were broken on purpose."""

    def __init__(self, broken: frozenset[Rule] = frozenset()):
        self.broken = broken

    def keeps(self, rule: Rule) -> bool:
        return rule not in self.broken

    def breaks(self, rule: Rule) -> bool:
        return rule in self.broken
