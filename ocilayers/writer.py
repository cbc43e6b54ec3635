"""Image destinations: an OCI layout dir, an oci-archive or a docker-save tarball, with
deterministic bytes. Blobs are staged in a temp dir beside the output; `commit` records each
image and its tags; when the `open_destination` block ends without an error, `finish` writes the
index (and docker-save's `manifest.json`), then installs the dir or writes the archive, so
nothing is left at the output when anything fails."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from ocilayers.builder import WrittenImage
from ocilayers.cas import LayoutWriter
from ocilayers.errors import ImageError, OCILayersError
from ocilayers.fsutil import atomic_output
from ocilayers.spec import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    DOCKER_TRANSPORT,
    IMAGE_FORMATS,
    MEDIA_TYPE_OCI_INDEX,
    Digest,
    dump_json,
    normalize_reference,
    split_reference,
)

if TYPE_CHECKING:
    from ocilayers.registry import PushStats, RegistryOptions, RemoteRef

FORMATS = IMAGE_FORMATS
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


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


class LayoutDestination:
    """Images written as an OCI layout into a staging dir, then installed at `out` as a dir
    (`oci`) or packed into an archive (`oci-archive`, `docker-archive`) by `finish()`.
    Several images may be committed (an export of a repository with several tags)."""

    def __init__(self, out: str, format: str, stage: str) -> None:
        self.out = out
        self.format = format
        self.stage = stage
        self.blobs = LayoutWriter(stage)
        self.images: list[tuple[WrittenImage, tuple[str, ...]]] = []

    @property
    def oci_config(self) -> bool:
        """OCI outputs hold configs the image-spec's schema accepts; a docker-archive keeps
        Docker's config bytes, as `docker save` (25+) writes them, so `docker load` gives
        back the same image ID."""
        return self.format != "docker-archive"

    def commit(self, image: WrittenImage, tags: Sequence[str]) -> None:
        """One image and its tags (none: an untagged image); written out by `finish()`."""
        self.images.append((image, tuple(normalize_reference(t) for t in tags)))

    def files(self) -> dict[str, bytes]:
        """`oci-layout`, `index.json` and, for docker-archive, `manifest.json` and (with any
        tag) `repositories`, as dockerd's `docker save` writes them: one index entry per tag,
        one untagged entry for an image without tags, `RepoTags: null` for no tag."""
        entries = []
        for image, tags in self.images:
            for t in tags or (None,):
                d = image.manifest.to_json()
                if t is not None:
                    d["annotations"] = {ANNOTATION_CONTAINERD_NAME: full_reference(t),
                                        ANNOTATION_REF_NAME: _tag_of(t)}
                entries.append(d)
        index = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": entries}
        files: dict[str, bytes] = {"oci-layout": OCI_LAYOUT, "index.json": dump_json(index)}
        if self.format == "docker-archive":
            files["manifest.json"] = dump_json([{
                "Config": f"blobs/sha256/{image.config.digest.hex}",
                "RepoTags": list(tags) or None,
                "Layers": [f"blobs/sha256/{d.digest.hex}" for d in image.layers],
            } for image, tags in self.images])
            repos: dict[str, dict[str, str]] = {}
            for image, tags in self.images:
                for t in tags:
                    repo, _ = split_reference(t)
                    if image.layers:
                        repos.setdefault(repo, {})[_tag_of(t)] = image.layers[-1].digest.hex
            if repos:
                files["repositories"] = dump_json(repos)
        return files

    def finish(self) -> None:
        """Write the index (and docker-save's files) and install the output."""
        if not self.images:
            raise ValueError("no image was committed to the destination")
        for name, data in self.files().items():
            with open(os.path.join(self.stage, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(self.stage, name), 0o644)
        if self.format == "oci":
            _install_dir(self.stage, self.out)
        else:
            _write_archive(self.stage, self.out)


def _output_dir(out: str) -> str:
    """The dir `out` goes into, as the user wrote it (`.` for a bare name)."""
    return os.path.dirname(os.path.normpath(out)) or "."


class RegistryDestination:
    """Images pushed to a registry repository: blobs first (HEAD, a cross-repository mount,
    or an upload streamed as it is made), each manifest by its digest as it is committed, and
    the tag last (`finish`)."""

    oci_config = True
    manifest_as_blob = False  # manifests go to /manifests/, not /blobs/

    def __init__(self, ref: RemoteRef, opts: RegistryOptions | None = None,
                 mount_from: Callable[[Digest], Sequence[str]] | None = None,
                 stats: PushStats | None = None) -> None:
        from ocilayers.registry import Registry, RepoWriter
        from ocilayers.remote import current_options

        self.ref = ref
        self.registry = Registry(ref.host, opts or current_options())
        self.blobs = RepoWriter(self.registry, ref.repo, mount_from, stats)
        self.images: list[WrittenImage] = []

    def commit(self, image: WrittenImage, tags: Sequence[str]) -> None:
        if self.images:
            raise ImageError(f"{self.ref}: a registry tag names one image; this output has "
                             "several")
        self.registry.put_manifest(self.ref.repo, str(image.manifest.digest),
                                   image.manifest_raw, image.manifest.media_type)
        self.images.append(image)

    def finish(self) -> None:
        if not self.images:
            raise ValueError("no image was committed to the destination")
        image = self.images[0]
        if self.ref.tag is not None:
            self.registry.put_manifest(self.ref.repo, self.ref.tag, image.manifest_raw,
                                       image.manifest.media_type)
        elif self.ref.digest is not None and self.ref.digest != image.manifest.digest:
            raise ImageError(f"{self.ref}: the manifest pushed is {image.manifest.digest}")


@contextlib.contextmanager
def open_destination(out: str, format: str) -> Iterator[LayoutDestination | RegistryDestination]:
    """A destination at `out`, written when the block ends without an error (`finish`). For
    `oci` the target dir must not exist, or be an empty dir. The staging dir is removed when
    the block ends, whatever happens. Errors name `out`, never a temp file. `docker://...`:
    a registry repository (the format is then the manifests' family's business)."""
    if out.startswith(DOCKER_TRANSPORT):
        from ocilayers.registry import RemoteRef

        reg = RegistryDestination(RemoteRef.parse(out))
        yield reg
        reg.finish()
        return
    if format not in FORMATS:
        raise ImageError(f"unknown output format {format!r} (want one of {', '.join(FORMATS)})")
    parent = os.path.dirname(os.path.abspath(out))
    shown = _output_dir(out)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise OCILayersError(f"{out}: the directory {shown} {what}")
    if format == "oci" and os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ImageError(f"{out}: exists and is not an empty directory")
    if format != "oci" and os.path.isdir(out):
        raise OCILayersError(f"{out}: is a directory (--format {format} writes a file)")
    try:
        staging = tempfile.TemporaryDirectory(dir=parent, prefix=".ocilayers-")
    except OSError as exc:
        raise OCILayersError(f"{out}: cannot write in {shown}: {exc.strerror or exc}") from exc
    with staging as stage:
        dest = LayoutDestination(out, format, stage)
        yield dest
        try:
            dest.finish()
        except OSError as exc:  # (a rename or write in the staging dir: name the output)
            raise OCILayersError(f"{out}: {exc.strerror or exc}") from exc


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

    with atomic_output(out, prefix=".ocilayers-") as f, tarfile.open(
            fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
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
