"""Mutation test of the safety net: break each safety rule alone (services/memory/
rules.py) and check that the oracle or the audit catches it on a fixed set of
scenarios — so that no flush and no ordering rule is kept unobserved. With every
rule kept, every scenario is clean.

Run with -s to see which scenario caught which rule, and by what:
    .venv/bin/python -m pytest -q -s tests/unit/test_mutations.py -k table
"""
import asyncio

import pytest

from services.memory.pagetable import walk
from services.memory.rules import Rule
from tests.unit.machine import PAGE
from tests.unit.workbench import Workbench


async def munmap_with_readers(wb: Workbench) -> None:
    mm, base, addrs = await wb.process((0, 1, 2, 3), 64, write=False)
    await wb.syscall(0, "munmap", base, 16)          # ranged: the others keep reading
    await wb.everyone_runs()
    await wb.syscall(0, "munmap", base + 16 * PAGE, 48)  # the rest, and the tables
    await wb.everyone_runs()


async def madvise_with_writers(wb: Workbench) -> None:
    mm, base, addrs = await wb.process((0, 1, 2), 600, write=True)
    await wb.syscall(0, "madvise_dontneed", base, 600)  # full: over the ceiling
    await wb.everyone_runs()


async def lazy_cpu_and_freed_tables(wb: Workbench) -> None:
    mm, base, addrs = await wb.process((0, 1, 2), 32, write=False)
    del wb.ws[2]
    await wb.switch(2, 0)                            # idle, keeping the mm (lazy TLB)
    await wb.syscall(0, "munmap", base, 32)          # frees the PTE table
    await wb.everyone_runs()


async def mprotect_with_writers(wb: Workbench) -> None:
    mm, base, addrs = await wb.process((0, 1, 2), 32, write=True)
    await wb.syscall(0, "mprotect", base, 8, False)
    await wb.everyone_runs()                         # their writes to 8 pages now fault


async def fork_with_writers(wb: Workbench) -> None:
    mm, base, addrs = await wb.process((0, 1), 16, write=True)
    await wb.syscall(0, "fork")
    await wb.everyone_runs()                         # CPU 1's writes must COW now


async def cow_after_fork(wb: Workbench) -> None:
    mm, base, (V, FLAG) = await wb.process((0,), 2, write=True)
    await wb.syscall(0, "fork")
    for c in (1, 2):
        await wb.switch(c, mm)
    await wb.access(2, [V])                          # CPU 2 caches the old page, RO
    wb.ws[2] = type(wb.ws[0])([V], False)
    writer = []

    def during_cow(order):
        if order.reason == "cow" and not writer:     # CPU 0 writes V meanwhile
            writer.append(asyncio.ensure_future(wb.access(0, [V, V], write=True)))

    wb.hooks.append(during_cow)
    await wb.access(1, [V], write=True)              # CPU 1 breaks the COW
    await asyncio.gather(*writer)
    await wb.everyone_runs()


async def share_and_unshare(wb: Workbench) -> None:
    mm, base, addrs = await wb.process((0, 1), 64, write=False)
    child = (await wb.syscall(0, "fork")).child_mm
    for c in (2, 3):
        await wb.switch(c, child)
        await wb.access(c, addrs)
        wb.ws[c] = type(wb.ws[0])(addrs, False)
    await wb.access(2, [addrs[5]], write=True)       # unshare in the child
    await wb.everyone_runs()
    await wb.access(1, [addrs[9]], write=True)       # and in the parent
    await wb.everyone_runs()
    await wb.syscall(2, "munmap", base, 64)
    await wb.everyone_runs()


async def reclaim_with_readers(wb: Workbench) -> None:
    mm, base, addrs = await wb.process((1, 2), 60, write=True)
    other = wb.k.create_mm()
    await wb.switch(0, other)
    more = await wb.syscall(0, "mmap", 200, True)
    await wb.access(0, [more.address + i * PAGE for i in range(200)], write=True)
    await wb.everyone_runs()


