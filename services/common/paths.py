"""Output paths checked before any work starts, so a run's results are never lost to
a path they cannot be written to (a directory, a missing folder, /proc, a device)."""
from __future__ import annotations

import os
from pathlib import Path

from services.common.errors import InvalidArgument


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_writable_file(path: str | os.PathLike | None, option: str,
                        stdout_ok: bool = False) -> None:
    """`path` is (or can be created as) a regular file this process may write; `-` is
    standard output where `stdout_ok`. Raises InvalidArgument naming `option`."""
    if path is None or path == "":
        return
    if stdout_ok and os.fspath(path) == "-":
        return
    p = Path(path)
    what = f"{option} {os.fspath(path)}"
    if p.is_dir():
        raise InvalidArgument(f"{what}: is a directory; give a file name")
    if p.exists():
        if not p.is_file():
            raise InvalidArgument(f"{what}: not a regular file")
        try:
            with open(p, "ab"):  # touches nothing: the file stays as it is until written
                pass
        except OSError as e:
            raise InvalidArgument(f"{what}: cannot write it: {_reason(e)}") from None
        return
    parent = p.parent
    if not parent.is_dir():
        raise InvalidArgument(f"{what}: the folder {os.fspath(parent)} does not exist")
    try:
        with open(p, "xb"):
            pass
    except OSError as e:
        raise InvalidArgument(f"{what}: cannot create it: {_reason(e)}") from None
    p.unlink()  # only the check created it; the results write it later


def check_writable_dir(path: str | os.PathLike | None, option: str) -> None:
    """`path` is (or can be made, with its parents) a folder this process may write in."""
    if path is None or path == "":
        return
    p = Path(path)
    what = f"{option} {os.fspath(path)}"
    if p.exists() and not p.is_dir():
        raise InvalidArgument(f"{what}: not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".tlbsim-write-check-{os.getpid()}"
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as e:
        raise InvalidArgument(f"{what}: cannot write in it: {_reason(e)}") from None
