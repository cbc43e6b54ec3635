"""A tiny tar builder for tests: layer members as data, built by `tarfile` or crafted by block.

Well-formed archives come from Python's `tarfile` (PAX, GNU or USTAR), so the reader is tested
against an independent writer. What `tarfile` will not write (truncated archives, bad checksums,
hand-placed base-256 fields, GNU sparse entries, archives without end blocks) is crafted with the
raw helpers at the bottom.

    build([file("a", b"x", mode=0o4755, uid=1), dir("d"), symlink("l", "/etc"),
           hardlink("h", "a"), whiteout("d/x"), opaque("d")], fmt="pax") -> bytes
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

BLOCK = 512
END = b"\0" * (2 * BLOCK)
"""The end-of-archive marker: two zero blocks."""

MTIME = 1_600_000_000
"""Default mtime (seconds) of every member."""

FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}

Name = str | bytes


def _b(name: Name) -> bytes:
    return name if isinstance(name, bytes) else name.encode()


@dataclass(frozen=True)
class Member:
    """One archive member. Names are bytes (need not be UTF-8); `pax` adds raw PAX records."""

    name: bytes
    type: bytes
    data: bytes = b""
    linkname: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = MTIME * 1_000_000_000
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, str | bytes] = field(default_factory=dict)


def _member(name: Name, type_: bytes, *, data: bytes = b"", linkname: Name = b"", mode: int,
            uid: int = 0, gid: int = 0, mtime: int | None = None, mtime_ns: int | None = None,
            devmajor: int = 0, devminor: int = 0, xattrs: dict[str, bytes] | None = None,
            pax: dict[str, str | bytes] | None = None) -> Member:
    if mtime_ns is None:
        mtime_ns = (MTIME if mtime is None else mtime) * 1_000_000_000
    return Member(_b(name), type_, data, _b(linkname), mode, uid, gid, mtime_ns, devmajor,
                  devminor, dict(xattrs or {}), dict(pax or {}))


def file(name: Name, data: bytes = b"", *, mode: int = 0o644, **kw: object) -> Member:
    return _member(name, tarfile.REGTYPE, data=data, mode=mode, **kw)  # type: ignore[arg-type]


def dir(name: Name, *, mode: int = 0o755, **kw: object) -> Member:
    return _member(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def symlink(name: Name, target: Name, *, mode: int = 0o777, **kw: object) -> Member:
    return _member(name, tarfile.SYMTYPE, linkname=target, mode=mode, **kw)  # type: ignore[arg-type]


def hardlink(name: Name, target: Name, *, mode: int = 0o644, **kw: object) -> Member:
    return _member(name, tarfile.LNKTYPE, linkname=target, mode=mode, **kw)  # type: ignore[arg-type]


def chardev(name: Name, major: int, minor: int, *, mode: int = 0o666, **kw: object) -> Member:
    return _member(name, tarfile.CHRTYPE, devmajor=major, devminor=minor, mode=mode,
                   **kw)  # type: ignore[arg-type]


def blockdev(name: Name, major: int, minor: int, *, mode: int = 0o660, **kw: object) -> Member:
    return _member(name, tarfile.BLKTYPE, devmajor=major, devminor=minor, mode=mode,
                   **kw)  # type: ignore[arg-type]


def fifo(name: Name, *, mode: int = 0o644, **kw: object) -> Member:
    return _member(name, tarfile.FIFOTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def whiteout(path: Name, *, mode: int = 0o600, **kw: object) -> Member:
    """`dir/.wh.base`: the image-spec whiteout for `path` (an empty regular file)."""
    parent, _, base = _b(path).rpartition(b"/")
    return file((parent + b"/" if parent else b"") + b".wh." + base, mode=mode, **kw)


def opaque(dirpath: Name, *, mode: int = 0o755, **kw: object) -> Member:
    """`dirpath/.wh..wh..opq` (an empty dirpath means the layer root)."""
    d = _b(dirpath).rstrip(b"/")
    return file((d + b"/" if d else b"") + b".wh..wh..opq", mode=mode, **kw)


def _pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    whole, frac = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else f"{sign}{whole}"


def tarinfo(m: Member, fmt: str) -> tarfile.TarInfo:
    """The `tarfile.TarInfo` for `m` (names decoded with surrogateescape, as the archive is)."""
    ti = tarfile.TarInfo(m.name.decode("utf-8", "surrogateescape"))
    ti.type = m.type
    ti.size = len(m.data)
    ti.mode = m.mode
    ti.uid, ti.gid = m.uid, m.gid
    ti.mtime = m.mtime_ns // 1_000_000_000
    ti.linkname = m.linkname.decode("utf-8", "surrogateescape")
    ti.devmajor, ti.devminor = m.devmajor, m.devminor
    ti.uname = ti.gname = ""
    pax: dict[str, str] = {}
    if m.mtime_ns % 1_000_000_000 or m.mtime_ns < 0:
        pax["mtime"] = _pax_time(m.mtime_ns)
    for key, value in m.xattrs.items():
        pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    for key, v in m.pax.items():
        pax[key] = v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
    if pax:
        if fmt != "pax":
            raise ValueError(f"{m.name!r}: xattrs, sub-second mtimes, PAX records need fmt='pax'")
        ti.pax_headers = pax
    return ti


def build(members: Iterable[Member], fmt: str = "pax", *, end: bool = True,
          global_pax: dict[str, str] | None = None) -> bytes:
    """The archive of `members`: tarfile's encoding of each, then exactly END (or nothing).

    tarfile would pad the end to 10240 bytes; we stop at the two zero blocks, as Docker does.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=FORMATS[fmt], encoding="utf-8",
                      errors="surrogateescape", pax_headers=global_pax) as tf:
        for m in members:
            tf.addfile(tarinfo(m, fmt), io.BytesIO(m.data) if m.data else None)
        body = buf.getvalue()[:tf.offset]  # before close() appends its end blocks and padding
    return body + (END if end else b"")


