"""The append workflow, a build step with no store: an image from any source plus new layers
(layer tars, overlay upper dirs or tree diffs, packed on the fly) and config changes, into a
new image. The base's blobs are copied as they are (reflinked or hardlinked where the file
system allows); only the new layers are compressed. One image builder, as commit and squash."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ocilayers.builder import (
    ImageBuilder,
    LayerInput,
    ProgressFn,
    WrittenImage,
    check_family,
)
from ocilayers.errors import OCILayersError, TarError
from ocilayers.export import source_blobs
from ocilayers.spec import (
    MANIFEST_FAMILIES,
    HistoryEntry,
    Platform,
    created_time,
    manifest_family,
    normalize_reference,
)
from ocilayers.streams import CHUNK, COMPRESSIONS, Readable, decompressor
from ocilayers.transports import open_source
from ocilayers.writer import full_reference, open_destination

ANNOTATION_BASE_NAME = "org.opencontainers.image.base.name"
ANNOTATION_BASE_DIGEST = "org.opencontainers.image.base.digest"


@dataclass(frozen=True)
class NewLayer:
    """One layer to add: `kind` "layer" (a tar file, compressed or not), "dir" (an overlay
    upper dir, with its `lowers`) or "diff" (the tree `path` against the tree `base`)."""

    kind: str
    path: str
    lowers: tuple[str, ...] = ()
    base: str | None = None

    @property
    def created_by(self) -> str:
        """What the history says made it, when --created-by does not."""
        extra = "".join(f" --lower {os.path.basename(x)}" for x in self.lowers)
        if self.base is not None:
            extra += f" --base {os.path.basename(self.base.rstrip('/'))}"
        return f"ocilayers append --{self.kind} {os.path.basename(self.path.rstrip('/'))}{extra}"


@dataclass(frozen=True)
class AppendOptions:
    layers: Sequence[NewLayer] = ()
    created_by: str | None = None
    message: str | None = None
    author: str | None = None
    changes: Sequence[str] = ()
    tags: Sequence[str] = ()
    format: str = "oci-archive"
    compression: str = "gzip"
    manifest: str | None = None  # "oci" or "docker"; default: the base's family
    source_date_epoch: int | None = None
    xattrs: str = "all"
    warn: Callable[[str], None] | None = field(default=None, compare=False)




class _CheckedTar:
    """The bytes of the tar `plain`, as they are, parsed on the way by the reader unpack uses:
    a --layer that is not a well-formed tar (text, a truncated archive, a bad checksum) fails
    the append (TarError), not whoever unpacks the image. The end-of-archive blocks and what
    follows them (GNU tar's record padding) pass too: the DiffID is the file's own."""

    def __init__(self, plain: Readable) -> None:
        self._plain = plain
        self._chunks = self._read_through()
        self._buf = b""

    def _read_through(self) -> Iterator[bytes]:
        from ocilayers.tarstream import TarReader

        raw: list[bytes] = []
        reader = TarReader(self._plain, on_raw=raw.append)
        for _entry in reader:
            if raw:
                yield b"".join(raw)
                raw.clear()
            while data := reader.read_data():
                yield data
        if raw:
            yield b"".join(raw)
        while rest := self._plain.read(CHUNK):
            yield rest

    def read(self, n: int = -1, /) -> bytes:
        parts = [self._buf]
        have = len(self._buf)
        while n < 0 or have < n:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        if n < 0 or have <= n:
            self._buf = b""
            return data
        self._buf = data[n:]
        return data[:n]


def _layer_opener(layer: NewLayer, opts: AppendOptions
                  ) -> Callable[[], AbstractContextManager[Readable]]:
    from ocilayers.pack import open_layer_tar

    if layer.kind == "layer":
        @contextlib.contextmanager
        def tar_file() -> Iterator[Readable]:
            with open(layer.path, "rb") as raw:
                _kind, plain = decompressor(raw)
                try:
                    yield _CheckedTar(plain)
                except TarError as exc:
                    raise TarError(f"--layer {layer.path}: not a well-formed tar: {exc}"
                                   ) from None
        return tar_file
    if layer.kind == "dir":
        return lambda: open_layer_tar(layer.path, lowers=layer.lowers, xattrs=opts.xattrs,
                                      source_date_epoch=opts.source_date_epoch,
                                      warn=opts.warn)
    if layer.kind == "diff":
        if layer.base is None:
            raise OCILayersError(f"--diff {layer.path} needs --base OLD_ROOTFS")
        return lambda: open_layer_tar(layer.path, base=layer.base, xattrs=opts.xattrs,
                                      source_date_epoch=opts.source_date_epoch,
                                      warn=opts.warn)
    raise ValueError(f"unknown layer kind {layer.kind!r}")


def append_image(source: str, out: str, opts: AppendOptions, *, ref: str | None = None,
                 platform: Platform | str | None = None,
                 progress: ProgressFn | None = None) -> WrittenImage:
    """Write the image of `source` with `opts.layers` on top, in order, to `out`."""
    from ocilayers.changes import apply_changes, parse_change

    changes = [parse_change(c) for c in opts.changes]  # bad input fails before any work
    if opts.compression not in COMPRESSIONS:
        raise OCILayersError(f"unknown compression {opts.compression!r}")
    if opts.manifest is not None and opts.manifest not in MANIFEST_FAMILIES:
        raise OCILayersError(f"unknown manifest family {opts.manifest!r}")
    for add in opts.layers:
        if not os.path.exists(add.path):
            raise OCILayersError(f"{add.path}: no such file or directory")
    tags = [normalize_reference(t) for t in opts.tags]
    created = created_time(opts.source_date_epoch)
    with open_source(source) as src:
        image = src.resolve(ref, platform)
        family = opts.manifest or manifest_family(image.manifest.media_type)
        check_family(family, opts.compression if opts.layers else "gzip",
                     [layer.descriptor for layer in image.layers], "--manifest oci")
        builder = ImageBuilder.from_config(image.config.raw)
        for kept in source_blobs(src, image):
            builder.keep_layer(kept)
        for new in opts.layers:
            builder.add_layer(LayerInput(None, _layer_opener(new, opts)), HistoryEntry(
                created=created, created_by=opts.created_by or new.created_by,
                comment=opts.message, author=opts.author))
        if not opts.layers:
            builder.add_history(HistoryEntry(
                created=created, created_by=opts.created_by or "ocilayers append",
                comment=opts.message, author=opts.author, empty_layer=True))
        builder.created = created
        builder.author = opts.author

        def edit(config: dict[str, Any]) -> None:
            apply_changes(config, changes)

        if changes:
            builder.edit_config(edit)
        annotations = {}
        if image.names:
            annotations[ANNOTATION_BASE_NAME] = full_reference(image.names[0])
        if image.manifest_digest is not None:
            annotations[ANNOTATION_BASE_DIGEST] = str(image.manifest_digest)
        with open_destination(out, opts.format) as dest:
            return builder.write(dest, compression=opts.compression, tags=tags,
                                 progress=progress, family=family, annotations=annotations)
