"""tarstream.py: header numbers, PAX records, every header encoding, errors, the raw round trip."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import tarbuilder as tb

from ocilayers.errors import ImageError, TarError
from ocilayers.tarstream import BLOCK, TarEntry, TarReader, parse_number, parse_pax

NS = 1_000_000_000


def read_all(data: bytes | object) -> list[tuple[TarEntry, bytes]]:
    """Iterate a TarReader over `data` (bytes or a stream), reading each entry's data."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    reader = TarReader(stream)
    out = []
    for e in reader:
        parts = []
        while chunk := reader.read_data(1000):
            parts.append(chunk)
        out.append((e, b"".join(parts)))
    return out


def names(data: bytes) -> list[bytes]:
    return [e.name for e, _ in read_all(data)]


# -- parse_number --

@pytest.mark.parametrize(("field", "value"), [
    pytest.param(b"0000644\0", 0o644, id="octal-nul"),
    pytest.param(b"   644 \0", 0o644, id="octal-spaces"),
    pytest.param(b"0000644 ", 0o644, id="octal-space-terminated"),
    pytest.param(b"00000000000\0", 0, id="zero"),
    pytest.param(b"\0" * 8, 0, id="all-nul"),
    pytest.param(b" " * 8, 0, id="all-space"),
    pytest.param(b"7777777\0", 2**21 - 1, id="octal-max-8"),
    pytest.param(b"77777777777\0", 8**11 - 1, id="octal-max-12"),
    pytest.param(tb.base256(2**21, 8), 2**21, id="base256-uid-2^21"),
    pytest.param(tb.base256(2**32 - 2, 8), 2**32 - 2, id="base256-uid-2^32-2"),
    pytest.param(tb.base256(2**40, 12), 2**40, id="base256-size-2^40"),
    pytest.param(tb.base256(0, 8), 0, id="base256-zero"),
    pytest.param(tb.base256(-1, 8), -1, id="base256-minus-one"),
    pytest.param(tb.base256(-1, 12), -1, id="base256-minus-one-12"),
    pytest.param(tb.base256(-(2**20), 12), -(2**20), id="base256-negative"),
    pytest.param(tb.base256(-86400 * 365, 12), -86400 * 365, id="base256-pre-1970"),
])
def test_parse_number(field: bytes, value: int) -> None:
    assert parse_number(field) == value


@pytest.mark.parametrize("field", [
    pytest.param(b"0000x44\0", id="letter"),
    pytest.param(b"0000899\0", id="not-octal"),
    pytest.param(b"-000644\0", id="minus-sign"),
    pytest.param(b"+000644\0", id="plus-sign"),
    pytest.param(b"0o00644\0", id="python-0o-prefix"),
    pytest.param(b"000_644\0", id="underscore"),
])
def test_parse_number_rejects(field: bytes) -> None:
    with pytest.raises(TarError, match="mode"):
        parse_number(field, "mode")


# -- parse_pax --

@pytest.mark.parametrize(("data", "expected"), [
    pytest.param(tb.pax_record("path", "a/b"), {b"path": b"a/b"}, id="one"),
    pytest.param(tb.pax_record("path", "a") + tb.pax_record("uid", "7"),
                 {b"path": b"a", b"uid": b"7"}, id="two"),
    pytest.param(tb.pax_record("path", "a") + tb.pax_record("path", "b"), {b"path": b"b"},
                 id="later-wins"),
    pytest.param(tb.pax_record("path", b"a\nb=c d"), {b"path": b"a\nb=c d"},
                 id="value-with-newline-equals-space"),
    pytest.param(tb.pax_record("SCHILY.xattr.user.x", b"\x00\xff"),
                 {b"SCHILY.xattr.user.x": b"\x00\xff"}, id="binary-value"),
    pytest.param(tb.pax_record("mtime", "1.5") + b"\0" * 20, {b"mtime": b"1.5"},
                 id="nul-padding"),
    pytest.param(tb.pax_record("x" * 200, "y" * 5000), {b"x" * 200: b"y" * 5000},
                 id="length-crosses-digit-boundary"),
    pytest.param(b"", {}, id="empty"),
])
def test_parse_pax(data: bytes, expected: dict[bytes, bytes]) -> None:
    assert parse_pax(data) == expected


