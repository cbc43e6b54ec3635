"""tarsplit.py: CRC-64/GO-ISO, the record format (vbatts/tar-split `storage`), reading records
back, rebuilding a tar from records + a diff dir, and round trips against the real `tar-split`.

The CRC is checked against a bitwise implementation written here from the Go source
(hash/crc64: reflected ISO polynomial, init and xorout all ones), not against the product's.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import random
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
from conftest import requires_tool

from ocilayers.errors import ChangedError, StoreError
from ocilayers.extract import apply_layer
from ocilayers.tarsplit import (
    Record,
    TarSplitWriter,
    assemble,
    crc64,
    open_records,
    read_records,
)
from ocilayers.tarstream import TarEntry

# -- an independent CRC-64/GO-ISO (Go: crc64.MakeTable(crc64.ISO), crc64.Checksum) --

_ISO_REFLECTED = 0xD800000000000000


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ _ISO_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _make_table()


def go_crc64(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFFFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def crc_payload(data: bytes) -> str:
    return base64.b64encode(go_crc64(data).to_bytes(8, "big")).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ============================================================================================
# CRC
# ============================================================================================

def test_crc64_check_value() -> None:
    assert go_crc64(b"123456789") == 0xB90956C775A41001  # the reference, to trust it below
    assert crc64(b"123456789") == 0xB90956C775A41001


@pytest.mark.parametrize("data", [b"", b"\0", b"a", bytes(range(256)) * 40,
                                  random.Random(1).randbytes(100_003)],
                         ids=["empty", "zero", "a", "all-bytes", "random"])
def test_crc64_matches_reference_and_continues(data: bytes) -> None:
    assert crc64(data) == go_crc64(data)
    for cut in (0, 1, len(data) // 3, len(data)):
        assert crc64(data[cut:], crc64(data[:cut])) == go_crc64(data)
    assert crc64(memoryview(data)) == go_crc64(data)


# ============================================================================================
# Records written by TarSplitWriter
# ============================================================================================

def writer_lines(feed: list[tuple[str, object]]) -> list[str]:
    """Drive a TarSplitWriter by hand: ("raw", bytes) / ("entry", TarEntry) / ("data", bytes)
    / ("end", None) / ("trailing", bytes); returns the output lines (close() included)."""
    out = io.BytesIO()
    w = TarSplitWriter(out)
    sink = None
    for kind, value in feed:
        if kind == "raw":
            w.on_raw(value)  # type: ignore[arg-type]
        elif kind == "entry":
            sink = w.on_entry(value)  # type: ignore[arg-type]
        elif kind == "data":
            assert sink is not None
            sink(value)  # type: ignore[arg-type]
        elif kind == "end":
            w.end_of_archive()
        elif kind == "trailing":
            w.trailing(value)  # type: ignore[arg-type]
    w.close()
    data = out.getvalue()
    assert data.endswith(b"\n")
    return data.decode().split("\n")[:-1]


def test_record_format_exact_lines() -> None:
    h1, h2, h3 = b"A" * 512, b"B" * 1024, b"C" * 512
    lines = writer_lines([
        ("raw", h1), ("entry", TarEntry(name=b"etc/passwd", type=b"0", size=11)),
        ("data", b"hello "), ("data", b"world"),
        ("raw", b"\0" * 501), ("raw", h2),
        ("entry", TarEntry(name=b"etc/empty", type=b"0", size=0)),
        ("raw", h3), ("entry", TarEntry(name=b"etc/", type=b"5")),
        ("raw", b"\0" * 1024), ("end", None),
    ])
    assert lines == [
        f'{{"type":2,"payload":"{b64(h1)}","position":0}}',
        f'{{"type":1,"name":"etc/passwd","size":11,"payload":"{crc_payload(b"hello world")}",'
        '"position":1}',
        f'{{"type":2,"payload":"{b64(bytes(501) + h2)}","position":2}}',
        '{"type":1,"name":"etc/empty","payload":null,"position":3}',
        f'{{"type":2,"payload":"{b64(h3)}","position":4}}',
        '{"type":1,"name":"etc/","payload":null,"position":5}',
        f'{{"type":2,"payload":"{b64(bytes(1024))}","position":6}}',
        '{"type":2,"payload":"","position":7}',  # tar-split always ends with an empty segment
    ]
    # every line is plain JSON with the fields in Go's struct order
    keys = [list(json.loads(x)) for x in lines]
    assert keys[1] == ["type", "name", "size", "payload", "position"]
    assert keys[3] == ["type", "name", "payload", "position"]


def test_trailing_bytes_follow_in_segments() -> None:
    lines = writer_lines([
        ("raw", b"H" * 512), ("entry", TarEntry(name=b"a", type=b"5")),
        ("raw", bytes(1024)), ("end", None),
        ("trailing", b"junk"), ("trailing", b""), ("trailing", b"more"),
    ])
    recs = [json.loads(x) for x in lines]
    assert [r["position"] for r in recs] == list(range(len(recs)))
    assert recs[-1] == {"type": 2, "payload": "", "position": len(recs) - 1}
    segments = [base64.b64decode(r["payload"]) for r in recs[2:-1]]
    assert segments[0] == bytes(1024)
    assert b"".join(segments[1:]) == b"junkmore"
    assert all(r["type"] == 2 for r in recs[2:])


def test_empty_archive() -> None:
    lines = writer_lines([("raw", bytes(1024)), ("end", None)])
    assert lines == [f'{{"type":2,"payload":"{b64(bytes(1024))}","position":0}}',
                     '{"type":2,"payload":"","position":1}']


@pytest.mark.parametrize(("name", "field"), [
    pytest.param(b"caf\xe9", '"name_raw":"' + b64(b"caf\xe9") + '"', id="latin1"),
    pytest.param(b"\xff\xfe/x", '"name_raw":"' + b64(b"\xff\xfe/x") + '"', id="invalid-lead"),
    pytest.param(b"ok/\xed\xa0\x80", '"name_raw":"' + b64(b"ok/\xed\xa0\x80") + '"',
                 id="surrogate-bytes"),
    pytest.param("café/ü".encode(), '"name":"café/ü"', id="utf8-stays-literal"),
    pytest.param(b"a<b>&c", '"name":"a\\u003cb\\u003e\\u0026c"', id="html-escaped"),
    pytest.param("x\u2028y\u2029".encode(), '"name":"x\\u2028y\\u2029"', id="line-separators"),
    pytest.param(b'q"b\\s', '"name":"q\\"b\\\\s"', id="quote-backslash"),
    pytest.param(b"t\tn\nr\r", '"name":"t\\tn\\nr\\r"', id="tab-newline"),
    pytest.param(b"c\x01\x1f", '"name":"c\\u0001\\u001f"', id="control"),
    pytest.param(b"del\x7f", '"name":"del\x7f"', id="del-literal"),
])
def test_names_are_encoded_as_go_does(name: bytes, field: str) -> None:
    lines = writer_lines([("raw", b"H" * 512), ("entry", TarEntry(name=name, type=b"0")),
                          ("raw", bytes(1024)), ("end", None)])
    assert lines[1] == f'{{"type":1,{field},"payload":null,"position":1}}'
    (rec,) = [r for r in read_records(iter(x.encode() for x in lines)) if r.type == 1]
    assert rec.name == name


# ============================================================================================
# Reading records
# ============================================================================================

def test_read_records_round_trip() -> None:
    lines = [
        b'{"type":2,"payload":"' + b64(b"hdr").encode() + b'","position":0}',
        b'{"type":1,"name":"a/b","size":3,"payload":"' + crc_payload(b"abc").encode() +
        b'","position":1}',
        b"",
        b'{"type":1,"name_raw":"' + b64(b"\xff").encode() + b'","payload":null,"position":2}',
        b'{"type":2,"payload":"","position":3}',
    ]
    recs = list(read_records(iter(lines)))
    assert recs == [
        Record(2, 0, b"hdr"),
        Record(1, 1, go_crc64(b"abc").to_bytes(8, "big"), b"a/b", 3),
        Record(1, 2, None, b"\xff", 0),
        Record(2, 3, b""),
    ]


@pytest.mark.parametrize("line", [
    pytest.param(b"not json", id="not-json"),
    pytest.param(b'{"type":3,"payload":null,"position":0}', id="unknown-type"),
    pytest.param(b'{"payload":null,"position":0}', id="no-type"),
    pytest.param(b'{"type":2,"payload":"%%%","position":0}', id="bad-base64"),
    pytest.param(b"[1]", id="not-an-object"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100k-deep"),
])
def test_read_records_rejects_garbage(line: bytes) -> None:
    with pytest.raises(StoreError):
        list(read_records(iter([line])))


def test_open_records_reads_gzip(tmp_path: Path) -> None:
    path = tmp_path / "ts.json.gz"
    path.write_bytes(gzip.compress(b'{"type":2,"payload":"eA==","position":0}\n'
                                   b'{"type":2,"payload":"","position":1}\n'))
    assert list(open_records(str(path))) == [Record(2, 0, b"x"), Record(2, 1, b"")]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda gz: gz[: len(gz) // 2], id="truncated"),
    pytest.param(lambda gz: gz[:10] + b"\xff" * 40 + gz[50:], id="corrupt-deflate"),
])
def test_open_records_damaged_gzip_is_a_store_error(tmp_path: Path, damage: Any) -> None:
    """Found by fuzzing: a cut tar-split.json.gz escaped as EOFError (verify, export and
    flatten printed 'internal error')."""
    path = tmp_path / "ts.json.gz"
    path.write_bytes(damage(gzip.compress(b'{"type":2,"payload":"eA==","position":0}\n' * 500)))
    with pytest.raises(StoreError, match="corrupt"):
        list(open_records(str(path)))


# ============================================================================================
# Disassembling real archives (apply_layer feeding the writer, as unpack does)
# ============================================================================================

def disasm(tar: bytes, diff: Path, stream: object | None = None) -> bytes:
    """Our records (uncompressed JSON lines) for `tar`, extracting it into `diff`."""
    diff.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    ts = TarSplitWriter(out)
    src = stream if stream is not None else io.BytesIO(tar)
    apply_layer(src, str(diff), mode="overlay", on_entry=ts.on_entry, on_raw=ts.on_raw,
                defer_root_opaque=True)
    ts.end_of_archive()
    while chunk := src.read(1 << 20):  # type: ignore[attr-defined]
        ts.trailing(chunk)
    ts.close()
    return out.getvalue()


def real_disasm(exe: str, tar: bytes, tmp: Path) -> bytes:
    (tmp / "in.tar").write_bytes(tar)
    proc = subprocess.run([exe, "disasm", "--no-stdout", "--output", str(tmp / "ref.json.gz"),
                           str(tmp / "in.tar")], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return gzip.decompress((tmp / "ref.json.gz").read_bytes())


def real_asm(exe: str, records: bytes, diff: Path, tmp: Path) -> bytes:
    (tmp / "ours.json.gz").write_bytes(gzip.compress(records))
    proc = subprocess.run([exe, "asm", "--input", str(tmp / "ours.json.gz"), "--path", str(diff),
                           "--output", "-"], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def records_of(data: bytes) -> Iterator[Record]:
    return read_records(iter(data.splitlines()))


BIG = random.Random(5).randbytes(3 * (1 << 20) + 17)  # several read chunks


def _members(nonutf8: bool, long_names: bool) -> list[tb.Member]:
    members = [
        tb.dir("etc", mode=0o755),
        tb.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        tb.file("etc/empty", b""),
        tb.file("etc/big", BIG, mode=0o600),
        tb.hardlink("etc/big-link", "etc/big"),
        tb.symlink("etc/sym", "passwd"),
        tb.dir("dev"),
        tb.chardev("dev/null", 1, 3),
        tb.fifo("dev/fifo"),
        tb.file("odd <name> & more", b"html chars\n"),
        tb.file("usr/share/ünïcode.txt", "é\n".encode()),
        tb.whiteout("etc/gone"),
        tb.opaque("usr/share"),
        tb.file("exact-block", b"z" * 512),
    ]
    if nonutf8:
        members += [tb.file(b"caf\xe9", b"latin-1 name\n"),
                    tb.file(b"dir\xff/inner", b"under a non-UTF-8 dir\n")]
    if long_names:
        deep = "/".join(["d" * 40] * 4)
        members += [tb.file(f"{deep}/long-file-name-{'x' * 60}.txt", b"long\n"),
                    tb.symlink("long-link", "t" * 150)]
        if nonutf8:
            members += [tb.file(("n" * 120).encode() + b"\xfe", b"long non-UTF-8\n")]
    return members


def _case(fmt: str, *, nonutf8: bool = True, long_names: bool = True, tail: bytes = b"",
          end: bool = True, global_pax: dict[str, str] | None = None) -> bytes:
    return tb.build(_members(nonutf8, long_names), fmt, end=end, global_pax=global_pax) + tail


def _tarfile_padded(fmt: int) -> bytes:
    """Python's tarfile as-is: its end marker padded to a 10240-byte record."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        data = b"padded\n"
        ti = tarfile.TarInfo("padded.txt")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    assert len(buf.getvalue()) == 10240
    return buf.getvalue()


