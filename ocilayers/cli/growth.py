"""CLI commands about why images grow: history (with the CI gate) and squash."""

from __future__ import annotations

import argparse
import re

from ocilayers import api, shapes
from ocilayers.cli.common import (
    PROG,
    AddFn,
    PickFn,
    Progress,
    _msg,
    _print_json,
    _write_out,
)
from ocilayers.errors import OCILayersError
from ocilayers.spec import IMAGE_FORMATS as FORMATS
from ocilayers.streams import COMPRESSIONS

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?i?b?)?\s*", re.I)
_UNIT = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
         "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
         "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30,
         "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40, "pi": 1 << 50, "pib": 1 << 50}


def parse_size(text: str) -> int | None:
    """`20MB` (decimal, as dive's humanize), `1.5GiB`, `1024`; `disabled` -> None."""
    if text.strip().lower() == "disabled":
        return None
    m = _SIZE.fullmatch(text)
    unit = (m.group(2) or "").lower() if m else ""
    if m is None or unit not in _UNIT:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20MB, 1.5GiB, 1024)")
    return int(float(m.group(1)) * _UNIT[unit])


def _fraction(text: str) -> float | None:
    if text.strip().lower() == "disabled":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def add_history(add: AddFn, pick: PickFn) -> None:
    p = add("history", "an image's history with what every layer adds, changes, deletes and "
                       "wastes; with --ci, dive's CI gate")
    p.add_argument("source", metavar="IMAGE|SOURCE",
                   help="a tag / image ID in the store, or a source (layout dir, archive)")
    pick(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="list the N largest wasted paths (default 10)")
    p.add_argument("--no-trunc", action="store_true", help="full commands")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="leave out paths that match, and everything below them "
                        "(fnmatch on the absolute path; repeatable)")
    g = p.add_argument_group("CI gate (dive's rules and defaults)")
    g.add_argument("--ci", action="store_true",
                   help="check the rules; exit 1 when one fails")
    g.add_argument("--lowest-efficiency", type=_fraction, default=0.9, metavar="F",
                   help="fail below this efficiency (default 0.9; 'disabled')")
    g.add_argument("--highest-wasted-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="fail above this many wasted bytes (e.g. 20MB; default disabled)")
    g.add_argument("--highest-user-wasted-percent", type=_fraction, default=0.1, metavar="F",
                   help="fail when wasted bytes / the bytes of every layer but the first "
                        "is above this (default 0.1; 'disabled')")
    g.add_argument("--ci-figures", choices=("ocilayers", "dive"), default="ocilayers",
                   help="the figures the rules check: ocilayers' own (default), or dive's "
                        "exactly as dive computes them")
    p.set_defaults(func=cmd_history)


def cmd_history(args: argparse.Namespace) -> int:
    from ocilayers import texts
    from ocilayers.growth import check_gate

    if args.top < 0:
        raise OCILayersError("--top must be 0 or more")
    progress = Progress(args)
    try:
        report = api.history(args.source, root=args.root, ref=args.ref,
                             platform=args.platform, top=args.top, ignore=args.ignore,
                             progress=progress.layer_callback())
    finally:
        progress.close()
    gate = None
    if args.ci:
        if args.ci_figures == "dive":
            figures = (report.dive.efficiency, report.dive.wasted_bytes,
                       report.dive.user_wasted_percent)
        else:
            figures = (report.efficiency, report.wasted_bytes, report.user_wasted_percent)
        gate = check_gate(efficiency=figures[0], wasted_bytes=figures[1],
                          user_wasted_percent=figures[2],
                          lowest_efficiency=args.lowest_efficiency,
                          highest_wasted_bytes=args.highest_wasted_bytes,
                          highest_user_wasted_percent=args.highest_user_wasted_percent)
    if args.json:
        _print_json(shapes.history_report(report, gate, args.ci_figures))
    else:
        print(texts.history_text(report, args.no_trunc))
        if gate is not None:
            print()
            for line in texts.gate_lines(gate):
                print(line)
    if gate is not None and not all(g.passed for g in gate):
        return 1
    return 0


def add_squash(add: AddFn, pick: PickFn) -> None:
    p = add("squash", "merge the layers above a point into one layer; the merged view stays "
                      "exactly the same, hidden content is dropped")
    p.add_argument("source", metavar="IMAGE|SOURCE")
    pick(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep", type=int, metavar="N",
                       help="keep the first N layers as they are; merge the rest")
    which.add_argument("--keep-image", metavar="BASE",
                       help="keep the layers of the image BASE (the image's base); merge the "
                            "rest")
    which.add_argument("--all", action="store_true", help="merge every layer into one")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", metavar="OUT",
                       help="write the image to a file or dir (- for stdout)")
    where.add_argument("--tag", action="append", metavar="REPO:TAG",
                       help="put the image into the store with this tag (repeatable)")
    p.add_argument("--format", choices=FORMATS, default="oci-archive",
                   help="output format with -o (default oci-archive)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="layer compression with -o (default gzip)")
    p.add_argument("-m", "--message", metavar="MSG",
                   help="the new history entry's comment (default: dockerd's, "
                        "'merge <old image ID> to <base>')")
    p.add_argument("--source-date-epoch", type=int, metavar="SECONDS",
                   help="the new history entry's and the config's `created` (default: "
                        "$SOURCE_DATE_EPOCH, else now)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_squash)


def cmd_squash(args: argparse.Namespace) -> int:
    import dataclasses
    import sys

    from ocilayers.pack import source_date_epoch
    from ocilayers.squash import SquashOptions

    opts = SquashOptions(keep=args.keep, keep_image=args.keep_image, all=args.all,
                         format=args.format, compression=args.compression,
                         tags=tuple(args.tag or ()), message=args.message,
                         source_date_epoch=source_date_epoch(args.source_date_epoch))
    progress = Progress(args)
    try:
        if args.output is not None:
            result = _write_out(args, lambda out: api.squash(
                args.source, dataclasses.replace(opts, out=out), root=args.root,
                ref=args.ref, platform=args.platform, progress=progress.layer_callback()))
        else:
            result = api.squash(args.source, opts, root=args.root, ref=args.ref,
                                platform=args.platform)
    finally:
        progress.close()
    stream = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        import json

        stream.write(json.dumps(shapes.squash_result(result), indent=2) + "\n")
    else:
        print(result.image_id, file=stream)
    if result.note:
        _msg(args, f"{PROG}: note: {result.note}")
    return 0
