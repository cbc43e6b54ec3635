"""Read-only merged views of store images: an overlay of the image's lower chain."""

from __future__ import annotations

from ocilayers.errors import StoreError
from ocilayers.mount import OverlayMount, bind_readonly, mount_overlay
from ocilayers.store import Store


def mount_image(store: Store, name: str, target: str) -> None:
    """A read-only merged view of an image (overlay of its lower chain; bind for one layer)."""
    img = store.find_image(name)
    top = img.top
    if top is None:
        raise StoreError("image has no layers to mount")
    if len(img.layers) == 1:
        bind_readonly(store.layers.diff_dir(top), target)
        return
    lowers = tuple(store.layers.lowers_of(top.cache_id))
    mount_overlay(OverlayMount(store.layout.overlay, lowers), target)