@pytest.mark.parametrize("data", [
    pytest.param(b"abc path=x\n", id="length-not-a-number"),
    pytest.param(b"99 path=x\n", id="length-too-long"),
    pytest.param(b"5 path=x\n", id="length-too-short"),
    pytest.param(b"0 path=x\n", id="length-zero"),
    pytest.param(b"-11 path=x\n", id="length-negative"),
    pytest.param(b"11 path=xy", id="no-newline"),
    pytest.param(b"10 pathxyz\n", id="no-equals"),
    pytest.param(b"11path=xy\n", id="no-space"),
])
def test_parse_pax_rejects(data: bytes) -> None:
    with pytest.raises(TarError, match="PAX"):
        parse_pax(data)


# -- header encodings --

def test_pax_fields_override_header() -> None:
    m = tb.file("short", b"hello", uid=1, gid=2, mtime_ns=1_600_000_000 * NS + 123_456_789,
                xattrs={"security.capability": b"\x01\x00\x00\x02" + b"\0" * 16,
                        "user.k": b"v\xff"},
                pax={"path": "pax/name", "uid": "3000000", "gid": "4000000"})
    [(e, data)] = read_all(tb.build([m], "pax"))
    assert e.name == b"pax/name"
    assert (e.uid, e.gid) == (3_000_000, 4_000_000)
    assert e.mtime_ns == 1_600_000_000_123_456_789
    assert e.xattrs == {"security.capability": b"\x01\x00\x00\x02" + b"\0" * 16,
                        "user.k": b"v\xff"}
    assert data == b"hello"
    assert e.size == 5


@pytest.mark.parametrize(("value", "ns"), [
    pytest.param("1600000000", 1_600_000_000 * NS, id="whole"),
    pytest.param("1600000000.5", 1_600_000_000 * NS + 500_000_000, id="half"),
    pytest.param("1600000000.000000001", 1_600_000_000 * NS + 1, id="one-ns"),
    pytest.param("1600000000.1234567899", 1_600_000_000 * NS + 123_456_789, id="truncated-past-ns"),
    pytest.param("-1.5", -1_500_000_000, id="pre-1970"),
    pytest.param("0", 0, id="epoch"),
])
def test_pax_mtime(value: str, ns: int) -> None:
    [(e, _)] = read_all(tb.build([tb.file("f", pax={"mtime": value})], "pax"))
    assert e.mtime_ns == ns
    assert e.mtime == pytest.approx(ns / NS)


@pytest.mark.parametrize("record", [
    pytest.param({"mtime": "soon"}, id="mtime-word"),
    pytest.param({"mtime": "1.2.3"}, id="mtime-two-dots"),
    pytest.param({"uid": "x"}, id="uid-word"),
    pytest.param({"size": "12k"}, id="size-word"),
    pytest.param({"uid": "-5"}, id="uid-negative"),
    pytest.param({"size": "-1"}, id="size-negative"),
])
def test_pax_bad_numbers(record: dict[str, str]) -> None:
    data = tb.pax_header(record) + tb.entry(tb.header("f")) + tb.END
    with pytest.raises(TarError):
        read_all(data)


def test_pax_global_header_ignored() -> None:
    """Global records (even `path`) do not apply to entries, as with Docker. Like Go's reader
    (and so tar-split) the global header itself comes out as an entry of type 'g', no data."""
    data = tb.build([tb.file("a", b"1"), tb.file("b", b"2")], "pax",
                    global_pax={"path": "evil", "uid": "99", "comment": "hi"})
    assert data[156:157] == b"g"
    got = read_all(data)
    assert (got[0][0].type, got[0][1]) == (b"g", b"")
    assert [(e.name, e.uid, d) for e, d in got[1:]] == [(b"a", 0, b"1"), (b"b", 0, b"2")]


