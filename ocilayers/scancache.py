"""What a store layer's tar-split records say for growth analysis, kept beside them.

`history` of a store image reads each layer's `tar-split.json.gz` (decompress, parse
every JSON record, classify every header: about 10 µs an entry). A layer never changes once
registered, so the `Entry` values read from it are written once, after the first read, to
`ocilayers-scan.json` in the same layerdb dir, and later reads load them instead: one JSON
document, no header parsing. The file is removed with the layer's dir; dockerd ignores it
(tests/test_docker.py runs dockerd on a store that has them).

It is only ever a copy: it names the tar-split it was made from (inode, size, mtime) and is
used only while that file is the same; anything unreadable, of another format or not
matching is ignored and the records are read again. Header bytes (squash) are never kept."""

from __future__ import annotations

import json
import os

from ocilayers.fsutil import write_atomic
from ocilayers.layerscan import (
    DIR_KIND,
    FILE_KIND,
    HARDLINK_KIND,
    OPAQUE_KIND,
    OTHER_KIND,
    SYMLINK_KIND,
    WHITEOUT_KIND,
    Entry,
)

NAME = "ocilayers-scan.json"
FORMAT = 1
KINDS = frozenset((FILE_KIND, DIR_KIND, SYMLINK_KIND, HARDLINK_KIND, OTHER_KIND, WHITEOUT_KIND,
                   OPAQUE_KIND))


def cache_path(tar_split: str) -> str:
    return os.path.join(os.path.dirname(tar_split), NAME)


def _key(tar_split: str) -> list[int]:
    st = os.stat(tar_split)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")  # (json writes a lone surrogate as \udcXX)


def dump(tar_split: str, entries: list[Entry], tar_size: int) -> bytes:
    """The cache document for the entries read from `tar_split` (which must exist): one list
    per field, in entry order (loads faster than a list per entry)."""
    doc = {"format": FORMAT, "tar_split": _key(tar_split), "tar_size": tar_size,
           "paths": [_text(e.path) for e in entries], "kinds": [e.kind for e in entries],
           "sizes": [e.size for e in entries], "crcs": [e.crc for e in entries],
           "links": [_text(e.link) for e in entries]}
    return json.dumps(doc, separators=(",", ":")).encode()


def save(tar_split: str, entries: list[Entry], tar_size: int) -> None:
    """Write the cache beside `tar_split` (atomically; the caller holds the store lock)."""
    write_atomic(cache_path(tar_split), dump(tar_split, entries, tar_size))


def _all(kind: type, values: object) -> bool:
    return isinstance(values, list) and all(type(v) is kind for v in values)


def load(tar_split: str) -> tuple[list[Entry], int] | None:
    """The entries and tar size cached for `tar_split`, or None (no cache, or one that is
    unreadable, of another format, malformed, or made from another file)."""
    try:
        with open(cache_path(tar_split), "rb") as f:
            doc = json.load(f)
        if (not isinstance(doc, dict) or doc.get("format") != FORMAT
                or doc.get("tar_split") != _key(tar_split)):
            return None
        size, paths, kinds = doc["tar_size"], doc["paths"], doc["kinds"]
        sizes, crcs, links = doc["sizes"], doc["crcs"], doc["links"]
        if (type(size) is not int or size < 0 or not _all(str, paths) or not _all(str, links)
                or not _all(int, sizes) or not _all(int, crcs) or not isinstance(kinds, list)
                or not KINDS.issuperset(kinds)
                or not len(paths) == len(kinds) == len(sizes) == len(crcs) == len(links)):
            return None
        if paths and (min(sizes) < 0 or min(crcs) < 0 or max(crcs) >= 1 << 64):
            return None
        enc = [p.encode("utf-8", "surrogateescape") for p in paths]
        lenc = [x.encode("utf-8", "surrogateescape") if x else b"" for x in links]
        return list(map(Entry, enc, kinds, sizes, crcs, lenc)), size
    except (OSError, ValueError, TypeError, KeyError):
        return None
