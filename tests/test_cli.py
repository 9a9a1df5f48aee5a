"""The command line itself (issue 19): no option matched by a prefix, global flags after
the subcommand, and every output path checked before any work starts."""
from __future__ import annotations

import argparse

import pytest

from loadgen.cli.main import build_parser, main
from services.common import exitcodes
from services.common.errors import InvalidArgument
from services.common.paths import check_writable_dir, check_writable_file


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_no_option_is_matched_by_a_prefix(capsys):
    assert parse("up", "--mqtt").mqtt is True  # was: ambiguous, --mqtt-username/-password
    for argv in (["up", "--mqt"], ["up", "--det"], ["load", "run", "munmap", "--pag", "3"],
                 ["--log", "DEBUG", "down"]):
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        assert e.value.code == exitcodes.USAGE, argv
    assert "unrecognized arguments" in capsys.readouterr().err


def walk(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def test_every_parser_refuses_abbreviations_and_takes_the_global_flags():
    parsers = list(walk(build_parser()))
    assert len(parsers) >= 14
    for path, p in parsers:
        assert p.allow_abbrev is False, path
        if path:
            flags = {s for a in p._actions for s in a.option_strings}
            assert {"--log-level", "--token", "--tls-ca", "--mqtt-username"} <= flags, path


@pytest.mark.parametrize("argv", [
    ["up", "--cpus", "2", "--log-level", "DEBUG"],
    ["--log-level", "ERROR", "up", "--log-level", "DEBUG"],   # after the command wins
    ["load", "--log-level", "DEBUG", "run", "munmap"],
    ["load", "run", "munmap", "--log-level", "DEBUG"],
    ["trace", "record", "--log-level", "DEBUG", "-o", "t.gz", "--", "ls"],
])
def test_global_flags_may_follow_the_command(argv):
    assert parse(*argv).log_level == "DEBUG"


def test_flags_before_the_command_stay_when_none_follow(monkeypatch):
    monkeypatch.delenv("TLBSIM_TOKEN", raising=False)
    args = parse("--token", "s3cret", "--tls-client-auth", "load", "run", "munmap")
    assert (args.token, args.tls_client_auth, args.log_level) == ("s3cret", True, "WARNING")
    args = parse("load", "run", "munmap", "--token", "other")
    assert args.token == "other"
    # After `--`, words belong to the traced command.
    assert parse("trace", "record", "-o", "t.gz", "--", "ls", "--token", "x").token is None


# --- output paths ------------------------------------------------------------------------
BAD_PATHS = [("a folder", lambda tmp: str(tmp), "is a directory"),
             ("a missing folder", lambda tmp: str(tmp / "no" / "r.json"), "does not exist"),
             ("/proc", lambda tmp: "/proc/version", "cannot write it"),
             ("a device", lambda tmp: "/dev/full", "not a regular file")]


@pytest.mark.parametrize("what,path,words", BAD_PATHS, ids=[b[0] for b in BAD_PATHS])
def test_an_unwritable_file_is_refused(tmp_path, what, path, words):
    with pytest.raises(InvalidArgument, match=words):
        check_writable_file(path(tmp_path), "--json")


def test_a_writable_file_is_left_as_it_was(tmp_path):
    check_writable_file(tmp_path / "new.json", "--json")
    assert not (tmp_path / "new.json").exists()  # the check leaves no file behind
    old = tmp_path / "old.json"
    old.write_text("kept")
    check_writable_file(old, "--json")
    assert old.read_text() == "kept"
    check_writable_file("-", "--json", stdout_ok=True)
    check_writable_dir(tmp_path / "logs" / "deeper", "--log-dir")
    assert (tmp_path / "logs" / "deeper").is_dir()
    with pytest.raises(InvalidArgument, match="cannot write in it"):
        check_writable_dir("/proc/nope", "--log-dir")
    with pytest.raises(InvalidArgument, match="not a folder"):
        check_writable_dir(old, "--log-dir")


# Each command with a bad output path: exit 2 with one line, before any work. An
# unreachable cluster (127.0.0.1:1) would be exit 4: the path is checked first.
UNREACHABLE = ["--cluster", "127.0.0.1:1"]


@pytest.mark.parametrize("argv", [
    ["load", "run", "munmap", *UNREACHABLE, "--json", "{bad}"],
    ["load", "run", "munmap", *UNREACHABLE, "--plot", "{bad}"],
    ["load", "replay", "tests/fixtures/traces/sh-seq-sort.tlbt.gz", *UNREACHABLE,
     "--json", "{bad}"],
    ["load", "compare", "munmap", *UNREACHABLE, "--a", "flush=per-page", "--csv", "{bad}"],
    ["load", "compare", "munmap", *UNREACHABLE, "--a", "flush=per-page", "--plot", "{bad}"],
    ["load", "soak", "--duration", "5s", "--json", "{bad}"],
    ["load", "soak", "--duration", "5s", "--log-dir", "/proc/nope"],
    ["demo", "--json", "{bad}"],
    ["bench", *UNREACHABLE, "--json", "{bad}"],
    ["up", "--state", "{bad}"],
    ["up", "--log-dir", "/proc/nope"],
    ["trace", "record", "-o", "{bad}", "--", "sh", "-c", "touch {tmp}/ran"],
])
@pytest.mark.parametrize("what,path,words", BAD_PATHS[:2], ids=["folder", "missing"])
def test_bad_output_paths_are_refused_before_any_work(argv, what, path, words, tmp_path,
                                                      capsys, monkeypatch):
    if argv[:2] == ["up", "--state"] and what == "a missing folder":
        pytest.skip("up creates the state file's folder (as it does ~/.tlbsim)")
    monkeypatch.setenv("TLBSIM_STATE", str(tmp_path / "state.json"))
    argv = [a.replace("{bad}", path(tmp_path)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == exitcodes.USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "ran").exists()  # trace record never started the command
    assert not (tmp_path / "state.json").exists()  # up started nothing


@pytest.mark.parametrize("argv", [["load", "run", "munmap"], ["down"], ["chaos", "heal"],
                                  ["load", "soak", "--duration", "5s"]])
def test_a_state_file_that_is_a_folder_or_broken_is_a_usage_error(argv, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for state in (tmp_path, broken):
        assert main([*argv, "--state", str(state)]) == exitcodes.USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cluster state" in err, err


@pytest.mark.parametrize("extra,words", [
    (["--ids", "5-2"], "the range 5-2 runs backwards"),
    (["--ids", "0-3,2"], "cpu 2 is listed twice"),
    (["--ids", "0-1024"], "ids are 0..1023"),
    (["--ids", "0-1", "--listen", "127.0.0.1:0,127.0.0.1:0,127.0.0.1:0"], "3 values for 2"),
    (["--ids", "0-1", "--metrics-port", "9100,x"], "not a port"),
    (["--ids", "0-1", "--advertise", "cpus:50051"], "one HOST:PORT for 2 CPUs"),
    (["--id", "1024"], "--id between 0 and 1023"),
])
def test_serve_cpu_bad_ids_are_one_line_errors(extra, words, capsys):
    argv = ["serve", "cpu", *extra, "--memory", "127.0.0.1:1", "--coordinator", "127.0.0.1:1"]
    assert main(argv) == exitcodes.USAGE
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_ids_are_for_cpus_only_and_id_with_ids_is_an_error(monkeypatch, capsys):
    assert main(["serve", "memory", "--ids", "0-1", "--coordinator", "127.0.0.1:1"]) == \
        exitcodes.USAGE
    assert "--ids is for serve cpu" in capsys.readouterr().err
    from services.cli import _cpu_ids
    monkeypatch.setenv("TLBSIM_CPU_IDS", "4-5")
    assert _cpu_ids(parse("serve", "cpu")) == [4, 5]
    with pytest.raises(InvalidArgument, match="--id or --ids, not both"):
        _cpu_ids(parse("serve", "cpu", "--id", "3"))  # a flag and the other's variable
    monkeypatch.delenv("TLBSIM_CPU_IDS")
    monkeypatch.setenv("TLBSIM_CPU_ID", "7")
    assert _cpu_ids(parse("serve", "cpu")) == [7]
