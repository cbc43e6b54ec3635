"""extract.py: apply_layer — named hostile cases, ordering, metadata, both whiteout modes, stats.

Every layer is built in code by tests/tarbuilder.py. Hostile cases run beside a sentinel tree
(`tmp_path/outside` and a dir in /tmp) that is snapshotted before and after: whatever the layer
does, nothing outside the target may change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb

from ocilayers.errors import ImageError, UnsafeEntryError
from ocilayers.extract import LayerStats, apply_layer
from ocilayers.filewriters import FileWriters
from ocilayers.store import diff_size
from ocilayers.tarstream import TarReader
from ocilayers.whiteout import TRUSTED, OverlayFormat

MODES = ("overlay", "delete")
NS = 1_000_000_000
T1 = 1_234_567_890 * NS + 123_456_789  # a header mtime with nanoseconds
T2 = 1_111_111_111 * NS + 987_654_321
OPAQUE = "trusted.overlay.opaque"
# A valid VFS_CAP_REVISION_2 blob, effective, permitted = cap_net_raw (what `setcap cap_net_raw+ep`
# writes); used when setcap is not installed.
CAP_NET_RAW_V2 = bytes.fromhex("0100000200200000000000000000000000000000")


# -- capability probes (skip by probing, never by uid) --

def _probe(fn: Callable[[Path], object], tmp: Path) -> str | None:
    """None when `fn` works in a scratch dir, else the reason it does not."""
    d = Path(tempfile.mkdtemp(dir=tmp))
    try:
        fn(d)
        return None
    except OSError as exc:
        return f"{fn.__name__}: {exc}"
    finally:
        shutil.rmtree(d)


def whiteout_mknod(d: Path) -> None:
    os.mknod(d / "wh", stat.S_IFCHR, os.makedev(0, 0))


def device_mknod(d: Path) -> None:
    os.mknod(d / "c", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(d / "b", stat.S_IFBLK | 0o600, os.makedev(8, 1))


def trusted_xattr(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.setxattr(d / "f", "trusted.ocilayers.probe", b"1")
    os.symlink("f", d / "l")
    os.setxattr(d / "l", "trusted.ocilayers.probe", b"1", follow_symlinks=False)


def user_xattr(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.setxattr(d / "f", "user.ocilayers.probe", b"1")


def foreign_chown(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.chown(d / "f", 1000, 1000)
    os.chown(d / "f", 2**31, 2**21 + 1)


def capability_xattr(d: Path) -> None:
    (d / "f").write_bytes(b"")
    os.setxattr(d / "f", "security.capability", CAP_NET_RAW_V2)


def _acl(*entries: tuple[int, int]) -> bytes:
    """A POSIX ACL xattr value (linux/posix_acl_xattr.h: version 2, then tag, perm, id)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                           for tag, perm in entries)


# user::rwx group::r-x other::--- : what is made below such a dir loses every "other" bit
ACL_NO_OTHER = _acl((0x01, 7), (0x04, 5), (0x20, 0))
ACL_ALL = _acl((0x01, 7), (0x04, 7), (0x20, 7))  # user::rwx group::rwx other::rwx


def posix_acl(d: Path) -> None:
    (d / "sub").mkdir()
    os.setxattr(d / "sub", "system.posix_acl_default", ACL_NO_OTHER)


PROBES = {f.__name__: f for f in (whiteout_mknod, device_mknod, trusted_xattr, user_xattr,
                                  foreign_chown, capability_xattr, posix_acl)}


@pytest.fixture(scope="session")
def caps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    tmp = tmp_path_factory.mktemp("probes")
    return {name: _probe(fn, tmp) for name, fn in PROBES.items()}


def need(caps: dict[str, str | None], *names: str) -> None:
    for name in names:
        if caps[name] is not None:
            pytest.skip(f"cannot {name.replace('_', ' ')} here ({caps[name]})")


def need_mode(caps: dict[str, str | None], mode: str, namespace: str = "trusted") -> None:
    """Overlay mode makes whiteout devices and (trusted) opaque xattrs."""
    if mode == "overlay":
        need(caps, "whiteout_mknod", "trusted_xattr" if namespace == "trusted" else "user_xattr")


# -- helpers --

WRITERS = ["serial"]  # how `apply` writes new files; set per test by `file_writers`


