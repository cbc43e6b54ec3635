"""A layer's entries as growth analysis sees them, read from a tar stream (one pass, each
file's data CRC-64'd on the way, nothing written) or from a store layer's tar-split records
(headers only: no data read, no decompression of the layer).

Both give the same `Entry` values for the same layer, so every figure computed from them is
the same whichever way the image is read."""

from __future__ import annotations

import binascii
import fnmatch
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ocilayers.errors import StoreError, TarError
from ocilayers.tarstream import (
    AREG,
    BLK,
    BLOCK,
    CHR,
    CONT,
    DIR,
    FIFO,
    GNU_LONGLINK,
    GNU_LONGNAME,
    GNU_VOLHDR,
    LNK,
    PAX,
    PAX_GLOBAL,
    REG,
    SYM,
    TarEntry,
    TarReader,
)
from ocilayers.whiteout import classify

if TYPE_CHECKING:  # (tarsplit, with ISA-L and the CRC-64, is imported where records are read:
    # history from a store's scan cache needs neither)
    from ocilayers.tarsplit import Record

FILE_KIND = "file"
DIR_KIND = "dir"
SYMLINK_KIND = "symlink"
HARDLINK_KIND = "hardlink"
OTHER_KIND = "other"  # devices, fifos
WHITEOUT_KIND = "whiteout"
OPAQUE_KIND = "opaque"


@dataclass(slots=True)
class Entry:
    """One tar entry of a layer. `path` is normalised (no leading `./` or `/`, no trailing
    `/`); for a whiteout it is the path it deletes, for an opaque marker the dir it marks.
    `size` is the header's size; `crc` the CRC-64 of a regular file's data (0 for none);
    `link` a hardlink's normalised target. `header` is kept when asked for (squash)."""

    path: bytes
    kind: str
    size: int = 0
    crc: int = 0
    link: bytes = b""
    header: TarEntry | None = None
    raw: bytes = b""  # the header blocks, from a store's tar-split (parsed when needed)

    @property
    def shown(self) -> str:
        return "/" + self.path.decode("utf-8", "backslashreplace")


def normalize(name: bytes, what: str = "entry") -> bytes:
    """A tar name as a path under the layer root; `..` anywhere is an error."""
    if name.startswith(b"./"):
        name = name[2:]
    if not name.startswith((b".", b"/")) and b"/." not in name and b"//" not in name:
        return name.rstrip(b"/")  # (the common case: already clean)
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise TarError(f"{what} '{name.decode('utf-8', 'backslashreplace')}' escapes the layer")
    return b"/".join(parts)


def entry_of(t: TarEntry, keep_header: bool = False) -> Entry | None:
    """The analysis' view of one tar entry; None for what is not content (the root dir, a PAX
    global header, AUFS bookkeeping names)."""
    if t.type == PAX_GLOBAL:
        return None
    return _entry(t.name, t.type, t.size, t.linkname, t if keep_header else None)


_KINDS = {REG: FILE_KIND, AREG: FILE_KIND, CONT: FILE_KIND, DIR: DIR_KIND, SYM: SYMLINK_KIND,
          LNK: HARDLINK_KIND}


def _entry(name: bytes, type_: bytes, size: int, linkname: bytes,
           header: TarEntry | None) -> Entry | None:
    path = normalize(name)
    if not path:
        return None  # the layer's root: never hidden, never hiding
    parent, _, base = path.rpartition(b"/")
    if base.startswith(b".wh."):
        kind_of, target = classify(base, name.decode("utf-8", "backslashreplace"))
        if kind_of == "meta":
            return None
        if kind_of == "opaque":
            return Entry(parent, OPAQUE_KIND, size, header=header)
        return Entry(parent + b"/" + target if parent else target, WHITEOUT_KIND, size,
                     header=header)
    kind = _KINDS.get(type_, OTHER_KIND)
    if kind == HARDLINK_KIND:
        return Entry(path, kind, size, link=normalize(linkname, "hardlink target"),
                     header=header)
    return Entry(path, kind, size, header=header)


@dataclass
class ScanCounts:
    """What a scan saw besides the entries: the layer's uncompressed (tar) size."""

    tar_size: int = 0


