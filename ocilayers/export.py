"""The convert and export workflows: an image from a source or from the store, every layer
rebuilt and recompressed through the image builder, into a layout dir or an archive."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from ocilayers.builder import ImageBuilder, LayerInput, ProgressFn, WrittenImage, verified
from ocilayers.errors import ImageError
from ocilayers.sources import Image, ImageSource, Layer, open_source
from ocilayers.spec import Platform, normalize_reference
from ocilayers.store import LayerRecord, Store, StoreImage
from ocilayers.streams import COMPRESSIONS, Readable
from ocilayers.writer import open_destination


def source_layers(src: ImageSource, image: Image) -> list[LayerInput]:
    """The image's layers as builder inputs, each verified (digest, size, DiffID) as read."""
    def opener(layer: Layer) -> Callable[[], AbstractContextManager[Readable]]:
        return lambda: verified(lambda: src.open_layer(layer, readahead=True))

    return [LayerInput(layer.diff_id, opener(layer)) for layer in image.layers]


def store_layers(store: Store, img: StoreImage) -> list[LayerInput]:
    """The image's layers rebuilt byte for byte from diff dir + tar-split."""
    def opener(rec: LayerRecord) -> Callable[[], AbstractContextManager[Readable]]:
        return lambda: contextlib.nullcontext(store.layers.open_tar(rec))

    return [LayerInput(r.diff_id, opener(r)) for r in img.layers]


def rewrite_image(config_raw: bytes, layers: Sequence[LayerInput], out: str, *,
                  format: str, compression: str, tags: Sequence[str],
                  progress: ProgressFn | None) -> WrittenImage:
    """The same image (same config bytes, same DiffIDs), every layer recompressed."""
    with open_destination(out, format) as dest:
        if compression not in COMPRESSIONS:
            raise ImageError(f"unknown compression {compression!r}")
        tags = [normalize_reference(t) for t in tags]  # a bad tag fails before any work
        builder = ImageBuilder.from_config(config_raw)
        for layer in layers:
            builder.keep_layer(layer)
        return builder.write(dest, compression=compression, tags=tags, progress=progress)


def convert_image(source: str, out: str, *, ref: str | None = None,
                  platform: Platform | str | None = None, format: str = "oci-archive",
                  compression: str = "gzip", tags: Sequence[str] | None = None,
                  progress: ProgressFn | None = None) -> WrittenImage:
    """Copy an image from any source into any output format, verifying every blob."""
    with open_source(source) as src:
        image = src.resolve(ref, platform)
        return rewrite_image(image.config.raw, source_layers(src, image), out, format=format,
                             compression=compression,
                             tags=image.names if tags is None else tags, progress=progress)


def export(store: Store, name: str, out: str, *, format: str = "oci-archive",
           compression: str = "gzip", progress: ProgressFn | None = None) -> WrittenImage:
    """Rebuild each layer tar byte for byte from its diff dir and tar-split, and write the
    image. A diff dir changed since unpack fails, naming the first changed path."""
    img = store.find_image(name)
    return rewrite_image(img.config.raw, store_layers(store, img), out, format=format,
                         compression=compression, tags=img.tags, progress=progress)
