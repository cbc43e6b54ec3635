"""The command line: argument parsing, output, progress bars and error reporting. No logic."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ocilayers import __version__, api, shapes
from ocilayers.errors import OCILayersError
from ocilayers.spec import IMAGE_FORMATS as FORMATS
from ocilayers.store import Store
from ocilayers.streams import COMPRESSIONS

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

    p = add("inspect", "show an image (from a source, or from the store): layers, DiffIDs, "
                       "ChainIDs")
    p.add_argument("source", metavar="SOURCE|IMAGE",
                   help="OCI layout dir, oci-archive, docker-save tarball, transport:path, -; "
                        "or a tag / image ID in the store")
    pick(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-trunc", action="store_true", help="full IDs and commands")
    p.set_defaults(func=cmd_inspect)

    p = add("unpack", "unpack an image into the overlay2 store")
    p.add_argument("source", metavar="SOURCE")
    pick(p)
    p.add_argument("--tag", action="append", metavar="REPO:TAG",
                   help="tag to give the image (repeatable; default: the source's tags)")
    p.add_argument("--jobs", "-j", type=int, metavar="N",
                   help="layers built in parallel (default: CPU count)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_unpack)

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

    p = add("images", "list the store's images")
    p.add_argument("--json", action="store_true",
                   help="exact values: sizes in bytes, times as the config has them")
    p.add_argument("--no-trunc", action="store_true", help="full image IDs")
    p.set_defaults(func=cmd_images)

    p = add("tag", "tag a store image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("ref", metavar="REPO:TAG")
    p.set_defaults(func=cmd_tag)

    p = add("untag", "remove a tag (the image stays)")
    p.add_argument("ref", metavar="REPO:TAG")
    p.set_defaults(func=cmd_untag)

    p = add("rmi", "remove an image and the layers nothing else uses")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_rmi)

    p = add("prune", "remove layers no image references")
    p.set_defaults(func=cmd_prune)

    p = add("verify", "check layers against their tar-split records and the store format")
    p.add_argument("image", metavar="IMAGE", nargs="?")
    p.set_defaults(func=cmd_verify)

    p = add("mount", "mount a read-only merged view of an image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(func=cmd_mount)

    p = add("umount", "unmount a view made by `mount`")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(func=cmd_umount)

    p = add("flatten", "apply all layers (whiteouts as deletions) into a plain rootfs dir")
    p.add_argument("source", metavar="SOURCE|IMAGE")
    p.add_argument("dest", metavar="DEST")
    pick(p)
    p.set_defaults(func=cmd_flatten)

    p = add("export", "write a store image out, rebuilding each layer byte for byte")
    p.add_argument("image", metavar="IMAGE",
                   help="REPO:TAG (that tag), REPO (every tag of it), or an image ID or "
                        "unique ID prefix (no tag), as `docker save` takes them")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file or dir, or - for stdout (archive formats)")
    p.add_argument("--format", choices=FORMATS, default="oci-archive",
                   help="output format (default: %(default)s)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="layer compression (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the written digests as JSON")
    p.set_defaults(func=cmd_export)

    p = add("convert", "copy an image into an OCI layout, oci-archive or docker-save tarball")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file or dir, or - for stdout (archive formats)")
    pick(p)
    p.add_argument("--format", choices=FORMATS, default="oci-archive",
                   help="output format (default: %(default)s)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="layer compression (default: %(default)s)")
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

def _store(args: argparse.Namespace) -> Store:
    return Store(args.root)


def _existing_store(args: argparse.Namespace) -> Store:
    """The store of --root; an error when there is none yet."""
    store = Store(args.root)
    store.require()
    return store


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


def _write_out(args: argparse.Namespace, write: Callable[[str], Any]) -> Any:
    """Run `write(path)` for `-o OUT`; with `-o -`, into a temp file then copied to stdout
    (an archive's members are written with their sizes first, so it cannot stream)."""
    if args.output != "-":
        return write(args.output)
    if args.format == "oci":
        raise OCILayersError("-o - writes an archive to stdout; --format oci is a directory")
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ocilayers-") as tmp:
        path = os.path.join(tmp, "image.tar")
        written = write(path)
        with open(path, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
    return written


def _report_written(args: argparse.Namespace, written: Any) -> None:
    """The manifest digest of each image written (or --json) on stdout; on stderr when stdout
    carries the image. A note for each config that lost null members to the OCI schema."""
    stream = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        stream.write(json.dumps(shapes.written_image(written), indent=2) + "\n")
    elif args.output != "-":
        for w in written.images:
            print(w.manifest.digest)
    for w in written.images:
        if w.dropped_nulls:
            _msg(args, f"{PROG}: note: the OCI config schema allows no null in "
                       f"{', '.join(w.dropped_nulls)}: left out of the config (null means "
                       f"absent), so the image ID is {w.config.digest} (was {w.config_before}); "
                       "the DiffIDs are unchanged")


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


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as every Go program (dockerd, containerd)
    does at start: pack holds one fd per level of the dir it packs, and a layer may nest
    dirs 2000 deep, past the usual soft limit of 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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


def cmd_images(args: argparse.Namespace) -> int:
    from ocilayers import texts

    store = _existing_store(args)
    if args.json:
        _print_json(api.list_images(store))
    else:
        print(texts.images_table(list(store.iter_images()), args.no_trunc))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    api.tag(_existing_store(args), args.image, args.ref)
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    api.untag(_existing_store(args), args.ref)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    for line in api.remove_image(store, args.image):
        print(line)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    for line in api.prune(store):
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    problems = api.verify(store, args.image)
    if problems:
        for p in problems[1:]:
            print(p, file=sys.stderr)
        raise OCILayersError(f"verify: {len(problems)} problem(s); first: {problems[0]}")
    print("ok")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    api.mount(store, args.image, args.target)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    api.umount(_store(args), args.target)
    return 0


def cmd_flatten(args: argparse.Namespace) -> int:
    n = api.flatten(args.source, args.dest, root=args.root, ref=args.ref,
                    platform=args.platform)
    _msg(args, f"flattened {n} layers into {args.dest}")
    return 0


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


def _msg(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


class UnpackBars:
    """Per-layer bars (compressed bytes read of the blob size) and an overall bar."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = not args.quiet and sys.stderr.isatty()
        self._bars: dict[int, Any] = {}
        self._seen: dict[int, int] = {}
        self._total: Any = None

    def update(self, i: int, done: int, size: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if i not in self._bars:
            self._bars[i] = tqdm(total=size, unit="B", unit_scale=True, desc=f"layer {i + 1}",
                                 leave=False, file=sys.stderr, position=len(self._bars) + 1)
            self._seen[i] = 0
        step = done - self._seen[i]
        if step > 0:
            self._bars[i].update(step)
            self._seen[i] = done
            if self._total is None:
                self._total = tqdm(unit="B", unit_scale=True, desc="total", leave=False,
                                   file=sys.stderr, position=0)
            self._total.update(step)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        if self._total is not None:
            self._total.close()


# --- entry point ---

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
