"""The push and pull-record workflows. Push: a store image or a source into a registry
repository. A source whose manifests need no change is copied as it is (its blobs, its
manifest bytes, an index with every platform's manifest); a store image, or a source asked for
another compression or manifest family, goes through the image builder, each layer compressed
and uploaded as it is made. Either way a blob the repository has is skipped (HEAD), one that
another repository of the registry has is mounted, and manifests go after their blobs, the
tag last. What was pushed and pulled is recorded as dockerd records it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass

from ocilayers.builder import BlobInput, ImageBuilder, ProgressFn, check_family
from ocilayers.cas import Blob
from ocilayers.errors import ImageError, OCILayersError
from ocilayers.export import source_blobs, source_layers, store_layers
from ocilayers.lookup import source_or_image
from ocilayers.registry import PushStats, RemoteRef
from ocilayers.remote import RegistrySource
from ocilayers.sources import Image, ImageSource
from ocilayers.spec import (
    INDEX_MEDIA_TYPES,
    MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    Descriptor,
    Digest,
    Index,
    Platform,
    manifest_family,
)
from ocilayers.store import Store
from ocilayers.streams import COMPRESSIONS, sniff
from ocilayers.transports import open_source
from ocilayers.writer import RegistryDestination

_UPLOADS = 2  # blobs uploaded at once by a push of a source


@dataclass(frozen=True)
class PushResult:
    ref: str
    manifest_digest: Digest  # what the tag names (an index, for a multi-platform push)
    image_id: Digest | None  # None for an index
    stats: PushStats
    media_type: str


def push(arg: str, dest: str, *, root: str | None = None, ref: str | None = None,
         platform: Platform | str | None = None, compression: str | None = None,
         family: str | None = None, progress: ProgressFn | None = None) -> PushResult:
    """Push the store image or source `arg` to `dest` (`docker://HOST/REPO:TAG`)."""
    target = RemoteRef.parse(dest)
    if compression is not None and compression not in COMPRESSIONS:
        raise OCILayersError(f"unknown compression {compression!r}")
    if family is not None and family not in ("oci", "docker"):
        raise OCILayersError(f"unknown manifest format {family!r} (oci or docker)")
    store = Store(root)
    if source_or_image(store, arg) == "image":
        check_family(family or "oci", compression or "gzip", [], "--format oci")
        return _push_store_image(store, arg, target, compression or "gzip", family or "oci",
                                 progress)
    with open_source(arg) as src:
        if compression is None and family is None and src.kind != "docker-archive":
            return _copy_source(src, target, ref, platform)
        image = src.resolve(ref, platform)
        fam = family or manifest_family(image.manifest.media_type)
        check_family(fam, compression or "gzip", [] if compression else
                     [layer.descriptor for layer in image.layers], "--format oci")
        stats = PushStats()
        builder = ImageBuilder.from_config(image.config.raw)
        for layer in (source_blobs(src, image) if compression is None
                      else source_layers(src, image)):
            builder.keep_layer(layer)
        d = RegistryDestination(target, stats=stats, mount_from=_same_registry(src, target))
        written = builder.write(d, compression=compression or "gzip", family=fam,
                                progress=progress)
        d.finish()
        return PushResult(str(target), written.manifest.digest, written.config.digest, stats,
                          written.manifest.media_type)


def _same_registry(src: ImageSource, target: RemoteRef
                   ) -> Callable[[Digest], Sequence[str]] | None:
    """A source repository of the same registry: blobs are mounted from it."""
    if isinstance(src, RegistrySource) and src.ref.host == target.host:
        repo = src.ref.repo
        return lambda _d: [repo]
    return None


def _push_store_image(store: Store, name: str, target: RemoteRef, compression: str,
                      family: str, progress: ProgressFn | None) -> PushResult:
    with contextlib.ExitStack() as held:
        with store.lock():
            img = store.find_image(name)
            held.enter_context(store.layers.claim([r.chain_id for r in img.layers]))
        stats = PushStats()
        dist = store.distribution

        def mount_from(digest: Digest) -> list[str]:
            diff_id = dist.diff_id_of(digest)
            if diff_id is None:
                return []
            return [r.split("/", 1)[1] for d, r in dist.blobs_of(diff_id)
                    if d == digest and r.startswith(target.host + "/")]

        d = RegistryDestination(target, stats=stats, mount_from=mount_from)
        builder = ImageBuilder.from_config(img.config.raw)
        for layer, rec in zip(store_layers(store, img), img.layers, strict=True):
            known = _known_blob(d, store, rec.diff_id, target)
            builder.keep_layer(known or layer)
        written = builder.write(d, compression=compression, family=family, progress=progress)
        d.finish()
        with store.lock():
            for rec, desc in zip(img.layers, written.layers, strict=True):
                dist.record(rec.diff_id, desc.digest, f"{target.host}/{target.repo}",
                            desc.media_type)
    return PushResult(str(target), written.manifest.digest, written.config.digest, stats,
                      written.manifest.media_type)


def _known_blob(d: RegistryDestination, store: Store, diff_id: Digest,
                target: RemoteRef) -> BlobInput | None:
    """The layer as a blob the registry has (pulled from, or pushed to, one of its
    repositories): its descriptor, so the builder copies nothing. None: compress it."""
    for digest, repo in store.distribution.blobs_of(diff_id):
        if not repo.startswith(target.host + "/"):
            continue
        if not d.blobs.has_blob(digest):
            continue
        size = d.blobs.size_of(digest)
        if size is None or size < 0:
            continue
        media = store.distribution.media_type_of(digest)
        if media is None:  # (recorded by dockerd, or before ocilayers kept media types)
            head = d.registry.open_blob(target.repo, digest, size)
            try:
                kind = sniff(head.read(4))
            finally:
                head.close()
            media = {"gzip": MEDIA_TYPE_OCI_LAYER_GZIP, "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD,
                     "none": MEDIA_TYPE_OCI_LAYER}.get(kind)
            if media is None:
                continue

        def unused() -> AbstractContextManager[Blob]:
            raise OCILayersError("the registry's blob is not read again")

        return BlobInput(Descriptor(media, digest, size), diff_id, unused)
    return None


# --- a source copied as it is ---

def _copy_source(src: ImageSource, target: RemoteRef, ref: str | None,
                 platform: Platform | str | None) -> PushResult:
    stats = PushStats()
    d = RegistryDestination(target, stats=stats, mount_from=_same_registry(src, target))
    top = _top_index(src, ref)
    if top is not None and platform is None:
        raw, desc = top
        index = Index.parse(raw, f"index {desc.digest}")
        for m in index.manifests:
            image = src.resolve_descriptor(m, m.platform)
            _copy_image(src, image, d)
        d.registry.put_manifest(target.repo, str(desc.digest), raw, desc.media_type)
        if target.tag is not None:
            d.registry.put_manifest(target.repo, target.tag, raw, desc.media_type)
        return PushResult(str(target), desc.digest, None, stats, desc.media_type)
    image = src.resolve(ref, platform)
    raw, media = _copy_image(src, image, d)
    assert image.manifest_digest is not None
    if target.tag is not None:
        d.registry.put_manifest(target.repo, target.tag, raw, media)
    return PushResult(str(target), image.manifest_digest, image.config_digest, stats, media)


def _top_index(src: ImageSource, ref: str | None) -> tuple[bytes, Descriptor] | None:
    """The source's multi-platform index, when what it names is one."""
    if isinstance(src, RegistrySource):
        data, media, digest = src.top_manifest()
        if media in INDEX_MEDIA_TYPES:
            return data, Descriptor(media, digest, len(data))
        return None
    if src.kind == "docker-archive":
        return None
    cands = src.candidates()
    picked = [c for c in cands if ref is None or c.matches(ref)]
    if len(picked) == 1 and picked[0].descriptor is not None and \
            picked[0].descriptor.media_type in INDEX_MEDIA_TYPES:
        desc = picked[0].descriptor
        return src.read_blob(desc, "index"), desc
    return None


