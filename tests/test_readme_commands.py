"""Every `tlbsim …` command the README shows works as written (issue 19).

Each fenced `sh` block of README.md is read; every line that starts with `tlbsim ` (with
its `\\` continuations joined, split at `&&`, and the `tlbsim …` after `kubectl … --`)
goes through the real parser and the same checks a run makes before it touches a
cluster. Then the cheap blocks run for real, line by line in bash, in a scratch folder,
against clusters they start themselves with `tlbsim up` on loopback (a block with no
`up` of its own gets a standing cluster); a `# exit N` comment is the code the line
must exit with, otherwise 0.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from loadgen.cli.options import config_from
from loadgen.cli.load import plan_compare
from loadgen.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # .venv/bin: where `make setup` installs tlbsim

# Blocks not run for real (they are still parsed and checked), by a line they hold.
NOT_RUN = {
    "tlbsim load compare munmap --a flush=per-page --b flush=gather --cpus 4 --rounds 5":
        "60 runs of per-page munmaps and fault-scaling (minutes); "
        "tests/loadgen/test_compare.py runs compare and sweep",
    "tlbsim load run munmap --cost-model invlpgb":
        "a 6-value sweep: 12 runs; tests/loadgen/test_costbench.py measures the crossover",
    "tlbsim bench --rounds 500 --json bench.json": "minutes on a 9-CPU cluster",
    "tlbsim load run munmap --state /tmp/X.state --json munmap.json   # each scenario, twice":
        "issue 15's before/after table: needs a worktree of an old commit and its setup",
    "tlbsim up --cpus 4 --prometheus": "runs in the foreground until Ctrl-C; "
                                       "tests/observability starts Prometheus",
    "tlbsim up --cpus 4 --detach && tlbsim load run munmap --cpus 4 && tlbsim down":
        "needs certificates (TLBSIM_TLS_*); tests/integration/test_security.py",
    "tlbsim reproduce lameter-2005 --json lameter.json":
        "minutes on up to 64 CPUs in virtual time; tests/loadgen/test_virtual.py runs the "
        "mode, tests/loadgen/test_reproduce.py a table",
    "tlbsim up --cpus 256 --detach":
        "256 CPUs and minutes of fault-scaling on 2 cores; tests/test_cohost_processes.py "
        "runs co-hosted CPUs",
    "tlbsim chaos partition --cpu 2 --for 3":
        "chaos is tests/test_chaos_processes.py's (real processes, every kind)",
    "tlbsim trace record --accesses -o threads-munmap.tlbt.gz -- ./threads-munmap":
        "needs a C compiler, which setup does not install; "
        "tests/loadgen/test_trace_record.py builds and records it (skipped without cc)",
}


def sh_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.S | re.M)


def lines_of(block: str) -> list[str]:
    """The block's shell lines with their `\\` continuations joined."""
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def expected_exit(line: str) -> int:
    m = re.search(r"#\s*exit (\d+)", line)
    return int(m.group(1)) if m else 0


def tlbsim_commands(line: str) -> list[list[str]]:
    """argv of every tlbsim command of one shell line (comments dropped, `&&` split)."""
    words = shlex.split(line, comments=True)
    commands, current = [], []
    for word in words + ["&&"]:
        if word in ("&&", ";", "|"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(word)
    found = []
    for cmd in commands:
        if cmd[0] == "tlbsim":
            found.append(cmd)
        elif "--" in cmd and cmd[cmd.index("--") + 1:cmd.index("--") + 2] == ["tlbsim"]:
            found.append(cmd[cmd.index("--") + 1:])  # kubectl exec … -- tlbsim …
    return found


def readme_commands() -> list[list[str]]:
    return [argv for block in sh_blocks() for line in lines_of(block)
            for argv in tlbsim_commands(line)]


def test_the_readme_shows_many_commands():
    commands = readme_commands()
    assert len(commands) >= 35
    assert ["tlbsim", "up", "--cpus", "4", "--mqtt", "--detach"] in commands
    assert all(any(key in " ".join(lines_of(b)) for b in sh_blocks()) for key in NOT_RUN), \
        "a NOT_RUN entry names no README line any more"


def check_before_running(args: argparse.Namespace) -> None:
    """What the command itself checks before it touches a cluster."""
    name = getattr(args.func, "__name__", "")
    if name == "_run":
        config_from(args, args.scenario)
    elif name == "_replay":
        config_from(argparse.Namespace(**{**vars(args), "trace": args.file}), "replay")
    elif name == "_compare" and (os.path.isfile(args.scenario) or
                                 not args.scenario.endswith(".gz")):
        plan_compare(args)


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_every_readme_command_parses(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the output checks create and remove their files here
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv[1:])
        assert e.value.code == 0
        return
    args = build_parser().parse_args(argv[1:])  # a usage error is SystemExit: fails
    check_before_running(args)


# --- run for real -----------------------------------------------------------------------
def run_block(lines: list[str], cwd: Path, env: dict) -> tuple[list[int], str, str]:
    """The lines in one bash, in order (so `. .venv/bin/activate` lasts); each line's
    exit code, and what the block printed."""
    script = "".join(f"{line}\nprintf '\\n::rc %d::\\n' $? >&2\n" for line in lines)
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    return [int(rc) for rc in re.findall(r"^::rc (\d+)::$", done.stderr, re.M)], \
        done.stdout, done.stderr


def blocks_to_run() -> list[list[str]]:
    return [lines_of(b) for b in sh_blocks()
            if any(line.startswith("tlbsim ") for line in lines_of(b))
            and not any(key in " ".join(lines_of(b)) for key in NOT_RUN)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_cheap_readme_blocks_run_as_written(tmp_path):
    (tmp_path / ".venv").symlink_to(BIN.parent)  # the project's venv, as `make setup` made it
    (tmp_path / "tests").symlink_to(ROOT / "tests")  # its fixtures, by their README paths
    path = os.environ.get("PATH", "")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{path}",
           "TLBSIM_STATE": str(tmp_path / "standing.json")}
    env.pop("TLBSIM_CLUSTER", None)
    blocks = blocks_to_run()
    assert len(blocks) >= 5
    rcs, _, err = run_block(["tlbsim up --cpus 4 --detach"], tmp_path, env)
    assert rcs == [0], err
    ran: list[str] = []
    try:
        for i, block in enumerate(blocks):
            block_env = dict(env)
            if any(".venv/bin/activate" in line for line in block):
                # This block says how to get tlbsim onto PATH: start without it there.
                block_env["PATH"] = path.replace(f"{BIN}{os.pathsep}", "")
            own = any(line.startswith("tlbsim up") for line in block)
            if own:  # a block that starts its own cluster gets its own default state
                block_env["TLBSIM_STATE"] = str(tmp_path / f"block{i}.json")
            try:
                rcs, out, err = run_block(block, tmp_path, block_env)
            finally:
                if own:  # whatever happened, nothing stays running
                    run_block(["tlbsim down"], tmp_path, block_env)
            assert rcs == [expected_exit(line) for line in block], \
                (block, rcs, out[-3000:], err[-3000:])
            assert "Traceback" not in err, (block, err[-3000:])
            ran += block
    finally:
        rcs, _, err = run_block(["tlbsim down"], tmp_path, env)
        assert rcs == [0], err
    assert any("--transport mqtt" in line for line in ran)
    assert any("trace record --accesses" in line for line in ran)
