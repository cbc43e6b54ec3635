"""Content stores: blobs by digest, read and written (umoci's `oci/cas`, containerd's `content`).

Read side: `ContentReader` (`blob_size`, `open_blob`). `LayoutBlobs` serves `blobs/<alg>/<hex>`
from an OCI layout kept in a dir (`DirFiles`) or read in place from a tar (`TarFiles`); a
docker-save tarball's legacy paths (`<id>/layer.tar`) are added as aliases of their digests,
so a resolved image never carries a path. The registry client is one more reader.

Write side: `ContentWriter` (`has_blob`, `put_blob`, `blob_writer`). `LayoutWriter` writes an
OCI layout's `blobs/` (temp name, then rename to the digest)."""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Protocol

from ocilayers.errors import BlobNotFoundError, ImageError
from ocilayers.fsutil import atomic_output
from ocilayers.spec import Descriptor, Digest, sha256_digest

if TYPE_CHECKING:
    from tarfile import TarInfo

# An image archive has a few members per layer (at most 125 layers): far more is not an image,
# and tarfile keeps every member's header in memory.
MAX_MEMBERS = 65536
_MAX_NESTING = 8


class Blob(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class ContentReader(Protocol):
    """Blobs by digest, read-only."""

    name: str

    def blob_size(self, digest: Digest) -> int | None: ...

    def open_blob(self, digest: Digest) -> Blob: ...

    def close(self) -> None: ...


class ContentWriter(Protocol):
    """Blobs by digest, written."""

    def has_blob(self, digest: Digest) -> bool: ...

    def put_blob(self, data: bytes) -> Digest: ...

    def blob_writer(self) -> contextlib.AbstractContextManager[BlobWriter]: ...


def blob_path(digest: Digest) -> str:
    """Where a layout keeps a blob (image-spec image-layout.md "Blobs")."""
    return f"blobs/{digest.algorithm}/{digest.hex}"


# --- named files: a layout dir, or a tar read in place ---

class Section:
    """A read-only window [offset, offset+size) of a file descriptor, read with pread."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd = fd
        self._pos = offset
        self._end = offset + size

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._pos
        if n is None or n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        if not data:
            raise ImageError("archive is truncated")
        self._pos += len(data)
        return data

    def close(self) -> None:
        pass


class DirFiles:
    """Files of an unpacked layout directory, confined to it."""

    def __init__(self, root: str) -> None:
        self.name = root
        self.root = os.path.realpath(root)

    def _path(self, rel: str) -> str:
        path = os.path.realpath(os.path.join(self.root, rel))
        if path != self.root and not path.startswith(self.root + os.sep):
            raise ImageError(f"path {rel!r} escapes the image directory")
        return path

    def file_path(self, rel: str) -> str | None:
        """The path of a regular file of the layout (None if it is not one)."""
        path = self._path(rel)
        return path if os.path.isfile(path) else None

    def size(self, rel: str) -> int | None:
        try:
            st = os.stat(self._path(rel))
        except FileNotFoundError:
            return None
        return st.st_size

    def open(self, rel: str) -> IO[bytes]:
        import fcntl
        import stat

        try:
            # Non-blocking: a FIFO (or a device) planted in the layout must not hang the open.
            fd = os.open(self._path(rel), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFoundError(f"{rel}: not found in {self.root}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ImageError(f"{rel}: not a regular file in {self.root}")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        pass


class TarFiles:
    """Members of a tar archive, read in place (no extraction) through their data offsets."""

    def __init__(self, fileobj: IO[bytes], name: str) -> None:
        self.name = name
        self._file = fileobj
        self._fd = fileobj.fileno()
        import tarfile  # only archives need it

        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(fileobj=fileobj, mode="r:") as tf:
                for count, m in enumerate(tf, 1):
                    if count > MAX_MEMBERS:
                        raise ImageError(f"{name}: more than {MAX_MEMBERS} members: not an "
                                         "image archive")
                    key = _norm_member(m.name)
                    if key is not None:
                        self._members[key] = m
                end = tf.offset
        except tarfile.TarError as exc:
            if "unexpected end of data" in str(exc):
                raise ImageError(f"{name}: truncated (the archive ends inside a member)") \
                    from None
            raise ImageError(f"{name}: not a readable tar archive: {exc}") from None
        size = os.fstat(self._fd).st_size
        for m in self._members.values():
            if m.offset_data + (m.size if m.isreg() else 0) > size:
                raise ImageError(f"{name}: truncated: member {m.name!r} needs "
                                 f"{m.offset_data + m.size} bytes, the file has {size}")
        # tarfile takes a file that stops between members for a short archive: only the
        # end-of-archive blocks tell a whole archive from a cut one.
        self.truncated = size < end + 1024

    def check_whole(self) -> None:
        """An error if the archive ended before its end-of-archive blocks."""
        if self.truncated:
            raise ImageError(f"{self.name}: truncated (the archive ends before its "
                             "end-of-archive blocks)")

    def _lookup(self, rel: str) -> TarInfo | None:
        key: str | None = _norm_member(rel)
        for _ in range(_MAX_NESTING):
            if key is None:
                return None
            m = self._members.get(key)
            if m is None or m.isreg():
                return m
            if m.issym():  # docker save links repeated layers: <id>/layer.tar -> ../<id2>/layer.tar
                key = _norm_member(posixpath.join(posixpath.dirname(key), m.linkname))
            elif m.islnk():
                key = _norm_member(m.linkname)
            else:
                return None
        raise ImageError(f"{self.name}: too many levels of links at {rel!r}")

    def has(self, rel: str) -> bool:
        return self._lookup(rel) is not None

    def size(self, rel: str) -> int | None:
        m = self._lookup(rel)
        return None if m is None else m.size

    def open(self, rel: str) -> Section:
        m = self._lookup(rel)
        if m is None:
            raise BlobNotFoundError(f"{rel}: not found in {self.name}")
        return Section(self._fd, m.offset_data, m.size)

    def close(self) -> None:
        self._file.close()


def _norm_member(name: str) -> str | None:
    norm = posixpath.normpath("/" + name).lstrip("/")
    return norm or None


Files = DirFiles | TarFiles


class LayoutBlobs:
    """A ContentReader over a layout's named files: `blobs/<alg>/<hex>`, plus aliases for
    blobs a docker-save tarball keeps elsewhere."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self.name = files.name
        self._aliases: dict[Digest, str] = {}

    def alias(self, digest: Digest, rel: str) -> None:
        """Serve `digest` from the file `rel` (checked against the digest when read)."""
        self._aliases[digest] = rel

    def _rel(self, digest: Digest) -> str:
        return self._aliases.get(digest) or blob_path(digest)

    def blob_size(self, digest: Digest) -> int | None:
        return self.files.size(self._rel(digest))

    def blob_path(self, digest: Digest) -> str | None:
        """The blob as a whole file (a layout dir), for reflinks and hardlinks; else None."""
        if isinstance(self.files, DirFiles):
            return self.files.file_path(self._rel(digest))
        return None

    def open_blob(self, digest: Digest) -> Blob:
        return self.files.open(self._rel(digest))

    def close(self) -> None:
        self.files.close()


# --- writing ---

class BlobWriter:
    """A blob being written under a temp name. Whoever writes it computes its digest on the
    way (the compress-and-hash chain does anyway) and sets `digest` before the block ends;
    the blob is then stored under that name."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.digest: Digest | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


class LayoutWriter:
    """An OCI layout's `blobs/` being written: every blob goes to a temp name first and is
    renamed to its digest when complete, so a failure leaves no blob with a wrong name."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)

    def path(self, digest: Digest) -> str:
        return os.path.join(self.root, blob_path(digest))

    def has_blob(self, digest: Digest) -> bool:
        return os.path.exists(self.path(digest))

    def link_blob(self, source: str, desc: Descriptor) -> bool:
        """Store the file `source` as the blob `desc` without copying its bytes where the
        file system allows: a reflink (FICLONE), else a hardlink. Its size and digest are
        checked first (read from the page cache). False: do a plain copy instead."""
        import fcntl

        from ocilayers.errors import DigestMismatchError
        from ocilayers.streams import CHUNK

        h, n = desc.digest.hasher(), 0
        with open(source, "rb") as f:
            while data := f.read(CHUNK):
                h.update(data)
                n += len(data)
        if n != desc.size or h.hexdigest() != desc.digest.hex:
            raise DigestMismatchError(f"layer {desc.digest}: blob does not match its "
                                      "descriptor")
        dest = self.path(desc.digest)
        tmp = dest + ".link-tmp"
        try:
            with open(source, "rb") as src, open(tmp, "wb") as out:
                fcntl.ioctl(out.fileno(), 0x40049409, src.fileno())  # FICLONE
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
            return True
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        try:
            os.link(source, dest)
            return True
        except OSError:
            return False

    def put_blob(self, data: bytes) -> Digest:
        with self.blob_writer() as w:
            w.write(data)
            w.digest = sha256_digest(data)
        return w.digest

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[BlobWriter]:
        """Write a blob whose digest is known once it is written (see BlobWriter); it is
        stored under that digest when the block ends without an error."""
        w: BlobWriter | None = None

        def final() -> str:
            assert w is not None
            if w.digest is None:
                raise ValueError("blob_writer: the writer did not set the blob's digest")
            os.makedirs(os.path.dirname(self.path(w.digest)), exist_ok=True)
            return self.path(w.digest)

        with atomic_output(final, dir=os.path.join(self.root, "blobs")) as f:
            w = BlobWriter(f)
            yield w
