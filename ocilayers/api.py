"""The public surface: short workflows over the package's rooms, source -> core -> destination.

Images from sources (`inspect_source`, `convert_image`), the store (`open_store`, `unpack`,
`find_image`, `load_image`, `list_images`, `tag`, `untag`, `remove_image`, `prune`, `verify`,
`export`, `flatten`, `mount`, `umount`), layers from upper dirs (`pack`), and why images
grow (`history`, `squash`). JSON shapes are
in `ocilayers.shapes`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ocilayers import shapes
from ocilayers.lookup import source_or_image
from ocilayers.spec import Digest, Platform
from ocilayers.store import Store, StoreImage
from ocilayers.transports import open_source

if TYPE_CHECKING:
    from ocilayers.builder import ProgressFn, WrittenImage
    from ocilayers.history import HistoryReport
    from ocilayers.pack import PackResult
    from ocilayers.push import PushResult
    from ocilayers.sources import Image
    from ocilayers.squash import SquashOptions, SquashResult
    from ocilayers.unpack import ProgressFn as UnpackProgress
    from ocilayers.unpack import UnpackResult

__all__ = ["PackResult", "SquashOptions", "Store", "StoreImage", "convert_image", "export",
           "find_image", "flatten", "history", "inspect_source", "list_images", "load_image",
           "login", "logout", "mount", "open_store", "pack", "pack_to_file", "prune", "push",
           "remove_image",
           "resolve_source", "source_or_image", "squash", "tag", "umount", "unpack", "untag",
           "verify"]


# --- sources ---

def resolve_source(source: str, *, ref: str | None = None,
                   platform: Platform | str | None = None) -> Image:
    """One image of a source: manifest, config and layer descriptors, without reading the
    layers (their presence and size are checked)."""
    with open_source(source) as src:
        image = src.resolve(ref, platform)
        for layer in image.layers:
            src.check_layer_present(layer)
        return image


def inspect_source(source: str, *, ref: str | None = None,
                   platform: Platform | str | None = None) -> dict[str, Any]:
    """Describe one image of a source without reading its layers (their presence is checked)."""
    return shapes.source_image(resolve_source(source, ref=ref, platform=platform))


def convert_image(source: str, out: str, *, ref: str | None = None,
                  platform: Platform | str | None = None, format: str = "oci-archive",
                  compression: str = "gzip", tags: Sequence[str] | None = None,
                  progress: ProgressFn | None = None) -> WrittenImage:
    """Copy an image from any source into any output format, verifying every blob."""
    from ocilayers.export import convert_image as convert

    return convert(source, out, ref=ref, platform=platform, format=format,
                   compression=compression, tags=tags, progress=progress)


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
    from ocilayers.unpack import unpack_image

    store = open_store(root, must_exist=False)
    with open_source(source) as src:
        # (open_source imports the registry modules for a docker:// source only: none loaded,
        # no registry source, and a local unpack does not pay for their import)
        remote_mod = sys.modules.get("ocilayers.remote")
        remote = src if remote_mod is not None and isinstance(src, remote_mod.RegistrySource) \
            else None
        if remote is not None and store.exists():  # a config the store has: no request
            remote.config_cache = lambda d: (
                store.images.config_bytes(d)
                if os.path.exists(store.layout.image_content(d)) else None)
        image = src.resolve(ref, platform)
        result = unpack_image(store, src, image, tags=image.names if tags is None else tags,
                              jobs=jobs, progress=progress)
        if remote is not None:
            from ocilayers.unpack import record_pull

            record_pull(store, image, f"{remote.ref.host}/{remote.ref.repo}",
                        remote.manifest_digest)
        return result


def find_image(store: Store, name: str) -> Digest:
    """A tag, an image ID (`sha256:<hex>` or hex), or a unique ID prefix."""
    return store.images.find(name)


def load_image(store: Store, image_id: Digest) -> StoreImage:
    """The image's config, tags and layer records (base first)."""
    return store.load_image(image_id)


def list_images(store: Store) -> list[dict[str, Any]]:
    return [shapes.image_row(img) for img in store.iter_images()]


def tag(store: Store, name: str, ref: str) -> str:
    """Tag the image `name` as `ref`; returns the normalised tag."""
    with store.lock():
        return store.images.set_tag(ref, store.images.find(name))


def untag(store: Store, ref: str) -> Digest:
    """Remove a tag (the image stays); returns the image ID it named."""
    with store.lock():
        return store.images.remove_tag(ref)