def test_raw_global_header_between_entries() -> None:
    data = (tb.entry(tb.header("a", size=1), b"1") + tb.pax_header({"path": "x"}, type_=b"g")
            + tb.entry(tb.header("b")) + tb.END)
    assert [n for n in names(data) if not n.endswith(b"PaxHeader")] == [b"a", b"b"]


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_long_names_and_link_names(fmt: str) -> None:
    long_name = "d/" + "n" * 150 + "/" + "f" * 120
    long_link = "/" + "t" * 300
    data = tb.build([tb.file(long_name, b"x"), tb.symlink("s" * 101, long_link),
                     tb.hardlink("h", long_name)], fmt)
    if fmt == "gnu":
        assert data[156:157] == b"L"
    got = read_all(data)
    assert [(e.name, e.linkname) for e, _ in got] == [
        (long_name.encode(), b""),
        (b"s" * 101, long_link.encode()),
        (b"h", long_name.encode()),
    ]


def test_raw_gnu_long_name_and_link() -> None:
    data = (tb.gnu_long(b"L", "L" * 200) + tb.gnu_long(b"K", "K" * 300)
            + tb.entry(tb.header("short", b"2", linkname="short")) + tb.END)
    [(e, _)] = read_all(data)
    assert (e.name, e.linkname, e.type) == (b"L" * 200, b"K" * 300, b"2")


def test_ustar_prefix_field() -> None:
    name = "p" * 120 + "/" + "n" * 90
    data = tb.build([tb.file(name, b"data")], "ustar")
    assert data[345:350] == b"ppppp"
    [(e, d)] = read_all(data)
    assert (e.name, d) == (name.encode(), b"data")


def test_prefix_ignored_without_ustar_magic() -> None:
    """Old (v7/GNU) headers have no prefix field: bytes there must not become part of the name."""
    data = tb.entry(tb.header("name", prefix="junk", magic=b"ustar  \0")) + tb.END
    assert names(data) == [b"name"]


def test_raw_prefix_field() -> None:
    data = tb.entry(tb.header("file", prefix="a/b")) + tb.END
    assert names(data) == [b"a/b/file"]


@pytest.mark.parametrize(("fmt", "uid", "gid"), [
    pytest.param("gnu", 2**21, 2**21 + 1, id="gnu-base256-2^21"),
    pytest.param("gnu", 2**32 - 2, 2**31, id="gnu-base256-2^32-2"),
    pytest.param("pax", 2**21, 2**31, id="pax-records"),
])
def test_big_ids(fmt: str, uid: int, gid: int) -> None:
    data = tb.build([tb.file("f", uid=uid, gid=gid)], fmt)
    if fmt == "gnu":
        assert data[108] == 0x80
    [(e, _)] = read_all(data)
    assert (e.uid, e.gid) == (uid, gid)


def test_raw_base256_fields() -> None:
    hdr = tb.header("big", size=0, fields={108: tb.base256(3_000_000_000, 8),
                                           116: tb.base256(7, 8), 136: tb.base256(-2, 12)})
    [(e, _)] = read_all(tb.entry(hdr) + tb.END)
    assert (e.uid, e.gid, e.mtime_ns) == (3_000_000_000, 7, -2 * NS)


def test_base256_size() -> None:
    """A base-256 size field (used for >8 GiB files) is honoured for the data length."""
    hdr = tb.header("f", fields={124: tb.base256(3, 12)})
    data = tb.entry(hdr, b"abc") + tb.entry(tb.header("g")) + tb.END
    assert [(e.name, d) for e, d in read_all(data)] == [(b"f", b"abc"), (b"g", b"")]


def test_mode_type_bits_dropped() -> None:
    """Go's archive/tar (Docker) writes 0100644 / 040755: only the permission bits are kept."""
    data = (tb.entry(tb.header("f", mode=0o104755)) + tb.entry(tb.header("d", b"5", mode=0o41777))
            + tb.END)
    assert [e.mode for e, _ in read_all(data)] == [0o4755, 0o1777]


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_non_utf8_names_kept_as_bytes(fmt: str) -> None:
    name = b"caf\xe9/\xff\xfe-x"
    data = tb.build([tb.file(name, b"1"), tb.symlink(b"l\x80", b"t\xe9")], fmt)
    got = read_all(data)
    assert [(e.name, e.linkname) for e, _ in got] == [(name, b""), (b"l\x80", b"t\xe9")]
    assert got[0][0].display_name == "caf\\xe9/\\xff\\xfe-x"


