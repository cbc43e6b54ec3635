"""Tar entries read from a stream with their raw header bytes kept (tar-split), and written back.

Every byte of the archive passes either through `on_raw` (header blocks, extension headers,
padding, the end-of-archive blocks) or through the entry's data; nothing is buffered beyond one
chunk, so memory does not depend on layer size.
"""

from __future__ import annotations

import posixpath
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from zlib import adler32

from ocilayers.errors import TarError, UpperDirError

BLOCK = 512
_CHUNK = 1 << 20
# Cap on the extension headers (PAX, GNU long names) before one entry, all of them together:
# hostile input must not balloon memory, one header at a time or with a chain of them.
_MAX_EXT = 16 << 20
_MAX_ID = (1 << 32) - 2  # uid_t/gid_t; (uid_t)-1 would tell chown "leave it as it is"
_NS_RANGE = range(-(1 << 63), 1 << 63)  # mtimes the kernel's timespec takes, in nanoseconds

REG = b"0"
AREG = b"\0"
LNK = b"1"
SYM = b"2"
CHR = b"3"
BLK = b"4"
DIR = b"5"
FIFO = b"6"
CONT = b"7"
PAX = b"x"
PAX_GLOBAL = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
GNU_SPARSE = b"S"
GNU_VOLHDR = b"V"
GNU_MULTIVOL = b"M"
_EXTENSIONS = (PAX, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK, GNU_VOLHDR)

TYPE_NAMES = {REG: "file", AREG: "file", CONT: "file", LNK: "hardlink", SYM: "symlink",
              CHR: "char device", BLK: "block device", DIR: "directory", FIFO: "fifo"}


@dataclass(slots=True)
class TarEntry:
    """One archive member, as its headers describe it. Names are raw bytes (not always UTF-8)."""

    name: bytes
    type: bytes
    mode: int = 0o644  # permission bits incl. setuid/setgid/sticky, without type bits
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    uname: str = ""
    gname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[bytes, bytes] = field(default_factory=dict)
    raw: bytes = b""  # every header block of this entry, extension headers included

    @property
    def is_file(self) -> bool:
        return self.type in (REG, AREG, CONT)

    @property
    def is_dir(self) -> bool:
        return self.type == DIR

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type!r}")

    @property
    def display_name(self) -> str:
        return self.name.decode("utf-8", "backslashreplace")


def parse_number(field_bytes: bytes, what: str = "number") -> int:
    """Octal (NUL/space padded), or base-256 when the top bit of the first byte is set."""
    if field_bytes and field_bytes[0] & 0x80:
        value = int.from_bytes(field_bytes[1:], "big")
        if field_bytes[0] == 0xFF:  # negative, two's complement
            value -= 1 << (8 * (len(field_bytes) - 1))
        elif field_bytes[0] != 0x80:
            value |= (field_bytes[0] & 0x7F) << (8 * (len(field_bytes) - 1))
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    if text.strip(b"01234567"):  # int() would also take signs, "0o" and underscores
        raise TarError(f"invalid {what} field {field_bytes!r} in tar header")
    return int(text, 8)


# mode, uid, gid, size, mtime and checksum as Go, GNU tar, bsdtar and Python write them:
# zero-padded octal ending in NUL (the checksum in NUL, space). Such a header takes the fast
# path (int() on the digits, nothing to validate); anything else goes through parse_number.
_CANONICAL_NUMBERS = re.compile(rb"(?:[0-7]{7}\0){3}(?:[0-7]{11}\0){2}[0-7]{6}\0 ")


def _ignore(_data: bytes) -> None:
    pass


# A USTAR header's fields, in order (the last 12 bytes are padding).
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_FAST_TYPES = frozenset((REG, AREG, DIR, SYM, LNK))


