"""`ocilayers pack` on real overlay upper dirs, checked through the kernel and real readers.

The oracle is the kernel's merged view. `fixtures/demo` is unpacked into a store once; its
diff dirs are the lowers of a fresh overlay (upper + work). Real changes are made in the
merged view and it is snapshotted (tests/treecompare.py, whole-second mtimes). After the
unmount, the upper dir is packed (`--xattrs all`, the diff dirs as `--lower`), the layer is
applied with `apply_layer(mode="overlay")` into a new diff dir, and the same lowers plus that
diff dir are mounted read-only: that merged view must equal the mutated one, field by field.

Directory mtimes are compared exactly: every dir the kernel touched lives in the upper dir and
becomes an explicit entry, and apply_layer restores dir times after the children; untouched
dirs come from the same lowers on both sides.

Hardlink groups are compared too (treecompare groups paths by inode in each view): a copy-up
of one name of the lower pair `usr/share/demo/hard1`/`hard2` breaks the pair in the merged
view (index=off), and the layer must give the same result.

Also: layers are read by tar-split (disasm + asm), bsdtar, GNU tar and umoci. Tests skip, with
the reason, only when a probe mount fails (or a tool is missing); every mount is undone in
teardown.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import treecompare as tc
from conftest import (
    FIXTURES,
    Layout,
    assert_one_line_error,
    requires_tool,
    run_cli,
    run_module,
)

from ocilayers import api
from ocilayers.extract import apply_layer
from ocilayers.tarstream import TarReader

T0 = 1_700_000_000


# --- running tools ---

def run(*cmd: str | os.PathLike[str], cwd: Path | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; fail the test with its stderr when it exits non-zero."""
    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, timeout=120,
                          cwd=cwd, input=input, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(os.fspath, cmd))} failed ({proc.returncode}):\n"
                             + proc.stderr.decode(errors="replace"))
    return proc


def sh(script: str, cwd: Path) -> None:
    """Run a shell script (set -eu) in `cwd`: real tools making real changes."""
    run("/bin/sh", "-euc", script, cwd=cwd)


# --- mounts ---

class Mounts:
    """Overlay mounts made by a test, all undone at teardown (lazily if still busy)."""

    def __init__(self) -> None:
        self.active: list[Path] = []

    def overlay(self, target: Path, lowers: Sequence[Path], *, upper: Path | None = None,
                work: Path | None = None, options: str = "") -> Path:
        target.mkdir(parents=True, exist_ok=True)
        opts = ["lowerdir=" + ":".join(map(str, lowers))]
        if upper is not None and work is not None:
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            opts += [f"upperdir={upper}", f"workdir={work}"]
        else:
            opts.insert(0, "ro")
        if options:
            opts.append(options)
        run("mount", "-t", "overlay", "overlay", "-o", ",".join(opts), target)
        self.active.append(target)
        return target

    def umount(self, target: Path) -> None:
        run("umount", target)
        self.active.remove(target)

    def close(self) -> None:
        for target in reversed(self.active):
            if subprocess.run(["umount", str(target)], capture_output=True,
                              check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        self.active.clear()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture(scope="module")
def module_mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.close()


def _probe_mount(base: Path, options: str) -> str | None:
    """None if an overlay with an upper dir mounts here with `options`, else why not."""
    low, upper, work, mnt = base / "low", base / "upper", base / "work", base / "mnt"
    for d in (low, upper, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={low},upperdir={upper},workdir={work}" + (f",{options}" if options else "")
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
                          capture_output=True, check=False)
    if proc.returncode != 0:
        return proc.stderr.decode(errors="replace").strip() or f"mount exit {proc.returncode}"
    subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
    return None


@pytest.fixture(scope="session")
def overlayfs(tmp_path_factory: pytest.TempPathFactory) -> None:
    if shutil.which("mount") is None:
        pytest.skip("mount is not installed")
    why = _probe_mount(tmp_path_factory.mktemp("overlay-probe"), "")
    if why is not None:
        pytest.skip(f"overlayfs probe mount failed: {why}")


@pytest.fixture(scope="session")
def redirect_options(tmp_path_factory: pytest.TempPathFactory, overlayfs: None) -> str:
    """Mount options that turn on redirect_dir and metacopy here, checked by their effect."""
    reasons = []
    for options in ("redirect_dir=on,metacopy=on", "redirect_dir=on,metacopy=on,index=off"):
        base = tmp_path_factory.mktemp("redirect-probe")
        why = _probe_mount(base, options)
        if why is not None:
            reasons.append(f"{options}: {why}")
            continue
        (base / "low/d").mkdir()
        (base / "low/f").write_bytes(b"data")
        mnt = base / "mnt"
        run("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={base / 'low'},upperdir={base / 'upper'},workdir={base / 'work'},"
            f"{options}", mnt)
        try:
            os.rename(mnt / "d", mnt / "d2")
            os.chmod(mnt / "f", 0o600)
        finally:
            run("umount", mnt)
        names = set(os.listxattr(base / "upper/d2")) | set(os.listxattr(base / "upper/f"))
        if {"trusted.overlay.redirect", "trusted.overlay.metacopy"} <= names:
            return options
        reasons.append(f"{options}: mounted, but made no redirect/metacopy xattrs ({names})")
    pytest.skip("kernel refuses redirect_dir/metacopy: " + "; ".join(reasons))


# --- the lowers: fixtures/demo unpacked into a store ---

@dataclass
class Demo:
    diffs: list[Path]  # base first

    @property
    def lowers(self) -> list[Path]:
        """Top-most first, as lowerdir= and --lower want them."""
        return list(reversed(self.diffs))


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory, overlayfs: None) -> Demo:
    root = tmp_path_factory.mktemp("store")
    proc = run_module(["--root", str(root), "unpack", str(FIXTURES / "demo"), "--json"])
    assert proc.returncode == 0, proc.stderr
    image_id = json.loads(proc.stdout)["image_id"]
    proc = run_module(["--root", str(root), "inspect", image_id, "--json"])
    assert proc.returncode == 0, proc.stderr
    cache_ids = [layer["cache_id"] for layer in json.loads(proc.stdout)["layers"]]
    diffs = [root / "overlay2" / c / "diff" for c in cache_ids]
    assert len(diffs) == 4 and all(d.is_dir() for d in diffs)
    return Demo(diffs)


# --- one container: mutate, snapshot, pack, apply, compare ---

def view(path: Path) -> tc.Snapshot:
    return tc.snapshot(path, seconds=True)


@dataclass
class Container:
    dir: Path
    demo: Demo
    mounts: Mounts
    options: str = ""

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    def start(self) -> Path:
        return self.mounts.overlay(self.merged, self.demo.lowers, upper=self.upper,
                                   work=self.dir / "work", options=self.options)

    def stop(self) -> None:
        self.mounts.umount(self.merged)

    def pack(self, **kw: Any) -> tuple[bytes, api.PackResult]:
        """The layer, uncompressed, with `--xattrs all` and the lowers (unless overridden)."""
        kw.setdefault("lowers", [str(p) for p in self.demo.lowers])
        kw.setdefault("xattrs", "all")
        buf = io.BytesIO()
        result = api.pack(str(self.upper), buf, compression="none", **kw)
        return buf.getvalue(), result

    def applied_view(self, layer: bytes, name: str = "applied") -> tc.Snapshot:
        """Apply `layer` into a new diff dir over the same lowers; the read-only merged view."""
        diff = self.dir / f"{name}-diff"
        diff.mkdir()
        apply_layer(io.BytesIO(layer), diff, mode="overlay",
                    lowers=[str(p) for p in self.demo.lowers])
        mnt = self.mounts.overlay(self.dir / f"{name}-view", [diff, *self.demo.lowers])
        try:
            return view(mnt)
        finally:
            self.mounts.umount(mnt)


def members(layer: bytes) -> list[Any]:
    reader = TarReader(io.BytesIO(layer))
    out = list(reader)
    assert reader.ended_cleanly
    return out


def member_names(layer: bytes) -> list[bytes]:
    return [e.name for e in members(layer)]


# =============================================================================================
# The big scenario: every kind of change, on a default mount
# =============================================================================================

LONG = "L" * 140

SCENARIO = rf"""
# create
mkdir -p srv/new
printf 'new file\n' > srv/new/file.txt
printf 'conf\n' > etc/new.conf
: > etc/empty
# modify
printf 'mutated\n' >> etc/hostname
# chmod-only and chown-only of lower files (copy-up of unchanged data)
chmod 600 etc/passwd
chown 1234:5678 usr/share/demo/d.txt
# delete: a regular file, a symlink
rm etc/motd bin/echo
# rm -rf a dir
rm -rf opt/app
# rm -rf then mkdir the same dir (the kernel marks it opaque)
rm -rf opt/other
mkdir opt/other
printf 'four\n' > opt/other/four.txt
# type changes: file -> dir, dir -> file, dir -> symlink
rm etc/group
mkdir etc/group
printf 'inner\n' > etc/group/inner
rm -rf var/cache
printf 'now a file\n' > var/cache
rm -rf tmp
ln -s var/tmp-target tmp
# a dir made elsewhere and moved into a merged dir, as dpkg does (the kernel may mark it opaque)
mkdir -p srv/stage/sub
printf 'staged\n' > srv/stage/sub/f
mv srv/stage opt/staged
# break the lower hardlink pair: hard1 is copied up alone
chmod 640 usr/share/demo/hard1
# rename files (a lower regular file, a lower symlink)
mv usr/bin/suid-demo usr/bin/suid-moved
mv bin/cat bin/dog
# hardlinks: to a lower file (copied up, both names linked in the upper), among new files
ln usr/share/demo/c.txt usr/share/demo/c-link
ln srv/new/file.txt srv/new/link1
ln srv/new/file.txt srv/link2
# symlinks
ln -s new/file.txt srv/rel-link
ln -s /etc/passwd srv/abs-link
ln -s does/not/exist srv/dangling
# capabilities and xattrs
printf 'ping\n' > srv/ping
chmod 755 srv/ping
setcap cap_net_raw+ep srv/ping
setcap cap_net_admin+ep usr/bin/suid-moved
setfattr -n user.note -v hello srv/new/file.txt
setfattr -n user.dirnote -v d srv
setfattr -n user.changed -v 1 etc/hostname
setfattr -x user.demo.comment usr/share/demo/c.txt
setfattr -n trusted.app -v t etc/new.conf
# fifo, devices, setuid, setgid dir
mkfifo -m 640 srv/fifo
mknod -m 620 srv/chr c 1 3
mknod -m 660 srv/blk b 7 0
printf 'suid\n' > srv/suid
chmod 4755 srv/suid
mkdir srv/sgid
chmod 2775 srv/sgid
# awkward names and numbers
printf 'long\n' > srv/{LONG}
printf 'latin-1\n' > "$(printf 'srv/caf\351')"
printf 'big\n' > srv/bigid
chown 3000000:3000001 srv/bigid
printf 'old\n' > srv/old
touch -h -d @-100 srv/old
"""

# The layer's whiteouts and opaque markers, as the scenario must produce them.
SCENARIO_WHITEOUTS = {b"bin/.wh.cat", b"bin/.wh.echo", b"etc/.wh.motd", b"opt/.wh.app",
                      b"usr/bin/.wh.suid-demo"}
# opt/other is a lower dir made again. The kernel also marks etc/group (a new dir over a lower
# *file*) and opt/staged (moved into a merged dir) opaque, but no lower dir is there to hide.
SCENARIO_OPAQUES = {b"opt/other/.wh..wh..opq"}


@dataclass
class Scenario:
    container: Container
    expected: tc.Snapshot
    blob: Path  # gzip, from the CLI
    layer: bytes  # uncompressed
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, demo: Demo,
             module_mounts: Mounts) -> Scenario:
    requires_tool("setcap")
    requires_tool("setfattr")
    c = Container(tmp_path_factory.mktemp("scenario"), demo, module_mounts)
    merged = c.start()
    notes = []
    try:
        sh(SCENARIO, merged)
        # Linux 6.7+: an image's own trusted.overlay.X set through the mount is stored
        # escaped (trusted.overlay.overlay.X) in the upper dir and must come out unescaped.
        try:
            os.setxattr(merged / "etc/new.conf", "trusted.overlay.foo", b"bar")
        except OSError as exc:
            notes.append(f"kernel refuses trusted.overlay.foo through the mount: {exc}")
        expected = view(merged)
    finally:
        c.stop()
    blob = c.dir / "layer.tar.gz"
    argv = ["pack", str(c.upper), "-o", str(blob), "--xattrs", "all", "--json"]
    for lower in demo.lowers:
        argv += ["--lower", str(lower)]
    proc = run_module(argv)
    assert proc.returncode == 0, proc.stderr
    layer = gzip.decompress(blob.read_bytes())
    return Scenario(c, expected, blob, layer, json.loads(proc.stdout), notes)


def test_scenario_round_trips_through_the_kernel(scenario: Scenario) -> None:
    actual = scenario.container.applied_view(scenario.layer)
    # sanity: the scenario really did what it says, seen through the kernel
    exp = scenario.expected
    assert exp[b"etc/group"].kind == "dir" and exp[b"var/cache"].kind == "file"
    assert exp[b"tmp"].kind == "symlink" and b"opt/app" not in exp
    assert exp[b"usr/share/demo/c.txt"].links == frozenset({b"usr/share/demo/c.txt",
                                                            b"usr/share/demo/c-link"})
    assert exp[b"srv/old"].mtime == -100
    assert exp[b"srv/bigid"].uid == 3_000_000
    assert dict(exp[b"srv/ping"].xattrs).keys() == {"security.capability"}
    tc.assert_same(exp, actual, names=("mutated", "layer applied"),
                   msg="; ".join(scenario.notes))


def test_scenario_layer_has_the_right_whiteouts_and_markers(scenario: Scenario) -> None:
    entries = members(scenario.layer)
    names = [e.name for e in entries]
    assert len(names) == len(set(names)), "duplicate entries"
    whiteouts = {n for n in names if n.rsplit(b"/", 1)[-1].startswith(b".wh.")
                 and not n.endswith(b".wh..wh..opq")}
    opaques = {n for n in names if n.endswith(b".wh..wh..opq")}
    assert whiteouts == SCENARIO_WHITEOUTS
    assert opaques == SCENARIO_OPAQUES
    for e in entries:
        assert not any(k.startswith(("trusted.overlay.", "user.overlay."))
                       and k != "trusted.overlay.foo" for k in e.xattrs), e.name
        if e.name in whiteouts:
            assert e.type == b"0" and e.size == 0 and e.mode == 0o600, e.name
    report = scenario.report
    assert set(report) == {"diff_id", "digest", "size", "media_type", "entries", "whiteouts",
                           "opaques"}
    assert report["whiteouts"] == len(SCENARIO_WHITEOUTS)
    assert report["opaques"] == len(SCENARIO_OPAQUES)
    assert report["entries"] == len(entries)
    assert report["diff_id"] == "sha256:" + hashlib.sha256(scenario.layer).hexdigest()
    blob = scenario.blob.read_bytes()
    assert report["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert report["size"] == len(blob)
    assert report["media_type"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert scenario.layer.endswith(b"\0" * 1024) and len(scenario.layer) % 512 == 0
    by = {e.name: e for e in entries}
    if not scenario.notes:
        assert by[b"etc/new.conf"].xattrs.get("trusted.overlay.foo") == b"bar"


def test_scenario_pack_is_deterministic(scenario: Scenario) -> None:
    again, _ = scenario.container.pack()
    assert again == scenario.layer
    third, _ = scenario.container.pack()
    assert third == again


def test_scenario_docker_dialect_round_trips_all_but_xattrs(scenario: Scenario) -> None:
    """--xattrs docker: the same merged view, except that changed entries keep only
    security.capability (what `docker commit` keeps)."""
    layer, _ = scenario.container.pack(xattrs="docker")
    actual = scenario.container.applied_view(layer, "docker")
    expected = scenario.expected
    tc.assert_same(expected, actual, ignore=("xattrs",),
                   names=("mutated", "docker layer applied"))
    in_layer = {e.name.rstrip(b"/") for e in members(layer)}
    for path, entry in actual.items():
        if path in in_layer:
            assert {n for n, _v in entry.xattrs} <= {"security.capability"}, path
        else:  # untouched lower entries keep their xattrs
            assert entry.xattrs == expected[path].xattrs, path
    assert dict(actual[b"srv/ping"].xattrs) == dict(expected[b"srv/ping"].xattrs)
    assert dict(actual[b"usr/bin/suid-moved"].xattrs) == \
        dict(expected[b"usr/bin/suid-moved"].xattrs)


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _upper_whiteouts(upper: Path) -> list[tuple[bytes, os.stat_result]]:
    """(on-disk path, stat) of every whiteout in the upper dir, in WalkDir order."""
    out = []
    root = os.fsencode(upper)

    def walk(rel: bytes) -> None:
        for name in sorted(os.listdir(os.path.join(root, rel) if rel else root)):
            child = rel + b"/" + name if rel else name
            st = os.lstat(os.path.join(root, child))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out.append((child, st))
            elif stat.S_ISDIR(st.st_mode):
                walk(child)

    walk(b"")
    return out


def test_scenario_docker_dialect_whiteout_linknames(scenario: Scenario) -> None:
    """`rm` makes whiteouts that are links of the kernel's shared whiteout inode (`mv` makes
    its own, nlink 1). `docker commit` gives the later names of a shared inode the first
    one's on-disk path as a stray linkname; the entries stay regular files."""
    whiteouts = _upper_whiteouts(scenario.container.upper)
    first_of: dict[int, bytes] = {}
    want: dict[bytes, bytes] = {}
    for rel, st in whiteouts:
        d, _, base = rel.rpartition(b"/")
        name = (d + b"/" if d else b"") + b".wh." + base
        if st.st_nlink > 1:
            first = first_of.setdefault(st.st_ino, rel)
            want[name] = b"" if first == rel else first
        else:
            want[name] = b""
    assert sum(1 for _r, st in whiteouts if st.st_nlink > 1) >= 2, "no shared whiteouts here"
    for xattrs in ("docker", "all"):
        layer, _ = scenario.container.pack(xattrs=xattrs)
        got = {e.name: e for e in members(layer) if e.name in want}
        assert set(got) == set(want)
        for name, linkname in want.items():
            assert got[name].type == b"0", name
            assert got[name].linkname == (linkname if xattrs == "docker" else b""), name


def test_scenario_opaque_docker_marks_every_kernel_opaque_dir(scenario: Scenario) -> None:
    # etc/group is a new dir over a lower file: the kernel marked it opaque, Docker marks it.
    upper = scenario.container.upper
    kernel_opaque = set()
    for dirpath, dirnames, _files in os.walk(upper):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if _getxattr(p, "trusted.overlay.opaque") == b"y":
                kernel_opaque.add(os.fsencode(os.path.relpath(p, upper)) + b"/.wh..wh..opq")
    assert SCENARIO_OPAQUES | {b"etc/group/.wh..wh..opq"} <= kernel_opaque
    layer, result = scenario.container.pack(opaque="docker")
    opaques = {n for n in member_names(layer) if n.endswith(b".wh..wh..opq")}
    assert opaques == kernel_opaque
    assert result.stats.opaques == len(opaques)
    tc.assert_same(scenario.expected, scenario.container.applied_view(layer, "opaque-docker"),
                   names=("mutated", "opaque=docker layer applied"))


# --- real readers ---

def test_tar_split_disassembles_and_reassembles(scenario: Scenario, tmp_path: Path) -> None:
    tar_split = requires_tool("tar-split")
    gnu_tar = requires_tool("tar")
    src = tmp_path / "layer.tar"
    src.write_bytes(scenario.layer)
    meta = tmp_path / "tar-data.json.gz"
    proc = run(tar_split, "disasm", "--output", meta, src)
    assert proc.stdout == scenario.layer, "disasm must pass the stream through unchanged"
    files = tmp_path / "files"
    files.mkdir()
    run(gnu_tar, "-xf", src, "-C", files, "--numeric-owner")
    out = tmp_path / "again.tar"
    run(tar_split, "asm", "--input", meta, "--path", files, "--output", out)
    assert out.read_bytes() == scenario.layer


def test_gnu_tar_lists_it(scenario: Scenario, tmp_path: Path) -> None:
    gnu_tar = requires_tool("tar")
    src = tmp_path / "layer.tar"
    src.write_bytes(scenario.layer)
    names = member_names(scenario.layer)
    listed = run(gnu_tar, "--quoting-style=literal", "-tf", src)
    assert listed.stderr == b""
    assert listed.stdout.splitlines() == names  # raw bytes for the non-UTF-8 name too
    verbose = run(gnu_tar, "-tvf", src)
    assert verbose.stderr == b""
    assert len(verbose.stdout.splitlines()) == len(names)


# The scenario's one name that is not UTF-8 (a raw PAX path, as Go writes it).
NON_UTF8 = b"srv/caf\xe9"


def test_bsdtar_lists_it(scenario: Scenario, tmp_path: Path) -> None:
    bsdtar = requires_tool("bsdtar")
    names = member_names(scenario.layer)
    assert NON_UTF8 in names
    src = tmp_path / "layer.tar"
    src.write_bytes(scenario.layer)
    proc = subprocess.run([bsdtar, "-tvf", str(src)], capture_output=True, timeout=120,
                          check=False)
    # libarchive wants PAX paths in UTF-8 (POSIX pax "path") and says so about the raw one,
    # exiting 1 at the end; it still lists every entry. Docker's layers behave the same.
    complaints = [line for line in proc.stderr.splitlines()
                  if b"can't be converted" not in line and b"Error exit delayed" not in line]
    assert complaints == []
    assert len(proc.stdout.splitlines()) == len(names)
    # Without that name, bsdtar reads the layer without a word.
    upper = tmp_path / "upper"
    run("cp", "-a", scenario.container.upper, upper)
    os.unlink(upper / os.fsdecode(NON_UTF8))
    buf = io.BytesIO()
    api.pack(str(upper), buf, compression="none", xattrs="all",
             lowers=[str(p) for p in scenario.container.demo.lowers])
    src.write_bytes(buf.getvalue())
    clean = run(bsdtar, "-tvf", src)
    assert clean.stderr == b""
    assert len(clean.stdout.splitlines()) == len(names) - 1
    listed = run(bsdtar, "-tf", src).stdout.splitlines()
    assert listed == [n for n in names if n != NON_UTF8]


def test_umoci_unpacks_it_as_a_layer(scenario: Scenario, tmp_path: Path) -> None:
    umoci = requires_tool("umoci")
    image = Layout.copy_of("demo", tmp_path / "image")
    src = tmp_path / "layer.tar"
    src.write_bytes(scenario.layer)  # umoci 0.4.7 takes it uncompressed and gzips it itself
    run(umoci, "raw", "add-layer", "--image", f"{image.root}:latest", src)
    # `raw unpack`: the rootfs only. (`umoci unpack` also writes config.json, for which it reads
    # the rootfs's /etc/group, a dir since the scenario's file->dir change.)
    rootfs = tmp_path / "rootfs"
    run(umoci, "raw", "unpack", "--image", f"{image.root}:latest", rootfs)
    # umoci's rootfs is a plain tree: it must hold what the kernel showed.
    tc.assert_same(scenario.expected, view(rootfs), names=("mutated", "umoci raw unpack"))


def test_umoci_unpack_makes_a_bundle(scenario: Scenario, tmp_path: Path) -> None:
    """Full `umoci unpack` (rootfs + config.json). It reads /etc/group, so the layer is packed
    from a copy of the upper without the scenario's etc/group dir (the lower file shows)."""
    umoci = requires_tool("umoci")
    upper = tmp_path / "upper"
    run("cp", "-a", scenario.container.upper, upper)
    etc = os.lstat(upper / "etc")
    shutil.rmtree(upper / "etc/group")
    os.utime(upper / "etc", ns=(etc.st_atime_ns, etc.st_mtime_ns))
    buf = io.BytesIO()
    api.pack(str(upper), buf, compression="none", xattrs="all",
             lowers=[str(p) for p in scenario.container.demo.lowers])
    layer = buf.getvalue()
    kernel = scenario.container.applied_view(layer, "umoci")
    assert kernel[b"etc/group"].kind == "file"
    image = Layout.copy_of("demo", tmp_path / "image")
    src = tmp_path / "layer.tar"
    src.write_bytes(layer)
    run(umoci, "raw", "add-layer", "--image", f"{image.root}:latest", src)
    bundle = tmp_path / "bundle"
    run(umoci, "unpack", "--image", f"{image.root}:latest", bundle)
    assert (bundle / "config.json").is_file()
    tc.assert_same(kernel, view(bundle / "rootfs"), names=("kernel", "umoci unpack"))


# =============================================================================================
# redirect_dir and metacopy, on their own mounts
# =============================================================================================

REDIRECT_SCENARIO = r"""
mkdir -p srv
mv usr/share/demo srv/moved           # absolute redirect, whiteout at the old path
mv opt/app opt/app-renamed            # relative redirect
rm srv/moved/a.txt                    # a whiteout inside a renamed dir
printf 'added\n' > srv/moved/added.txt
printf 'more\n' >> srv/moved/d.txt    # data write: full copy-up inside a renamed dir
mv opt/app-renamed/lib opt/lib-moved  # a dir renamed out of a renamed dir
mkdir opt/app                         # a new dir where a renamed one was
printf 'again\n' > opt/app/again
mv opt/other/three.txt opt/three.txt  # a file renamed out of an opaque lower dir
"""

METACOPY_SCENARIO = r"""
chmod 600 etc/passwd                        # metacopy
chown 1000:1000 usr/bin/suid-demo           # metacopy (chown clears setuid)
touch -d @1600000000 usr/share/demo/c.txt   # metadata only
mv etc/hostname etc/hostname.old            # metacopy + redirect on a file
ln usr/share/demo/d.txt usr/share/demo/d-link   # metacopy, linked, redirect on the inode
"""

METACOPY_INTO_NEW_DIR_IN_RENAMED_DIR = r"""
mv usr/share/demo usr/share/moved
mkdir usr/share/moved/newdir                  # opaque: a new dir in a merge dir
mv etc/passwd usr/share/moved/newdir/passwd   # metacopy + absolute redirect /etc/passwd
"""

METACOPY_IN_RENAMED_DIR = r"""
mkdir -p srv
mv usr/share/demo srv/moved
chmod 600 srv/moved/c.txt                   # metacopy without its own redirect
"""


def _redirect_round_trip(tmp_path: Path, demo: Demo, mounts: Mounts, options: str,
                         script: str, want_xattrs: set[str],
                         capsys: pytest.CaptureFixture[str]) -> None:
    c = Container(tmp_path, demo, mounts, options)
    merged = c.start()
    try:
        sh(script, merged)
        expected = view(merged)
    finally:
        c.stop()
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(c.upper):
        for n in dirnames + filenames:
            seen.update(os.listxattr(os.path.join(dirpath, n), follow_symlinks=False))
    missing = want_xattrs - seen
    assert not missing, f"the kernel did not make {missing}: the scenario tests nothing"

    # without the lowers: refused, one line, exit 1, nothing written
    out = tmp_path / "out" / "layer.tar"
    out.parent.mkdir()
    code, _stdout, err = run_cli(["pack", str(c.upper), "-o", str(out)], capsys)
    assert_one_line_error(code, err, "--lower")
    assert os.listdir(out.parent) == []

    # with them: the layer that gives the same merged view
    layer, _ = c.pack()
    tc.assert_same(expected, c.applied_view(layer), names=("mutated", "layer applied"))


def test_redirect_dir_round_trip(tmp_path: Path, demo: Demo, mounts: Mounts,
                                 redirect_options: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _redirect_round_trip(tmp_path, demo, mounts, redirect_options, REDIRECT_SCENARIO,
                         {"trusted.overlay.redirect"}, capsys)


def test_metacopy_round_trip(tmp_path: Path, demo: Demo, mounts: Mounts,
                             redirect_options: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    _redirect_round_trip(tmp_path, demo, mounts, redirect_options, METACOPY_SCENARIO,
                         {"trusted.overlay.metacopy", "trusted.overlay.redirect"}, capsys)


def test_metacopy_inside_a_renamed_dir_round_trip(tmp_path: Path, demo: Demo, mounts: Mounts,
                                                  redirect_options: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # The kernel finds srv/moved/c.txt's data through srv/moved's redirect
    # (/usr/share/demo); c.txt itself has metacopy and no redirect.
    _redirect_round_trip(tmp_path, demo, mounts, redirect_options, METACOPY_IN_RENAMED_DIR,
                         {"trusted.overlay.metacopy", "trusted.overlay.redirect"}, capsys)


def test_metacopy_moved_into_a_new_dir_inside_a_renamed_dir(
        tmp_path: Path, demo: Demo, mounts: Mounts, redirect_options: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    _redirect_round_trip(tmp_path, demo, mounts, redirect_options,
                         METACOPY_INTO_NEW_DIR_IN_RENAMED_DIR,
                         {"trusted.overlay.metacopy", "trusted.overlay.redirect",
                          "trusted.overlay.opaque"}, capsys)


# =============================================================================================
# hardlinked non-regular files (Docker writes type-1 entries for any non-dir with nlink > 1)
# =============================================================================================

def test_hardlinked_special_files_round_trip(tmp_path: Path, demo: Demo,
                                             mounts: Mounts) -> None:
    c = Container(tmp_path, demo, mounts)
    merged = c.start()
    try:
        sh("""
mkdir srv
ln -s target srv/sym && ln srv/sym srv/sym2
mkfifo srv/fifo && ln srv/fifo srv/fifo2
mknod srv/chr c 1 3 && ln srv/chr srv/chr2
""", merged)
        expected = view(merged)
    finally:
        c.stop()
    assert expected[b"srv/sym"].links == frozenset({b"srv/sym", b"srv/sym2"})
    layer, _ = c.pack()
    tc.assert_same(expected, c.applied_view(layer), names=("mutated", "layer applied"))


# =============================================================================================
# Seeded random operations
# =============================================================================================

# Never picked by an op: the 2 MB busybox (a copy-up per op would only cost time).
PROTECTED = {b"bin/busybox"}
MODES_FILE = (0o600, 0o644, 0o640, 0o755, 0o4755, 0o2755, 0o444)
MODES_DIR = (0o700, 0o755, 0o750, 0o1777, 0o2775)
OWNERS = ((0, 0), (1000, 1000), (1, 2), (3_000_000, 65534))
TIMES = (T0, T0 - 86400 * 400, 0, -3600, T0 + 12345)


class World:
    """The merged view as the random ops see it."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = os.fsencode(root)
        self.rng = rng
        self.log: list[str] = []
        self.counter = 0

    def entries(self) -> list[tuple[bytes, os.stat_result]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                out.append((os.path.relpath(p, self.root), os.lstat(p)))
        return out

    def pick(self, pred: Callable[[os.stat_result], bool]) -> bytes | None:
        cands = sorted(p for p, st in self.entries() if pred(st) and p not in PROTECTED
                       and not any(p.startswith(x + b"/") for x in PROTECTED))
        return self.rng.choice(cands) if cands else None

    def dir(self) -> bytes:
        """A dir to put something in ('' is the root)."""
        d = self.pick(lambda st: stat.S_ISDIR(st.st_mode))
        return b"" if d is None or self.rng.random() < 0.2 else d

    def new_name(self, parent: bytes) -> bytes:
        self.counter += 1
        name = self.rng.choice([b"n%d" % self.counter, b"file-%d.txt" % self.counter,
                                b"caf\xe9%d" % self.counter, b"d%d" % self.counter,
                                b"x" * 110 + b"%d" % self.counter])
        return os.path.join(parent, name) if parent else name

    def abs(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel)

    def data(self) -> bytes:
        return os.urandom(self.rng.choice((0, 1, 100, 511, 512, 513, 5000)))


def _is_file(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _is_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode)


def _non_dir(st: os.stat_result) -> bool:
    return not stat.S_ISDIR(st.st_mode)


def _any(st: os.stat_result) -> bool:
    return True


def op_create(w: World) -> str | None:
    p = w.new_name(w.dir())
    with open(w.abs(p), "wb") as f:
        f.write(w.data())
    return f"create {p!r}"


def op_modify(w: World) -> str | None:
    p = w.pick(_is_file)
    if p is None:
        return None
    with open(w.abs(p), "ab") as f:
        f.write(w.data() or b"+")
    return f"modify {p!r}"


def op_chmod(w: World) -> str | None:
    p = w.pick(lambda st: _is_file(st) or _is_dir(st))
    if p is None:
        return None
    mode = w.rng.choice(MODES_DIR if os.path.isdir(w.abs(p)) else MODES_FILE)
    os.chmod(w.abs(p), mode)
    return f"chmod {mode:o} {p!r}"


def op_chown(w: World) -> str | None:
    p = w.pick(_any)
    if p is None:
        return None
    uid, gid = w.rng.choice(OWNERS)
    os.lchown(w.abs(p), uid, gid)
    return f"chown {uid}:{gid} {p!r}"


def op_touch(w: World) -> str | None:
    p = w.pick(_any)
    if p is None:
        return None
    t = w.rng.choice(TIMES) * 1_000_000_000 + w.rng.choice((0, 999_999_999))
    os.utime(w.abs(p), ns=(t, t), follow_symlinks=False)
    return f"touch {t} {p!r}"


def op_delete(w: World) -> str | None:
    p = w.pick(_non_dir)
    if p is None:
        return None
    os.unlink(w.abs(p))
    return f"rm {p!r}"


def op_mkdir(w: World) -> str | None:
    p = w.new_name(w.dir())
    os.mkdir(w.abs(p))
    return f"mkdir {p!r}"


def op_rmrf(w: World) -> str | None:
    p = w.pick(_is_dir)
    if p is None:
        return None
    shutil.rmtree(w.abs(p))
    return f"rm -rf {p!r}"


def op_rmrf_mkdir(w: World) -> str | None:
    p = w.pick(_is_dir)
    if p is None:
        return None
    shutil.rmtree(w.abs(p))
    os.mkdir(w.abs(p))
    with open(os.path.join(w.abs(p), b"fresh"), "wb") as f:
        f.write(b"fresh")
    return f"rm -rf + mkdir {p!r}"


def op_rename_file(w: World) -> str | None:
    p = w.pick(_non_dir)
    if p is None:
        return None
    q = w.new_name(w.dir())
    os.rename(w.abs(p), w.abs(q))
    return f"mv {p!r} {q!r}"


def op_rename_dir(w: World) -> str | None:
    """Works for dirs only in the upper; lower dirs need redirect_dir (else EXDEV)."""
    p = w.pick(_is_dir)
    if p is None:
        return None
    q = w.new_name(w.dir())
    if q.startswith(p + b"/") or q == p:
        return None
    try:
        os.rename(w.abs(p), w.abs(q))
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return f"mv {p!r} {q!r}: EXDEV"
        raise
    return f"mv {p!r} {q!r}"


def op_file_to_dir(w: World) -> str | None:
    p = w.pick(_non_dir)
    if p is None:
        return None
    os.unlink(w.abs(p))
    os.mkdir(w.abs(p))
    with open(os.path.join(w.abs(p), b"inner"), "wb") as f:
        f.write(b"inner")
    return f"file->dir {p!r}"


def op_dir_to_file(w: World) -> str | None:
    p = w.pick(_is_dir)
    if p is None:
        return None
    shutil.rmtree(w.abs(p))
    with open(w.abs(p), "wb") as f:
        f.write(b"was a dir")
    return f"dir->file {p!r}"


def op_to_symlink(w: World) -> str | None:
    p = w.pick(_any)
    if p is None:
        return None
    if os.path.isdir(w.abs(p)) and not os.path.islink(w.abs(p)):
        shutil.rmtree(w.abs(p))
    else:
        os.unlink(w.abs(p))
    os.symlink(b"../somewhere/else", w.abs(p))
    return f"->symlink {p!r}"


def op_hardlink(w: World) -> str | None:
    # Regular files only: hardlinked symlinks/fifos/devices have their own test
    # (test_hardlinked_special_files_round_trip).
    p = w.pick(_is_file)
    if p is None:
        return None
    q = w.new_name(w.dir())
    os.link(w.abs(p), w.abs(q))
    return f"ln {p!r} {q!r}"


def op_symlink(w: World) -> str | None:
    q = w.new_name(w.dir())
    target = w.rng.choice([b"/etc/passwd", b"../x", b"dangling", b"t" * 150])
    os.symlink(target, w.abs(q))
    return f"ln -s {target!r} {q!r}"


def op_xattr(w: World) -> str | None:
    p = w.pick(lambda st: _is_file(st) or _is_dir(st))
    if p is None:
        return None
    existing = [n for n in os.listxattr(w.abs(p)) if n.startswith("user.")]
    if existing and w.rng.random() < 0.4:
        name = w.rng.choice(existing)
        os.removexattr(w.abs(p), name)
        return f"setfattr -x {name} {p!r}"
    name = w.rng.choice(["user.a", "user.b", "trusted.t"])
    value = w.rng.choice([b"1", b"", b"\0binary\xff"])
    os.setxattr(w.abs(p), name, value)
    return f"setfattr {name}={value!r} {p!r}"


def op_fifo(w: World) -> str | None:
    q = w.new_name(w.dir())
    os.mkfifo(w.abs(q), 0o640)
    return f"mkfifo {q!r}"


def op_device(w: World) -> str | None:
    q = w.new_name(w.dir())
    kind = w.rng.choice([stat.S_IFCHR, stat.S_IFBLK])
    os.mknod(w.abs(q), kind | 0o600, os.makedev(w.rng.randrange(1, 10), w.rng.randrange(256)))
    return f"mknod {q!r}"


OPS: list[Callable[[World], str | None]] = [
    op_create, op_create, op_modify, op_chmod, op_chown, op_touch, op_delete, op_delete,
    op_mkdir, op_rmrf, op_rmrf_mkdir, op_rename_file, op_rename_dir, op_file_to_dir,
    op_dir_to_file, op_to_symlink, op_hardlink, op_symlink, op_xattr, op_fifo, op_device,
]


def _random_run(seed: int, n_ops: int, base: Path, demo: Demo, mounts: Mounts,
                options: str) -> str | None:
    """One seed: None when the round trip holds, else a report with the seed and the ops."""
    rng = random.Random(seed)
    c = Container(base / f"seed-{seed}", demo, mounts, options)
    merged = c.start()
    w = World(merged, rng)
    ops_pool = OPS + [op_rename_dir] * 2 if options else OPS  # renames matter more there
    try:
        while len(w.log) < n_ops:
            done = rng.choice(ops_pool)(w)
            if done is not None:
                w.log.append(done)
        expected = view(merged)
    finally:
        c.stop()
    ops = "\n    ".join(w.log)
    try:
        layer, _ = c.pack()
        actual = c.applied_view(layer)
        diffs = tc.diff(expected, actual, names=("mutated", "layer applied"))
    except Exception as exc:  # a refusal or crash is a finding too; keep going
        diffs = [f"{type(exc).__name__}: {exc}"]
    if not diffs:
        shutil.rmtree(c.dir)
        return None
    return (f"seed {seed} (options {options or 'default'}): {len(diffs)} difference(s)\n  "
            + "\n  ".join(diffs[:15]) + f"\n  ops:\n    {ops}")


def _random_suite(seeds: range, n_ops: int, tmp_path: Path, demo: Demo, mounts: Mounts,
                  options: str) -> None:
    failures = [r for seed in seeds
                if (r := _random_run(seed, n_ops, tmp_path, demo, mounts, options))]
    if failures:
        summary = "\n".join(f"  {f.splitlines()[0]}: {f.splitlines()[1].strip()}"
                             for f in failures)
        pytest.fail(f"{len(failures)} of {len(seeds)} seeds failed "
                    f"(rerun one with random.Random(seed)):\n{summary}\n\n"
                    + "\n\n".join(failures[:3]), pytrace=False)


def test_random_operations_round_trip(tmp_path: Path, demo: Demo, mounts: Mounts) -> None:
    _random_suite(range(30), 25, tmp_path, demo, mounts, "")


def test_random_operations_with_redirect_and_metacopy(tmp_path: Path, demo: Demo,
                                                      mounts: Mounts,
                                                      redirect_options: str) -> None:
    _random_suite(range(100, 130), 25, tmp_path, demo, mounts, redirect_options)
