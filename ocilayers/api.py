"""Orchestration: the library's entry points, composed from sources, writers and the store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ocilayers.errors import ImageError, OCILayersError, StoreError
from ocilayers.sources import TRANSPORTS, Image, ImageSource, Layer, open_source
from ocilayers.spec import (
    Digest,
    ImageConfig,
    Platform,
    chain_ids,
    normalize_reference,
    oci_layer_media_type,
)
from ocilayers.store import LayerRecord, Store, diff_size
from ocilayers.streams import Compressor, HashingReader, HashingWriter, IterReader, Readable
from ocilayers.unpack import ProgressFn as UnpackProgress
from ocilayers.unpack import UnpackResult, unpack_image

# Commands import what they use, so that starting the CLI stays cheap (a no-op re-unpack of a
# present image is mostly interpreter start-up).
if TYPE_CHECKING:
    from ocilayers.differ import PackStats
    from ocilayers.writer import LayerInput, ProgressFn, WrittenImage


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
    from ocilayers.writer import LayerInput, verified_layer

    def opener(layer: Layer) -> Callable[[], AbstractContextManager[Readable]]:
        return lambda: verified_layer(lambda: src.open_layer(layer, readahead=True))

    return [LayerInput(layer.diff_id, opener(layer)) for layer in image.layers]


def convert_image(source: str, out: str, *, ref: str | None = None,
                  platform: Platform | str | None = None, format: str = "oci-archive",
                  compression: str = "gzip", tags: Sequence[str] | None = None,
                  progress: ProgressFn | None = None) -> WrittenImage:
    """Copy an image from any source into any output format, verifying every blob."""
    from ocilayers.writer import write_image

    with open_source(source) as src:
        image = src.resolve(ref, platform)
        return write_image(out, image.config.raw, source_layers(src, image), format=format,
                           compression=compression,
                           tags=image.names if tags is None else tags, progress=progress)


# --- the store ---

def open_store(root: str | None = None, *, must_exist: bool = True) -> Store:
    store = Store(root)
    if must_exist:
        store.require()
    return store


def unpack(source: str, *, root: str | None = None, ref: str | None = None,
           platform: Platform | str | None = None, tags: Sequence[str] | None = None,
           jobs: int | None = None, progress: UnpackProgress | None = None) -> UnpackResult:
    """Unpack an image from a source into the store (`ocilayers unpack`).

    Tags: `tags`, else the source's RepoTags / full-reference ref names (a bare-tag ref name,
    as skopeo writes, names no repository and gives no tag)."""
    store = open_store(root, must_exist=False)
    with open_source(source) as src:
        image = src.resolve(ref, platform)
        return unpack_image(store, src, image, tags=image.names if tags is None else tags,
                            jobs=jobs, progress=progress)


@dataclass(frozen=True)
class StoreImage:
    image_id: Digest
    config: ImageConfig
    tags: tuple[str, ...]
    layers: tuple[LayerRecord, ...]


def load_image(store: Store, image_id: Digest) -> StoreImage:
    config = ImageConfig.parse(store.image_config(image_id), f"image {image_id.short}")
    chains = chain_ids(config.diff_ids)
    layers = tuple(store.chain(chains[-1])) if chains else ()
    tags = tuple(sorted(t for t, i in store.tags().items() if i == image_id))
    return StoreImage(image_id, config, tags, layers)


def find_image(store: Store, name: str) -> Digest:
    """A tag, an image ID (`sha256:<hex>` or hex), or a unique ID prefix."""
    tags = store.tags()
    with contextlib.suppress(ImageError):
        norm = normalize_reference(name)
        if norm in tags:
            return tags[norm]
    ids = store.image_ids()
    hexpart = name.split(":", 1)[1] if name.startswith("sha256:") else name
    if hexpart and all(c in "0123456789abcdef" for c in hexpart):
        matches = [i for i in ids if i.hex.startswith(hexpart)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise StoreError(f"image ID prefix {name!r} is ambiguous")
    raise ImageNotFoundError(f"no such image in the store: {name}")


class ImageNotFoundError(StoreError):
    """No tag, ID or ID prefix in the store matches."""


def is_store_name(store: Store, name: str) -> bool:
    """Does `name` pick a store image? An ambiguous ID prefix raises (it is a store name)."""
    if not store.exists():
        return False
    try:
        find_image(store, name)
    except ImageNotFoundError:
        return False
    return True


def source_or_image(store: Store, arg: str) -> str:
    """'source' or 'image' (DESIGN: a transport prefix or an existing path is a source)."""
    if arg == "-" or arg.startswith(TRANSPORTS):
        return "source"
    exists = os.path.exists(arg)
    in_store = is_store_name(store, arg)
    if exists and in_store:
        raise OCILayersError(f"{arg!r} is both a path and an image in the store; write "
                             f"./{arg} or oci:{arg} for the path, or use the image ID")
    if in_store:
        return "image"
    if exists or not store.exists():
        return "source"  # with no store, the open reports the missing path
    raise StoreError(f"{arg}: no such file, directory or image in the store")


def store_image_summary(img: StoreImage) -> dict[str, Any]:
    return {
        "image_id": str(img.image_id),
        "tags": list(img.tags),
        "config": img.config.data,
        "history": [h.to_json() for h in img.config.history],
        "layers": [{"diff_id": str(r.diff_id), "chain_id": str(r.chain_id),
                    "cache_id": r.cache_id, "diff_size": r.size} for r in img.layers],
    }


def list_images(store: Store) -> list[dict[str, Any]]:
    out = []
    for image_id in store.image_ids():
        img = load_image(store, image_id)
        row = {"image_id": str(image_id), "tags": list(img.tags),
               "created": img.config.data.get("created"),
               "size": sum(r.size for r in img.layers)}
        out.append(row)
    return out


def remove_image(store: Store, name: str) -> list[str]:
    """`rmi`: untag (a tag given) or drop all tags (an ID given); when no tag is left, remove
    the image and every layer nothing else needs. Returns what was removed."""
    removed: list[str] = []
    with store.lock():
        image_id = find_image(store, name)
        img = load_image(store, image_id)
        for rec in img.layers:  # a corrupt store file is an error before anything is removed
            store.check_layer_files(rec)
        tags = store.tags()
        with contextlib.suppress(ImageError):
            norm = normalize_reference(name)
            if tags.get(norm) == image_id:
                store.remove_tag(norm)
                removed.append(f"untagged {norm}")
                if any(i == image_id for t, i in tags.items() if t != norm):
                    return removed
        top = img.layers[-1].chain_id if img.layers else None
        users = store.containers_using(top)
        if users:
            raise StoreError(f"image {image_id.short} is used by container(s) "
                             f"{', '.join(users)}")
        for t in img.tags:
            if t in store.tags():
                store.remove_tag(t)
                removed.append(f"untagged {t}")
        store.remove_image(image_id)
        removed.append(f"deleted {image_id}")
        removed += _prune_layers(store)
    return removed


def _prune_layers(store: Store) -> list[str]:
    needed = store.referenced_chains()
    removed = []
    # children before parents: remove the layers no remaining layer names as parent first
    layers = {r.chain_id: r for r in store.layers()}
    for r in layers.values():
        if r.chain_id not in needed:
            store.check_layer_files(r)  # all checked before the first one goes
    while True:
        parents = {r.parent for r in layers.values() if r.parent is not None}
        leaves = [r for c, r in layers.items() if c not in needed and c not in parents]
        if not leaves:
            break
        for r in leaves:
            store.remove_layer(r)
            removed.append(f"deleted layer {r.chain_id}")
            del layers[r.chain_id]
    return removed


def prune(store: Store) -> list[str]:
    """Remove layers no image or container references, and orphaned layer dirs."""
    with store.lock():
        store.clean_stale()
        removed = _prune_layers(store)
        removed += store.remove_orphans()
    return removed


# --- verify ---

def _layer_stream(store: Store, rec: LayerRecord) -> IterReader:
    from ocilayers.tarsplit import assemble, open_records

    diff = os.path.join(store.layer_path(rec.cache_id), "diff")
    return IterReader(assemble(open_records(store.tar_split_path(rec.chain_id)), diff))


def verify(store: Store, name: str | None = None) -> list[str]:
    """Check layers against their tar-split records (content and metadata) and every store
    file against the overlay2 format. Returns the problems found (empty: all good)."""
    problems = store.check_format()
    if name is not None:
        recs = list(load_image(store, find_image(store, name)).layers)
    else:
        recs = store.layers()
        for image_id in store.image_ids():  # every image's chain of layers is still there
            try:
                load_image(store, image_id)
            except OCILayersError as exc:
                problems.append(f"image {image_id.short}: {exc}")
    for rec in recs:
        try:
            problems += verify_layer(store, rec)
        except OCILayersError as exc:
            problems.append(f"layer {rec.chain_id.short}: {exc}")
    return problems


def verify_layer(store: Store, rec: LayerRecord) -> list[str]:
    from ocilayers.verify import compare_tree

    diff = os.path.join(store.layer_path(rec.cache_id), "diff")
    stream = _layer_stream(store, rec)
    hasher = HashingReader(stream)
    problems = [f"layer {rec.chain_id.short}: {p}" for p in compare_tree(hasher, diff)]
    hasher.drain()
    if hasher.hash.hexdigest() != rec.diff_id.hex:
        problems.append(f"layer {rec.chain_id.short}: rebuilt tar has DiffID "
                        f"sha256:{hasher.hash.hexdigest()}, layerdb says {rec.diff_id}")
    if diff_size(diff) != rec.size:
        problems.append(f"layer {rec.chain_id.short}: size file says {rec.size}, "
                        f"diff dir holds {diff_size(diff)}")
    return problems


# --- flatten and export ---

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
    img = load_image(store, find_image(store, arg))
    for rec in img.layers:
        apply_layer(_layer_stream(store, rec), dest, mode="delete")
    return len(img.layers)


def export(store: Store, name: str, out: str, *, format: str = "oci-archive",
           compression: str = "gzip", progress: ProgressFn | None = None) -> WrittenImage:
    """Rebuild each layer tar byte for byte from its diff dir and tar-split, and write the
    image. A diff dir changed since unpack fails, naming the first changed path."""
    from ocilayers.writer import LayerInput, write_image

    img = load_image(store, find_image(store, name))

    def opener(rec: LayerRecord) -> Callable[[], AbstractContextManager[Readable]]:
        return lambda: contextlib.nullcontext(_layer_stream(store, rec))

    layers = [LayerInput(r.diff_id, opener(r)) for r in img.layers]
    return write_image(out, img.config.raw, layers, format=format, compression=compression,
                       tags=img.tags, progress=progress)


# --- mount ---

def mount(store: Store, name: str, target: str) -> None:
    """A read-only merged view of an image (overlay of its lower chain; bind for one layer)."""
    img = load_image(store, find_image(store, name))
    if not img.layers:
        raise StoreError("image has no layers to mount")
    top = img.layers[-1]
    if len(img.layers) == 1:
        diff = os.path.join(store.layer_path(top.cache_id), "diff")
        _run(["mount", "--bind", "-o", "ro", diff, target])
        _run(["mount", "-o", "remount,bind,ro", target])
        return
    lowers = [f"l/{store.link_of(top.cache_id)}", *store.lower_of(top.cache_id).split(":")]
    absolute = ":".join(os.path.join(store.overlay, x) for x in lowers)
    target_abs = os.path.abspath(target)
    opts = f"ro,lowerdir={absolute}"
    if len(opts) < os.sysconf("SC_PAGE_SIZE") - 1:
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, target_abs])
    else:  # as dockerd does: short l/ names, relative to overlay2/
        _run(["mount", "-t", "overlay", "overlay", "-o", "ro,lowerdir=" + ":".join(lowers),
              target_abs], cwd=store.overlay)


def umount(target: str) -> None:
    _run(["umount", target])


def _run(argv: list[str], cwd: str | None = None) -> None:
    import subprocess

    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise StoreError(f"{argv[0]} failed: {msg[-1] if msg else proc.returncode}")


# --- pack (commit an upper dir) ---

@dataclass(frozen=True)
class PackResult:
    diff_id: Digest
    digest: Digest
    size: int
    media_type: str
    stats: PackStats

    def to_json(self) -> dict[str, Any]:
        return {"diff_id": str(self.diff_id), "digest": str(self.digest), "size": self.size,
                "media_type": self.media_type, "entries": self.stats.entries,
                "whiteouts": self.stats.whiteouts, "opaques": self.stats.opaques}


def pack(upper: str, out: Any, *, base: str | None = None, lowers: Sequence[str] = (),
         compression: str = "gzip", xattrs: str = "all", opaque: str | None = None,
         source_date_epoch: int | None = None, content: bool = False,
         warn: Callable[[str], None] | None = None,
         xattr_namespace: str = "trusted") -> PackResult:
    """Write the layer for an upper dir (or for `upper` against the plain tree `base`) into
    the binary stream `out`, compressed; returns its DiffID, blob digest and size.
    `xattr_namespace` is the overlay mount's: "trusted", or "user" for a `userxattr` mount."""
    from ocilayers.differ import write_layer, write_tree_diff

    blob = HashingWriter(out)
    # zstd in worker threads, capped at 2: each costs ~40-50 MB on incompressible data (the
    # benchmark measured 129 MB peak with 2, 145 MB with 4), and multi-threaded zstd output is
    # the same for any thread count, so the cap keeps pack deterministic across machines.
    threads = min(2, os.cpu_count() or 1) if compression == "zstd" else 0
    compressor = Compressor(blob, compression, threads=threads)
    plain = HashingWriter(compressor)
    if base is not None:
        stats = write_tree_diff(upper, base, plain, content=content, xattrs=xattrs,
                                source_date_epoch=source_date_epoch, warn=warn)
    else:
        stats = write_layer(upper, plain, lowers=list(lowers) or None, xattrs=xattrs,
                            opaque=opaque, source_date_epoch=source_date_epoch, warn=warn,
                            xattr_namespace=xattr_namespace)
    compressor.close()
    return PackResult(plain.digest, blob.digest, blob.count, oci_layer_media_type(compression),
                      stats)
