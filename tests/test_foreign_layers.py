"""Layers other tools write (issue 13): whiteouts below a non-directory of the same layer.

`umoci repack` (0.4.7, Debian's) turns a dir into a symlink, file or fifo and still writes
`.wh.` entries for the old dir's children below the new non-directory, in the same layer:

    lrwxrwxrwx usr/share/pixmaps -> ../icons
    ---------- usr/share/pixmaps/.wh.debian-logo.png

The non-directory already hides the whole lower dir, so such a whiteout (or opaque marker) hides
nothing: apply_layer ignores it in both modes (nothing written, no symlink followed) and counts
it in `LayerStats.ignored_whiteouts`, whichever comes first in the tar; verify accepts it and
export rebuilds the layer byte for byte. Below a symlink of a LOWER layer a whiteout is still
refused (delete mode) or contained in the layer's own diff dir (overlay mode), never followed.

The real case is built here with the real umoci; the shapes around it with tests/tarbuilder.py,
beside sentinel trees (outside the target, and in /tmp) that must not change.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
import treecompare as tc
from conftest import requires_tool
from test_extract import (
    PROBES,
    _probe,
    assert_unchanged,
    is_whiteout,
    kind,
    message,
    plant,
    snapshot,
)
from test_extract_real import (  # noqa: F401 (overlayfs: a fixture, used by name)
    apply_image,
    implicit_dirs,
    overlay_mount,
    overlayfs,
)
from test_store import Capsys, ok, read_output, read_source, unpack, verify_ok, write_oci

from ocilayers.errors import UnsafeEntryError
from ocilayers.extract import LayerStats, apply_layer
from ocilayers.sources import open_source
from ocilayers.store import diff_size
from ocilayers.verify import compare_tree

MODES = ("overlay", "delete")
OPAQUE = "trusted.overlay.opaque"


# -- the harness: a target beside sentinel trees --

@pytest.fixture(scope="session")
def caps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    tmp = tmp_path_factory.mktemp("probes")
    return {name: _probe(fn, tmp) for name, fn in PROBES.items()}


def need(caps: dict[str, str | None], *names: str) -> None:
    for name in names:
        if caps[name] is not None:
            pytest.skip(f"cannot {name.replace('_', ' ')} here ({caps[name]})")


def need_mode(caps: dict[str, str | None], mode: str) -> None:
    if mode == "overlay":
        need(caps, "whiteout_mknod", "trusted_xattr")


@dataclass(frozen=True)
class World:
    tmp: Path
    root: Path  # the target
    out: Path  # a sentinel tree beside it
    ext: Path  # a sentinel tree in /tmp

    def snap(self) -> dict[str, tuple[object, ...]]:
        return snapshot([self.tmp, self.ext], self.root)


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


def apply(layer: list[tb.Member] | bytes, root: Path, **kw: Any) -> LayerStats:
    data = layer if isinstance(layer, bytes) else tb.build(layer)
    stats = apply_layer(io.BytesIO(data), str(root), **kw)
    if stats.size is not None:
        assert stats.size == diff_size(str(root)), "stats.size differs from the dir's size"
    return stats


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (never following a symlink) -> its kind."""
    return {str(p.relative_to(root)): kind(p) for p in sorted(root.rglob("*"))}


def overlay_marks(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in [root, *root.rglob("*")]
            if not p.is_symlink() and any(n.endswith(".overlay.opaque")
                                          for n in os.listxattr(p))]


# -- a real umoci image --

def _umoci(*args: str | Path) -> None:
    exe = requires_tool("umoci")
    rootless = ["--rootless"] if os.geteuid() != 0 and args[0] in ("unpack", "repack") else []
    argv = [exe, str(args[0]), *rootless, *map(str, args[1:])]
    proc = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                             + proc.stderr.decode(errors="replace"))