@pytest.fixture(autouse=True, params=["serial", "procs", "threads"])
def file_writers(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every case again with new files handed to file writer processes, then threads
    (filewriters.py): the result, and every refusal, must be the same."""
    WRITERS[0] = request.param
    yield request.param
    WRITERS[0] = "serial"


def apply(layer: list[tb.Member] | bytes, root: Path, **kw: Any) -> LayerStats:
    data = layer if isinstance(layer, bytes) else tb.build(layer)
    writers = None
    if WRITERS[0] != "serial" and kw.get("mode", "overlay") == "overlay":
        fmt = kw.get("fmt") or OverlayFormat.native()
        writers = FileWriters(root, 2, threads=WRITERS[0] == "threads", rootless=fmt.rootless)
    try:
        stats = apply_layer(io.BytesIO(data), root, writers=writers, **kw)
    finally:
        if writers is not None:
            writers.abort()
    # Every case of every table checks the size counted while applying against a walk.
    if stats.size is not None:
        assert stats.size == diff_size(str(root)), "stats.size differs from the dir's size"
    return stats


def xattrs(p: Path) -> dict[str, bytes]:
    return {n: os.getxattr(p, n, follow_symlinks=False)
            for n in sorted(os.listxattr(p, follow_symlinks=False))}


def is_whiteout(p: Path) -> bool:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def exists(p: Path) -> bool:
    return os.path.lexists(p)


def snapshot(tops: list[Path], skip: Path, *, loose: bool = False) -> dict[str, tuple[Any, ...]]:
    """Every path under `tops` (not following symlinks, not entering `skip`) with its metadata.

    `loose` leaves out nlink/ctime (for a case whose planted hardlink to an outside file is
    legitimately unlinked)."""
    out: dict[str, tuple[Any, ...]] = {}

    def visit(p: Path) -> None:
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            content: object = hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        else:
            content = None
        try:
            xa: object = xattrs(p)
        except OSError:
            xa = "?"
        rec: tuple[Any, ...] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                st.st_rdev, content, xa)
        if not loose:
            rec += (st.st_nlink, st.st_ctime_ns)
        out[str(p)] = rec
        if stat.S_ISDIR(st.st_mode):
            for child in sorted(os.listdir(p)):
                if p / child != skip:
                    visit(p / child)

    for top in tops:
        visit(top)
    return out


def plant(d: Path) -> None:
    """A sentinel tree: files, a dir, a symlink, known modes, nanosecond mtimes, an xattr."""
    d.mkdir(exist_ok=True)
    (d / "secret").write_bytes(b"secret\n")
    os.chmod(d / "secret", 0o640)
    with contextlib.suppress(OSError):  # user xattrs may be unsupported: the sentinel still works
        os.setxattr(d / "secret", "user.sentinel", b"1")
    (d / "dir").mkdir()
    (d / "dir" / "inner").write_bytes(b"inner\n")
    os.chmod(d / "dir", 0o750)
    os.symlink("secret", d / "link")
    for p in (d / "secret", d / "dir" / "inner", d / "dir", d):
        os.utime(p, ns=(1_000_000_000 * NS + 5, 1_000_000_000 * NS + 5))


@dataclass(frozen=True)
class World:
    """The target `root` and the sentinel trees beside it."""

    tmp: Path
    root: Path
    out: Path  # tmp_path/outside
    ext: Path  # a sentinel dir directly in /tmp

    def snap(self, loose: bool = False) -> dict[str, tuple[Any, ...]]:
        return snapshot([self.tmp, self.ext], self.root, loose=loose)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    root = tmp_path / "root"
    root.mkdir()
    plant(tmp_path / "outside")
    ext = Path(tempfile.mkdtemp(prefix="ocilayers-sentinel-", dir="/tmp"))
    plant(ext)
    try:
        yield World(tmp_path, root, tmp_path / "outside", ext)
    finally:
        shutil.rmtree(ext)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def assert_unchanged(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> None:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, "changed outside the target:\n" + "\n".join(
        f"  {k}: {before.get(k)} -> {after.get(k)}" for k in changed)


def message(exc: BaseException) -> str:
    return " ".join([str(exc), *getattr(exc, "__notes__", [])])


# -- the hostile table --

@dataclass(frozen=True)
class C:
    """What a case may refer to: the two sentinel dirs, as absolute paths."""

    out: str
    ext: str


Layer = Callable[[C], "list[tb.Member] | bytes"]


@dataclass(frozen=True)
class Hostile:
    layer: Layer
    error: type[Exception] | None = None  # else: applied, and `check` holds
    entry: str | None = None  # the entry the error message must quote
    check: Callable[[Path, str, C], None] | None = None
    prepare: Callable[[Path, C], None] | None = None  # content already in the target
    modes: tuple[str, ...] = MODES
    needs: tuple[str, ...] = ()
    kw: dict[str, Any] = field(default_factory=dict)
    loose: bool = False


def refused(layer: Layer, entry: str | None, error: type[Exception] = UnsafeEntryError,
            **kw: Any) -> Hostile:
    return Hostile(layer, error, entry, **kw)


def kind(p: Path) -> str:
    if not exists(p):
        return "missing"
    st = os.lstat(p)
    if is_whiteout(p):
        return "whiteout"
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFCHR: "char", stat.S_IFBLK: "block"}[
        stat.S_IFMT(st.st_mode)]


def is_(path: str, what: str, content: bytes | None = None) -> Callable[[Path, str, C], None]:
    def check(root: Path, mode: str, c: C) -> None:
        p = root / path
        assert kind(p) == what, (path, kind(p))
        if content is not None:
            assert p.read_bytes() == content

    return check


def all_of(*checks: Callable[[Path, str, C], None]) -> Callable[[Path, str, C], None]:
    def check(root: Path, mode: str, c: C) -> None:
        for ch in checks:
            ch(root, mode, c)

    return check


def symlink_to(name: str, target: str) -> Callable[[Path, C], None]:
    def prepare(root: Path, c: C) -> None:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target.format(out=c.out, ext=c.ext), p)

    return prepare


def dir_with_symlink(root: Path, c: C) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"lower")
    os.symlink(c.out, root / "d" / "l")
    os.symlink(c.out + "/secret", root / "d" / "s")


def _symlink_meta(root: Path, mode: str, c: C) -> None:
    st = os.lstat(root / "l")
    assert stat.S_ISLNK(st.st_mode)
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (4242, 4343, T1)


def _symlink_times(root: Path, mode: str, c: C) -> None:
    assert (os.lstat(root / "l").st_mtime_ns, os.lstat(root / "m").st_mtime_ns) == (1, 0)


def _symlink_xattr(root: Path, mode: str, c: C) -> None:
    assert xattrs(root / "l") == {"trusted.pwn": b"1"}


def _hardlinked_symlink(root: Path, mode: str, c: C) -> None:
    assert kind(root / "h") == "symlink"
    assert os.lstat(root / "h").st_ino == os.lstat(root / "l").st_ino
    assert os.readlink(root / "h") == c.out + "/secret"


def _escaped(xattr: str) -> Callable[[Path, str, C], None]:
    def check(root: Path, mode: str, c: C) -> None:
        found = {n: v for p in root.rglob("*") for n, v in xattrs(p).items()}
        found.update(xattrs(root))
        prefix, rest = xattr.split(".overlay.", 1)
        assert xattr not in found, found
        assert f"{prefix}.overlay.overlay.{rest}" in found, found

    return check


def _whiteout_or_gone(path: str) -> Callable[[Path, str, C], None]:
    def check(root: Path, mode: str, c: C) -> None:
        assert kind(root / path) == ("whiteout" if mode == "overlay" else "missing")

    return check


def _only_symlink_l(root: Path, mode: str, c: C) -> None:
    """`l` is a symlink, and the target holds nothing else (no whiteout, no dir below it)."""
    assert kind(root / "l") == "symlink"
    assert os.listdir(root) == ["l"]


def _planted_hardlink(root: Path, c: C) -> None:
    os.link(c.out + "/secret", root / "f")


def _negative_uid(c: C) -> bytes:
    return tb.entry(tb.header("f", fields={108: b"-000764\0"})) + tb.END


def _deep_chain(c: C) -> list[tb.Member]:
    links = [tb.symlink(f"l{i}", f"l{i + 1}") for i in range(40)]
    return [*links, tb.symlink("l40", c.out), tb.file("l0/secret", b"pwned")]


HOSTILE: dict[str, Hostile] = {
    # symlinks as parents: never followed, not even inside the root
    "symlink-absolute": refused(lambda c: [tb.symlink("l", c.out), tb.file("l/pwn", b"x")],
                                "l/pwn"),
    "symlink-absolute-tmp": refused(lambda c: [tb.symlink("l", c.ext),
                                               tb.file("l/secret", b"pwned")], "l/secret"),
    "symlink-relative-escape": refused(lambda c: [tb.symlink("l", "../outside"),
                                                  tb.file("l/secret", b"pwned")], "l/secret"),
    "symlink-up-and-out": refused(lambda c: [tb.dir("d"), tb.symlink("d/l", "../" * 30),
                                             tb.file(f"d/l{c.out}/secret", b"pwned")], None),
    "symlink-parent-escape": refused(lambda c: [tb.symlink("up", ".."),
                                                tb.file("up/outside/secret", b"pwned")],
                                     "up/outside/secret"),
    "symlink-multiple-absolute": refused(lambda c: [tb.symlink("l1", c.out),
                                                    tb.symlink("l2", "/l1"),
                                                    tb.file("l2/secret", b"pwned")], "l2/secret"),
    "symlink-multiple-relative": refused(lambda c: [tb.symlink("l1", "../outside"),
                                                    tb.symlink("l2", "l1"),
                                                    tb.file("l2/secret", b"pwned")], "l2/secret"),
    "symlink-inside-root-parent": refused(lambda c: [tb.dir("real"), tb.symlink("l", "real"),
                                                     tb.file("l/f", b"x")], "l/f"),
    "symlink-dir-then-write-through": refused(
        lambda c: [tb.dir("d"), tb.symlink("d/l", c.out), tb.file("d/l/secret", b"pwned")],
        "d/l/secret"),
    "symlink-dir-entry-through": refused(
        lambda c: [tb.symlink("l", c.out), tb.dir("l/newdir", mode=0o777)], "l/newdir/"),
    "symlink-device-through": refused(lambda c: [tb.symlink("l", c.out), tb.fifo("l/fifo")],
                                      "l/fifo"),
    "symlink-hardlink-name-through": refused(
        lambda c: [tb.file("a", b"x"), tb.symlink("l", c.out), tb.hardlink("l/h", "a")], "l/h"),
    "symlink-loop-parent": refused(lambda c: [tb.symlink("a", "b"), tb.symlink("b", "a"),
                                              tb.file("a/x")], "a/x"),
    "symlink-self-loop-parent": refused(lambda c: [tb.symlink("s", "s"), tb.file("s/x")], "s/x"),
    "deep-symlink-chain-parent": refused(_deep_chain, "l0/secret"),
    # a symlink planted by an earlier entry is replaced, never written through
    "symlink-replaced-by-file": Hostile(
        lambda c: [tb.symlink("f", c.out + "/secret"), tb.file("f", b"new", mode=0o777)],
        check=is_("f", "file", b"new")),
    "symlink-replaced-by-dir": Hostile(
        lambda c: [tb.symlink("d", c.out), tb.dir("d", mode=0o777, mtime=1)],
        check=is_("d", "dir")),
    "symlink-replaced-by-fifo": Hostile(
        lambda c: [tb.symlink("n", c.out + "/secret"), tb.fifo("n", mode=0o666)],
        check=is_("n", "fifo")),
    "symlink-replaced-by-hardlink": Hostile(
        lambda c: [tb.file("a", b"A"), tb.symlink("l", c.out + "/secret"),
                   tb.hardlink("l", "a")],
        check=is_("l", "file", b"A")),
    "symlink-trailing-slash-file": Hostile(
        lambda c: [tb.symlink("l", c.out + "/secret"), tb.file("l/", b"new")],
        check=is_("l", "file", b"new")),
    # metadata of a symlink is set on the link itself
    "chmod-through-symlink": Hostile(
        lambda c: [tb.symlink("l", c.out + "/secret", mode=0o7777),
                   tb.symlink("d", c.out + "/dir", mode=0o777)],
        check=all_of(is_("l", "symlink"), is_("d", "symlink"))),
    "chown-through-symlink": Hostile(
        lambda c: [tb.symlink("l", c.out + "/secret", uid=4242, gid=4343, mtime_ns=T1)],
        check=_symlink_meta, needs=("foreign_chown",)),
    "utime-through-symlink": Hostile(
        lambda c: [tb.symlink("l", c.ext + "/dir", mtime_ns=1), tb.symlink("m", c.out, mtime=0)],
        check=_symlink_times),
    "xattr-through-symlink": Hostile(
        lambda c: [tb.symlink("l", c.out + "/secret", xattrs={"trusted.pwn": b"1"})],
        check=_symlink_xattr, needs=("trusted_xattr",)),
    "dir-then-symlink-chmod": Hostile(
        lambda c: [tb.dir("d", mode=0o777, mtime=1), tb.symlink("d", c.out)],
        check=is_("d", "symlink")),
    # `..` and absolute names
    "dotdot-escape": refused(lambda c: [tb.file("../secret", b"pwned")], "../secret"),
    "dotdot-inner-escape": refused(lambda c: [tb.file("a/../../secret", b"pwned")],
                                   "a/../../secret"),
    "dotdot-dir-entry": refused(lambda c: [tb.dir("../newdir")], "../newdir/"),
    "dotdot-symlink-name": refused(lambda c: [tb.symlink("../l", "x")], "../l"),
    "absolute-path": Hostile(lambda c: [tb.file(c.out + "/secret", b"pwned")],
                             check=lambda root, mode, c: is_(c.out.lstrip("/") + "/secret",
                                                            "file", b"pwned")(root, mode, c)),
    "absolute-dotdot": refused(lambda c: [tb.file("/../secret", b"pwned")], "/../secret"),
    # hardlinks
    "hardlink-escape": refused(lambda c: [tb.hardlink("h", "../outside/secret")], "h"),
    "hardlink-absolute-escape": refused(lambda c: [tb.hardlink("h", c.out + "/secret")], "h",
                                        ImageError),
    "hardlink-symlink-escape": refused(lambda c: [tb.symlink("l", c.out),
                                                  tb.hardlink("h", "l/secret")], "h"),
    "hardlink-symlink-relative-escape": refused(
        lambda c: [tb.symlink("l", "../outside"), tb.hardlink("h", "l/secret")], "h"),
    "hardlink-through-planted-symlink": refused(
        lambda c: [tb.hardlink("h", "l/secret")], "h", prepare=symlink_to("l", "{out}")),
    "hardlink-to-symlink": Hostile(
        lambda c: [tb.symlink("l", c.out + "/secret"), tb.hardlink("h", "l")],
        check=_hardlinked_symlink),
    "hardlink-to-symlink-then-write": Hostile(
        lambda c: [tb.symlink("l", c.out + "/secret"), tb.hardlink("h", "l"),
                   tb.file("h", b"pwned")],
        check=all_of(is_("h", "file", b"pwned"), is_("l", "symlink"))),
    "hardlink-symlink-before-target": Hostile(
        lambda c: [tb.hardlink("h", "l"), tb.symlink("l", c.out + "/secret")],
        check=_hardlinked_symlink),
    "hardlink-symlink-chmod": Hostile(
        lambda c: [tb.symlink("l", c.out + "/secret"),
                   tb.hardlink("h", "l", mode=0o7777, uid=4242, mtime=0)],
        check=_hardlinked_symlink),
    "hardlink-to-dir": refused(lambda c: [tb.dir("d"), tb.hardlink("h", "d")], "h"),
    "hardlink-to-root": refused(lambda c: [tb.hardlink("h", "./")], "h"),
    "hardlink-to-missing": refused(lambda c: [tb.hardlink("h", "nope")], "h", ImageError),
    "hardlink-to-self": refused(lambda c: [tb.hardlink("h", "h")], "h"),
    "hardlink-dotdot-name": refused(lambda c: [tb.file("a"), tb.hardlink("../h", "a")], "../h"),
    "hardlink-to-whiteout": refused(lambda c: [tb.whiteout("a"), tb.hardlink("h", "a")], "h",
                                    ImageError),
    # whiteouts
    "bare-whiteout": refused(lambda c: [tb.file(".wh.")], ".wh."),
    "whiteout-dot": refused(lambda c: [tb.file("d/.wh..")], "d/.wh.."),
    "whiteout-escape": refused(lambda c: [tb.file("d/.wh...")], "d/.wh..."),
    "whiteout-root-parent": refused(lambda c: [tb.file(".wh...")], ".wh..."),
    "whiteout-dotdot": refused(lambda c: [tb.whiteout("../secret")], "../.wh.secret"),
    "whiteout-absolute": Hostile(lambda c: [tb.whiteout(c.out + "/secret")],
                                 check=lambda root, mode, c: _whiteout_or_gone(
                                     c.out.lstrip("/") + "/secret")(root, mode, c)),
    # below a symlink of the same layer a whiteout hides nothing (umoci repack writes them):
    # ignored, never followed, whichever comes first (tests/test_foreign_layers.py)
    "whiteout-below-same-layer-symlink": Hostile(
        lambda c: [tb.symlink("l", c.out), tb.whiteout("l/secret"), tb.whiteout("l/dir")],
        check=_only_symlink_l),
    "whiteout-before-same-layer-symlink": Hostile(
        lambda c: [tb.whiteout("l/secret"), tb.whiteout("l/dir"), tb.symlink("l", c.out)],
        check=_only_symlink_l),
    "whiteout-nested-below-same-layer-symlink": Hostile(
        lambda c: [tb.symlink("l", c.out), tb.whiteout("l/dir/inner"), tb.opaque("l/dir")],
        check=_only_symlink_l),
    "whiteout-below-planted-symlink-then-own": Hostile(
        lambda c: [tb.whiteout("l/secret"), tb.symlink("l", c.out + "/dir")],
        check=_only_symlink_l, prepare=symlink_to("l", "{out}")),
    "whiteout-below-planted-symlink-then-dir": refused(
        lambda c: [tb.whiteout("l/secret"), tb.dir("l")], "l/.wh.secret",
        prepare=symlink_to("l", "{out}")),
    "whiteout-through-planted-symlink": refused(
        lambda c: [tb.whiteout("l/secret")], "l/.wh.secret", prepare=symlink_to("l", "{out}")),
    "whiteout-of-planted-symlink": Hostile(
        lambda c: [tb.whiteout("l")], check=_whiteout_or_gone("l"),
        prepare=symlink_to("l", "{out}")),
    "whiteout-dir-holding-symlinks": Hostile(
        lambda c: [tb.whiteout("d")], check=_whiteout_or_gone("d"), prepare=dir_with_symlink),
    "opaque-below-same-layer-symlink": Hostile(
        lambda c: [tb.symlink("l", c.out), tb.opaque("l")], check=_only_symlink_l),
    "opaque-before-same-layer-symlink": Hostile(
        lambda c: [tb.opaque("l"), tb.symlink("l", c.out)], check=_only_symlink_l),
    "opaque-through-planted-symlink": refused(
        lambda c: [tb.opaque("l")], "l/.wh..wh..opq", prepare=symlink_to("l", "{out}")),
    "opaque-over-planted-symlinks": Hostile(
        lambda c: [tb.opaque("d")], check=is_("d", "dir"), prepare=dir_with_symlink),
    "root-opaque-over-planted-symlink": Hostile(
        lambda c: [tb.opaque("")], check=is_("l", "missing"),
        prepare=symlink_to("l", "{out}"), modes=("delete",)),
    # forged overlay xattrs are escaped
    "xattr-forging-opaque": Hostile(
        lambda c: [tb.dir("d", xattrs={OPAQUE: b"y"})], check=_escaped(OPAQUE),
        needs=("trusted_xattr",)),
    "xattr-forging-redirect": Hostile(
        lambda c: [tb.dir("d", xattrs={"trusted.overlay.redirect": b"/etc"})],
        check=_escaped("trusted.overlay.redirect"), needs=("trusted_xattr",)),
    "xattr-forging-metacopy": Hostile(
        lambda c: [tb.file("f", b"x", xattrs={"trusted.overlay.metacopy": b""})],
        check=_escaped("trusted.overlay.metacopy"), needs=("trusted_xattr",)),
    "xattr-forging-xattr-whiteout": Hostile(
        lambda c: [tb.file("f", xattrs={"trusted.overlay.whiteout": b"y"})],
        check=_escaped("trusted.overlay.whiteout"), needs=("trusted_xattr",)),
    "xattr-forging-user-opaque": Hostile(
        lambda c: [tb.dir("d", xattrs={"user.overlay.opaque": b"y"})],
        check=_escaped("user.overlay.opaque"), needs=("user_xattr",),
        kw={"fmt": OverlayFormat.native("user")}),
    "xattr-forging-on-root-entry": Hostile(
        lambda c: [tb.dir("./", xattrs={OPAQUE: b"y"})], check=_escaped(OPAQUE),
        needs=("trusted_xattr",)),
    # the root entry
    "root-entry-not-dir": refused(lambda c: [tb.file("./", b"x")], "./"),
    "root-entry-symlink": refused(lambda c: [tb.symlink(".", c.out)], "."),
    "root-entry-hardlink": refused(lambda c: [tb.file("a"), tb.hardlink(".", "a")], "."),
    "root-entry-fifo": refused(lambda c: [tb.fifo("/")], "/"),
    # content already in the target (a lower rootfs in delete mode)
    "file-over-planted-symlink": Hostile(
        lambda c: [tb.file("f", b"new", mode=0o777)], check=is_("f", "file", b"new"),
        prepare=symlink_to("f", "{out}/secret")),
    "dir-over-planted-symlink": Hostile(
        lambda c: [tb.dir("etc", mode=0o700, mtime=1)], check=is_("etc", "dir"),
        prepare=symlink_to("etc", "{out}")),
    "write-below-planted-symlink": refused(lambda c: [tb.file("etc/secret", b"pwned")],
                                           "etc/secret", prepare=symlink_to("etc", "{out}")),
    "write-below-planted-relative-symlink": refused(
        lambda c: [tb.file("lib/secret", b"pwned")], "lib/secret",
        prepare=symlink_to("lib", "../outside")),
    "file-over-planted-hardlink": Hostile(
        lambda c: [tb.file("f", b"pwned", mode=0o777)], check=is_("f", "file", b"pwned"),
        prepare=_planted_hardlink, loose=True),
    # malformed
    "negative-uid": refused(_negative_uid, None, ImageError),
    "parent-is-file": refused(lambda c: [tb.file("a"), tb.file("a/b")], "a/b", ImageError),
    "unsupported-type": refused(lambda c: tb.entry(tb.header("z", b"Z")) + tb.END, "z",
                                ImageError),
    # fields no file system can hold (found by fuzzing: they used to escape as ValueError or
    # OverflowError from os.*)
    "pax-path-nul": refused(lambda c: _pax_then("x", {"path": b"x\0/secret"}), None, ImageError),
    "pax-linkpath-nul": refused(lambda c: _pax_then("s", {"linkpath": b"t\0x"}, b"2"), None,
                                ImageError),
    "pax-uid-2^32": refused(lambda c: _pax_then("x", {"uid": "4294967296"}), "x", ImageError),
    "pax-mtime-huge": refused(lambda c: _pax_then("d", {"mtime": "9" * 30}, b"5"), "d",
                              ImageError),
    "chardev-major-2^31": refused(
        lambda c: tb.entry(tb.header("c", b"3", fields={329: tb.base256((1 << 31) + 5, 8)}))
        + tb.END, "c", ImageError),
    "blockdev-minor-2^20": refused(lambda c: [tb.blockdev("b", 8, 1 << 20)], "b", ImageError),
    "chardev-major-2^40": refused(
        lambda c: tb.entry(tb.header("c", b"3", fields={329: tb.base256(1 << 40, 8)})) + tb.END,
        "c", ImageError),
    "path-over-path-max": refused(lambda c: [tb.file("a/" * 2048 + "f", b"x")], None,
                                  ImageError),
    "hardlink-target-over-path-max": refused(
        lambda c: [tb.file("f", b"x"), tb.hardlink("h", "./" * 2048 + "f")], None, ImageError),
    # a char device 0/0 would be a whiteout nobody asked for in a diff dir (delete mode makes
    # the device: test_chardev_0_0_in_delete_mode)
    "chardev-0-0-overlay": refused(lambda c: [tb.dir("etc"), tb.chardev("etc/passwd", 0, 0)],
                                   "etc/passwd", ImageError, modes=("overlay",)),
}


def _pax_then(name: str, records: dict[str, Any], type_: bytes = b"0") -> bytes:
    return tb.pax_header(records) + tb.entry(tb.header(name, type_)) + tb.END


@pytest.mark.parametrize(("case", "mode"), [
    pytest.param(case, mode, id=f"{name}-{mode}")
    for name, case in HOSTILE.items() for mode in case.modes])
def test_hostile(case: Hostile, mode: str, world: World, caps: dict[str, str | None]) -> None:
    need(caps, *case.needs)
    need_mode(caps, mode, case.kw.get("fmt", TRUSTED).xattr_namespace)
    c = C(str(world.out), str(world.ext))
    if case.prepare is not None:
        case.prepare(world.root, c)
    before = world.snap(case.loose)
    layer = case.layer(c)
    try:
        if case.error is not None:
            with pytest.raises(case.error) as info:
                apply(layer, world.root, mode=mode, **case.kw)
            if case.entry is not None:
                assert f"'{case.entry}'" in message(info.value), message(info.value)
        else:
            apply(layer, world.root, mode=mode, **case.kw)
            assert case.check is not None
            case.check(world.root, mode, c)
    finally:
        assert_unchanged(before, world.snap(case.loose))


# -- POSIX ACLs: the header's mode, whatever a default ACL would make of it (as dockerd:
# moby's createTarFile chmods every entry but symlinks, after chown and the xattrs) --

ACL_MODES = {"f": 0o644, "x": 0o755, "sub/g": 0o604, "p": 0o646}


def acl_layer(prefix: str) -> list[tb.Member]:
    return [tb.file(f"{prefix}f", b"f\n", mode=0o644), tb.file(f"{prefix}x", b"#!\n", mode=0o755),
            tb.file(f"{prefix}sub/g", b"g", mode=0o604), tb.fifo(f"{prefix}p", mode=0o646)]


def assert_acl_modes(root: Path, prefix: str) -> None:
    got = {name: oct(stat.S_IMODE(os.lstat(root / f"{prefix}{name}").st_mode))
           for name in ACL_MODES}
    assert got == {name: oct(m) for name, m in ACL_MODES.items()}


@pytest.mark.parametrize("mode", ["overlay", "delete"])
def test_a_default_acl_of_the_layer_does_not_change_the_modes_made(
        tmp_path: Path, caps: dict[str, str | None], mode: str) -> None:
    """A dir of the layer brings a default ACL (user::rwx group::r-x other::---); what the
    layer makes in it later still gets its header's mode, where the ACL would take every
    "other" bit (and the umask would take none of these)."""
    need(caps, "posix_acl")
    root = tmp_path / "root"
    root.mkdir()
    apply([tb.dir("d", mode=0o755, xattrs={"system.posix_acl_default": ACL_NO_OTHER}),
           *acl_layer("d/")], root, mode=mode)
    assert_acl_modes(root, "d/")
    assert os.getxattr(root / "d", "system.posix_acl_default") == ACL_NO_OTHER


@pytest.mark.parametrize("mode", ["overlay", "delete"])
def test_a_target_with_a_default_acl_does_not_change_the_modes_made(
        tmp_path: Path, caps: dict[str, str | None], mode: str) -> None:
    """The same below a target dir that has a default ACL of its own (a store on a shared
    dir, say)."""
    need(caps, "posix_acl")
    root = tmp_path / "root"
    root.mkdir()
    os.setxattr(root, "system.posix_acl_default", ACL_NO_OTHER)
    apply(acl_layer(""), root, mode=mode)
    assert_acl_modes(root, "")


def test_a_files_own_acl_gives_way_to_its_header_mode(
        tmp_path: Path, caps: dict[str, str | None]) -> None:
    """A file's own ACL (rwx for all) rewrites its mode when set; the header's mode (0640)
    is set after it, as dockerd does."""
    need(caps, "posix_acl")
    root = tmp_path / "root"
    root.mkdir()
    apply([tb.file("f", b"f", mode=0o640, xattrs={"system.posix_acl_access": ACL_ALL})], root)
    assert stat.S_IMODE(os.lstat(root / "f").st_mode) == 0o640


def test_chardev_0_0_in_delete_mode(tmp_path: Path, caps: dict[str, str | None]) -> None:
    """On a plain rootfs the image's device is what it says: a char device 0/0 over the lower
    file."""
    need(caps, "whiteout_mknod")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    apply([tb.dir("etc"), tb.chardev("etc/passwd", 0, 0)], tmp_path, mode="delete")
    st = os.lstat(tmp_path / "etc" / "passwd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@pytest.mark.parametrize("extra,ok", [(0, True), (1, False)], ids=["fits", "one-byte-over"])
def test_path_up_to_path_max_below_the_target(tmp_path: Path, extra: int, ok: bool) -> None:
    """The longest name applied is the one whose absolute path still fits PATH_MAX, so that
    everything working with paths (dockerd, diff_size, a shell) can reach it."""
    room = 4095 - len(str(tmp_path)) - 1
    dirs = ("d" * 254 + "/") * ((room - 1) // 255)
    name = dirs + "f" * (room - len(dirs) + extra)
    assert len(name) == room + extra and len(name.rsplit("/", 1)[1]) <= 255
    if ok:
        apply([tb.file(name, b"deep")], tmp_path, mode="overlay")  # diff_size walks it too
        assert (tmp_path / name).read_bytes() == b"deep"
    else:
        with pytest.raises(ImageError, match="too long"):
            apply([tb.file(name, b"deep")], tmp_path, mode="overlay")


def test_hostile_table_is_big_enough() -> None:
    assert len(HOSTILE) >= 30


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda w: (w.out / "secret").write_bytes(b"pwned\n"), id="content"),
    pytest.param(lambda w: os.chmod(w.out / "secret", 0o644), id="mode"),
    pytest.param(lambda w: os.utime(w.ext / "dir", ns=(0, 0)), id="mtime"),
    pytest.param(lambda w: os.setxattr(w.out / "dir", "user.x", b"1"), id="xattr"),
    pytest.param(lambda w: os.link(w.out / "secret", w.root / "h"), id="hardlinked"),
    pytest.param(lambda w: (w.ext / "new").write_bytes(b""), id="created-in-tmp"),
    pytest.param(lambda w: (w.out / "dir" / "inner").unlink(), id="deleted"),
    pytest.param(lambda w: (w.tmp / "beside-root").mkdir(), id="created-beside-root"),
])
def test_sentinel_snapshot_sees_changes(mutate: Callable[[World], object], world: World) -> None:
    """The harness itself: every kind of change outside the target shows in the snapshot."""
    before = world.snap()
    mutate(world)
    with pytest.raises(AssertionError, match="changed outside the target"):
        assert_unchanged(before, world.snap())
    before = world.snap()
    (world.root / "inside").write_bytes(b"")  # changes inside the target are not reported
    assert_unchanged(before, world.snap())


# -- ordering --

def lower_tree(root: Path) -> None:
    """Lower content for delete mode: a file `a`, a dir `d` with children."""
    (root / "a").write_bytes(b"old")
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "old").write_bytes(b"old")
    (root / "d" / "sub" / "old").write_bytes(b"old")
    (root / "keep").write_bytes(b"keep")


def _readd_dir(root: Path, mode: str) -> None:
    assert (root / "d" / "new").read_bytes() == b"new"
    assert not exists(root / "d" / "old") and not exists(root / "d" / "sub")
    if mode == "overlay":
        assert os.getxattr(root / "d", OPAQUE) == b"y"
    else:
        assert (root / "keep").read_bytes() == b"keep"


def _readd_file(root: Path, mode: str) -> None:
    assert kind(root / "a") == "file"
    assert (root / "a").read_bytes() == b"new"
    assert OPAQUE not in os.listxattr(root / "a")


def _opaque_siblings(root: Path, mode: str) -> None:
    assert (root / "d" / "a").read_bytes() == b"A"
    assert (root / "d" / "sub" / "b").read_bytes() == b"B"
    if mode == "overlay":
        assert os.getxattr(root / "d", OPAQUE) == b"y"
    else:
        assert sorted(os.listdir(root / "d")) == ["a", "sub"]
        assert os.listdir(root / "d" / "sub") == ["b"]
    assert not exists(root / "d" / ".wh..wh..opq")


def _opaque_implicit_subdir(root: Path, mode: str) -> None:
    assert (root / "d" / "sub" / "new").read_bytes() == b"new"
    if mode == "delete":
        assert sorted(os.listdir(root / "d")) == ["sub"]
        assert os.listdir(root / "d" / "sub") == ["new"]
    else:
        assert os.getxattr(root / "d", OPAQUE) == b"y"


def _hardlink_pair(h: str, a: str) -> Callable[[Path, str], None]:
    def check(root: Path, mode: str) -> None:
        assert (root / a).read_bytes() == b"data"
        assert os.lstat(root / h).st_ino == os.lstat(root / a).st_ino
        assert os.lstat(root / a).st_nlink == 2

    return check


def _dir_times(root: Path, mode: str) -> None:
    assert os.lstat(root / "d").st_mtime_ns == T1
    assert os.lstat(root / "d" / "sub").st_mtime_ns == T2
    assert os.lstat(root / "d" / "sub" / "deeper").st_mtime_ns == T1 + 1
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(root / "d" / "sub").st_mode) == 0o555


def _last_dir_entry_wins(root: Path, mode: str) -> None:
    st = os.lstat(root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o711, T2)
    assert (root / "d" / "f").exists()


def _deferred_then_replaced(root: Path, mode: str) -> None:
    assert (root / "h").read_bytes() == b"mine", "the later entry for 'h' must win"
    assert (root / "t").read_bytes() == b"data"


DIR_T = [tb.dir("d", mode=0o750, mtime_ns=T1), tb.file("d/f", b"x"),
         tb.dir("d/sub", mode=0o555, mtime_ns=T2), tb.dir("d/sub/deeper", mtime_ns=T1 + 1),
         tb.file("d/sub/deeper/g", b"y"), tb.symlink("d/sub/s", "x"), tb.fifo("d/sub/p"),
         tb.hardlink("d/sub/h", "d/f"), tb.file("d/sub/g", b"z")]

ORDERING: dict[str, tuple[list[tb.Member], Callable[[Path, str], None]]] = {
    "opaque-marker-last": ([tb.dir("d"), tb.file("d/a", b"A"), tb.dir("d/sub"),
                            tb.file("d/sub/b", b"B"), tb.opaque("d")], _opaque_siblings),
    "opaque-marker-first": ([tb.opaque("d"), tb.dir("d"), tb.file("d/a", b"A"), tb.dir("d/sub"),
                             tb.file("d/sub/b", b"B")], _opaque_siblings),
    "opaque-marker-middle": ([tb.dir("d"), tb.file("d/a", b"A"), tb.opaque("d"), tb.dir("d/sub"),
                              tb.file("d/sub/b", b"B")], _opaque_siblings),
    "opaque-marker-first-implicit-dirs": ([tb.opaque("d"), tb.file("d/a", b"A"),
                                           tb.file("d/sub/b", b"B")], _opaque_siblings),
    "opaque-marker-last-implicit-subdir": ([tb.file("d/sub/new", b"new"), tb.opaque("d")],
                                           _opaque_implicit_subdir),
    "whiteout-then-file": ([tb.whiteout("a"), tb.file("a", b"new")], _readd_file),
    "file-then-whiteout": ([tb.file("a", b"new"), tb.whiteout("a")], _readd_file),
    "whiteout-then-dir": ([tb.whiteout("d"), tb.dir("d"), tb.file("d/new", b"new")], _readd_dir),
    "dir-then-whiteout": ([tb.dir("d"), tb.file("d/new", b"new"), tb.whiteout("d")], _readd_dir),
    "whiteout-between-dir-and-child": ([tb.dir("d"), tb.whiteout("d"), tb.file("d/new", b"new")],
                                       _readd_dir),
    "whiteout-then-implicit-dir": ([tb.whiteout("d"), tb.file("d/new", b"new")], _readd_dir),
    "implicit-dir-then-whiteout": ([tb.file("d/new", b"new"), tb.whiteout("d")], _readd_dir),
    "hardlink-before-target": ([tb.hardlink("h", "t"), tb.file("t", b"data")],
                               _hardlink_pair("h", "t")),
    "hardlink-before-target-other-dir": ([tb.hardlink("x/h", "e/a"), tb.dir("e"),
                                          tb.file("e/a", b"data")], _hardlink_pair("x/h", "e/a")),
    "hardlink-after-target": ([tb.file("t", b"data"), tb.hardlink("h", "t")],
                              _hardlink_pair("h", "t")),
    "hardlink-deferred-then-replaced": ([tb.hardlink("h", "t"), tb.file("h", b"mine"),
                                         tb.file("t", b"data")], _deferred_then_replaced),
    "dir-mtime-restored-last": (DIR_T, _dir_times),
    "dir-entry-after-children": ([*DIR_T[1:], DIR_T[0]], _dir_times),
    "dir-entry-repeated-last-wins": ([tb.dir("d", mode=0o700, mtime_ns=T1), tb.file("d/f"),
                                      tb.dir("d", mode=0o711, mtime_ns=T2)], _last_dir_entry_wins),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("layer", "check"), [
    pytest.param(layer, check, id=name) for name, (layer, check) in ORDERING.items()])
def test_ordering(layer: list[tb.Member], check: Callable[[Path, str], None], mode: str,
                  root: Path, caps: dict[str, str | None]) -> None:
    need_mode(caps, mode)
    if mode == "delete":
        lower_tree(root)
    apply(layer, root, mode=mode)
    check(root, mode)
    assert not list(root.rglob(".wh.*"))


# -- metadata --

@dataclass(frozen=True)
class Want:
    path: str
    type: int
    perm: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    rdev: tuple[int, int] | None = None


META: dict[str, tuple[list[tb.Member], str, Want, tuple[str, ...]]] = {
    "file-owner-mode-ns": ([tb.file("f", b"x", mode=0o640, uid=1000, gid=2000, mtime_ns=T1)],
                           "pax", Want("f", stat.S_IFREG, 0o640, 1000, 2000, T1), ()),
    "setuid-after-chown": ([tb.file("f", b"x", mode=0o4755, uid=1000, gid=1000)], "pax",
                           Want("f", stat.S_IFREG, 0o4755, 1000, 1000), ()),
    "setgid-file-after-chown": ([tb.file("f", b"x", mode=0o2755, uid=1000, gid=1000)], "pax",
                                Want("f", stat.S_IFREG, 0o2755, 1000, 1000), ()),
    "all-special-bits-file": ([tb.file("f", b"x", mode=0o7777, uid=1000, gid=1000)], "gnu",
                              Want("f", stat.S_IFREG, 0o7777, 1000, 1000), ()),
    "setgid-dir": ([tb.dir("d", mode=0o2775, uid=1000, gid=1000), tb.file("d/f")], "pax",
                   Want("d", stat.S_IFDIR, 0o2775, 1000, 1000), ()),
    "sticky-dir": ([tb.dir("d", mode=0o1777, uid=1000, gid=1000), tb.dir("d/sub")], "pax",
                   Want("d", stat.S_IFDIR, 0o1777, 1000, 1000), ()),
    "dir-ns-mtime": ([tb.dir("d", mtime_ns=T1), tb.file("d/f"), tb.dir("d/e")], "pax",
                     Want("d", stat.S_IFDIR, 0o755, 0, 0, T1), ()),
    "symlink-owner-ns-mtime": ([tb.symlink("l", "target", uid=1000, gid=1001, mtime_ns=T1)],
                               "pax", Want("l", stat.S_IFLNK, None, 1000, 1001, T1), ()),
    "char-device": ([tb.chardev("c", 1, 3, mode=0o620, uid=5, gid=6, mtime_ns=T1)], "pax",
                    Want("c", stat.S_IFCHR, 0o620, 5, 6, T1, (1, 3)), ("device_mknod",)),
    "block-device": ([tb.blockdev("b", 8, 1, mode=0o660, uid=0, gid=6, mtime_ns=T2)], "pax",
                     Want("b", stat.S_IFBLK, 0o660, 0, 6, T2, (8, 1)), ("device_mknod",)),
    "big-device-numbers": ([tb.chardev("c", 4095, 1048575)], "gnu",
                           Want("c", stat.S_IFCHR, 0o666, rdev=(4095, 1048575)),
                           ("device_mknod",)),
    "fifo": ([tb.fifo("p", mode=0o604, uid=7, gid=8, mtime_ns=T1)], "pax",
             Want("p", stat.S_IFIFO, 0o604, 7, 8, T1), ()),
    "pre-1970-mtime": ([tb.file("f", mtime_ns=-1_500_000_000)], "pax",
                       Want("f", stat.S_IFREG, mtime_ns=-1_500_000_000), ()),
    "uid-2^21-gnu-base256": ([tb.file("f", uid=2**21, gid=2**21 + 1)], "gnu",
                             Want("f", stat.S_IFREG, uid=2**21, gid=2**21 + 1), ()),
    "uid-2^31-pax": ([tb.file("f", uid=2**31, gid=2**32 - 2)], "pax",
                     Want("f", stat.S_IFREG, uid=2**31, gid=2**32 - 2), ()),
    "dir-uid-big-gnu": ([tb.dir("d", uid=3_000_000, gid=3_000_001, mode=0o700)], "gnu",
                        Want("d", stat.S_IFDIR, 0o700, 3_000_000, 3_000_001), ()),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("layer", "fmt", "want", "needs"), [
    pytest.param(*v, id=k) for k, v in META.items()])
def test_metadata(layer: list[tb.Member], fmt: str, want: Want, needs: tuple[str, ...], mode: str,
                  root: Path, caps: dict[str, str | None]) -> None:
    need(caps, "foreign_chown", *needs)
    need_mode(caps, mode)
    apply(tb.build(layer, fmt), root, mode=mode)
    st = os.lstat(root / want.path)
    got = {"type": stat.S_IFMT(st.st_mode), "perm": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
           "gid": st.st_gid, "mtime_ns": st.st_mtime_ns,
           "rdev": (os.major(st.st_rdev), os.minor(st.st_rdev))}
    expected = {k: v for k, v in dataclasses.asdict(want).items() if k != "path" and v is not None}
    if want.mtime_ns is None:
        expected["mtime_ns"] = tb.MTIME * NS  # the builder's default header mtime
    assert {k: got[k] for k in expected} == expected


@pytest.fixture(scope="session")
def capability_blob(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """What `setcap cap_net_raw+ep` writes, read back; the known v2 blob without setcap."""
    setcap = shutil.which("setcap")
    if setcap is None:
        return CAP_NET_RAW_V2
    f = tmp_path_factory.mktemp("setcap") / "f"
    f.write_bytes(b"")
    proc = subprocess.run([setcap, "cap_net_raw+ep", str(f)], capture_output=True)
    if proc.returncode != 0:
        return CAP_NET_RAW_V2
    return os.getxattr(f, "security.capability")


@pytest.mark.parametrize("mode", MODES)
def test_xattrs(mode: str, root: Path, caps: dict[str, str | None],
                capability_blob: bytes) -> None:
    need(caps, "capability_xattr", "trusted_xattr", "user_xattr", "foreign_chown")
    need_mode(caps, mode)
    layer = [
        tb.dir("d", xattrs={"user.dir": b"D", "trusted.t": b"T"}, mode=0o2770, uid=1000),
        tb.file("d/ping", b"\x7fELF", mode=0o4755, uid=1000, gid=1000,
                xattrs={"security.capability": capability_blob, "user.bin": b"\x00\xff\n="}),
        tb.file("f", xattrs={"user.a": b"", "user.b" * 10: b"v" * 2000}),
        tb.symlink("l", "d/ping", xattrs={"trusted.sym": b"S"}),
        tb.symlink("lu", "d/ping", xattrs={"user.sym": b"U"}),  # user.* on a symlink: EPERM
    ]
    stats = apply(layer, root, mode=mode)
    assert xattrs(root / "d") == {"trusted.t": b"T", "user.dir": b"D"}
    assert xattrs(root / "d" / "ping") == {"security.capability": capability_blob,
                                           "user.bin": b"\x00\xff\n="}
    assert stat.S_IMODE(os.stat(root / "d" / "ping").st_mode) == 0o4755
    assert xattrs(root / "f") == {"user.a": b"", "user.b" * 10: b"v" * 2000}
    assert xattrs(root / "l") == {"trusted.sym": b"S"}
    assert xattrs(root / "lu") == {}
    assert stats.skipped == 1
    getcap = shutil.which("getcap")
    if getcap is not None:
        out = subprocess.run([getcap, str(root / "d" / "ping")], capture_output=True, text=True)
        assert "cap_net_raw" in out.stdout and "ep" in out.stdout, out


LONG_DIR = "p" * 120
NAME_255 = "n" * 255


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
@pytest.mark.parametrize("mode", MODES)
def test_long_names(fmt: str, mode: str, root: Path, caps: dict[str, str | None]) -> None:
    need_mode(caps, mode)
    long_target = "/" + "/".join(["t" * 200] * 5)
    layer = [tb.dir(LONG_DIR), tb.file(f"{LONG_DIR}/{'g' * 99}", b"99")]  # ustar: prefix field
    if fmt != "ustar":  # ustar: name <= 100 after the prefix split, link names <= 100
        layer += [tb.file(f"{LONG_DIR}/{'f' * 101}", b"101"), tb.file(NAME_255, b"255"),
                  tb.dir("a" * 200), tb.file(f"{'a' * 200}/{NAME_255}", b"deep"),
                  tb.symlink("longlink", long_target),
                  tb.hardlink("hl", f"{'a' * 200}/{NAME_255}"),
                  tb.whiteout("w" * 250)]
    apply(tb.build(layer, fmt), root, mode=mode)
    assert (root / LONG_DIR / ("g" * 99)).read_bytes() == b"99"
    if fmt != "ustar":
        assert (root / LONG_DIR / ("f" * 101)).read_bytes() == b"101"
        assert (root / NAME_255).read_bytes() == b"255"
        assert os.readlink(root / "longlink") == long_target
        assert os.lstat(root / "hl").st_ino == os.lstat(root / ("a" * 200) / NAME_255).st_ino
        assert kind(root / ("w" * 250)) == ("whiteout" if mode == "overlay" else "missing")


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
@pytest.mark.parametrize("mode", MODES)
def test_non_utf8_names(fmt: str, mode: str, root: Path, caps: dict[str, str | None]) -> None:
    need_mode(caps, mode)
    layer = [tb.dir(b"\xff\xfe"), tb.file(b"\xff\xfe/caf\xe9", b"latin-1"),
             tb.symlink(b"l\x80", b"caf\xe9"), tb.hardlink(b"h\xe9", b"\xff\xfe/caf\xe9"),
             tb.whiteout(b"\xff\xfe/gone\x81")]
    apply(tb.build(layer, fmt), root, mode=mode)
    r = bytes(root)
    assert sorted(os.listdir(r)) == [b"h\xe9", b"l\x80", b"\xff\xfe"]
    with open(os.path.join(r, b"\xff\xfe", b"caf\xe9"), "rb") as f:
        assert f.read() == b"latin-1"
    assert os.readlink(os.path.join(r, b"l\x80")) == b"caf\xe9"
    wh = os.path.join(r, b"\xff\xfe", b"gone\x81")
    assert os.path.lexists(wh) == (mode == "overlay")


# -- delete mode on a lower tree --

def rootfs(root: Path, c: C | None = None) -> None:
    (root / "a").write_bytes(b"a")
    (root / "keep").write_bytes(b"keep")
    (root / "d" / "sub" / "deeper").mkdir(parents=True)
    (root / "d" / "x").write_bytes(b"x")
    (root / "d" / "sub" / "deeper" / "y").write_bytes(b"y")
    os.symlink("/", root / "d" / "sub" / "root-link")
    os.symlink("../../keep", root / "d" / "sub" / "rel-link")
    os.mkfifo(root / "d" / "fifo")
    os.chmod(root / "d" / "sub" / "deeper", 0o500)  # read-only dirs are still removed


def test_delete_mode_whiteouts_delete_files_and_trees(root: Path) -> None:
    rootfs(root)
    stats = apply([tb.whiteout("a"), tb.whiteout("d"), tb.whiteout("missing"),
                   tb.whiteout("nodir/x")], root, mode="delete")
    assert sorted(os.listdir(root)) == ["keep"]
    assert stats.whiteouts == 4
    assert not exists(root / "nodir")


def test_delete_mode_whiteout_inside_dir(root: Path) -> None:
    rootfs(root)
    apply([tb.whiteout("d/x"), tb.whiteout("d/sub/root-link"), tb.whiteout("d/sub/deeper")],
          root, mode="delete")
    assert sorted(os.listdir(root / "d")) == ["fifo", "sub"]
    assert os.listdir(root / "d" / "sub") == ["rel-link"]


@pytest.mark.parametrize("layer", [
    pytest.param([tb.opaque("d"), tb.dir("d"), tb.file("d/new", b"n"), tb.dir("d/sub"),
                  tb.file("d/sub/mine", b"m")], id="marker-first"),
    pytest.param([tb.dir("d"), tb.file("d/new", b"n"), tb.dir("d/sub"),
                  tb.file("d/sub/mine", b"m"), tb.opaque("d")], id="marker-last"),
    pytest.param([tb.file("d/new", b"n"), tb.dir("d/sub"), tb.file("d/sub/mine", b"m"),
                  tb.opaque("d")], id="marker-last-no-dir-entry"),
    pytest.param([tb.file("d/new", b"n"), tb.file("d/sub/mine", b"m"), tb.opaque("d")],
                 id="marker-last-implicit-subdir"),
])
def test_delete_mode_opaque_keeps_same_layer(layer: list[tb.Member], root: Path) -> None:
    rootfs(root)
    stats = apply(layer, root, mode="delete")
    assert sorted(os.listdir(root / "d")) == ["new", "sub"]
    assert os.listdir(root / "d" / "sub") == ["mine"]
    assert sorted(os.listdir(root)) == ["a", "d", "keep"]
    assert stats.opaques == 1


@pytest.mark.parametrize("layer", [
    pytest.param([tb.file("a", b"mine"), tb.whiteout("a")], id="file-then-whiteout"),
    pytest.param([tb.dir("d"), tb.file("d/x", b"mine"), tb.whiteout("d/x")],
                 id="child-then-whiteout"),
    pytest.param([tb.symlink("a", "mine"), tb.whiteout("a")], id="symlink-then-whiteout"),
])
def test_delete_mode_whiteout_of_same_layer_entry_ignored(layer: list[tb.Member],
                                                          root: Path) -> None:
    rootfs(root)
    apply(layer, root, mode="delete")
    same = layer[-2]
    p = root / same.name.decode()
    assert exists(p)
    if same.type == b"0":
        assert p.read_bytes() == b"mine"


def test_delete_mode_root_opaque(root: Path) -> None:
    rootfs(root)
    stats = apply([tb.file("new", b"n"), tb.dir("d"), tb.file("d/mine"), tb.opaque("")], root,
                  mode="delete")
    assert sorted(os.listdir(root)) == ["d", "new"]
    assert os.listdir(root / "d") == ["mine"]
    assert stats.opaques == 1


# -- overlay mode --

def test_overlay_whiteout_device(root: Path, caps: dict[str, str | None]) -> None:
    need(caps, "whiteout_mknod", "foreign_chown")
    stats = apply([tb.whiteout("gone", uid=1000, gid=1001, mode=0o600),
                   tb.whiteout("d/also", uid=5, gid=6)], root)
    for path, ids in (("gone", (1000, 1001)), ("d/also", (5, 6))):
        st = os.lstat(root / path)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
        assert (st.st_uid, st.st_gid) == ids
        assert st.st_nlink == 1
    assert stats.whiteouts == 2
    assert not list(root.rglob(".wh.*"))


@pytest.mark.parametrize("namespace", ["trusted", "user"])
def test_overlay_opaque_xattr_namespace(namespace: str, root: Path,
                                        caps: dict[str, str | None]) -> None:
    need_mode(caps, "overlay", namespace)
    apply([tb.dir("d"), tb.opaque("d"), tb.opaque("e/f")], root,
          fmt=OverlayFormat.native(namespace))
    other = "user" if namespace == "trusted" else "trusted"
    for d in (root / "d", root / "e" / "f"):
        assert os.getxattr(d, f"{namespace}.overlay.opaque") == b"y"
        assert f"{other}.overlay.opaque" not in os.listxattr(d)
    assert OPAQUE not in os.listxattr(root / "e")
    assert os.listdir(root / "d") == []


@pytest.mark.parametrize("layer", [
    pytest.param([tb.dir("d"), tb.opaque("d"), tb.whiteout("d/x")], id="opaque-first"),
    pytest.param([tb.whiteout("d/x"), tb.dir("d"), tb.opaque("d")], id="whiteout-first"),
    pytest.param([tb.opaque("d"), tb.whiteout("d/e/x")], id="nested-opaque-first"),
    pytest.param([tb.whiteout("d/e/x"), tb.opaque("d")], id="nested-whiteout-first"),
    pytest.param([tb.whiteout("d"), tb.dir("d"), tb.whiteout("d/x")], id="readded-dir-first"),
    pytest.param([tb.whiteout("d/x"), tb.dir("d"), tb.whiteout("d")], id="readded-dir-last"),
])
def test_overlay_redundant_whiteout_in_opaque_dir(layer: list[tb.Member], root: Path,
                                                  caps: dict[str, str | None]) -> None:
    need_mode(caps, "overlay")
    stats = apply(layer, root)
    assert os.getxattr(root / "d", OPAQUE) == b"y"
    assert not exists(root / "d" / "x")
    assert not exists(root / "d" / "e" / "x")
    assert stats.whiteouts == sum(1 for m in layer if b".wh." in m.name and b"opq" not in m.name)


@pytest.fixture
def lowers(tmp_path: Path) -> list[Path]:
    """Two lower diff dirs: l1 (top) holds a, b/, shared/; l2 holds c, b/, link, shared/x."""
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    (l1 / "b").mkdir(parents=True)
    (l1 / "a").write_bytes(b"a")
    (l1 / "shared").mkdir()
    (l2 / "b").mkdir(parents=True)
    (l2 / "c").write_bytes(b"c")
    os.symlink("/etc", l2 / "link")
    (l2 / "shared").mkdir()
    (l2 / "shared" / "x").write_bytes(b"x")
    return [l1, l2]


@pytest.mark.parametrize("layer", [
    pytest.param([tb.opaque(""), tb.dir("b"), tb.file("new", b"n"), tb.whiteout("c")],
                 id="marker-first"),
    pytest.param([tb.dir("b"), tb.file("new", b"n"), tb.whiteout("c"), tb.opaque("")],
                 id="marker-last"),
    pytest.param([tb.dir("./"), tb.dir("b"), tb.file("new", b"n"), tb.opaque("./")],
                 id="dot-slash"),
])
def test_overlay_root_opaque_with_lowers(layer: list[tb.Member], root: Path, lowers: list[Path],
                                         caps: dict[str, str | None]) -> None:
    need_mode(caps, "overlay")
    stats = apply(layer, root, lowers=[str(p) for p in lowers])
    assert {n: kind(root / n) for n in os.listdir(root)} == {
        "a": "whiteout", "b": "dir", "c": "whiteout", "link": "whiteout", "new": "file",
        "shared": "whiteout"}
    assert os.getxattr(root / "b", OPAQUE) == b"y"
    assert OPAQUE not in os.listxattr(root)  # overlayfs ignores opaque on a layer root
    assert stats.opaques == 1


@pytest.mark.parametrize("layer", [
    pytest.param([tb.opaque(""), tb.whiteout("shared/x")], id="marker-first"),
    pytest.param([tb.whiteout("shared/x"), tb.opaque("")], id="marker-last"),
    pytest.param([tb.opaque(""), tb.whiteout("fresh/x")], id="dir-not-in-lowers"),
])
def test_overlay_root_opaque_drops_nested_whiteouts(layer: list[tb.Member], root: Path,
                                                    lowers: list[Path],
                                                    caps: dict[str, str | None]) -> None:
    """A whiteout below a root made opaque by this layer hides nothing: not materialised."""
    need_mode(caps, "overlay")
    apply(layer, root, lowers=[str(p) for p in lowers])
    leftovers = [str(p.relative_to(root)) for p in root.rglob("*")
                 if is_whiteout(p) and p.parent != root]
    assert leftovers == []


def test_overlay_root_opaque_without_lowers_refused(root: Path,
                                                    caps: dict[str, str | None]) -> None:
    need_mode(caps, "overlay")
    with pytest.raises(ImageError, match=r"\.wh\.\.wh\.\.opq"):
        apply([tb.file("a"), tb.opaque("")], root)


@pytest.mark.parametrize("namespace", ["trusted", "user"])
def test_overlay_escapes_image_overlay_xattrs(namespace: str, root: Path,
                                              caps: dict[str, str | None]) -> None:
    need(caps, "trusted_xattr", "user_xattr")
    need_mode(caps, "overlay", namespace)
    apply([tb.dir("forged", xattrs={OPAQUE: b"y", "user.overlay.opaque": b"y"}),
           tb.dir("real", xattrs={OPAQUE: b"n"}), tb.opaque("real"),
           tb.file("f", xattrs={"trusted.overlay.origin": b"\x00\xfb", "user.ok": b"1"})],
          root, fmt=OverlayFormat.native(namespace))
    assert xattrs(root / "forged") == {"trusted.overlay.overlay.opaque": b"y",
                                       "user.overlay.overlay.opaque": b"y"}
    want_real = {"trusted.overlay.overlay.opaque": b"n", f"{namespace}.overlay.opaque": b"y"}
    assert xattrs(root / "real") == want_real
    assert xattrs(root / "f") == {"trusted.overlay.overlay.origin": b"\x00\xfb", "user.ok": b"1"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", [
    pytest.param([tb.file("a", b"file"), tb.whiteout("a/x")], id="whiteout-under-file"),
    pytest.param([tb.file("a", b"file"), tb.opaque("a")], id="opaque-under-file"),
])
def test_whiteout_under_same_layer_non_dir_hides_nothing(layer: list[tb.Member], mode: str,
                                                         root: Path,
                                                         caps: dict[str, str | None]) -> None:
    """umoci 0.4.7 repack writes whiteouts under a dir it turned into a file (FACTS.md): they
    act on nothing (the file already hides the lower dir) and both modes must agree."""
    need_mode(caps, mode)
    stats = apply(layer, root, mode=mode)
    assert (root / "a").read_bytes() == b"file"
    assert os.listdir(root) == ["a"]
    assert stats.ignored_whiteouts == 1


# -- existing paths --

def _prep_dir(root: Path, c: C) -> None:
    (root / "d").mkdir(mode=0o700)
    (root / "d" / "keep").write_bytes(b"keep")
    os.setxattr(root / "d", "user.old", b"1")


def _dir_merged(root: Path, mode: str, c: C) -> None:
    st = os.lstat(root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o755, 1000,
                                                                                1000, T1)
    assert sorted(os.listdir(root / "d")) == ["keep", "new"]
    assert os.getxattr(root / "d", "user.new") == b"2"


def _prep_file(name: str) -> Callable[[Path, C], None]:
    def prepare(root: Path, c: C) -> None:
        (root / name).write_bytes(b"lower")

    return prepare


def _prep_tree(name: str) -> Callable[[Path, C], None]:
    def prepare(root: Path, c: C) -> None:
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "child").write_bytes(b"lower")

    return prepare


EXISTING: dict[str, Hostile] = {
    "dir-over-dir-merges": Hostile(
        lambda c: [tb.dir("d", mode=0o755, uid=1000, gid=1000, mtime_ns=T1,
                          xattrs={"user.new": b"2"}), tb.file("d/new")],
        check=_dir_merged, prepare=_prep_dir, needs=("user_xattr", "foreign_chown")),
    "file-over-dir": Hostile(lambda c: [tb.file("x", b"new")], check=is_("x", "file", b"new"),
                             prepare=_prep_tree("x")),
    "dir-over-file": Hostile(lambda c: [tb.dir("x"), tb.file("x/c", b"c")],
                             check=all_of(is_("x", "dir"), is_("x/c", "file", b"c")),
                             prepare=_prep_file("x")),
    "symlink-over-dir": Hostile(lambda c: [tb.symlink("x", c.out)], check=is_("x", "symlink"),
                                prepare=_prep_tree("x")),
    "file-over-symlink": Hostile(lambda c: [tb.file("f", b"new", mode=0o600)],
                                 check=is_("f", "file", b"new"),
                                 prepare=symlink_to("f", "{out}/secret")),
    "fifo-over-file": Hostile(lambda c: [tb.fifo("x")], check=is_("x", "fifo"),
                              prepare=_prep_file("x")),
    "hardlink-over-file": Hostile(lambda c: [tb.file("a", b"A"), tb.hardlink("x", "a")],
                                  check=is_("x", "file", b"A"), prepare=_prep_file("x")),
    "hardlink-to-existing": Hostile(lambda c: [tb.hardlink("h", "x")],
                                    check=is_("h", "file", b"lower"), prepare=_prep_file("x")),
    "same-layer-file-then-dir": Hostile(lambda c: [tb.file("x"), tb.dir("x"), tb.file("x/c")],
                                        check=is_("x/c", "file")),
    "same-layer-dir-then-file": Hostile(lambda c: [tb.dir("x"), tb.file("x/c"),
                                                   tb.file("x", b"last")],
                                        check=is_("x", "file", b"last")),
    "same-layer-dir-then-symlink": Hostile(lambda c: [tb.dir("x"), tb.symlink("x", c.out)],
                                           check=is_("x", "symlink")),
    "same-layer-nested-dir-then-file": Hostile(
        lambda c: [tb.dir("x"), tb.dir("x/y"), tb.file("x", b"last")],
        check=is_("x", "file", b"last")),
}


@pytest.mark.parametrize(("case", "mode"), [
    pytest.param(case, mode, id=f"{name}-{mode}")
    for name, case in EXISTING.items() for mode in case.modes])
def test_existing_paths(case: Hostile, mode: str, world: World,
                        caps: dict[str, str | None]) -> None:
    need(caps, *case.needs)
    need_mode(caps, mode)
    test_hostile(case, mode, world, caps)


# -- rootless --

ROOTLESS_SCRIPT = r"""
import ctypes, dataclasses, io, json, os, sys
from ocilayers.extract import apply_layer
from ocilayers.whiteout import OverlayFormat
variant, target = sys.argv[1], sys.argv[2]
tar = sys.stdin.buffer.read()
os.chdir(target)  # the ancestors (pytest's 0700 basetemp) need not be searchable afterwards
if variant == "setuid":
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as a user shell is
if sys.argv[3:] == ["probe"]:
    os.mknod("probe-wh", 0o020000, os.makedev(0, 0))
    os.mkdir("probe-d")
    os.setxattr("probe-d", "user.overlay.opaque", b"y")
    print(json.dumps({"ok": True}))
    sys.exit(0)
try:
    stats = apply_layer(io.BytesIO(tar), ".", mode="overlay",
                        fmt=OverlayFormat("user", rootless=True))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc} {getattr(exc, '__notes__', '')}"}))
    sys.exit(0)