ROUND_TRIP_CASES = [
    pytest.param(lambda: _case("gnu"), id="gnu"),
    pytest.param(lambda: _case("pax"), id="pax"),
    pytest.param(lambda: _case("ustar", long_names=False), id="ustar"),
    pytest.param(lambda: _case("ustar", nonutf8=False, long_names=False), id="ustar-ascii"),
    pytest.param(lambda: _case("pax", global_pax={"comment": "global header"}),
                 id="pax-global-header"),
    pytest.param(lambda: _case("gnu", tail=b"\0" * 8192), id="gnu-record-padding"),
    pytest.param(lambda: _case("pax", tail=b"trailing garbage after the end marker"),
                 id="pax-trailing-garbage"),
    pytest.param(lambda: _case("ustar", long_names=False, tail=bytes(512) + b"x" * 700),
                 id="ustar-trailing-bytes"),
    pytest.param(lambda: _case("gnu", tail=random.Random(3).randbytes(2 * (1 << 20) + 9)),
                 id="gnu-trailing-megabytes"),
    pytest.param(lambda: _case("pax", end=False), id="pax-no-end-marker"),
    pytest.param(lambda: _tarfile_padded(tarfile.GNU_FORMAT), id="tarfile-gnu-10240"),
    pytest.param(lambda: _tarfile_padded(tarfile.PAX_FORMAT), id="tarfile-pax-10240"),
    pytest.param(lambda: tb.END, id="empty-archive"),
    pytest.param(lambda: tb.build([tb.file("ctl\bname\f", b"control chars\n")], "pax"),
                 id="backspace-formfeed-names"),
]


