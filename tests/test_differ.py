"""differ.py: `write_layer` over synthetic upper dirs, `write_tree_diff`, and `ocilayers pack`.

Upper dirs are built here the way the kernel leaves them (tests/test_pack_real.py does the same
with real overlay mounts): a whiteout is a char 0/0 of mode 0000; those `unlink`/`rmdir` make
are hardlinks of one shared inode that the kernel keeps in the work dir (so even the first has
nlink 2), those `rename` makes (RENAME_WHITEOUT) stand alone (nlink 1), as measured on 6.x;
opaque dirs carry `trusted.overlay.opaque=y` (or `user.`); bookkeeping xattrs (origin, impure,
uuid) sit on copied-up entries.

Headers are checked as raw bytes (offsets of the ustar header, POSIX pax "ustar Interchange
Format"), against what Docker's overlay2 differ writes through Go's archive/tar (see
/work/shared/FACTS.md). Where a Go rule is cited, it is from `archive/tar/writer.go` /
`common.go` and moby `pkg/archive/archive{,_linux}.go`.

Tests skip, with the reason, when a capability probe fails (mknod 0/0, trusted xattrs, ...).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import treecompare as tc
from conftest import assert_one_line_error, requires_tool, run_cli

from ocilayers import api, differ
from ocilayers.differ import PackStats, write_layer, write_tree_diff
from ocilayers.errors import UnsupportedUpperError, UpperDirError
from ocilayers.extract import apply_layer
from ocilayers.tarstream import TarReader
from ocilayers.whiteout import USERXATTR, OverlayFormat

NS = 1_000_000_000
T0 = 1_700_000_000  # every synthetic mtime is T0 + something
EMPTY_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
END = b"\0" * 1024
MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
JSON_KEYS = {"diff_id", "digest", "size", "media_type", "entries", "whiteouts", "opaques"}


# --- capability probes (skip by probing, never by uid) ---

def _whiteout(d: Path) -> None:
    os.mknod(d / "wh", stat.S_IFCHR, os.makedev(0, 0))
    os.link(d / "wh", d / "wh2")


def _devices(d: Path) -> None:
    os.mknod(d / "c", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(d / "b", stat.S_IFBLK | 0o600, os.makedev(7, 0))


def _trusted(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.setxattr(d / "f", "trusted.ocilayers.probe", b"1")
    os.setxattr(d / "f", "trusted.overlay.origin", b"1")


def _user(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.setxattr(d / "f", "user.ocilayers.probe", b"1")


def _selinux(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.setxattr(d / "f", "security.selinux", b"system_u:object_r:etc_t:s0\0")


def _chown(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.chown(d / "f", 3_000_000, 4_000_000)


def _old_mtime(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.utime(d / "f", ns=(-1_500_000_000, -1_500_000_000))
    if os.lstat(d / "f").st_mtime_ns != -1_500_000_000:
        raise OSError("pre-1970 mtime not stored")


PROBES: dict[str, Callable[[Path], None]] = {
    "whiteout": _whiteout, "devices": _devices, "trusted": _trusted, "user": _user,
    "selinux": _selinux, "chown": _chown, "old_mtime": _old_mtime,
}


@pytest.fixture(scope="session")
def caps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    """probe name -> None when it works here, else why not."""
    base = tmp_path_factory.mktemp("differ-probes")
    out: dict[str, str | None] = {}
    for name, fn in PROBES.items():
        d = Path(tempfile.mkdtemp(dir=base))
        try:
            fn(d)
            out[name] = None
        except OSError as exc:
            out[name] = f"{exc}"
        finally:
            shutil.rmtree(d)
    return out


@pytest.fixture
def need(caps: dict[str, str | None]) -> Callable[..., None]:
    def check(*names: str) -> None:
        for name in names:
            if caps[name] is not None:
                pytest.skip(f"probe {name!r} failed here: {caps[name]}")
    return check


# --- building upper dirs like the kernel does ---

def stamp(path: Path | bytes, secs: int, frac_ns: int = 0) -> None:
    """Set atime and mtime (never following a symlink)."""
    t = secs * NS + frac_ns
    os.utime(path, ns=(t, t), follow_symlinks=False)


def write(path: Path, data: bytes = b"", *, mode: int = 0o644, mtime: int = T0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    stamp(path, mtime)
    return path


class Upper:
    """An upper dir under construction, with a kernel-style shared whiteout inode."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # The kernel's shared whiteout lives in the work dir: every whiteout in the upper dir
        # is a link of it, so even the first has nlink > 1.
        self._work = root.parent / (root.name + ".work")
        self._work.mkdir(exist_ok=True)
        self._shared: Path | None = None

    def p(self, rel: str | bytes) -> Path:
        return self.root / os.fsdecode(rel)

    def dir(self, rel: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
        d = self.p(rel)
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, mode)
        return d

    def file(self, rel: str | bytes, data: bytes = b"", *, mode: int = 0o644, mtime: int = T0,
             uid: int = 0, gid: int = 0) -> Path:
        path = self.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        stamp(path, mtime)
        return path

    def whiteout(self, rel: str, *, uid: int = 0, gid: int = 0, mtime: int = T0) -> Path:
        path = self.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._shared is None:
            self._shared = self._work / "whiteout"
            os.mknod(self._shared, stat.S_IFCHR, os.makedev(0, 0))  # mode 0000, like the kernel
        os.link(self._shared, path)
        os.chown(path, uid, gid)
        stamp(path, mtime)
        return path

    def lone_whiteout(self, rel: str, *, mtime: int = T0) -> Path:
        """A whiteout of its own (what a rename leaves at the old name)."""
        path = self.p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
        stamp(path, mtime)
        return path

    def opaque(self, rel: str, ns: str = "trusted") -> Path:
        d = self.p(rel)
        os.setxattr(d, f"{ns}.overlay.opaque", b"y")
        return d

    def stamp_dirs(self, secs: int = T0) -> None:
        """Give every dir (deepest first) a fixed mtime, after its children were made."""
        for dirpath, _dirs, _files in sorted(os.walk(self.root), key=lambda t: -len(t[0])):
            stamp(Path(dirpath), secs)


@pytest.fixture
def upper(tmp_path: Path) -> Upper:
    return Upper(tmp_path / "upper")


# --- reading what came out ---

@dataclass
class Member:
    name: bytes
    type: bytes
    header: bytes  # the main 512-byte header block, raw
    pax_header: bytes | None  # the 'x' header block, raw, when there is one
    pax: dict[bytes, bytes]
    linkname: bytes
    uid: int
    gid: int
    size: int
    mtime: int  # seconds
    xattrs: dict[str, bytes]
    data: bytes = b""
    devmajor: int = 0
    devminor: int = 0

    def field(self, name: str) -> bytes:
        start, end = HEADER_FIELDS[name]
        return self.header[start:end]


HEADER_FIELDS = {
    "name": (0, 100), "mode": (100, 108), "uid": (108, 116), "gid": (116, 124),
    "size": (124, 136), "mtime": (136, 148), "chksum": (148, 156), "typeflag": (156, 157),
    "linkname": (157, 257), "magic": (257, 263), "version": (263, 265), "uname": (265, 297),
    "gname": (297, 329), "devmajor": (329, 337), "devminor": (337, 345), "prefix": (345, 500),
}


def read_members(tar: bytes) -> list[Member]:
    reader = TarReader(io.BytesIO(tar))
    out = []
    for e in reader:
        data = b""
        while chunk := reader.read_data():
            data += chunk
        out.append(Member(
            name=e.name, type=e.type, header=e.raw[-512:],
            pax_header=e.raw[:512] if len(e.raw) > 512 else None, pax=dict(e.pax),
            linkname=e.linkname, uid=e.uid, gid=e.gid, size=e.size,
            mtime=e.mtime_ns // NS, xattrs=dict(e.xattrs), data=data,
            devmajor=e.devmajor, devminor=e.devminor))
    assert reader.ended_cleanly, "no end-of-archive blocks"
    return out


def names(tar: bytes) -> list[bytes]:
    return [m.name for m in read_members(tar)]


def by_name(tar: bytes) -> dict[bytes, Member]:
    members = read_members(tar)
    out = {m.name: m for m in members}
    assert len(out) == len(members), f"duplicate names: {[m.name for m in members]}"
    return out


def octal(value: int, width: int = 8) -> bytes:
    """A numeric header field as Go's formatOctal writes it: zero-padded, NUL-terminated."""
    return format(value, "o").zfill(width - 1).encode() + b"\0"


def pax_record(key: bytes, value: bytes) -> bytes:
    """One POSIX pax record, "%d %s=%s\\n", its length counting its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pack(root: Path | Upper, **kw: Any) -> bytes:
    path = root.root if isinstance(root, Upper) else root
    buf = io.BytesIO()
    write_layer(path, buf, **kw)
    return buf.getvalue()


def pack_stats(root: Path | Upper, **kw: Any) -> tuple[bytes, PackStats]:
    path = root.root if isinstance(root, Upper) else root
    buf = io.BytesIO()
    stats = write_layer(path, buf, **kw)
    return buf.getvalue(), stats


def tarfile_names(tar: bytes) -> list[str]:
    """An independent reader's view (Python's tarfile), names as it decodes them."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:
        return [m.name for m in tf.getmembers()]


# =============================================================================================
# Walk order: Go's filepath.WalkDir, no root entry
# =============================================================================================

