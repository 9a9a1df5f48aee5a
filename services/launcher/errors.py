"""What goes wrong starting or finding a local cluster: tlbsim errors like any other
(services/common/errors.py), so every command prints one line and exits with the code
its kind means (no cluster: 4; a bad option or state file: 2)."""
from __future__ import annotations

from services.common.errors import InvalidArgument, Unavailable


class LauncherError(Unavailable):
    """The cluster cannot be started, found or reached; the message says what to do."""


class UsageError(InvalidArgument, LauncherError):
    """A bad option of `up`/`down`, or a state file that is not one."""


class AlreadyRunning(UsageError):
    """`tlbsim up` with a state file whose cluster still runs."""