def _copy_image(src: ImageSource, image: Image, d: RegistryDestination) -> tuple[bytes, str]:
    """An image's blobs, then its manifest by digest; returns (manifest bytes, media type)."""
    if image.manifest_digest is None:
        raise ImageError(f"{src.name}: the image has no manifest to copy")
    todo = {desc.digest: desc for desc in [image.manifest.config, *image.manifest.layers]}

    def one(desc: Descriptor) -> None:
        if not d.blobs.has_blob(desc.digest):
            f = src.blobs.open_blob(desc.digest)
            try:
                d.blobs.upload(f, desc.digest, desc.size)
            finally:
                f.close()

    # Two at a time, biggest first: while the registry checks and stores one blob (its
    # digest, a rename), the next one is already on its way.
    with ThreadPoolExecutor(max_workers=_UPLOADS, thread_name_prefix="push") as pool:
        for _ in pool.map(one, sorted(todo.values(), key=lambda x: -x.size)):
            pass
    # (a registry reads manifests by digest; a layout keeps them as blobs of their own size)
    size = 0 if isinstance(src, RegistrySource) else src.blobs.blob_size(image.manifest_digest)
    raw = src.read_blob(Descriptor(image.manifest.media_type, image.manifest_digest, size or 0),
                        "manifest")
    d.registry.put_manifest(d.ref.repo, str(image.manifest_digest), raw,
                            image.manifest.media_type)
    return raw, image.manifest.media_type