def umoci_image(work: Path) -> Path:
    """An OCI layout (tag `t`) made by umoci: layer 1 has three dirs with children, layer 2
    (one `umoci repack`) turns them into a symlink, a regular file and a fifo."""
    layout = work / "layout"
    _umoci("init", "--layout", layout)
    _umoci("new", "--image", f"{layout}:t")
    _umoci("unpack", "--image", f"{layout}:t", work / "b1")
    r = work / "b1" / "rootfs"
    for d in ("usr/share/pixmaps/sub", "usr/share/icons", "opt/tool/lib", "srv/pipe"):
        (r / d).mkdir(parents=True)
    (r / "usr/share/pixmaps/debian-logo.png").write_bytes(b"logo\n")
    (r / "usr/share/pixmaps/sub/deep.png").write_bytes(b"deep\n")
    (r / "usr/share/icons/icon.png").write_bytes(b"icon\n")
    (r / "opt/tool/README").write_bytes(b"readme\n")
    (r / "opt/tool/lib/x.so").write_bytes(b"\x7fELF")
    (r / "srv/pipe/x").write_bytes(b"x\n")
    _umoci("repack", "--image", f"{layout}:t", work / "b1")
    _umoci("unpack", "--image", f"{layout}:t", work / "b2")
    r = work / "b2" / "rootfs"
    for d in ("usr/share/pixmaps", "opt/tool", "srv/pipe"):
        shutil.rmtree(r / d)
    os.symlink("../icons", r / "usr/share/pixmaps")  # the issue's case
    (r / "opt/tool").write_bytes(b"now a file\n")
    os.mkfifo(r / "srv/pipe")
    _umoci("repack", "--image", f"{layout}:t", work / "b2")
    return layout


UMOCI_IGNORED = {  # what umoci 0.4.7 writes below the new non-directories (checked first)
    "usr/share/pixmaps/.wh.debian-logo.png", "usr/share/pixmaps/.wh.sub",
    "opt/tool/.wh.README", "opt/tool/.wh.lib", "srv/pipe/.wh.x",
}


def _names(layer_tar: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tf:
        return [m.name.removeprefix("./") for m in tf.getmembers()]


@pytest.fixture
def umoci_layout(tmp_path: Path) -> Path:
    layout = umoci_image(tmp_path / "umoci")
    src = read_source(layout)
    assert len(src.layer_tars) == 2
    names = _names(src.layer_tars[1])
    # umoci still writes them (else this test tests nothing): below the non-directory, after it
    assert set(names) >= UMOCI_IGNORED, names
    assert names.index("usr/share/pixmaps") < names.index("usr/share/pixmaps/.wh.sub")
    return layout


def test_umoci_layer_unpacks_verifies_and_exports_byte_for_byte(umoci_layout: Path,
                                                                 tmp_path: Path,
                                                                 capsys: Capsys) -> None:
    """The issue: `unpack` used to refuse ("parent 'usr/share/pixmaps' is a symlink")."""
    src = read_source(umoci_layout)
    store = tmp_path / "store"
    result = unpack(capsys, store, f"oci:{umoci_layout}:t")
    assert result["image_id"] == src.image_id
    assert [layer["diff_id"] for layer in result["layers"]] == src.diff_ids
    verify_ok(capsys, store)
    # Nothing was written below the new non-directories, in any diff dir.
    for layer in result["layers"]:
        diff = store / "overlay2" / layer["cache_id"] / "diff"
        assert not any(is_whiteout(p) for p in diff.rglob("*")), tree(diff)
    top = store / "overlay2" / result["layers"][1]["cache_id"] / "diff"
    assert os.readlink(top / "usr/share/pixmaps") == "../icons"
    assert (top / "opt/tool").read_bytes() == b"now a file\n"
    assert kind(top / "srv/pipe") == "fifo"
    # export rebuilds each layer from its tar-split records (the ignored whiteouts included)
    out = tmp_path / "export"
    ok(capsys, store, "export", src.image_id, "-o", str(out), "--format", "oci",
       "--compression", "none")
    config, blobs, _ = read_output(out, "oci")
    assert config == src.config
    assert list(blobs) == list(src.layer_tars)
    assert ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs] == src.diff_ids


def test_umoci_layer_flattens_like_umoci_unpack(umoci_layout: Path, tmp_path: Path,
                                                capsys: Capsys) -> None:
    flat = tmp_path / "flat"
    ok(capsys, tmp_path / "store", "flatten", f"oci:{umoci_layout}:t", str(flat))
    _umoci("unpack", "--image", f"{umoci_layout}:t", tmp_path / "by-umoci")
    tc.assert_same(tc.snapshot(tmp_path / "by-umoci" / "rootfs"), tc.snapshot(flat),
                   names=("umoci unpack", "ocilayers flatten"))
    assert os.readlink(flat / "usr/share/pixmaps") == "../icons"
    assert (flat / "usr/share/icons/icon.png").read_bytes() == b"icon\n"