def test_all_entry_types() -> None:
    data = tb.build([tb.file("f", b"x"), tb.dir("d"), tb.symlink("s", "f"), tb.hardlink("h", "f"),
                     tb.chardev("c", 1, 3), tb.blockdev("b", 8, 1), tb.fifo("p")], "pax")
    got = [e for e, _ in read_all(data)]
    assert [(e.type, e.type_name) for e in got] == [
        (b"0", "file"), (b"5", "directory"), (b"2", "symlink"), (b"1", "hardlink"),
        (b"3", "char device"), (b"4", "block device"), (b"6", "fifo")]
    assert (got[4].devmajor, got[4].devminor) == (1, 3)
    assert (got[5].devmajor, got[5].devminor) == (8, 1)
    assert got[0].is_file and got[1].is_dir and not got[2].is_file


def test_header_only_types_have_no_data() -> None:
    """A hardlink/symlink/dir header with a non-zero size field carries no data (Go, tarfile)."""
    data = (tb.entry(tb.header("f", size=3), b"abc")
            + tb.header("h", b"1", size=3, linkname="f")
            + tb.header("d", b"5", size=1024)
            + tb.entry(tb.header("g", size=2), b"zz") + tb.END)
    assert [(e.name, d) for e, d in read_all(data)] == [
        (b"f", b"abc"), (b"h", b""), (b"d", b""), (b"g", b"zz")]


def test_legacy_regular_type_and_contiguous() -> None:
    data = tb.entry(tb.header("a", b"\0", size=1), b"1") + tb.entry(tb.header("c", b"7", size=1),
                                                                     b"2") + tb.END
    got = read_all(data)
    assert [(e.is_file, d) for e, d in got] == [(True, b"1"), (True, b"2")]


def test_unread_data_is_skipped() -> None:
    data = tb.build([tb.file("a", b"x" * 5000), tb.file("b", b"y")], "gnu")
    assert [e.name for e in TarReader(io.BytesIO(data))] == [b"a", b"b"]


def test_gnu_volume_header_skipped() -> None:
    data = tb.entry(tb.header("vol", b"V")) + tb.entry(tb.header("a")) + tb.END
    assert names(data) == [b"a"]


def test_short_reads() -> None:
    """A stream that returns a few bytes per read is parsed the same."""
    data = tb.build([tb.file("a", b"x" * 3000), tb.file("b" * 150, b"y"), tb.dir("d")], "pax")
    got = read_all(tb.Trickle(data))
    assert [(e.name, d) for e, d in got] == [(b"a", b"x" * 3000), (b"b" * 150, b"y"), (b"d/", b"")]


# -- errors --

def test_checksum_error() -> None:
    data = tb.entry(tb.header("a", good_checksum=False)) + tb.END
    with pytest.raises(TarError, match="checksum"):
        read_all(data)


def test_flipped_byte_fails_checksum() -> None:
    data = bytearray(tb.build([tb.file("abc", b"x")], "gnu"))
    data[0] ^= 1
    with pytest.raises(TarError, match="checksum"):
        read_all(bytes(data))


def test_signed_checksum_accepted() -> None:
    """Some old tars summed the header as signed chars; both sums are valid (POSIX, GNU)."""
    block = bytearray(tb.header(b"\xe9\xe9"))
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 32
    block[148:156] = f"{signed:06o}".encode() + b"\0 "
    assert names(bytes(block) + tb.END) == [b"\xe9\xe9"]


def test_not_a_tar() -> None:
    with pytest.raises(TarError) as info:
        read_all(b"hello world, not a tar archive" * 40)
    assert isinstance(info.value, ImageError)


@pytest.mark.parametrize(("make", "what"), [
    pytest.param(lambda d: d[:300], "header", id="header-cut"),
    pytest.param(lambda d: d[:512 + 100], "entry data", id="data-cut"),
    pytest.param(lambda d: d[:512 + 1024 + 10], "header", id="second-header-cut"),
])
def test_truncated(make: Callable[[bytes], bytes], what: str) -> None:
    data = tb.build([tb.file("a", b"x" * 1000), tb.file("b", b"y")], "gnu")
    with pytest.raises(TarError, match=rf"truncated.*{what}"):
        read_all(make(data))


