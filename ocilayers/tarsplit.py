"""tar-split records (`tar-split.json.gz`): written while a layer is applied, read to rebuild it.

The format is vbatts/tar-split's `storage` package, as dockerd writes it: one JSON object per line,
`position` counting from 0. Type 2 segments carry raw bytes (headers, padding, end-of-archive);
type 1 file records carry the entry name, its size and the CRC-64 (Go's crc64.ISO) of its data.
With the records and the layer's diff dir, the original tar is rebuilt byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from binascii import b2a_base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anycrc
from isal import igzip

from ocilayers.errors import ChangedError, StoreError
from ocilayers.tarstream import TarEntry

SEGMENT = 2
FILE = 1
_BATCH = 64 << 10


def _crc_model() -> Any:
    model = anycrc.Model("CRC64-GO-ISO")
    if model.calc(b"123456789") != 0xB90956C775A41001:  # the catalogue's check value
        raise RuntimeError("anycrc's CRC64-GO-ISO does not match Go's crc64.ISO")
    return model


_CRC = _crc_model()


def crc64(data: bytes | memoryview, crc: int = 0) -> int:
    """Go's crc64.Checksum(data, crc64.MakeTable(crc64.ISO)); pass the last result to go on
    (the CRC of nothing is 0, so 0 starts afresh)."""
    return int(_CRC.calc(data, crc))


# Go's encoding/json string escaping (as of the Go that builds Debian's dockerd and
# tar-split): \" \\ \n \r \t; other control characters, <, >, & and U+2028/2029 as \u00XX.
_GO_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029]')
_PLAIN_NAME = re.compile(rb'[^"\\\x00-\x1f<>&\x7f-\xff]*')
_GO_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _go_escape(s: str) -> str:
    return _GO_ESCAPE.sub(lambda m: _GO_SHORT.get(m.group(0), f"\\u{ord(m.group(0)):04x}"), s)


class TarSplitWriter:
    """Feeds on apply_layer's `on_raw` and `on_entry` hooks; writes records to `out` as they come.

    Call `end_of_archive()` when apply_layer returns, `trailing()` with each chunk read after
    that, then `close()`. Memory stays bounded: records are written out in batches of about
    64 KiB, and extension headers are capped by the tar reader.
    """

    def __init__(self, out: Any) -> None:
        self._out = out
        self._pos = 0
        self._raw = bytearray()
        self._entry: TarEntry | None = None
        self._crc = 0
        self._ended = False
        self._lines: list[bytes] = []  # a batch of records: one write per batch, not per line
        self._pending = 0
        # The file record of the entry before is written at the next on_entry (or the end),
        # so raw bytes only need collecting: no Python frame per header.
        self.on_raw: Callable[[bytes], None] = self._raw.extend

    def _flush(self) -> None:
        """Records for what came since the last call: the previous entry's file record, then
        the raw bytes (its padding, the next headers) as one segment."""
        e = self._entry
        if e is not None:
            self._entry = None
            line = self._file_record(e)
            self._lines.append(line)
            self._pending += len(line)
            self._pos += 1
        if self._raw:
            line = b'{"type":2,"payload":"%s","position":%d}' % (
                b2a_base64(self._raw, newline=False), self._pos)
            self._lines.append(line)
            self._pending += len(line)
            self._pos += 1
            self._raw.clear()
        if self._pending >= _BATCH:
            self._write_batch()

    def _file_record(self, e: TarEntry) -> bytes:
        if _PLAIN_NAME.fullmatch(e.name) is not None:  # ASCII, nothing to escape: as it is
            if e.size > 0:
                return b'{"type":1,"name":"%s","size":%d,"payload":"%s","position":%d}' % (
                    e.name, e.size, b2a_base64(self._crc.to_bytes(8, "big"), newline=False),
                    self._pos)
            return b'{"type":1,"name":"%s","payload":null,"position":%d}' % (e.name, self._pos)
        try:
            name = e.name.decode("utf-8")
        except UnicodeDecodeError:
            name_field = b'"name_raw":"%s",' % b2a_base64(e.name, newline=False)
        else:
            if _GO_ESCAPE.search(name) is not None:
                name = _go_escape(name)
            name_field = b'"name":"%s",' % name.encode()
        if e.size > 0:
            return b'{"type":1,%s"size":%d,"payload":"%s","position":%d}' % (
                name_field, e.size, b2a_base64(self._crc.to_bytes(8, "big"), newline=False),
                self._pos)
        return b'{"type":1,%s"payload":null,"position":%d}' % (name_field, self._pos)

    def _write_batch(self) -> None:
        if self._lines:
            self._lines.append(b"")
            self._out.write(b"\n".join(self._lines))
            self._lines = []
        self._pending = 0

    def on_entry(self, entry: TarEntry) -> Callable[[bytes | memoryview], None]:
        e = self._entry
        if e is not None and self._raw and self._pending < _BATCH:
            # (what _flush does, for the usual case: one frame less per entry)
            line = self._file_record(e)
            seg = b'{"type":2,"payload":"%s","position":%d}' % (
                b2a_base64(self._raw, newline=False), self._pos + 1)
            self._lines += (line, seg)
            self._pending += len(line) + len(seg)
            self._pos += 2
            self._raw.clear()
        else:
            self._flush()
        self._entry = entry
        self._crc = 0
        return self._data

    def _data(self, chunk: bytes | memoryview) -> None:
        self._crc = _CRC.calc(chunk, self._crc)

    def end_of_archive(self) -> None:
        """The tar reader stopped: the last padding and the end blocks form one segment."""
        if not self._ended:
            self._flush()
            self._ended = True

    def trailing(self, chunk: bytes) -> None:
        """Bytes after the end marker (part of the DiffID): a segment per chunk read."""
        self.end_of_archive()
        if chunk:
            self._raw += chunk
            self._flush()

    def close(self) -> None:
        """Finish the records. Like tar-split, the last record is an empty segment."""
        self.end_of_archive()
        self._lines.append(b'{"type":2,"payload":"","position":%d}' % self._pos)
        self._pos += 1
        self._write_batch()


@dataclass(frozen=True)
class Record:
    type: int
    position: int
    payload: bytes | None = None
    name: bytes = b""
    size: int = 0


def read_records(lines: Iterator[bytes]) -> Iterator[Record]:
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rtype = obj["type"]
            payload = obj.get("payload")
            raw = base64.b64decode(payload, validate=True) if payload is not None else None
            if rtype == FILE:
                name = (base64.b64decode(obj["name_raw"], validate=True) if "name_raw" in obj
                        else obj.get("name", "").encode("utf-8", "surrogateescape"))
                yield Record(FILE, obj.get("position", i), raw, name, int(obj.get("size", 0)))
            elif rtype == SEGMENT:
                yield Record(SEGMENT, obj.get("position", i), raw or b"")
            else:
                raise ValueError(f"unknown record type {rtype!r}")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError,
                binascii.Error) as exc:
            raise StoreError(f"tar-split record {i}: {exc}") from None


def clean_name(name: bytes) -> bytes:
    """A record's name as a path under the diff dir (no leading /, no `..`)."""
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ChangedError(f"tar-split name {name!r} escapes the layer")
    return b"/".join(parts)


