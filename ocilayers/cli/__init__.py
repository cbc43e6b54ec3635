"""The command line: argument parsing, output, progress bars and error reporting. No logic.

One module per command group (`images`, `store`, `containers`); `common` holds what they
share."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from ocilayers import __version__
from ocilayers.cli import containers, growth, images, registry, store, unshare
from ocilayers.cli.common import PROG, Parser, _global_options
from ocilayers.errors import OCILayersError


class _Unused:
    """Stands in for the parser of a command not on the command line (see build_parser):
    takes every call its registrar makes on it, and builds nothing."""

    def __getattr__(self, name: str) -> Any:
        return self._any

    def _any(self, *args: object, **kwargs: object) -> _Unused:
        return self


def command_in(argv: Sequence[str]) -> str | None:
    """The command `argv` names, read past the global options as the real parser reads them
    (abbreviations included); None for no command, help before it, or anything unusual."""

    class Peek(argparse.ArgumentParser):
        def error(self, message: str) -> Any:
            raise ValueError(message)

    peek = Peek(add_help=False, allow_abbrev=True)
    _global_options(peek, suppress=True)
    registry.registry_options(peek, suppress=True)
    peek.add_argument("command", nargs="?")
    peek.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        ns, unknown = peek.parse_known_args(list(argv))
    except ValueError:
        return None
    command = getattr(ns, "command", None)
    return command if isinstance(command, str) and not unknown else None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only`, one that knows that command alone: the other commands'
    parsers are not built (~10 ms of every start). An `only` that names no command gives a
    parser with no command at all."""
    parser = Parser(prog=PROG, description="Docker's overlay2 image store, without the daemon.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _global_options(parser, suppress=False)
    registry.registry_options(parser, suppress=False)
    common = Parser(add_help=False)
    _global_options(common, suppress=True)
    registry.registry_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return cast(argparse.ArgumentParser, _Unused())
        return sub.add_parser(name, help=help, description=help, parents=[common])

    def pick(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ref", metavar="NAME",
                       help="image to pick: an OCI ref name or a RepoTag")
        p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="platform to pick from a multi-platform index (default: host)")

    images.add_inspect(add, pick)
    images.add_unpack(add, pick)
    images.add_pack(add, pick)
    store.add_images(add, pick)
    store.add_tag(add, pick)
    store.add_untag(add, pick)
    store.add_rmi(add, pick)
    store.add_prune(add, pick)
    store.add_verify(add, pick)
    store.add_mount(add, pick)
    store.add_umount(add, pick)
    images.add_flatten(add, pick)
    images.add_export(add, pick)
    images.add_convert(add, pick)
    images.add_append(add, pick)
    growth.add_history(add, pick)
    growth.add_squash(add, pick)
    registry.add_push(add, pick)
    registry.add_login(add, pick)
    registry.add_logout(add, pick)
    containers.register(add, pick)
    unshare.add_unshare(add, pick)
    return parser


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The command parsers `parser` has, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the command `argv` names alone, else (no command, help, a name that is
    no command) the whole one, whose messages list every command."""
    command = command_in(argv)
    if command is not None:
        parser = build_parser(only=command)
        if commands(parser):
            return parser
    return build_parser()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        msg = f"{where}: {exc.strerror}" if where else exc.strerror
    else:
        msg = str(exc) or type(exc).__name__
    notes = getattr(exc, "__notes__", None) or []
    return ": ".join([*reversed(notes), msg]).replace("\n", " ")


def _print_traceback() -> None:
    import traceback  # only for --debug: not worth its import time on every start

    traceback.print_exc()


def main(argv: Sequence[str] | None = None) -> int:
    # Image fields are the image's: a lone surrogate ("\\ud800" in JSON) must print, not crash.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is a container's command (`create IMAGE -- CMD...`): argparse
    # would take its options for ours, so it is cut off here and handed over whole.
    after: list[str] | None = None
    if "--" in argv:
        cut = argv.index("--")
        argv, after = argv[:cut], argv[cut + 1:]
    parser = _parser_for(argv)
    args = parser.parse_args(argv)
    if after is not None:
        if not hasattr(args, "command_argv"):
            parser.error(f"{args.command} takes no command after --")
        args.command_argv = [*args.command_argv, *after]
    if args.root is None:
        args.root = os.environ.get("OCILAYERS_ROOT") or None
    try:
        unshare.enter(args)
        with registry.registry_context(args):
            result: int = args.func(args)
        return result
    except BrokenPipeError:
        return 1
    except (OCILayersError, OSError) as exc:
        if args.debug:
            _print_traceback()
        print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            _print_traceback()
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: still one line; --debug shows where it was
        if args.debug:
            _print_traceback()
        print(f"{PROG}: error: internal error ({type(exc).__name__}): {_describe(exc)} "
              "(--debug prints the traceback)", file=sys.stderr)
        return 1


def run() -> None:
    """The `ocilayers` command: `main()`, then exit without the interpreter's tear-down.

    Freeing every module and object one by one takes 20-50 ms after a command is done (more
    after an unpack: about 2% of a cold one, a tenth of a re-unpack), and nothing of ours
    needs it: files are closed, locks go with the process. stdout/stderr are flushed and the
    atexit handlers (weakref finalizers, multiprocessing's) still run. It is a normal exit
    with any other thread alive, under a profiler or tracer (cProfile, coverage, pdb: they
    write their results when the script returns), or without CPython's atexit._run_exitfuncs."""
    import atexit

    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except OSError:  # a closed pipe: what is unwritten is lost either way
            code = code or 1
    threading = sys.modules.get("threading")
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if (run_exitfuncs is None or (threading is not None and threading.active_count() > 1)
            or sys.getprofile() is not None or sys.gettrace() is not None):
        sys.exit(code)  # (a profiler, coverage or pdb running us wants control back)
    run_exitfuncs()
    os._exit(code)

