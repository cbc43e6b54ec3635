"""A registry repository as an image source (`docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`):
resolution through the registry's manifests (an index by `--platform`), blobs read from the
registry, every blob's size and digest and every layer's DiffID checked as for a file
source. Options (TLS, credentials) come from `use_options()`, which the CLI sets once."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator

from ocilayers.errors import ImageError, RefError
from ocilayers.registry import (
    Registry,
    RegistryBlobs,
    RegistryOptions,
    RemoteRef,
)
from ocilayers.sources import Image, ImageSource, Layer
from ocilayers.spec import Descriptor, Digest, Platform, normalize_reference
from ocilayers.streams import LayerReader

_OPTIONS: contextvars.ContextVar[RegistryOptions | None] = contextvars.ContextVar(
    "ocilayers_registry_options", default=None)


@contextlib.contextmanager
def use_options(opts: RegistryOptions) -> Iterator[None]:
    """Registry options for every `docker://` opened in the block."""
    token = _OPTIONS.set(opts)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def current_options() -> RegistryOptions:
    return _OPTIONS.get() or RegistryOptions()


class RegistrySource(ImageSource):
    """One repository of a registry, read as a source. `config_cache(digest)` may give a
    config's bytes without a request (unpack: a config the store has already)."""

    def __init__(self, ref: RemoteRef, opts: RegistryOptions | None = None) -> None:
        self.ref = ref
        self.registry = Registry(ref.host, opts or current_options())
        self._sizes: dict[Digest, int] = {}
        self._manifests: dict[Digest, bytes] = {}
        self.blobs = RegistryBlobs(self.registry, ref.repo, self._sizes.get)
        self.kind = "registry"
        self.name = str(ref)
        self.transport_ref = None
        self.config_cache: Callable[[Digest], bytes | None] | None = None
        self.manifest_digest: Digest | None = None
        self.manifest_media_type: str | None = None

    def close(self) -> None:
        self.blobs.close()

    def read_blob(self, desc: Descriptor, what: str) -> bytes:
        if what in ("manifest", "index"):
            data = self._manifests.get(desc.digest)
            if data is None:
                data, _media, _digest = self.registry.get_manifest(self.ref.repo,
                                                                   str(desc.digest))
                self._manifests[desc.digest] = data
            if desc.size and len(data) != desc.size:
                raise ImageError(f"{what} {desc.digest}: {len(data)} bytes, its descriptor "
                                 f"says {desc.size}")
            return data
        if what == "config" and self.config_cache is not None:
            have = self.config_cache(desc.digest)
            if have is not None and Digest.of_bytes(have) == desc.digest:
                return have
        self._sizes[desc.digest] = desc.size  # (so no HEAD asks for the size)
        return super().read_blob(desc, what)

    def check_layer_present(self, layer: Layer) -> None:
        """No request: the size is the descriptor's, and the GET checks the rest."""
        self._sizes[layer.descriptor.digest] = layer.descriptor.size

    def open_layer(self, layer: Layer, progress: Callable[[int], None] | None = None,
                   readahead: bool | Callable[[], bool] = False) -> LayerReader:
        self._sizes[layer.descriptor.digest] = layer.descriptor.size
        return super().open_layer(layer, progress, readahead)

    def top_manifest(self) -> tuple[bytes, str, Digest]:
        """The manifest (or index) the reference names, fetched once."""
        if self.manifest_digest is None or self.manifest_media_type is None:
            data, media, digest = self.registry.get_manifest(self.ref.repo,
                                                             self.ref.reference)
            self._manifests[digest] = data
            self.manifest_digest = digest
            self.manifest_media_type = media
        return (self._manifests[self.manifest_digest], self.manifest_media_type,
                self.manifest_digest)

    def resolve(self, ref: str | None = None, platform: Platform | str | None = None) -> Image:
        if ref:
            raise RefError(f"{self.name}: the tag or digest goes in the docker:// reference, "
                           "not --ref")
        data, media, digest = self.top_manifest()
        image = self.resolve_descriptor(Descriptor(media, digest, len(data)), platform)
        names: tuple[str, ...] = ()
        if self.ref.tag is not None:
            names = (normalize_reference(f"{self.ref.host}/{self.ref.repo}:{self.ref.tag}"),)
        return dataclasses.replace(image, names=names, ref_names=names)


@contextlib.contextmanager
def open_registry(spec: str, opts: RegistryOptions | None = None
                  ) -> Iterator[RegistrySource]:
    src = RegistrySource(RemoteRef.parse(spec), opts)
    with src:
        yield src
