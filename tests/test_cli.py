"""cli.py: version, global options in either position, usage errors, error reporting modes."""

from __future__ import annotations

import json
import pstats
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, assert_one_line_error, run_cli, run_module

import ocilayers
from ocilayers import api
from ocilayers.cli import build_parser

Capsys = pytest.CaptureFixture[str]
TINY = str(FIXTURES / "tiny-oci.tar")


def test_version(capsys: Capsys) -> None:
    code, out, err = run_cli(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"ocilayers {ocilayers.__version__}"
    assert err == ""


@pytest.mark.parametrize(("argv", "debug", "quiet", "root"), [
    pytest.param(["inspect", TINY], False, False, None, id="defaults"),
    pytest.param(["--debug", "inspect", TINY], True, False, None, id="debug-before"),
    pytest.param(["inspect", TINY, "--debug"], True, False, None, id="debug-after"),
    pytest.param(["-q", "inspect", TINY], False, True, None, id="q-before"),
    pytest.param(["inspect", "-q", TINY], False, True, None, id="q-after"),
    pytest.param(["--quiet", "convert", TINY, "-o", "x"], False, True, None, id="quiet-convert"),
    pytest.param(["--root", "/r", "inspect", TINY], False, False, "/r", id="root-before"),
    pytest.param(["inspect", TINY, "--root", "/r"], False, False, "/r", id="root-after"),
    pytest.param(["--root=/r", "-q", "--debug", "inspect", TINY], True, True, "/r",
                 id="all-before"),
    pytest.param(["convert", TINY, "-o", "x", "--root", "/r", "-q", "--debug"], True, True,
                 "/r", id="all-after"),
])
def test_global_options_parse_in_either_position(argv: list[str], debug: bool, quiet: bool,
                                                  root: str | None) -> None:
    args = build_parser().parse_args(argv)
    assert (args.debug, args.quiet, args.root) == (debug, quiet, root)


@pytest.mark.parametrize("argv", [
    pytest.param(["--debug", "-q", "--root", "{tmp}", "inspect", TINY], id="before"),
    pytest.param(["inspect", TINY, "--debug", "-q", "--root", "{tmp}"], id="after"),
])
def test_global_options_run(argv: list[str], tmp_path: Path, capsys: Capsys) -> None:
    code, out, err = run_cli([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 0, err
    assert "Image ID:" in out
    assert err == ""


@pytest.mark.parametrize("argv", [
    pytest.param([], id="no-command"),
    pytest.param(["frobnicate"], id="unknown-command"),
    pytest.param(["inspect"], id="missing-source"),
    pytest.param(["convert", TINY], id="convert-missing-output"),
    pytest.param(["convert", TINY, "-o", "x", "--format", "zip"], id="bad-format"),
    pytest.param(["convert", TINY, "-o", "x", "--compression", "bz2"], id="bad-compression"),
    pytest.param(["inspect", TINY, "--bogus"], id="unknown-option"),
])
def test_usage_errors_exit_2(argv: list[str], capsys: Capsys) -> None:
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ocilayers") and ": error: " in lines[0]


def test_python_m_help() -> None:
    proc = run_module(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ocilayers")
    for word in ("inspect", "convert", "--version", "--debug", "--root"):
        assert word in proc.stdout


def test_python_m_runs_a_command() -> None:
    proc = run_module(["inspect", TINY, "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tags"] == ["tiny:latest"]


def test_the_command_output_survives_its_quick_exit(tmp_path: Path) -> None:
    """The command skips the interpreter's tear-down (os._exit): what it wrote must still all
    arrive, through a pipe and into a file, with its exit code."""
    proc = run_module(["inspect", TINY, "--json"])
    assert proc.returncode == 0 and json.loads(proc.stdout)["tags"] == ["tiny:latest"]
    with open(tmp_path / "out", "w") as out:
        code = subprocess.run([sys.executable, "-m", "ocilayers", "inspect", TINY, "--json"],
                              stdout=out, timeout=120).returncode
    assert code == 0 and json.loads((tmp_path / "out").read_text())["tags"] == ["tiny:latest"]
    proc = run_module(["--root", str(tmp_path / "none"), "images"])
    assert_one_line_error(proc.returncode, proc.stderr, "no store")


def test_a_profiler_running_the_command_gets_control_back(tmp_path: Path) -> None:
    """Under cProfile (or coverage, pdb) the command exits normally, so the tool can write
    its results when the script returns."""
    prof = tmp_path / "prof"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "ocilayers",
                           "inspect", TINY, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "main" in pstats.Stats(str(prof)).get_stats_profile().func_profiles


@pytest.fixture
def no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pin the store state: the root (via $OCILAYERS_ROOT, as the default) is a path with no
    store, so a missing SOURCE is reported as a missing path, whatever store the machine has
    at /var/lib/ocilayers. (With a store, the message differs: see test_default_root.py.)"""
    root = tmp_path / "no-store"
    monkeypatch.setenv("OCILAYERS_ROOT", str(root))
    return root


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_prints_traceback(position: str, tmp_path: Path, no_store: Path,
                                capsys: Capsys) -> None:
    missing = str(tmp_path / "nope")
    argv = ["--debug", "inspect", missing] if position == "before" else \
        ["inspect", missing, "--debug"]
    code, out, err = run_cli(argv, capsys)
    assert code == 1
    assert out == ""
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == f"ocilayers: error: {missing}: no such file or directory"
    assert not no_store.exists()


def test_plain_mode_prints_no_traceback(tmp_path: Path, no_store: Path, capsys: Capsys) -> None:
    code, out, err = run_cli(["inspect", str(tmp_path / "nope")], capsys)
    assert_one_line_error(code, err, "no such file or directory")
    assert out == ""
    assert not no_store.exists()


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_unexpected_exception_is_one_line(debug: bool, tmp_path: Path, capsys: Capsys,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (any exception that is not ours or an OSError) still ends in one error line and
    exit 1; --debug adds the traceback before it."""
    def broken(*args: object, **kw: object) -> None:
        raise ValueError("embedded null byte")

    monkeypatch.setattr(api, "source_or_image", broken)
    code, out, err = run_cli([*(["--debug"] if debug else []), "inspect", TINY], capsys)
    last = "ocilayers: error: internal error (ValueError): embedded null byte (--debug " \
           "prints the traceback)"
    if debug:
        assert code == 1 and err.startswith("Traceback (most recent call last):")
        assert err.splitlines()[-1] == last
    else:
        assert_one_line_error(code, err, "internal error (ValueError)")
        assert err.strip() == last
    assert out == ""


def test_plain_mode_in_a_subprocess(tmp_path: Path) -> None:
    # The real entry point, not just main(): exit status and stderr as a shell sees them.
    proc = run_module(["inspect", str(tmp_path / "nope")])
    assert_one_line_error(proc.returncode, proc.stderr, str(tmp_path / "nope"))
    assert proc.stdout == ""


def test_os_error_is_one_line(tmp_path: Path, capsys: Capsys) -> None:
    # An OSError (here EISDIR on a file the source expects) is reported like any other error.
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").mkdir()
    code, _, err = run_cli(["inspect", str(layout)], capsys)
    assert_one_line_error(code, err, "index.json")


def test_every_option_with_a_default_says_it() -> None:
    """`--help` of every command names each option's default (`convert --format` is
    oci-archive, `--compression` gzip, ...)."""
    import argparse

    from ocilayers.cli import build_parser, commands

    missing = []
    for name, p in commands(build_parser()).items():
        for action in p._actions:
            default = action.default
            if default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
                continue
            if "default" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings[-1]} (default {default!r})")
    assert not missing, "options whose help does not state the default: " + ", ".join(missing)


# The parser of the command on the command line alone (cli._parser_for): the same parse as the
# whole parser's, and the whole parser wherever the command is not plain to see.

_SAME_PARSE = [
    ("inspect", ["inspect", TINY]),
    ("unpack", ["--root", "/r", "-q", "unpack", TINY, "--jobs", "2", "--tag", "a:b"]),
    ("unpack", ["--cert", "/c", "unpack", TINY]),  # --cert-dir abbreviated, its value apart
    ("images", ["--root=/r", "--deb", "images", "--json"]),
    ("push", ["--insecure", "h1:5000", "--insecure", "h2", "--tls-verify", "false", "push",
              TINY, "docker://h1:5000/x"]),
    ("tag", ["--root", "images", "tag", "a", "b:c"]),  # a root dir named as a command
    ("create", ["create", TINY, "--name", "c1"]),
    ("commit", ["commit", "c1", "out:tag", "--root", "/r"]),
    ("history", ["history", TINY, "--json"]),
    ("unpack", ["unpack", TINY, "--root", "/r", "-q", "--debug"]),
]


@pytest.mark.parametrize(("command", "argv"), _SAME_PARSE, ids=lambda a: " ".join(a)[:40])
def test_one_command_parser_parses_as_the_whole_one(command: str, argv: list[str]) -> None:
    from ocilayers.cli import _parser_for, command_in, commands

    assert command_in(argv) == command
    parser = _parser_for(argv)
    assert list(commands(parser)) == [command]  # the others' parsers were not built
    one = vars(parser.parse_args(argv))
    whole = vars(build_parser().parse_args(argv))
    assert {k: v for k, v in one.items() if k != "func"} == \
        {k: v for k, v in whole.items() if k != "func"}
    assert one["func"] is whole["func"]


@pytest.mark.parametrize("argv", [[], ["-h"], ["--version"], ["--help", "unpack"],
                                  ["nosuch", "x"], ["--root"], ["-qh", "unpack"],
                                  ["--ro", "/x", "unpack"]])  # --ro: --root or --rootless?
def test_whole_parser_where_the_command_is_not_plain(argv: list[str]) -> None:
    from ocilayers.cli import _parser_for, commands

    known = commands(_parser_for(argv))
    assert "unpack" in known and "commit" in known


def test_unknown_command_is_refused_with_every_command_known(capsys: Capsys) -> None:
    code, _out, err = run_cli(["nosuch"], capsys)
    assert code == 2 and "invalid choice: 'nosuch'" in err and "'unpack'" in err, err


def test_every_command_alone_has_the_whole_parsers_options() -> None:
    """build_parser(only=NAME) gives each command the same options (strings, dests, defaults,
    choices, nargs) as the whole parser does: no registrar depends on another's parser."""
    import argparse

    from ocilayers.cli import commands

    def shape(p: argparse.ArgumentParser) -> list[tuple[Any, ...]]:
        return [(tuple(a.option_strings), a.dest, repr(a.default), a.choices, a.nargs,
                 type(a).__name__) for a in p._actions]

    whole = commands(build_parser())
    assert len(whole) > 20
    for name, p in whole.items():
        alone = commands(build_parser(only=name))
        assert list(alone) == [name]
        assert shape(alone[name]) == shape(p), name
        assert alone[name].get_default("func") is p.get_default("func"), name