async def _hold_first(wb: Workbench, reason: str):
    """The first shootdown of `reason` waits (in flight) until `release` is set."""
    started, release = asyncio.Event(), asyncio.Event()

    async def hook(order):
        if order.reason == reason and not started.is_set():
            started.set()
            await release.wait()

    wb.hooks.append(hook)
    return started, release


async def _started(started: asyncio.Event, task: asyncio.Future) -> None:
    """Until the held shootdown is in flight — or the task ended without sending it
    (a rule broken on purpose skipped it)."""
    waiter = asyncio.ensure_future(started.wait())
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


async def mprotect_racing_reclaim(wb: Workbench) -> None:
    """A reclaim flush in flight while mprotect(RO) changes a page it reclaimed."""
    mm, base, addrs = await wb.process((1, 2), 60, write=True)
    other = wb.k.create_mm()
    await wb.switch(0, other)
    more = await wb.syscall(0, "mmap", 200, True)
    started, release = await _hold_first(wb, "reclaim")
    pressure = asyncio.ensure_future(
        wb.access(0, [more.address + i * PAGE for i in range(200)], write=True))
    await _started(started, pressure)
    victim = next(x for x in addrs if walk(wb.k.mms[mm].pgd, x >> 12).entries[(x >> 12) % 512] < 0)
    await wb.syscall(2, "mprotect", victim, 1, False)
    wb.ws[1] = type(wb.ws[1])([victim], True)
    wb.background(1)                                 # CPU 1 writes the page after it returned
    await wb.settle()
    release.set()
    await pressure
    await wb.quiesce()


async def nested_madvise(wb: Workbench) -> None:
    mm, base, addrs = await wb.process((0, 1, 2), 1024, write=False)
    V = addrs[100]
    started, release = await _hold_first(wb, "madvise")
    first = asyncio.ensure_future(wb.syscall(0, "madvise_dontneed", V, 600))
    await _started(started, first)
    await wb.syscall(2, "madvise_dontneed", V, 1)    # finds V already clear
    wb.ws[1] = type(wb.ws[1])([V], False)
    wb.background(1)                                 # CPU 1 reads V after that returned
    await wb.settle()
    release.set()
    await first
    await wb.quiesce()


SCENARIOS = [  # (scenario, policy)
    (munmap_with_readers, {}),
    (madvise_with_writers, {}),
    (lazy_cpu_and_freed_tables, {}),
    (mprotect_with_writers, {}),
    (fork_with_writers, {}),
    (cow_after_fork, {}),
    (share_and_unshare, {"fork": "share"}),
    (reclaim_with_readers, {"frames": 256}),
    (mprotect_racing_reclaim, {"frames": 256}),
    (nested_madvise, {}),
]


async def run(scenario, policy, broken=frozenset()) -> list[str]:
    wb = Workbench(4, broken=broken, **policy)
    await scenario(wb)
    await wb.quiesce()
    return wb.findings()


@pytest.mark.parametrize("scenario,policy", SCENARIOS, ids=[s.__name__ for s, _ in SCENARIOS])
async def test_every_scenario_is_clean_with_every_rule_kept(scenario, policy):
    assert await run(scenario, policy) == []


async def caught_by(rule: Rule) -> dict[str, list[str]]:
    out = {}
    for scenario, policy in SCENARIOS:
        findings = await run(scenario, policy, frozenset({rule}))
        if findings:
            out[scenario.__name__] = findings
    return out


@pytest.mark.parametrize("rule", list(Rule), ids=[r.value for r in Rule])
async def test_breaking_any_rule_is_caught_by_the_oracle_or_the_audit(rule):
    assert await caught_by(rule), f"{rule.value} broken and nothing noticed it"


async def test_table_of_what_catches_each_broken_rule(capsys):
    """Not an assertion beyond the one above: the table for the README and the notes."""
    rows = []
    for rule in Rule:
        for name, findings in (await caught_by(rule)).items():
            rows.append(f"{rule.value:20} {name:26} {'; '.join(findings)[:110]}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert rows
