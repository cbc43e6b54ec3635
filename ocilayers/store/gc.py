"""Garbage collection: which layers are still referenced, `rmi`, `prune`, orphaned dirs."""

from __future__ import annotations

import contextlib
import os

from ocilayers.errors import ImageError, StoreError
from ocilayers.fsutil import rmtree
from ocilayers.spec import Digest, normalize_reference
from ocilayers.store import Store
from ocilayers.store.images import top_chain
from ocilayers.store.layers import BIRTH_PREFIX, CLAIM_PREFIX, STAGING_PREFIX


def referenced_chains(store: Store, *, without: Digest | None = None,
                      mounts: bool = True) -> set[Digest]:
    """Every layer some image (but `without`), container, running unpack or, with `mounts`,
    live mount still needs."""
    needed: set[Digest] = set(store.layers.claimed_chains())
    if mounts:
        needed.update(Digest.parse(c) for m in store.mounts.live() for c in m.chains)
    tops: list[Digest] = []
    for image_id in store.images.ids():
        if image_id == without:
            continue
        try:
            top = top_chain(store.images.config(image_id))
        except StoreError as exc:
            raise StoreError(f"image {image_id.short}: {exc}") from None
        if top is not None:
            tops.append(top)
    tops += store.containers.parents()
    for top in tops:
        needed.update(r.chain_id for r in store.layers.chain(top))
    return needed


def remove_image(store: Store, name: str) -> list[str]:
    """`rmi`: untag (a tag given) or drop all tags (an ID given); when no tag is left, remove
    the image and every layer nothing else needs. Returns what was removed."""
    removed: list[str] = []
    with store.lock():
        img = store.find_image(name)
        image_id = img.image_id
        for rec in img.layers:  # a corrupt store file is an error before anything is removed
            store.layers.check_files(rec)
        tags = store.images.tags()
        named_tag = None
        with contextlib.suppress(ImageError):
            norm = normalize_reference(name)
            if tags.get(norm) == image_id:
                named_tag = norm
        if named_tag is not None and any(i == image_id for t, i in tags.items()
                                         if t != named_tag):
            store.images.remove_tag(named_tag)  # other tags remain: only untag
            return [f"untagged {named_tag}"]
        # The image goes: whatever still uses it is checked before anything changes.
        users = store.containers.using(img.top.chain_id if img.top else None)
        if users:
            raise StoreError(f"image {image_id.short} is used by container(s) "
                             f"{', '.join(users)}")
        going = {str(r.chain_id) for r in img.layers} - {
            str(c) for c in referenced_chains(store, without=image_id, mounts=False)}
        views = store.mounts.using(going)
        if views:
            raise StoreError(f"image {image_id.short} is mounted at "
                             f"{', '.join(m.target for m in views)} (ocilayers umount it "
                             "first)")
        for t in sorted(img.tags, key=lambda t: t != named_tag):  # the one named first
            if t in store.images.tags():
                store.images.remove_tag(t)
                removed.append(f"untagged {t}")
        store.images.remove(image_id)
        removed.append(f"deleted {image_id}")
        removed += prune_layers(store)
    return removed


def prune_layers(store: Store) -> list[str]:
    """Remove every layer nothing references, children before parents; a layer only a live
    mount still uses is kept and named. Call under the lock."""
    needed = referenced_chains(store, mounts=False)
    removed = []
    layers = {r.chain_id: r for r in store.layers.all()}
    for m in store.mounts.live():
        kept = [c for c in map(Digest.parse, m.chains) if c in layers and c not in needed]
        needed.update(kept)
        if kept:
            removed.append(f"kept {len(kept)} layer(s) mounted at {m.target}")
    for r in layers.values():
        if r.chain_id not in needed:
            store.layers.check_files(r)  # all checked before the first one goes
    while True:
        parents = {r.parent for r in layers.values() if r.parent is not None}
        leaves = [r for c, r in layers.items() if c not in needed and c not in parents]
        if not leaves:
            break
        for r in leaves:
            store.layers.remove(r)
            removed.append(f"deleted layer {r.chain_id}")
            del layers[r.chain_id]
    return removed


def remove_orphans(store: Store) -> list[str]:
    """Layer dirs no layerdb entry or container names (a crash between the rename and the
    layerdb write, or in a container's create or rm), ocilayers' container records without a
    container, and `l/` links that point nowhere. Call under the lock."""
    removed = []
    layout = store.layout
    known = {r.cache_id for r in store.layers.all()} | store.containers.cache_ids()
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(layout.overlay)):
            if (name == "l" or name.startswith((STAGING_PREFIX, BIRTH_PREFIX, CLAIM_PREFIX))
                    or name in known):
                continue
            rmtree(os.path.join(layout.overlay, name))
            removed.append(f"deleted orphan overlay2/{name}")
    for path in store.containers.stale_records():
        rmtree(path)
        removed.append(f"deleted stale container record {os.path.relpath(path, layout.root)}")
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(layout.links)):
            if not os.path.exists(os.path.join(layout.links, name)):
                os.unlink(os.path.join(layout.links, name))
                removed.append(f"deleted dangling l/{name}")
    return removed


def prune(store: Store) -> list[str]:
    """Remove layers no image or container references, and orphaned layer dirs."""
    with store.lock():
        store.layers.clean_stale()
        removed = prune_layers(store)
        removed += remove_orphans(store)
    return removed