@pytest.mark.parametrize("keep", [
    pytest.param(0, id="no-padding"),
    pytest.param(10, id="partial-padding"),
])
def test_missing_final_padding_accepted(keep: int) -> None:
    """umoci 0.4.7 `insert` ends a layer right after the last entry's data: a clean end."""
    full = tb.build([tb.file("a", b"x"), tb.file("b", b"y" * 1000)], "gnu", end=False)
    data = full[:512 * 3 + 1000 + keep]
    pieces: list[bytes] = []
    reader = TarReader(io.BytesIO(data), pieces.append)
    got = []
    for e in reader:
        body = reader.read_data()
        pieces.append(body)
        got.append((e.name, body))
    assert got == [(b"a", b"x"), (b"b", b"y" * 1000)]
    assert b"".join(pieces) == data


def test_truncated_data_when_skipped() -> None:
    data = tb.build([tb.file("a", b"x" * 5000)], "gnu")[:2000]
    with pytest.raises(TarError, match="truncated"):
        list(TarReader(io.BytesIO(data)))


@pytest.mark.parametrize("tail", [
    pytest.param(b"", id="then-eof"),
    pytest.param(tb.END, id="then-end-blocks"),
])
def test_extension_header_without_entry(tail: bytes) -> None:
    data = tb.entry(tb.header("a")) + tb.pax_header({"path": "b"}) + tail
    with pytest.raises(TarError, match="extension header without entry"):
        read_all(data)


def test_gnu_long_name_without_entry() -> None:
    with pytest.raises(TarError, match="truncated"):
        read_all(tb.gnu_long(b"L", "x" * 200))


def test_pax_payload_cut() -> None:
    data = tb.pax_header({"path": "p" * 600})[:700]
    with pytest.raises(TarError, match=r"truncated.*PAX"):
        read_all(data)


def test_huge_extension_header_refused_without_reading_it() -> None:
    """A PAX header claiming 1 GiB must fail fast, not buffer the payload."""
    stream = tb.LazyStream([tb.header("PaxHeader", b"x", size=1 << 30)] + [b"\0" * 4096] * 10)
    with pytest.raises(TarError, match="too large"):
        read_all(stream)
    assert stream.consumed <= 4096 + 512


def test_empty_name_refused() -> None:
    with pytest.raises(TarError, match="empty name"):
        read_all(tb.entry(tb.header("")) + tb.END)


@pytest.mark.parametrize("data", [
    pytest.param(tb.entry(tb.header("sparse", b"S", size=10), b"0" * 10) + tb.END, id="gnu-S"),
    pytest.param(tb.build([tb.file("f", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                             "GNU.sparse.name": "f"})], "pax"),
                 id="pax-sparse-1.0"),
    pytest.param(tb.build([tb.file("f", pax={"GNU.sparse.size": "100",
                                             "GNU.sparse.numblocks": "0"})], "pax"),
                 id="pax-sparse-0.0"),
    pytest.param(tb.entry(tb.header("mv", b"M")) + tb.END, id="multi-volume"),
])
def test_sparse_refused(data: bytes) -> None:
    with pytest.raises(TarError, match="sparse"):
        read_all(data)


