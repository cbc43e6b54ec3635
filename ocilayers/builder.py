"""The image builder: a new image from a base config and layers, existing blobs copied
untouched, new layers compressed through one `write_layer_blob`, config edits and history,
handed to a destination (umoci's `mutate`: the one place an image is put together).

convert and export rebuild every layer of an image with it; commit, append and squash add
layers and history on top of a base."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ocilayers.cas import Blob, ContentWriter
from ocilayers.errors import DigestMismatchError, ImageError
from ocilayers.spec import (
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_ND_GZIP,
    MEDIA_TYPE_OCI_LAYER_ND_ZSTD,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    Descriptor,
    Digest,
    HistoryEntry,
    ImageConfig,
    Manifest,
    config_with,
    dump_json,
    family_media_types,
    layer_media_type,
    normalize_reference,
    oci_config_nulls,
)
from ocilayers.streams import CHUNK, Readable, write_layer_blob

ProgressFn = Callable[[int, int], None]  # (layer index, bytes just read)


@dataclass(frozen=True)
class LayerInput:
    """A layer as an uncompressed tar to compress: `open()` gives the stream. `diff_id` is
    what the tar must hash to (None for a new layer: it is whatever the tar hashes to)."""

    diff_id: Digest | None
    open: Callable[[], AbstractContextManager[Readable]]


@dataclass(frozen=True)
class BlobInput:
    """An existing compressed layer blob, copied as it is (same digest, same media type).
    `path`: where the blob is a whole file, so a destination can reflink or hardlink it
    (after checking its digest) instead of copying the bytes."""

    descriptor: Descriptor
    diff_id: Digest
    open: Callable[[], AbstractContextManager[Blob]]
    path: str | None = None


@dataclass(frozen=True)
class WrittenImage:
    """One image as written. `tags` are the names the output gives it (normalised; empty: it
    has none). `dropped_nulls` are config members left out because the OCI config schema
    wants a value there (`config.Env`); `config_before` is then the config digest (image ID)
    it had. `others` are the further images written into the same output (an export of a
    repository whose tags name several images), in the order written."""

    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]
    manifest_raw: bytes = b""
    config_raw: bytes = b""
    tags: tuple[str, ...] = ()
    dropped_nulls: tuple[str, ...] = ()
    config_before: Digest | None = None
    others: tuple[WrittenImage, ...] = ()

    @property
    def images(self) -> tuple[WrittenImage, ...]:
        """This image and the others written with it."""
        return (self, *self.others)


class Destination(Protocol):
    """Where a built image goes: blobs by digest, then the manifest and its tags.
    `oci_config`: the config must satisfy the image-spec's config schema (an OCI output); a
    Docker output keeps the config bytes, null members and all, as `docker save` does."""

    @property
    def blobs(self) -> ContentWriter: ...

    @property
    def oci_config(self) -> bool: ...

    def commit(self, image: WrittenImage, tags: Sequence[str]) -> None: ...


@dataclass
class _NewLayer:
    layer: LayerInput
    history: HistoryEntry | None


@dataclass
class ImageBuilder:
    """Start from a base (`from_config`), keep or re-encode its layers, add layers, edit the
    config, then `write()` into a destination."""

    base_raw: bytes
    base: ImageConfig
    _kept: list[LayerInput | BlobInput] = field(default_factory=list)
    _added: list[_NewLayer] = field(default_factory=list)
    _history: list[HistoryEntry] = field(default_factory=list)  # empty_layer entries, in order
    _edits: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    created: str | None = None
    author: str | None = None
    _rebased: bool = False

    @classmethod
    def from_config(cls, raw: bytes, what: str = "base config") -> ImageBuilder:
        return cls(raw, ImageConfig.parse(raw, what))

    # -- layers --

    def rebase(self, keep: int, history: Sequence[HistoryEntry]) -> None:
        """Keep only the base's first `keep` layers, and make `history` its whole history
        (squash: the layers above go into one new layer). Call before `keep_layer`."""
        if self._kept or not 0 <= keep <= len(self.base.diff_ids):
            raise ValueError(f"cannot keep {keep} of {len(self.base.diff_ids)} layers")
        obj: dict[str, Any] = json.loads(self.base_raw)
        obj["rootfs"] = {**obj.get("rootfs", {}),
                         "diff_ids": [str(d) for d in self.base.diff_ids[:keep]]}
        obj["history"] = [h.to_json() for h in history]
        self.base = ImageConfig(self.base_raw, obj, self.base.diff_ids[:keep], tuple(history))
        self._rebased = True

    def keep_layer(self, layer: LayerInput | BlobInput) -> None:
        """One of the base's own layers, in order: re-encoded (LayerInput, its DiffID
        checked) or copied as it is (BlobInput)."""
        if len(self._kept) >= len(self.base.diff_ids):
            raise ValueError("more layers kept than the base config has")
        want = self.base.diff_ids[len(self._kept)]
        if layer.diff_id != want:
            raise DigestMismatchError(f"layer {len(self._kept) + 1}: DiffID {layer.diff_id}, "
                                      f"the base config says {want}")
        self._kept.append(layer)

    def add_layer(self, layer: LayerInput, history: HistoryEntry | None = None) -> None:
        """A new layer on top; its DiffID goes into `rootfs.diff_ids` once written, and
        `history` (if any) into the history."""
        self._added.append(_NewLayer(layer, history))

    # -- config --

    def add_history(self, entry: HistoryEntry) -> None:
        """A history entry after those of the new layers: one with no layer of its own
        (`empty_layer`), or that of a layer this builder does not write (commit registers it
        in the store and passes its DiffID to `config_bytes`)."""
        self._history.append(entry)

    def edit_config(self, edit: Callable[[dict[str, Any]], None]) -> None:
        """Change the config object in place when the image is written (e.g. `--change`)."""
        self._edits.append(edit)

    @property
    def changed(self) -> bool:
        return bool(self._added or self._history or self._edits or self.created
                    or self.author or self._rebased)

    def config_bytes(self, new_diff_ids: Sequence[Digest]) -> bytes:
        """The base config's exact bytes when nothing changed (the image ID stays), else
        the edited config, serialised deterministically."""
        if not self.changed:
            return self.base_raw
        history = [h for n in self._added if (h := n.history) is not None] + self._history
        obj = config_with(self.base.data, diff_ids=new_diff_ids, history=history,
                          created=self.created, author=self.author)
        for edit in self._edits:
            edit(obj)
        return dump_json(obj)

    # -- writing --

    def write(self, dest: Destination, *, compression: str = "gzip",
              tags: Sequence[str] = (), progress: ProgressFn | None = None,
              family: str = "oci", annotations: dict[str, str] | None = None
              ) -> WrittenImage:
        """Write every blob, the config and the manifest (`family` "oci" or "docker": the
        media types of the manifest, the config and the new layers) into `dest`."""
        manifest_type, config_type = family_media_types(family)
        layer_type = layer_media_type(compression, family)  # (zstd in Docker's: refused)
        if len(self._kept) != len(self.base.diff_ids):
            raise ValueError(f"{len(self._kept)} of the base's {len(self.base.diff_ids)} "
                             "layers were given")
        descs: list[Descriptor] = []
        new_ids: list[Digest] = []
        for i, item in enumerate([*self._kept, *(n.layer for n in self._added)]):
            cb = (lambda n, i=i: progress(i, n)) if progress else None
            if isinstance(item, BlobInput):
                d = _copy_blob(dest.blobs, item)
                descs.append(Descriptor(_in_family(d, family), d.digest, d.size))
                continue
            desc, diff_id = _write_layer(dest.blobs, item, compression, cb)
            descs.append(Descriptor(layer_type, desc.digest, desc.size))
            if i >= len(self._kept):
                new_ids.append(diff_id)
        config_raw = self.config_bytes(new_ids)
        dropped: tuple[str, ...] = ()
        before: Digest | None = None
        if dest.oci_config and family == "oci":  # null where the schema wants a value: left
            # out, nothing else
            fixed, dropped = oci_config_nulls(config_raw)
            if dropped:
                before, config_raw = Digest.of_bytes(config_raw), fixed
        config = Descriptor(config_type, dest.blobs.put_blob(config_raw), len(config_raw))
        manifest = Manifest(manifest_type, config, tuple(descs), dict(annotations or {}))
        manifest_raw = dump_json(manifest.to_json())
        mdigest = (dest.blobs.put_blob(manifest_raw) if getattr(dest, "manifest_as_blob", True)
                   else Digest.of_bytes(manifest_raw))  # (a registry: PUT by commit())
        mdesc = Descriptor(manifest_type, mdigest, len(manifest_raw))
        names = tuple(dict.fromkeys(normalize_reference(t) for t in tags))
        written = WrittenImage(mdesc, config, tuple(descs), manifest_raw, config_raw,
                               tags=names, dropped_nulls=dropped, config_before=before)
        dest.commit(written, names)
        return written


class _FullReads:
    """Reads of exactly `n` bytes, but for the last: ISA-L's gzip output depends on how its
    input is split into writes, and a pipe (`append --dir`/`--diff`: pack's thread writes the
    tar into one), a decompressor or a sniffed source returns short reads as they come. Fed
    whole chunks, the compressor's output depends on the tar's bytes alone."""

    def __init__(self, raw: Readable) -> None:
        self._raw = raw

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            return self._raw.read()
        first = self._raw.read(n)
        if len(first) >= n or not first:
            return first  # (a file's read: whole, no copy)
        parts, have = [first], len(first)
        while have < n:
            data = self._raw.read(n - have)
            if not data:
                break
            parts.append(data)
            have += len(data)
        return b"".join(parts)


# A kept blob's media type in the other manifest family (`append --manifest`), as skopeo
# converts them: same bytes, the family's name for them. umoci refuses a Docker layer type in
# an OCI manifest ("blob is not correct mediatype").
_TO_OCI = {MEDIA_TYPE_DOCKER_LAYER: MEDIA_TYPE_OCI_LAYER,
           MEDIA_TYPE_DOCKER_LAYER_GZIP: MEDIA_TYPE_OCI_LAYER_GZIP,
           MEDIA_TYPE_DOCKER_LAYER_FOREIGN: MEDIA_TYPE_OCI_LAYER_ND_GZIP}
_TO_DOCKER = {v: k for k, v in _TO_OCI.items()}


def check_family(family: str, compression: str, kept: Sequence[Descriptor], hint: str) -> None:
    """Fail before any work when the Docker family cannot hold the layers: a new zstd layer,
    or a zstd layer of the base (`hint` names the caller's option for an OCI manifest)."""
    if family != "docker":
        return
    if compression == "zstd":
        raise ImageError(f"a Docker schema 2 manifest has no zstd layer type: use "
                         f"--compression gzip, or {hint}")
    for d in kept:
        if d.media_type in (MEDIA_TYPE_OCI_LAYER_ZSTD, MEDIA_TYPE_OCI_LAYER_ND_ZSTD):
            raise ImageError(f"layer {d.digest} of the base is zstd-compressed and a Docker "
                             f"schema 2 manifest has no zstd layer type: use {hint}")


def _in_family(d: Descriptor, family: str) -> str:
    if family == "docker":
        if d.media_type in (MEDIA_TYPE_OCI_LAYER_ZSTD, MEDIA_TYPE_OCI_LAYER_ND_ZSTD):
            raise ImageError(f"layer {d.digest} of the base is zstd-compressed and a Docker "
                             "schema 2 manifest has no zstd layer type: write an OCI "
                             "manifest")
        return _TO_DOCKER.get(d.media_type, d.media_type)
    return _TO_OCI.get(d.media_type, d.media_type)


def _write_layer(blobs: ContentWriter, layer: LayerInput, compression: str,
                 progress: Callable[[int], None] | None) -> tuple[Descriptor, Digest]:
    with blobs.blob_writer() as w:
        with layer.open() as src:  # (a source's own digest checks come first, on close)
            # A walk's tar (append --dir/--diff) comes hashed by the process that wrote it.
            made = write_layer_blob(_FullReads(src), w, compression, progress=progress,
                                    diff_id=getattr(src, "written_diff_id", None))
        if layer.diff_id is not None and made.diff_id != layer.diff_id:
            raise DigestMismatchError(f"layer {layer.diff_id}: diff_id mismatch: "
                                      f"expected {layer.diff_id}, got {made.diff_id}")
        w.digest = made.digest
    return Descriptor(made.media_type, made.digest, made.size), made.diff_id


def _copy_blob(blobs: ContentWriter, item: BlobInput) -> Descriptor:
    d = item.descriptor
    if item.path is not None and not blobs.has_blob(d.digest):
        link = getattr(blobs, "link_blob", None)
        if link is not None and link(item.path, d):
            return Descriptor(d.media_type, d.digest, d.size)
    if not blobs.has_blob(d.digest):
        with blobs.blob_writer() as w, item.open() as src:
            h = d.digest.hasher()
            n = 0
            while data := src.read(CHUNK):
                h.update(data)
                n += len(data)
                w.write(data)
            if n != d.size or h.hexdigest() != d.digest.hex:
                raise DigestMismatchError(f"layer {d.digest}: blob does not match its "
                                          "descriptor")
            w.digest = d.digest
    return Descriptor(d.media_type, d.digest, d.size)


@contextlib.contextmanager
def verified(opener: Callable[[], Any]) -> Iterator[Readable]:
    """Wrap a source's LayerReader so its digests are checked when the builder is done."""
    reader = opener()
    try:
        yield reader
        reader.finish()
    finally:
        with contextlib.suppress(Exception):
            reader.close()
