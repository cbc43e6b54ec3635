"""Orchestration: the library's entry points, composed from sources, writers and the store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ocilayers.sources import Image, ImageSource, Layer, open_source
from ocilayers.spec import Platform
from ocilayers.streams import Readable
from ocilayers.writer import LayerInput, ProgressFn, WrittenImage, verified_layer, write_image


def image_summary(image: Image) -> dict[str, Any]:
    """The JSON shape `ocilayers inspect SOURCE --json` prints."""
    return {
        "image_id": str(image.image_id),
        "config_digest": str(image.config_digest),
        "manifest_digest": str(image.manifest_digest) if image.manifest_digest else None,
        "tags": list(image.names),
        "platform": str(image.config.platform),
        "layers": [
            {"digest": str(layer.descriptor.digest), "media_type": layer.descriptor.media_type,
             "size": layer.descriptor.size, "diff_id": str(layer.diff_id),
             "chain_id": str(layer.chain_id)}
            for layer in image.layers
        ],
        "history": [h.to_json() for h in image.config.history],
    }


def inspect_source(source: str, *, ref: str | None = None,
                   platform: Platform | str | None = None) -> dict[str, Any]:
    """Describe one image of a source without reading its layers (their presence is checked)."""
    with open_source(source) as src:
        image = src.resolve(ref, platform)
        for layer in image.layers:
            src.check_layer_present(layer)
        return image_summary(image)


def source_layers(src: ImageSource, image: Image) -> list[LayerInput]:
    """The image's layers as writer inputs, each verified (digest, size, DiffID) as it is read."""
    def opener(layer: Layer) -> Callable[[], AbstractContextManager[Readable]]:
        return lambda: verified_layer(lambda: src.open_layer(layer))

    return [LayerInput(layer.diff_id, opener(layer)) for layer in image.layers]


def convert_image(source: str, out: str, *, ref: str | None = None,
                  platform: Platform | str | None = None, format: str = "oci-archive",
                  compression: str = "gzip", tags: Sequence[str] | None = None,
                  progress: ProgressFn | None = None) -> WrittenImage:
    """Copy an image from any source into any output format, verifying every blob."""
    with open_source(source) as src:
        image = src.resolve(ref, platform)
        return write_image(out, image.config.raw, source_layers(src, image), format=format,
                           compression=compression,
                           tags=image.names if tags is None else tags, progress=progress)
