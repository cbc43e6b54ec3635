"""streams.py: compression sniffing, verified layer reading, and deterministic compression."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import struct
import tarfile
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from ocilayers.errors import DigestMismatchError, ImageError
from ocilayers.spec import Digest
from ocilayers.streams import CHUNK, Compressor, LayerReader, sniff

MiB = 1 << 20


def make_tar(files: dict[str, bytes]) -> bytes:
    """A small real tar (GNU format, fixed metadata) holding `files`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


TAR = make_tar({"hello.txt": b"hello\n", "dir/data.bin": bytes(range(256)) * 40})


def skippable_frame(payload: bytes, magic_nibble: int = 0) -> bytes:
    """A zstd skippable frame (RFC 8878 3.1.2): magic 0x184D2A5?, LE u32 size, payload."""
    return struct.pack("<II", 0x184D2A50 | magic_nibble, len(payload)) + payload


def zstd_frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def sha256(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def read_all(reader: LayerReader, chunk: int = CHUNK) -> bytes:
    """Read like a consumer does (fixed-size chunks), then verify."""
    parts = []
    while data := reader.read(chunk):
        parts.append(data)
    reader.finish()
    return b"".join(parts)


# --- sniff ---

@pytest.mark.parametrize(("head", "want"), [
    pytest.param(gzip_member(b"x")[:4], "gzip", id="gzip"),
    pytest.param(zstd_frame(b"x")[:4], "zstd", id="zstd"),
    pytest.param(skippable_frame(b"meta")[:4], "zstd", id="zstd-skippable-frame-0"),
    pytest.param(skippable_frame(b"meta", 0xF)[:4], "zstd", id="zstd-skippable-frame-f"),
    pytest.param(TAR[:4], "none", id="plain-tar"),
    pytest.param(b"", "none", id="empty"),
    pytest.param(b"\x1f", "none", id="one-byte-of-gzip-magic"),
    pytest.param(b"\x28\xb5\x2f", "none", id="three-bytes-of-zstd-magic"),
])
def test_sniff(head: bytes, want: str) -> None:
    assert sniff(head) == want


# --- LayerReader: every compression, every framing ---

PLAIN_A = make_tar({"a.txt": b"A" * 5000})
PLAIN_B = b"B" * 3000  # arbitrary bytes: framing must not care about content

BLOBS: list[object] = [
    pytest.param(gzip_member(PLAIN_A), PLAIN_A, "gzip", id="gzip"),
    pytest.param(gzip_member(PLAIN_A) + gzip_member(PLAIN_B), PLAIN_A + PLAIN_B, "gzip",
                 id="gzip-multi-member"),
    pytest.param(zstd_frame(PLAIN_A), PLAIN_A, "zstd", id="zstd"),
    pytest.param(zstd_frame(PLAIN_A) + zstd_frame(PLAIN_B), PLAIN_A + PLAIN_B, "zstd",
                 id="zstd-multi-frame"),
    pytest.param(skippable_frame(b"seekable index") + zstd_frame(PLAIN_A) + zstd_frame(PLAIN_B),
                 PLAIN_A + PLAIN_B, "zstd", id="zstd-skippable-first"),
    pytest.param(zstd_frame(PLAIN_A) + skippable_frame(b"x" * 100, 7) + zstd_frame(PLAIN_B),
                 PLAIN_A + PLAIN_B, "zstd", id="zstd-skippable-between"),
    pytest.param(zstd_frame(PLAIN_A) + zstd_frame(PLAIN_B) + skippable_frame(b"tail", 0xF),
                 PLAIN_A + PLAIN_B, "zstd", id="zstd-skippable-last"),
    pytest.param(PLAIN_A, PLAIN_A, "none", id="none"),
]


@pytest.mark.parametrize("readahead", [False, True], ids=["inline", "readahead"])
@pytest.mark.parametrize(("blob", "plain", "kind"), BLOBS)
@pytest.mark.parametrize("chunk", [
    pytest.param(CHUNK, id="1MiB-reads"),
    pytest.param(7, id="7-byte-reads"),
])
def test_layer_reader_decompresses_and_verifies(blob: bytes, plain: bytes, kind: str,
                                                chunk: int, readahead: bool) -> None:
    reader = LayerReader(io.BytesIO(blob), "layer", sha256(blob), len(blob), sha256(plain),
                         readahead=readahead)
    assert read_all(reader, chunk) == plain
    assert reader.compression == kind
    assert reader.diff_id == sha256(plain)


@pytest.mark.parametrize("readahead", [False, True], ids=["inline", "readahead"])
@pytest.mark.parametrize("sizes", [
    pytest.param([512, 7, CHUNK - 519, 1, CHUNK, 3000], id="across-chunk-ends"),
    pytest.param([CHUNK // 3], id="thirds"),
    pytest.param([1, CHUNK + 5, 512], id="big-and-small"),
])
def test_read_view_gives_the_same_bytes_as_read(sizes: list[int], readahead: bool) -> None:
    """read_view and read, mixed as the tar reader mixes them (headers by read, data by
    read_view), give every byte once and in order; inside the chunk at hand the view is a
    read-only view of it, not a copy; the digests still check out."""
    plain = os.urandom(3 * CHUNK + 4321)
    blob = gzip_member(plain)
    reader = LayerReader(io.BytesIO(blob), "layer", sha256(blob), len(blob), sha256(plain),
                         readahead=readahead)
    parts: list[bytes] = []
    views = 0
    i = 0
    while True:
        size = sizes[i % len(sizes)]
        data = reader.read_view(size) if i % 2 else reader.read(size)
        i += 1
        if not data:
            break
        assert 0 < len(data) <= size
        if isinstance(data, memoryview):
            views += 1
            assert data.readonly
        else:
            assert isinstance(data, bytes)
        parts.append(bytes(data))
    reader.finish()
    assert b"".join(parts) == plain
    assert reader.diff_id == sha256(plain)
    if any(s < CHUNK for s in sizes):
        assert views > 0


def test_tar_reader_data_views_fall_back_to_read() -> None:
    """read_data_view on a stream without read_view is read_data; on a LayerReader it gives
    views of the same bytes."""
    from ocilayers.tarstream import TarReader

    data = os.urandom(300_000)
    tar = make_tar({"a": data, "b": b"x" * 10})
    for stream, kind in [(io.BytesIO(tar), bytes),
                         (LayerReader(io.BytesIO(tar), "layer", None, None, None), memoryview)]:
        got = {}
        reader = TarReader(stream)
        for entry in reader:
            chunks = []
            while chunk := reader.read_data_view(100_000):
                assert type(chunk) is kind
                chunks.append(bytes(chunk))
            got[entry.name] = b"".join(chunks)
        assert got == {b"a": data, b"b": b"x" * 10}


@pytest.mark.parametrize("compress", [
    pytest.param(gzip_member, id="gzip"),
    pytest.param(zstd_frame, id="zstd"),
    pytest.param(lambda b: b, id="none"),
])
@pytest.mark.parametrize("readahead", [False, True], ids=["inline", "readahead"])
def test_diff_id_counts_bytes_after_tar_end(compress: Callable[[bytes], bytes],
                                            readahead: bool) -> None:
    # The DiffID is the digest of the whole uncompressed stream, trailing junk included
    # (image-spec layer.md); a tar reader stops at the end marker, finish() must drain the rest.
    trailing = b"\0not part of the tar\n" * 5000  # > tarfile's 10 KiB read-ahead
    plain = TAR + trailing
    blob = compress(plain)
    reader = LayerReader(io.BytesIO(blob), "layer", sha256(blob), len(blob), sha256(plain),
                         readahead=readahead)
    with tarfile.open(fileobj=reader, mode="r|") as tf:
        names = [m.name for m in tf]
    assert names == ["hello.txt", "dir/data.bin"]
    assert reader.finish() == sha256(plain)
    assert sha256(plain) != sha256(TAR)


# --- mismatches ---

GZ = gzip_member(TAR)


@pytest.mark.parametrize(("digest", "size", "diff_id", "expected", "actual"), [
    pytest.param(sha256(b"other"), len(GZ), sha256(TAR),
                 str(sha256(b"other")), str(sha256(GZ)), id="blob-digest"),
    pytest.param(sha256(GZ), len(GZ) + 1, sha256(TAR),
                 str(len(GZ) + 1), str(len(GZ)), id="size-declared-too-big"),
    pytest.param(sha256(GZ), len(GZ) - 1, sha256(TAR),
                 str(len(GZ) - 1), str(len(GZ)), id="size-declared-too-small"),
    pytest.param(sha256(GZ), len(GZ), sha256(b"other"),
                 str(sha256(b"other")), str(sha256(TAR)), id="diff-id"),
])
@pytest.mark.parametrize("readahead", [False, True], ids=["inline", "readahead"])
def test_mismatch_names_expected_and_actual(digest: Digest, size: int, diff_id: Digest,
                                            expected: str, actual: str,
                                            readahead: bool) -> None:
    reader = LayerReader(io.BytesIO(GZ), "layer x", digest, size, diff_id, readahead=readahead)
    with pytest.raises(DigestMismatchError) as info:
        read_all(reader)
    msg = str(info.value)
    assert "layer x" in msg
    assert expected in msg
    # The actual value: exact where it is known; a declared-too-small size is caught while
    # reading, so "at least N" is fine there.
    assert actual in msg or re.search(r"got (at least )?\d+", msg), msg


def _truncate(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def _flip(offset: int) -> Callable[[bytes], bytes]:
    def flip(blob: bytes) -> bytes:
        return blob[:offset] + bytes([blob[offset] ^ 0xFF]) + blob[offset + 1:]
    return flip


BIG = bytes(range(256)) * 400  # 100 KiB, compresses to a few hundred bytes


@pytest.mark.parametrize(("blob", "how"), [
    pytest.param(gzip_member(BIG), "finish", id="gzip-truncated-finish-only"),
    pytest.param(gzip_member(BIG), "read", id="gzip-truncated-read-then-finish"),
    pytest.param(zstd_frame(BIG), "read", id="zstd-truncated"),
])
@pytest.mark.parametrize("readahead", [False, True], ids=["inline", "readahead"])
def test_truncated_stream_is_image_error(blob: bytes, how: str, readahead: bool) -> None:
    # python-zstandard's stream_reader ends quietly at a cut frame, so the DiffID (always
    # known for a real layer) is what catches zstd truncation; gzip notices by itself.
    diff_id = Digest("sha256", hashlib.sha256(BIG).hexdigest())
    reader = LayerReader(io.BytesIO(_truncate(blob)), "layer", None, None, diff_id,
                         readahead=readahead)
    with pytest.raises(ImageError, match="layer"):
        if how == "read":
            read_all(reader)
        else:
            reader.finish()


@pytest.mark.parametrize(("blob", "mutate"), [
    pytest.param(gzip_member(BIG), _flip(12), id="gzip-bad-deflate-block"),
    pytest.param(gzip_member(BIG), _flip(-6), id="gzip-bad-crc"),
    pytest.param(zstd_frame(BIG), _flip(-2), id="zstd-bad-checksum"),
])
@pytest.mark.parametrize("readahead", [False, True], ids=["inline", "readahead"])
def test_corrupt_stream_is_image_error(blob: bytes, mutate: Callable[[bytes], bytes],
                                       readahead: bool) -> None:
    # No expected digests here: the stream's own integrity checks must catch it, and the
    # consumer (which only calls read()) must get an ImageError, not a codec's exception.
    reader = LayerReader(io.BytesIO(mutate(blob)), "layer", None, None, None,
                         readahead=readahead)
    with pytest.raises(ImageError, match="layer"):
        read_all(reader)
    reader.close()


# --- Compressor ---

def _compress(data: bytes, kind: str, out: io.BufferedWriter | io.BytesIO | None = None) -> bytes:
    buf = io.BytesIO() if out is None else out
    with Compressor(buf, kind) as c:
        for i in range(0, len(data), 4096):
            c.write(data[i:i + 4096])
    if out is None:
        assert isinstance(buf, io.BytesIO)
        return buf.getvalue()
    return b""


def test_gzip_header_has_no_mtime_and_no_name(tmp_path: Path) -> None:
    # Write into a *named* file: that is where GzipFile would pick up a FNAME.
    path = tmp_path / "layer.tar.gz"
    with open(path, "wb") as f:
        _compress(TAR, "gzip", f)
    data = path.read_bytes()
    assert data[:3] == b"\x1f\x8b\x08"
    flags = data[3]
    assert flags & 0x08 == 0, "FNAME flag set"  # RFC 1952 2.3.1
    assert flags & 0x10 == 0, "FCOMMENT flag set"
    assert data[4:8] == b"\0\0\0\0", "MTIME not zero"
    assert gzip.decompress(data) == TAR


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_compressor_is_deterministic_and_round_trips(kind: str) -> None:
    first, second = _compress(TAR, kind), _compress(TAR, kind)
    assert first == second
    reader = LayerReader(io.BytesIO(first), "layer", sha256(first), len(first), sha256(TAR))
    assert read_all(reader) == TAR
    assert reader.compression == kind


def test_zstd_round_trip_with_zstandard() -> None:
    blob = _compress(BIG * 10, "zstd")
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as r:
        assert r.read() == BIG * 10


def test_compressor_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="bz2"):
        Compressor(io.BytesIO(), "bz2")


# --- memory stays bounded ---

@pytest.mark.parametrize("readahead", [False, True], ids=["inline", "readahead"])
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_layer_reader_memory_is_independent_of_layer_size(kind: str, readahead: bool) -> None:
    total = 200 * MiB
    zeros = bytes(MiB)
    blob_buf = io.BytesIO()
    plain_hash = hashlib.sha256()
    with Compressor(blob_buf, kind) as c:  # built a chunk at a time: the test holds no 200 MB
        for _ in range(total // MiB):
            c.write(zeros)
            plain_hash.update(zeros)
    blob = blob_buf.getvalue()
    del blob_buf
    assert len(blob) < 2 * MiB
    diff_id = Digest("sha256", plain_hash.hexdigest())

    tracemalloc.start()
    try:
        reader = LayerReader(io.BytesIO(blob), "layer", sha256(blob), len(blob), diff_id,
                             readahead=readahead)
        n = 0
        while data := reader.read(MiB):
            n += len(data)
        del data
        assert reader.finish() == diff_id
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == total
    assert peak < 32 * MiB, f"peak {peak / MiB:.1f} MiB"


# --- readahead: decompression and hashing in a thread ---

def _readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ocilayers-readahead"]


def test_readahead_thread_stops_when_the_reader_closes_early() -> None:
    plain = os.urandom(MiB) * 12  # more chunks than the queue holds: the producer blocks
    blob = gzip_member(plain)
    with LayerReader(io.BytesIO(blob), "layer", sha256(blob), len(blob), sha256(plain),
                     readahead=True) as reader:
        assert reader.read(100) == plain[:100]
        assert len(_readahead_threads()) == 1
    assert _readahead_threads() == []


def test_readahead_reports_progress_in_the_readers_thread() -> None:
    plain = os.urandom(3 * MiB)
    blob = gzip_member(plain)
    seen: list[tuple[int, int]] = []
    reader = LayerReader(io.BytesIO(blob), "layer", sha256(blob), len(blob), sha256(plain),
                         progress=lambda n: seen.append((threading.get_ident(), n)),
                         readahead=True)
    with reader:
        assert read_all(reader) == plain
    assert {ident for ident, _ in seen} == {threading.get_ident()}
    assert sum(n for _, n in seen) == len(blob)
    assert _readahead_threads() == []


@pytest.mark.parametrize("switch_at", [3, None], ids=["switches-at-chunk-3", "never"])
def test_readahead_starts_when_asked(switch_at: int | None) -> None:
    """A callable readahead: the reader decompresses and hashes itself (no thread) until the
    callable says a core is free, then the thread takes over mid-stream. Every byte comes
    once, in order; progress adds up to the blob, told in the reader's thread; the digests
    check out; the callable is asked no more once the thread runs."""
    plain = os.urandom(6 * MiB + 123)
    blob = gzip_member(plain)
    asked = [0]
    threads_seen: list[int] = []

    def spare() -> bool:
        asked[0] += 1
        return switch_at is not None and asked[0] >= switch_at

    seen: list[tuple[int, int]] = []
    reader = LayerReader(io.BytesIO(blob), "layer", sha256(blob), len(blob), sha256(plain),
                         progress=lambda n: seen.append((threading.get_ident(), n)),
                         readahead=spare)
    parts = []
    with reader:
        while data := reader.read(CHUNK):
            parts.append(data)
            threads_seen.append(len(_readahead_threads()))
        reader.finish()
    assert b"".join(parts) == plain
    assert reader.diff_id == sha256(plain)
    assert {ident for ident, _ in seen} == {threading.get_ident()}
    assert sum(n for _, n in seen) == len(blob)
    if switch_at is None:
        assert threads_seen == [0] * len(parts)
        assert asked[0] >= len(parts)
    else:
        assert asked[0] == switch_at
        assert threads_seen[:switch_at - 1] == [0] * (switch_at - 1)
        assert threads_seen[switch_at - 1] == 1
    assert _readahead_threads() == []


def test_readahead_error_reaches_the_reader_and_ends_the_thread() -> None:
    blob = _flip(12)(gzip_member(BIG))
    reader = LayerReader(io.BytesIO(blob), "layer", None, None, None, readahead=True)
    with pytest.raises(ImageError, match="corrupt gzip"):
        read_all(reader)
    assert reader.read(10) == b""  # the stream is over, not hung
    reader.close()
    assert _readahead_threads() == []


def test_layer_blob_with_the_diff_id_from_elsewhere() -> None:
    """A tar hashed by the process that wrote it (a walk's child) is not hashed again: the
    DiffID given is the one returned, asked for only once the tar is read to the end."""
    from ocilayers.spec import Digest
    from ocilayers.streams import LayerBlobWriter, write_layer_blob

    tar = os.urandom(3 << 20)
    src = io.BytesIO(tar)
    asked: list[int] = []

    def known() -> Digest:
        asked.append(src.tell())
        return Digest("sha256", hashlib.sha256(tar).hexdigest())

    given = write_layer_blob(src, io.BytesIO(), "gzip", diff_id=known)
    hashed = write_layer_blob(io.BytesIO(tar), io.BytesIO(), "gzip")
    assert asked == [len(tar)]
    assert given == hashed  # same DiffID, and the same blob
    with pytest.raises(ValueError, match="needs the DiffID"):
        LayerBlobWriter(io.BytesIO(), "none", hash_tar=False).close()