def remove_image(store: Store, name: str) -> list[str]:
    """`rmi`: see `ocilayers.store.gc.remove_image`."""
    from ocilayers.store.gc import remove_image as rmi

    return rmi(store, name)


def prune(store: Store) -> list[str]:
    """Remove layers no image or container references, and orphaned layer dirs."""
    from ocilayers.store.gc import prune as gc_prune

    return gc_prune(store)


def verify(store: Store, name: str | None = None) -> list[str]:
    """Check layers against their tar-split records and every store file against the format;
    returns the problems found (empty: all good)."""
    from ocilayers.store.fsck import verify as fsck_verify

    return fsck_verify(store, name)


def export(store: Store, name: str, out: str, *, format: str = "oci-archive",
           compression: str = "gzip", progress: ProgressFn | None = None) -> WrittenImage:
    """Rebuild each layer tar byte for byte from its diff dir and tar-split, and write the
    image. A diff dir changed since unpack fails, naming the first changed path."""
    from ocilayers.export import export as export_image

    return export_image(store, name, out, format=format, compression=compression,
                        progress=progress)


def flatten(arg: str, dest: str, *, root: str | None = None, ref: str | None = None,
            platform: Platform | str | None = None) -> int:
    """Apply every layer in delete mode into the plain dir `dest`; returns the layer count."""
    from ocilayers.flatten import flatten as flatten_image

    return flatten_image(arg, dest, root=root, ref=ref, platform=platform)


def mount(store: Store, name: str, target: str, *, fuse: bool = False) -> str:
    """A read-only merged view of an image (overlay of its lower chain; bind for one layer),
    recorded in the store; returns the target path. `fuse`: with fuse-overlayfs (rootless:
    it shows the owners the store recorded)."""
    from ocilayers.view import mount_image

    return mount_image(store, name, target, fuse=fuse)


def umount(store: Store, target: str) -> None:
    """Unmount a view `mount` made (by its record in the store)."""
    from ocilayers.view import umount as view_umount

    view_umount(store, target)


# --- layers from upper dirs (imported when used: start-up stays cheap for the rest) ---

def pack(upper: str, out: Any, **kwargs: Any) -> PackResult:
    """The layer of an upper dir (or of `upper` against the tree `base=`), compressed into
    the stream `out`; see `ocilayers.pack.pack` for the options."""
    from ocilayers.pack import pack as pack_layer

    return pack_layer(upper, out, **kwargs)


def pack_to_file(upper: str, out: str, **kwargs: Any) -> PackResult:
    """`pack` into the file `out`, atomically; see `ocilayers.pack.pack_to_file`."""
    from ocilayers.pack import pack_to_file as pack_file

    return pack_file(upper, out, **kwargs)


# --- growth: history and squash ---

def history(arg: str, **kwargs: Any) -> HistoryReport:
    """The history of a store image or a source with every layer's growth figures (added,
    changed, whiteouts, wasted and unchanged-rewrite bytes), the totals and dive's figures;
    see `ocilayers.history.image_history` for the options."""
    from ocilayers.history import image_history

    return image_history(arg, **kwargs)


def squash(arg: str, options: SquashOptions, **kwargs: Any) -> SquashResult:
    """Merge the layers above a point into one (`SquashOptions`: keep N, keep the layers of a
    base image, or all; into `-o OUT` or the store); see `ocilayers.squash.squash`."""
    from ocilayers.squash import squash as squash_image

    return squash_image(arg, options, **kwargs)


# --- registries ---

def push(arg: str, dest: str, **kwargs: Any) -> PushResult:
    """Push a store image or a source to `docker://HOST/REPO:TAG`; see
    `ocilayers.push.push` for the options."""
    from ocilayers.push import push as push_image

    return push_image(arg, dest, **kwargs)


def login(host: str, username: str, password: str) -> str:
    """Store credentials for a registry as `docker login` does; returns where."""
    from ocilayers.credentials import login as store_login

    return store_login(host, username, password)


def logout(host: str) -> bool:
    from ocilayers.credentials import logout as drop_login

    return drop_login(host)


def __getattr__(name: str) -> Any:
    if name == "PackResult":
        from ocilayers.pack import PackResult

        return PackResult
    if name == "SquashOptions":
        from ocilayers.squash import SquashOptions

        return SquashOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
