"""Image sources: OCI layout dirs, oci-archive and docker-save tarballs, read in place, and
image resolution (ref, platform, index -> manifest -> config -> layers) over a content store."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from ocilayers.cas import ContentReader, DirFiles, Files, LayoutBlobs, TarFiles
from ocilayers.errors import BlobNotFoundError, ImageError, RefError
from ocilayers.spec import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    CONFIG_MEDIA_TYPES,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MEDIA_TYPE_DOCKER_CONFIG,
    MEDIA_TYPE_DOCKER_LAYER,
    MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    chain_ids,
    is_bare_tag,
    load_json,
    normalize_reference,
)
from ocilayers.streams import (
    CHUNK,
    LayerReader,
    corrupt_types,
    decompressor,
    read_verified,
    sniff,
)

TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:")
_MAX_NESTING = 8


def host_platform() -> Platform:
    machine = os.uname().machine.lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "i386": "386", "i686": "386", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
    variant = "v7" if machine == "armv7l" else ""
    return Platform("linux", arch, variant)


# --- the resolved image ---

@dataclass(frozen=True)
class Layer:
    descriptor: Descriptor
    diff_id: Digest
    chain_id: Digest


@dataclass(frozen=True)
class Image:
    """One image picked out of a source: manifest, config and layers, base first."""

    source: str
    kind: str
    manifest: Manifest
    manifest_digest: Digest | None
    config: ImageConfig
    config_digest: Digest
    layers: tuple[Layer, ...]
    names: tuple[str, ...] = ()  # normalised repo:tag references
    ref_names: tuple[str, ...] = ()  # ref names / RepoTags as the source wrote them
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def image_id(self) -> Digest:
        return self.config_digest


@dataclass(frozen=True)
class _Candidate:
    label: str  # how it is shown in errors
    names: tuple[str, ...]  # normalised full references
    bare_tags: tuple[str, ...]
    descriptor: Descriptor | None = None  # OCI: a manifest or index
    docker_entry: Mapping[str, Any] | None = None  # docker-save manifest.json entry

    def matches(self, ref: str) -> bool:
        if ref in self.bare_tags:
            return True
        try:
            return normalize_reference(ref) in self.names
        except ImageError:
            return False


class ImageSource:
    """An opened source. Use `open_source()`; `resolve()` picks one image."""

    def __init__(self, files: Files, kind: str, name: str, ref: str | None) -> None:
        self._files = files
        self._layout = LayoutBlobs(files)
        # Resolution below reads every blob through this ContentReader only.
        self.blobs: ContentReader = self._layout
        self.kind = kind
        self.name = name
        self.transport_ref = ref

    def close(self) -> None:
        self.blobs.close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blobs --

    def _read_small(self, rel: str) -> bytes:
        """A small metadata file of the source (index.json, manifest.json)."""
        size = self._files.size(rel)
        if size is None:
            raise BlobNotFoundError(f"{self.name}: {rel} is missing")
        if size > 64 << 20:
            raise ImageError(f"{self.name}: {rel} is too large")
        f = self._files.open(rel)
        try:
            return f.read(size)
        finally:
            f.close()

    def read_blob(self, desc: Descriptor, what: str) -> bytes:
        size = self.blobs.blob_size(desc.digest)
        if size is None:
            raise BlobNotFoundError(f"{what} {desc.digest}: blob is missing")
        f = self.blobs.open_blob(desc.digest)
        try:
            return read_verified(f, desc.digest, desc.size, f"{what} {desc.digest}")
        finally:
            f.close()

    def check_layer_present(self, layer: Layer) -> None:
        """Cheap check (no read): the blob exists and has the declared size."""
        size = self.blobs.blob_size(layer.descriptor.digest)
        if size is None:
            raise BlobNotFoundError(f"layer {layer.descriptor.digest}: blob is missing")
        if size != layer.descriptor.size:
            raise ImageError(f"layer {layer.descriptor.digest}: size mismatch: expected "
                             f"{layer.descriptor.size} bytes, got {size}")

    def open_layer(self, layer: Layer, progress: Callable[[int], None] | None = None,
                   readahead: bool | Callable[[], bool] = False) -> LayerReader:
        """The decompressed layer; call `.finish()` at the end to verify digest and DiffID.
        `progress(n)` is told of every n compressed bytes read. With `readahead`, a thread
        decompresses and hashes ahead of the reader (close the reader to stop it); a
        callable starts it once it says so (see LayerReader)."""
        self.check_layer_present(layer)
        blob = self.blobs.open_blob(layer.descriptor.digest)
        return LayerReader(blob, f"layer {layer.descriptor.digest}", layer.descriptor.digest,
                           layer.descriptor.size, layer.diff_id, progress, readahead)

    # -- picking an image --

    def candidates(self) -> list[_Candidate]:
        if self.kind == "docker-archive":
            return self._docker_candidates()
        index = self._read_index()
        out = []
        for d in index.manifests:
            full: list[str] = []
            bare: list[str] = []
            for key in (ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME):
                value = d.annotations.get(key)
                if not value:
                    continue
                if key == ANNOTATION_REF_NAME and is_bare_tag(value):
                    bare.append(value)
                else:
                    with contextlib.suppress(ImageError):
                        full.append(normalize_reference(value))
            label = d.annotations.get(ANNOTATION_REF_NAME) or str(d.digest)
            out.append(_Candidate(label, tuple(full), tuple(bare), descriptor=d))
        return out

    def _read_index(self) -> Index:
        return Index.parse(self._read_small("index.json"), f"{self.name}: index.json")

    def _docker_candidates(self) -> list[_Candidate]:
        data = self._read_small("manifest.json")
        try:
            entries = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ImageError(f"{self.name}: manifest.json is not valid JSON: {exc}") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ImageError(f"{self.name}: manifest.json must be a list of objects")
        out = []
        for i, e in enumerate(entries):
            tags = e.get("RepoTags") or []
            if not isinstance(tags, list):
                raise ImageError(f"{self.name}: manifest.json: RepoTags must be a list")
            names = []
            for t in tags:
                with contextlib.suppress(ImageError):
                    names.append(normalize_reference(str(t)))
            label = ", ".join(str(t) for t in tags) or f"@{i}"
            out.append(_Candidate(label, tuple(names), (f"@{i}",), docker_entry=e))
        return out

    def resolve(self, ref: str | None = None, platform: Platform | str | None = None) -> Image:
        if isinstance(platform, str):
            platform = Platform.parse(platform)
        if ref and self.transport_ref and ref != self.transport_ref:
            raise RefError(f"--ref {ref!r} conflicts with {self.transport_ref!r} in the source")
        ref = ref or self.transport_ref
        cands = self.candidates()
        if not cands:
            raise RefError(f"{self.name}: holds no image")
        if ref:
            chosen = [c for c in cands if c.matches(ref)]
            if not chosen:
                raise RefError(f"{self.name}: no image matches {ref!r}; refs: "
                               + _list_labels(cands))
            distinct = {c.descriptor.digest if c.descriptor else id(c.docker_entry)
                        for c in chosen}
            if len(distinct) > 1:
                raise RefError(f"{self.name}: {ref!r} matches more than one image: "
                               + _list_labels(chosen))
            cand = chosen[0]
        elif len(cands) == 1:
            cand = cands[0]
        elif self.kind != "docker-archive" and all(
            not c.names and not c.bare_tags for c in cands
        ):
            # An index.json that is itself a multi-platform list.
            return self._from_platform_list(
                [c.descriptor for c in cands if c.descriptor is not None], platform)
        else:
            raise RefError(f"{self.name}: holds {len(cands)} images; pick one with --ref: "
                           + _list_labels(cands))
        if cand.docker_entry is not None:
            image = self._docker_image(cand)
            if platform is not None and not platform.matches(image.config.platform):
                raise RefError(f"{self.name}: image is {image.config.platform}, not {platform}")
            return image
        assert cand.descriptor is not None
        return self._oci_image(cand.descriptor, platform, cand)

    def _from_platform_list(self, descs: list[Descriptor], platform: Platform | None) -> Image:
        desc = self._pick_platform(descs, platform, "index.json")
        return self._oci_image(desc, platform, None)

    def _pick_platform(self, descs: list[Descriptor], platform: Platform | None,
                       what: str) -> Descriptor:
        want = platform or host_platform()
        usable = [d for d in descs
                  if d.annotations.get("vnd.docker.reference.type") != "attestation-manifest"
                  and not (d.platform and d.platform.os == "unknown")]
        matching = [d for d in usable if d.platform is None or want.matches(d.platform)]
        if not matching:
            have = ", ".join(sorted({str(d.platform) for d in usable if d.platform})) or "none"
            raise RefError(f"{self.name}: {what} has no manifest for platform {want}; "
                           f"available: {have}")
        # image-spec image-index.md: pick the first entry that matches.
        return matching[0]

    def resolve_descriptor(self, desc: Descriptor,
                           platform: Platform | str | None = None) -> Image:
        """The image a manifest or index descriptor names (an index resolved by platform),
        read from `self.blobs`: resolution by digest, for any content store."""
        if isinstance(platform, str):
            platform = Platform.parse(platform)
        return self._oci_image(desc, platform, None)

    def _oci_image(self, desc: Descriptor, platform: Platform | None,
                   cand: _Candidate | None) -> Image:
        for _ in range(_MAX_NESTING):
            if desc.media_type in INDEX_MEDIA_TYPES:
                data = self.read_blob(desc, "index")
                index = Index.parse(data, f"index {desc.digest}")
                desc = self._pick_platform(list(index.manifests), platform,
                                           f"index {desc.digest.short}")
                continue
            if desc.media_type not in MANIFEST_MEDIA_TYPES and desc.media_type:
                raise ImageError(f"{desc.digest}: unsupported mediaType {desc.media_type!r}")
            data = self.read_blob(desc, "manifest")
            obj = load_json(data, f"manifest {desc.digest}")
            if "manifests" in obj and "layers" not in obj:  # untyped descriptor to an index
                desc = Descriptor(obj.get("mediaType") or "application/vnd.oci.image.index.v1+json",
                                  desc.digest, desc.size)
                continue
            manifest = Manifest.parse(data, f"manifest {desc.digest}")
            return self._finish(manifest, desc.digest, platform, cand, desc.annotations)
        raise ImageError(f"{self.name}: indexes nested too deep")

    def _finish(self, manifest: Manifest, manifest_digest: Digest | None,
                platform: Platform | None, cand: _Candidate | None,
                annotations: Mapping[str, str]) -> Image:
        cfg_desc = manifest.config
        if cfg_desc.media_type and cfg_desc.media_type not in CONFIG_MEDIA_TYPES:
            raise ImageError(f"config {cfg_desc.digest}: not an image config "
                             f"(mediaType {cfg_desc.media_type!r})")
        config = ImageConfig.parse(self.read_blob(cfg_desc, "config"),
                                   f"config {cfg_desc.digest}")
        if platform is not None and config.platform.os and not platform.matches(config.platform):
            raise RefError(f"{self.name}: image is {config.platform}, not {platform}")
        if len(config.diff_ids) != len(manifest.layers):
            raise ImageError(f"config {cfg_desc.digest}: {len(config.diff_ids)} diff_ids for "
                             f"{len(manifest.layers)} layers")
        chains = chain_ids(config.diff_ids)
        layers = tuple(Layer(d, diff, chain) for d, diff, chain in
                       zip(manifest.layers, config.diff_ids, chains, strict=True))
        return Image(self.name, self.kind, manifest, manifest_digest, config, cfg_desc.digest,
                     layers, cand.names if cand else (),
                     (cand.bare_tags + cand.names) if cand else (), dict(annotations))

    def _docker_image(self, cand: _Candidate) -> Image:
        e = cand.docker_entry
        assert e is not None
        cfg_path = e.get("Config")
        layer_paths = e.get("Layers")
        if not isinstance(cfg_path, str) or not isinstance(layer_paths, list) or not all(
            isinstance(p, str) for p in layer_paths
        ):
            raise ImageError(f"{self.name}: manifest.json entry needs Config and Layers")
        cfg_digest = _digest_from_path(cfg_path)
        cfg_size = self._files.size(cfg_path)
        if cfg_size is None:
            raise BlobNotFoundError(f"{self.name}: config {cfg_path} is missing")
        if cfg_digest is None:
            raise ImageError(f"{self.name}: cannot tell the digest of config {cfg_path!r}")
        cfg_desc = Descriptor(MEDIA_TYPE_DOCKER_CONFIG, cfg_digest, cfg_size)
        f = self._files.open(cfg_path)
        try:
            config_raw = read_verified(f, cfg_digest, cfg_size, f"config {cfg_digest}")
        finally:
            f.close()
        config = ImageConfig.parse(config_raw, f"config {cfg_digest}")
        if len(config.diff_ids) != len(layer_paths):
            raise ImageError(f"config {cfg_digest}: {len(config.diff_ids)} diff_ids for "
                             f"{len(layer_paths)} layers")
        descs = []
        for path, diff_id in zip(layer_paths, config.diff_ids, strict=True):
            descs.append(self._docker_layer_descriptor(path, diff_id))
        manifest = Manifest(MEDIA_TYPE_DOCKER_MANIFEST, cfg_desc, tuple(descs))
        chains = chain_ids(config.diff_ids)
        layers = tuple(Layer(d, diff, c) for d, diff, c in
                       zip(descs, config.diff_ids, chains, strict=True))
        return Image(self.name, self.kind, manifest, None, config, cfg_digest, layers,
                     cand.names, tuple(str(t) for t in (e.get("RepoTags") or [])), {})

    def _docker_layer_descriptor(self, path: str, diff_id: Digest) -> Descriptor:
        """A descriptor for a docker-save layer file, whose digest its path may not name;
        the file becomes an alias of that digest in the content store."""
        size = self._files.size(path)
        if size is None:
            raise BlobNotFoundError(f"{self.name}: layer {path} is missing")
        f = self._files.open(path)
        try:
            head = f.read(4)
        finally:
            f.close()
        kind = sniff(head)
        media_type = {"gzip": MEDIA_TYPE_DOCKER_LAYER_GZIP, "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD,
                      "none": MEDIA_TYPE_DOCKER_LAYER}[kind]
        digest = _digest_from_path(path)
        if digest is None:
            if kind == "none":
                digest = diff_id  # an uncompressed blob's digest is its DiffID (checked on read)
            else:
                f = self._files.open(path)
                try:
                    h = diff_id.hasher()
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                finally:
                    f.close()
                digest = Digest(diff_id.algorithm, h.hexdigest())
        self._layout.alias(digest, path)
        return Descriptor(media_type, digest, size)


def _digest_from_path(path: str) -> Digest | None:
    """`blobs/sha256/<hex>` or `<hex>.json` (legacy docker save) name their digest."""
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        return Digest.parse(f"{parts[1]}:{parts[2]}")
    base = posixpath.basename(path)
    stem = base[:-5] if base.endswith(".json") else base[:-4] if base.endswith(".tar") else None
    if stem is not None and len(stem) == 64 and all(c in "0123456789abcdef" for c in stem):
        return Digest("sha256", stem)
    return None


def _list_labels(cands: list[_Candidate]) -> str:
    return ", ".join(c.label for c in cands)


# --- opening ---

def parse_source(spec: str) -> tuple[str | None, str, str | None]:
    """`oci:DIR[:REF]` -> ("oci", DIR, REF); a plain path -> (None, path, None)."""
    for prefix in TRANSPORTS:
        if spec.startswith(prefix):
            rest = spec[len(prefix):]
            path, sep, ref = rest.partition(":")
            if not path:
                raise ImageError(f"{spec!r}: missing path")
            return prefix[:-1], path, (ref if sep and ref else None)
    return None, spec, None


@contextlib.contextmanager
def open_source(spec: str) -> Iterator[ImageSource]:
    """Open an image source, detecting the format from its content, not its name."""
    transport, path, ref = parse_source(spec)
    with contextlib.ExitStack() as stack:
        if path == "-":
            fobj = stack.enter_context(_spool(sys.stdin.buffer, "stdin"))
            src = _open_file(fobj, "stdin", ref)
        elif os.path.isdir(path):
            src = _open_dir(path, ref)
        elif os.path.exists(path):
            raw = open(path, "rb")  # noqa: SIM115 - ownership passes to the store
            if not raw.seekable():  # a pipe: `unpack <(zcat image.tar.gz)`, a FIFO
                with raw:
                    fobj = stack.enter_context(_spool(raw, path))
                src = _open_file(fobj, path, ref)
            else:
                src = _open_seekable(stack, raw, path, ref)
        else:
            raise ImageError(f"{path}: no such file or directory")
        if transport == "oci" and src.kind != "oci-layout":
            src.close()
            raise ImageError(f"{path}: not an OCI layout directory")
        if transport in ("oci-archive", "docker-archive") and src.kind != transport:
            src.close()
            raise ImageError(f"{path}: not a {transport} tarball (looks like {src.kind})")
        with src:
            yield src


def _open_seekable(stack: contextlib.ExitStack, raw: IO[bytes], path: str,
                   ref: str | None) -> ImageSource:
    head = raw.read(4)
    raw.seek(0)
    if sniff(head) != "none":  # `docker load` takes gzipped archives too
        with raw:
            fobj = stack.enter_context(_spool(raw, path))
    else:
        fobj = raw
    return _open_file(fobj, path, ref)


@contextlib.contextmanager
def _spool(raw: IO[bytes], name: str) -> Iterator[IO[bytes]]:
    """Copy a non-seekable (or compressed) archive into an anonymous temp file."""
    import shutil
    import tempfile

    tmp = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        kind, plain = decompressor(raw)
        try:
            shutil.copyfileobj(plain, tmp, CHUNK)
        except corrupt_types() as exc:  # (IsalError and ZstdError are not OSErrors)
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise ImageError(f"{name}: corrupt {kind} stream: {exc}") from None
        tmp.seek(0)
        yield tmp
    finally:
        tmp.close()


def _open_dir(path: str, ref: str | None) -> ImageSource:
    store = DirFiles(path)
    if store.size("index.json") is not None or store.size("oci-layout") is not None:
        if store.size("manifest.json") is not None:
            return ImageSource(store, "docker-archive", path, ref)
        _check_layout(store, path)
        return ImageSource(store, "oci-layout", path, ref)
    if store.size("manifest.json") is not None:
        return ImageSource(store, "docker-archive", path, ref)
    raise ImageError(f"{path}: not an OCI layout or docker-save directory")


def _check_layout(store: Files, name: str) -> None:
    if store.size("oci-layout") is None:
        raise ImageError(f"{name}: oci-layout file is missing")
    f = store.open("oci-layout")
    try:
        data = f.read(4096)
    finally:
        f.close()
    obj = load_json(data, f"{name}: oci-layout")
    if obj.get("imageLayoutVersion") != "1.0.0":
        raise ImageError(f"{name}: unsupported imageLayoutVersion "
                         f"{obj.get('imageLayoutVersion')!r}")


def _open_file(fobj: IO[bytes], name: str, ref: str | None) -> ImageSource:
    try:
        store = TarFiles(fobj, name)
    except BaseException:
        fobj.close()
        raise
    if store.has("manifest.json"):
        return ImageSource(store, "docker-archive", name, ref)
    if store.has("index.json"):
        try:
            _check_layout(store, name)
        except BaseException:
            store.close()
            raise
        return ImageSource(store, "oci-archive", name, ref)
    try:
        store.check_whole()  # a cut archive says so, not that it is no image
    finally:
        store.close()
    raise ImageError(f"{name}: not an image archive (no index.json or manifest.json)")
