"""What a rootless store records instead of making it, and how a tar gets it back.

An unprivileged user (or root of a user namespace) cannot give a file an unmapped owner, make a
device node or set a `trusted.*` xattr. A rootless store keeps the file and records the rest:

- `user.containers.override_stat` = `uid:gid:%04o[:type]` on a regular file or dir: the owner,
  mode and file type the image has (the containers/storage format that fuse-overlayfs and
  podman read; type `file|dir|symlink|pipe|socket|block-M-m|char-M-m`). A device node becomes
  an empty regular file with type `char-M-m` or `block-M-m`.
- `user.ocilayers.xattr.<name>` on a file or dir: an xattr that could not be set as `<name>`,
  and an image's own xattr whose name is one of these two (so it is never taken for a record).
- the layer's side record, `overlay2/<id>/override_stat.json` beside `diff/`, for what cannot
  carry a user.* xattr (symlinks, fifos, sockets): `{"version": 1, "entries": {path:
  {"stat": "uid:gid:mode:type", "xattrs": {name: base64 value}}}}`.

`restore` turns a tar entry made from such a file back into what the image had; a layer tar
never carries a record. `security.capability` always leaves as a v2 value."""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

from ocilayers.errors import ImageError
from ocilayers.tarstream import BLK, CHR, DIR, FIFO, REG, SYM, TarEntry

OVERRIDE_XATTR = "user.containers.override_stat"
RECORD_PREFIX = "user.ocilayers.xattr."
SIDE_RECORD = "override_stat.json"
CAPABILITY = "security.capability"
_S_ISDIR, _S_ISREG = stat.S_ISDIR, stat.S_ISREG

_KINDS = {REG: "file", DIR: "dir", SYM: "symlink", FIFO: "pipe"}
_DEVICE_KINDS = {CHR: "char", BLK: "block"}
_TYPES = {v: k for k, v in {**_KINDS, **_DEVICE_KINDS}.items()}

# linux/capability.h: the revision in the first le32; v3 adds the namespace's root uid.
_CAP_REVISION_MASK = 0xFF000000
_CAP_V2, _CAP_V3 = 0x02000000, 0x03000000
_CAP_V2_SIZE, _CAP_V3_SIZE = 20, 24


@dataclass(frozen=True)
class Override:
    """An entry's recorded owner, mode (permission bits with setuid/setgid/sticky) and type
    (None when the record has none; "char"/"block" carry the device numbers)."""

    uid: int
    gid: int
    mode: int
    kind: str | None = None
    major: int = 0
    minor: int = 0

    def encode(self) -> bytes:
        text = f"{self.uid}:{self.gid}:{self.mode & 0o7777:04o}"
        if self.kind in ("char", "block"):
            text += f":{self.kind}-{self.major}-{self.minor}"
        elif self.kind:
            text += f":{self.kind}"
        return text.encode()

    @classmethod
    def decode(cls, value: bytes | str, where: str = "") -> Override:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        parts = text.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            uid, gid, mode = int(parts[0]), int(parts[1]), int(parts[2], 8)
            kind, major, minor = (parts[3] if len(parts) == 4 else None), 0, 0
            if kind and kind.startswith(("char-", "block-")):
                kind, smajor, sminor = kind.split("-")
                major, minor = int(smajor), int(sminor)
            if kind not in (None, "file", "dir", "symlink", "pipe", "socket", "char",
                            "block") or min(uid, gid, mode, major, minor) < 0:
                raise ValueError
        except ValueError:
            raise ImageError(f"{where or 'override'}: bad {OVERRIDE_XATTR} value "
                             f"{text!r}") from None
        return cls(uid, gid, mode & 0o7777, kind, major, minor)

    @classmethod
    def of(cls, entry: TarEntry) -> Override:
        """What `entry` has, as a record (a hardlink's or a regular file's type is "file")."""
        kind = _DEVICE_KINDS.get(entry.type) or _KINDS.get(entry.type, "file")
        return cls(entry.uid, entry.gid, entry.mode & 0o7777, kind, entry.devmajor,
                   entry.devminor)


def record_name(name: str) -> str:
    """The user.* xattr that stands for the xattr `name` where it cannot be itself."""
    return RECORD_PREFIX + name


def is_reserved(name: str) -> bool:
    """An image's own xattr with one of our record names: stored as a record of itself."""
    return name == OVERRIDE_XATTR or name.startswith(RECORD_PREFIX)


def cap_to_v2(value: bytes) -> bytes:
    """A v3 `security.capability` (with the namespace's root uid) as the v2 value a layer
    carries; any other value unchanged."""
    if len(value) == _CAP_V3_SIZE:
        (magic,) = struct.unpack_from("<I", value)
        if magic & _CAP_REVISION_MASK == _CAP_V3:
            flags = magic & ~_CAP_REVISION_MASK
            return struct.pack("<I", _CAP_V2 | flags) + value[4:_CAP_V2_SIZE]
    return value