print(json.dumps({**{f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)
                     if f.name != "side"}, "side": stats.side.entries}))
"""

RUNNERS = {
    # uid 65534 in the initial namespace: chown/mknod/trusted.* fail with EPERM
    "setuid": ([sys.executable, "-c", ROOTLESS_SCRIPT, "setuid"], 65534),
    # mapped root in a user namespace: chown to an unmapped id fails with EINVAL
    "userns": (["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c",
                ROOTLESS_SCRIPT, "userns"], 0),
}


def _run_rootless(variant: str, target: Path, tar: bytes, *extra: str) -> dict[str, Any]:
    argv, _ = RUNNERS[variant]
    if variant == "userns" and shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    proc = subprocess.run([*argv, str(target), *extra], input=tar, capture_output=True,
                          timeout=60)
    if proc.returncode != 0:
        if extra:
            pytest.skip(f"cannot run as {variant}: {proc.stderr.decode(errors='replace')[-300:]}")
        raise AssertionError(proc.stderr.decode(errors="replace"))
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("variant", list(RUNNERS))
def test_rootless(variant: str, tmp_path: Path) -> None:
    own = RUNNERS[variant][1]
    probe = tmp_path / "probe"
    probe.mkdir()
    os.chown(probe, own, own)
    _run_rootless(variant, probe, b"", "probe")  # skips when the variant cannot work here
    target = tmp_path / "diff"
    target.mkdir()
    os.chown(target, own, own)
    o = {"uid": own, "gid": own}
    layer = [
        tb.dir("d", **o),
        tb.file("d/own", b"mine", mode=0o640, xattrs={"user.k": b"v"}, **o),
        tb.file("d/foreign", b"theirs", uid=1000, gid=1000),  # recorded: owner
        tb.chardev("d/null", 1, 3, **o),  # recorded: a regular file standing for the device
        tb.fifo("d/p", **o),
        tb.fifo("d/p2", uid=1000, gid=1000),  # owner in the side record
        tb.symlink("d/l", "own", uid=1000, gid=1000),  # owner in the side record
        tb.file("d/trusted", xattrs={"trusted.t": b"1"}, **o),  # recorded: trusted xattr
        tb.file("d/forged", xattrs={"user.containers.override_stat": b"0:0:7777"}, **o),
        tb.whiteout("gone", **o),
        tb.whiteout("gone2", uid=1000, gid=1000),  # whiteout made; its owner does not matter
        tb.dir("o", **o), tb.file("o/x", **o), tb.opaque("o", **o),
        tb.whiteout("o/y", **o),  # redundant in an opaque dir
    ]
    result = _run_rootless(variant, target, tb.build(layer))
    assert "error" not in result, result["error"]
    assert result["skipped"] == 0, result
    assert (result["whiteouts"], result["opaques"], result["entries"]) == (3, 1, len(layer))
    d = target / "d"
    ov = "user.containers.override_stat"
    assert (d / "own").read_bytes() == b"mine"
    assert os.getxattr(d / "own", "user.k") == b"v"
    # a layer with a record gets one on every file and dir (fuse-overlayfs needs them all)
    assert os.getxattr(d / "own", ov) == f"{own}:{own}:0640:file".encode()
    assert (os.lstat(d / "own").st_uid, os.lstat(d / "foreign").st_uid) == (own, own)
    assert (d / "foreign").read_bytes() == b"theirs"
    assert os.getxattr(d / "foreign", ov) == b"1000:1000:0644:file"
    assert kind(d / "null") == "file" and os.lstat(d / "null").st_size == 0
    assert os.getxattr(d / "null", ov) == f"{own}:{own}:0666:char-1-3".encode()
    assert kind(d / "p") == "fifo"
    assert result["side"] == {"d/p2": {"stat": "1000:1000:0644:pipe"},
                              "d/l": {"stat": "1000:1000:0777:symlink"}}
    assert "trusted.t" not in os.listxattr(d / "trusted")
    assert os.getxattr(d / "trusted", "user.ocilayers.xattr.trusted.t") == b"1"
    # an image's own: stored as a record of itself (and the file gets the layer's real record)
    assert os.getxattr(d / "forged", ov) == f"{own}:{own}:0644:file".encode()
    assert os.getxattr(d / "forged", "user.ocilayers.xattr." + ov) == b"0:0:7777"
    assert os.getxattr(target, ov) == f"0:0:{os.lstat(target).st_mode & 0o7777:04o}:dir".encode()
    assert is_whiteout(target / "gone") and is_whiteout(target / "gone2")
    assert os.lstat(target / "gone").st_uid == own
    assert os.getxattr(target / "o", "user.overlay.opaque") == b"y"
    assert OPAQUE not in os.listxattr(target / "o")
    assert not exists(target / "o" / "y")


# -- on_entry / on_raw: the archive passes through byte for byte (tar-split) --

def _tarfile_padded(members: list[tb.Member]) -> bytes:
    """tarfile's own output: end blocks plus padding to a 10240-byte record."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            tf.addfile(tb.tarinfo(m, "gnu"), io.BytesIO(m.data) if m.data else None)
    return buf.getvalue()


