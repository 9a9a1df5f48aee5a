"""The memory service's RSS per resident page, alone: `tlbsim bench`'s RSS rows
(loadgen.bench.memory_rss_per_page) on a local cluster of one CPU, without the
bench's other rows (which take minutes). Usage: tools/rss_per_page.py [PAGES...]
(default: 100000 1000000)."""
from __future__ import annotations

import asyncio
import sys

from loadgen.bench import RSS_PAGES, memory_rss_per_page, print_rss
from loadgen.cluster import Cluster
from services.launcher import LocalCluster


async def measure(coordinator: str, pid: int, sizes: tuple[int, ...]) -> dict:
    async with Cluster(coordinator) as cluster:
        await cluster.discover(1, wait_s=30)
        return await memory_rss_per_page(cluster, pid, sizes)


def main(argv: list[str]) -> int:
    sizes = tuple(sorted(int(a) for a in argv)) or RSS_PAGES
    with LocalCluster() as local:  # stops every process, also on Ctrl-C
        info = local.start(1)
        print_rss(asyncio.run(measure(info.coordinator, info.pids["memory"], sizes)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
