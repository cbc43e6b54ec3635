"""Containers in the store: `layerdb/mounts/<container id>/{mount-id,init-id,parent}`, read in
one scan. (Creating containers comes with the container issue; today they are only read, so
that no image or layer a container still uses is removed.)"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from ocilayers.spec import Digest
from ocilayers.store.layout import StoreLayout, read_text


@dataclass(frozen=True)
class MountRecord:
    """One `layerdb/mounts/<container id>/` entry; a missing file reads as None."""

    container_id: str
    mount_id: str | None
    init_id: str | None
    parent: str | None  # the image's top ChainID, as written


class ContainerStore:
    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    def mounts(self) -> list[MountRecord]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.layout.mounts)):
                d = os.path.join(self.layout.mounts, name)
                values: list[str | None] = []
                for f in ("mount-id", "init-id", "parent"):
                    try:
                        values.append(read_text(os.path.join(d, f)))
                    except (FileNotFoundError, NotADirectoryError):
                        values.append(None)
                out.append(MountRecord(name, *values))
        return out

    def using(self, image_top: Digest | None) -> list[str]:
        """Containers whose parent is this chain: they block removing the image."""
        if image_top is None:
            return []
        return [m.container_id for m in self.mounts() if m.parent == str(image_top)]

    def parents(self) -> list[Digest]:
        """Every container's parent chain (their layers must stay)."""
        return [Digest.parse(m.parent) for m in self.mounts() if m.parent is not None]

    def cache_ids(self) -> set[str]:
        """The layer dirs containers own (rw and init layers)."""
        return {x for m in self.mounts() for x in (m.mount_id, m.init_id) if x is not None}
