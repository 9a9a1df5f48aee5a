"""The in-process machine for domain tests (services/machine.py), and a helper."""
from __future__ import annotations

from services.machine import Machine, make_machine

__all__ = ["Machine", "make_machine", "proc", "PAGE"]

PAGE = 4096


async def proc(m: Machine, cpus, pages: int, write: bool = True, vma_writable: bool = True):
    """A process on `cpus` that touched `pages` pages: (mm, base address, addresses)."""
    mm = m.kernel.create_mm()
    for c in cpus:
        await m.switch(c, mm)
    r = await m.syscall(cpus[0], "mmap", pages, vma_writable)
    addrs = [r.address + i * PAGE for i in range(pages)]
    for c in cpus:
        await m.access(c, addrs, write=write)
    return mm, r.address, addrs
