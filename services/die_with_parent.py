"""`python -m services.die_with_parent PID CMD...`: exec CMD so that the kernel sends it
SIGTERM when process PID (the launcher) dies.

The launcher used to set the death signal in a `preexec_fn`, but that forces a plain
fork(), and forking a process whose gRPC threads are busy can abort the child in
gRPC's fork handlers. This trampoline is spawned without `preexec_fn` (vfork/spawn,
no fork handlers), sets the death signal, checks the launcher is still its parent,
and replaces itself with CMD (the death signal survives exec)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, cmd = int(argv[0]), argv[1:]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before we could ask
        sys.exit(1)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