@pytest.mark.parametrize("make", ROUND_TRIP_CASES)
def test_round_trip_against_real_tar_split(tmp_path: Path, make: object) -> None:
    exe = requires_tool("tar-split")
    tar = make()  # type: ignore[operator]
    diff = tmp_path / "diff"
    ours = disasm(tar, diff)
    # our assembler and the real one rebuild the exact archive from our records
    assert b"".join(assemble(records_of(ours), str(diff))) == tar
    assert real_asm(exe, ours, diff, tmp_path) == tar
    # and our records are the real disassembler's, line for line
    theirs = real_disasm(exe, tar, tmp_path)
    a, b = ours.splitlines(), theirs.splitlines()
    for n, (x, y) in enumerate(zip(a, b, strict=False)):
        assert x == y, f"record {n}:\n ours   {x[:300]!r}\n theirs {y[:300]!r}"
    assert len(a) == len(b)
    assert ours.endswith(b"\n") == theirs.endswith(b"\n")


def test_records_do_not_depend_on_read_sizes(tmp_path: Path) -> None:
    tar = _case("pax")
    whole = disasm(tar, tmp_path / "a")
    trickled = disasm(tar, tmp_path / "b", tb.Trickle(tar))
    assert trickled == whole


# ============================================================================================
# assemble: rebuilding, and refusing a changed diff dir
# ============================================================================================