def test_walk_order_is_go_walkdir(upper: Upper) -> None:
    # Full-path sorting would put `a-b` before `a/x` ('-' < '/') and `etc.d/` before `etc/a`;
    # WalkDir sorts each dir's names and finishes a dir before its next sibling.
    upper.file("etc/a")
    upper.file("etc.d/b")
    upper.file("a/x")
    upper.file("a-b")
    upper.file("Z")  # 'Z' (0x5a) sorts before every lowercase name
    upper.file("etc/sub/deep/f")
    upper.stamp_dirs()
    assert names(pack(upper)) == [
        b"Z", b"a/", b"a/x", b"a-b", b"etc/", b"etc/a", b"etc/sub/", b"etc/sub/deep/",
        b"etc/sub/deep/f", b"etc.d/", b"etc.d/b",
    ]


def test_no_root_entry_and_dirs_end_in_slash(upper: Upper) -> None:
    upper.dir("d")
    upper.file("f")
    upper.stamp_dirs()
    out = pack(upper)
    assert names(out) == [b"d/", b"f"]
    assert tarfile_names(out) == ["d", "f"]


def test_copied_up_parents_are_entries(upper: Upper, need: Callable[..., None]) -> None:
    need("trusted")
    # `touch /usr/share/doc/new` copies up usr/, usr/share/, usr/share/doc/ (with origin).
    upper.file("usr/share/doc/new", b"n")
    for d in ("usr", "usr/share", "usr/share/doc"):
        os.setxattr(upper.p(d), "trusted.overlay.origin", b"\0\xfb\x1d")
        os.setxattr(upper.p(d), "trusted.overlay.impure", b"y")
    upper.stamp_dirs()
    members = read_members(pack(upper))
    assert [m.name for m in members] == [b"usr/", b"usr/share/", b"usr/share/doc/",
                                         b"usr/share/doc/new"]
    assert all(m.xattrs == {} for m in members)


def test_whiteouts_sort_by_their_on_disk_name(upper: Upper, need: Callable[..., None]) -> None:
    need("whiteout")
    # On disk: ".hidden" < "alpha" < "zeta" (whiteout). Sorting the tar names instead would
    # put ".wh.zeta" first ('.' < 'a').
    upper.file("d/.hidden")
    upper.file("d/alpha")
    upper.whiteout("d/zeta")
    upper.file("d/zz")
    upper.whiteout("b")
    upper.file("a")
    upper.stamp_dirs()
    assert names(pack(upper)) == [b"a", b".wh.b", b"d/", b"d/.hidden", b"d/alpha",
                                  b"d/.wh.zeta", b"d/zz"]


# =============================================================================================
# Whiteouts
# =============================================================================================

@pytest.mark.parametrize("xattrs", ["all", "docker"])
def test_whiteouts_of_one_shared_inode(upper: Upper, need: Callable[..., None],
                                       xattrs: str) -> None:
    need("whiteout")
    upper.file("etc/keep")
    upper.whiteout("etc/issue.net", uid=12, gid=34, mtime=T0 + 5)
    upper.whiteout("usr/bin/pinky")
    upper.whiteout("usr/bin/zz")
    os.chown(upper.p("usr/bin/zz"), 12, 34)  # one inode: the last chown/utime is everyone's
    stamp(upper.p("usr/bin/zz"), T0 + 5)
    upper.stamp_dirs()
    assert os.lstat(upper.p("etc/issue.net")).st_nlink == 4  # 3 + the work dir's

    out, stats = pack_stats(upper, xattrs=xattrs)
    members = by_name(out)
    wh = [members[n] for n in (b"etc/.wh.issue.net", b"usr/bin/.wh.pinky", b"usr/bin/.wh.zz")]
    for m in wh:
        assert m.type == b"0", (m.name, m.type)  # a regular file, never a hardlink (type 1)
        assert m.size == 0 and m.data == b""
        assert m.field("mode") == b"0000600\0"  # mode 0600 without file-type bits
        assert (m.uid, m.gid) == (12, 34)
        assert m.mtime == T0 + 5
        assert m.devmajor == 0 and m.devminor == 0
    # `docker commit` leaves the first whiteout's on-disk path as a stray linkname on the later
    # ones (type stays 0, readers ignore it); only the Docker dialect reproduces it.
    if xattrs == "docker":
        assert [m.linkname for m in wh] == [b"", b"etc/issue.net", b"etc/issue.net"]
    else:
        assert [m.linkname for m in wh] == [b"", b"", b""]
    assert stats.whiteouts == 3
    assert stats.hardlinks == 0
    assert b"usr/bin/pinky" not in members and b"etc/issue.net" not in members


def test_lone_whiteouts_carry_no_linkname(upper: Upper, need: Callable[..., None]) -> None:
    need("whiteout")
    upper.lone_whiteout("a/renamed-away")
    upper.whiteout("b/deleted")
    upper.lone_whiteout("c/renamed-too")
    upper.whiteout("d/deleted-too")
    upper.stamp_dirs()
    members = by_name(pack(upper, xattrs="docker"))
    assert {n: m.linkname for n, m in members.items() if b".wh." in n} == {
        b"a/.wh.renamed-away": b"", b"b/.wh.deleted": b"", b"c/.wh.renamed-too": b"",
        b"d/.wh.deleted-too": b"b/deleted",
    }


def test_whiteout_not_linked_to_a_regular_hardlink(upper: Upper,
                                                   need: Callable[..., None]) -> None:
    need("whiteout")
    upper.file("a/data", b"payload")
    os.link(upper.p("a/data"), upper.p("a/data2"))
    upper.whiteout("a/gone")
    upper.whiteout("b/gone")
    upper.stamp_dirs()
    members = by_name(pack(upper, xattrs="docker"))
    assert members[b"a/data2"].type == b"1"
    assert members[b"a/data2"].linkname == b"a/data"
    assert members[b"a/.wh.gone"].linkname == b""
    assert members[b"b/.wh.gone"].linkname == b"a/gone"
    assert members[b"b/.wh.gone"].type == b"0"


def test_whiteouts_are_applied_as_whiteouts(upper: Upper, need: Callable[..., None],
                                            tmp_path: Path) -> None:
    need("whiteout", "trusted")
    upper.whiteout("x")
    upper.whiteout("d/y")
    upper.stamp_dirs()
    target = tmp_path / "applied"
    target.mkdir()
    apply_layer(io.BytesIO(pack(upper, xattrs="docker")), target, mode="overlay")
    for rel in ("x", "d/y"):
        st = os.lstat(target / rel)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, rel


# =============================================================================================
# Opaque dirs
# =============================================================================================

@pytest.mark.parametrize("ns", ["trusted", "user"])
def test_opaque_dir_gets_marker_after_its_entry(upper: Upper, need: Callable[..., None],
                                                ns: str) -> None:
    need("trusted", "user")
    upper.file("o/child", b"c")
    upper.file("o/.hidden", b"h")
    upper.dir("o", mode=0o750, uid=7, gid=8)
    upper.opaque("o", ns)
    upper.stamp_dirs(T0 + 9)
    out, stats = pack_stats(upper, fmt=OverlayFormat(ns))
    members = read_members(out)
    assert [m.name for m in members] == [b"o/", b"o/.wh..wh..opq", b"o/.hidden", b"o/child"]
    d, marker = members[0], members[1]
    assert d.field("mode") == b"0040750\0"
    assert d.xattrs == {}, "the opaque xattr must not travel as an xattr"
    assert marker.type == b"0"
    assert marker.field("mode") == b"0000750\0"  # the dir's permission bits, no type bits
    assert (marker.uid, marker.gid) == (7, 8)
    assert marker.mtime == 0 and marker.field("mtime") == octal(0, 12)
    assert marker.size == 0
    assert stats.opaques == 1


@pytest.mark.parametrize(("mode", "marker_mode"), [
    pytest.param(0o1777, b"0000777\0", id="sticky"),
    pytest.param(0o2755, b"0000755\0", id="setgid"),
])
def test_opaque_marker_mode_is_permission_bits_only(upper: Upper, need: Callable[..., None],
                                                    mode: int, marker_mode: bytes) -> None:
    """moby's overlayWhiteoutConverter: `Mode: hdr.Mode & int64(os.ModePerm)` (0777), so the
    marker of an opaque /tmp (1777) is 0777: setuid/setgid/sticky are not permission bits."""
    need("trusted")
    upper.file("tmp/x")
    upper.dir("tmp", mode=mode)
    upper.opaque("tmp")
    upper.stamp_dirs()
    members = by_name(pack(upper))
    assert members[b"tmp/"].field("mode") == octal(0o040000 | mode)
    assert members[b"tmp/.wh..wh..opq"].field("mode") == marker_mode


def test_opaque_xattr_other_than_y_is_not_opaque(upper: Upper,
                                                 need: Callable[..., None]) -> None:
    need("trusted")
    upper.dir("d")
    os.setxattr(upper.p("d"), "trusted.overlay.opaque", b"n")
    upper.stamp_dirs()
    assert names(pack(upper)) == [b"d/"]


@pytest.fixture
def opaque_world(tmp_path: Path, need: Callable[..., None]) -> tuple[Upper, list[Path]]:
    """Two lowers (top-most first) and an upper where the kernel marked five dirs opaque."""
    need("trusted", "whiteout")
    top, bottom = tmp_path / "l2", tmp_path / "l1"
    # bottom: keep/, gone/sub/, shadow/inner/ ; top: gone is whited out, shadow/ is opaque
    for rel in ("keep/f", "gone/sub/f", "shadow/inner/f", "plainfile"):
        write(bottom / rel, b"x")
    (top / "shadow").mkdir(parents=True)
    os.setxattr(top / "shadow", "trusted.overlay.opaque", b"y")
    os.mknod(top / "gone", stat.S_IFCHR, os.makedev(0, 0))
    up = Upper(tmp_path / "upper")
    for d in ("keep", "new", "gone/sub", "shadow/inner", "shadow", "plainfile"):
        up.dir(d)
    for d in ("keep", "new", "gone/sub", "shadow/inner", "plainfile"):
        up.opaque(d)
    up.stamp_dirs()
    return up, [top, bottom]


