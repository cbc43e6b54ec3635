"""The commit workflow: a container's upper dir (or one made elsewhere) diffed against its
image's layers into a new layer, registered in the store in one pass (no temp tar), and a new
image whose config is the base's plus the layer, a history entry and `--change` edits."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ocilayers.builder import ImageBuilder
from ocilayers.errors import OCILayersError
from ocilayers.pack import open_layer_tar
from ocilayers.spec import (
    EMPTY_LAYER_DIFF_ID,
    Digest,
    HistoryEntry,
    ImageConfig,
    created_time,
)
from ocilayers.store import LayerRecord, Store
from ocilayers.store.containers import Container
from ocilayers.store.layers import fill_staging
from ocilayers.store.layout import held_interrupt
from ocilayers.whiteout import TRUSTED, OverlayFormat

# Docker-only fields about the container and daemon that made an image: host details, not
# image content. dockerd's commit writes them; a build step must not (buildah does not).
HOST_FIELDS = ("container", "container_config", "docker_version")


@dataclass(frozen=True)
class CommitResult:
    image_id: Digest
    diff_id: Digest | None  # None: the diff was empty (an `empty_layer` history entry)
    chain_id: Digest | None
    size: int  # the layer's diff size (layerdb `size`); 0 when empty
    tags: tuple[str, ...]

    @property
    def empty_layer(self) -> bool:
        return self.diff_id is None


@dataclass(frozen=True)
class CommitOptions:
    tags: Sequence[str] = ()
    message: str | None = None
    author: str | None = None
    changes: Sequence[str] = ()
    created_by: str | None = None
    source_date_epoch: int | None = None
    xattrs: str = "all"
    opaque: str | None = None
    fmt: OverlayFormat = TRUSTED
    warn: Callable[[str], None] | None = None




def _ingest_upper(store: Store, upper: str, chain: list[LayerRecord], opts: CommitOptions,
                  prepare: Callable[[Digest | None], bytes],
                  publish: Callable[[bytes], Digest]) -> tuple[LayerRecord | None, Digest]:
    """Diff `upper` against `chain` straight into a staging dir; `prepare` the new config
    from its DiffID (None: the diff is empty); then, under one lock, register the layer on
    the chain's top (unless empty) and `publish` the config: a prune or rmi in between would
    take the new layer for an unreferenced one. Returns (record or None, image ID)."""
    lowers = [store.layers.diff_dir(r) for r in reversed(chain)]
    staging = store.layers.begin()
    try:
        with open_layer_tar(upper, lowers=lowers, xattrs=opts.xattrs, opaque=opts.opaque,
                            source_date_epoch=opts.source_date_epoch, warn=opts.warn,
                            fmt=opts.fmt) as tar:
            built = fill_staging(staging, tar)  # (the walker hashes the tar)
        empty = str(built.diff_id) == EMPTY_LAYER_DIFF_ID
        config = prepare(None if empty else built.diff_id)
        with held_interrupt(), store.lock():
            rec = None if empty else store.layers.register_built(
                staging, built, chain[-1].chain_id)[0]
            return rec, publish(config)
    finally:
        if os.path.exists(staging.path):
            store.layers.discard(staging)


def _new_config(base_raw: bytes, diff_id: Digest | None, created: str, created_by: str | None,
                opts: CommitOptions) -> bytes:
    from ocilayers.changes import apply_changes, parse_change

    changes = [parse_change(c) for c in opts.changes]
    builder = ImageBuilder.from_config(base_raw)
    builder.created = created
    builder.author = opts.author
    builder.add_history(HistoryEntry(created=created, created_by=created_by,
                                     comment=opts.message, author=opts.author,
                                     empty_layer=diff_id is None))

    def edit(config: dict[str, Any]) -> None:
        for key in HOST_FIELDS:
            config.pop(key, None)
        apply_changes(config, changes)

    builder.edit_config(edit)
    return builder.config_bytes([diff_id] if diff_id is not None else [])


def commit_upper(store: Store, upper: str, base_raw: bytes, base_id: Digest,
                 chain: list[LayerRecord], opts: CommitOptions,
                 created_by: str | None = None) -> CommitResult:
    """Commit the upper dir `upper` made over the layers `chain` (base first) of the image
    `base_id` (config `base_raw`). Nothing is registered when anything fails."""
    from ocilayers.changes import parse_change
    from ocilayers.spec import normalize_reference

    for c in opts.changes:  # bad input fails before any work
        parse_change(c)
    tags = tuple(dict.fromkeys(normalize_reference(t) for t in opts.tags))
    ImageConfig.parse(base_raw, "base config")
    created = created_time(opts.source_date_epoch)

    def prepare(diff_id: Digest | None) -> bytes:
        return _new_config(base_raw, diff_id, created,
                           opts.created_by if opts.created_by is not None else created_by, opts)

    def publish(config: bytes) -> Digest:  # (under the store lock)
        return store.images.add(config, base_id, tags)

    rec, image_id = _ingest_upper(store, upper, chain, opts, prepare, publish)
    return CommitResult(image_id, rec.diff_id if rec else None,
                        rec.chain_id if rec else None, rec.size if rec else 0, tags)


def default_created_by(c: Container) -> str | None:
    """The commands of the container's `run` steps joined with ` && `, else its command."""
    if c.runs:
        return " && ".join(" ".join(r) for r in c.runs)
    return " ".join(c.command) or None


def commit_container(store: Store, c: Container, opts: CommitOptions) -> CommitResult:
    """Commit the container's rw layer (its `diff/`, never the init layer) as a new image on
    the image it was made from (its config as it was then)."""
    store.containers.check_idle(c, "commit")
    chain = store.layers.chain(Digest.parse(c.parent))
    fmt = store.layout.overlay_format()
    if fmt.xattr_namespace == "user":  # a rootless store: user.overlay.* markers, records
        opts = replace(opts, fmt=fmt)
    return commit_upper(store, store.containers.diff_dir(c), store.containers.base_config(c),
                        Digest.parse(c.image_id), chain, opts, default_created_by(c))


def commit_dir(store: Store, upper: str, image: str, opts: CommitOptions) -> CommitResult:
    """Commit an upper dir made elsewhere (Docker's, podman's) onto an image in the store."""
    if not os.path.isdir(upper):
        raise OCILayersError(f"{upper}: not a directory")
    with contextlib.ExitStack() as held:
        with store.lock():  # (a claim is made under the lock; it lasts past it)
            img = store.find_image(image)
            if img.top is None:
                raise OCILayersError(f"image {img.image_id.short} has no layers to commit "
                                     "onto")
            held.enter_context(store.layers.claim([r.chain_id for r in img.layers]))
        return commit_upper(store, upper, img.config.raw, img.image_id, list(img.layers), opts)
