"""shared-write — unshare storms: children write into ranges they share with the parent.

The parent (CPU 0) has --resident pages and forks --children (round-robin on the
other CPUs). Each round every child writes --pages pages spread over the range and
the parent reads a sample. With `--fork share`, a child's first write into a shared
table copies the table (unshare: one flush of that child's CPUs only), then the page
is copied on write. With a small `--frames`, reclaim also unmaps pages through the
shared tables (see swapout). With `--lock lock-all-sharers-unordered` the writers
lock every sharer in the wrong order: the validator refuses, the write fails cleanly
(counted as `aborted_writes`). Look at unshares, IPIs, lock wait, lock-order reports.
"""
from __future__ import annotations

import random

import grpc

from loadgen.scenarios import sharing
from loadgen.scenarios.base import Driver, Progress, RunConfig

# The options it reads (the others are accepted and ignored).
OPTIONS = ('cpus', 'pages', 'rounds', 'resident', 'children', 'fork')
# What the run table, compare and plots show first (names: loadgen/metrics.py).
HEADLINE = ["unshares", "aborted_writes", "lock_order_violations", "ipis"]


async def run(d: Driver, cfg: RunConfig, progress: Progress) -> None:
    cpus = d.cluster.cpus[:cfg.cpus]
    rnd = random.Random(cfg.seed)
    mm, base = await sharing.parent(d, cfg, cpus[0])
    children = await sharing.fork(d, cpus[0], cfg.children)
    writers = cpus[1:] or cpus[:1]
    aborted = 0

    async def write(cpu, child: int, pages: list[int]) -> None:
        nonlocal aborted
        await d.switch(cpu, child)
        for page in pages:
            try:
                await d.access(cpu, [page], write=True)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.ABORTED:  # a refused lock order: reported
                    raise
                aborted += 1

    for _ in d.rounds(cfg, progress):
        # Children on distinct CPUs write concurrently; more children than CPUs take turns.
        for i in range(0, len(children), len(writers)):
            batch = children[i:i + len(writers)]
            await d.gather(*(write(c, child, sharing.sample(cfg, base, cfg.pages, rnd))
                                   for c, child in zip(writers, batch)))
        await d.access(cpus[0], sharing.sample(cfg, base, 64, rnd))
    d.m.extra.update(aborted_writes=aborted, children=len(children))
