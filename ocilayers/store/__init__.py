"""Docker's overlay2 store, byte for byte (docs/store-format.md), one concern per module:

- `layout`: paths under the root, set-up, the store lock;
- `layers`: staging, `ingest` of a tar stream, registration, lookup, removal;
- `images`: configs, tags, lookup by name;
- `containers`: `layerdb/mounts/` records;
- `mounts`: ocilayers' records of the mounts it made (what, where, in which namespace);
- `gc`: what is still referenced, rmi, prune, orphans;
- `fsck`: the format check and verify.

`Store` ties the rooms to one root."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from functools import cached_property
from typing import TYPE_CHECKING

from ocilayers.spec import Digest
from ocilayers.store.distribution import Distribution
from ocilayers.store.images import ImageStore, StoreImage
from ocilayers.store.layers import MAX_DEPTH, LayerRecord, LayerStore, Staging, diff_size
from ocilayers.store.layout import StoreLayout, default_root

if TYPE_CHECKING:
    from ocilayers.store.containers import ContainerStore
    from ocilayers.store.mounts import MountStore

__all__ = ["MAX_DEPTH", "LayerRecord", "Staging", "Store", "StoreImage", "default_root",
           "diff_size"]


class Store:
    """One store root: its layout and the rooms over it."""

    def __init__(self, root: str | None = None) -> None:
        self.layout = StoreLayout(root)
        self.root = self.layout.root
        self.layers = LayerStore(self.layout)
        self.images = ImageStore(self.layout)
        self.distribution = Distribution(self.layout)

    # (made on first use: an unpack or a pack imports neither room)
    @cached_property
    def containers(self) -> ContainerStore:
        from ocilayers.store.containers import ContainerStore

        return ContainerStore(self.layout)

    @cached_property
    def mounts(self) -> MountStore:
        from ocilayers.store.mounts import MountStore

        return MountStore(self.layout)

    def init(self) -> None:
        self.layout.init()

    def exists(self) -> bool:
        return self.layout.exists()

    def require(self) -> None:
        self.layout.require()

    def lock(self) -> AbstractContextManager[None]:
        return self.layout.lock()

    # -- the image views most callers want --

    def find_image(self, name: str) -> StoreImage:
        """A tag, image ID or unique ID prefix -> the image with its layers."""
        return self.load_image(self.images.find(name))

    def load_image(self, image_id: Digest) -> StoreImage:
        return self.images.load(image_id, self.layers)

    def iter_images(self) -> Iterator[StoreImage]:
        for image_id in self.images.ids():
            yield self.load_image(image_id)