def test_real_gnu_sparse_file_refused(tmp_path: Path) -> None:
    """A sparse file as GNU tar archives it (`--sparse`) is refused with the same error."""
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar is not installed")
    d = tmp_path
    with open(d / "holes", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    out = subprocess.run([tar, "--sparse", "--format=gnu", "-C", str(d), "-cf", "-", "holes"],
                         capture_output=True, check=True).stdout
    with pytest.raises(TarError, match="sparse"):
        read_all(out)


# -- end of archive --

def test_clean_eof_without_end_blocks() -> None:
    data = tb.build([tb.file("a", b"1"), tb.dir("d")], "pax", end=False)
    reader = TarReader(io.BytesIO(data))
    assert [e.name for e in reader] == [b"a", b"d/"]
    assert reader.ended_cleanly is False


def test_empty_stream_is_an_empty_archive() -> None:
    reader = TarReader(io.BytesIO(b""))
    assert list(reader) == []
    assert reader.ended_cleanly is False


def test_end_blocks_seen() -> None:
    reader = TarReader(io.BytesIO(tb.END))
    assert list(reader) == []
    assert reader.ended_cleanly is True


def test_single_zero_block_then_eof() -> None:
    reader = TarReader(io.BytesIO(tb.build([tb.file("a")], end=False) + b"\0" * 512))
    assert [e.name for e in reader] == [b"a"]


@pytest.mark.parametrize("trailer", [
    pytest.param(b"\0" * 8192, id="tarfile-record-padding"),
    pytest.param(b"GARBAGE" * 100, id="garbage"),
    pytest.param(tb.build([tb.file("hidden", b"h")]), id="second-archive"),
])
def test_stops_at_end_marker(trailer: bytes) -> None:
    archive = tb.build([tb.file("a", b"1")])
    stream = io.BytesIO(archive + trailer)
    assert [e.name for e in TarReader(stream)] == [b"a"]
    assert stream.tell() == len(archive)


# -- the raw round trip (tar-split) --

def _tarfile_default(members: list[tb.Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            tf.addfile(tb.tarinfo(m, "gnu"), io.BytesIO(m.data) if m.data else None)
    return buf.getvalue()


MIXED = [tb.dir("d", mtime_ns=5 * NS), tb.file("d/f", b"x" * 700), tb.file("e", b""),
         tb.symlink("s", "d/f"), tb.hardlink("h", "d/f"), tb.chardev("c", 1, 3),
         tb.file("n" * 130, b"long"), tb.whiteout("gone"), tb.opaque("d"),
         tb.file(b"\xff", b"\x00" * 512)]
PAX_ONLY = [tb.file("x", b"1", xattrs={"user.a": b"b"}, mtime_ns=NS + 1), tb.dir("y" * 200)]


@pytest.mark.parametrize(("archive", "consumed"), [
    pytest.param(tb.build(MIXED, "gnu"), None, id="gnu"),
    pytest.param(tb.build(MIXED + PAX_ONLY, "pax"), None, id="pax"),
    pytest.param(tb.build([m for m in MIXED if len(m.name) < 100], "ustar"), None, id="ustar"),
    pytest.param(tb.build(MIXED, "pax", global_pax={"comment": "g"}), None, id="pax-global"),
    pytest.param(tb.build(MIXED, "gnu", end=False), None, id="no-end-blocks"),
    pytest.param(tb.build(MIXED, "gnu") + b"TRAILING" * 64, len(tb.build(MIXED, "gnu")),
                 id="trailing-bytes"),
    pytest.param(_tarfile_default(MIXED), len(tb.build(MIXED, "gnu")), id="tarfile-10240-pad"),
    pytest.param(tb.entry(tb.header("vol", b"V")) + tb.build(MIXED, "gnu"), None,
                 id="volume-header"),
])
def test_raw_round_trip(archive: bytes, consumed: int | None) -> None:
    """on_raw bytes and entry data, in order, are exactly the archive up to its end marker."""
    consumed = len(archive) if consumed is None else consumed
    pieces: list[bytes] = []
    stream = io.BytesIO(archive)
    reader = TarReader(stream, pieces.append)
    raws = []
    for e in reader:
        raws.append((e.type, e.raw))
        while chunk := reader.read_data(333):
            pieces.append(chunk)
    assert b"".join(pieces) == archive[:consumed]
    assert stream.tell() == consumed
    # A global header's raw ends with its unpadded payload, as Go's reader (and tar-split)
    # splits it: the padding is read with the next header.
    assert all(r and (len(r) % 512 == 0 or t == b"g") for t, r in raws)


def test_entry_raw_holds_extension_headers() -> None:
    archive = tb.build([tb.file("p" * 120, b"z", xattrs={"user.q": b"1"})], "pax")
    [e] = list(TarReader(io.BytesIO(archive)))
    assert archive.startswith(e.raw)
    assert e.raw[156:157] == b"x"
    assert len(e.raw) == 3 * 512  # PAX header, its payload, the entry header
    assert e.pax[b"path"] == b"p" * 120


def _reformat_numbers(archive: bytes) -> bytes:
    """The same archive with every header's numbers written the old way (space-padded octal,
    space-terminated), so the reader has to take its general path."""
    out = bytearray(archive)
    pos = 0
    while pos + BLOCK <= len(out) and any(out[pos:pos + BLOCK]):
        block = out[pos:pos + BLOCK]
        size = int(bytes(block[124:135]), 8)
        for start, width in ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12)):
            value = int(bytes(block[start:start + width - 1]), 8)
            block[start:start + width] = f"{value:o}".rjust(width - 1).encode() + b" "
        block[148:156] = b" " * 8
        block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
        out[pos:pos + BLOCK] = block
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    return bytes(out)


def test_canonical_fast_path_equals_general_path() -> None:
    members = [tb.file("a/b.txt", b"x" * 700, mode=0o4755, uid=1234, gid=99, mtime=1_700_000_123),
               tb.dir("a/d", mode=0o1777, uid=7, gid=8), tb.symlink("a/s", "b.txt"),
               tb.hardlink("a/h", "a/b.txt"), tb.file("e", b"", mode=0o600)]
    archive = tb.build(members, fmt="ustar")
    slow = _reformat_numbers(archive)
    assert slow != archive
    fast_entries = list(TarReader(io.BytesIO(archive)))
    slow_entries = list(TarReader(io.BytesIO(slow)))
    assert len(fast_entries) == len(members)
    for f, s in zip(fast_entries, slow_entries, strict=True):
        assert dataclasses.replace(f, raw=b"") == dataclasses.replace(s, raw=b"")


# --- fields no file system can hold: refused while parsing, never an OverflowError or
# ValueError from os.* later (found by fuzzing) ---

@pytest.mark.parametrize("records", [
    {"path": b"a\0b"},
    {"linkpath": b"t\0x"},
    {"SCHILY.xattr.user.a\0b": b"v"},
], ids=["path", "linkpath", "xattr-name"])
def test_nul_byte_in_pax_name_refused(records: dict[str, bytes]) -> None:
    data = tb.pax_header(records) + tb.entry(tb.header("x")) + tb.END
    with pytest.raises(TarError, match="NUL byte"):
        read_all(data)


def test_nul_byte_in_xattr_value_kept() -> None:
    """Values are binary: only names can't hold a NUL."""
    data = tb.pax_header({"SCHILY.xattr.user.a": b"v\0w"}) + tb.entry(tb.header("x")) + tb.END
    [(e, _)] = read_all(data)
    assert e.xattrs == {"user.a": b"v\0w"}


@pytest.mark.parametrize("pax,fields", [
    ({"uid": "4294967296"}, {}),
    ({"gid": "99999999999999999999"}, {}),
    ({"uid": "4294967295"}, {}),  # (uid_t)-1: chown would leave the owner as it is
    ({}, {108: tb.base256(-2, 8)}),
    ({}, {116: tb.base256(1 << 40, 8)}),
], ids=["pax-uid-2^32", "pax-gid-huge", "pax-uid-minus-1", "b256-uid-negative", "b256-gid-2^40"])
def test_owner_out_of_range_refused(pax: dict[str, str], fields: dict[int, bytes]) -> None:
    data = ((tb.pax_header(pax) if pax else b"") + tb.entry(tb.header("x", fields=fields))
            + tb.END)
    with pytest.raises(TarError, match=r"owner .* out of range"):
        read_all(data)


def test_largest_owner_kept() -> None:
    data = tb.pax_header({"uid": "4294967294", "gid": "0"}) + tb.entry(tb.header("x")) + tb.END
    [(e, _)] = read_all(data)
    assert (e.uid, e.gid) == (4294967294, 0)


@pytest.mark.parametrize("pax,fields", [
    ({"mtime": "9" * 30}, {}),
    ({"mtime": "-9223372037"}, {}),
    ({}, {136: tb.base256(1 << 80, 12)}),
    ({}, {136: tb.base256(-(1 << 80), 12)}),
], ids=["pax-huge", "pax-before-1678", "b256-huge", "b256-negative-huge"])
def test_mtime_out_of_range_refused(pax: dict[str, str], fields: dict[int, bytes]) -> None:
    data = ((tb.pax_header(pax) if pax else b"") + tb.entry(tb.header("x", fields=fields))
            + tb.END)
    with pytest.raises(TarError, match="mtime is out of range"):
        read_all(data)


def test_far_mtimes_in_range_kept() -> None:
    data = (tb.pax_header({"mtime": "9223372036.854775807"}) + tb.entry(tb.header("a"))
            + tb.pax_header({"mtime": "-9223372036.854775808"}) + tb.entry(tb.header("b"))
            + tb.END)
    assert [e.mtime_ns for e, _ in read_all(data)] == [(1 << 63) - 1, -(1 << 63)]


@pytest.mark.parametrize("field,value", [(329, 1 << 40), (329, -5), (337, 1 << 32)],
                         ids=["major-2^40", "major-negative", "minor-2^32"])
def test_device_number_out_of_range_refused(field: int, value: int) -> None:
    hdr = tb.header("c", b"3", fields={field: tb.base256(value, 8)})
    with pytest.raises(TarError, match=r"device number .* out of range"):
        read_all(tb.entry(hdr) + tb.END)


def test_chain_of_extension_headers_capped() -> None:
    """Each PAX header below the cap, but a chain of them before one entry: refused once they
    add up to 16 MiB, not held in memory without end."""
    one = tb.pax_header({"comment": "c" * ((1 << 20) - 40)})
    stream = tb.LazyStream([one] * 100 + [tb.entry(tb.header("f")), tb.END])
    with pytest.raises(TarError, match="extension headers too large"):
        read_all(stream)
    assert stream.consumed <= (17 << 20)


def test_chain_of_empty_extension_headers_capped() -> None:
    """Empty PAX headers are 512 bytes each: they count too."""
    stream = tb.LazyStream([tb.pax_header(b"")] * 40000 + [tb.entry(tb.header("f")), tb.END])
    with pytest.raises(TarError, match="extension headers too large"):
        read_all(stream)


# -- writing: the one-format header block against the field-by-field one --

def _reference_block(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                     typeflag: bytes, linkname: bytes, devmajor: int, devminor: int) -> bytes:
    """A USTAR block as Go's archive/tar formats it, field by field (values that do not fit
    are written as 0: they travel in PAX records)."""
    def octal(width: int, value: int) -> bytes:
        if not 0 <= value < 1 << (3 * (width - 1)):
            value = 0
        return b"%0*o\0" % (width - 1, value)

    def string(width: int, s: bytes) -> bytes:
        return s[:width].ljust(width, b"\0")

    b = bytearray(BLOCK)
    b[0:100] = string(100, name)
    b[100:108], b[108:116], b[116:124] = octal(8, mode), octal(8, uid), octal(8, gid)
    b[124:136], b[136:148] = octal(12, size), octal(12, mtime)
    b[156:157] = typeflag
    b[157:257] = string(100, linkname)
    b[257:265] = b"ustar\x0000"
    b[329:337], b[337:345] = octal(8, devmajor), octal(8, devminor)
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def test_header_block_matches_field_by_field() -> None:
    import random

    from ocilayers.tarstream import _block

    r = random.Random(7)
    for _ in range(20000):
        name = bytes(r.choice(b"ab/.\xff\x7f") for _ in range(r.choice([0, 1, 9, 99, 100])))
        link = bytes(r.choice(b"xy/\xe9") for _ in range(r.choice([0, 3, 100])))
        big = r.choice([0, 1, 0o7777777, 0o10000000, r.randrange(1 << 24)])
        args = (name, r.choice([0o644, 0o104755, big]), r.choice([0, 1000, big]),
                r.choice([0, 65534, big]), r.choice([0, 1, 0o77777777777, r.randrange(1 << 36)]),
                r.choice([0, 1_700_000_000, 0o77777777777]), r.choice([b"0", b"5", b"2", b"x"]),
                link, r.choice([0, 259, big]), r.choice([0, 5, big]))
        assert _block(*args) == _reference_block(*args), args


def test_encoded_header_reads_back() -> None:
    from ocilayers.tarstream import encode_header

    e = TarEntry(name=b"usr/bin/tool", type=b"0", mode=0o4755, uid=1000, gid=50, size=1234,
                 mtime_ns=1_700_000_000_900_000_000)
    block = encode_header(e, type_bits=0o100000)
    assert block == _reference_block(b"usr/bin/tool", 0o104755, 1000, 50, 1234, 1_700_000_000,
                                     b"0", b"", 0, 0)
    info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    assert (info.name, info.mode, info.uid, info.gid, info.size, info.mtime) == (
        "usr/bin/tool", 0o104755, 1000, 50, 1234, 1_700_000_000)  # (Docker's type bits)
