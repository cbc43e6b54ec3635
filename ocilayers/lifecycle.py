"""The container life cycle without a daemon: create (init layer + rw layer), mount the rw
overlay (reference-counted), unmount, remove."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from ocilayers.errors import ImageError, MountError, OCILayersError, StoreError
from ocilayers.mount import OverlayMount, check_target, mount_namespace, mount_overlay, unmount
from ocilayers.spec import Digest, normalize_reference
from ocilayers.store import Store
from ocilayers.store.containers import Container
from ocilayers.store.mounts import MountRecord


class ContainerNotFoundError(StoreError):
    """No container name, ID or ID prefix matches."""


def find_container(store: Store, name: str) -> Container:
    c = store.containers.find(name) if store.exists() else None
    if c is None:
        raise ContainerNotFoundError(f"no such container: {name}")
    return c


def image_command(config: dict[str, object]) -> list[str]:
    """The image's Entrypoint + Cmd (docker's default command)."""
    cfg = config.get("config")
    if not isinstance(cfg, dict):
        return []
    out: list[str] = []
    for key in ("Entrypoint", "Cmd"):
        value = cfg.get(key)
        if isinstance(value, list):
            out += [str(x) for x in value]
    return out


def create_container(store: Store, image: str, *, name: str | None = None,
                     command: Sequence[str] | None = None) -> Container:
    """A container on the image `image`: its init layer, its empty rw layer, the records."""
    store.require()  # (no store: no image to make it on; and no empty store left behind)
    store.init()
    with store.lock():
        img = store.find_image(image)
        if img.top is None:
            raise StoreError(f"image {img.image_id.short} has no layers to make a container on")
        cmd = list(command) if command else image_command(dict(img.config.data))
        return store.containers.create(store.layers, img.image_id, img.config.raw,
                                       img.top.chain_id, name=name, command=cmd)


def _live_mounts(store: Store, c: Container) -> list[MountRecord]:
    return [r for r in store.mounts.live() if r.container_id == c.id]


def mount_container(store: Store, c: Container, target: str | None = None, *,
                    fuse: bool = False) -> str:
    """Mount the container read-write (lowers: its init layer and the image's chain; upper:
    its rw `diff/`); returns the path. A mounted container is not mounted again: the same
    path comes back and its users are counted."""
    with store.lock():
        here = mount_namespace()
        for rec in _live_mounts(store, c):
            if rec.mnt_ns != here:
                raise MountError(f"container {c.short_id} is mounted in another mount "
                                 f"namespace ({rec.mnt_ns}, pid {rec.pid})")
            if target is not None and os.path.abspath(target) != rec.target:
                raise MountError(f"container {c.short_id} is mounted at {rec.target} already")
            store.mounts.add_ref(rec, 1)
            return rec.target
        default = target is None
        path: str = (store.containers.merged_dir(c) if target is None
                     else os.path.abspath(target))
        if default:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        try:
            check_target(path)
            chains = [str(r.chain_id) for r in store.layers.chain(Digest.parse(c.parent))]
            rec = store.mounts.add(path, "container", chains, image_id=c.image_id,
                                   container_id=c.id)
            try:
                mount_overlay(OverlayMount(
                    store.layout.overlay, tuple(store.layers.lowers_of(c.init_id)),
                    upper=store.containers.diff_dir(c), work=store.containers.work_dir(c),
                    userxattr=store.layout.overlay_format().xattr_namespace == "user"),
                    path, fuse=fuse)
            except BaseException:
                store.mounts.remove(rec)
                raise
        except BaseException:
            if default:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        return path


def umount_container(store: Store, c: Container, *, held_by_us: bool = False) -> bool:
    """Drop one user of the container's mount; unmount when it was the last (returns True
    then). The default target dir `merged/` is removed, as dockerd does. Refused while a
    step runs in it, but for that step's own end (`held_by_us`)."""
    with store.lock():
        if not held_by_us:
            store.containers.check_idle(c, "unmount")
        here = mount_namespace()
        recs = [r for r in _live_mounts(store, c) if r.mnt_ns == here]
        if not recs:
            raise MountError(f"container {c.short_id} is not mounted"
                             + (" here" if _live_mounts(store, c) else ""))
        rec = recs[0]
        if rec.refs > 1:
            store.mounts.add_ref(rec, -1)
            return False
        unmount(rec.target)
        store.mounts.remove(rec)
        if rec.target == store.containers.merged_dir(c):
            with contextlib.suppress(OSError):
                os.rmdir(rec.target)
        return True


def remove_container(store: Store, c: Container, *, force: bool = False) -> None:
    """Remove the container's rw and init layers and its records. Refused while it is
    mounted; with `force` its mount (in this namespace) goes first, whatever its users."""
    with store.lock():
        store.containers.check_idle(c, "remove")
        live = _live_mounts(store, c)
        if live and not force:
            raise StoreError(f"container {c.short_id} is mounted at "
                             f"{', '.join(r.target for r in live)}; unmount it or use -f")
        here = mount_namespace()
        for rec in live:
            if rec.mnt_ns != here:
                raise StoreError(f"container {c.short_id} is mounted in another mount "
                                 f"namespace ({rec.mnt_ns}, pid {rec.pid}); unmount it there")
            unmount(rec.target)
            store.mounts.remove(rec)
        store.containers.remove(store.layers, c)


def resolve_name(store: Store, name: str) -> str:
    """'container' or 'image' for an argument of `mount`/`umount`; a name that is both is an
    error asking which one. A container's own name (or full ID) wins over an image picked
    only by an ID prefix, as docker resolves names before prefixes: a container named `c2`
    is not ambiguous because some image ID starts with c2."""
    from ocilayers.lookup import is_store_name

    c = store.containers.find(name) if store.exists() else None
    is_container = c is not None
    is_image = is_store_name(store, name)
    if c is not None and is_image and name in (c.name, c.id) and not _image_by_name(store,
                                                                                      name):
        return "container"
    if is_container and is_image:
        raise OCILayersError(f"{name!r} names both a container and an image; use the "
                             "container's ID or the image's ID")
    if is_container:
        return "container"
    return "image"


def _image_by_name(store: Store, name: str) -> bool:
    """Does `name` pick an image by its tag or full ID, not by a prefix of its ID?"""
    hexpart = name.removeprefix("sha256:")
    if len(hexpart) == 64:
        return True
    try:
        return normalize_reference(name) in store.images.tags()
    except ImageError:
        return False


def list_containers(store: Store) -> list[tuple[Container, list[MountRecord]]]:
    """Every container, oldest first, with its live mounts."""
    with store.lock():
        live = store.mounts.live()
    return [(c, [r for r in live if r.container_id == c.id]) for c in store.containers.all()]