@pytest.mark.usefixtures("overlayfs")
def test_umoci_layer_merged_view_equals_umoci_unpack(umoci_layout: Path,
                                                      tmp_path: Path) -> None:
    """The kernel as the oracle: the overlay-mode diff dirs, mounted, show what umoci unpack
    and the delete-mode flatten make."""
    work = tmp_path / "work"
    work.mkdir()
    applied = apply_image(f"oci:{umoci_layout}:t", work)
    implicit = implicit_dirs(applied.entries)
    with overlay_mount(list(reversed(applied.diffs)), tmp_path / "mnt") as mnt:
        merged = tc.snapshot(mnt)
    _umoci("unpack", "--image", f"{umoci_layout}:t", tmp_path / "by-umoci")
    by_umoci = tc.snapshot(tmp_path / "by-umoci" / "rootfs")
    tc.assert_same(merged, tc.snapshot(applied.flat), ignore_dir_mtime=implicit,
                   names=("overlay mount", "flatten"))
    tc.assert_same(merged, by_umoci, ignore_dir_mtime=implicit,
                   names=("overlay mount", "umoci unpack"))
    assert merged[b"usr/share/pixmaps"].kind == "symlink"


@pytest.mark.parametrize("mode", MODES)
def test_umoci_layer_stats_count_the_ignored_whiteouts(umoci_layout: Path, tmp_path: Path,
                                                       mode: str,
                                                       caps: dict[str, str | None]) -> None:
    need_mode(caps, mode)
    dests = [tmp_path / "d1", tmp_path / "d2"] if mode == "overlay" else [tmp_path / "flat"] * 2
    with open_source(f"oci:{umoci_layout}:t") as src:
        stats = []
        for layer, dest in zip(src.resolve().layers, dests, strict=True):
            dest.mkdir(exist_ok=True)
            with src.open_layer(layer) as reader:
                stats.append(apply_layer(reader, str(dest), mode=mode))
                reader.finish()
    assert stats[0].ignored_whiteouts == 0
    assert (stats[1].whiteouts, stats[1].ignored_whiteouts) == (5, 5)


# -- crafted: below a non-directory of the same layer --

@dataclass(frozen=True)
class Case:
    layer: Callable[[str], list[tb.Member]]  # given the outside sentinel's path
    ignored: int
    final: dict[str, str]  # path -> kind after applying, both modes
    needs: tuple[str, ...] = ()


def _wh(*paths: str) -> list[tb.Member]:
    return [tb.opaque(p[:-len("/.opq")]) if p.endswith("/.opq") else tb.whiteout(p)
            for p in paths]


P_MARKERS = _wh("p/secret", "p/dir", "p/.opq")  # what umoci writes, plus an opaque marker
NESTED = _wh("a/dir/inner", "a/dir/.opq", "a/dir/sub/x")

