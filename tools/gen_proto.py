#!/usr/bin/env python3
"""Generate the Python gRPC code for proto/ into gen/ (or check it is current).

    python tools/gen_proto.py           # regenerate gen/
    python tools/gen_proto.py --check   # exit 1 if gen/ differs from a fresh run
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
# Only files protoc or this script write are ever deleted, so a wrong
# --out-dir cannot wipe hand-written code.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_dir: Path) -> list[Path]:
    files = sorted(proto_dir.rglob("*.proto"))
    if not files:
        raise SystemExit(f"gen_proto: no .proto files under {proto_dir}")
    return files


def is_generated(path: Path) -> bool:
    if path.name.endswith(GENERATED_SUFFIXES):
        return True
    return path.name == "__init__.py" and path.stat().st_size == 0


def clean(out_dir: Path) -> None:
    """Delete previously generated files so removed protos leave nothing behind."""
    if not out_dir.is_dir():
        return
    for path in sorted(out_dir.rglob("*"), reverse=True):
        if path.is_file() and (is_generated(path) or path.suffix == ".pyc"):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def generate(proto_dir: Path, out_dir: Path) -> None:
    clean(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # `python -m grpc_tools.protoc` adds the well-known types' include dir
    # itself; calling protoc.main directly does not.
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in proto_files(proto_dir)),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("gen_proto: protoc failed")
    write_package_inits(proto_dir, out_dir)


def write_package_inits(proto_dir: Path, out_dir: Path) -> None:
    """protoc writes no __init__.py; the packages (tlbsim, tlbsim.v1) need them."""
    for proto in proto_files(proto_dir):
        package = (out_dir / proto.relative_to(proto_dir)).parent
        while package != out_dir:
            (package / "__init__.py").touch()
            package = package.parent


def tree(root: Path) -> set[str]:
    """Relative paths of the files under root, less caches and dotfiles
    (the Makefile keeps its stamp, gen/.stamp, there)."""
    if not root.is_dir():
        return set()
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    }


def first_difference(expected: Path, actual: Path) -> str | None:
    want, have = tree(expected), tree(actual)
    for name in sorted(want | have):
        if name not in have:
            return f"{name} is missing"
        if name not in want:
            return f"{name} is stale (no longer generated)"
        if not filecmp.cmp(expected / name, actual / name, shallow=False):
            return f"{name} differs"
    return None


def check(proto_dir: Path, out_dir: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="gen_proto-") as tmp:
        fresh = Path(tmp)
        generate(proto_dir, fresh)
        problem = first_difference(fresh, out_dir)
    if problem:
        print(f"gen_proto: {out_dir}/{problem}; run `make gen`", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proto-dir", type=Path, default=ROOT / "proto")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "gen")
    parser.add_argument("--check", action="store_true",
                        help="compare with a fresh generation instead of writing")
    args = parser.parse_args(argv)
    proto_dir, out_dir = args.proto_dir.resolve(), args.out_dir.resolve()
    if args.check:
        return check(proto_dir, out_dir)
    generate(proto_dir, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
