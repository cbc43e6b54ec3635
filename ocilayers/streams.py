"""Byte streams: compression sniffing, (de)compression, and digest-checking readers and writers."""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from ocilayers.errors import DigestMismatchError, ImageError, OCILayersError
from ocilayers.spec import Digest

CHUNK = 1 << 20  # the unit every stream is read and capped in

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COMPRESSIONS = ("gzip", "zstd", "none")


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def sniff(head: bytes) -> str:
    """Compression of a stream from its first bytes; media types lie (skopeo 1.9 writes raw
    tar blobs labelled +gzip with --dest-oci-accept-uncompressed-layers)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    # A zstd stream may begin with skippable frames (magic 0x184D2A5?, little endian).
    if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return "zstd"
    return "none"


class HashingReader(io.RawIOBase):
    """Reads through `raw`, counting bytes and hashing them on the way."""

    def __init__(self, raw: Readable, algorithm: str = "sha256", limit: int | None = None,
                 what: str = "stream", progress: Callable[[int], None] | None = None) -> None:
        self._raw = raw
        self.progress = progress  # told of every n bytes read
        self.hash: Any = hashlib.new(algorithm)
        self.count = 0
        self._limit = limit
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._raw.read(len(b))
        n = len(data)
        if n:
            self.count += n
            if self._limit is not None and self.count > self._limit:
                raise DigestMismatchError(f"{self._what}: size mismatch: expected "
                                          f"{self._limit} bytes, got at least {self.count}")
            self.hash.update(data)
            b[:n] = data
            if self.progress is not None:
                self.progress(n)
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        data = self._raw.read(size)
        if data:
            self.count += len(data)
            if self._limit is not None and self.count > self._limit:
                raise DigestMismatchError(f"{self._what}: size mismatch: expected "
                                          f"{self._limit} bytes, got at least {self.count}")
            self.hash.update(data)
            if self.progress is not None:
                self.progress(len(data))
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> Digest:
        return Digest(self.hash.name, self.hash.hexdigest())

    def finish(self) -> Digest:
        """Read to the end; the digest of everything read (a layer's DiffID, for a tar)."""
        self.drain()
        return self.digest


def check_digest(what: str, expected: Digest, actual_hex: str) -> None:
    if expected.hex != actual_hex:
        raise DigestMismatchError(
            f"{what}: digest mismatch: expected {expected}, got {expected.algorithm}:{actual_hex}")


def check_size(what: str, expected: int, actual: int) -> None:
    if expected != actual:
        raise DigestMismatchError(
            f"{what}: size mismatch: expected {expected} bytes, got {actual}")


def read_verified(raw: Readable, digest: Digest, size: int, what: str,
                  max_size: int = 64 << 20) -> bytes:
    """Read a small blob (manifest, config) whole, checking size and digest."""
    if size > max_size:
        raise ImageError(f"{what}: {size} bytes is too large for a JSON document")
    reader = HashingReader(raw, digest.algorithm, limit=size, what=what)
    data = reader.read()
    check_size(what, size, len(data))
    check_digest(what, digest, reader.hash.hexdigest())
    return data


class _Prefixed(io.RawIOBase):
    """`head` followed by the rest of `raw`, so sniffed bytes are not lost."""

    def __init__(self, head: bytes, raw: Readable) -> None:
        self._head = head
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._raw.read(len(b))
        b[: len(data)] = data
        return len(data)


def _read_head(raw: Readable, n: int) -> bytes:
    head = b""
    while len(head) < n:
        chunk = raw.read(n - len(head))
        if not chunk:
            break
        head += chunk
    return head


def igzip_lib_error() -> type[Exception]:
    from isal import igzip_lib

    err: Any = igzip_lib.IsalError
    return err  # type: ignore[no-any-return]


def decompressor(raw: Readable) -> tuple[str, Readable]:
    """Sniff `raw` and return (compression, a reader of the decompressed bytes)."""
    head = _read_head(raw, 4)
    kind = sniff(head)
    src = _Prefixed(head, raw)
    if kind == "gzip":
        from isal import igzip  # codecs load on first use: a no-op CLI run starts faster

        gz: Readable = igzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[no-untyped-call]
        return kind, gz
    if kind == "zstd":
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        zs: Readable = dctx.stream_reader(
            src, read_size=CHUNK, read_across_frames=True, closefd=False)  # type: ignore[arg-type]
        return kind, zs
    return kind, src


def corrupt_types() -> tuple[type[BaseException], ...]:
    """What decompressors raise on bad data (BadGzipFile is an OSError, IsalError is not)."""
    import zstandard

    return (EOFError, OSError, zstandard.ZstdError, ValueError, igzip_lib_error())


class _Readahead:
    """Runs a chunk producer (decompression and both hashes: C code that lets go of the GIL)
    in a thread, a few chunks ahead of the consumer, so one layer can use a second core.

    `next()` returns the next chunk, b"" at the end, or raises what the producer raised.
    `progress` is called from the consumer's thread only, with the `count()` delta."""

    _DEPTH = 4  # chunks queued at most: memory stays bounded whatever the layer size

    def __init__(self, produce: Callable[[], Iterator[bytes]],
                 progress: Callable[[int], None] | None, count: Callable[[], int],
                 reported: int = 0) -> None:
        import queue
        import threading

        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(self._DEPTH)
        self._stopping = threading.Event()
        self._done = False
        self._progress = progress
        self._count = count
        self._reported = reported  # (what `progress` was told before the thread started)
        self._thread = threading.Thread(target=self._run, args=(produce,),
                                        name="ocilayers-readahead", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Iterator[bytes]]) -> None:
        item: bytes | BaseException | None = None
        try:
            for chunk in produce():
                if not self._put(chunk):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            item = exc
        self._put(item)

    def _put(self, item: bytes | BaseException | None) -> bool:
        import queue

        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> bytes:
        if self._done:
            return b""
        item = self._queue.get()
        if self._progress is not None:
            count = self._count()
            if count > self._reported:
                self._progress(count - self._reported)
                self._reported = count
        if isinstance(item, bytes):
            return item
        self._done = True
        self._thread.join()
        if item is None:
            return b""
        raise item

    def stop(self) -> None:
        """Make the producer quit (at its next chunk) and wait for it."""
        import queue

        self._stopping.set()
        self._done = True
        with contextlib.suppress(queue.Empty):
            while True:  # frees a producer blocked on a full queue
                self._queue.get_nowait()
        self._thread.join()


