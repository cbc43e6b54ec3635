"""The scan cache of store layers (`ocilayers/scancache.py`): `history` from the store writes
each layer's entries beside its tar-split records after the first read and loads them on
later reads. The figures must never depend on it: a cache that is malformed, of another
format or made from another tar-split is ignored and replaced; one is written only under a
free store lock; squash (which needs the header bytes) never uses it.

Every hand-computed figure test in test_history.py also reads each store image a second
time, from the cache, and compares (`Image.both`)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
import tarbuilder as tb
from conftest import run_module
from test_history import Image, make, summary

from ocilayers import scancache
from ocilayers.layerscan import FILE_KIND, HARDLINK_KIND, WHITEOUT_KIND, Entry

LAYERS = [
    [tb.dir("app"), tb.file("app/a", b"a" * 100), tb.file("app/b", b"b" * 200),
     tb.hardlink("app/c", "app/a"), tb.file("keep", b"k" * 7)],
    [tb.whiteout("app/b"), tb.file("app/a", b"A" * 150), tb.file("new", b"n" * 30)],
]


def caches(img: Image) -> list[Path]:
    return sorted(img.root.glob("image/overlay2/layerdb/sha256/*/" + scancache.NAME))


@pytest.fixture
def img(tmp_path: Path) -> Image:
    return make(tmp_path, LAYERS)


def test_first_store_read_writes_one_cache_per_layer(img: Image) -> None:
    assert caches(img) == []  # unpack writes none: only a read of the records does
    first = img.history("store")
    assert len(caches(img)) == 2
    for path in caches(img):
        doc = json.loads(path.read_bytes())
        assert doc["format"] == scancache.FORMAT
        st = os.stat(path.parent / "tar-split.json.gz")
        assert doc["tar_split"] == [st.st_ino, st.st_size, st.st_mtime_ns]
        assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert summary(img.history("store")) == summary(first) == summary(img.history("source"))


def test_a_good_cache_is_what_is_read(img: Image) -> None:
    """A cache with the right key is used as it is: edit a size in it and the figures move
    (this is what proves later reads skip the records)."""
    before = img.history("store")
    edited = 0
    for path in caches(img):
        doc = json.loads(path.read_bytes())
        for i, name in enumerate(doc["paths"]):
            if name == "new":
                doc["sizes"][i] += 1000
                edited += 1
        path.write_text(json.dumps(doc))
    assert edited == 1
    after = img.history("store")
    assert after.stored_bytes == before.stored_bytes + 1000


@pytest.mark.parametrize("damage", [
    "garbage", "empty", "other-format", "other-tar-split", "bad-kind", "short-row",
    "negative-size", "huge-crc", "not-a-list", "bytes-not-text",
])
def test_a_bad_cache_is_ignored_and_replaced(img: Image, damage: str) -> None:
    want = summary(img.history("store"))
    for path in caches(img):
        doc = json.loads(path.read_bytes())
        if damage == "garbage":
            path.write_bytes(b"\x00{not json")
            continue
        if damage == "empty":
            path.write_bytes(b"")
            continue
        if damage == "other-format":
            doc["format"] = 99
        elif damage == "other-tar-split":
            ts = path.parent / "tar-split.json.gz"
            os.utime(ts, ns=(1, 1))  # the records' file is no longer the one cached
        elif damage == "bad-kind":
            doc["kinds"][0] = "symlink-to-etc"
        elif damage == "short-row":
            doc["links"] = doc["links"][:-1]
        elif damage == "negative-size":
            doc["sizes"][0] = -5
        elif damage == "huge-crc":
            doc["crcs"][0] = 1 << 64
        elif damage == "not-a-list":
            doc["paths"] = {"a": 1}
        elif damage == "bytes-not-text":
            doc["paths"][0] = 7
        path.write_text(json.dumps(doc))
    assert summary(img.history("store")) == want
    for path in caches(img):  # rewritten good
        assert scancache.load(str(path.parent / "tar-split.json.gz")) is not None


def test_no_cache_is_written_while_the_store_is_locked(img: Image) -> None:
    """A reader never waits for a writer: with the store lock held elsewhere it reads the
    records and writes nothing."""
    want = summary(img.history("source"))
    fd = os.open(img.root / "ocilayers.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert summary(img.history("store")) == want
        assert caches(img) == []
    finally:
        os.close(fd)
    assert summary(img.history("store")) == want
    assert len(caches(img)) == 2


def test_rmi_removes_the_cache_with_the_layer(img: Image) -> None:
    img.history("store")
    assert len(caches(img)) == 2
    proc = run_module(["--root", str(img.root), "-q", "rmi", img.tag])
    assert proc.returncode == 0, proc.stderr
    assert caches(img) == []
    assert list((img.root / "image/overlay2/layerdb/sha256").iterdir()) == []


def test_squash_reads_the_records_not_the_cache(img: Image, tmp_path: Path) -> None:
    """squash needs each entry's header bytes, which the cache does not hold: a cache that
    lies changes history, never squash's layer."""
    out1, out2 = tmp_path / "s1", tmp_path / "s2"
    base = ["--root", str(img.root), "-q", "squash", img.tag, "--all", "--format", "oci",
            "--json"]
    p1 = run_module([*base, "-o", str(out1)])
    assert p1.returncode == 0, p1.stderr
    img.history("store")
    for path in caches(img):
        doc = json.loads(path.read_bytes())
        for field in ("paths", "kinds", "sizes", "crcs", "links"):
            doc[field] = []
        path.write_text(json.dumps(doc))
    p2 = run_module([*base, "-o", str(out2)])
    assert p2.returncode == 0, p2.stderr
    assert json.loads(p1.stdout)["diff_id"] == json.loads(p2.stdout)["diff_id"]


def test_round_trip_of_every_kind_and_non_utf8_names(tmp_path: Path) -> None:
    ts = tmp_path / "tar-split.json.gz"
    ts.write_bytes(b"records")
    entries = [Entry(b"caf\xc3\xa9/\xff\xfename", FILE_KIND, 12, (1 << 64) - 1),
               Entry(b"link", HARDLINK_KIND, 0, 0, b"\x80target"),
               Entry(b"gone", WHITEOUT_KIND)]
    scancache.save(str(ts), entries, 4096)
    got = scancache.load(str(ts))
    assert got is not None
    assert got[1] == 4096
    assert [(e.path, e.kind, e.size, e.crc, e.link) for e in got[0]] == \
        [(e.path, e.kind, e.size, e.crc, e.link) for e in entries]
    ts.write_bytes(b"other records")  # another size: not this cache's file any more
    assert scancache.load(str(ts)) is None