LAYER = [tb.dir("d", mtime_ns=T1 - T1 % NS), tb.file("d/f", b"x" * 1500), tb.file("empty"),
         tb.symlink("s", "d/f"), tb.hardlink("h", "d/f"), tb.fifo("p"),
         tb.file("n" * 150, b"long"), tb.whiteout("gone"), tb.opaque("d"), tb.whiteout("d/x"),
         tb.file(".wh..wh.aufs"), tb.file(b"\xe9", bytes(range(256)) * 3)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("archive", "consumed"), [
    pytest.param(tb.build(LAYER, "gnu"), None, id="gnu"),
    pytest.param(tb.build([*LAYER, tb.file("x", xattrs={"user.a": b"1"}, mtime_ns=T1)], "pax",
                          global_pax={"comment": "hi"}), None, id="pax"),
    pytest.param(tb.build([m for m in LAYER if len(m.name) < 100], "ustar"), None, id="ustar"),
    pytest.param(tb.build(LAYER, "gnu", end=False), None, id="no-end-blocks"),
    pytest.param(tb.build(LAYER, "gnu") + b"\x01TRAILING" * 200, len(tb.build(LAYER, "gnu")),
                 id="trailing-bytes-unread"),
    pytest.param(_tarfile_padded(LAYER), len(tb.build(LAYER, "gnu")), id="tarfile-record-pad"),
    pytest.param(tb.build([tb.file("a", b"1"), tb.file(".wh.b", b"whiteout with data"),
                           tb.file(".wh..wh.plnk", b"aufs meta with data"), tb.file("c", b"3")],
                          "gnu"), None, id="whiteouts-with-data"),
])
def test_raw_round_trip(archive: bytes, consumed: int | None, mode: str, root: Path,
                        caps: dict[str, str | None]) -> None:
    need_mode(caps, mode)
    consumed = len(archive) if consumed is None else consumed
    pieces: list[bytes] = []
    seen: list[bytes] = []

    def on_entry(entry: Any) -> Callable[[bytes], None]:
        seen.append(entry.name)
        return pieces.append

    stream = io.BytesIO(archive)
    apply_layer(stream, root, mode=mode, on_entry=on_entry, on_raw=pieces.append)
    assert b"".join(pieces) == archive[:consumed]
    assert stream.tell() == consumed
    assert len(seen) == len(list(iter_names(archive)))


