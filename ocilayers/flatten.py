"""The flatten workflow: every layer of an image applied in delete mode into a plain rootfs."""

from __future__ import annotations

import os

from ocilayers.lookup import source_or_image
from ocilayers.sources import open_source
from ocilayers.spec import Platform
from ocilayers.store import Store


def flatten(arg: str, dest: str, *, root: str | None = None, ref: str | None = None,
            platform: Platform | str | None = None) -> int:
    """Apply every layer in delete mode into the plain dir `dest`; returns the layer count."""
    from ocilayers.extract import apply_layer

    os.makedirs(dest, exist_ok=True)
    store = Store(root)
    if source_or_image(store, arg) == "source":
        with open_source(arg) as src:
            image = src.resolve(ref, platform)
            for layer in image.layers:
                with src.open_layer(layer, readahead=True) as reader:
                    apply_layer(reader, dest, mode="delete")
                    reader.finish()
            return len(image.layers)
    img = store.find_image(arg)
    for rec in img.layers:
        apply_layer(store.layers.open_tar(rec), dest, mode="delete")
    return len(img.layers)