def test_opaque_docker_marks_every_opaque_dir(opaque_world: tuple[Upper, list[Path]]) -> None:
    up, lowers = opaque_world
    for kw in ({}, {"opaque": "docker", "lowers": lowers}):
        got = [n for n in names(pack(up, **kw)) if n.endswith(b".wh..wh..opq")]
        assert got == [b"gone/sub/.wh..wh..opq", b"keep/.wh..wh..opq", b"new/.wh..wh..opq",
                       b"plainfile/.wh..wh..opq", b"shadow/inner/.wh..wh..opq"], kw


def test_opaque_lower_marks_only_dirs_a_lower_shows(
        opaque_world: tuple[Upper, list[Path]]) -> None:
    # keep/ is in a lower; new/ is not; gone/sub/ and shadow/inner/ exist only below a whiteout
    # or an opaque dir; plainfile is a file below. Only keep/ needs its marker.
    up, lowers = opaque_world
    for kw in ({"lowers": lowers}, {"lowers": lowers, "opaque": "lower"}):
        out, stats = pack_stats(up, **kw)
        got = [n for n in names(out) if n.endswith(b".wh..wh..opq")]
        assert got == [b"keep/.wh..wh..opq"], kw
        assert stats.opaques == 1


def test_opaque_lower_needs_lowers(upper: Upper) -> None:
    upper.dir("d")
    with pytest.raises(ValueError, match="lower"):
        pack(upper, opaque="lower")


def test_bad_policies_are_value_errors(upper: Upper) -> None:
    with pytest.raises(ValueError):
        pack(upper, xattrs="some")
    with pytest.raises(ValueError):
        pack(upper, opaque="aufs", lowers=[str(upper.root)])


# =============================================================================================
# Hardlinks, sockets
# =============================================================================================

def test_hardlinks_first_name_in_walk_order_carries_data(upper: Upper) -> None:
    upper.file("z/file", b"shared data", mode=0o640, uid=5, gid=6)
    upper.dir("m")
    os.link(upper.p("z/file"), upper.p("a"))
    os.link(upper.p("z/file"), upper.p("m/n"))
    upper.stamp_dirs()
    out, stats = pack_stats(upper)
    members = read_members(out)
    assert [m.name for m in members] == [b"a", b"m/", b"m/n", b"z/", b"z/file"]
    first, links = members[0], [members[2], members[4]]
    assert first.type == b"0" and first.data == b"shared data"
    assert first.field("mode") == b"0100640\0"
    for m in links:
        assert m.type == b"1"
        assert m.linkname == b"a", "every later name links to the first: no chains"
        assert m.size == 0 and m.field("size") == octal(0, 12)
        assert (m.uid, m.gid) == (5, 6)
    assert stats.hardlinks == 2


def test_hardlink_to_a_long_name_uses_pax_linkpath(upper: Upper) -> None:
    long = "d/" + "l" * 120
    upper.file(long, b"x")
    os.link(upper.p(long), upper.p("short"))
    upper.stamp_dirs()
    members = by_name(pack(upper))
    m = members[b"short"]
    assert m.type == b"1"
    assert m.pax[b"linkpath"] == long.encode()
    assert m.linkname == long.encode()


def _bind_socket(path: Path) -> None:
    """A unix socket node at `path` (bound relative to its dir: sun_path is short)."""
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)
    finally:
        os.chdir(cwd)


def test_sockets_are_skipped_with_a_warning(upper: Upper) -> None:
    upper.file("a")
    upper.dir("run")
    _bind_socket(upper.p("run/app.sock"))
    upper.stamp_dirs()
    warnings: list[str] = []
    out, stats = pack_stats(upper, warn=warnings.append)
    assert names(out) == [b"a", b"run/"]
    assert stats.skipped == 1
    assert len(warnings) == 1 and "run/app.sock" in warnings[0] and "socket" in warnings[0]


def test_cli_warns_about_sockets_on_stderr(upper: Upper, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    upper.file("a")
    _bind_socket(upper.p("s.sock"))
    out = tmp_path / "layer.tar"
    code, stdout, stderr = run_cli(["pack", str(upper.root), "-o", str(out),
                                    "--compression", "none"], capsys)
    assert code == 0, stderr
    assert stderr.startswith("ocilayers: warning: ")
    assert "s.sock" in stderr and len(stderr.splitlines()) == 1
    assert names(out.read_bytes()) == [b"a"]
    assert stdout.strip() == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()


# =============================================================================================
# xattrs
# =============================================================================================

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # setcap cap_net_raw+ep


@pytest.fixture
def xattr_upper(upper: Upper, need: Callable[..., None],
                caps: dict[str, str | None]) -> Upper:
    need("trusted", "user")
    f = upper.file("bin/ping", b"\x7fELF")
    os.setxattr(f, "security.capability", CAP_NET_RAW)
    os.setxattr(f, "user.comment", b"hello")
    os.setxattr(f, "trusted.md5", b"abc")
    os.setxattr(f, "trusted.overlay.origin", b"\0\xfb\x1d\x00")  # kernel bookkeeping
    os.setxattr(f, "trusted.overlay.overlay.foo", b"escaped")  # the image's own overlay.foo
    os.setxattr(f, "user.overlay.origin", b"\0\xfb")
    os.setxattr(f, "user.overlay.overlay.bar", b"escaped-user")
    if caps["selinux"] is None:
        os.setxattr(f, "security.selinux", b"system_u:object_r:bin_t:s0\0")
    d = upper.p("bin")
    os.setxattr(d, "trusted.overlay.impure", b"y")
    os.setxattr(d, "trusted.overlay.origin", b"\0\xfb")
    os.setxattr(d, "user.overlay.impure", b"y")
    os.setxattr(d, "user.dirnote", b"d")
    os.symlink("ping", upper.p("bin/ping6"))
    os.setxattr(upper.p("bin/ping6"), "trusted.symlink", b"s", follow_symlinks=False)
    stamp(upper.p("bin/ping6"), T0)
    os.setxattr(upper.root, "trusted.overlay.uuid", b"\x01" * 16)  # on the upper root
    upper.stamp_dirs()
    return upper


def test_xattrs_all_keeps_content_drops_bookkeeping(xattr_upper: Upper) -> None:
    members = by_name(pack(xattr_upper, xattrs="all"))
    assert members[b"bin/ping"].xattrs == {
        "security.capability": CAP_NET_RAW,
        "user.comment": b"hello",
        "trusted.md5": b"abc",
        "trusted.overlay.foo": b"escaped",  # unescaped: what the merged view showed
        "user.overlay.bar": b"escaped-user",
    }
    assert members[b"bin/"].xattrs == {"user.dirnote": b"d"}
    assert members[b"bin/ping6"].xattrs == {"trusted.symlink": b"s"}
    # the records themselves: SCHILY.xattr.<name>, sorted (Go sorts PAX keys)
    keys = list(members[b"bin/ping"].pax)
    assert keys == sorted(keys)
    assert all(k.startswith(b"SCHILY.xattr.") for k in keys)


def test_xattrs_docker_keeps_only_security_capability(xattr_upper: Upper) -> None:
    members = by_name(pack(xattr_upper, xattrs="docker"))
    assert members[b"bin/ping"].xattrs == {"security.capability": CAP_NET_RAW}
    assert members[b"bin/"].xattrs == {}
    assert members[b"bin/ping6"].xattrs == {}
    assert members[b"bin/"].pax_header is None, "PAX only when needed"


def test_selinux_label_is_dropped(upper: Upper, need: Callable[..., None]) -> None:
    need("selinux")
    f = upper.file("f")
    os.setxattr(f, "security.selinux", b"system_u:object_r:etc_t:s0\0")
    upper.stamp_dirs()
    m = by_name(pack(upper, xattrs="all"))[b"f"]
    assert m.xattrs == {}
    assert m.pax_header is None


def test_setcap_binary_round_trips(upper: Upper, tmp_path: Path) -> None:
    setcap = requires_tool("setcap")
    f = upper.file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755)
    subprocess.run([setcap, "cap_net_raw+ep", str(f)], check=True, capture_output=True)
    stamp(f, T0)
    upper.stamp_dirs()
    value = os.getxattr(f, "security.capability")
    for policy in ("docker", "all"):
        m = by_name(pack(upper, xattrs=policy))[b"usr/bin/tool"]
        assert m.pax[b"SCHILY.xattr.security.capability"] == value
        assert m.pax_header is not None
        # Go names the extended header <dir>/PaxHeaders.0/<base>
        assert m.pax_header[:100].rstrip(b"\0") == b"usr/bin/PaxHeaders.0/tool"


# =============================================================================================
# PAX: only when needed
# =============================================================================================

def test_no_pax_for_plain_entries(upper: Upper) -> None:
    upper.file("etc/hostname", b"h\n")
    os.symlink("hostname", upper.p("etc/link"))
    stamp(upper.p("etc/link"), T0)
    upper.stamp_dirs()
    for m in read_members(pack(upper)):
        assert m.pax_header is None, m.name
        assert m.pax == {}


def test_long_name_goes_to_pax_under_paxheaders(upper: Upper) -> None:
    base = "n" * 150  # one component longer than the name field: USTAR cannot split it
    upper.file(f"dir/{base}", b"data")
    upper.stamp_dirs()
    members = by_name(pack(upper))
    full = f"dir/{base}".encode()
    m = members[full]
    assert m.pax == {b"path": full}
    assert m.pax_header is not None
    assert m.pax_header[156:157] == b"x"
    assert m.pax_header[:100] == (b"dir/PaxHeaders.0/" + base.encode())[:100]
    assert m.pax_header[257:265] == b"ustar\x0000"
    assert m.field("name") == full[:100]  # the main header keeps the truncated name
    assert m.field("prefix") == b"\0" * 155
    assert m.data == b"data"
    assert full.decode() in tarfile_names(pack(upper))