def iter_names(archive: bytes) -> Iterator[bytes]:
    for e in TarReader(io.BytesIO(archive)):
        yield e.name


# -- stats --

@pytest.mark.parametrize("mode", MODES)
def test_stats(mode: str, root: Path, caps: dict[str, str | None]) -> None:
    need_mode(caps, mode)
    layer = [tb.dir("d"), tb.file("d/a", b"12345"), tb.file("b", b"678"), tb.symlink("s", "b"),
             tb.hardlink("h", "d/a"), tb.hardlink("h2", "b"), tb.whiteout("x"),
             tb.whiteout("d/y"), tb.opaque("d"), tb.file(".wh..wh.aufs"),
             tb.file("big", b"z" * 3_000_000), tb.fifo("p")]
    stats = apply(layer, root, mode=mode)
    assert stats == LayerStats(entries=12, bytes=5 + 3 + 3_000_000, whiteouts=2, opaques=1,
                               hardlinks=2, skipped=1, size=5 + 3 + 3_000_000 + len(b"b"),
                               **_extra_stats_defaults())


def _extra_stats_defaults() -> dict[str, Any]:
    """LayerStats fields beyond the issue's six keep their defaults (e.g. root_opaque=False)."""
    six = {"entries", "bytes", "whiteouts", "opaques", "hardlinks", "skipped", "size"}
    return {f.name: f.default if f.default_factory is dataclasses.MISSING
            else f.default_factory() for f in dataclasses.fields(LayerStats) if f.name not in six}