SAME_LAYER: dict[str, Case] = {
    "symlink-first": Case(lambda o: [tb.symlink("p", o), *P_MARKERS], 3, {"p": "symlink"}),
    "symlink-last": Case(lambda o: [*P_MARKERS, tb.symlink("p", o)], 3, {"p": "symlink"}),
    "symlink-between": Case(lambda o: [P_MARKERS[0], tb.symlink("p", o), *P_MARKERS[1:]], 3,
                            {"p": "symlink"}),
    "symlink-into-the-layer-first": Case(
        lambda o: [tb.dir("q"), tb.file("q/secret", b"mine"), tb.symlink("p", "q"),
                   *P_MARKERS], 3, {"p": "symlink", "q/secret": "file"}),
    "symlink-into-the-layer-last": Case(
        lambda o: [*P_MARKERS, tb.dir("q"), tb.file("q/secret", b"mine"),
                   tb.symlink("p", "q")], 3, {"p": "symlink", "q/secret": "file"}),
    "symlink-into-a-lower-dir": Case(
        lambda o: [tb.symlink("p", "a"), *_wh("p/other", "p/dir/inner", "p/.opq")], 3,
        {"p": "symlink"}),  # (delete mode: a/other, a/dir/inner survive)
    "file-first": Case(lambda o: [tb.file("p", b"now a file"), *P_MARKERS], 3, {"p": "file"}),
    "file-last": Case(lambda o: [*P_MARKERS, tb.file("p", b"now a file")], 3, {"p": "file"}),
    "fifo-first": Case(lambda o: [tb.fifo("p"), *P_MARKERS], 3, {"p": "fifo"}),
    "fifo-last": Case(lambda o: [*P_MARKERS, tb.fifo("p")], 3, {"p": "fifo"}),
    "chardev-first": Case(lambda o: [tb.chardev("p", 1, 3), *P_MARKERS], 3, {"p": "char"},
                          ("device_mknod",)),
    "chardev-last": Case(lambda o: [*P_MARKERS, tb.chardev("p", 1, 3)], 3, {"p": "char"},
                         ("device_mknod",)),
    "blockdev-first": Case(lambda o: [tb.blockdev("p", 8, 1), *P_MARKERS], 3, {"p": "block"},
                           ("device_mknod",)),
    "hardlink-first": Case(lambda o: [tb.file("t", b"t"), tb.hardlink("p", "t"), *P_MARKERS],
                           3, {"p": "file", "t": "file"}),
    "hardlink-last-target-later": Case(
        lambda o: [tb.hardlink("p", "t"), *P_MARKERS, tb.file("t", b"t")], 3,
        {"p": "file", "t": "file"}),
    "nested-symlink-first": Case(lambda o: [tb.symlink("a", o), *NESTED], 3, {"a": "symlink"}),
    "nested-symlink-last": Case(lambda o: [*NESTED, tb.symlink("a", o)], 3, {"a": "symlink"}),
    "nested-file-first": Case(lambda o: [tb.file("a", b"f"), *NESTED], 3, {"a": "file"}),
    "nested-file-last": Case(lambda o: [*NESTED, tb.file("a", b"f")], 3, {"a": "file"}),
    "umoci-shape": Case(
        lambda o: [tb.dir("usr/"), tb.dir("usr/share/"), tb.dir("usr/share/icons/"),
                   tb.symlink("usr/share/pixmaps", "../icons"),
                   tb.whiteout("usr/share/pixmaps/debian-logo.png", mode=0, mtime=0),
                   tb.whiteout("usr/share/pixmaps/sub", mode=0, mtime=0)], 2,
        {"usr/share/pixmaps": "symlink", "usr/share/icons": "dir"}),
    # a whiteout beside the non-directory still works as ever
    "beside-it": Case(lambda o: [tb.symlink("p", o), tb.whiteout("keep"), *P_MARKERS], 3,
                      {"p": "symlink", "keep": "whiteout|missing"}),
}


def lower_tree(root: Path) -> None:
    """Delete mode's lower content: dirs where the layer puts its non-directories."""
    for d in ("p/dir", "a/dir/sub", "q"):
        (root / d).mkdir(parents=True)
    for f in ("p/secret", "p/dir/inner", "a/dir/inner", "a/dir/sub/x", "a/other", "keep"):
        (root / f).write_bytes(b"lower")


def _entries(layer: list[tb.Member]) -> set[str]:
    """The paths the layer's own entries (and their parents) make."""
    out: set[str] = set()
    for m in layer:
        name = m.name.decode().strip("/")
        if b".wh." in m.name:
            continue
        parts = name.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [pytest.param(c, id=n) for n, c in SAME_LAYER.items()])
def test_marker_below_same_layer_non_dir_is_ignored(case: Case, mode: str, world: World,
                                                    caps: dict[str, str | None]) -> None:
    need(caps, *case.needs)
    need_mode(caps, mode)
    if mode == "delete":
        lower_tree(world.root)
    before = world.snap()
    layer = case.layer(str(world.out))
    stats = apply(layer, world.root, mode=mode)
    assert_unchanged(before, world.snap())  # nothing outside followed, made or removed
    markers = sum(1 for m in layer if b".wh." in m.name)
    assert stats.whiteouts + stats.opaques == markers
    assert stats.ignored_whiteouts == case.ignored
    for path, want in case.final.items():
        assert kind(world.root / path) in want.split("|"), (path, tree(world.root))
    if (world.root / "q" / "secret").is_file() and "q/secret" in case.final:
        assert (world.root / "q" / "secret").read_bytes() == b"mine"
    if mode == "overlay":
        # the layer's entries, nothing else: no whiteout or dir below the non-directory
        got = {p: k for p, k in tree(world.root).items() if p != "keep"}
        assert set(got) == _entries(layer), got
        assert overlay_marks(world.root) == []
        if caps["foreign_chown"] is None:  # (the tar's owners are root's)
            assert compare_tree(io.BytesIO(tb.build(layer)), str(world.root)) == []
    else:
        if "a" not in case.final:  # lower content the whiteouts must not reach
            assert (world.root / "a" / "other").read_bytes() == b"lower"
            assert (world.root / "a" / "dir" / "inner").read_bytes() == b"lower"