def test_long_splittable_path_uses_ustar_prefix_like_go(upper: Upper) -> None:
    """moby sets Header.Format = FormatPAX, and Go's allowedFormats then also allows USTAR
    ("PAX implies USTAR allowed too"); writeHeader tries USTAR first, and splitUSTARPath fits a
    long path into prefix (155) + name (100). So `docker commit` writes no PAX header here."""
    rel = "p" * 60 + "/" + "q" * 60 + "/file.txt"  # 127 bytes, splits at the last '/'
    upper.file(rel, b"x")
    upper.stamp_dirs()
    m = by_name(pack(upper))[rel.encode()]
    assert m.pax_header is None, "Go writes this path as USTAR prefix + name, without PAX"
    assert m.field("prefix").rstrip(b"\0") == ("p" * 60 + "/" + "q" * 60).encode()
    assert m.field("name").rstrip(b"\0") == b"file.txt"


def test_non_utf8_name_is_a_raw_pax_path(upper: Upper) -> None:
    raw = b"d/caf\xe9-\xff.txt"
    upper.file(raw, b"latin-1")
    upper.stamp_dirs()
    out = pack(upper)
    m = by_name(out)[raw]
    assert m.pax[b"path"] == raw  # raw bytes, not re-encoded
    assert m.field("name").rstrip(b"\0") == b"d/caf-.txt"  # Go's toASCII drops the rest
    assert m.pax_header is not None
    assert m.pax_header[:100].rstrip(b"\0") == b"d/PaxHeaders.0/caf-.txt"
    assert m.data == b"latin-1"


def test_big_ids_go_to_pax(upper: Upper, need: Callable[..., None]) -> None:
    need("chown")
    upper.file("f", b"x", uid=3_000_000, gid=4_000_000)
    upper.file("g", b"y", uid=2**21 - 1, gid=2**21 - 1)  # the largest 7-digit octal: no PAX
    upper.stamp_dirs()
    members = by_name(pack(upper))
    f, g = members[b"f"], members[b"g"]
    assert f.pax == {b"uid": b"3000000", b"gid": b"4000000"}
    assert (f.uid, f.gid) == (3_000_000, 4_000_000)
    assert f.field("uid") == octal(0) and f.field("gid") == octal(0)  # Go: 0 when it won't fit
    assert g.pax_header is None
    assert g.field("uid") == b"7777777\0"


def test_dir_pax_header_name_follows_go_path_join(upper: Upper,
                                                  need: Callable[..., None]) -> None:
    """Go: `dir, file := path.Split(realName); path.Join(dir, "PaxHeaders.0", file)`. A dir's
    realName ends in '/', so file is "" and the extended header is `<dir>/PaxHeaders.0`."""
    need("chown")
    upper.dir("top/sub", uid=3_000_000)
    upper.stamp_dirs()
    m = by_name(pack(upper))[b"top/sub/"]
    assert m.pax == {b"uid": b"3000000"}
    assert m.pax_header is not None
    assert m.pax_header[:100].rstrip(b"\0") == b"top/sub/PaxHeaders.0"


@pytest.mark.parametrize(("mtime_ns", "pax_mtime"), [
    pytest.param(-100 * NS, b"-100", id="whole"),
    pytest.param(-1_500_000_000, b"-2", id="fraction-floors"),  # Go: Truncate(time.Second)
])
def test_negative_mtime_goes_to_pax(upper: Upper, need: Callable[..., None], mtime_ns: int,
                                    pax_mtime: bytes) -> None:
    need("old_mtime")
    f = upper.file("old", b"x")
    os.utime(f, ns=(mtime_ns, mtime_ns))
    upper.stamp_dirs()
    m = by_name(pack(upper))[b"old"]
    assert m.pax == {b"mtime": pax_mtime}
    assert m.field("mtime") == octal(0, 12)
    assert m.mtime == int(pax_mtime)


# =============================================================================================
# Header bytes
# =============================================================================================

