"""Read-only merged views of store images (an overlay of the image's lower chain, a bind
mount for one layer), recorded in the store so that no layer a view shows is removed, and
unmounted only by their record."""

from __future__ import annotations

import os

from ocilayers.errors import MountError, StoreError
from ocilayers.mount import (
    OverlayMount,
    bind_readonly,
    check_target,
    mount_overlay,
    mounted_at,
    unmount,
)
from ocilayers.store import Store


def mount_image(store: Store, name: str, target: str, *, fuse: bool = False) -> str:
    """Mount a read-only merged view of an image on `target`; returns the target's path.
    A rootless store's view is a `userxattr` overlay (fuse-overlayfs where the kernel refuses
    one, or with `fuse`)."""
    with store.lock():
        img = store.find_image(name)
        top = img.top
        if top is None:
            raise StoreError("image has no layers to mount")
        path = check_target(target)
        rec = store.mounts.add(path, "image", [str(r.chain_id) for r in img.layers],
                               image_id=str(img.image_id))
        try:
            if len(img.layers) == 1 and not fuse:
                bind_readonly(store.layers.diff_dir(top), path)
            else:
                userxattr = store.layout.overlay_format().xattr_namespace == "user"
                mount_overlay(OverlayMount(store.layout.overlay,
                                           tuple(store.layers.lowers_of(top.cache_id)),
                                           userxattr=userxattr), path, fuse=fuse)
        except BaseException:
            store.mounts.remove(rec)
            raise
    return path


def umount(store: Store, target: str) -> None:
    """Unmount a view ocilayers made, by its record; anything else mounted there is an
    error that says what it is."""
    path = os.path.abspath(target)
    rec = store.mounts.find(path) if store.exists() else None
    if rec is None or rec.kind != "image":
        here = mounted_at(path)
        if here is None:
            raise MountError(f"{target}: not a mount point")
        if rec is not None:
            raise MountError(f"{target}: the read-write mount of container "
                             f"{rec.container_id}; unmount the container instead")
        raise MountError(f"{target}: not mounted by ocilayers ({here.fstype} {here.source} is "
                         f"mounted there{'' if store.exists() else '; no store at ' + store.root})")
    with store.lock():
        if mounted_at(path) is None:
            store.mounts.remove(rec)
            raise MountError(f"{target}: not mounted any more (its record is removed)")
        unmount(path)
        store.mounts.remove(rec)
