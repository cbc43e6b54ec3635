"""What every command group of the CLI shares: the parser class, global options, printing,
progress bars and the store of `--root`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ocilayers import shapes
from ocilayers.errors import OCILayersError
from ocilayers.store import Store

PROG = "ocilayers"
AddFn = Callable[[str, str], argparse.ArgumentParser]
PickFn = Callable[[argparse.ArgumentParser], None]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors: exit 2, one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--root", metavar="DIR", default=d,
                        help="store root (default: $OCILAYERS_ROOT, /var/lib/ocilayers as "
                             "root, else the XDG data dir)")
    parser.add_argument("--rootless", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="rootless mode (the default for a user other than root): a store "
                             "that records what an unprivileged user cannot make")
    parser.add_argument("--debug", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="no progress bars or messages")


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _tqdm() -> Any:
    """tqdm without its monitor thread: a process with a second thread cannot fork the file
    writers of an unpack (filewriters.start), and the bars here are updated often anyway."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0
    return tqdm


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
        tqdm = _tqdm()

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


def _store(args: argparse.Namespace) -> Store:
    return Store(args.root)


def _existing_store(args: argparse.Namespace) -> Store:
    """The store of --root; an error when there is none yet."""
    store = Store(args.root)
    store.require()
    return store


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


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as every Go program (dockerd, containerd)
    does at start: pack holds one fd per level of the dir it packs, and a layer may nest
    dirs 2000 deep, past the usual soft limit of 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
        tqdm = _tqdm()

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

