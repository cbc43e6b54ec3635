"""The pack workflow: an overlay upper dir (or a tree against a base tree) in, a compressed
layer blob out, to a stream or atomically to a file."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ocilayers.errors import OCILayersError
from ocilayers.fsutil import atomic_output
from ocilayers.spec import Digest
from ocilayers.streams import HashingWriter, LayerBlobWriter
from ocilayers.whiteout import TRUSTED, OverlayFormat

if TYPE_CHECKING:
    from ocilayers.differ import PackStats


@dataclass(frozen=True)
class PackResult:
    diff_id: Digest
    digest: Digest
    size: int
    media_type: str
    stats: PackStats


def source_date_epoch(value: int | None) -> int | None:
    """`value`, else `$SOURCE_DATE_EPOCH` (reproducible-builds.org), else None."""
    if value is not None:
        return value
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if not env:
        return None
    try:
        return int(env)
    except ValueError:
        raise OCILayersError("SOURCE_DATE_EPOCH must be a whole number of seconds, not "
                             f"{env!r}") from None


def pack(upper: str, out: Any, *, base: str | None = None, lowers: Sequence[str] = (),
         compression: str = "gzip", xattrs: str = "all", opaque: str | None = None,
         source_date_epoch: int | None = None, content: bool = False,
         warn: Callable[[str], None] | None = None,
         fmt: OverlayFormat = TRUSTED) -> PackResult:
    """Write the layer for an upper dir (or for `upper` against the plain tree `base`) into
    the binary stream `out`, compressed; returns its DiffID, blob digest and size. `fmt` is
    the overlay mount's format: TRUSTED, or USERXATTR for a `userxattr` mount."""
    from ocilayers.differ import write_layer, write_tree_diff

    # zstd in worker threads, capped at 2: each costs ~40-50 MB on incompressible data (the
    # benchmark measured 129 MB peak with 2, 145 MB with 4), and multi-threaded zstd output is
    # the same for any thread count, so the cap keeps pack deterministic across machines.
    threads = min(2, os.cpu_count() or 1) if compression == "zstd" else 0
    blob = LayerBlobWriter(out, compression, threads=threads)
    if base is not None:
        stats = write_tree_diff(upper, base, blob, content=content, xattrs=xattrs,
                                source_date_epoch=source_date_epoch, warn=warn)
    else:
        stats = write_layer(upper, blob, lowers=list(lowers) or None, xattrs=xattrs,
                            opaque=opaque, source_date_epoch=source_date_epoch, warn=warn,
                            fmt=fmt)
    made = blob.close()
    return PackResult(made.diff_id, made.digest, made.size, made.media_type, stats)