def test_header_bytes_per_type(upper: Upper, need: Callable[..., None]) -> None:
    need("devices")
    upper.file("file", b"abc", mode=0o644, uid=1, gid=2, mtime=T0 + 1)
    upper.file("suid", b"s", mode=0o4755)
    os.symlink("file", upper.p("sym"))
    os.mkfifo(upper.p("fifo"))
    os.mknod(upper.p("chr"), stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(upper.p("blk"), stat.S_IFBLK, os.makedev(7, 9))
    for name, mode in (("fifo", 0o640), ("chr", 0o620), ("blk", 0o660)):
        os.chmod(upper.p(name), mode)  # not through the umask
    for name in ("sym", "fifo", "chr", "blk"):
        stamp(upper.p(name), T0)
    upper.dir("dir", mode=0o755)
    upper.stamp_dirs(T0 + 2)
    members = by_name(pack(upper))
    want = {
        b"file": (b"0", b"0100644\0"), b"suid": (b"0", b"0104755\0"),
        b"sym": (b"2", b"0120777\0"), b"fifo": (b"6", b"0010640\0"),
        b"chr": (b"3", b"0020620\0"), b"blk": (b"4", b"0060660\0"),
        b"dir/": (b"5", b"0040755\0"),
    }
    for name, (typeflag, mode) in want.items():
        m = members[name]
        assert m.field("typeflag") == typeflag, name
        assert m.field("mode") == mode, name
        assert m.field("magic") == b"ustar\0" and m.field("version") == b"00", name
        assert m.field("uname") == b"\0" * 32 and m.field("gname") == b"\0" * 32, name
        assert m.field("prefix") == b"\0" * 155, name
        # Go's checksum field: six octal digits, NUL, space
        b = bytearray(m.header)
        b[148:156] = b" " * 8
        assert m.field("chksum") == b"%06o\0 " % sum(b), name
    f = members[b"file"]
    assert f.field("uid") == octal(1) and f.field("gid") == octal(2)
    assert f.field("size") == octal(3, 12)
    assert f.field("mtime") == octal(T0 + 1, 12)
    assert members[b"dir/"].field("size") == octal(0, 12)
    assert members[b"sym"].linkname == b"file"
    assert (members[b"chr"].devmajor, members[b"chr"].devminor) == (1, 3)
    assert (members[b"blk"].devmajor, members[b"blk"].devminor) == (7, 9)
    assert members[b"blk"].field("devmajor") == octal(7)
    assert members[b"file"].field("devmajor") == octal(0)


def test_mtimes_are_whole_seconds(upper: Upper) -> None:
    f = upper.file("f", b"x")
    stamp(f, T0, 999_999_999)
    upper.stamp_dirs()
    m = by_name(pack(upper))[b"f"]
    assert m.field("mtime") == octal(T0, 12)
    assert m.pax == {}, "no PAX mtime for sub-second precision"


# =============================================================================================
# Determinism, the end of the archive, SOURCE_DATE_EPOCH
# =============================================================================================

def test_archive_ends_with_exactly_two_zero_blocks(upper: Upper) -> None:
    upper.file("a", b"\x01" * 700)  # data padding: 700 -> 1024
    upper.file("b", b"\x02" * 512)  # no padding
    upper.stamp_dirs()
    out = pack(upper)
    with tarfile.open(fileobj=io.BytesIO(out)) as tf:
        last = tf.getmembers()[-1]
        content_end = last.offset_data + -(-last.size // 512) * 512
    assert out[content_end:] == END
    assert len(out) == content_end + 1024
    assert len(out) % 512 == 0


def test_empty_upper_is_the_empty_layer(upper: Upper, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, stats = pack_stats(upper)
    assert out == END
    assert (stats.entries, stats.whiteouts, stats.opaques) == (0, 0, 0)
    result = api.pack(str(upper.root), io.BytesIO(), compression="none")
    assert str(result.diff_id) == EMPTY_DIFF_ID
    assert str(result.digest) == EMPTY_DIFF_ID
    blob = tmp_path / "empty.tar.gz"
    code, stdout, stderr = run_cli(["pack", str(upper.root), "-o", str(blob), "--json"], capsys)
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["diff_id"] == EMPTY_DIFF_ID
    assert (doc["entries"], doc["whiteouts"], doc["opaques"]) == (0, 0, 0)
    assert gzip.decompress(blob.read_bytes()) == END


@pytest.fixture
def rich_upper(upper: Upper, caps: dict[str, str | None]) -> Upper:
    """A bit of everything the walk meets; whiteouts/xattrs only where the probes allow."""
    upper.file("etc/hostname", b"box\n")
    upper.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o600)
    os.link(upper.p("etc/passwd"), upper.p("etc/passwd-"))
    os.symlink("/proc/mounts", upper.p("etc/mtab"))
    stamp(upper.p("etc/mtab"), T0)
    upper.file("usr/bin/" + "x" * 120, b"long")
    upper.file(b"usr/share/caf\xe9", b"e")
    upper.file("var/data.bin", bytes(range(256)) * 40, mode=0o4755)
    if caps["whiteout"] is None:
        upper.whiteout("etc/motd")
        upper.whiteout("var/cache")
    if caps["trusted"] is None:
        upper.dir("opt/app")
        upper.file("opt/app/new.conf", b"c")
        upper.opaque("opt/app")
        os.setxattr(upper.p("etc/hostname"), "trusted.overlay.origin", b"\0\xfb")
    if caps["user"] is None:
        os.setxattr(upper.p("etc/hostname"), "user.note", b"n")
    upper.stamp_dirs()
    return upper


def test_same_upper_same_bytes(rich_upper: Upper, tmp_path: Path) -> None:
    first = pack(rich_upper)
    assert pack(rich_upper) == first
    # A copy elsewhere (other inode numbers, other directory order on disk) gives the same bytes.
    cp = shutil.which("cp")
    assert cp is not None
    copy = tmp_path / "copy"
    subprocess.run([cp, "-a", "--preserve=all", str(rich_upper.root), str(copy)], check=True)
    assert pack(copy) == first
    gz1, gz2 = io.BytesIO(), io.BytesIO()
    api.pack(str(rich_upper.root), gz1)
    api.pack(str(copy), gz2)
    assert gz1.getvalue() == gz2.getvalue()


def test_gzip_header_has_no_name_and_no_mtime(rich_upper: Upper, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "named-output-file.tar.gz"
    code, _out, err = run_cli(["pack", str(rich_upper.root), "-o", str(blob)], capsys)
    assert code == 0, err
    data = blob.read_bytes()
    assert data[:3] == b"\x1f\x8b\x08"
    assert data[3] == 0, f"FLG {data[3]:#x}: no FNAME/FCOMMENT/FEXTRA"
    assert data[4:8] == b"\0\0\0\0", "MTIME must be 0"
    assert gzip.decompress(data) == pack(rich_upper)


def test_source_date_epoch_clamps_newer_times(upper: Upper, need: Callable[..., None],
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    need("whiteout", "trusted")
    sde = T0
    upper.file("new", b"n", mtime=T0 + 1000)
    upper.file("old", b"o", mtime=T0 - 1000)
    upper.file("exact", b"e", mtime=T0)
    upper.whiteout("gone", mtime=T0 + 50)
    upper.dir("op")
    upper.opaque("op")
    upper.stamp_dirs(T0 + 500)
    members = by_name(pack(upper, source_date_epoch=sde))
    assert members[b"new"].mtime == sde
    assert members[b"old"].mtime == T0 - 1000
    assert members[b"exact"].mtime == T0
    assert members[b".wh.gone"].mtime == sde
    assert members[b"op/"].mtime == sde
    assert members[b"op/.wh..wh..opq"].mtime == 0
    unclamped = by_name(pack(upper))
    assert unclamped[b"new"].mtime == T0 + 1000
    # CLI: the flag, and $SOURCE_DATE_EPOCH when the flag is absent
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    code, _o, err = run_cli(["pack", str(upper.root), "-o", str(a), "--compression", "none",
                             "--source-date-epoch", str(sde)], capsys)
    assert code == 0, err
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(sde))
    code, _o, err = run_cli(["pack", str(upper.root), "-o", str(b), "--compression", "none"],
                            capsys)
    assert code == 0, err
    assert a.read_bytes() == b.read_bytes() == pack(upper, source_date_epoch=sde)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    code, _o, err = run_cli(["pack", str(upper.root), "-o", str(b), "--compression", "none"],
                            capsys)
    assert_one_line_error(code, err, "SOURCE_DATE_EPOCH must be a whole number of seconds")


# =============================================================================================
# CLI: JSON and `-o -`
# =============================================================================================

def _decompress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        assert data[:2] == b"\x1f\x8b"
        return gzip.decompress(data)
    if compression == "zstd":
        import zstandard

        assert data[:4] == b"\x28\xb5\x2f\xfd"
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            return r.read()
    return data


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_cli_json(rich_upper: Upper, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                  compression: str, caps: dict[str, str | None]) -> None:
    blob = tmp_path / "layer"
    code, stdout, stderr = run_cli(["pack", str(rich_upper.root), "-o", str(blob),
                                    "--compression", compression, "--json"], capsys)
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert set(doc) == JSON_KEYS
    data = blob.read_bytes()
    plain = pack(rich_upper)
    assert _decompress(data, compression) == plain
    assert doc["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert doc["size"] == len(data)
    assert doc["diff_id"] == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert doc["media_type"] == MEDIA_TYPES[compression]
    members = read_members(plain)
    assert doc["entries"] == len(members)
    assert doc["whiteouts"] == sum(1 for m in members
                                   if m.name.rsplit(b"/", 1)[-1].startswith(b".wh.")
                                   and not m.name.endswith(b".wh..wh..opq"))
    assert doc["opaques"] == sum(1 for m in members if m.name.endswith(b".wh..wh..opq"))
    if caps["whiteout"] is None:
        assert doc["whiteouts"] == 2
    if caps["trusted"] is None:
        assert doc["opaques"] == 1


def test_cli_stdout_blob_and_stderr_json(rich_upper: Upper) -> None:
    proc = subprocess.run([sys.executable, "-m", "ocilayers", "pack", str(rich_upper.root),
                           "-o", "-", "--json"], capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stderr)
    assert set(doc) == JSON_KEYS
    assert doc["digest"] == "sha256:" + hashlib.sha256(proc.stdout).hexdigest()
    assert doc["size"] == len(proc.stdout)
    assert gzip.decompress(proc.stdout) == pack(rich_upper)


def test_cli_without_json_prints_the_digest(rich_upper: Upper, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "l.tgz"
    code, stdout, stderr = run_cli(["pack", str(rich_upper.root), "-o", str(blob)], capsys)
    assert code == 0, stderr
    assert stdout == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() + "\n"


def test_cli_missing_upper_is_one_line_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.tar"
    code, _o, err = run_cli(["pack", str(tmp_path / "nope"), "-o", str(out)], capsys)
    assert_one_line_error(code, err)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


# =============================================================================================
# redirect (renamed dir) and metacopy (data still below), on synthetic layers
# =============================================================================================

@pytest.fixture
def lower(tmp_path: Path) -> Path:
    """One lower layer: etc/{hostname,passwd}, old/{a.txt,h1=h2,sub/b.txt}, other/old.txt."""
    low = tmp_path / "lower"
    write(low / "etc/hostname", b"lower-hostname\n")
    write(low / "etc/passwd", b"root:x:0:0\n")
    write(low / "old/a.txt", b"A" * 10)
    write(low / "old/h1", b"linked")
    os.link(low / "old/h1", low / "old/h2")
    write(low / "old/sub/b.txt", b"B")
    write(low / "other/old.txt", b"O")
    for dirpath, _d, _f in sorted(os.walk(low), key=lambda t: -len(t[0])):
        stamp(Path(dirpath), T0 - 10)
    return low


def metacopy(path: Path, size: int, *, redirect: bytes | None = None) -> None:
    """What `chmod` of a lower file leaves with metacopy=on: a sparse file of the right size."""
    with open(path, "wb") as f:
        f.truncate(size)
    os.setxattr(path, "trusted.overlay.metacopy", b"")
    os.setxattr(path, "trusted.overlay.origin", b"\0\xfb\x1d")
    if redirect is not None:
        os.setxattr(path, "trusted.overlay.redirect", redirect)


@pytest.fixture
def renamed(upper: Upper, lower: Path, need: Callable[..., None]) -> Upper:
    """`mv /old /new` with redirect_dir=on, then inside: rm a.txt, add added.txt."""
    need("whiteout", "trusted")
    upper.whiteout("old")
    d = upper.dir("new")
    os.setxattr(d, "trusted.overlay.redirect", b"old")
    os.setxattr(d, "trusted.overlay.origin", b"\0\xfb")
    upper.whiteout("new/a.txt")
    upper.file("new/added.txt", b"new")
    upper.stamp_dirs(T0)
    return upper


def test_redirect_with_lowers_writes_full_content(renamed: Upper, lower: Path) -> None:
    out, stats = pack_stats(renamed, lowers=[lower])
    members = read_members(out)
    got = [m.name for m in members if not m.name.endswith(b".wh..wh..opq")]
    assert got == [b"new/", b"new/added.txt", b"new/h1", b"new/h2", b"new/sub/",
                   b"new/sub/b.txt", b".wh.old"]
    m = {x.name: x for x in members}
    assert m[b"new/h1"].data == b"linked"
    assert m[b"new/h2"].type == b"1" and m[b"new/h2"].linkname == b"new/h1"
    assert m[b"new/sub/b.txt"].data == b"B"
    assert m[b"new/sub/"].mtime == T0 - 10  # lower metadata travels with lower content
    assert m[b"new/"].xattrs == {}
    assert b"new/a.txt" not in m and b"new/.wh.a.txt" not in m
    assert stats.whiteouts == 1


def test_redirect_marker_follows_the_opaque_policy(renamed: Upper, lower: Path) -> None:
    """--opaque lower marks only dirs a lower has: no lower has `new/`, so its content alone
    (no marker) is the right layer; a marker is needed when the new name hid a lower dir."""
    out = pack(renamed, lowers=[lower], opaque="lower")
    assert b"new/.wh..wh..opq" not in names(out)


def test_redirect_onto_a_lower_dir_hides_it(upper: Upper, lower: Path,
                                            need: Callable[..., None], tmp_path: Path) -> None:
    need("whiteout", "trusted")
    # rm -rf /other && mv /old /other: the lower other/old.txt must stay hidden
    upper.whiteout("old")
    d = upper.dir("other")
    os.setxattr(d, "trusted.overlay.redirect", b"/old")
    upper.stamp_dirs()
    out = pack(upper, lowers=[lower])
    assert b"other/.wh..wh..opq" in names(out)
    flat = tmp_path / "flat"
    shutil.copytree(lower, flat, symlinks=True)
    apply_layer(io.BytesIO(out), flat, mode="delete")
    assert sorted(os.listdir(flat / "other")) == ["a.txt", "h1", "h2", "sub"]
    assert not (flat / "old").exists()


@pytest.mark.parametrize(("kind", "msg"), [
    pytest.param("redirect", "redirect", id="redirect"),
    pytest.param("metacopy", "metacopy", id="metacopy"),
])
def test_without_lowers_it_is_refused(upper: Upper, lower: Path, need: Callable[..., None],
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      kind: str, msg: str) -> None:
    need("whiteout", "trusted")
    if kind == "redirect":
        upper.whiteout("old")
        os.setxattr(upper.dir("new"), "trusted.overlay.redirect", b"old")
        path = "new"
    else:
        upper.dir("etc")
        metacopy(upper.p("etc/passwd"), 11)
        os.chmod(upper.p("etc/passwd"), 0o600)
        path = "etc/passwd"
    upper.stamp_dirs()
    with pytest.raises(UnsupportedUpperError, match=msg):
        pack(upper)
    assert issubclass(UnsupportedUpperError, UpperDirError)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "layer.tar"
    code, stdout, err = run_cli(["pack", str(upper.root), "-o", str(out)], capsys)
    assert_one_line_error(code, err, path, "--lower")
    assert stdout == ""
    assert os.listdir(outdir) == [], "a refused pack leaves nothing behind"
    # with the lowers it works
    code, _o, err = run_cli(["pack", str(upper.root), "-o", str(out), "--lower", str(lower)],
                            capsys)
    assert code == 0, err


def test_metacopy_data_comes_from_the_lower(upper: Upper, lower: Path,
                                            need: Callable[..., None]) -> None:
    need("trusted", "whiteout")
    upper.dir("etc")
    metacopy(upper.p("etc/passwd"), 11)
    os.chmod(upper.p("etc/passwd"), 0o600)
    os.chown(upper.p("etc/passwd"), 0, 42)
    stamp(upper.p("etc/passwd"), T0 - 10)
    # mv /etc/hostname /etc/hostname2 with metacopy=on: metacopy + redirect on the file
    metacopy(upper.p("etc/hostname2"), 15, redirect=b"/etc/hostname")
    stamp(upper.p("etc/hostname2"), T0 - 10)
    upper.whiteout("etc/hostname")
    upper.stamp_dirs()
    members = by_name(pack(upper, lowers=[lower]))
    p = members[b"etc/passwd"]
    assert p.data == b"root:x:0:0\n"
    assert p.field("mode") == b"0100600\0" and p.gid == 42
    assert p.xattrs == {}
    assert members[b"etc/hostname2"].data == b"lower-hostname\n"
    assert b"etc/.wh.hostname" in members


def test_metacopy_inside_a_renamed_dir(renamed: Upper, lower: Path) -> None:
    """`mv /old /new; chmod 600 /new/sub/b.txt` with redirect_dir=on,metacopy=on: the kernel
    puts no redirect on b.txt (it finds the data through its parent's redirect), so the data
    is at old/sub/b.txt in the lowers, not at new/sub/b.txt."""
    renamed.dir("new/sub")
    metacopy(renamed.p("new/sub/b.txt"), 1)
    os.chmod(renamed.p("new/sub/b.txt"), 0o600)
    renamed.stamp_dirs()
    members = by_name(pack(renamed, lowers=[lower]))
    assert members[b"new/sub/b.txt"].data == b"B"
    assert members[b"new/sub/b.txt"].field("mode") == b"0100600\0"


# =============================================================================================
# Tree mode: write_tree_diff / `ocilayers pack NEW --base OLD`
# =============================================================================================

@dataclass
class Trees:
    base: Path
    new: Path
    expected: list[bytes] = field(default_factory=list)


def _finish_dirs(root: Path, secs: int) -> None:
    for dirpath, _d, _f in sorted(os.walk(root), key=lambda t: -len(t[0])):
        stamp(Path(dirpath), secs)


@pytest.fixture
def trees(tmp_path: Path, need: Callable[..., None]) -> Trees:
    """Two plain trees and the entries their diff must hold, in walk order."""
    need("devices", "user")
    base, new = tmp_path / "base", tmp_path / "new"

    def both(rel: str, data: bytes = b"same", **kw: Any) -> None:
        write(base / rel, data, **kw)
        write(new / rel, data, **kw)

    both("same/unchanged")
    both("mode", mode=0o644)
    os.chmod(new / "mode", 0o600)
    both("owner")
    os.chown(new / "owner", 7, 8)
    both("mtime")
    stamp(new / "mtime", T0 + 1)
    both("subsecond")  # only the fraction differs: equal to the whole second
    stamp(new / "subsecond", T0, 500_000_000)
    write(base / "size", b"123")
    write(new / "size", b"1234")
    write(base / "content", b"aaaa")  # same size and mtime: only --content sees it
    write(new / "content", b"bbbb")
    for root, target in ((base, "a"), (new, "b")):
        os.symlink(target, root / "link")
        stamp(root / "link", T0)
    for root, minor in ((base, 3), (new, 5)):
        os.mknod(root / "dev", stat.S_IFCHR | 0o600, os.makedev(1, minor))
        stamp(root / "dev", T0)
    both("xattr")
    os.setxattr(base / "xattr", "user.k", b"1")
    os.setxattr(new / "xattr", "user.k", b"2")
    both("added-xattr")
    os.setxattr(new / "added-xattr", "user.k", b"1")
    both("gone-file")
    os.unlink(new / "gone-file")
    both("gone-dir/a/b/c")
    both("gone-dir/x")
    shutil.rmtree(new / "gone-dir")
    both("dir2file/child")
    shutil.rmtree(new / "dir2file")
    write(new / "dir2file", b"now a file")
    both("dir2link/child")
    shutil.rmtree(new / "dir2link")
    os.symlink("same", new / "dir2link")
    stamp(new / "dir2link", T0)
    both("file2dir")
    os.unlink(new / "file2dir")
    write(new / "file2dir/inner", b"i")
    write(new / "added/deep/file", b"n")
    _finish_dirs(base, T0)
    _finish_dirs(new, T0)
    stamp(new, T0 + 7)  # the root changed; it never becomes an entry
    expected = [
        b"added/", b"added/deep/", b"added/deep/file", b"added-xattr", b"dev",
        b"dir2file", b"dir2link", b"file2dir/", b"file2dir/inner", b".wh.gone-dir",
        b".wh.gone-file", b"link", b"mode", b"mtime", b"owner", b"size", b"xattr",
    ]
    return Trees(base, new, expected)


def _tree_diff(t: Trees, **kw: Any) -> tuple[bytes, PackStats]:
    buf = io.BytesIO()
    stats = write_tree_diff(t.new, t.base, buf, **kw)
    return buf.getvalue(), stats


def test_tree_diff_entries(trees: Trees) -> None:
    out, stats = _tree_diff(trees)
    assert names(out) == trees.expected
    assert stats.whiteouts == 2, "one whiteout per deleted subtree top"
    members = by_name(out)
    assert members[b"dir2file"].data == b"now a file"
    assert members[b"link"].linkname == b"b"
    assert (members[b"dev"].devmajor, members[b"dev"].devminor) == (1, 5)
    assert members[b"xattr"].xattrs == {"user.k": b"2"}
    assert not any(n.endswith(b".wh..wh..opq") for n in members)


def test_tree_diff_content_compares_bytes(trees: Trees) -> None:
    out, _ = _tree_diff(trees, content=True)
    want = list(trees.expected)
    want.insert(want.index(b"added-xattr") + 1, b"content")
    assert names(out) == want
    assert by_name(out)[b"content"].data == b"bbbb"


def test_tree_diff_round_trips_onto_base(trees: Trees, tmp_path: Path) -> None:
    out, _ = _tree_diff(trees, content=True)
    flat = tmp_path / "flat"
    subprocess.run(["cp", "-a", "--preserve=all", str(trees.base), str(flat)], check=True)
    apply_layer(io.BytesIO(out), flat, mode="delete")
    tc.assert_same(tc.snapshot(trees.new, seconds=True), tc.snapshot(flat, seconds=True),
                   names=("new", "base+diff"))


def test_cli_tree_mode(trees: Trees, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    blob = tmp_path / "diff.tar"
    code, stdout, err = run_cli(["pack", str(trees.new), "--base", str(trees.base), "-o",
                                 str(blob), "--compression", "none", "--content", "--json"],
                                capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["whiteouts"] == 2
    assert doc["entries"] == len(trees.expected) + 1
    out, _ = _tree_diff(trees, content=True)
    assert blob.read_bytes() == out


@pytest.mark.parametrize("argv", [
    pytest.param(["--content"], id="content-without-base"),
    pytest.param(["--base", "{base}", "--lower", "{base}"], id="base-with-lower"),
    pytest.param(["--base", "{base}", "--opaque", "docker"], id="base-with-opaque"),
])
def test_cli_tree_mode_misuse(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              argv: list[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    out = tmp_path / "o.tar"
    code, _o, err = run_cli(["pack", str(a), "-o", str(out),
                             *[x.format(base=b) for x in argv]], capsys)
    assert_one_line_error(code, err)
    assert not out.exists()



@pytest.mark.parametrize("xattrs", ["all", "docker"])
def test_tree_diff_whiteouts_carry_no_linkname(tmp_path: Path, xattrs: str) -> None:
    # Two deletions in one dir: the whiteouts are made up, not read from a shared inode.
    base, new = tmp_path / "base", tmp_path / "new"
    for root in (base, new):
        for rel in ("d/a", "d/b", "d/c"):
            write(root / rel, b"x")
    os.unlink(new / "d/a")
    os.unlink(new / "d/b")
    _finish_dirs(base, T0)
    _finish_dirs(new, T0 + 1)
    buf = io.BytesIO()
    write_tree_diff(new, base, buf, xattrs=xattrs)
    members = by_name(buf.getvalue())
    assert list(members) == [b"d/", b"d/.wh.a", b"d/.wh.b"]
    for name in (b"d/.wh.a", b"d/.wh.b"):
        assert members[name].type == b"0"
        assert members[name].linkname == b"", name
        assert members[name].field("mode") == b"0000600\0"


def test_metacopy_inside_a_renamed_dir_never_takes_hidden_data(
        upper: Upper, tmp_path: Path, need: Callable[..., None]) -> None:
    """`rm -rf /y; mv /x /y; chmod 600 /y/f`: y/f's data is the lower x/f. The lower y/f is
    hidden by the rename; taking its bytes would be a wrong layer, written without a word."""
    need("whiteout", "trusted")
    low = tmp_path / "low"
    write(low / "x/f", b"data of x/f")
    write(low / "y/f", b"data of y/f")  # same size on purpose
    upper.whiteout("x")
    d = upper.dir("y")
    os.setxattr(d, "trusted.overlay.redirect", b"x")
    metacopy(upper.p("y/f"), 11)
    os.chmod(upper.p("y/f"), 0o600)
    upper.stamp_dirs()
    try:
        out = pack(upper, lowers=[low])
    except UpperDirError:
        pytest.fail("refused a layer the lowers fully describe (y/f is x/f below)")
    data = by_name(out)[b"y/f"].data
    assert data != b"data of y/f", "wrote the hidden lower y/f's bytes: a wrong layer"
    assert data == b"data of x/f"


@pytest.mark.parametrize("kind", ["symlink", "fifo", "chardev"])
def test_hardlinked_special_files_stay_linked(upper: Upper, need: Callable[..., None],
                                              kind: str) -> None:
    """moby addTarFile: `if !fi.IsDir() && hasHardlinks(fi)` — any non-dir with nlink > 1,
    not only regular files, becomes a type-1 link to the first name."""
    need("devices")
    first = upper.p("a")
    if kind == "symlink":
        os.symlink("target", first)
    elif kind == "fifo":
        os.mkfifo(first)
    else:
        os.mknod(first, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.link(first, upper.p("b"), follow_symlinks=False)
    stamp(first, T0)
    upper.stamp_dirs()
    members = by_name(pack(upper))
    assert members[b"a"].type != b"1"
    assert members[b"b"].type == b"1", f"second name of a hardlinked {kind}"
    assert members[b"b"].linkname == b"a"


def test_metacopy_moved_into_a_new_dir_inside_a_renamed_dir(upper: Upper, lower: Path,
                                                            need: Callable[..., None]) -> None:
    """`mv /old /new; mkdir /new/fresh; mv /etc/passwd /new/fresh/passwd` (redirect_dir=on,
    metacopy=on): fresh/ is opaque (a new dir in a merge dir), and passwd carries its own
    absolute redirect, so the lowers describe it fully: it must not be refused."""
    need("whiteout", "trusted")
    upper.whiteout("old")
    os.setxattr(upper.dir("new"), "trusted.overlay.redirect", b"old")
    upper.dir("new/fresh")
    upper.opaque("new/fresh")
    upper.whiteout("etc/passwd")
    metacopy(upper.p("new/fresh/passwd"), 11, redirect=b"/etc/passwd")
    upper.stamp_dirs()
    members = by_name(pack(upper, lowers=[lower]))
    assert members[b"new/fresh/passwd"].data == b"root:x:0:0\n"


def test_metacopy_hardlinks_stay_linked(upper: Upper, lower: Path,
                                        need: Callable[..., None]) -> None:
    """`ln /etc/passwd /etc/passwd-` with metacopy=on: one metacopy inode with both names and
    an absolute redirect (seen on 6.x). The first name carries the lower data, the second
    links to it."""
    need("trusted")
    upper.dir("etc")
    metacopy(upper.p("etc/passwd"), 11, redirect=b"/etc/passwd")
    os.link(upper.p("etc/passwd"), upper.p("etc/passwd-"))
    upper.stamp_dirs()
    out, stats = pack_stats(upper, lowers=[lower])
    members = by_name(out)
    assert members[b"etc/passwd"].data == b"root:x:0:0\n"
    assert members[b"etc/passwd-"].type == b"1"
    assert members[b"etc/passwd-"].linkname == b"etc/passwd"
    assert stats.hardlinks == 1


def test_pax_extended_header_block_is_gos_raw_file(upper: Upper) -> None:
    """Go's writeRawFile: name, mode/uid/gid/mtime as octal zeros, size, typeflag 'x', magic
    and version; uname, gname, devmajor, devminor, prefix all NUL."""
    upper.file("d/" + "n" * 120, b"x")
    upper.stamp_dirs()
    m = by_name(pack(upper))[("d/" + "n" * 120).encode()]
    assert m.pax_header is not None
    records = pax_record(b"path", ("d/" + "n" * 120).encode())
    want = bytearray(512)
    want[0:100] = (b"d/PaxHeaders.0/" + b"n" * 120)[:100]
    want[100:108] = octal(0)
    want[108:116] = octal(0)
    want[116:124] = octal(0)
    want[124:136] = octal(len(records), 12)
    want[136:148] = octal(0, 12)
    want[156:157] = b"x"
    want[257:265] = b"ustar\x0000"
    want[148:156] = b" " * 8
    want[148:156] = b"%06o\0 " % sum(want)
    assert m.pax_header == bytes(want)


def test_long_splittable_path_with_another_pax_need_is_pax(upper: Upper,
                                                           need: Callable[..., None]) -> None:
    need("chown")
    rel = "p" * 60 + "/" + "q" * 60 + "/file.txt"
    upper.file(rel, b"x", uid=3_000_000)
    upper.stamp_dirs()
    m = by_name(pack(upper))[rel.encode()]
    assert m.pax == {b"path": rel.encode(), b"uid": b"3000000"}
    assert m.field("prefix") == b"\0" * 155
    assert m.field("name") == rel.encode()[:100]


def test_long_splittable_dir_keeps_its_slash_in_the_name_field(upper: Upper) -> None:
    rel = "p" * 60 + "/" + "q" * 60
    upper.dir(rel)
    upper.stamp_dirs()
    m = by_name(pack(upper))[rel.encode() + b"/"]
    assert m.pax_header is None
    assert m.field("prefix").rstrip(b"\0") == b"p" * 60
    assert m.field("name").rstrip(b"\0") == b"q" * 60 + b"/"


def test_cut_name_field_never_ends_in_a_slash(upper: Upper) -> None:
    """Go's formatString: when a value is cut at the field size and the cut ends in '/', the
    slash becomes NUL (buggy readers would take a file for a dir)."""
    raw = b"a" * 99 + b"/\xe9" + b"b" * 10  # not ASCII: PAX path; ASCII form cut at '/'
    upper.file(raw, b"x")
    upper.stamp_dirs()
    m = by_name(pack(upper))[raw]
    assert m.pax[b"path"] == raw
    assert m.field("name") == b"a" * 99 + b"\0"


# =============================================================================================
# What a container can set on its own files is never read as overlay metadata (found by
# fuzzing: user.overlay.* on a default mount, and redirects with `..`)
# =============================================================================================

@pytest.mark.parametrize("key,value", [
    pytest.param("redirect", b"/../../../etc", id="redirect"),
    pytest.param("opaque", b"y", id="opaque"),
])
def test_user_overlay_xattrs_on_a_default_mount_are_content(
        upper: Upper, lower: Path, need: Callable[..., None], key: str, value: bytes) -> None:
    """On a default (trusted) mount any process can set user.overlay.*: the kernel ignores it,
    and so must pack. Reading it would let the container forge an opaque dir (the image loses
    lower files) or a redirect (pack reads host files)."""
    need("user")
    d = upper.dir("old")
    upper.file("old/mine.txt", b"mine")
    os.setxattr(d, f"user.overlay.{key}", value)
    upper.stamp_dirs(T0)
    members = read_members(pack(upper, lowers=[lower]))
    assert [m.name for m in members] == [b"old/", b"old/mine.txt"]
    assert members[0].xattrs == {}, "bookkeeping-shaped xattrs are never written out"


def test_user_overlay_metacopy_on_a_default_mount_is_content(
        upper: Upper, lower: Path, need: Callable[..., None]) -> None:
    need("user")
    f = upper.file("etc/passwd", b"container's own\n")
    os.setxattr(f, "user.overlay.metacopy", b"")
    os.setxattr(f, "user.overlay.redirect", b"/../../etc/shadow")
    upper.stamp_dirs(T0)
    got = by_name(pack(upper, lowers=[lower]))
    assert got[b"etc/passwd"].data == b"container's own\n"


@pytest.mark.parametrize("redirect", [
    b"/../../etc", b"/old/../../x", b"../old", b"old/sub", b"/old//sub", b"/old/", b"/", b"",
    b"/./old", b"/ol\0d",
])
def test_invalid_redirect_refused(upper: Upper, lower: Path, need: Callable[..., None],
                                  redirect: bytes) -> None:
    """The kernel takes an absolute path of plain names or one name in the same dir; pack
    refuses anything else instead of walking out of the lowers."""
    need("trusted")
    upper.whiteout("old")
    d = upper.dir("new")
    os.setxattr(d, "trusted.overlay.redirect", redirect)
    upper.stamp_dirs(T0)
    with pytest.raises(UpperDirError, match="invalid overlay redirect"):
        pack(upper, lowers=[lower])


def test_invalid_metacopy_redirect_refused(upper: Upper, lower: Path,
                                           need: Callable[..., None]) -> None:
    need("trusted")
    upper.dir("etc")
    metacopy(upper.p("etc/hostname2"), 15, redirect=b"/etc/../../secret")
    upper.stamp_dirs(T0)
    with pytest.raises(UpperDirError, match="invalid overlay redirect"):
        pack(upper, lowers=[lower])


def test_userxattr_mount_reads_user_overlay(upper: Upper, lower: Path,
                                            need: Callable[..., None]) -> None:
    """With fmt=USERXATTR (a userxattr mount) the user.overlay.* redirect is the
    kernel's, and a trusted.overlay.* one is not."""
    need("user", "trusted", "whiteout")
    upper.whiteout("old")
    d = upper.dir("new")
    os.setxattr(d, "user.overlay.redirect", b"old")
    upper.stamp_dirs(T0)
    got = names(pack(upper, lowers=[lower], fmt=USERXATTR))
    assert b"new/a.txt" in got and b"new/sub/b.txt" in got
    os.removexattr(d, "user.overlay.redirect")
    os.setxattr(d, "trusted.overlay.redirect", b"old")
    got = names(pack(upper, lowers=[lower], fmt=USERXATTR))
    assert b"new/a.txt" not in got


# =============================================================================================
# Deep trees: every walk is a loop over a stack, not recursion (found by fuzzing: 1000 nested
# dirs ended in RecursionError)
# =============================================================================================

DEPTH = 1100  # past Python's default recursion limit of 1000; 2200 bytes of path


def _deep(root: Path, leaf: bytes) -> str:
    p = root
    p.mkdir(parents=True, exist_ok=True)
    for _ in range(DEPTH):  # (mkdir(parents=True) itself recurses)
        p = p / "d"
        p.mkdir()
    (p / "leaf").write_bytes(leaf)
    return "/".join(["d"] * DEPTH)


@pytest.fixture
def deep_trees() -> Iterator[list[Path]]:
    """Dirs holding a _deep chain, removed afterwards without recursion (shutil.rmtree and
    os.walk recurse in Python 3.11, and pytest would fail to clean them up)."""
    roots: list[Path] = []
    yield roots
    for root in roots:
        chain = [root]
        while (chain[-1] / "d").is_dir():
            chain.append(chain[-1] / "d")
        for d in reversed(chain):
            for child in d.iterdir():
                if not child.is_dir() or child.is_symlink():
                    child.unlink()
            if d != root:
                d.rmdir()


def test_deep_upper_dir(upper: Upper, deep_trees: list[Path]) -> None:
    deep_trees.append(upper.root)
    rel = _deep(upper.root, b"deep")
    got = names(pack(upper))
    assert got == [("/".join(["d"] * i) + "/").encode() for i in range(1, DEPTH + 1)] \
        + [(rel + "/leaf").encode()]


def test_deep_upper_dir_under_a_low_fd_limit(upper: Upper, tmp_path: Path,
                                             deep_trees: list[Path]) -> None:
    """pack holds an fd per level: the command raises its soft fd limit to the hard one, as
    Go programs do, so a 1100-deep upper dir packs under a soft limit of 256 too."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4 * DEPTH:
        pytest.skip("the hard fd limit is too low for the test")
    deep_trees.append(upper.root)
    _deep(upper.root, b"deep")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    out = tmp_path / "layer.tar"
    proc = subprocess.run([sys.executable, "-m", "ocilayers", "pack", str(upper.root), "-o",
                           str(out), "--compression", "none"], preexec_fn=low_soft_limit,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(names(out.read_bytes())) == DEPTH + 1


def test_deep_tree_diff(tmp_path: Path, deep_trees: list[Path]) -> None:
    new, base = tmp_path / "new", tmp_path / "base"
    base.mkdir()
    deep_trees.append(new)
    rel = _deep(new, b"deep")
    out = io.BytesIO()
    write_tree_diff(new, base, out)
    assert names(out.getvalue())[-1] == (rel + "/leaf").encode()
    assert len(names(out.getvalue())) == DEPTH + 1


def test_deep_renamed_dir(upper: Upper, tmp_path: Path, need: Callable[..., None],
                          deep_trees: list[Path]) -> None:
    need("whiteout", "trusted")
    low = tmp_path / "deeplower"
    deep_trees.append(low / "old")
    rel = _deep(low / "old", b"deep")
    upper.whiteout("old")
    os.setxattr(upper.dir("new"), "trusted.overlay.redirect", b"old")
    got = by_name(pack(upper, lowers=[low]))
    assert got[f"new/{rel}/leaf".encode()].data == b"deep"


def test_xattr_name_with_equals_refused(upper: Upper, need: Callable[..., None]) -> None:
    """Found by fuzzing: "user.eq=name" came back from the PAX record as user.eq="name=val".
    Go's archive/tar refuses such a name too; nothing is written wrong."""
    need("user")
    f = upper.file("f", b"x")
    os.setxattr(f, "user.eq=name", b"val")
    with pytest.raises(UpperDirError, match="holds an '='"):
        pack(upper)


# =============================================================================================
# A container that keeps running while pack reads its upper dir (found by fuzzing: a dir
# swapped for a symlink to a host dir got the host's files packed)
# =============================================================================================

@pytest.mark.parametrize("when", ["inside", "before-entering"])
def test_dir_swapped_for_a_symlink_during_pack(upper: Upper, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               when: str) -> None:
    """The swap happens as pack writes `d/a` (pack is inside d: it goes on reading the dir it
    opened) or as it writes `d/` (before it opens d: the symlink is refused). Either way no
    host file reaches the layer."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "b").write_bytes(b"TOPSECRET")
    (host / "z").write_bytes(b"TOPSECRET")
    upper.file("d/a", b"a")
    upper.file("d/b", b"b")
    upper.stamp_dirs(T0)
    trigger = b"d/a" if when == "inside" else b"d"
    real_entry = differ._Writer.entry

    def entry(self: Any, rel: bytes, *args: Any, **kw: Any) -> None:
        real_entry(self, rel, *args, **kw)
        if rel == trigger:
            os.rename(upper.p("d"), upper.p("d.moved"))
            os.symlink(host, upper.p("d"))

    monkeypatch.setattr(differ._Writer, "entry", entry)
    if when == "inside":
        got = by_name(pack(upper))
        assert got[b"d/b"].data == b"b" and b"d/z" not in got
    else:
        with pytest.raises(OSError) as info:
            pack(upper)
        assert "pack 'd'" in " ".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("name", [".wh.passwd", ".wh..wh..opq"])
def test_file_named_like_a_whiteout_refused(upper: Upper, name: str) -> None:
    """A container can name a file `.wh.passwd`: written as is, every reader of the layer would
    delete passwd (or empty the dir) that the container still sees."""
    upper.file(f"etc/{name}", b"x")
    with pytest.raises(UpperDirError, match="cannot be stored in a layer"):
        pack(upper)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_lower_that_is_not_a_dir_refused(upper: Upper, tmp_path: Path, kind: str) -> None:
    lower = tmp_path / "lower"
    if kind == "file":
        lower.write_bytes(b"")
    upper.file("f", b"x")
    with pytest.raises(UpperDirError, match="not a directory"):
        pack(upper, lowers=[lower])


@pytest.mark.parametrize("inside", ["upper", "lower"])
def test_output_inside_what_is_packed_refused(upper: Upper, tmp_path: Path, capsys: Any,
                                              inside: str) -> None:
    """pack's temp file would end up in its own layer."""
    lower = tmp_path / "lower"
    lower.mkdir()
    upper.file("f", b"x")
    out = (upper.root if inside == "upper" else lower) / "sub" / ".." / "layer.tar"
    code, _o, err = run_cli(["pack", str(upper.root), "-o", str(out), "--lower", str(lower)],
                            capsys)
    assert_one_line_error(code, err, "inside")
    assert sorted(os.listdir(upper.root)) == ["f"] and os.listdir(lower) == []


def test_cli_userxattr(upper: Upper, tmp_path: Path, capsys: Any,
                       need: Callable[..., None]) -> None:
    """`pack --userxattr` reads user.overlay.* as the mount's metadata; without it, it is
    content the kernel ignored. `--base` compares plain trees: --userxattr has no place."""
    need("user")
    upper.file("o/child", b"c")
    upper.opaque("o", "user")
    upper.stamp_dirs(T0)
    plain, rootless = tmp_path / "plain.tar", tmp_path / "rootless.tar"
    for out, extra in ((plain, []), (rootless, ["--userxattr"])):
        code, _o, err = run_cli(["pack", str(upper.root), "-o", str(out), "--compression",
                                 "none", *extra], capsys)
        assert code == 0, err
    assert b"o/.wh..wh..opq" not in names(plain.read_bytes())
    assert b"o/.wh..wh..opq" in names(rootless.read_bytes())
    code, _o, err = run_cli(["pack", str(upper.root), "--base", str(tmp_path), "-o",
                             str(tmp_path / "x.tar"), "--userxattr"], capsys)
    assert_one_line_error(code, err, "--userxattr")


def test_deep_opaque_dir_over_deep_lower(upper: Upper, tmp_path: Path,
                                         need: Callable[..., None],
                                         deep_trees: list[Path]) -> None:
    """An opaque dir 1100 levels down asks the lowers about that path alone (nothing above it
    is looked up first): the lower lookup must not recurse either."""
    need("trusted")
    low = tmp_path / "deeplower"
    deep_trees.extend([upper.root, low])
    rel = _deep(low, b"lower")
    _deep(upper.root, b"upper")
    os.setxattr(upper.p(rel), "trusted.overlay.opaque", b"y")
    got = names(pack(upper, lowers=[low]))
    assert f"{rel}/.wh..wh..opq".encode() in got