class LayerReader(io.RawIOBase):
    """A layer blob, decompressed; checks blob size+digest and DiffID over every byte.

    Call `finish()` after the consumer stops reading: it drains whatever is left (bytes after
    the tar's end marker count towards the DiffID) and raises on any mismatch.
    """

    def __init__(self, blob: Readable, what: str, digest: Digest | None, size: int | None,
                 diff_id: Digest | None, progress: Callable[[int], None] | None = None,
                 readahead: bool | Callable[[], bool] = False) -> None:
        """`readahead`: True, a thread decompresses and hashes ahead of the reader (one
        layer on two cores); a callable, asked at each chunk, starts that thread once it
        says so (a core came free), the reader doing that work itself until then."""
        self.what = what
        self._blob = blob
        self._digest = digest
        self._size = size
        self._diff_id = diff_id
        self._progress = progress
        self.compressed = HashingReader(blob, digest.algorithm if digest else "sha256",
                                        limit=size, what=what,
                                        progress=None if readahead is True else progress)
        self.compression, plain = decompressor(self.compressed)
        self.plain = HashingReader(plain, diff_id.algorithm if diff_id else "sha256",
                                   what=what)
        self.diff_id: Digest | None = None
        # Tar headers are read 512 bytes at a time: serve them from one decompressed chunk
        # instead of a trip through the decompressor and both hashes each.
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0  # len(self._buf)
        self._ahead: _Readahead | None = None
        self._want_ahead = readahead if callable(readahead) else None
        if readahead is True:
            self._start_ahead()

    def _start_ahead(self) -> None:
        """From here on the thread decompresses and hashes; it reports the progress (in the
        reader's thread) from what the compressed side reported so far."""
        self._want_ahead = None
        told = self.compressed.count if self.compressed.progress is not None else 0
        self.compressed.progress = None
        self._ahead = _Readahead(self._read_all, self._progress, lambda: self.compressed.count,
                                 told)

    def _read_all(self) -> Iterator[bytes]:
        """Every decompressed chunk, then the compressed bytes after the stream (readahead)."""
        while chunk := self.plain.read(CHUNK):
            yield chunk
        self.compressed.drain()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is not None and size > 0:
            pos = self._pos
            end = pos + size
            if end < self._end:  # the usual small read, inside the chunk at hand
                self._pos = end
                return self._buf[pos:end]
        return self._read(size)

    def read_view(self, size: int) -> bytes | memoryview:
        """`read(size)` for bytes on their way to a write or a checksum: inside the chunk at
        hand, a view of it instead of a copy."""
        if self._pos >= self._end and 0 < size < CHUNK:
            self._next_buf()
        pos = self._pos
        if pos < self._end:
            end = min(pos + size, self._end)
            self._pos = end
            return self._view[pos:end]
        return self._read(size)

    def _next_buf(self) -> None:
        self._buf, self._pos = self._fill(), 0
        self._end = len(self._buf)
        self._view = memoryview(self._buf)

    def _read(self, size: int) -> bytes:
        if size is None or size < 0:
            parts = [self._buf[self._pos:]]
            self._buf, self._pos, self._end = b"", 0, 0
            while chunk := self._fill():
                parts.append(chunk)
            return b"".join(parts)
        if self._pos >= len(self._buf):
            if size >= CHUNK:
                return self._fill(size)  # big reads go straight through
            self._next_buf()
        start = self._pos
        end = min(start + size, self._end)
        self._pos = end
        if start == 0 and end == len(self._buf):
            return self._buf
        return self._buf[start:end]

    def _fill(self, size: int = CHUNK) -> bytes:
        try:
            if self._ahead is None and self._want_ahead is not None and self._want_ahead():
                self._start_ahead()
            if self._ahead is not None:
                return self._ahead.next()
            return self.plain.read(size)
        except corrupt_types() as exc:
            raise self._corrupt(exc) from None

    def _corrupt(self, exc: BaseException) -> BaseException:
        if isinstance(exc, OCILayersError) or (isinstance(exc, OSError)
                                               and exc.errno is not None):
            return exc  # our own verdict, or a real I/O error: not bad data
        return ImageError(f"{self.what}: corrupt {self.compression} stream: {exc}")

    def close(self) -> None:
        """Stop the readahead thread, if any, and close the blob underneath."""
        if self._ahead is not None:
            self._ahead.stop()
        if not self.closed:
            close = getattr(self._blob, "close", None)
            if close is not None:
                close()
        super().close()

    def finish(self) -> Digest:
        self._buf, self._pos, self._end = b"", 0, 0
        try:
            if self._ahead is not None:
                while self._ahead.next():  # the thread also drains the compressed stream
                    pass
                self._ahead.stop()
            else:
                self.plain.drain()
        except corrupt_types() as exc:
            raise self._corrupt(exc) from None
        self.compressed.drain()  # bytes after the compressed stream still count for the digest
        if self._size is not None:
            check_size(self.what, self._size, self.compressed.count)
        if self._digest is not None:
            check_digest(self.what, self._digest, self.compressed.hash.hexdigest())
        actual = Digest(self.plain.hash.name, self.plain.hash.hexdigest())
        if self._diff_id is not None and actual != self._diff_id:
            raise DigestMismatchError(
                f"{self.what}: diff_id mismatch: expected {self._diff_id}, got {actual}")
        self.diff_id = actual
        return actual