# -- raw blocks, for what tarfile will not write --

def octal(n: int, width: int) -> bytes:
    """A NUL-terminated zero-padded octal field."""
    return f"{n:0{width - 1}o}".encode() + b"\0"


def base256(n: int, width: int) -> bytes:
    """GNU base-256: top bit of the first byte set, big-endian two's complement."""
    if n >= 0:
        return b"\x80" + n.to_bytes(width - 1, "big")
    return (n % (1 << (8 * width))).to_bytes(width, "big")  # first byte 0xff for small |n|


def checksum(block: bytes) -> bytes:
    """`block` with its checksum field (148:156) computed the usual (unsigned) way."""
    b = bytearray(block)
    b[148:156] = b" " * 8
    b[148:156] = f"{sum(b):06o}".encode() + b"\0 "
    return bytes(b)


def header(name: Name, type_: bytes = b"0", *, size: int = 0, mode: int = 0o644, uid: int = 0,
           gid: int = 0, mtime: int = MTIME, linkname: Name = b"", prefix: Name = b"",
           devmajor: int = 0, devminor: int = 0, magic: bytes = b"ustar\x0000",
           fields: dict[int, bytes] | None = None, good_checksum: bool = True) -> bytes:
    """One 512-byte header block. `fields` overwrites raw bytes at offsets (e.g. {108: base256(..)})
    before the checksum is computed; `good_checksum=False` then corrupts it."""
    b = bytearray(BLOCK)

    def put(off: int, value: bytes) -> None:
        b[off:off + len(value)] = value

    put(0, _b(name)[:100])
    put(100, octal(mode, 8))
    put(108, octal(uid, 8))
    put(116, octal(gid, 8))
    put(124, octal(size, 12))
    put(136, octal(mtime, 12))
    put(156, type_)
    put(157, _b(linkname)[:100])
    put(257, magic)
    put(329, octal(devmajor, 8))
    put(337, octal(devminor, 8))
    put(345, _b(prefix)[:155])
    for off, value in (fields or {}).items():
        put(off, value)
    block = checksum(bytes(b))
    if not good_checksum:
        block = block[:148] + b"000000\0 " + block[156:]
    return block


def pad(data: bytes) -> bytes:
    """`data` zero-padded to a whole number of blocks."""
    return data + b"\0" * (-len(data) % BLOCK)


def entry(hdr: bytes, data: bytes = b"") -> bytes:
    """A header block followed by its padded data."""
    return hdr + pad(data)


def pax_record(key: Name, value: Name) -> bytes:
    """One `"%d %s=%s\\n"` record; the length counts itself."""
    body = b" " + _b(key) + b"=" + _b(value) + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax_header(records: dict[Name, Name] | bytes, *, type_: bytes = b"x",
               name: Name = b"PaxHeader") -> bytes:
    """An extended header (`x`, or `g` for global) with its padded payload."""
    payload = records if isinstance(records, bytes) else b"".join(
        pax_record(k, v) for k, v in records.items())
    return entry(header(name, type_, size=len(payload)), payload)


def gnu_long(type_: bytes, value: Name) -> bytes:
    """A GNU long name (`L`) or long link name (`K`) pseudo-entry."""
    payload = _b(value) + b"\0"
    return entry(header(b"././@LongLink", type_, size=len(payload), magic=b"ustar  \0"), payload)


class LazyStream:
    """A read()-able stream over an iterable of chunks, holding at most one chunk at a time."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._buf = b""
        self.consumed = 0

    def read(self, n: int = -1) -> bytes:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return b""
        if n < 0 or n >= len(self._buf):
            data, self._buf = self._buf, b""
        else:
            data, self._buf = self._buf[:n], self._buf[n:]
        self.consumed += len(data)
        return data


class Trickle:
    """A stream over `data` whose reads return at most a few bytes (short reads are legal)."""

    def __init__(self, data: bytes, sizes: Sequence[int] = (1, 7, 300, 2, 511, 513)) -> None:
        self._data = data
        self._pos = 0
        self._sizes = sizes
        self._i = 0

    def read(self, n: int = -1) -> bytes:
        step = self._sizes[self._i % len(self._sizes)]
        self._i += 1
        n = step if n < 0 else min(n, step)
        data = self._data[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos
