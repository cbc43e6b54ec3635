"""apply_layer against real oracles: GNU tar, bsdtar, umoci, skopeo and the kernel's overlayfs.

Three kinds of check, all comparing full-metadata snapshots (tests/treecompare.py):
- round trips: a tree with every file type and awkward metadata is archived by a real tool,
  extracted by that tool (dir A) and by apply_layer (dir B); A == B, and B == the source for
  every field the archive format can carry;
- the kernel: each layer of a real image is applied in overlay mode into its own diff dir, the
  diff dirs are mounted read-only as an overlay, and the merged view must equal the delete-mode
  flattened tree and `umoci unpack`'s rootfs (also with the "user" overlay format in a user
  namespace, where the mount needs `userxattr`);
- a synthetic multi-layer scenario (tar built here with tarfile) with every whiteout shape:
  overlay mount == delete-mode flatten after every layer.

Tests skip, with the reason, when a tool is missing or a probe mount fails; CI (root, every tool
installed) runs them all. Every mount is undone in a `finally`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import treecompare as tc

from ocilayers.extract import apply_layer
from ocilayers.sources import ImageSource, Layer, open_source
from ocilayers.streams import LayerReader
from ocilayers.whiteout import OverlayFormat

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TESTS = Path(__file__).resolve().parent

T0 = 1_700_000_000  # seconds; every synthetic mtime is T0 + something


# --- running tools ---

def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (not on PATH)")
    return path


def run(*cmd: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; fail the test with its stderr when it exits non-zero."""
    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, timeout=120,
                          check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             + proc.stderr.decode(errors="replace"))
    return proc


# --- applying image layers through the product ---

@contextlib.contextmanager
def layer_stream(src: ImageSource, layer: Layer) -> Iterator[LayerReader]:
    """src.open_layer(): the decompressed layer, digests checked (finish) when the block ends
    cleanly, closed (with its blob) either way."""
    with contextlib.closing(src.open_layer(layer)) as reader:
        yield reader
        reader.finish()


@dataclass
class Applied:
    diffs: list[Path]  # overlay-mode diff dirs, base first
    flat: Path  # every layer applied in delete mode, in order
    entries: list[list[tuple[bytes, bool]]] = field(default_factory=list)  # (name, is_dir)


def apply_image(spec: str, work: Path, namespace: str = "trusted") -> Applied:
    """Apply every layer of the image at `spec` twice: into its own diff dir (overlay mode,
    lowers = the earlier diff dirs, top-most first) and onto one flat dir (delete mode)."""
    flat = work / "flat"
    flat.mkdir()
    out = Applied([], flat)
    with open_source(spec) as src:
        image = src.resolve()
        for i, layer in enumerate(image.layers):
            diff = work / f"diff{i}"
            diff.mkdir()
            names: list[tuple[bytes, bool]] = []

            def record(entry: Any, names: list[tuple[bytes, bool]] = names) -> None:
                names.append((entry.name, entry.is_dir))

            with layer_stream(src, layer) as reader:
                apply_layer(reader, diff, mode="overlay", fmt=OverlayFormat.native(namespace),
                            lowers=[str(d) for d in reversed(out.diffs)], on_entry=record)
            with layer_stream(src, layer) as reader:
                apply_layer(reader, flat, mode="delete", fmt=OverlayFormat.native(namespace))
            out.diffs.append(diff)
            out.entries.append(names)
    return out


def _parts(name: bytes) -> list[bytes]:
    return [p for p in name.split(b"/") if p not in (b"", b".")]


def implicit_dirs(layers: Sequence[Sequence[tuple[bytes, bool]]]) -> set[bytes]:
    """Dirs whose mtime no layer defines, to leave out of mtime comparisons.

    A dir's mtime is defined when the top-most layer that touches it (an entry at or below it,
    whiteouts and opaque markers included) has an explicit entry for it. Otherwise the merged
    view shows the time that layer's applier made the implicit parent (now), a flattening
    applier shows whenever it last changed the dir, and umoci restores the older value: all
    three are right, none is comparable.
    """
    explicit_in_top: dict[bytes, bool] = {}
    for entries in layers:  # base first, so later layers win
        touched: set[bytes] = set()
        explicit: set[bytes] = set()
        for name, is_dir in entries:
            parts = _parts(name)
            touched.update(b"/".join(parts[:i]) for i in range(1, len(parts)))
            if is_dir and parts:
                explicit.add(b"/".join(parts))
        for d in touched | explicit:
            explicit_in_top[d] = d in explicit
    return {d for d, is_explicit in explicit_in_top.items() if not is_explicit}


# --- overlay mounts ---

def _lowerdir(lowers_top_first: Sequence[Path]) -> str:
    return "lowerdir=" + ":".join(str(p) for p in lowers_top_first)


@contextlib.contextmanager
def overlay_mount(lowers_top_first: Sequence[Path], mnt: Path,
                  options: str = "ro") -> Iterator[Path]:
    """Mount the lowers read-only at `mnt` (no upper dir: needs at least two lowers)."""
    mnt.mkdir(exist_ok=True)
    run("mount", "-t", "overlay", "overlay", "-o", f"{options},{_lowerdir(lowers_top_first)}",
        mnt)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True,
                          check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.fixture(scope="session")
def overlayfs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless a read-only overlay of two lowers mounts here and honours a whiteout."""
    need("mount")
    base = tmp_path_factory.mktemp("overlay-probe")
    low, top, mnt = base / "low", base / "top", base / "mnt"
    for d in (low, top, mnt):
        d.mkdir()
    (low / "gone").write_bytes(b"x")
    (low / "kept").write_bytes(b"y")
    try:
        os.mknod(top / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    except OSError as exc:
        pytest.skip(f"cannot make a whiteout (char 0/0): {exc}")
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                           "ro," + _lowerdir([top, low]), str(mnt)],
                          capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip("overlayfs probe mount failed: " + proc.stderr.decode(errors="replace"))
    try:
        seen = sorted(os.listdir(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
    if seen != ["kept"]:
        pytest.skip(f"overlayfs probe: whiteout not honoured (saw {seen})")


# A user namespace with the identity map of every id (possible because we start as root), so
# owners like 1000 and 2**21+5 stay what they are; `unshare -Urm` would map only root and show
# every other owner as the overflow id. The mount dies with the namespace: nothing to undo.
_USERNS_HELPER = r"""
import ctypes, json, os, subprocess, sys, traceback
args = json.loads(sys.argv[1])
sys.path.insert(0, args["tests"])
import treecompare
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
libc = ctypes.CDLL(None, use_errno=True)
r1, w1 = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.close(r1)
        os.close(w2)
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
            sys.stderr.write("unshare(CLONE_NEWUSER|CLONE_NEWNS): "
                             + os.strerror(ctypes.get_errno()) + "\n")
            sys.stderr.flush()
            os._exit(3)
        os.write(w1, b"k")
        os.read(r2, 1)  # the parent has written the id maps
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", args["options"],
                               args["mnt"]], capture_output=True)
        if proc.returncode != 0:
            sys.stderr.write("mount in user namespace: " + proc.stderr.decode() + "\n")
            sys.stderr.flush()
            os._exit(4)
        snap = treecompare.snapshot(args["mnt"],
                                    xattr_filter=lambda n: not n.startswith("trusted."))
        sys.stdout.write(treecompare.dumps(snap))
        sys.stdout.flush()
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(5)
os.close(w1)
os.close(r2)
if os.read(r1, 1) != b"k":
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 4294967295\n")
os.write(w2, b"g")
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def userns_overlay_snapshot(lowers_top_first: Sequence[Path],
                            mnt: Path) -> subprocess.CompletedProcess[bytes]:
    mnt.mkdir(exist_ok=True)
    args = {"tests": str(TESTS), "mnt": str(mnt),
            "options": "ro,userxattr," + _lowerdir(lowers_top_first)}
    return subprocess.run([sys.executable, "-c", _USERNS_HELPER, json.dumps(args)],
                          capture_output=True, timeout=120, check=False)


def userns_snapshot(lowers_top_first: Sequence[Path], mnt: Path) -> tc.Snapshot:
    proc = userns_overlay_snapshot(lowers_top_first, mnt)
    if proc.returncode != 0:
        raise AssertionError(f"user-namespace overlay mount failed ({proc.returncode}):\n"
                             + proc.stderr.decode(errors="replace"))
    return tc.loads(proc.stdout.decode())


@pytest.fixture(scope="session")
def userns_overlayfs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless a user namespace can mount a `userxattr` overlay honouring user.* marks."""
    need("mount")
    base = tmp_path_factory.mktemp("userns-probe")
    low, top, mnt = base / "low", base / "top", base / "mnt"
    for d in (low, top):
        d.mkdir()
    (low / "gone").write_bytes(b"x")
    (low / "d").mkdir()
    (low / "d" / "hidden").write_bytes(b"y")
    (top / "d").mkdir()
    try:
        os.mknod(top / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        os.setxattr(top / "d", "user.overlay.opaque", b"y")
    except OSError as exc:
        pytest.skip(f"cannot make user-namespace overlay marks here: {exc}")
    proc = userns_overlay_snapshot([top, low], mnt)
    if proc.returncode != 0:
        pytest.skip("user-namespace overlay probe failed: "
                    + proc.stderr.decode(errors="replace").strip())
    seen = sorted(tc.loads(proc.stdout.decode()))
    if seen != [b"d"]:
        pytest.skip(f"user-namespace overlay probe: marks not honoured (saw {seen})")


# --- the source tree for the round trips ---

def _cap_net_raw(path: bytes) -> None:
    """security.capability cap_net_raw+ep, with setcap when there is one."""
    if shutil.which("setcap"):
        run("setcap", "cap_net_raw+ep", os.fsdecode(path))
    else:  # VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, permitted = 1 << CAP_NET_RAW (13)
        os.setxattr(path, "security.capability",
                    (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little")
                    + bytes(12), follow_symlinks=False)


LONG_NAME = b"n" * 120
NAME_255 = b"L" * 255
DEEP_FULL = b"deep/" + b"/".join([b"s" * 60] * 4) + b"/" + b"f" * 80  # 330 bytes
DEEP_USTAR = b"deep/" + b"s" * 60 + b"/" + b"s" * 60 + b"/" + b"f" * 90  # fits prefix + name
BIG_ID = 2**21 + 5  # past the 7 octal digits of a ustar id field


def build_source_tree(root: Path, *, ustar: bool) -> None:
    """Every file type and awkward piece of metadata a layer can carry.

    `ustar`: only what the ustar format can hold: names within its 100 + 155 split, link
    targets within 100 bytes, ids below 2**21, no negative times, no xattrs (sub-second times
    are simply truncated, and compared in whole seconds).
    """
    r = os.fsencode(root)

    def p(rel: bytes) -> bytes:
        return os.path.join(r, rel)

    dirs = [b"dir", b"emptydir", b"sticky", b"sgiddir", b"caf\xe9dir"]
    deep = DEEP_USTAR if ustar else DEEP_FULL
    for d in dirs:
        os.mkdir(p(d))
    os.makedirs(p(os.path.dirname(deep)))
    files: dict[bytes, bytes] = {
        b"dir/file": b"hello\n", b"dir/exec": b"#!/bin/sh\necho hi\n", b"dir/empty": b"",
        b"suid": b"suid\n", b"sgid": b"sgid\n", b"suid1000": b"x\n", b"owned": b"mine\n",
        b"caf\xe9": b"latin-1 name\n", b"caf\xe9dir/inner": b"i\n", b"h" * 100: b"100\n",
        deep: b"deep\n",
    }
    if not ustar:  # ustar's octal fields hold no negative time, no id >= 2**21, short names
        files |= {LONG_NAME: b"long\n", NAME_255: b"255\n", b"bigid": b"big\n",
                  b"old": b"before 1970\n"}
    for rel, data in files.items():
        with open(p(rel), "wb") as f:
            f.write(data)
    os.link(p(b"dir/file"), p(b"hard"))
    os.link(p(b"dir/file"), p(b"sticky/hard2"))
    os.link(p(deep), p(b"hardtodeep"))
    symlinks = {b"rel": b"dir/file", b"abs": b"/etc/passwd", b"dangling": b"../nowhere",
                b"dir/up": b"../suid", b"symowned": b"owned"}
    if not ustar:
        symlinks[b"longtarget"] = b"t/" * 60
    for rel, target in symlinks.items():
        os.symlink(target, p(rel))
    os.mkfifo(p(b"fifo"), 0o640)
    os.mknod(p(b"null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(p(b"blk"), stat.S_IFBLK | 0o660, os.makedev(7, 200))
    if not ustar:
        os.mknod(p(b"bigdev"), stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))

    owners = {b"owned": (1000, 1000), b"suid1000": (1000, 1000), b"sgid": (0, 1000),
              b"sgiddir": (1000, 1000), b"symowned": (1000, 1000), b"fifo": (1000, 1000)}
    if not ustar:
        owners[b"bigid"] = (BIG_ID, BIG_ID + 1)
    for rel, (uid, gid) in owners.items():
        os.chown(p(rel), uid, gid, follow_symlinks=False)
    # chmod after chown: chown clears setuid/setgid.
    modes = {b"dir/exec": 0o755, b"suid": 0o4755, b"sgid": 0o2711, b"suid1000": 0o4750,
             b"sticky": 0o1777, b"sgiddir": 0o2775, b"emptydir": 0o700, b"owned": 0o640,
             b"dir": 0o750}
    for rel, mode in modes.items():
        os.chmod(p(rel), mode)
    if not ustar:
        os.setxattr(p(b"dir/file"), "user.test", b"value")
        os.setxattr(p(b"dir/file"), "user.binary", b"\x00\xff\x01")
        os.setxattr(p(b"dir"), "user.dirattr", b"on a dir")
        os.setxattr(p(b"caf\xe9"), "user.latin", b"caf\xe9")
        _cap_net_raw(p(b"dir/exec"))  # after chown and chmod, which would drop it

    # Nanosecond mtimes, each entry its own; dirs last and deepest first.
    everything: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(r):
        for name in dirnames + filenames:
            everything.append(os.path.relpath(os.path.join(dirpath, name), r))
    everything.sort(key=lambda rel: (-rel.count(b"/"), rel))
    for i, rel in enumerate(everything):
        when = (T0 + 1000 * i) * 10**9 + 123_456_789 + i
        if rel == b"old":
            when = -(86400 * 365 * 10**9 + 250_000_000)  # 1969, with a fraction
        os.utime(p(rel), ns=(when, when), follow_symlinks=False)


@dataclass(frozen=True)
class Tool:
    """How one tool archives a tree and extracts an archive, and what its format cannot keep."""

    name: str
    exe: str
    create: Callable[[Path, Path], Path]  # (src tree, work dir) -> layer tar or OCI layout
    extract: Callable[[Path, Path], Path]  # (what create made, dest) -> the extracted root
    ustar: bool = False  # build the ustar-sized source tree
    lost: tuple[str, ...] = ()  # snapshot fields the format does not carry (vs the source)
    seconds: bool = False  # the format keeps whole-second mtimes only
    mtime_quirks: frozenset[bytes] = frozenset()  # paths whose archived mtime the tool bends
    why: str = ""  # why `lost`/`seconds`/`mtime_quirks`; shown when a comparison fails


def _gnu_create(fmt: str, xattrs: bool) -> Callable[[Path, Path], Path]:
    def create(src: Path, work: Path) -> Path:
        tar = work / f"layer-{fmt}.tar"
        extra = ["--xattrs", "--xattrs-include=*"] if xattrs else []
        run("tar", "-C", src, f"--format={fmt}", "--numeric-owner", *extra, "-cf", tar, ".")
        return tar
    return create


def _gnu_extract(xattrs: bool) -> Callable[[Path, Path], Path]:
    def extract(tar: Path, dest: Path) -> Path:
        dest.mkdir()
        extra = ["--xattrs", "--xattrs-include=*"] if xattrs else []
        run("tar", "-C", dest, "-xpf", tar, "--numeric-owner", *extra)
        return dest
    return extract


def _bsdtar_create(fmt: str, xattrs: bool) -> Callable[[Path, Path], Path]:
    def create(src: Path, work: Path) -> Path:
        tar = work / f"layer-bsdtar-{fmt}.tar"
        extra = ["--xattrs"] if xattrs else ["--no-xattrs"]
        run("bsdtar", "-C", src, "--format", fmt, "--numeric-owner", *extra, "-cf", tar, ".")
        return tar
    return create


def _bsdtar_extract(xattrs: bool) -> Callable[[Path, Path], Path]:
    def extract(tar: Path, dest: Path) -> Path:
        dest.mkdir()
        extra = ["--xattrs"] if xattrs else ["--no-xattrs"]
        run("bsdtar", "-C", dest, "-xpf", tar, "--numeric-owner", *extra)
        return dest
    return extract


def _umoci_create(src: Path, work: Path) -> Path:
    """An OCI layout whose one layer is `umoci repack` of the tree (unpack, copy in, repack)."""
    layout, bundle = work / "layout", work / "umoci-bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:t")
    run("umoci", "unpack", "--image", f"{layout}:t", bundle)
    # One cp -a for everything: it keeps owners, modes, xattrs, ns times and (within one run)
    # hardlinks.
    run("cp", "-a", f"{src}/.", bundle / "rootfs")
    run("umoci", "repack", "--image", f"{layout}:t", bundle)
    return layout


def _umoci_extract(layout: Path, dest: Path) -> Path:
    bundle = dest.parent / (dest.name + "-bundle")
    run("umoci", "unpack", "--image", f"{layout}:t", bundle)
    return bundle / "rootfs"


TOOLS = [
    Tool("gnu-tar-gnu", "tar", _gnu_create("gnu", False), _gnu_extract(False),
         lost=("xattrs",), seconds=True,
         why="GNU tar's gnu format has no xattr records (tar writes them only with "
             "--format=posix) and keeps whole-second mtimes"),
    Tool("gnu-tar-posix", "tar", _gnu_create("posix", True), _gnu_extract(True)),
    Tool("bsdtar-pax", "bsdtar", _bsdtar_create("pax", True), _bsdtar_extract(True),
         mtime_quirks=frozenset({b"old"}),
         why="libarchive writes a negative fractional time as floor seconds plus a positive "
             "fraction (`mtime=-31536001.75` for -31536000.25 s) and reads it back its own way; "
             "as a POSIX decimal, and for GNU tar, Go's archive/tar (Docker) and apply_layer, "
             "that record means -31536001.75 s"),
    Tool("bsdtar-ustar", "bsdtar", _bsdtar_create("ustar", False), _bsdtar_extract(False),
         ustar=True, seconds=True, why="ustar keeps whole-second mtimes and no xattrs"),
    Tool("umoci", "umoci", _umoci_create, _umoci_extract, seconds=True,
         mtime_quirks=frozenset({b"old"}),
         why="umoci 0.4.7 repack writes whole-second mtimes, truncated toward zero "
             "(`mtime=-31536000` for -31536000.25 s, where the floor is -31536001)"),
]


def _apply_tool_output(tool: Tool, made: Path, dest: Path, mode: str) -> None:
    dest.mkdir()
    if tool.name == "umoci":
        with open_source(f"oci:{made}:t") as src:
            (layer,) = src.resolve().layers
            with layer_stream(src, layer) as reader:
                apply_layer(reader, dest, mode=mode)
    else:
        with open(made, "rb") as f:
            apply_layer(f, dest, mode=mode)


@pytest.fixture(scope="session")
def full_fidelity(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless this process can make what the source tree holds: device nodes, foreign
    owners (2**21+5) and security.capability."""
    base = tmp_path_factory.mktemp("fidelity-probe")
    try:
        os.mknod(base / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        (base / "f").write_bytes(b"")
        os.chown(base / "f", BIG_ID, BIG_ID)
        _cap_net_raw(os.fsencode(base / "f"))
    except (OSError, AssertionError) as exc:
        pytest.skip(f"cannot make devices, foreign owners or file capabilities here: {exc}")


@pytest.mark.parametrize("tool", [pytest.param(t, id=t.name) for t in TOOLS])
def test_round_trip_against_tool(tool: Tool, tmp_path: Path, full_fidelity: None) -> None:
    need(tool.exe)
    src = tmp_path / "src"
    src.mkdir()
    build_source_tree(src, ustar=tool.ustar)
    source_snap = tc.snapshot(src)
    kinds = {e.kind for e in source_snap.values()}
    assert kinds == {"file", "dir", "symlink", "fifo", "chr", "blk"}, kinds
    assert any(e.mode & 0o7000 for e in source_snap.values())
    assert tool.ustar or source_snap[b"dir/exec"].xattrs[0][0] == "security.capability"
    made = tool.create(src, tmp_path)

    by_tool = tool.extract(made, tmp_path / "by-tool")
    by_delete, by_overlay = tmp_path / "by-delete", tmp_path / "by-overlay"
    _apply_tool_output(tool, made, by_delete, "delete")
    _apply_tool_output(tool, made, by_overlay, "overlay")

    def quirks(p: bytes) -> bool:
        return p in tool.mtime_quirks

    want = tc.without(tc.snapshot(by_tool), "mtime", paths=quirks)
    got = tc.without(tc.snapshot(by_delete), "mtime", paths=quirks)
    tc.assert_same(want, got, names=(tool.name, "apply_layer"), msg=tool.why)
    # One layer without whiteouts: overlay mode writes the very same tree, no overlay marks.
    tc.assert_same(tc.snapshot(by_delete), tc.snapshot(by_overlay),
                   names=("delete mode", "overlay mode"))

    # And nothing the format carries is lost on the way from the source tree.
    # tool.lost / tool.seconds: what the format itself cannot hold (see TOOLS).
    source = tc.without(tc.without(tc.snapshot(src, seconds=tool.seconds), *tool.lost),
                        "mtime", paths=quirks)
    result = tc.without(tc.without(tc.snapshot(by_delete, seconds=tool.seconds), *tool.lost),
                        "mtime", paths=quirks)
    tc.assert_same(source, result, names=("source", "apply_layer"), msg=tool.why)


# --- the kernel as the oracle, on the committed fixtures ---

KERNEL_FIXTURES = [
    pytest.param("demo", id="demo"),
    pytest.param("docker-save.tar", id="docker-save"),
    pytest.param("umoci-insert-opaque", id="umoci-insert-opaque"),
]


def umoci_rootfs(fixture: str, work: Path) -> Path:
    """`umoci unpack` of the fixture (a docker archive is turned into an OCI layout first)."""
    need("umoci")
    layout = work / "oci-layout"
    if (FIXTURES / fixture).is_dir():
        shutil.copytree(FIXTURES / fixture, layout)  # a copy: umoci may write into a layout
    else:
        need("skopeo")
        run("skopeo", "--insecure-policy", "copy", "-q",
            f"docker-archive:{FIXTURES / fixture}", f"oci:{layout}:latest")
    bundle = work / "umoci-bundle"
    run("umoci", "unpack", "--image", f"{layout}:latest", bundle)
    return bundle / "rootfs"


def _product_spec(fixture: str) -> str:
    return str(FIXTURES / fixture)


@pytest.mark.parametrize("fixture", KERNEL_FIXTURES)
def test_kernel_merged_view_equals_flatten_and_umoci(fixture: str, tmp_path: Path,
                                                      overlayfs: None) -> None:
    applied = apply_image(_product_spec(fixture), tmp_path)
    assert len(applied.diffs) >= 2, "each fixture has more than one layer"
    implicit = implicit_dirs(applied.entries)
    flat = tc.snapshot(applied.flat)
    with overlay_mount(list(reversed(applied.diffs)), tmp_path / "mnt") as mnt:
        merged = tc.snapshot(mnt)
    tc.assert_same(merged, flat, ignore_dir_mtime=implicit, names=("overlay mount", "flatten"))
    umoci = tc.snapshot(umoci_rootfs(fixture, tmp_path))
    tc.assert_same(flat, umoci, ignore_dir_mtime=implicit, names=("flatten", "umoci unpack"))


@pytest.mark.parametrize("fixture", KERNEL_FIXTURES)
def test_kernel_userxattr_merged_view_equals_flatten_and_umoci(
        fixture: str, tmp_path: Path, userns_overlayfs: None) -> None:
    applied = apply_image(_product_spec(fixture), tmp_path, namespace="user")
    implicit = implicit_dirs(applied.entries)
    # The diff dirs speak the user.* dialect only: whiteouts are still char 0/0, opaque dirs
    # carry user.overlay.opaque, and nothing trusted.overlay.* is written.
    marks: list[str] = []
    whiteouts = 0
    for diff in applied.diffs:
        for path, e in tc.snapshot(diff).items():
            assert not any(n.startswith("trusted.overlay.") for n, _ in e.xattrs), path
            marks += [n for n, _ in e.xattrs if n.startswith("user.overlay.")]
            whiteouts += e.kind == "chr" and e.rdev == (0, 0)
    assert marks and set(marks) == {"user.overlay.opaque"}, marks  # every fixture has one
    assert whiteouts or fixture == "umoci-insert-opaque"  # the others delete files
    # trusted.* is invisible inside a user namespace; drop it on our side too.
    not_trusted = lambda n: not n.startswith("trusted.")  # noqa: E731
    merged = userns_snapshot(list(reversed(applied.diffs)), tmp_path / "mnt")
    flat = tc.snapshot(applied.flat, xattr_filter=not_trusted)
    tc.assert_same(merged, flat, ignore_dir_mtime=implicit,
                   names=("userxattr overlay mount", "flatten"))
    umoci = tc.snapshot(umoci_rootfs(fixture, tmp_path), xattr_filter=not_trusted)
    tc.assert_same(flat, umoci, ignore_dir_mtime=implicit, names=("flatten", "umoci unpack"))


def test_open_layer_close_releases_the_blob() -> None:
    """Closing the reader open_layer() returns closes the blob file it opened: a leaked file
    would surface here as a ResourceWarning at gc (an error under filterwarnings=error)."""
    with open_source(_product_spec("tiny")) as src:
        layer = src.resolve().layers[0]
        with layer_stream(src, layer) as reader:
            reader.read()
        del reader
        gc.collect()


# --- a synthetic multi-layer scenario, built here ---

class LayerTar:
    """A tiny layer builder on tarfile (PAX): entries in exactly the order they are added."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tf = tarfile.open(  # noqa: SIM115 - closed by build()
            fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)
        self.names: list[tuple[bytes, bool]] = []
        self._tick = 0

    def _info(self, name: str, kind: bytes, mode: int, uid: int, gid: int,
              xattrs: dict[str, str] | None) -> tarfile.TarInfo:
        self._tick += 1  # every entry its own nanosecond mtime, in a PAX record
        ns = (T0 + self._tick) * 10**9 + 987_654_321
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = ns // 10**9
        info.pax_headers = {"mtime": f"{ns // 10**9}.{ns % 10**9:09d}"}
        for k, v in (xattrs or {}).items():
            info.pax_headers[f"SCHILY.xattr.{k}"] = v
        self.names.append((name.encode(), kind == tarfile.DIRTYPE))
        return info

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
            xattrs: dict[str, str] | None = None) -> LayerTar:
        self._tf.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid, xattrs))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
             xattrs: dict[str, str] | None = None) -> LayerTar:
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid, xattrs)
        info.size = len(data)
        self._tf.addfile(info, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> LayerTar:
        info = self._info(name, tarfile.SYMTYPE, 0o777, 0, 0, None)
        info.linkname = target
        self._tf.addfile(info)
        return self

    def hardlink(self, name: str, target: str) -> LayerTar:
        info = self._info(name, tarfile.LNKTYPE, 0o644, 0, 0, None)
        info.linkname = target
        self._tf.addfile(info)
        return self

    def node(self, name: str, kind: bytes, major: int = 0, minor: int = 0,
             mode: int = 0o600) -> LayerTar:
        info = self._info(name, kind, mode, 0, 0, None)
        info.devmajor, info.devminor = major, minor
        self._tf.addfile(info)
        return self

    def whiteout(self, path: str) -> LayerTar:
        """`.wh.<base>` beside the path it hides (image-spec layer.md "Whiteouts")."""
        head, _, base = path.rpartition("/")
        return self.file(f"{head}/.wh.{base}" if head else f".wh.{base}", mode=0o600)

    def opaque(self, dir_path: str) -> LayerTar:
        return self.file(f"{dir_path}/.wh..wh..opq" if dir_path else ".wh..wh..opq", mode=0o600)

    def build(self) -> bytes:
        self._tf.close()
        return self._buf.getvalue()


def scenario_brief() -> list[LayerTar]:
    """Base tree; then every change shape in one layer; then a root opaque marker."""
    l1 = (LayerTar()
          .dir("etc").file("etc/keep.txt", b"keep\n").file("etc/gone.txt", b"gone\n")
          .file("etc/hl1", b"linked\n", xattrs={"user.l1": "one"}).hardlink("etc/hl2", "etc/hl1")
          .dir("gone-dir").file("gone-dir/a", b"a").dir("gone-dir/sub")
          .file("gone-dir/sub/b", b"b")
          .dir("rep").file("rep/old1", b"old").dir("rep/olddir").file("rep/olddir/x", b"x")
          .dir("rep2").file("rep2/old", b"old")
          .dir("readd").file("readd/old", b"old")
          .dir("readd2").file("readd2/old", b"old")
          .file("readd3", b"was a file")
          .file("f2d", b"file becomes dir")
          .dir("d2f").file("d2f/child", b"c")
          .dir("d2s").file("d2s/child", b"c")
          .dir("keep", mode=0o750, uid=1000, gid=1000).file("keep/a", b"a").dir("keep/sub")
          .file("keep/sub/b", b"b")
          .dir("dev").node("dev/null", tarfile.CHRTYPE, 1, 3, 0o666)
          .node("dev/fifo", tarfile.FIFOTYPE, mode=0o640)
          .file("suid", b"s", mode=0o4755).dir("tmp", mode=0o1777)
          .symlink("link", "etc/keep.txt").symlink("abs", "/etc/keep.txt"))
    l2 = (LayerTar()
          .whiteout("etc/gone.txt")
          .whiteout("gone-dir")
          .dir("rep", mode=0o700).file("rep/new1", b"new").dir("rep/newdir")
          .file("rep/newdir/y", b"y").whiteout("rep/old1")  # redundant under the opaque
          .opaque("rep")  # after its new children, on purpose
          .opaque("rep2").dir("rep2").file("rep2/new", b"new")  # umoci order: marker first
          .whiteout("readd").dir("readd", mode=0o711).file("readd/new", b"new")
          .dir("readd2").file("readd2/new", b"new").whiteout("readd2")  # whiteout after
          .whiteout("readd3").dir("readd3").file("readd3/n", b"n")
          .dir("f2d").file("f2d/child", b"child")
          .file("d2f", b"dir became file")
          .symlink("d2s", "etc")
          .file("etc/new.txt", b"new", uid=1000, gid=1000)  # etc/ is an implicit parent here
          .dir("new").file("new/hard-a", b"shared").hardlink("new/hard-b", "new/hard-a")
          .whiteout("never-existed"))
    l3 = (LayerTar()
          .dir("keep", mode=0o755).file("keep/new3", b"3")
          .opaque("")  # the layer root: hides everything below but this layer's entries
          .file("top3.txt", b"top")
          .dir("z-after"))
    return [l1, l2, l3]


def scenario_root_opaque_last() -> list[LayerTar]:
    """A root opaque marker after the layer's entries, one of them under an existing dir."""
    l1 = LayerTar().dir("etc").file("etc/a", b"a").file("b", b"b").dir("keep").file("keep/x")
    l2 = (LayerTar().dir("keep").file("keep/y", b"y").file("etc/only2", b"2")
          .file("new", b"n").opaque(""))
    return [l1, l2]


def scenario_opaque_after_implicit_child() -> list[LayerTar]:
    """An opaque marker after an entry whose parent dir exists below and is not re-declared."""
    l1 = LayerTar().dir("rep").file("rep/old").dir("rep/sub").file("rep/sub/x", b"x")
    l2 = LayerTar().dir("rep").file("rep/sub/z", b"z").opaque("rep")
    return [l1, l2]


SCENARIOS = {
    "brief": scenario_brief,
    "root-opaque-last": scenario_root_opaque_last,
    "opaque-after-implicit-child": scenario_opaque_after_implicit_child,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_synthetic_overlay_mount_equals_flatten(name: str, tmp_path: Path,
                                                overlayfs: None) -> None:
    layers = SCENARIOS[name]()
    tars = [layer.build() for layer in layers]
    flat = tmp_path / "flat"
    flat.mkdir()
    diffs: list[Path] = []
    for k, data in enumerate(tars):
        diff = tmp_path / f"diff{k}"
        diff.mkdir()
        apply_layer(io.BytesIO(data), diff, mode="overlay",
                    lowers=[str(d) for d in reversed(diffs)])
        diffs.append(diff)
        apply_layer(io.BytesIO(data), flat, mode="delete")
        implicit = implicit_dirs([layer.names for layer in layers[: k + 1]])
        want = tc.snapshot(flat)
        if k == 0:  # one lower cannot be mounted without an upper: read the diff dir itself
            seen = tc.snapshot(diff, overlay_xattrs="unescape")
        else:
            with overlay_mount(list(reversed(diffs)), tmp_path / f"mnt{k}") as mnt:
                seen = tc.snapshot(mnt)
        diffs_text = tc.diff(seen, want, ignore_dir_mtime=implicit,
                             names=("overlay mount", "flatten"))
        assert not diffs_text, (f"after layer {k + 1} of {len(tars)}:\n  "
                                + "\n  ".join(diffs_text[:30]))
    if name == "brief":  # the scenario really did something: spot-check the final views
        assert sorted(want) == [b"keep", b"keep/new3", b"top3.txt", b"z-after"]


def test_synthetic_brief_layer2_view(tmp_path: Path, overlayfs: None) -> None:
    """What the merged view after layer 2 of the brief scenario must hold, spelled out."""
    l1, l2, _ = scenario_brief()
    diffs = []
    for k, layer in enumerate((l1, l2)):
        diff = tmp_path / f"diff{k}"
        diff.mkdir()
        apply_layer(io.BytesIO(layer.build()), diff, mode="overlay")
        diffs.append(diff)
    with overlay_mount([diffs[1], diffs[0]], tmp_path / "mnt") as mnt:
        snap = tc.snapshot(mnt)
    names = set(snap)
    for gone in (b"etc/gone.txt", b"gone-dir", b"rep/old1", b"rep/olddir", b"rep2/old",
                 b"readd/old", b"readd2/old", b"d2f/child", b"d2s/child"):
        assert gone not in names, gone
    for there in (b"etc/keep.txt", b"etc/new.txt", b"rep/new1", b"rep/newdir/y", b"rep2/new",
                  b"readd/new", b"readd2/new", b"readd3/n", b"f2d/child", b"keep/sub/b"):
        assert there in names, there
    assert snap[b"readd"].mode == 0o711 and snap[b"rep"].mode == 0o700
    assert snap[b"d2f"].kind == "file" and snap[b"f2d"].kind == "dir"
    assert snap[b"d2s"].kind == "symlink" and snap[b"d2s"].target == b"etc"
    assert snap[b"readd3"].kind == "dir"
    assert snap[b"new/hard-a"].links == {b"new/hard-a", b"new/hard-b"}
    assert snap[b"etc/hl1"].links == {b"etc/hl1", b"etc/hl2"}
    assert snap[b"etc/hl1"].xattrs == (("user.l1", b"one"),)
    assert snap[b"dev/null"].rdev == (1, 3)


# --- image xattrs named like overlay bookkeeping are content ---

@pytest.mark.parametrize("view", ["trusted", "user", "user-in-userns"])
def test_overlay_named_image_xattrs_stay_content(view: str, tmp_path: Path, overlayfs: None,
                                                 request: pytest.FixtureRequest) -> None:
    """An image's own `<ns>.overlay.opaque=y` must not make a dir opaque (a forged mark), and
    the merged view shows it under its own name: the kernel unescapes its own prefix
    (`<ns>.overlay.overlay.X` -> `<ns>.overlay.X`, overlayfs.rst "Nesting overlayfs mounts").

    The other namespace's `*.overlay.*` names are escaped too, on purpose: the same diff dirs
    may later be mounted with the other namespace (rootless vs rootful), where they would
    otherwise forge marks. A mount in the unpack's own namespace shows those as
    `<other>.overlay.overlay.X`; ocilayers' own readers (commit, export) unescape them.

    `user` mounts with `userxattr` from here (root sees trusted.*), `user-in-userns` from a user
    namespace (which cannot see trusted.*).
    """
    namespace = "trusted" if view == "trusted" else "user"
    forged = f"{namespace}.overlay.opaque"
    other = "user.overlay.note" if namespace == "trusted" else "trusted.overlay.note"
    l1 = LayerTar().dir("d").file("d/lower", b"lower")
    l2 = (LayerTar().dir("d", xattrs={forged: "y"})
          .file("d/upper", b"upper", xattrs={other: "plain content", "user.plain": "p"}))
    diffs = []
    for k, layer in enumerate((l1, l2)):
        diff = tmp_path / f"diff{k}"
        diff.mkdir()
        apply_layer(io.BytesIO(layer.build()), diff, mode="overlay",
                    fmt=OverlayFormat.native(namespace))
        diffs.append(diff)
    other_escaped = other.replace(".overlay.", ".overlay.overlay.", 1)
    want_upper = tuple(sorted([(other_escaped, b"plain content"), ("user.plain", b"p")]))
    if view == "user-in-userns":
        request.getfixturevalue("userns_overlayfs")
        snap = userns_snapshot([diffs[1], diffs[0]], tmp_path / "mnt")
        want_upper = (("user.plain", b"p"),)  # trusted.* cannot be seen from a user namespace
    else:
        options = "ro" if namespace == "trusted" else "ro,userxattr"
        with overlay_mount([diffs[1], diffs[0]], tmp_path / "mnt", options) as mnt:
            snap = tc.snapshot(mnt)
    assert b"d/lower" in snap, "an image xattr forged an opaque dir"
    assert snap[b"d"].xattrs == ((forged, b"y"),), "the merged view must show the image's xattr"
    assert snap[b"d/upper"].xattrs == want_upper, (
        f"the image's {other} must reach the merged view, escaped")


# --- the snapshot helper itself ---

def test_treecompare_sees_every_field(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        (root / "f").write_bytes(b"x")
        os.link(root / "f", root / "g")
        os.symlink("f", root / "s")
        os.mkdir(root / "d")
        os.utime(root / "d", ns=(T0 * 10**9 + 5, T0 * 10**9 + 5))
    os.setxattr(b / "f", "user.k", b"v")
    os.chmod(b / "d", 0o1700)
    os.utime(b / "d", ns=(T0 * 10**9 + 6, T0 * 10**9 + 6))
    os.unlink(b / "g")
    (b / "g").write_bytes(b"x")
    os.unlink(b / "s")
    os.symlink("g", b / "s")
    sa, sb = tc.snapshot(a), tc.snapshot(b)
    text = "\n".join(tc.diff(sa, sb))
    for needle in ("d: mode", "d: mtime", "f: xattrs", "f: links", "s: target", "g: links"):
        assert needle in text, (needle, text)
    assert not any(line.startswith("d: mtime")
                   for line in tc.diff(sa, sb, ignore_dir_mtime={b"d"}))
    assert tc.diff(tc.snapshot(a, seconds=True), tc.snapshot(a, seconds=True)) == []
    assert tc.loads(tc.dumps(sb)) == sb
    with pytest.raises(AssertionError, match="difference"):
        tc.assert_same(sa, sb)
    assert hashlib.sha256(b"x").hexdigest() == sa[b"f"].sha256