class HashingWriter:
    """Writes through to `out`, counting and hashing (sha256) every byte."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hash.update(data)
        self.count += len(data)
        self._out.write(data)
        return len(data)

    def flush(self) -> None:
        self._out.flush()

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self.hash.hexdigest())


class Compressor:
    """A writable that compresses into `out` (not closing it): gzip, zstd or none.

    Output is deterministic: the gzip header carries no name and mtime 0.
    """

    def __init__(self, out: Any, compression: str, level: int | None = None,
                 threads: int = 0) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}")
        self.compression = compression
        self._out = out
        self._inner: Any
        if compression == "gzip":
            from isal import igzip

            # filename="" keeps the FNAME field out of the header, even for a named `out`.
            self._inner = igzip.GzipFile(  # type: ignore[no-untyped-call]
                filename="", fileobj=out, mode="wb", mtime=0,
                                         compresslevel=2 if level is None else level)
        elif compression == "zstd":
            import zstandard

            cctx = zstandard.ZstdCompressor(level=3 if level is None else level,
                                            threads=threads)
            self._inner = cctx.stream_writer(out, closefd=False)
        else:
            self._inner = out

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._inner.write(data)
        return len(data)

    def close(self) -> None:
        if self.compression == "gzip":
            self._inner.close()
        elif self.compression == "zstd":
            import zstandard

            self._inner.flush(zstandard.FLUSH_FRAME)
            self._inner.close()

    def __enter__(self) -> Compressor:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if t is None:
            self.close()


class IterReader(io.RawIOBase):
    """A readable over an iterator of byte chunks (e.g. a tar rebuilt from tar-split)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._it = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            nxt = next(self._it, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n



@dataclass(frozen=True)
class LayerBlob:
    """What `write_layer_blob` made: the DiffID of the tar, and the blob's digest, size and
    media type (OCI's, for its compression)."""

    diff_id: Digest
    digest: Digest
    size: int
    media_type: str


class LayerBlobWriter:
    """The compress-and-hash chain: uncompressed tar bytes in through `write()`, the
    compressed blob out to `out`; `close()` returns the LayerBlob. `out` is not closed."""

    def __init__(self, out: Any, compression: str, *, threads: int = 0,
                 hash_tar: bool = True) -> None:
        self._blob = HashingWriter(out)
        self._compressor = Compressor(self._blob, compression, threads=threads)
        # (hash_tar=False: the caller has the DiffID from elsewhere and gives it to close())
        self._plain: HashingWriter | None = HashingWriter(self._compressor) if hash_tar else None
        self._in = self._plain if self._plain is not None else self._compressor

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return int(self._in.write(data))

    def close(self, diff_id: Digest | None = None) -> LayerBlob:
        from ocilayers.spec import oci_layer_media_type

        self._compressor.close()
        if self._plain is not None:
            diff_id = self._plain.digest
        if diff_id is None:
            raise ValueError("a LayerBlobWriter that does not hash its tar needs the DiffID")
        return LayerBlob(diff_id, self._blob.digest, self._blob.count,
                         oci_layer_media_type(self._compressor.compression))


def write_layer_blob(tar: Readable, out: Any, compression: str, *,
                     progress: Callable[[int], None] | None = None,
                     threads: int = 0,
                     diff_id: Callable[[], Digest] | None = None) -> LayerBlob:
    """Tar in, blob out: compress the uncompressed layer `tar` into `out`, streaming, and
    return its DiffID, digest, size and media type. `progress(n)` hears of every n tar bytes.
    `diff_id`: called once `tar` is read to the end, the tar's DiffID as the process that
    wrote it computed it (not hashed again here)."""
    w = LayerBlobWriter(out, compression, threads=threads, hash_tar=diff_id is None)
    while data := tar.read(CHUNK):
        w.write(data)
        if progress is not None:
            progress(len(data))
    return w.close(diff_id() if diff_id is not None else None)