class SideRecord:
    """A layer's records for entries that cannot carry a user.* xattr, by path (no leading /,
    as the tar names it)."""

    def __init__(self, entries: dict[str, dict[str, Any]] | None = None) -> None:
        self.entries: dict[str, dict[str, Any]] = entries or {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SideRecord) and other.entries == self.entries

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SideRecord({self.entries!r})"

    def set_stat(self, path: bytes, override: Override) -> None:
        self._at(path)["stat"] = override.encode().decode()

    def set_xattr(self, path: bytes, name: str, value: bytes) -> None:
        self._at(path).setdefault("xattrs", {})[name] = base64.b64encode(value).decode()

    def _at(self, path: bytes) -> dict[str, Any]:
        return self.entries.setdefault(os.fsdecode(path.rstrip(b"/")), {})

    def drop(self, path: bytes) -> None:
        """Forget `path` and everything below it (it was removed from the layer)."""
        key = os.fsdecode(path.rstrip(b"/"))
        prefix = key + "/"
        for k in [k for k in self.entries if k == key or k.startswith(prefix)]:
            del self.entries[k]

    def lookup(self, path: bytes) -> tuple[Override | None, dict[str, bytes]]:
        rec = self.entries.get(os.fsdecode(path.rstrip(b"/")))
        if not rec:
            return None, {}
        where = os.fsdecode(path)
        ov = Override.decode(rec["stat"], where) if "stat" in rec else None
        xattrs = {k: base64.b64decode(v) for k, v in rec.get("xattrs", {}).items()}
        return ov, xattrs

    def dump(self) -> bytes:
        return json.dumps({"version": 1, "entries": self.entries}, sort_keys=True,
                          separators=(",", ":")).encode()

    def save(self, layer_dir: str) -> None:
        """Write `<layer_dir>/override_stat.json` (only when there is something to record)."""
        if self.entries:
            with open(os.path.join(layer_dir, SIDE_RECORD), "xb") as f:
                f.write(self.dump())

    @classmethod
    def load(cls, layer_dir: str) -> SideRecord:
        path = os.path.join(layer_dir, SIDE_RECORD)
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return cls()
        except ValueError:
            raise ImageError(f"{path}: corrupt (not JSON)") from None
        if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(
                doc.get("entries"), dict):
            raise ImageError(f"{path}: not a version 1 side record")
        return cls(doc["entries"])


def take_records(xattrs: dict[str, bytes], side: SideRecord | None,
                 path: bytes) -> tuple[Override | None, dict[str, bytes]]:
    """Take an entry's records out of `xattrs` (as read from disk at `path`, the layer's own
    name for it): its override (the xattr, else the side record's) and the xattrs recorded for
    it (`user.ocilayers.xattr.*`, then the side record's), under their own names."""
    ov = None
    recorded: dict[str, bytes] = {}
    if xattrs:
        raw = xattrs.pop(OVERRIDE_XATTR, None)
        if raw is not None:
            ov = Override.decode(raw, path.decode("utf-8", "backslashreplace"))
        for name in [n for n in xattrs if n.startswith(RECORD_PREFIX)]:
            recorded[name[len(RECORD_PREFIX):]] = xattrs.pop(name)
    if side:
        side_ov, side_x = side.lookup(path)
        ov = ov or side_ov
        recorded.update(side_x)
    return ov, recorded


def restore(entry: TarEntry, side: SideRecord | None = None,
            made_by: tuple[int, int] | None = None) -> bool:
    """Give `entry` (made from a file on disk, xattrs as read) back what was recorded: owner
    and type from the override (the xattr, else the side record), recorded xattrs under their
    own names, a v2 capability. The mode is the disk's (records are made with the recorded
    mode, so a difference is a later chmod); the owner is the disk's where it is not
    `made_by` (default: this process's euid and egid, the ids records are made beside).
    Returns True when a recorded device replaced a regular file (the entry then has no
    data)."""
    if made_by is None:
        made_by = (os.geteuid(), os.getegid())
    ov, recorded = take_records(entry.xattrs, side, entry.name)
    entry.xattrs.update(recorded)
    if CAPABILITY in entry.xattrs:
        entry.xattrs[CAPABILITY] = cap_to_v2(entry.xattrs[CAPABILITY])
    if entry.xattrs:
        entry.xattrs = dict(sorted(entry.xattrs.items()))
    if ov is None:
        return False
    # A record is made beside a file owned by whoever made it (this user: root of its
    # namespace) with the recorded mode. What differs from that on disk now was changed
    # after, by a build step (the kernel copies the record up with the file): the disk wins.
    # (So a step's chmod reaches a commit. A chown to the maker's own ids cannot be told from
    # no chown: the record wins, as the image had it.)
    if (entry.uid, entry.gid) == made_by:
        entry.uid, entry.gid = ov.uid, ov.gid
    if ov.kind in ("char", "block") and entry.type == REG:
        entry.type = _TYPES[ov.kind]
        entry.devmajor, entry.devminor, entry.size = ov.major, ov.minor, 0
        return True
    return False


def complete_layer(root_fd: int) -> bool:
    """Give every file and dir of a diff dir a record once any has one, and its root dir one:
    fuse-overlayfs reads records only in a layer whose root has one, and then fails (ENODATA)
    on a file or dir without. A layer without records stays without. Returns whether it has
    records."""
    base = f"/proc/self/fd/{root_fd}".encode()
    lacking: list[tuple[bytes, os.stat_result]] = []
    has = False
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(base + rel) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if not (_S_ISDIR(st.st_mode) or _S_ISREG(st.st_mode)):
                    continue
                path = rel + b"/" + e.name
                if _S_ISDIR(st.st_mode):
                    stack.append(path)
                if _has_record(base + path):
                    has = True
                else:
                    lacking.append((path, st))
    if not has:
        return False
    for path, st in lacking:
        kind = "dir" if _S_ISDIR(st.st_mode) else "file"
        os.setxattr(base + path, OVERRIDE_XATTR,
                    Override(st.st_uid, st.st_gid, st.st_mode & 0o7777, kind).encode(),
                    follow_symlinks=False)
    if not _has_record(root_fd):
        st = os.fstat(root_fd)
        os.setxattr(root_fd, OVERRIDE_XATTR, Override(0, 0, st.st_mode & 0o7777, "dir").encode())
    return True


def _has_record(path: int | bytes) -> bool:
    try:
        if isinstance(path, int):
            os.getxattr(path, OVERRIDE_XATTR)
        else:
            os.getxattr(path, OVERRIDE_XATTR, follow_symlinks=False)
    except OSError:
        return False
    return True
