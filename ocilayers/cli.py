"""The command line: argument parsing, output, progress bars and error reporting. No logic."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ocilayers import __version__, api
from ocilayers.errors import OCILayersError
from ocilayers.streams import COMPRESSIONS
from ocilayers.writer import FORMATS

PROG = "ocilayers"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors: exit 2, one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--root", metavar="DIR", default=d,
                        help="store root (default: $OCILAYERS_ROOT, /var/lib/ocilayers as "
                             "root, else the XDG data dir)")
    parser.add_argument("--debug", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="no progress bars or messages")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Docker's overlay2 image store, without the daemon.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _global_options(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    def pick(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ref", metavar="NAME",
                       help="image to pick: an OCI ref name or a RepoTag")
        p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="platform to pick from a multi-platform index (default: host)")

    p = add("inspect", "show an image's config digest, layers, DiffIDs and ChainIDs")
    p.add_argument("source", metavar="SOURCE",
                   help="OCI layout dir, oci-archive, docker-save tarball, transport:path, or -")
    pick(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = add("convert", "copy an image into an OCI layout, oci-archive or docker-save tarball")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    pick(p)
    p.add_argument("--format", choices=FORMATS, default="oci-archive")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip")
    p.add_argument("--tag", action="append", metavar="REPO:TAG",
                   help="tag to write (repeatable; default: the source's tags)")
    p.add_argument("--json", action="store_true", help="print the written digests as JSON")
    p.set_defaults(func=cmd_convert)
    return parser


# --- output helpers ---

def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


class Progress:
    """tqdm bars on a terminal, nothing in a pipe or with -q."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = not args.quiet and sys.stderr.isatty()
        self._bars: dict[int, Any] = {}

    def layer_callback(self, totals: Sequence[int] | None = None
                       ) -> Callable[[int, int], None] | None:
        """A (layer index, bytes) callback; `totals` are the expected byte counts, if known."""
        if not self.enabled:
            return None
        from tqdm import tqdm

        def cb(i: int, n: int) -> None:
            bar = self._bars.get(i)
            if bar is None:
                total = totals[i] if totals else None
                bar = self._bars[i] = tqdm(total=total, unit="B", unit_scale=True,
                                           desc=f"layer {i + 1}", leave=False,
                                           file=sys.stderr)
            bar.update(n)
        return cb

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


# --- commands ---

def cmd_inspect(args: argparse.Namespace) -> int:
    info = api.inspect_source(args.source, ref=args.ref, platform=args.platform)
    if args.json:
        _print_json(info)
        return 0
    print(f"Image ID:  {info['image_id']}")
    if info["tags"]:
        print(f"Tags:      {', '.join(info['tags'])}")
    print(f"Platform:  {info['platform']}")
    print(f"Layers:    {len(info['layers'])}")
    for i, layer in enumerate(info["layers"], 1):
        print(f"  {i:>3}  {layer['digest']}  {layer['size']:>12}  {layer['media_type']}")
        print(f"       diff_id  {layer['diff_id']}")
        print(f"       chain_id {layer['chain_id']}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    progress = Progress(args)
    try:
        written = api.convert_image(
            args.source, args.output, ref=args.ref, platform=args.platform, format=args.format,
            compression=args.compression, tags=args.tag,
            progress=progress.layer_callback())
    finally:
        progress.close()
    if args.json:
        _print_json({"manifest_digest": str(written.manifest.digest),
                     "config_digest": str(written.config.digest),
                     "layers": [{"digest": str(d.digest), "size": d.size,
                                 "media_type": d.media_type} for d in written.layers]})
    else:
        print(written.manifest.digest)
    return 0


# --- entry point ---

def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        msg = f"{where}: {exc.strerror}" if where else exc.strerror
    else:
        msg = str(exc) or type(exc).__name__
    notes = getattr(exc, "__notes__", None) or []
    return ": ".join([*reversed(notes), msg]).replace("\n", " ")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root is None:
        args.root = os.environ.get("OCILAYERS_ROOT") or None
    try:
        result: int = args.func(args)
        return result
    except BrokenPipeError:
        return 1
    except (OCILayersError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
