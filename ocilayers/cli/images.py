"""CLI commands that read or write images: inspect, unpack, pack, flatten, export, convert."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ocilayers import api, shapes
from ocilayers.cli.common import (
    PROG,
    AddFn,
    PickFn,
    Progress,
    UnpackBars,
    _existing_store,
    _msg,
    _print_json,
    _raise_fd_limit,
    _report_written,
    _store,
    _write_out,
)
from ocilayers.errors import OCILayersError
from ocilayers.spec import IMAGE_FORMATS as FORMATS
from ocilayers.store import Store
from ocilayers.streams import COMPRESSIONS


def _output_format(p: argparse.ArgumentParser, compression_help: str) -> None:
    """--format and --compression of the commands that write an image."""
    p.add_argument("--format", choices=FORMATS, default="oci-archive",
                   help="output format (default: %(default)s)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help=f"{compression_help} (default: %(default)s)")


def add_inspect(add: AddFn, pick: PickFn) -> None:
    p = add("inspect", "show an image (from a source, or from the store): layers, DiffIDs, "
                       "ChainIDs")
    p.add_argument("source", metavar="SOURCE|IMAGE",
                   help="OCI layout dir, oci-archive, docker-save tarball, transport:path, -; "
                        "or a tag / image ID in the store")
    pick(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-trunc", action="store_true", help="full IDs and commands")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ocilayers import texts

    store = _store(args)
    if api.source_or_image(store, args.source) == "image":
        img = store.find_image(args.source)
        if args.json:
            _print_json(shapes.store_image(img))
        else:
            print(texts.store_image_text(img, args.no_trunc))
        return 0
    image = api.resolve_source(args.source, ref=args.ref, platform=args.platform)
    if args.json:
        _print_json(shapes.source_image(image))
    else:
        print(texts.source_image_text(image, args.no_trunc))
    return 0


def add_unpack(add: AddFn, pick: PickFn) -> None:
    p = add("unpack", "unpack an image into the overlay2 store")
    p.add_argument("source", metavar="SOURCE")
    pick(p)
    p.add_argument("--tag", action="append", metavar="REPO:TAG",
                   help="tag to give the image (repeatable; default: the source's tags)")
    p.add_argument("--jobs", "-j", type=int, metavar="N",
                   help="layers built in parallel (default: CPU count)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_unpack)


def cmd_unpack(args: argparse.Namespace) -> int:
    bars = UnpackBars(args)
    try:
        result = api.unpack(args.source, root=args.root, ref=args.ref, platform=args.platform,
                            tags=args.tag, jobs=args.jobs, progress=bars.update)
    finally:
        bars.close()
    if args.json:
        _print_json(shapes.unpack_result(result))
    else:
        print(result.image_id)
    reused = sum(1 for x in result.layers if x.reused)
    tagged = f", tagged {', '.join(result.tags)}" if result.tags else ""
    _msg(args, f"unpacked {len(result.layers)} layers ({reused} reused) into "
               f"{Store(args.root).root}{tagged}")
    return 0


def add_pack(add: AddFn, pick: PickFn) -> None:
    p = add("pack", "write an overlay upper dir (or a tree against --base) as a layer")
    p.add_argument("upper", metavar="UPPER|NEW_ROOTFS")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="file, or - for stdout")
    p.add_argument("--base", metavar="OLD_ROOTFS",
                   help="compare two plain trees instead of reading an overlay upper dir")
    p.add_argument("--lower", action="append", default=[], metavar="DIR",
                   help="a lower layer (diff dir) or merged lower tree, top-most first")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="layer compression (default: gzip)")
    p.add_argument("--xattrs", choices=("all", "docker"), default="all",
                   help="which xattrs go into the layer: all but host and overlay ones, or "
                        "only security.capability as docker commit (default: all)")
    p.add_argument("--opaque", choices=("docker", "lower"),
                   help="which opaque dirs get a marker (default: lower with --lower, "
                        "else docker)")
    p.add_argument("--source-date-epoch", type=int, metavar="N",
                   help="clamp newer mtimes to N (default: $SOURCE_DATE_EPOCH if set)")
    p.add_argument("--content", action="store_true",
                   help="with --base: also compare file bytes when metadata is equal")
    p.add_argument("--userxattr", action="store_true",
                   help="the upper dir is from an overlay mounted with -o userxattr (rootless): "
                        "its overlay metadata is user.overlay.*, not trusted.overlay.*")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pack)


def cmd_pack(args: argparse.Namespace) -> int:
    from ocilayers.pack import source_date_epoch
    from ocilayers.whiteout import TRUSTED, USERXATTR

    _raise_fd_limit()
    if args.base is not None and (args.lower or args.opaque):
        raise OCILayersError("--base compares two plain trees; --lower/--opaque are for "
                             "overlay upper dirs")
    if args.content and args.base is None:
        raise OCILayersError("--content needs --base")
    if args.userxattr and args.base is not None:
        raise OCILayersError("--userxattr is for overlay upper dirs, not --base")

    def warn(msg: str) -> None:
        print(f"{PROG}: warning: {msg}", file=sys.stderr)

    kwargs: dict[str, Any] = dict(
        base=args.base, lowers=args.lower, compression=args.compression, xattrs=args.xattrs,
        opaque=args.opaque, source_date_epoch=source_date_epoch(args.source_date_epoch),
        content=args.content, warn=warn, fmt=USERXATTR if args.userxattr else TRUSTED)
    if args.output == "-":
        result = api.pack(args.upper, sys.stdout.buffer, **kwargs)
        sys.stdout.buffer.flush()
        report = sys.stderr
    else:
        result = api.pack_to_file(args.upper, args.output, **kwargs)
        report = sys.stdout
    if args.json:
        report.write(json.dumps(shapes.pack_result(result), indent=2) + "\n")
    elif report is sys.stdout:
        print(result.digest)
    return 0


def add_flatten(add: AddFn, pick: PickFn) -> None:
    p = add("flatten", "apply all layers (whiteouts as deletions) into a plain rootfs dir")
    p.add_argument("source", metavar="SOURCE|IMAGE")
    p.add_argument("dest", metavar="DEST")
    pick(p)
    p.set_defaults(func=cmd_flatten)


def cmd_flatten(args: argparse.Namespace) -> int:
    n = api.flatten(args.source, args.dest, root=args.root, ref=args.ref,
                    platform=args.platform)
    _msg(args, f"flattened {n} layers into {args.dest}")
    return 0


def add_export(add: AddFn, pick: PickFn) -> None:
    p = add("export", "write a store image out, rebuilding each layer byte for byte")
    p.add_argument("image", metavar="IMAGE",
                   help="REPO:TAG (that tag), REPO (every tag of it), or an image ID or "
                        "unique ID prefix (no tag), as `docker save` takes them")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file or dir, or - for stdout (archive formats)")
    _output_format(p, "layer compression")
    p.add_argument("--json", action="store_true", help="print the written digests as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    progress = Progress(args)
    try:
        written = _write_out(args, lambda out: api.export(
            store, args.image, out, format=args.format, compression=args.compression,
            progress=progress.layer_callback()))
    finally:
        progress.close()
    _report_written(args, written)
    return 0


def add_convert(add: AddFn, pick: PickFn) -> None:
    p = add("convert", "copy an image into an OCI layout, oci-archive or docker-save tarball")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file or dir, or - for stdout (archive formats)")
    pick(p)
    _output_format(p, "layer compression")
    p.add_argument("--tag", action="append", metavar="REPO:TAG",
                   help="tag to write (repeatable; default: the source's tags)")
    p.add_argument("--json", action="store_true", help="print the written digests as JSON")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    progress = Progress(args)
    try:
        written = _write_out(args, lambda out: api.convert_image(
            args.source, out, ref=args.ref, platform=args.platform, format=args.format,
            compression=args.compression, tags=args.tag,
            progress=progress.layer_callback()))
    finally:
        progress.close()
    _report_written(args, written)
    if not written.tags:
        _msg(args, f"{PROG}: note: the output has no tag (the source names no repository); "
                   "give it one with --tag REPO:TAG")
    return 0


class _AddLayer(argparse.Action):
    """--layer/--dir/--diff append to one ordered list; --lower and --base attach to the
    --dir or --diff before them."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from ocilayers.append import NewLayer

        adds: list[NewLayer] = list(getattr(namespace, "adds", None) or [])
        if self.dest in ("layer", "dir", "diff"):
            adds.append(NewLayer(self.dest, str(values)))
        else:
            last = adds[-1] if adds else None
            if self.dest == "lower" and (last is None or last.kind != "dir"):
                parser.error("--lower belongs to the --dir before it")
            if self.dest == "base" and (last is None or last.kind != "diff"):
                parser.error("--base belongs to the --diff before it")
            if last is not None and self.dest == "lower":
                adds[-1] = NewLayer(last.kind, last.path, (*last.lowers, str(values)))
            elif last is not None:
                adds[-1] = NewLayer(last.kind, last.path, last.lowers, str(values))
        namespace.adds = adds