def scan_tar(stream: object, *, keep_headers: bool = False,
             counts: ScanCounts | None = None) -> Iterator[Entry]:
    """Every entry of the tar `stream`, each regular file's data read once for its CRC-64
    (the same CRC tar-split records). Reads the stream to its end."""
    from ocilayers.tarsplit import crc64

    counted = _Counting(stream)
    reader = TarReader(counted)
    for t in reader:
        e = entry_of(t, keep_headers)
        if e is None:
            continue
        if e.kind == FILE_KIND and reader.data_left:
            crc = 0
            while data := reader.read_data():
                crc = crc64(data, crc)
            e.crc = crc
        yield e
    while counted.read(1 << 20):  # what follows the end-of-archive blocks is in the DiffID
        pass
    if counts is not None:
        counts.tar_size = counted.count


def spool(stream: object, wanted: set[int], path_of: Callable[[int], str]) -> None:
    """Write the data of the entries numbered `wanted` (counted as `scan_tar` yields them,
    from 0) of the tar `stream` into the files `path_of(n)`. Reads the stream to its end."""
    reader = TarReader(stream)
    n = -1
    for t in reader:
        if entry_of(t) is None:
            continue
        n += 1
        if n in wanted:
            with open(path_of(n), "xb") as out:
                while data := reader.read_data():
                    out.write(data)
    read: Callable[[int], bytes] = stream.read  # type: ignore[attr-defined]
    while read(1 << 20):
        pass


class _Counting:
    def __init__(self, stream: object) -> None:
        self._read: Callable[[int], bytes] = stream.read  # type: ignore[attr-defined]
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._read(n)
        self.count += len(data)
        return data


class _Segments:
    """tar-split's segments as one byte stream, for the tar reader to parse the headers in;
    the file records between them stand for the data, which is not there."""

    def __init__(self, records: Iterable[Record]) -> None:
        from ocilayers.tarsplit import FILE, SEGMENT

        self._segment, self._file = SEGMENT, FILE
        self._records = iter(records)
        self._buf = b""
        self._off = 0
        self.size = 0  # the tar's size: segments and file data

    def read(self, n: int = -1, /) -> bytes:
        while self._off >= len(self._buf):
            rec = next(self._records, None)
            if rec is None:
                return b""
            if rec.type != self._segment:
                raise StoreError("tar-split: a file record where a header was expected")
            self._buf, self._off = rec.payload or b"", 0
            self.size += len(self._buf)
        end = len(self._buf) if n < 0 else self._off + n
        data = self._buf[self._off:end]
        self._off += len(data)
        return data

    def file_record(self, data_size: int) -> Record:
        """The file record that stands where the entry just read has its data."""
        if self._off < len(self._buf):
            raise StoreError("tar-split: header bytes where a file record was expected")
        rec = next(self._records, None)
        if rec is None or rec.type != self._file:
            raise StoreError("tar-split: an entry without its file record")
        if rec.size != data_size and (rec.size or data_size):
            raise StoreError(f"tar-split: file record of {rec.size} bytes for an entry of "
                             f"{data_size}")
        self.size += data_size
        return rec

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def scan_records(records: Iterable[Record], *, keep_headers: bool = False,
                 counts: ScanCounts | None = None) -> Iterator[Entry]:
    """Every entry of a store layer from its tar-split records alone: headers parsed from the
    segments, each file's CRC-64 taken from its record (no data read)."""
    seg = _Segments(records)
    reader = TarReader(seg)
    for t in reader:
        left = reader.data_left
        rec = seg.file_record(left)
        reader.data_elsewhere()
        e = entry_of(t, keep_headers)
        if e is None:
            continue
        if e.kind == FILE_KIND and left:
            if rec.payload is None or len(rec.payload) != 8:
                raise StoreError(f"tar-split: no CRC-64 for '{t.display_name}'")
            e.crc = int.from_bytes(rec.payload, "big")
        yield e
    seg.drain()
    if counts is not None:
        counts.tar_size = seg.size


_EXTENSION_TYPES = (PAX, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK, GNU_VOLHDR)


class _Unusual(Exception):
    """A tar-split the fast reader does not take: read it with the tar reader instead."""


_NO_DATA = (LNK, SYM, DIR, CHR, BLK, FIFO)


