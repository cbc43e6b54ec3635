"""Image writers: OCI layout dir, oci-archive and docker-save tarball, deterministic bytes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ocilayers.errors import DigestMismatchError, ImageError
from ocilayers.spec import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    IMAGE_FORMATS,
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    Digest,
    Manifest,
    dump_json,
    normalize_reference,
    oci_layer_media_type,
    sha256_digest,
    split_reference,
)
from ocilayers.streams import CHUNK, COMPRESSIONS, Compressor, HashingWriter, Readable

FORMATS = IMAGE_FORMATS
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


@dataclass(frozen=True)
class LayerInput:
    """One layer to write: its expected DiffID and a way to open its uncompressed tar."""

    diff_id: Digest
    open: Callable[[], AbstractContextManager[Readable]]


@dataclass(frozen=True)
class WrittenImage:
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]


ProgressFn = Callable[[int, int], None]  # (layer index, bytes just read)


def full_reference(ref: str) -> str:
    """`foo:latest` -> `docker.io/library/foo:latest` (what containerd annotates)."""
    norm = normalize_reference(ref)
    first, _, rest = norm.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        return "docker.io/" + (norm if rest else "library/" + norm)
    return norm


def _tag_of(ref: str) -> str:
    repo, norm = split_reference(ref)
    return norm[len(repo) + 1:] if norm.startswith(repo + ":") else "latest"


class _BlobSink:
    """Where blobs go: an OCI dir, or a temp dir later packed into an archive."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)

    def path(self, digest: Digest) -> str:
        return os.path.join(self.root, "blobs", digest.algorithm, digest.hex)

    def put_bytes(self, data: bytes) -> Digest:
        digest = sha256_digest(data)
        self._commit_tmp(self._write_tmp(data), digest)
        return digest

    def _write_tmp(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "blobs"), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return tmp

    def _commit_tmp(self, tmp: str, digest: Digest) -> None:
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path(digest))

    def put_layer(self, layer: LayerInput, compression: str,
                  progress: Callable[[int], None] | None) -> tuple[Digest, int]:
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, "blobs"), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                blob = HashingWriter(f)
                compressor = Compressor(blob, compression)
                plain = HashingWriter(compressor)
                with layer.open() as src:
                    while data := src.read(CHUNK):
                        plain.write(data)
                        if progress is not None:
                            progress(len(data))
                compressor.close()
            if plain.digest != layer.diff_id:
                raise DigestMismatchError(f"layer {layer.diff_id}: diff_id mismatch: "
                                          f"expected {layer.diff_id}, got {plain.digest}")
            self._commit_tmp(tmp, blob.digest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return blob.digest, blob.count


def write_image(out: str, config_raw: bytes, layers: Sequence[LayerInput], *,
                format: str = "oci-archive", compression: str = "gzip",
                tags: Sequence[str] = (), progress: ProgressFn | None = None) -> WrittenImage:
    """Write an image. For `oci` the target dir must not exist, or be an empty dir.

    Output bytes depend only on the config, the layer contents, the tags and the options.
    Nothing is left behind at `out` on failure.
    """
    if format not in FORMATS:
        raise ImageError(f"unknown output format {format!r} (want one of {', '.join(FORMATS)})")
    if compression not in COMPRESSIONS:
        raise ImageError(f"unknown compression {compression!r}")
    tags = [normalize_reference(t) for t in tags]
    parent = os.path.dirname(os.path.abspath(out))
    if format == "oci" and os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ImageError(f"{out}: exists and is not an empty directory")
    with tempfile.TemporaryDirectory(dir=parent, prefix=".ocilayers-") as stage:
        sink = _BlobSink(stage)
        descs = []
        for i, layer in enumerate(layers):
            cb = (lambda n, i=i: progress(i, n)) if progress else None
            digest, size = sink.put_layer(layer, compression, cb)
            descs.append(Descriptor(oci_layer_media_type(compression), digest, size))
        config = Descriptor(MEDIA_TYPE_OCI_CONFIG, sink.put_bytes(config_raw), len(config_raw))
        manifest = Manifest(MEDIA_TYPE_OCI_MANIFEST, config, tuple(descs))
        manifest_raw = dump_json(manifest.to_json())
        mdesc = Descriptor(MEDIA_TYPE_OCI_MANIFEST, sink.put_bytes(manifest_raw),
                           len(manifest_raw))
        entries = []
        for t in tags or [None]:  # type: ignore[list-item]
            d = mdesc.to_json()
            if t is not None:
                d["annotations"] = {ANNOTATION_CONTAINERD_NAME: full_reference(t),
                                    ANNOTATION_REF_NAME: _tag_of(t)}
            entries.append(d)
        index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries}
        files: dict[str, bytes] = {"oci-layout": OCI_LAYOUT, "index.json": dump_json(index)}
        if format == "docker-archive":
            files["manifest.json"] = dump_json([{
                "Config": f"blobs/sha256/{config.digest.hex}",
                "RepoTags": tags,
                "Layers": [f"blobs/sha256/{d.digest.hex}" for d in descs],
            }])
            repos: dict[str, dict[str, str]] = {}
            for t in tags:
                repo, _ = split_reference(t)
                if descs:
                    repos.setdefault(repo, {})[_tag_of(t)] = descs[-1].digest.hex
            files["repositories"] = dump_json(repos)
        for name, data in files.items():
            with open(os.path.join(stage, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(stage, name), 0o644)
        if format == "oci":
            _install_dir(stage, out)
        else:
            _write_archive(stage, out)
    return WrittenImage(mdesc, config, tuple(descs))


def _install_dir(stage: str, out: str) -> None:
    os.chmod(stage, 0o755)
    for d in ("blobs", "blobs/sha256"):
        os.chmod(os.path.join(stage, d), 0o755)
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked above
    os.rename(stage, out)
    os.mkdir(stage)  # TemporaryDirectory cleans up the name it made


def _walk_sorted(stage: str) -> Iterator[tuple[str, str, bool]]:
    """(archive name, path, is_dir) in sorted order, parents first."""
    for dirpath, dirnames, filenames in os.walk(stage):
        dirnames.sort()
        rel = os.path.relpath(dirpath, stage)
        if rel != ".":
            yield rel, dirpath, True
        for name in sorted(filenames):
            if name.startswith(".tmp-"):
                continue
            yield os.path.normpath(os.path.join(rel, name)), os.path.join(dirpath, name), False


def _write_archive(stage: str, out: str) -> None:
    import tarfile

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".ocilayers-")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                                    format=tarfile.PAX_FORMAT) as tf:
            for name, path, is_dir in sorted(_walk_sorted(stage)):
                info = tarfile.TarInfo(name + ("/" if is_dir else ""))
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if is_dir:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tf.addfile(info)
                else:
                    info.mode = 0o644
                    info.size = os.path.getsize(path)
                    with open(path, "rb") as src:
                        tf.addfile(info, src)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def verified_layer(opener: Callable[[], Any]) -> Iterator[Readable]:
    """Wrap a source's LayerReader so its digests are checked when the writer is done."""
    reader = opener()
    try:
        yield reader
        reader.finish()
    finally:
        with contextlib.suppress(Exception):
            reader.close()