@pytest.fixture
def layer(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    tar = _case("pax")
    diff = tmp_path / "diff"
    return tar, disasm(tar, diff), diff


def _shorten(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _lengthen(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"!")


def _same_size(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))


def _symlink_instead(p: Path) -> None:
    p.unlink()
    p.symlink_to("empty")


@pytest.mark.parametrize(("rel", "change", "needle"), [
    pytest.param("etc/passwd", os.unlink, "missing", id="missing"),
    pytest.param("etc/passwd", _shorten, "shorter", id="short"),
    pytest.param("etc/passwd", _lengthen, "longer", id="long"),
    pytest.param("etc/passwd", _same_size, "CRC", id="changed"),
    pytest.param("etc/big", _same_size, "CRC", id="changed-big"),
    pytest.param("etc/big", _shorten, "shorter", id="short-big"),
    pytest.param("etc/passwd", _symlink_instead, "etc/passwd", id="symlink-not-followed"),
    pytest.param("caf\udce9", _lengthen, "caf", id="non-utf8-name"),
])
def test_assemble_refuses_changed_files(layer: tuple[bytes, bytes, Path], rel: str,
                                        change: object, needle: str) -> None:
    _tar, records, diff = layer
    path = Path(os.fsdecode(os.path.join(os.fsencode(diff), os.fsencode(rel))))
    change(path)  # type: ignore[operator]
    with pytest.raises(ChangedError) as exc:
        b"".join(assemble(records_of(records), str(diff)))
    assert needle in str(exc.value)
    shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert shown in str(exc.value) or rel in str(exc.value)


def test_assemble_ignores_metadata_and_empty_files(layer: tuple[bytes, bytes, Path]) -> None:
    """Content is all tar-split checks (metadata is verify's job): a chmod or an emptied-but-
    size-0 file does not stop the rebuild, and headers come from the records."""
    tar, records, diff = layer
    os.chmod(diff / "etc" / "passwd", 0o600)
    os.utime(diff / "etc" / "passwd", (1, 1))
    (diff / "etc" / "empty").unlink()
    assert b"".join(assemble(records_of(records), str(diff))) == tar


def test_assemble_small_chunks(layer: tuple[bytes, bytes, Path]) -> None:
    tar, records, diff = layer
    chunks = list(assemble(records_of(records), str(diff), chunk=4096))
    assert b"".join(chunks) == tar
    assert max(len(c) for c in chunks if c) <= max(4096, max(
        len(r.payload or b"") for r in records_of(records) if r.type == 2))


@pytest.mark.parametrize("name", [b"../escape", b"a/../../escape", b"/a/../../b"])
def test_assemble_refuses_escaping_names(tmp_path: Path, name: bytes) -> None:
    recs = [Record(2, 0, b"hdr"), Record(1, 1, go_crc64(b"x").to_bytes(8, "big"), name, 1)]
    with pytest.raises(ChangedError):
        b"".join(assemble(iter(recs), str(tmp_path)))


def test_assemble_accepts_absolute_and_dot_names(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    recs = [Record(1, 0, go_crc64(b"x").to_bytes(8, "big"), n, 1)
            for n in (b"/a", b"./a", b"a")]
    assert b"".join(assemble(iter(recs), str(tmp_path))) == b"xxx"