def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _checksum_ok(block: bytes, stored: int) -> bool:
    """Does `stored` match the header's byte sum, the checksum field counted as spaces?"""
    # adler32's low half is 1 + the byte sum mod 65521: exact for 256 bytes (at most 65280),
    # and a C loop where sum() makes an int per byte.
    unsigned = ((adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
                - sum(block[148:156]) + 8 * 32)
    if stored == unsigned:
        return True
    # Some old tars summed signed chars (POSIX and GNU accept both).
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 32
    return stored == signed


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """PAX extended header records: `"%d %s=%s\\n"`, the length counting the whole record."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the payload with NULs
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise TarError("invalid PAX record")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise TarError("invalid PAX record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise TarError("invalid PAX record")
        record = data[sp + 1:end - 1]
        key, eq, value = record.partition(b"=")
        if not eq:
            raise TarError("invalid PAX record (no '=')")
        out[key] = value
        pos = end
    return out


class TarReader:
    """Iterates a tar stream. Read an entry's data (if any) before asking for the next entry.

    `on_raw(bytes)` receives every byte that is not entry data, in order. Iteration stops at the
    end-of-archive marker (or a clean EOF at an entry boundary); the stream is not read further.
    """

    def __init__(self, stream: object, on_raw: Callable[[bytes], None] | None = None) -> None:
        self._read: Callable[[int], bytes] = stream.read  # type: ignore[attr-defined]
        self._read_view: Callable[[int], bytes | memoryview] = getattr(
            stream, "read_view", self._read)
        self._on_raw = on_raw
        # every byte that is not entry data goes here (bound once: no frame per call)
        self._raw: Callable[[bytes], object] = on_raw if on_raw is not None else _ignore
        self._left = 0  # data bytes of the current entry not yet consumed
        self._pad = 0  # padding after them
        self._pad_after_global = 0
        self.ended_cleanly = False  # saw the end-of-archive blocks

    # -- low level --

    def _exact(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) == n:
            return data
        parts = [data]
        got = len(data)
        while got < n:
            more = self._read(n - got)
            if not more:
                raise TarError(f"archive is truncated ({what})")
            parts.append(more)
            got += len(more)
        return b"".join(parts)


    def read_data(self, n: int = _CHUNK) -> bytes:
        """Up to `n` bytes of the current entry's data; b"" once it is all read."""
        return self._take(self._read, n)  # type: ignore[return-value]

    def read_data_view(self, n: int = _CHUNK) -> bytes | memoryview:
        """`read_data(n)`, but maybe a view of the stream's chunk at hand instead of a copy
        (it keeps that chunk alive): for data on its way to a write or a checksum."""
        return self._take(self._read_view, n)

    def _take(self, read: Callable[[int], bytes | memoryview], n: int) -> bytes | memoryview:
        left = self._left
        if left <= 0:
            return b""
        data = read(n if n < left else left)
        if not data:
            raise TarError("archive is truncated (entry data)")
        self._left = left - len(data)
        return data

    def skip_data(self) -> None:
        while self._left > 0:
            self.read_data()

    @property
    def data_left(self) -> int:
        """Bytes of the current entry's data not read yet."""
        return self._left

    def data_elsewhere(self) -> None:
        """The stream does not hold the current entry's data (tar-split's segments, where a
        file record stands for it): go on to its padding as if the data was read."""
        self._left = 0

    def _finish_entry(self) -> None:
        if self._left > 0:
            self.skip_data()
        if self._pad:
            got = self._read(self._pad)
            if len(got) == self._pad:  # the usual case: the whole padding at once
                self._raw(got)
                self._pad = 0
                return
            # The last entry's padding may be missing altogether (umoci 0.4.7 `insert` writes
            # such layers; dockerd and umoci read them): EOF here is a clean end.
            while len(got) < self._pad:
                more = self._read(self._pad - len(got))
                if not more:
                    break
                got += more
            if got:
                self._raw(got)
            self._pad = 0

    def _payload(self, size: int, raw: list[bytes], what: str) -> bytes:
        padded = -(-size // BLOCK) * BLOCK
        data = self._exact(padded, what)
        raw.append(data)
        return data[:size]

    # -- entries --

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            self._finish_entry()
            entry = self._next_header()
            if entry is None:
                return
            self._left = (entry.size if entry.type not in (LNK, SYM, DIR, CHR, BLK, FIFO,
                                                           PAX_GLOBAL) else 0)
            self._pad = (-self._left) % BLOCK
            if entry.type == PAX_GLOBAL:
                self._pad = self._pad_after_global
            yield entry

    def _next_header(self) -> TarEntry | None:
        block = self._read(BLOCK)
        if len(block) == BLOCK and block[156:157] in _FAST_TYPES:
            entry = self._fast_entry(block)
            if entry is not None:
                return entry
        return self._slow_header(block)

    def _fast_entry(self, block: bytes) -> TarEntry | None:
        """The usual header, alone: a file, dir, symlink or hardlink in USTAR (or old GNU)
        form with canonical octal numbers and no extension header before it. None for
        anything else (then the general path decides, errors included)."""
        if _CANONICAL_NUMBERS.match(block, 100) is None:
            return None
        if not _checksum_ok(block, int(block[148:154], 8)):
            return None
        (name, mode, uid, gid, size, mtime, _sum, typeflag, linkname, magic, _version,
         uname, gname, _major, _minor, prefix) = _USTAR.unpack(block)
        name = name.partition(b"\0")[0]
        if magic == b"ustar\0" and prefix[0]:
            name = prefix.partition(b"\0")[0] + b"/" + name
        if not name:
            return None
        self._raw(block)
        return TarEntry(name, typeflag, int(mode[:7], 8) & 0o7777, int(uid[:7], 8),
                        int(gid[:7], 8), int(size[:11], 8), int(mtime[:11], 8) * 1_000_000_000,
                        linkname.partition(b"\0")[0] if linkname[0] else b"", 0, 0,
                        uname.partition(b"\0")[0].decode("utf-8", "replace") if uname[0] else "",
                        gname.partition(b"\0")[0].decode("utf-8", "replace") if gname[0] else "",
                        {}, {}, block)

    def _slow_header(self, block: bytes) -> TarEntry | None:
        raw: list[bytes] = []
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        held = 0  # bytes of extension headers read for this entry
        first = True
        while True:
            if not first:
                block = self._read(BLOCK)
            first = False
            if len(block) < BLOCK:
                if not block:
                    if raw:
                        raise TarError("archive is truncated (extension header without entry)")
                    return None  # clean EOF at an entry boundary: accepted, as dockerd does
                block += self._exact(BLOCK - len(block), "header")
            if block.count(0) == BLOCK:
                if raw:
                    raise TarError("archive is truncated (extension header without entry)")
                self._raw(block)
                second = self._read(BLOCK)
                if second:
                    if len(second) < BLOCK:
                        second += self._exact(BLOCK - len(second), "end-of-archive")
                    self._raw(second)
                self.ended_cleanly = True
                return None
            canonical = _CANONICAL_NUMBERS.match(block, 100) is not None
            stored = (int(block[148:154], 8) if canonical
                      else parse_number(block[148:156], "checksum"))
            if not _checksum_ok(block, stored):
                raise TarError("invalid tar header checksum")
            if canonical:
                size = int(block[124:135], 8)
            else:
                size = parse_number(block[124:136], "size")
                if size < 0:
                    raise TarError("negative size in tar header")
            raw.append(block)
            typeflag = block[156:157]
            if typeflag in _EXTENSIONS:
                held += BLOCK + size
                if held > _MAX_EXT:
                    raise TarError(f"extension headers too large: over {_MAX_EXT >> 20} MiB "
                                   "before one entry")
            if typeflag == PAX:
                pax.update(parse_pax(self._payload(size, raw, "PAX header")))
                continue
            if typeflag == PAX_GLOBAL:
                # Go's reader returns a global header as an entry of its own (so tar-split
                # records it); its padding is read with the next header. Appliers skip it.
                raw.append(self._exact(size, "PAX global header"))
                name = _cstr(block[0:100])
                raw_bytes = b"".join(raw)
                self._raw(raw_bytes)
                entry = TarEntry(name=name or b"././@PaxHeader", type=PAX_GLOBAL, size=0,
                                 raw=raw_bytes)
                entry.pax = parse_pax(raw[-1])
                self._pad_after_global = (-size) % BLOCK
                return entry
            if typeflag == GNU_LONGNAME:
                long_name = _cstr(self._payload(size, raw, "GNU long name"))
                continue
            if typeflag == GNU_LONGLINK:
                long_link = _cstr(self._payload(size, raw, "GNU long link name"))
                continue
            if typeflag == GNU_VOLHDR:
                self._payload(size, raw, "volume header")
                raw_bytes = b"".join(raw)
                raw.clear()
                self._raw(raw_bytes)
                pax.clear()
                continue
            return self._make_entry(block, typeflag, size, pax, long_name, long_link, raw,
                                    canonical)

    def _make_entry(self, block: bytes, typeflag: bytes, size: int, pax: dict[bytes, bytes],
                    long_name: bytes | None, long_link: bytes | None,
                    raw: list[bytes], canonical: bool = False) -> TarEntry:
        if typeflag in (GNU_SPARSE, GNU_MULTIVOL) or (
                pax and any(k.startswith(b"GNU.sparse.") for k in pax)):
            raise TarError("sparse and multi-volume tar entries are not supported")
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:  # ustar: a prefix extends the name
            prefix = _cstr(block[345:500])
            name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        if long_link is not None:
            linkname = long_link
        elif block[157] == 0:
            linkname = b""
        else:
            linkname = _cstr(block[157:257])
        if canonical:
            mode = int(block[100:107], 8) & 0o7777
            uid = int(block[108:115], 8)
            gid = int(block[116:123], 8)
            mtime_ns = int(block[136:147], 8) * 1_000_000_000
        else:
            mode = parse_number(block[100:108], "mode") & 0o7777
            uid = parse_number(block[108:116], "uid")
            gid = parse_number(block[116:124], "gid")
            mtime_ns = parse_number(block[136:148], "mtime") * 1_000_000_000
        if typeflag in (CHR, BLK):
            devmajor = parse_number(block[329:337], "devmajor")
            devminor = parse_number(block[337:345], "devminor")
        else:
            devmajor = devminor = 0
        uname = _cstr(block[265:297]).decode("utf-8", "replace")
        gname = _cstr(block[297:329]).decode("utf-8", "replace")
        xattrs: dict[str, bytes] = {}
        if pax:
            name = pax.get(b"path", name)
            linkname = pax.get(b"linkpath", linkname)
            try:
                if b"size" in pax:
                    size = int(pax[b"size"])
                if b"uid" in pax:
                    uid = int(pax[b"uid"])
                if b"gid" in pax:
                    gid = int(pax[b"gid"])
                if b"mtime" in pax:
                    mtime_ns = _pax_time_ns(pax[b"mtime"])
            except ValueError:
                raise TarError("invalid numeric PAX record") from None
            if size < 0 or uid < 0 or gid < 0:
                raise TarError("negative size or id in PAX header")
            for key, value in pax.items():
                if key.startswith(b"SCHILY.xattr."):
                    xattrs[key[13:].decode("utf-8", "surrogateescape")] = value
        if not name:
            raise TarError("tar entry with an empty name")
        if pax or not canonical or typeflag in (CHR, BLK):
            # (Canonical octal fields are in range, and names cut at their first NUL.)
            _check_fields(name, linkname, uid, gid, mtime_ns, devmajor, devminor, xattrs)
        raw_bytes = b"".join(raw)
        self._raw(raw_bytes)
        return TarEntry(name=name, type=typeflag, mode=mode, uid=uid, gid=gid, size=size,
                        mtime_ns=mtime_ns, linkname=linkname, devmajor=devmajor,
                        devminor=devminor, uname=uname, gname=gname, xattrs=xattrs, pax=pax,
                        raw=raw_bytes)


def _check_fields(name: bytes, linkname: bytes, uid: int, gid: int, mtime_ns: int,
                  devmajor: int, devminor: int, xattrs: dict[str, bytes]) -> None:
    """Refuse what no file system can hold, before anything is made of it."""
    shown = name.decode("utf-8", "backslashreplace")
    if b"\0" in name or b"\0" in linkname or (xattrs and any("\0" in k for k in xattrs)):
        raise TarError(f"'{shown}': NUL byte in the entry's name, link name or an xattr name")
    if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
        raise TarError(f"'{shown}': owner {uid}:{gid} is out of range")
    if mtime_ns not in _NS_RANGE:
        raise TarError(f"'{shown}': mtime is out of range")
    if not (0 <= devmajor < 1 << 32 and 0 <= devminor < 1 << 32):
        raise TarError(f"'{shown}': device number {devmajor},{devminor} is out of range")


def _pax_time_ns(value: bytes) -> int:
    text = value.decode("ascii")
    neg = text.startswith("-")
    if neg:
        text = text[1:]
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(text)
    ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    return -ns if neg else ns


# --- writing: Go archive/tar's header dialect, as `docker commit` emits it ---

_NAME_SIZE = 100


def _fits_octal(width: int, value: int) -> bool:
    return 0 <= value < 1 << (3 * (width - 1))


_OCT8 = 1 << 21  # the first value _fits_octal(8, ...) refuses (mode, ids, devices)
_OCT12 = 1 << 33  # the same for a 12-byte field (size, mtime)


def _fmt_octal(width: int, value: int) -> bytes:
    """Go's formatter.formatOctal: zero-padded octal leaving room for a NUL; 0 if it won't fit
    (the value then travels in a PAX record)."""
    if not _fits_octal(width, value):
        value = 0
    s = format(value, "o").encode()
    pad = width - len(s) - 1
    if pad > 0:
        s = b"0" * pad + s
    return _fmt_str(width, s)


def _fmt_str(width: int, s: bytes) -> bytes:
    """Go's formatter.formatString: NUL-padded; a value cut short must not end in '/' (buggy
    readers would take a file for a dir), so the cut's trailing slashes become NULs."""
    if len(s) <= width:
        return s + b"\0" * (width - len(s))
    head = s[:width]
    if head.endswith(b"/"):
        n = len(s[: width - 1].rstrip(b"/"))
        head = head[:n] + b"\0" + head[n + 1:]
    return head


def _to_ascii(b: bytes) -> bytes:
    if b.isascii():  # nearly always: a C check instead of a per-byte generator
        return b
    return bytes(c for c in b if c < 0x80)


def _pax_record(key: bytes, value: bytes) -> bytes:
    if b"=" in key:  # the first "=" ends the key: "user.a=b" would come back as another xattr
        raise UpperDirError(f"cannot write {key.decode('utf-8', 'backslashreplace')!r} in a tar "
                         "PAX record: the name holds an '='")
    size = len(key) + len(value) + 3
    size += len(str(size))
    record = b"%d %s=%s\n" % (size, key, value)
    if len(record) != size:
        size = len(record)
        record = b"%d %s=%s\n" % (size, key, value)
    return record


_PREFIX_SIZE = 155


def _split_ustar_path(name: bytes) -> tuple[bytes, bytes] | None:
    """Go's splitUSTARPath: (prefix, name) for a long ASCII path that fits ustar's two fields."""
    length = len(name)
    if length <= _NAME_SIZE or not name.isascii():
        return None
    if length > _PREFIX_SIZE + 1:
        length = _PREFIX_SIZE + 1
    elif name[length - 1:length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    nlen = len(name) - i - 1
    if i <= 0 or nlen > _NAME_SIZE or nlen == 0 or i > _PREFIX_SIZE:
        return None
    return name[:i], name[i + 1:]


_MAGIC_TO_DEV = b"ustar\x0000" + b"\0" * 64  # magic, version, empty uname and gname
_AFTER_DEV = b"\0" * 167  # prefix and the block's padding
_CHKSUM_BLANK = 8 * ord(" ")


def _block(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typeflag: bytes,
           linkname: bytes = b"", devmajor: int = 0, devminor: int = 0, prefix: bytes = b"",
           dev_fields: bool = True) -> bytes:
    if (len(name) <= 100 and len(linkname) <= 100 and not prefix and dev_fields
            and 0 <= mode < _OCT8 and 0 <= uid < _OCT8 and 0 <= gid < _OCT8
            and 0 <= size < _OCT12 and 0 <= mtime < _OCT12
            and 0 <= devmajor < _OCT8 and 0 <= devminor < _OCT8):
        # Every field as it is (nearly every header): one format each side of the checksum,
        # the same bytes as the general way below.
        head = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0" % (name.ljust(100, b"\0"), mode, uid,
                                                        gid, size, mtime)
        tail = b"%s%s%s%07o\0%07o\0%s" % (typeflag, linkname.ljust(100, b"\0"), _MAGIC_TO_DEV,
                                          devmajor, devminor, _AFTER_DEV)
        # adler32's low half is 1 + the byte sum mod 65521, in C: exact here, as neither
        # side can sum to 65521 (head: 148 bytes; tail: at most 101 bytes above 0x7f).
        chksum = (adler32(head) & 0xFFFF) + (adler32(tail) & 0xFFFF) - 2 + _CHKSUM_BLANK
        return b"%s%06o\0 %s" % (head, chksum, tail)
    b = bytearray(BLOCK)
    b[0:100] = _fmt_str(100, name)
    b[100:108] = _fmt_octal(8, mode)
    b[108:116] = _fmt_octal(8, uid)
    b[116:124] = _fmt_octal(8, gid)
    b[124:136] = _fmt_octal(12, size)
    b[136:148] = _fmt_octal(12, mtime)
    b[156:157] = typeflag
    b[157:257] = _fmt_str(100, linkname)
    b[257:263] = b"ustar\0"
    b[263:265] = b"00"
    if dev_fields:  # Go's writeRawFile (extended headers) leaves them NUL
        b[329:337] = _fmt_octal(8, devmajor)
        b[337:345] = _fmt_octal(8, devminor)
    if prefix:
        b[345:500] = _fmt_str(155, prefix)
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def encode_header(entry: TarEntry, *, pax_format: bool = True, type_bits: int = 0,
                  exact_mtime: bool = False) -> bytes:
    """Header block(s) for `entry`, as Go's archive/tar writes them (moby sets FormatPAX).

    Mode carries `type_bits` (Docker puts the file-type bits in the mode field). PAX records
    appear only when needed: long or non-ASCII names, big or negative numbers, xattrs; the
    extended header is named `<dir>/PaxHeaders.0/<base>`. mtime is whole seconds, unless
    `exact_mtime` (a PAX `mtime` record keeps the nanoseconds)."""
    mtime = entry.mtime_ns // 1_000_000_000  # floor, as Go's Time.Truncate(time.Second)
    path, link = entry.name, entry.linkname
    if (not entry.xattrs and len(path) <= _NAME_SIZE and len(link) <= _NAME_SIZE
            and path.isascii() and link.isascii() and 0 <= entry.uid < _OCT8
            and 0 <= entry.gid < _OCT8 and 0 <= entry.size < _OCT12 and 0 <= mtime < _OCT12
            and not (exact_mtime and entry.mtime_ns % 1_000_000_000)):
        # No PAX record needed (nearly every entry): the checks below, all at once.
        return _block(path, entry.mode | type_bits, entry.uid, entry.gid, entry.size, mtime,
                      entry.type, link, entry.devmajor, entry.devminor)
    pax: dict[bytes, bytes] = {}
    ustar_ok = True  # Go picks USTAR whenever the header fits it (moby's FormatPAX allows it)

    def long_str(value: bytes, key: bytes) -> None:
        nonlocal ustar_ok
        if len(value) > _NAME_SIZE or not value.isascii():
            pax[key] = value
            if key != b"path" or _split_ustar_path(value) is None:
                ustar_ok = False

    long_str(entry.name, b"path")
    long_str(entry.linkname, b"linkpath")
    for key, number, width in ((b"uid", entry.uid, 8), (b"gid", entry.gid, 8),
                               (b"size", entry.size, 12)):
        if not _fits_octal(width, number):
            pax[key] = str(number).encode()
    if not _fits_octal(12, mtime):
        pax[b"mtime"] = str(mtime).encode()
    if exact_mtime and entry.mtime_ns % 1_000_000_000:
        whole, frac = divmod(abs(entry.mtime_ns), 1_000_000_000)
        pax[b"mtime"] = b"%s%d.%09d" % (b"-" if entry.mtime_ns < 0 else b"", whole, frac)
    for name, value in entry.xattrs.items():
        pax[b"SCHILY.xattr." + name.encode("utf-8", "surrogateescape")] = value
    if set(pax) - {b"path"}:
        ustar_ok = False
    if ustar_ok and pax:  # only a long path that splits into prefix + name: plain USTAR
        split = _split_ustar_path(entry.name)
        assert split is not None
        return _block(split[1], entry.mode | type_bits, entry.uid, entry.gid, entry.size,
                      mtime, entry.type, entry.linkname, entry.devmajor, entry.devminor,
                      prefix=split[0])
    if pax and not pax_format:
        raise ValueError(f"'{entry.display_name}' needs PAX records")
    main = _block(_to_ascii(entry.name), entry.mode | type_bits, entry.uid, entry.gid,
                  entry.size, mtime, entry.type, _to_ascii(entry.linkname), entry.devmajor,
                  entry.devminor)
    if not pax:
        return main
    data = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
    # Go: path.Join(path.Split(name)) with "PaxHeaders.0" between: a dir "a/b/" gives
    # "a/b/PaxHeaders.0", a file "a/b" gives "a/PaxHeaders.0/b".
    i = entry.name.rfind(b"/")
    xname = posixpath.normpath(posixpath.join(entry.name[: i + 1], b"PaxHeaders.0",
                                              entry.name[i + 1:]))
    xname = _to_ascii(xname)[:_NAME_SIZE].rstrip(b"/")
    ext = _block(xname, 0, 0, 0, len(data), 0, PAX, dev_fields=False)
    return ext + data + b"\0" * (-len(data) % BLOCK) + main


END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
