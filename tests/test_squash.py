"""squash (squash.py, squashtar.py, growth.Merge, the `squash` command).

The oracles are outside the code under test:
- the kernel's overlayfs: the original image and the squashed one, each mounted read-only
  from the store (`ocilayers mount`), must show the same tree (content, modes, owners,
  symlink targets, xattrs, file mtimes, hardlink identity by inode);
- the squashed layer's tar, read with Python's `tarfile`, must hold exactly what the spec
  says (only the top-most whiteout of a deleted tree, no hidden content, an opaque marker
  only where a kept layer has the dir);
- dockerd: a squashed docker-archive must load and run as the original does.

Dir mtimes are not compared: a dir that a layer makes implicitly (for a path below it) is
stamped with the time of the unpack, so two unpacks never agree on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
import treecompare as tc
from conftest import FIXTURES, assert_one_line_error, chain_ids_by_spec, run_cli
from test_containers import write_image
from throwaway_dockerd import Daemon, DaemonError, mounts_under, unavailable

Capsys = pytest.CaptureFixture[str]

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="unpacking owned files and overlay mounts need root")

EPOCH = 1_700_000_000
EPOCH_TEXT = "2023-11-14T22:13:20Z"
OPQ = ".wh..wh..opq"
Member = tuple[str, str, Any]  # (name, kind d|f|l|s|o, data or link target)


# --- helpers ---

def ol(capsys: Capsys, root: Path, *argv: str) -> tuple[int, str, str]:
    return run_cli(["--root", str(root), *argv], capsys)


def ok(capsys: Capsys, root: Path, *argv: str) -> str:
    code, out, err = ol(capsys, root, *argv)
    assert code == 0, f"ocilayers {' '.join(argv)} failed ({code}):\n{err}"
    return out


def layout(dest: Path, layers: Sequence[Sequence[tb.Member]], **extra: Any) -> Path:
    write_image(dest, layers, extra=extra or None)
    return dest


def unpack(capsys: Capsys, root: Path, src: Path, tag: str) -> str:
    return str(json.loads(ok(capsys, root, "unpack", str(src), "--tag", tag, "--json"))
               ["image_id"])


def squash(capsys: Capsys, root: Path, *argv: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ok(capsys, root, "squash", *argv, "--json"))
    return result


def read_json(lay: Path, digest: str) -> Any:
    return json.loads((lay / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes())


def manifest_of(lay: Path) -> dict[str, Any]:
    index = json.loads((lay / "index.json").read_text())
    manifest: dict[str, Any] = read_json(lay, index["manifests"][0]["digest"])
    return manifest


def config_of(lay: Path) -> tuple[str, dict[str, Any]]:
    """(config digest = image ID, config) of an OCI layout."""
    digest = manifest_of(lay)["config"]["digest"]
    return digest, read_json(lay, digest)


def top_members(lay: Path) -> list[Member]:
    """The top layer's entries in tar order: (name, kind, data | link target)."""
    digest = manifest_of(lay)["layers"][-1]["digest"]
    out: list[Member] = []
    with tarfile.open(lay / "blobs" / "sha256" / digest.split(":", 1)[1], "r:*") as tf:
        for m in tf:
            if m.isdir():
                out.append((m.name, "d", None))
            elif m.issym():
                out.append((m.name, "s", m.linkname))
            elif m.islnk():
                out.append((m.name, "l", m.linkname))
            elif not m.isreg():
                out.append((m.name, "o", None))  # a device or fifo
            else:
                f = tf.extractfile(m)
                assert f is not None
                out.append((m.name, "f", f.read()))
    return out


def top_modes(lay: Path) -> dict[str, tuple[int, int]]:
    digest = manifest_of(lay)["layers"][-1]["digest"]
    with tarfile.open(lay / "blobs" / "sha256" / digest.split(":", 1)[1], "r:*") as tf:
        return {m.name: (m.mode, m.uid) for m in tf}