@pytest.mark.parametrize("marker", ["p/.wh.secret", "p/.wh..wh..opq", "p/sub/.wh.x"])
@pytest.mark.parametrize("first", [True, False], ids=["symlink-first", "marker-first"])
def test_verify_accepts_only_markers_below_the_layers_non_dir(
        marker: str, first: bool, tmp_path: Path, caps: dict[str, str | None]) -> None:
    """compare_tree: the ignored marker is not a missing whiteout (nor a dir no longer
    opaque), whichever comes first; the same marker below a dir of the layer still is."""
    need_mode(caps, "overlay")
    need(caps, "foreign_chown")
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tb.symlink("p", str(target))
    layer = [link, tb.file(marker)] if first else [tb.file(marker), link]
    diff = tmp_path / "diff"
    diff.mkdir()
    apply(layer, diff)
    assert compare_tree(io.BytesIO(tb.build(layer)), str(diff)) == []
    # the same marker below the layer's dir p is checked: missing in a dir made without it
    as_dir = [tb.dir("p"), tb.dir("p/sub"), tb.file(marker)]
    other = tmp_path / "other"
    other.mkdir()
    apply([tb.dir("p"), tb.dir("p/sub")], other)
    assert compare_tree(io.BytesIO(tb.build(as_dir)), str(other)) != []


def test_ignored_whiteouts_are_counted_apart(tmp_path: Path) -> None:
    stats = apply([tb.file("f", b"x"), tb.whiteout("f/x"), tb.opaque("f"), tb.whiteout("g"),
                   tb.dir("d"), tb.whiteout("d/y")], tmp_path, mode="delete")
    assert (stats.whiteouts, stats.opaques, stats.ignored_whiteouts) == (3, 1, 2)


# -- crafted: below a non-directory of a LOWER layer --

def test_overlay_marker_below_lower_symlink_is_contained(world: World,
                                                         caps: dict[str, str | None]) -> None:
    """overlay mode, as unpack applies each layer into its own diff dir: the lower layer's
    symlink is in another dir, so the whiteout is made in this layer's diff dir (below a dir
    that hides the lower symlink, as dockerd makes it); the symlink is never followed."""
    need_mode(caps, "overlay")
    diff1, diff2 = world.root / "diff1", world.root / "diff2"
    diff1.mkdir()
    diff2.mkdir()
    apply([tb.symlink("l", str(world.out)), tb.file("f", b"lower file")], diff1)
    before = world.snap()  # (the target, holding both diff dirs, is not in it)
    lower_before = snapshot([diff1], diff2)
    stats = apply([tb.whiteout("l/secret"), tb.opaque("l/dir"), tb.whiteout("f/x")], diff2,
                  lowers=[str(diff1)])
    assert_unchanged(lower_before, snapshot([diff1], diff2))
    assert_unchanged(before, world.snap())
    assert (stats.whiteouts, stats.opaques, stats.ignored_whiteouts) == (2, 1, 0)
    assert os.readlink(diff1 / "l") == str(world.out)
    assert tree(diff2) == {"f": "dir", "f/x": "whiteout", "l": "dir", "l/dir": "dir",
                           "l/secret": "whiteout"}


@pytest.mark.parametrize(("layer", "entry"), [
    pytest.param([tb.whiteout("l/secret")], "l/.wh.secret", id="whiteout"),
    pytest.param([tb.opaque("l")], "l/.wh..wh..opq", id="opaque"),
    pytest.param([tb.whiteout("l/dir/inner")], "l/dir/.wh.inner", id="nested-whiteout"),
    pytest.param([tb.opaque("l/dir")], "l/dir/.wh..wh..opq", id="nested-opaque"),
    pytest.param([tb.whiteout("l/secret"), tb.dir("l"), tb.file("l/new")], "l/.wh.secret",
                 id="then-a-dir-over-it"),
    pytest.param([tb.whiteout("l/secret"), tb.symlink("x", "l")], "l/.wh.secret",
                 id="then-a-symlink-elsewhere"),
])
def test_delete_marker_below_lower_symlink_is_refused(layer: list[tb.Member], entry: str,
                                                      world: World) -> None:
    """delete mode, one rootfs: layer 1's symlink is in the target; layer 2's whiteout below
    it is refused (whatever comes after it), and nothing it points at changes."""
    apply([tb.symlink("l", str(world.out)), tb.dir("d")], world.root, mode="delete")
    before = world.snap()
    with pytest.raises(UnsafeEntryError) as info:
        apply(layer, world.root, mode="delete")
    assert f"'{entry}'" in message(info.value) and "symlink" in message(info.value)
    assert_unchanged(before, world.snap())
    link = world.root / "l"  # (a dir where the layer put one over it before it failed)
    assert kind(link) == "dir" or os.readlink(link) == str(world.out)
    assert (world.out / "secret").read_bytes() == b"secret\n"
    assert (world.out / "dir" / "inner").read_bytes() == b"inner\n"