def assemble(records: Iterator[Record], diff_dir: str | bytes,
             chunk: int = 1 << 20) -> Iterator[bytes]:
    """Rebuild the layer tar from its records and diff dir, checking every file's size and CRC.

    Yields the tar in chunks; raises ChangedError naming the first changed path."""
    root = os.fsencode(diff_dir)
    for rec in records:
        if rec.type == SEGMENT:
            if rec.payload:
                yield rec.payload
            continue
        if rec.size <= 0:
            continue
        yield from file_chunks(root, clean_name(rec.name), rec.size,
                               rec.payload if rec.payload is not None else None, chunk)


def file_chunks(root: bytes, rel: bytes, size: int, crc: bytes | None,
                chunk: int = 1 << 20) -> Iterator[bytes]:
    """The data of the diff dir file `rel`, checked against its record's size and CRC-64
    (8 bytes, big-endian; None: not checked); raises ChangedError naming the path."""
    shown = rel.decode("utf-8", "backslashreplace")
    try:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ChangedError(f"layer changed: '{shown}' is missing or unreadable "
                           f"({exc.strerror})") from None
    try:
        left = size
        got = 0
        while left > 0:
            data = os.read(fd, min(chunk, left))
            if not data:
                raise ChangedError(f"layer changed: '{shown}' is shorter than "
                                   f"{size} bytes")
            got = crc64(data, got)
            left -= len(data)
            yield data
        if os.read(fd, 1):
            raise ChangedError(f"layer changed: '{shown}' is longer than {size} bytes")
    finally:
        os.close(fd)
    if crc is not None and got.to_bytes(8, "big") != crc:
        raise ChangedError(f"layer changed: '{shown}' content differs (CRC mismatch)")


def open_records(path: str) -> Iterator[Record]:
    """The records of a `tar-split.json.gz`, streamed."""
    from ocilayers.streams import igzip_lib_error

    with igzip.open(path, "rb") as f:  # type: ignore[no-untyped-call]
        try:
            yield from read_records(iter(f))
        except (EOFError, igzip_lib_error()) as exc:  # cut short, or a corrupt deflate stream
            raise StoreError(f"{path}: corrupt: {exc}") from None