def view(capsys: Capsys, root: Path, image: str, target: Path,
         mounts: list[Path]) -> tc.Snapshot:
    """The image's merged view, as the kernel shows it."""
    target.mkdir(parents=True)
    ok(capsys, root, "mount", image, str(target))
    mounts.append(target)
    try:
        return tc.snapshot(target)
    finally:
        ok(capsys, root, "umount", str(target))


def assert_same_view(a: tc.Snapshot, b: tc.Snapshot, what: str) -> None:
    tc.assert_same(a, b, ignore_dir_mtime=True, names=("original", "squashed"), msg=what)


def store_state(capsys: Capsys, root: Path) -> tuple[Any, list[str]]:
    images = json.loads(ok(capsys, root, "images", "--json"))
    return images, sorted(os.listdir(root / "overlay2"))


# --- 1. crafted cases ---

@dataclass(frozen=True)
class Case:
    layers: list[list[tb.Member]]
    keep: int
    want: list[Member]
    modes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (mode, uid)


CASES: dict[str, Case] = {
    "deleted-parent": Case([
        [tb.dir("x"), tb.dir("x/y"), tb.file("x/y/f1", b"1"), tb.file("x/y/f2", b"2"),
         tb.dir("x/z"), tb.file("x/z/zz", b"z"), tb.dir("other"), tb.file("other/o", b"o")],
        [tb.whiteout("x/y/f1"), tb.file("x/y/new", b"n")],
        [tb.whiteout("x/y")],
        [tb.whiteout("x")],
    ], 1, [(".wh.x", "f", b"")]),
    "opaque": Case([
        [tb.dir("o"), tb.file("o/old1", b"1"), tb.dir("o/sub"), tb.file("o/sub/old2", b"2")],
        [tb.dir("s"), tb.file("s/a", b"a")],
        [tb.dir("o", mode=0o750), tb.opaque("o"), tb.file("o/new", b"n"), tb.opaque("s"),
         tb.file("s/b", b"b")],
    ], 1, [("o", "d", None), (f"o/{OPQ}", "f", b""), ("o/new", "f", b"n"), ("s", "d", None),
           ("s/b", "f", b"b")]),
    "chmod-R": Case([
        [tb.dir("bin"), tb.file("bin/t1", b"T1"), tb.file("bin/t2", b"T2")],
        [tb.dir("bin", mode=0o711), tb.file("bin/t1", b"T1", mode=0o755),
         tb.file("bin/t2", b"T2", mode=0o755, uid=3)],
        [tb.dir("bin", mode=0o711), tb.file("bin/t1", b"T1", mode=0o700)],
    ], 1, [("bin", "d", None), ("bin/t1", "f", b"T1"), ("bin/t2", "f", b"T2")],
        {"bin": (0o711, 0), "bin/t1": (0o700, 0), "bin/t2": (0o755, 3)}),
    "hardlink-to-hidden": Case([
        [tb.dir("h")],
        [tb.file("h/a", b"AAA"), tb.hardlink("h/b", "h/a"), tb.hardlink("h/c", "h/a"),
         tb.file("h/z", b"Z"), tb.hardlink("h/y", "h/z")],
        [tb.whiteout("h/a")],
    ], 1, [("h", "d", None), ("h/b", "f", b"AAA"), ("h/c", "l", "h/b"), ("h/y", "f", b"Z"),
           ("h/z", "l", "h/y")]),  # (h: made implicitly by layer 2, which shadows layer 1's)
    "replaced": Case([
        [tb.dir("p"), tb.file("p/x", b"x"), tb.dir("q"), tb.file("q/y", b"y"),
         tb.file("r", b"r")],
        [tb.whiteout("p"), tb.file("p", b"P"), tb.symlink("q", "/etc"), tb.whiteout("r"),
         tb.dir("r"), tb.file("r/in", b"i")],
    ], 1, [("p", "f", b"P"), ("q", "s", "/etc"), ("r", "d", None), ("r/in", "f", b"i")]),
    "whiteout-below-vs-above": Case([
        [tb.dir("w"), tb.file("w/old", b"o")],
        [tb.file("w/new", b"n")],
        [tb.whiteout("w/old"), tb.whiteout("w/new")],
    ], 1, [("w", "d", None), ("w/.wh.old", "f", b"")]),  # (w: layer 2's implicit dir)
    "re-added-dir": Case([
        [tb.dir("g"), tb.file("g/old1", b"1"), tb.file("g/old2", b"2")],
        [tb.whiteout("g"), tb.dir("k"), tb.file("k/a", b"a")],
        [tb.dir("g"), tb.file("g/fresh", b"f"), tb.whiteout("k")],
        [tb.dir("k"), tb.file("k/b", b"b")],
    ], 1, [("g", "d", None), (f"g/{OPQ}", "f", b""), ("g/fresh", "f", b"f"),
           ("k", "d", None), ("k/b", "f", b"b")]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_crafted_case(name: str, tmp_path: Path, capsys: Capsys, mounts: list[Path]) -> None:
    case = CASES[name]
    root = tmp_path / "store"
    src = layout(tmp_path / "src", case.layers)
    unpack(capsys, root, src, "orig:1")
    out = tmp_path / "out"
    result = squash(capsys, root, str(src), "--keep", str(case.keep), "-o", str(out),
                    "--format", "oci", "--compression", "none")
    assert (result["kept_layers"], result["squashed_layers"]) == (
        case.keep, len(case.layers) - case.keep)
    members = top_members(out)
    assert members == case.want
    modes = top_modes(out)
    for path, want in case.modes.items():
        assert (modes[path][0] & 0o7777, modes[path][1]) == want, path
    markers = [n for n, _k, _d in members if os.path.basename(n).startswith(".wh.")]
    assert result["whiteouts"] + result["opaques"] == len(markers)
    unpack(capsys, root, out, "sq:1")
    assert_same_view(view(capsys, root, "orig:1", tmp_path / "m-orig", mounts),
                     view(capsys, root, "sq:1", tmp_path / "m-sq", mounts), name)


# A dir that a squashed layer declares (mode 0700, owner 5:5) and that a later layer only
# makes implicitly (an entry d/f with no d/ entry) shows the later layer's implicit dir
# (0755, 0:0) in the original's overlay view: the squashed layer must write that, not the
# lower layer's d/ header.
def test_implicit_parent_in_a_later_layer_keeps_the_view(tmp_path: Path, capsys: Capsys,
                                                         mounts: list[Path]) -> None:
    root = tmp_path / "store"
    src = layout(tmp_path / "src", [
        [tb.dir("d", mode=0o700, uid=5, gid=5), tb.file("d/a", b"a")],
        [tb.file("d/f", b"f")],
    ])
    unpack(capsys, root, src, "orig:1")
    squash(capsys, root, "orig:1", "--all", "--tag", "sq:1")
    assert_same_view(view(capsys, root, "orig:1", tmp_path / "m-orig", mounts),
                     view(capsys, root, "sq:1", tmp_path / "m-sq", mounts), "implicit d/")


# When the name that held a hardlinked file's data is hidden, the surviving name that now
# carries the data gets a header written anew: it must keep the file's sub-second mtime,
# which the original view shows.
def test_hidden_carrier_keeps_its_subsecond_mtime(tmp_path: Path, capsys: Capsys,
                                                  mounts: list[Path]) -> None:
    root = tmp_path / "store"
    src = layout(tmp_path / "src", [
        [tb.dir("h"), tb.file("h/a", b"AAA", mtime_ns=1_600_000_000_123_456_789),
         tb.hardlink("h/b", "h/a")],
        [tb.whiteout("h/a")],
    ])
    unpack(capsys, root, src, "orig:1")
    squash(capsys, root, "orig:1", "--all", "--tag", "sq:1")
    orig = view(capsys, root, "orig:1", tmp_path / "m-orig", mounts)
    assert orig[b"h/b"].mtime == 1_600_000_000_123_456_789
    assert_same_view(orig, view(capsys, root, "sq:1", tmp_path / "m-sq", mounts), "h/b")


# --- 2. every squash point of an image that mixes it all ---

LONG = "long/" + "a" * 110
SUBSEC = 1_600_000_000_123_456_789
MIXED: list[list[tb.Member]] = [
    [tb.dir("etc"), tb.file("etc/conf", b"c0"), tb.dir("d", mode=0o750, uid=7, gid=7),
     tb.file("d/x", b"x"), tb.dir("d/sub", mode=0o750, uid=7, gid=7), tb.file("d/sub/y", b"y"),
     tb.dir("q"), tb.file("q/y", b"qy"), tb.file("r", b"r0"), tb.dir("o"),
     tb.file("o/old", b"old"), tb.dir("g"), tb.file("g/old", b"gold"), tb.dir("w"),
     tb.file("w/old", b"wold"), tb.dir("h"), tb.dir("bin"), tb.file("bin/t1", b"T1"),
     tb.file("bin/t2", b"T2"), tb.file("keep", b"k"), tb.symlink("sl", "etc")],
    [tb.file("h/a", b"AAA"), tb.hardlink("h/b", "h/a"), tb.hardlink("h/c", "h/a"),
     tb.file("h/z", b"Z"), tb.hardlink("h/y", "h/z"), tb.file("h/m", b"M"),
     tb.hardlink("h/n", "h/m"), tb.file("w/new", b"wnew"), tb.dir("s"), tb.file("s/a", b"sa"),
     tb.dir("long"), tb.dir(LONG), tb.file(LONG + "/f", b"L"), tb.hardlink(LONG + "/g",
     LONG + "/f"), tb.file("x/attr", b"X1", xattrs={"user.k": b"v1"}), tb.fifo("x/fifo"),
     tb.file("x/suid", b"S", mode=0o4755)],
    [tb.whiteout("h/a"), tb.whiteout("d"), tb.symlink("q", "/etc"), tb.whiteout("r"),
     tb.dir("r"), tb.file("r/in", b"in"), tb.whiteout(LONG + "/f"), tb.dir("sl"),
     tb.file("sl/f", b"slf")],
    [tb.opaque("o"), tb.file("o/new", b"onew"), tb.opaque("s"),
     tb.file("s/b", b"sb", mtime_ns=SUBSEC), tb.whiteout("g"), tb.whiteout("w/old"),
     tb.whiteout("w/new"), tb.file("bin/t1", b"T1", mode=0o755),
     tb.file("bin/t2", b"T2", mode=0o755)],
    [tb.dir("g"), tb.file("g/fresh", b"gf"), tb.dir("d", mode=0o700), tb.file("d/again", b"ag"),
     tb.file("x/attr", b"X2", xattrs={"user.k": b"v2"}), tb.file("h/m", b"M2"),
     tb.dir("./y"), tb.file("./y/z", b"yz"), tb.hardlink("./y/zz", "./y/z")],
    [tb.file("bin/t1", b"T1", mode=0o700), tb.file("etc/new", b"n", mtime_ns=SUBSEC + 1),
     tb.whiteout("keep"), tb.file("p", b"P"), tb.whiteout("o/new"), tb.whiteout("y/z")],
]


def check_markers(members: list[Member], full: tc.Snapshot, kept: tc.Snapshot) -> None:
    """Whiteouts only for paths the kept layers show and the image does not, top-most only;
    opaque markers only for dirs the kept layers have; nothing hidden."""
    kinds = {"d": "dir", "f": "file", "l": "file", "s": "symlink", "o": "fifo"}
    for raw, kind, _data in members:
        name = raw.removeprefix("./")  # a header kept as the layer wrote it
        parent, _, base = name.rpartition("/")
        if base == OPQ:
            assert kept[parent.encode()].kind == "dir", name
            assert full[parent.encode()].kind == "dir", name
        elif base.startswith(".wh."):
            path = (parent + "/" if parent else "") + base[4:]
            assert path.encode() in kept and path.encode() not in full, name
            assert not parent or full[parent.encode()].kind == "dir", f"{name}: not top-most"
        else:
            assert full[name.encode()].kind == kinds[kind], name


def test_every_squash_point(tmp_path: Path, capsys: Capsys, mounts: list[Path]) -> None:
    root = tmp_path / "store"
    src = layout(tmp_path / "src", MIXED)
    orig_id = unpack(capsys, root, src, "orig:1")
    full = view(capsys, root, "orig:1", tmp_path / "m-orig", mounts)
    orig_diffs = config_of(src)[1]["rootfs"]["diff_ids"]
    seen = set()
    for n in range(len(MIXED)):
        kept: tc.Snapshot = {}
        if n:
            unpack(capsys, root, layout(tmp_path / f"kept{n}", MIXED[:n]), f"kept:{n}")
            kept = view(capsys, root, f"kept:{n}", tmp_path / f"m-kept{n}", mounts)
        res = squash(capsys, root, "orig:1", "--keep", str(n), "--tag", f"sq:{n}",
                     "--source-date-epoch", str(EPOCH))
        assert res["old_image_id"] == orig_id and res["tags"] == [f"sq:{n}"]
        inspect = json.loads(ok(capsys, root, "inspect", f"sq:{n}", "--json"))
        diffs = [layer["diff_id"] for layer in inspect["layers"]]
        assert diffs[:n] == orig_diffs[:n] and len(diffs) == n + 1, n
        assert inspect["image_id"] == res["image_id"] and res["image_id"] not in seen
        seen.add(res["image_id"])
        assert_same_view(full, view(capsys, root, f"sq:{n}", tmp_path / f"m-sq{n}", mounts),
                         f"--keep {n}")
        # the same squash written out: the same image, and its layer's markers by the rules
        out = tmp_path / f"out{n}"
        again = squash(capsys, root, "orig:1", "--keep", str(n), "-o", str(out), "--format",
                       "oci", "--compression", "none", "--source-date-epoch", str(EPOCH))
        assert again["image_id"] == res["image_id"], n
        members = top_members(out)
        check_markers(members, full, kept)
        if n == 0:
            assert not [m for m in members if ".wh." in m[0]], members


# --- 3. the article example: a big file deleted, then added under another name ---

BIG = 5_000_000


def test_deleted_then_renamed_big_file_is_stored_once(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    data = bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256)
    src = layout(tmp_path / "src", [
        [tb.dir("data"), tb.file("data/big", data)],
        [tb.whiteout("data/big")],
        [tb.file("data/copy", data)],
    ])
    unpack(capsys, root, src, "orig:1")
    before = json.loads(ok(capsys, root, "history", "orig:1", "--json"))
    assert before["totals"]["wasted_bytes"] == BIG
    outs = {}
    for how in (["--keep", "0"], ["--all"]):
        out = tmp_path / f"out{len(outs)}"
        squash(capsys, root, "orig:1", *how, "-o", str(out), "--format", "oci",
               "--compression", "none", "--source-date-epoch", str(EPOCH))
        outs[how[0]] = out
        after = json.loads(ok(capsys, root, "history", str(out), "--json"))
        assert after["totals"]["wasted_bytes"] == 0
        assert after["totals"]["stored_bytes"] == BIG
        assert len(after["layers"]) == 1 and after["layers"][0]["whiteouts"] == 0
        members = top_members(out)
        assert [(n, k) for n, k, _d in members] == [("data", "d"), ("data/copy", "f")]
        assert members[1][2] == data
        layer = manifest_of(out)["layers"][-1]
        assert layer["size"] < BIG + 10_000
    assert config_of(outs["--keep"])[0] == config_of(outs["--all"])[0]
    squash(capsys, root, "orig:1", "--all", "--tag", "sq:1")
    stored = json.loads(ok(capsys, root, "history", "sq:1", "--json"))
    assert stored["totals"]["wasted_bytes"] == 0 and stored["totals"]["stored_bytes"] == BIG


# --- 4. from the store and from the source: the same image ---

def test_store_and_source_give_the_same_image(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    src = layout(tmp_path / "src", MIXED)
    unpack(capsys, root, src, "orig:1")
    a, b = tmp_path / "a", tmp_path / "b"
    ra = squash(capsys, root, "orig:1", "--keep", "1", "-o", str(a), "--format", "oci",
                "--source-date-epoch", "0")
    rb = squash(capsys, root, str(src), "--keep", "1", "-o", str(b), "--format", "oci",
                "--source-date-epoch", "0")
    (ida, cfga), (idb, cfgb) = config_of(a), config_of(b)
    assert ida == idb == ra["image_id"] == rb["image_id"]
    assert cfga["rootfs"]["diff_ids"] == cfgb["rootfs"]["diff_ids"]
    assert cfga["rootfs"]["diff_ids"][0] == config_of(src)[1]["rootfs"]["diff_ids"][0]
    assert len(cfga["rootfs"]["diff_ids"]) == 2 and ra["diff_id"] == cfga["rootfs"]["diff_ids"][1]
    assert cfga["config"] == config_of(src)[1]["config"]
    assert top_members(a) == top_members(b)
    # into the store: from the store image, and from the source into a fresh store
    tagged = squash(capsys, root, "orig:1", "--keep", "1", "--tag", "sq:1",
                    "--source-date-epoch", "0")
    assert tagged["image_id"] == ida and tagged["diff_id"] == ra["diff_id"]
    other = squash(capsys, tmp_path / "store2", str(src), "--keep", "1", "--tag", "sq:1",
                   "--source-date-epoch", "0")
    assert other["image_id"] == ida


# --- 5. history ---

T = "2023-11-14T22:13:20Z"
H_LAYERS: list[list[tb.Member]] = [[tb.file(f"f{i}", f"{i}".encode())] for i in range(4)]
HISTORY = [
    {"created": T, "created_by": "L0"},
    {"created": T, "created_by": "ENV a=b", "empty_layer": True},
    {"created": T, "created_by": "L1"},
    {"created": T, "created_by": "L2", "comment": "c2", "author": "me"},
    {"created": T, "created_by": "CMD x", "empty_layer": True},
    {"created": T, "created_by": "L3"},
]


def _squash_out(capsys: Capsys, root: Path, out: Path, *argv: str
                ) -> tuple[dict[str, Any], str]:
    code, _out, err = ol(capsys, root, "squash", *argv, "-o", str(out), "--format", "oci",
                         "--source-date-epoch", str(EPOCH))
    assert code == 0, err
    return config_of(out)[1], err


def test_history_keep_keep_image_and_all(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    src = layout(tmp_path / "src", H_LAYERS, history=HISTORY)
    old = unpack(capsys, root, src, "img:1")
    chain = chain_ids_by_spec(config_of(src)[1]["rootfs"]["diff_ids"])
    base_src = layout(tmp_path / "base", H_LAYERS[:2])
    base_id = unpack(capsys, root, base_src, "base:1")
    emptied = [{**h, "empty_layer": True} for h in HISTORY]
    kept2 = HISTORY[:3] + emptied[3:]

    def merge(comment: str) -> dict[str, Any]:
        return {"created": EPOCH_TEXT, "comment": comment}

    cases = [
        (["--keep", "2"], [*kept2, merge(f"merge {old} to {chain[1]}")]),
        (["--keep-image", "base:1"], [*kept2, merge(f"merge {old} to {base_id}")]),
        (["--keep-image", str(base_src)], [*kept2, merge(f"merge {old} to {base_id}")]),
        (["--keep", "1"], HISTORY[:1] + emptied[1:] + [merge(f"merge {old} to {chain[0]}")]),
        (["--all"], [*emptied, merge(f"create new from {old}")]),
        (["--keep", "3", "-m", "my words"], HISTORY[:5] + emptied[5:] + [merge("my words")]),
    ]
    for i, (argv, want) in enumerate(cases):
        for arg in ("img:1", str(src)):
            cfg, err = _squash_out(capsys, root, tmp_path / f"o{i}-{len(arg)}", arg, *argv)
            assert cfg["history"] == want, argv
            assert cfg["created"] == EPOCH_TEXT and "note" not in err, argv
            assert len(cfg["rootfs"]["diff_ids"]) == 1 + sum(
                1 for h in want[:-1] if not h.get("empty_layer")), argv
    # the store image written by --tag has the same history
    squash(capsys, root, "img:1", "--keep-image", "base:1", "--tag", "sq:1",
           "--source-date-epoch", str(EPOCH))
    inspect = json.loads(ok(capsys, root, "inspect", "sq:1", "--json"))
    assert inspect["history"] == cases[1][1]
    assert (root / "image" / "overlay2" / "imagedb" / "metadata" / "sha256" /
            inspect["image_id"].split(":")[1] / "parent").read_text() == base_id


@pytest.mark.parametrize("history,note", [
    ([], "no history"),
    ([{"created": T, "created_by": f"L{i}"} for i in range(3)],
     "3 entries with a layer for 4 layers"),
])
def test_history_missing_or_mismatched(history: list[Any], note: str, tmp_path: Path,
                                       capsys: Capsys) -> None:
    root = tmp_path / "store"
    src = layout(tmp_path / "src", H_LAYERS, history=history)
    old = unpack(capsys, root, src, "img:1")
    chain = chain_ids_by_spec(config_of(src)[1]["rootfs"]["diff_ids"])
    cfg, err = _squash_out(capsys, root, tmp_path / "out", "img:1", "--keep", "2")
    assert [ln for ln in err.splitlines() if ln.startswith("ocilayers: note: ")], err
    assert note in err
    hist = cfg["history"]
    assert len(hist) == 3 and not any(h.get("empty_layer") for h in hist)
    assert hist[-1] == {"created": EPOCH_TEXT, "comment": f"merge {old} to {chain[1]}"}
    assert len(cfg["rootfs"]["diff_ids"]) == 3
    after = json.loads(ok(capsys, root, "history", str(tmp_path / "out"), "--json"))
    assert after["note"] is None


# --- 6. dockerd loads and runs a squashed docker-archive ---

DOCKER_LAYERS: list[list[tb.Member]] = [
    [tb.dir("app"), tb.file("app/greeting", b"hello\n"), tb.file("app/old", b"old\n"),
     tb.file("app/tool", b"#!/bin/sh\necho tool\n", mode=0o644)],
    [tb.dir("app"), tb.whiteout("app/old"), tb.file("app/greeting2", b"hi again\n"),
     tb.whiteout("etc/motd")],
    [tb.file("app/tool", b"#!/bin/sh\necho tool\n", mode=0o755), tb.dir("opt"),
     tb.opaque("opt"), tb.file("opt/fresh", b"fresh\n")],
]
# (dockerd bind-mounts its own /etc/hostname, /etc/hosts and /etc/resolv.conf per container)
SCRIPT = ("cd / && F=$(busybox find app etc opt usr var | busybox grep -v -e '^etc/host' "
          "-e '^etc/resolv.conf' | busybox sort) && "
          "busybox stat -c '%n %a %u:%g %s %F %N' $F && "
          "busybox md5sum $(for f in $F; do test -f $f -a ! -L $f && echo $f; done) && "
          "cat /app/greeting && /app/tool && (test -e /app/old && echo old-present || "
          "echo old-gone)")


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    d = Daemon(Path(tempfile.mkdtemp(prefix="/tmp/sq-")))
    try:
        try:
            d.start()
        except (DaemonError, OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"dockerd could not be started: {exc}")
        yield d
    finally:
        problems = d.stop()
        if not mounts_under(d.base):
            shutil.rmtree(d.base, ignore_errors=True)
    assert not problems, problems


def test_dockerd_runs_the_squashed_archive(daemon: Daemon, tmp_path: Path,
                                           capsys: Capsys) -> None:
    root = tmp_path / "store"
    tars = []
    for i, members in enumerate(DOCKER_LAYERS):
        t = tmp_path / f"l{i}.tar"
        t.write_bytes(tb.build(members))
        tars += ["--layer", str(t)]
    app = tmp_path / "app.tar"
    ok(capsys, root, "append", str(FIXTURES / "demo"), "-o", str(app), "--format",
       "docker-archive", *tars, "--source-date-epoch", str(EPOCH))
    sq_tar = tmp_path / "sq.tar"
    res = squash(capsys, root, str(app), "--keep", "1", "-o", str(sq_tar), "--format",
                 "docker-archive", "--source-date-epoch", str(EPOCH))
    assert (res["kept_layers"], res["squashed_layers"]) == (1, 6)
    loaded = daemon.docker("load", "-i", str(sq_tar)).stdout
    assert res["image_id"].split(":")[1] in loaded, loaded
    loaded = daemon.docker("load", "-i", str(app)).stdout
    orig_id = res["old_image_id"]
    assert orig_id.split(":")[1] in loaded, loaded
    runs = {}
    for name, image in (("orig", orig_id), ("squashed", res["image_id"])):
        runs[name] = daemon.docker("run", "--rm", "--network", "none", image, "sh", "-c",
                                   SCRIPT).stdout
    assert "hello\n" in runs["squashed"] and "tool\n" in runs["squashed"]
    assert runs["squashed"].endswith("old-gone\n")
    assert "opt/fresh 644" in runs["squashed"] and "etc/passwd 644" in runs["squashed"]
    for gone in ("opt/app", "opt/other", "etc/motd", "etc/obsolete.conf", "var/cache/demo"):
        assert gone not in runs["squashed"], gone
    assert runs["squashed"] == runs["orig"]
    inspect = json.loads(daemon.docker("image", "inspect", res["image_id"]).stdout)
    assert len(inspect[0]["RootFS"]["Layers"]) == 2


# --- 7. errors: one line, and nothing left in the store ---

def test_errors_leave_the_store_as_it_was(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    src = layout(tmp_path / "src", H_LAYERS)
    unpack(capsys, root, src, "img:1")
    unpack(capsys, root, layout(tmp_path / "other", [[tb.file("zzz", b"z")]]), "other:1")
    before = store_state(capsys, root)
    out = tmp_path / "out.tar"
    for argv, needles in [
        (["img:1", "--keep", "4", "--tag", "x:1"], ["nothing to squash", "4 layers"]),
        (["img:1", "--keep", "9", "-o", str(out)], ["nothing to squash"]),
        (["img:1", "--keep", "-1", "--tag", "x:1"], ["--keep"]),
        (["img:1", "--keep-image", "other:1", "--tag", "x:1"], ["other:1", "not a base"]),
        (["img:1", "--keep-image", "other:1", "-o", str(out)], ["not a base"]),
    ]:
        code, _out, err = ol(capsys, root, "squash", *argv)
        assert_one_line_error(code, err, *needles)
        assert store_state(capsys, root) == before, argv
        assert not out.exists(), argv
    for argv, needle in [(["img:1", "--keep", "1"], "-o/--output --tag"),
                         (["img:1", "--keep", "1", "-o", str(out), "--tag", "x:1"],
                          "not allowed with"),
                         (["img:1", "-o", str(out)], "--keep"),
                         (["img:1", "--all", "--keep", "1", "-o", str(out)], "not allowed")]:
        code, _out, err = ol(capsys, root, "squash", *argv)
        lines = err.splitlines()
        assert code == 2 and lines[-1].startswith("ocilayers squash: error: "), err
        assert needle in lines[-1] and "Traceback" not in err, err
        assert store_state(capsys, root) == before, argv
        assert not out.exists(), argv


# Squashing a source into the store (--tag) unpacks the source first: the squash point is
# checked before that, so a squash that fails (nothing to squash, not a base) leaves no
# image of the source behind.
@pytest.mark.parametrize("how", [["--keep", "4"], ["--keep-image", "other:1"]])
def test_failed_squash_of_a_source_registers_nothing(how: list[str], tmp_path: Path,
                                                      capsys: Capsys) -> None:
    root = tmp_path / "store"
    src = layout(tmp_path / "src", H_LAYERS)
    unpack(capsys, root, layout(tmp_path / "other", [[tb.file("zzz", b"z")]]), "other:1")
    before = store_state(capsys, root)
    code, _out, err = ol(capsys, root, "squash", str(src), *how, "--tag", "x:1")
    assert_one_line_error(code, err)
    assert store_state(capsys, root) == before