@pytest.mark.parametrize("first", [True, False], ids=["symlink-first", "marker-first"])
def test_delete_lower_symlink_replaced_by_the_layers_own(first: bool, world: World) -> None:
    """The layer puts its own symlink over layer 1's: its whiteout below hides nothing, in
    either order (decided when the layer ends, never by following either symlink)."""
    apply([tb.symlink("l", str(world.out))], world.root, mode="delete")
    before = world.snap()
    new = tb.symlink("l", str(world.ext))
    markers = [tb.whiteout("l/secret"), tb.opaque("l/dir")]
    stats = apply([new, *markers] if first else [*markers, new], world.root, mode="delete")
    assert_unchanged(before, world.snap())
    assert os.readlink(world.root / "l") == str(world.ext)
    assert stats.ignored_whiteouts == 2


def test_delete_marker_below_lower_file_is_a_no_op(tmp_path: Path) -> None:
    """A lower file (not the layer's): nothing below it to hide; not counted as ignored."""
    apply([tb.file("f", b"lower")], tmp_path, mode="delete")
    stats = apply([tb.whiteout("f/x"), tb.opaque("f")], tmp_path, mode="delete")
    assert (tmp_path / "f").read_bytes() == b"lower"
    assert stats.ignored_whiteouts == 0


# -- crafted: whiteouts made before the layer's non-directory replaced their dir --

def test_overlay_root_opaque_after_whiteout_dir_became_symlink(
        tmp_path: Path, caps: dict[str, str | None]) -> None:
    """`a/b/.wh.c` (made in a/b/), then `a` a symlink, then a root marker: the marker drops
    the whiteouts the layer made, and must not go looking for them through `a`."""
    need_mode(caps, "overlay")
    lower = tmp_path / "lower"
    (lower / "a" / "b").mkdir(parents=True)
    (lower / "a" / "b" / "c").write_bytes(b"lower")
    diff = tmp_path / "diff"
    diff.mkdir()
    stats = apply([tb.whiteout("a/b/c"), tb.symlink("a", "/"), tb.opaque("")], diff,
                  lowers=[str(lower)])
    assert tree(diff) == {"a": "symlink"}
    assert stats.ignored_whiteouts == 1


# -- through the store: unpack, verify, export, flatten --

def _crafted_image(dest: Path, order: str) -> list[bytes]:
    base = tb.build([tb.dir("p"), tb.file("p/secret", b"s"), tb.dir("p/dir"),
                     tb.file("p/dir/inner", b"i"), tb.dir("a"), tb.dir("a/dir"),
                     tb.file("a/dir/inner", b"i"), tb.dir("f"), tb.file("f/x", b"x"),
                     tb.dir("icons"), tb.file("icons/i", b"icon")])
    non_dirs = [tb.symlink("p", "icons"), tb.symlink("a", "/etc"), tb.file("f", b"file")]
    markers = [*P_MARKERS, *NESTED, tb.whiteout("f/x", mode=0, mtime=0)]
    top = tb.build([*non_dirs, *markers] if order == "non-dir-first"
                   else [*markers, *non_dirs])
    write_oci(dest, [base, top])
    return [base, top]


@pytest.mark.parametrize("order", ["non-dir-first", "marker-first"])
def test_store_round_trip_of_crafted_layers(order: str, tmp_path: Path, capsys: Capsys,
                                            caps: dict[str, str | None]) -> None:
    need_mode(caps, "overlay")
    need(caps, "foreign_chown")
    layout = tmp_path / "layout"
    tars = _crafted_image(layout, order)
    store = tmp_path / "store"
    result = unpack(capsys, store, layout)
    verify_ok(capsys, store)
    top = store / "overlay2" / result["layers"][1]["cache_id"] / "diff"
    assert tree(top) == {"a": "symlink", "f": "file", "p": "symlink"}
    out = tmp_path / "export"
    ok(capsys, store, "export", result["image_id"], "-o", str(out), "--format", "oci",
       "--compression", "none")
    assert read_output(out, "oci")[1] == tars
    flat = tmp_path / "flat"
    ok(capsys, store, "flatten", result["image_id"], str(flat))
    assert tree(flat) == {"a": "symlink", "f": "file", "icons": "dir", "icons/i": "file",
                          "p": "symlink"}