def test_stats_empty_layer(root: Path) -> None:
    assert apply(tb.END, root) == LayerStats(size=0, **_extra_stats_defaults())
    assert os.listdir(root) == []


def test_bad_arguments(root: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        apply(tb.END, root, mode="aufs")
    with pytest.raises(ValueError, match="xattr_namespace"):
        apply(tb.END, root, fmt=OverlayFormat.native("security"))


# -- memory --

def test_memory_independent_of_layer_size(root: Path) -> None:
    """A 300 MB file streams through in chunks: tracemalloc peak stays far below its size."""
    size = 300 * (1 << 20)
    zeros = bytes(1 << 20)
    marked = b"\x01" * (1 << 20)

    def chunks() -> Iterator[bytes]:
        yield tb.header("big", size=size, mode=0o600)
        for i in range(size >> 20):
            yield marked if i % 50 == 0 else zeros
        yield tb.header("after", size=0)
        yield tb.END

    tracemalloc.start()
    try:
        stats = apply_layer(tb.LazyStream(chunks()), root, mode="delete")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert stats.bytes == size
        assert os.path.getsize(root / "big") == size
        with open(root / "big", "rb") as f:
            f.seek(50 << 20)
            assert f.read(4) == b"\x01" * 4
        assert (root / "after").exists()
        assert peak < 16 * (1 << 20), f"peak {peak / (1 << 20):.1f} MiB"
    finally:
        (root / "big").unlink()


# -- the layer size counted while applying (layerdb `size`, no walk of the dir) --

@pytest.mark.parametrize("mode", MODES)
def test_size_is_counted_while_applying(mode: str, root: Path) -> None:
    layer = [tb.dir("d"), tb.file("d/a", b"x" * 5000), tb.hardlink("d/b", "d/a"),
             tb.symlink("d/s", "a-target-of-17-by"), tb.file("e", b""), tb.dir("d/sub"),
             tb.file("d/sub/c", b"y" * 3)]
    stats = apply(layer, root, mode=mode)
    assert stats.size == 5000 + len(b"a-target-of-17-by") + 3
    assert stats.size == diff_size(str(root))


@pytest.mark.parametrize(("layer", "size"), [
    pytest.param([tb.file("a", b"x" * 10), tb.hardlink("b", "a"), tb.file("a", b"y")], 11,
                 id="overwritten-file-lives-on-as-a-hardlink"),
    pytest.param([tb.file("a", b"x" * 10), tb.file("a", b"yy")], 2, id="overwritten-file"),
    pytest.param([tb.dir("d"), tb.file("d/f", b"x" * 10), tb.symlink("d", "elsewhere")],
                 len(b"elsewhere"), id="dir-replaced-by-symlink"),
])
def test_size_after_a_removal_comes_from_the_dir(layer: list[tb.Member], size: int,
                                                 root: Path) -> None:
    stats = apply(layer, root, mode="overlay")
    assert stats.size is None  # not counted: the caller walks the dir
    assert diff_size(str(root)) == size


def test_size_is_not_counted_into_a_dir_that_was_not_empty(root: Path) -> None:
    (root / "old").write_bytes(b"z" * 7)
    assert apply([tb.file("new", b"x")], root, mode="overlay").size is None


# -- deep trees: removal and opaque clearing are loops, not recursion --

DEEP = 1500  # past Python's recursion limit of 1000; 3000 bytes of path


def _chain(n: int = DEEP) -> list[str]:
    return ["/".join(["d"] * i) for i in range(1, n + 1)]


def _levels(root: Path) -> list[list[str]]:
    """The names in root/d/d/..., level by level (no recursion, no path too long for open)."""
    out = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            names = sorted(os.listdir(fd))
            out.append(names)
            if "d" not in names or not stat.S_ISDIR(os.stat("d", dir_fd=fd,
                                                            follow_symlinks=False).st_mode):
                return out
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


@pytest.fixture
def deep_root(root: Path) -> Iterator[Path]:
    yield root
    from ocilayers.fsutil import rmtree  # pytest's clean-up recurses

    for name in os.listdir(root):
        rmtree(root / name)


@pytest.mark.parametrize("mode", MODES)
def test_a_deep_dir_replaced_in_the_same_layer(mode: str, deep_root: Path) -> None:
    layer = [*(tb.dir(p) for p in _chain()), tb.file(_chain()[-1] + "/leaf", b"deep"),
             tb.file("d", b"now a file")]
    apply(layer, deep_root, mode=mode)
    assert os.listdir(deep_root) == ["d"] and (deep_root / "d").read_bytes() == b"now a file"


def test_a_deep_opaque_dir_clears_every_lower_level(deep_root: Path) -> None:
    """Delete mode: an opaque dir whose subdirs the layer makes again, 1500 levels of them,
    loses every lower file at every level."""
    apply([*(tb.dir(p) for p in _chain()), *(tb.file(p + "/old") for p in _chain())],
          deep_root, mode="delete")
    assert _levels(deep_root)[1:3] == [["d", "old"], ["d", "old"]]
    apply([*(tb.dir(p) for p in _chain()), tb.opaque("d"), tb.file(_chain()[-1] + "/new")],
          deep_root, mode="delete")
    levels = _levels(deep_root)
    assert len(levels) == DEEP + 1
    assert levels[:-1] == [["d"]] * DEEP and levels[-1] == ["new"]
