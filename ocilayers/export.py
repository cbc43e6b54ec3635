"""The convert and export workflows: an image from a source or from the store, every layer
rebuilt and recompressed through the image builder, into a layout dir or an archive."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from io import BufferedReader

from ocilayers.builder import (
    BlobInput,
    Destination,
    ImageBuilder,
    LayerInput,
    ProgressFn,
    WrittenImage,
    verified,
)
from ocilayers.cas import Blob
from ocilayers.errors import ImageError, OCILayersError
from ocilayers.sources import Image, ImageSource, Layer
from ocilayers.spec import Descriptor, Digest, Platform, normalize_reference, split_reference
from ocilayers.store import LayerRecord, Store, StoreImage
from ocilayers.streams import COMPRESSIONS, Readable
from ocilayers.transports import open_source
from ocilayers.writer import LayoutDestination, open_destination


def source_layers(src: ImageSource, image: Image) -> list[LayerInput]:
    """The image's layers as builder inputs, each verified (digest, size, DiffID) as read."""
    def opener(layer: Layer) -> Callable[[], AbstractContextManager[Readable]]:
        return lambda: verified(lambda: src.open_layer(layer, readahead=True))

    return [LayerInput(layer.diff_id, opener(layer)) for layer in image.layers]


def source_blobs(src: ImageSource, image: Image) -> list[BlobInput]:
    """The image's layer blobs as builder inputs copied as they are (same digest); where the
    source keeps a blob as a whole file, its path, so a destination may link it."""
    blob_path = getattr(src.blobs, "blob_path", None)

    def opener(d: Descriptor) -> Callable[[], AbstractContextManager[Blob]]:
        return lambda: contextlib.closing(src.blobs.open_blob(d.digest))

    return [BlobInput(layer.descriptor, layer.diff_id, opener(layer.descriptor),
                      blob_path(layer.descriptor.digest) if blob_path else None)
            for layer in image.layers]


def store_layers(store: Store, img: StoreImage) -> list[LayerInput]:
    """The image's layers rebuilt byte for byte from diff dir + tar-split."""
    def opener(rec: LayerRecord) -> Callable[[], AbstractContextManager[Readable]]:
        return lambda: contextlib.nullcontext(store.layers.open_tar(rec))

    return [LayerInput(r.diff_id, opener(r)) for r in img.layers]


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ImageError(f"unknown compression {compression!r}")


def _build(config_raw: bytes, layers: Sequence[LayerInput | BlobInput], dest: Destination, *,
           compression: str, tags: Sequence[str],
           progress: ProgressFn | None) -> WrittenImage:
    builder = ImageBuilder.from_config(config_raw)
    for layer in layers:
        builder.keep_layer(layer)
    return builder.write(dest, compression=compression, tags=tags, progress=progress)


def rewrite_image(config_raw: bytes, layers: Sequence[LayerInput], out: str, *,
                  format: str, compression: str, tags: Sequence[str],
                  progress: ProgressFn | None) -> WrittenImage:
    """The same image (same config bytes, same DiffIDs), every layer recompressed. An OCI
    output leaves out the config members the OCI schema wants a value in but that are null
    (`WrittenImage.dropped_nulls`; the image ID then changes, the DiffIDs never do)."""
    with open_destination(out, format) as dest:
        _check_compression(compression)
        tags = [normalize_reference(t) for t in tags]  # a bad tag fails before any work
        return _build(config_raw, layers, dest, compression=compression, tags=tags,
                      progress=progress)


def convert_image(source: str, out: str, *, ref: str | None = None,
                  platform: Platform | str | None = None, format: str = "oci-archive",
                  compression: str = "gzip", tags: Sequence[str] | None = None,
                  progress: ProgressFn | None = None) -> WrittenImage:
    """Copy an image from any source into any output format, verifying every blob. Tags:
    `tags`, else the source's (RepoTags, full-reference ref names); `WrittenImage.tags` says
    what the output got (empty: no tag, as for a source whose only ref name is `latest`)."""
    with open_source(source) as src:
        image = src.resolve(ref, platform)
        return rewrite_image(image.config.raw, source_layers(src, image), out, format=format,
                             compression=compression,
                             tags=image.names if tags is None else tags, progress=progress)


