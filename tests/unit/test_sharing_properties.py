"""Property-based: random fork (copy/share) / read / write / munmap / exit sequences,
checked after every step against a simple reference model — what each process
reads at each address — and the kernel's own bookkeeping: refcounts and mapcounts
equal the PTEs that reference a frame, share counts equal the mms mapping a table,
no frame leaks, and the oracle and the audit stay clean."""
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from services.common.addresses import PTRS_PER_TABLE
from services.memory.pagetable import pte_pfn
from tests.unit.machine import make_machine

PAGES = 600  # two PTE tables, the second partly used
EXAMPLES = int(os.environ.get("TLBSIM_PROPERTY_EXAMPLES", "40"))

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 7), st.integers(0, PAGES - 1)),
    st.tuples(st.just("read"), st.integers(0, 7), st.integers(0, PAGES - 1)),
    st.tuples(st.just("fork"), st.integers(0, 7), st.sampled_from(["copy", "share"])),
    st.tuples(st.just("munmap"), st.integers(0, 7), st.tuples(st.integers(0, PAGES - 1),
                                                             st.integers(1, 520))),
    st.tuples(st.just("exit"), st.integers(0, 7), st.none()),
)


def reachable(k, mm):
    """Every table of an mm (all levels), and its PTE tables."""
    tables, ptes = [], []

    def visit(t):
        tables.append(t)
        if t.level == 1:
            ptes.append(t)
            return
        for child in t.entries:
            if child is not None:
                visit(child)

    visit(mm.pgd)
    return tables, ptes


def check(m, model, content):
    k = m.kernel
    live = [mm for mm in k.mms.values() if not mm.exited]
    # What every process would read is what the model says.
    for mm in live:
        for vpn, value in model[mm.id].items():
            pte_table = k.tables.pmd_of(mm, vpn)
            table = pte_table.entries[pte_table.slot(vpn)] if pte_table else None
            pte = table.entries[vpn % PTRS_PER_TABLE] if table else 0
            assert pte > 0, (mm.id, vpn)
            pfn = pte_pfn(pte)
            assert content.get((pfn, k.frames.gen[pfn]), 0) == value, (mm.id, vpn)
    # Counts: each present PTE slot is one reference and one mapping; a shared table
    # is one set of PTEs however many mms map it.
    refs, sharers, all_tables = {}, {}, {}
    for mm in live:
        tables, ptes = reachable(k, mm)
        for t in tables:
            all_tables[t.uid] = t
        for t in ptes:
            sharers.setdefault(t.uid, set()).add(mm.id)
    for uid, mms in sharers.items():
        t = all_tables[uid]
        assert t.share_count == len(mms) - 1
        assert (t.sharers is None) == (len(mms) == 1)
        if t.sharers:
            assert {m_ for m_, _ in t.sharers} == mms
        assert k.frames.refcount[t.pfn] == 1  # sharing never touches the refcount
        for pte in t.entries:
            if pte > 0:
                refs[pte_pfn(pte)] = refs.get(pte_pfn(pte), 0) + 1
    zero = k.k.zero_pfn  # the zero page: pinned, one reference more than its maps
    for pfn, n in refs.items():
        assert k.frames.refcount[pfn] == n + (pfn == zero) and k.frames.mapcount[pfn] == n
    data = set(refs) - {zero}
    assert k.frames.used == len(data) + len(all_tables) + k.reserved_frames  # nothing leaked
    assert k.oracle.stale == 0
    assert k.audit(m.dumps())[1] == []


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(op, min_size=1, max_size=25))
async def test_random_sequences_match_the_reference_model(ops):
    m = make_machine(1)
    k = m.kernel
    first = k.create_mm()
    await m.switch(0, first)
    base = (await m.syscall(0, "mmap", PAGES, True)).address >> 12
    model = {first: {}}
    content: dict[tuple[int, int], int] = {}
    stamp = 0
    for kind, who, arg in ops:
        live = sorted(mm for mm in model if not k.mms[mm].exited)
        mm = live[who % len(live)]
        await m.switch(0, mm)
        if kind == "write":
            stamp += 1
            vpn = base + arg
            if vpn not in k.mms[mm].vmas and not k.mms[mm].find_vma(vpn):
                continue
            await m.access(0, [vpn << 12], write=True)
            pfn = k.walk(0, mm, [vpn])[0][0]
            content[(pfn, k.frames.gen[pfn])] = stamp
            model[mm][vpn] = stamp
        elif kind == "read":
            vpn = base + arg
            if k.mms[mm].find_vma(vpn) is None:
                continue
            await m.access(0, [vpn << 12])
            model[mm].setdefault(vpn, 0)
        elif kind == "fork":
            k.policy = k.policy.__class__(fork=arg)
            child = (await m.syscall(0, "fork")).child_mm
            model[child] = dict(model[mm])
        elif kind == "munmap":
            start, n = arg
            await m.syscall(0, "munmap", (base + start) << 12, n)
            for vpn in range(base + start, base + start + n):
                model[mm].pop(vpn, None)
        elif kind == "exit" and len(live) > 1:
            await m.syscall(0, "exit")
            del model[mm]
        check(m, {i: v for i, v in model.items()}, content)