def scan_tar_split(path: str, counts: ScanCounts | None = None, *,
                   keep_raw: bool = False) -> list[Entry]:
    """`scan_records` of a store layer's `tar-split.json.gz`, fast: the records are sliced,
    not JSON-decoded, and a plain USTAR header is read field by field; PAX and GNU headers
    go through the tar reader one by one. Records or headers of any other shape (a global
    PAX header, a record not as dockerd or ocilayers write them) make it read the whole
    layer with `scan_records` instead. `keep_raw`: each entry keeps its header bytes."""
    try:
        return _fast_tar_split(path, counts, keep_raw)
    except _Unusual:
        from ocilayers.tarsplit import open_records

        return list(scan_records(open_records(path), keep_headers=keep_raw, counts=counts))


def _fast_tar_split(path: str, counts: ScanCounts | None, keep_raw: bool) -> list[Entry]:
    from isal import igzip

    from ocilayers.streams import igzip_lib_error

    out: list[Entry] = []
    segs: list[bytes] = []
    size = 0
    pad = 0
    a2b = binascii.a2b_base64
    seg_head = b'{"type":2,"payload":"'
    file_head = b'{"type":1,'
    with igzip.open(path, "rb") as f:  # type: ignore[no-untyped-call]
        try:
            rest: bytes | None = b""
            while rest is not None:
                chunk = f.read(1 << 20)
                if chunk:
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                else:
                    lines, rest = [rest], None
                for line in lines:
                    if line.startswith(seg_head):
                        b64 = line[21:line.find(b'"', 21)]
                        size += len(b64) // 4 * 3 - b64[-2:].count(b"=")
                        segs.append(b64)
                        continue
                    if not line.startswith(file_head):
                        if line.strip():
                            raise _Unusual
                        continue
                    if len(segs) == 1:  # decode only what follows the padding (base64 is slow)
                        skip = pad // 3 * 4
                        hdr = a2b(segs[0][skip:])[pad % 3:] if skip else a2b(segs[0])[pad:]
                    else:
                        hdr = b"".join(a2b(x) for x in segs)[pad:]
                    segs.clear()
                    typeflag = hdr[156:157]
                    if (len(hdr) == BLOCK and typeflag not in _EXTENSION_TYPES
                            and hdr[124] < 0x80):  # a plain header: its fields, as they are
                        name = hdr[:100].split(b"\0", 1)[0]
                        if hdr[345] and hdr[257:263] == b"ustar\0":
                            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
                        hsize = int(hdr[124:136].strip(b" \0") or b"0", 8)
                        data = 0 if typeflag in _NO_DATA else hsize
                        e = _entry(name, typeflag, hsize,
                                   hdr[157:257].split(b"\0", 1)[0] if typeflag == LNK else b"",
                                   None)
                    else:
                        e, data = _header_entry(hdr)
                    pad = -data % BLOCK
                    size += data
                    if e is None:
                        continue
                    if data and e.kind == FILE_KIND:
                        p = line.rfind(b'"payload":"')
                        if p < 0:
                            raise _Unusual
                        crc = a2b(line[p + 11:line.index(b'"', p + 11)])
                        if len(crc) != 8:
                            raise _Unusual
                        e.crc = int.from_bytes(crc, "big")
                    if keep_raw:
                        e.raw = hdr
                    out.append(e)
        except (EOFError, igzip_lib_error(), binascii.Error, ValueError) as exc:
            if isinstance(exc, TarError):
                raise
            raise _Unusual from None
    if counts is not None:
        counts.tar_size = size
    return out


def _header_entry(hdr: bytes) -> tuple[Entry | None, int]:
    """The entry of header bytes that are not one plain USTAR block (PAX or GNU extension
    headers first), read with the tar reader, and how many data bytes follow them."""
    if hdr[156:157] == PAX_GLOBAL:
        raise _Unusual
    reader = TarReader(io.BytesIO(hdr))
    t = next(iter(reader), None)
    if t is None or t.type == PAX_GLOBAL:
        raise _Unusual
    return entry_of(t), reader.data_left


def ignored(patterns: Sequence[str]) -> Callable[[bytes], bool] | None:
    """A test for `--ignore` globs: a path is left out when it or any dir above it matches a
    pattern (fnmatch, against the absolute path: `/var/cache/*`, `*.pyc`, `/tmp`)."""
    if not patterns:
        return None
    pats = [p.encode("utf-8", "surrogateescape") for p in patterns]

    def test(path: bytes) -> bool:
        full = b"/" + path
        while True:
            if any(fnmatch.fnmatchcase(full, p) for p in pats):
                return True
            full = full.rpartition(b"/")[0]
            if not full:
                return False

    return test