class _TarPipe:
    """The layer tar of an upper dir (or a tree against a base tree) as a readable stream,
    written into a pipe while the caller reads, so nothing is spooled. The writer is a forked
    child where the process can fork (one thread, two cores): the walk, the tar headers and
    the reads of the files then run on the second core beside the caller's hashing,
    compressing or applying (a thread shares one GIL with it: commit ran at about the sum of
    the two). Else a thread. The child's warnings are passed on when it is done.

    The writer also hashes the tar: `finish()` (`written_diff_id()`, for the image
    builder) reads to the end and returns that DiffID,
    once the bytes read here are as many as the writer wrote. The reader (commit's applier)
    is the busier side; the walker had the time to spare."""

    def __init__(self, upper: str, kwargs: dict[str, Any]) -> None:
        import fcntl

        from ocilayers import forking

        self.upper, self.kwargs = upper, kwargs
        self.error: BaseException | None = None
        self.count = 0  # bytes read here
        self._made: tuple[Digest, int] | None = None  # the writer's (DiffID, bytes written)
        self._warn: Callable[[str], None] | None = kwargs.get("warn")
        self._child: forking.Forked[tuple[list[str], tuple[Digest, int] | None]] | None = None
        self._thread: threading.Thread | None = None
        rfd, wfd = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(wfd, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer switches between the two
        # Buffered: a tar header or a small file's data comes out of 64 KiB read at once, not
        # a read(2) of its own (commit of the benchmark's dir: 1.6k reads instead of 17.8k).
        self.reader = open(rfd, "rb", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        if not forking.can_fork():
            self._thread = threading.Thread(target=self._in_thread, args=(wfd,),
                                            name="ocilayers-pack", daemon=True)
            self._thread.start()
            return

        def in_child() -> tuple[list[str], tuple[Digest, int] | None]:
            os.close(rfd)  # (so that the caller's close is the pipe's last reader going)
            said: list[str] = []
            made = self._write(wfd, said.append if self._warn else None)
            return said, made

        try:
            self._child = forking.Forked(in_child)
        except BaseException:
            self.reader.close()
            raise
        finally:
            os.close(wfd)

    def _write(self, wfd: int, warn: Callable[[str], None] | None
               ) -> tuple[Digest, int] | None:
        """Write the tar into `wfd`; its DiffID and size, or None if the reader stopped."""
        from ocilayers.differ import write_layer, write_tree_diff

        kw = dict(self.kwargs, warn=warn)
        try:
            with open(wfd, "wb", buffering=1 << 20) as raw:
                out = HashingWriter(raw)
                if kw.get("base") is not None:
                    base = kw.pop("base")
                    write_tree_diff(self.upper, base, out, **kw)
                else:
                    kw.pop("base", None)
                    write_layer(self.upper, out, **kw)
        except BrokenPipeError:
            return None  # the reader stopped first: its error is the one to report
        return out.digest, out.count

    def _in_thread(self, wfd: int) -> None:
        try:
            self._made = self._write(wfd, self._warn)
        except BaseException as exc:
            self.error = exc

    def read(self, n: int = -1, /) -> bytes:
        data = self.reader.read(n)
        self.count += len(data)
        return data

    def written_diff_id(self) -> Digest:
        """Read to the end, wait for the writer; the DiffID of the tar it wrote."""
        while self.read(1 << 20):
            pass
        if (error := self.stop()) is not None:
            raise error
        if self._made is None or self._made[1] != self.count:
            raise OCILayersError(f"layer tar: read {self.count} bytes, the walk wrote "
                                 f"{self._made[1] if self._made else 'fewer'}")
        return self._made[0]

    finish = written_diff_id  # (the store's TarSource)

    def stop(self) -> BaseException | None:
        """Stop reading (the writer sees a broken pipe), wait for the writer, and return
        its error, if any (again on a second call)."""
        self.reader.close()
        if self._thread is not None:
            self._thread.join()
            return self.error
        if self._child is None:
            return self.error
        child, self._child = self._child, None
        try:
            said, self._made = child.result()
        except BaseException as exc:
            self.error = exc
            return exc
        for line in said:
            assert self._warn is not None
            self._warn(line)
        return None

    def close(self) -> None:
        """Stop, wait, and raise the writer's error."""
        if (error := self.stop()) is not None:
            raise error


@contextlib.contextmanager
def open_layer_tar(upper: str, *, base: str | None = None, lowers: Sequence[str] = (),
                   xattrs: str = "all", opaque: str | None = None,
                   source_date_epoch: int | None = None, content: bool = False,
                   warn: Callable[[str], None] | None = None,
                   fmt: OverlayFormat = TRUSTED) -> Iterator[_TarPipe]:
    """The uncompressed layer tar `pack` would write, as a stream to read (commit and
    append feed it to the store or the image builder). A failure of the walk (a file that
    changed, a name no layer can carry) is raised when the block ends, before the reader's
    own error about a cut-off tar."""
    kw: dict[str, Any] = {"xattrs": xattrs, "source_date_epoch": source_date_epoch,
                          "warn": warn}
    if base is not None:
        kw.update(base=base, content=content)
    else:
        kw.update(lowers=list(lowers) or None, opaque=opaque, fmt=fmt)
    pipe = _TarPipe(upper, kw)
    try:
        yield pipe
    except BaseException:
        if (error := pipe.stop()) is not None:
            raise error from None
        raise
    pipe.close()


def pack_to_file(upper: str, out: str, **kwargs: Any) -> PackResult:
    """`pack` into the file `out`: written beside it and renamed, so a failed pack leaves
    nothing behind. An `out` inside what is packed is refused (the temp file would end up in
    its own layer)."""
    where = os.path.realpath(os.path.dirname(os.path.abspath(out)))
    tops = [os.path.realpath(upper)]
    if kwargs.get("base") is None:  # (with a base, `upper` is the new tree: the same holds)
        tops += [os.path.realpath(x) for x in kwargs.get("lowers") or ()]
    else:
        tops.append(os.path.realpath(kwargs["base"]))
    for top in tops:
        if where == top or where.startswith(top.rstrip("/") + "/"):
            raise OCILayersError(f"{out}: the output would be written inside {top}, which is "
                                 "being packed")
    with atomic_output(out, prefix=".ocilayers-") as f:
        return pack(upper, f, **kwargs)
