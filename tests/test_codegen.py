"""tools/gen_proto.py --check: passes on the committed protos, fails on a change."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELD = re.compile(r"^(\s+(?:repeated\s+|optional\s+)?[\w.]+\s+)(\w+)(\s*=\s*\d+\s*;)", re.M)


def gen_proto(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), *args],
        capture_output=True, text=True, timeout=60,
    )


def rename_first_field(proto_dir: Path) -> Path:
    """Rename one field in the first .proto that has one; return that file."""
    for proto in sorted(proto_dir.rglob("*.proto")):
        text = proto.read_text()
        changed, count = FIELD.subn(r"\1\2_renamed\3", text, count=1)
        if count:
            proto.write_text(changed)
            return proto
    raise AssertionError(f"no field found in {proto_dir}")


def test_gen_is_current() -> None:
    result = gen_proto("--check")
    assert result.returncode == 0, result.stderr


def test_check_fails_when_a_proto_changes(tmp_path: Path) -> None:
    protos, out = tmp_path / "proto", tmp_path / "gen"
    shutil.copytree(ROOT / "proto", protos)
    assert gen_proto("--proto-dir", str(protos), "--out-dir", str(out)).returncode == 0
    assert gen_proto("--proto-dir", str(protos), "--out-dir", str(out), "--check").returncode == 0

    changed = rename_first_field(protos)
    result = gen_proto("--proto-dir", str(protos), "--out-dir", str(out), "--check")

    assert result.returncode != 0
    assert f"{changed.stem}_pb2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