# --- what `export NAME` names ---

_FULL_ID = re.compile(r"(?:sha256:)?[0-9a-f]{64}")


def _bare_repository(name: str) -> str | None:
    """The repository `name` names when it is a reference with neither tag nor digest
    (`base`, `docker.io/library/base`, `localhost:5000/x`), else None."""
    if "@" in name:
        return None
    try:
        repo, norm = split_reference(name)
    except ImageError:
        return None
    last = name.rsplit("/", 1)[-1]
    return repo if ":" not in last and norm == f"{repo}:latest" else None


def select_images(store: Store, name: str) -> list[tuple[Digest, tuple[str, ...]]]:
    """The images `export NAME` writes, each with the tags it gets, as dockerd 20.10's
    `docker save NAME` picks them (image/tarexport/save.go, parseNames):

    - `repo:tag`: that image, with that one tag (not its other tags);
    - a bare repository name (`base`): every tag of that repository (`base:1`, `base:2`,
      and `base:latest` too when it exists), grouped by image; when the repository has no
      tag, the name is tried as an image ID prefix;
    - an image ID (`sha256:<hex>`, the 64 hex digits, or a unique prefix): the image with no
      tag (`RepoTags: null`, no ref-name annotation).
    """
    if _FULL_ID.fullmatch(name):  # (docker: a 64-hex name is always an ID, never a repository)
        return [(store.images.find(name), ())]
    tags = store.images.tags()
    repo = _bare_repository(name)
    if repo is None:
        with contextlib.suppress(ImageError):
            norm = normalize_reference(name)
            if norm in tags:
                return [(tags[norm], (norm,))]
    else:
        groups: dict[Digest, list[str]] = {}
        for tag in sorted(tags):
            with contextlib.suppress(ImageError):
                if split_reference(tag)[0] == repo:
                    groups.setdefault(tags[tag], []).append(tag)
        if groups:
            return [(image_id, tuple(names)) for image_id, names in groups.items()]
    return [(store.images.find(name), ())]  # an ID or ID prefix (or: no such image)


def _staged(dest: LayoutDestination, desc: Descriptor) -> Callable[[], BufferedReader]:
    return lambda: open(dest.blobs.path(desc.digest), "rb")


def _shifted(progress: ProgressFn | None, offset: int) -> ProgressFn | None:
    """Layer indexes counted over every image of the output, not from 0 for each."""
    if progress is None:
        return None
    return lambda i, n: progress(offset + i, n)


def export(store: Store, name: str, out: str, *, format: str = "oci-archive",
           compression: str = "gzip", progress: ProgressFn | None = None) -> WrittenImage:
    """Rebuild each layer tar byte for byte from its diff dir and tar-split, and write the
    images `name` names (`select_images`) with the tags it names. A diff dir changed since
    unpack fails, naming the first changed path. Several images (a repository name whose
    tags name different images) share one output: the first is returned, the rest are in
    its `others`; a layer they share is written once."""
    picked = [(store.load_image(image_id), tags)
              for image_id, tags in select_images(store, name)]
    written: list[WrittenImage] = []
    with open_destination(out, format) as dest:
        _check_compression(compression)
        done: dict[Digest, Descriptor] = {}  # DiffID -> its blob, already in the output
        offset = 0
        for img, tags in picked:
            layers: list[LayerInput | BlobInput] = []
            for layer in store_layers(store, img):
                have = done.get(layer.diff_id) if layer.diff_id is not None else None
                if have is None or layer.diff_id is None:
                    layers.append(layer)
                elif isinstance(dest, LayoutDestination):
                    # (the builder finds the blob there and copies nothing)
                    layers.append(BlobInput(have, layer.diff_id, _staged(dest, have)))
                else:  # (a registry: the repository has it, the builder's HEAD finds it)
                    layers.append(layer)
            w = _build(img.config.raw, layers, dest, compression=compression, tags=tags,
                       progress=_shifted(progress, offset))
            done.update(zip(img.config.diff_ids, w.layers, strict=True))
            offset += len(img.layers)
            written.append(w)
    if not written:  # (select_images finds one image at least, or raises)
        raise OCILayersError(f"nothing to export for {name!r}")
    return dataclasses.replace(written[0], others=tuple(written[1:]))