def add_append(add: AddFn, pick: PickFn) -> None:
    p = add("append", "write an image from SOURCE with new layers and config changes on top "
                      "(no store)")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file or dir, or - for stdout (archive formats)")
    pick(p)
    p.add_argument("--layer", action=_AddLayer, metavar="FILE",
                   help="a layer tar, compressed or not (repeatable, in order)")
    p.add_argument("--dir", action=_AddLayer, metavar="UPPER",
                   help="an overlay upper dir, packed on the fly (repeatable)")
    p.add_argument("--lower", action=_AddLayer, metavar="DIR",
                   help="a lower dir of the --dir before it, top-most first")
    p.add_argument("--diff", action=_AddLayer, metavar="NEW_ROOTFS",
                   help="a tree, packed against the --base after it (repeatable)")
    p.add_argument("--base", action=_AddLayer, metavar="OLD_ROOTFS",
                   help="the tree the --diff before it is compared with")
    p.add_argument("--created-by", metavar="TEXT",
                   help="each new history entry's created_by (default: the append option "
                        "that made the layer)")
    p.add_argument("-m", "--message", metavar="MSG", help="the history entries' comment")
    p.add_argument("-a", "--author", metavar="AUTHOR")
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="a Dockerfile instruction for the config, as commit's (repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="REPO:TAG",
                   help="tag to write (repeatable; default: none)")
    _output_format(p, "the new layers' compression")
    p.add_argument("--manifest", choices=("oci", "docker"),
                   help="the manifest's media-type family (default: the base's)")
    p.add_argument("--xattrs", choices=("all", "docker"), default="all",
                   help="as pack, for --dir and --diff (default: all)")
    p.add_argument("--source-date-epoch", type=int, metavar="N",
                   help="the history's and config's created time, and a clamp for newer "
                        "mtimes (default: $SOURCE_DATE_EPOCH if set, else now)")
    p.add_argument("--json", action="store_true", help="print the written digests as JSON")
    p.set_defaults(func=cmd_append, adds=[])


def cmd_append(args: argparse.Namespace) -> int:
    from ocilayers.append import AppendOptions, append_image
    from ocilayers.pack import source_date_epoch

    def warn(msg: str) -> None:
        print(f"{PROG}: warning: {msg}", file=sys.stderr)

    _raise_fd_limit()
    opts = AppendOptions(layers=args.adds, created_by=args.created_by, message=args.message,
                         author=args.author, changes=args.change, tags=args.tag,
                         format=args.format, compression=args.compression,
                         manifest=args.manifest,
                         source_date_epoch=source_date_epoch(args.source_date_epoch),
                         xattrs=args.xattrs, warn=warn)
    progress = Progress(args)
    try:
        written = _write_out(args, lambda out: append_image(
            args.source, out, opts, ref=args.ref, platform=args.platform,
            progress=progress.layer_callback()))
    finally:
        progress.close()
    _report_written(args, written)
    return 0
