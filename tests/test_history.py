"""`ocilayers history`: growth figures per layer, dive's figures and the CI gate.

Every expected figure below is worked out by hand from the rules of the feature (bytes are
regular-file sizes; what hides a file; dive's leaf-node rules) and written as a literal with
its arithmetic in a comment. Each image is read twice, from its OCI layout (the source) and
from the store after `unpack`, and the two reports must agree figure for figure.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
from conftest import assert_one_line_error, run_cli, run_module
from test_containers import write_image

from ocilayers import forking, history
from ocilayers.growth import DiveFigures, LayerFigures
from ocilayers.history import HistoryReport, image_history
from ocilayers.layerscan import (
    DIR_KIND,
    FILE_KIND,
    HARDLINK_KIND,
    OPAQUE_KIND,
    WHITEOUT_KIND,
    Entry,
)

LF = LayerFigures
BIG = 50_000_000


# --- helpers ---

def unpack(layout: Path, root: Path, tag: str = "img:1") -> None:
    proc = run_module(["--root", str(root), "-q", "unpack", str(layout), "--tag", tag])
    assert proc.returncode == 0, proc.stderr


def summary(r: HistoryReport) -> dict[str, Any]:
    """Every figure of a report that must not depend on where the image was read from."""
    return {
        "image_id": str(r.image_id),
        "rows": [(row.layer, row.entry.created_by if row.entry else None) for row in r.rows],
        "layers": [(x.diff_id, x.chain_id, x.size, x.figures) for x in r.layers],
        "totals": (r.stored_bytes, r.merged_bytes, r.wasted_bytes, r.unchanged_rewrite_bytes,
                   r.efficiency, r.user_wasted_percent),
        "top": r.top, "dive": r.dive, "note": r.note,
    }


@dataclass
class Image:
    layout: Path
    root: Path
    tag: str = "img:1"

    def history(self, where: str, **kw: Any) -> HistoryReport:
        if where == "source":
            return image_history(str(self.layout), root=str(self.root), **kw)
        return image_history(self.tag, root=str(self.root), **kw)

    def both(self, **kw: Any) -> list[HistoryReport]:
        """From the source, from the store's tar-split records, and again from the store,
        where the first read left its scan cache (test_scancache.py): all three agree."""
        src, store = self.history("source", **kw), self.history("store", **kw)
        assert summary(src) == summary(store)
        assert list(self.root.glob("image/overlay2/layerdb/sha256/*/ocilayers-scan.json"))
        cached = self.history("store", **kw)
        assert summary(cached) == summary(src)
        return [src, store, cached]


def make(dest: Path, layers: list[list[tb.Member]], **kw: Any) -> Image:
    """An OCI layout of `layers` at dest/layout, unpacked into the store dest/root."""
    dest.mkdir(parents=True, exist_ok=True)
    write_image(dest / "layout", layers, **kw)
    unpack(dest / "layout", dest / "root")
    return Image(dest / "layout", dest / "root")


@dataclass
class Expect:
    layers: list[LayerFigures]
    stored: int
    merged: int
    wasted: int
    efficiency: float
    user_pct: float
    dive: DiveFigures
    unchanged: int = 0
    top: list[tuple[str, int, int, int, bool]] = field(default_factory=list)


def check(r: HistoryReport, e: Expect) -> None:
    assert r.stored_bytes == e.stored
    assert r.merged_bytes == e.merged
    assert r.wasted_bytes == e.wasted
    assert r.unchanged_rewrite_bytes == e.unchanged
    assert r.efficiency == e.efficiency
    assert r.user_wasted_percent == e.user_pct
    assert r.dive == e.dive
    assert [(t.path, t.size, t.layer, t.hidden_by, t.unchanged) for t in r.top] == e.top
    assert [x.figures for x in r.layers] == e.layers  # last: the totals are checked first


def cli(capsys: pytest.CaptureFixture[str], img: Image, *argv: str,
        where: str = "store") -> tuple[int, str, str]:
    arg = img.tag if where == "store" else str(img.layout)
    return run_cli(["--root", str(img.root), "-q", "history", arg, *argv], capsys)


def cli_json(capsys: pytest.CaptureFixture[str], img: Image, *argv: str,
             where: str = "store") -> tuple[int, Any]:
    code, out, err = cli(capsys, img, *argv, "--json", where=where)
    assert err == ""
    return code, json.loads(out)


def d(n: int, c: bytes = b"x") -> bytes:
    return c * n


# --- the images and their hand-computed figures ---

# 2. A dir whited out with files below it.
DIR_WHITEOUT = [
    [tb.dir("app"), tb.file("app/a", d(100)), tb.dir("app/sub"), tb.file("app/sub/b", d(200)),
     tb.file("keep", d(7))],
    [tb.whiteout("app"), tb.file("new", d(30))],
]
DIR_WHITEOUT_EXPECT = Expect(
    layers=[LF(entries=5, added=5, stored_bytes=307, wasted_bytes=300),  # 100+200+7; 100+200
            LF(entries=1, added=1, whiteouts=1, stored_bytes=30)],
    stored=337,  # 307 + 30
    merged=37,  # keep 7 + new 30
    wasted=300,  # app/a 100 + app/sub/b 200
    efficiency=37 / 337,
    user_pct=300 / 30,  # wasted / stored of layer 2
    top=[("/app/sub/b", 200, 0, 1, False), ("/app/a", 100, 0, 1, False)],
    # dive: leaves app/a 100, app/sub/b 200, keep 7 | whiteout of the dir "app": the subtree
    # below it, 0+100+0+200 = 300, at "app"; new 30. Every path once: smallest = cumulative
    # = 100+200+7+300+30 = 637 -> 1.0; nothing in 2 layers -> 0 wasted, 0 / 30 = 0.
    dive=DiveFigures(1.0, 0, 0.0),
)

# 4. chmod -R: x and y written again with the same bytes, z with other bytes of the same size.
CHMOD = [
    [tb.dir("bin"), tb.file("bin/x", d(1000)), tb.file("bin/y", d(500, b"y")),
     tb.file("bin/z", d(300, b"z"))],
    [tb.dir("bin", mode=0o700), tb.file("bin/x", d(1000), mode=0o755),
     tb.file("bin/y", d(500, b"y"), mode=0o755), tb.file("bin/z", d(300, b"Z"))],
]
CHMOD_EXPECT = Expect(
    layers=[LF(entries=4, added=4, stored_bytes=1800,  # 1000+500+300
               wasted_bytes=1800, unchanged_rewrite_bytes=1500),  # all hidden; x+y unchanged
            LF(entries=4, changed=4, stored_bytes=1800, rewrote_unchanged_bytes=1500)],
    stored=3600,  # 1800 + 1800
    merged=1800,  # layer 2's x, y, z
    wasted=1800,
    unchanged=1500,  # 1000 + 500
    efficiency=1800 / 3600,
    user_pct=1800 / 1800,
    top=[("/bin/x", 1000, 0, 1, True), ("/bin/y", 500, 0, 1, True),
         ("/bin/z", 300, 0, 1, False)],
    # dive: bin has children in both layers (not a leaf). x [1000,1000], y [500,500],
    # z [300,300]: cumulative 3600, smallest 1800 -> 0.5; all in 2 layers -> wasted 3600
    # (survivors included); user = layer 2's 1800 -> 3600 / 1800 = 2.0.
    dive=DiveFigures(1800 / 3600, 3600, 3600 / 1800),
)

# 6. A dir replaced by a file (layer 2), then a path below it made again (layer 3).
DIR_TO_FILE = [
    [tb.dir("opt"), tb.dir("opt/tool"), tb.file("opt/tool/bin", d(700)),
     tb.file("opt/readme", d(50)), tb.file("keep", d(3))],
    [tb.file("opt", d(20))],
    [tb.file("opt/tool/bin", d(10, b"n"))],
]
DIR_TO_FILE_EXPECT = Expect(
    layers=[LF(entries=5, added=5, stored_bytes=753, wasted_bytes=750),  # 700+50+3; 700+50
            LF(entries=1, changed=1, stored_bytes=20, wasted_bytes=20),  # file opt, hidden
            LF(entries=1, added=1, stored_bytes=10)],  # by layer 3's implicit dir opt
    stored=783,  # 753 + 20 + 10
    merged=13,  # keep 3 + opt/tool/bin 10 (layer 0's copy stays hidden)
    wasted=770,  # 700 + 50 + 20
    efficiency=13 / 783,
    user_pct=770 / 30,  # layers 2+3 stored 20 + 10
    top=[("/opt/tool/bin", 700, 0, 1, False), ("/opt/readme", 50, 0, 1, False),
         ("/opt", 20, 1, 2, False)],
    # dive: opt/tool/bin [700 + 10, smallest 10, 2 layers], opt/readme 50, keep 3, opt 20
    # (a leaf in layer 2 only; a parent in 1 and 3). cumulative 710+50+3+20 = 783, smallest
    # 10+50+3+20 = 83; wasted 710; user = 20 + 10 = 30.
    dive=DiveFigures(83 / 783, 710, 710 / 30),
)


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The article's example: 50,000,000 bytes added, deleted, added again elsewhere."""
    data = (os.urandom(4096) * (BIG // 4096 + 1))[:BIG]  # compresses fast, same bytes twice
    return make(tmp_path_factory.mktemp("big"), [[tb.file("big.bin", data)],
                                                 [tb.whiteout("big.bin")],
                                                 [tb.file("copy/big.bin", data)]])


# --- 1. the article's example ---

def test_article_example_deleted_file_is_wasted(big_image: Image,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for r in big_image.both():
        check(r, Expect(
            layers=[LF(entries=1, added=1, stored_bytes=BIG, wasted_bytes=BIG),
                    LF(whiteouts=1),
                    LF(entries=1, added=1, stored_bytes=BIG)],  # copy/big.bin (copy implicit)
            stored=2 * BIG, merged=BIG, wasted=BIG,
            efficiency=0.5,  # 50,000,000 / 100,000,000
            user_pct=BIG / BIG,  # wasted / (0 + 50,000,000)
            top=[("/big.bin", BIG, 0, 1, False)],
            # dive: big.bin [50M + 0 (whiteout of a file), smallest 0, 2 layers],
            # copy/big.bin 50M: 50M / 100M = 0.5; wasted 50M; user = 0 + 50M.
            dive=DiveFigures(0.5, BIG, 1.0)))
        assert r.layers[0].figures.wasted_bytes == 50_000_000
    code, out, _ = cli(capsys, big_image)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("50MB "))
    assert row.split() == ["50MB", "/big.bin", "layer", "1", "layer", "2"]


# --- 2, 3: hidden through a parent dir ---

def test_files_deleted_through_a_deleted_parent_dir(tmp_path: Path) -> None:
    for r in make(tmp_path, DIR_WHITEOUT).both():
        check(r, DIR_WHITEOUT_EXPECT)


def test_opaque_dir_hides_older_content(tmp_path: Path) -> None:
    img = make(tmp_path, [
        [tb.dir("d"), tb.file("d/old1", d(40)), tb.file("d/old2", d(60)), tb.file("top", d(5))],
        [tb.dir("d"), tb.opaque("d"), tb.file("d/new", d(25))],
    ])
    for r in img.both():
        check(r, Expect(
            layers=[LF(entries=4, added=4, stored_bytes=105, wasted_bytes=100),  # 40+60+5
                    LF(entries=2, added=1, changed=1, opaques=1, stored_bytes=25)],  # d, d/new
            stored=130,  # 105 + 25
            merged=30,  # top 5 + d/new 25
            wasted=100,  # d/old1 40 + d/old2 60
            efficiency=30 / 130, user_pct=100 / 25,
            top=[("/d/old2", 60, 0, 1, False), ("/d/old1", 40, 0, 1, False)],
            # dive drops the marker: d/old1 40, d/old2 60, top 5, d/new 25, each once.
            dive=DiveFigures(1.0, 0, 0.0)))


# --- 4. chmod -R ---

def test_chmod_rewrite_counts_unchanged_bytes(tmp_path: Path) -> None:
    for r in make(tmp_path, CHMOD).both():
        check(r, CHMOD_EXPECT)


# --- 5. hardlinks ---

def test_hardlink_survives_its_whited_out_target(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, [[tb.file("data", d(400)), tb.hardlink("link", "data")],
                          [tb.whiteout("data")]])
    for r in img.both():
        check(r, Expect(
            layers=[LF(entries=2, added=2, stored_bytes=400), LF(whiteouts=1)],
            stored=400,
            merged=400,  # /link carries the inode's 400 bytes
            wasted=0, efficiency=1.0, user_pct=0.0,
            # dive: data [400 + 0, smallest 0, 2 layers], link [0] (a link's header size):
            # 0 / 400 = 0.0; wasted 400; user = layer 2's 0 bytes with waste -> inf.
            dive=DiveFigures(0.0, 400, float("inf"))))
    # JSON has no inf: null. Our figures pass the gate, dive's fail it.
    code, shape = cli_json(capsys, img)
    assert shape["totals"]["dive_user_wasted_percent"] is None
    assert shape["totals"]["user_wasted_percent"] == 0.0
    assert cli(capsys, img, "--ci")[0] == 0
    code, out, _ = cli(capsys, img, "--ci", "--ci-figures", "dive")
    assert code == 1
    assert gate(out) == ["FAIL: lowestEfficiency: 0.0000 (must be >= 0.9)",
                         "FAIL: highestUserWastedPercent: inf (must be <= 0.1)"]


def test_hardlink_with_every_name_hidden_is_wasted(tmp_path: Path) -> None:
    img = make(tmp_path, [[tb.file("data", d(400)), tb.hardlink("link", "data")],
                          [tb.whiteout("data"), tb.file("other", d(10))],
                          [tb.whiteout("link")]])
    for r in img.both():
        check(r, Expect(
            layers=[LF(entries=2, added=2, stored_bytes=400, wasted_bytes=400),
                    LF(entries=1, added=1, whiteouts=1, stored_bytes=10), LF(whiteouts=1)],
            stored=410, merged=10, wasted=400,
            efficiency=10 / 410, user_pct=400 / 10,  # user = 10 + 0
            top=[("/data", 400, 0, 2, False)],  # its last name went in layer 3
            # dive: data [400+0, 0], link [0+0, 0], other 10: 10 / 410; wasted 400 + 0.
            dive=DiveFigures(10 / 410, 400, 400 / 10)))


# --- 6. a dir replaced by a non-dir ---

def test_dir_replaced_by_a_file_hides_everything_below(tmp_path: Path) -> None:
    for r in make(tmp_path, DIR_TO_FILE).both():
        check(r, DIR_TO_FILE_EXPECT)


# --- 7. re-added dir, rewrite with other content ---

def test_readded_dir(tmp_path: Path) -> None:
    img = make(tmp_path, [
        [tb.dir("cache"), tb.file("cache/a", d(111)), tb.file("cache/b", d(222))],
        [tb.whiteout("cache"), tb.dir("cache"), tb.file("cache/c", d(33))],
    ])
    for r in img.both():
        check(r, Expect(
            # Layer 2's dir /cache shadows layer 1's /cache (the path is not new to the image),
            # so it is "changed", as the same change written with an opaque marker
            # (test_opaque_dir_hides_older_content) is, though the layer's own whiteout
            # deleted the lower one first.
            layers=[LF(entries=3, added=3, stored_bytes=333, wasted_bytes=333),  # 111+222
                    LF(entries=2, added=1, changed=1, whiteouts=1, stored_bytes=33)],
            stored=366, merged=33, wasted=333,  # 333 + 33; cache/c; a + b
            efficiency=33 / 366, user_pct=333 / 33,
            top=[("/cache/b", 222, 0, 1, False), ("/cache/a", 111, 0, 1, False)],
            # dive: layer 2's "cache" has a child (not a leaf; its whiteout is replaced by the
            # dir): cache/a 111, cache/b 222, cache/c 33, each once.
            dive=DiveFigures(1.0, 0, 0.0)))


def test_rewrite_with_different_content(tmp_path: Path) -> None:
    img = make(tmp_path, [[tb.file("conf", d(64, b"a")), tb.file("same", d(8))],
                          [tb.file("conf", d(64, b"b"))]])
    for r in img.both():
        check(r, Expect(
            layers=[LF(entries=2, added=2, stored_bytes=72, wasted_bytes=64),  # 64 + 8
                    LF(entries=1, changed=1, stored_bytes=64)],  # not unchanged: other bytes
            stored=136, merged=72, wasted=64,  # 72 + 64; 8 + 64
            efficiency=72 / 136, user_pct=64 / 64,
            top=[("/conf", 64, 0, 1, False)],
            # dive: conf [128, 64, 2 layers], same 8: (64+8) / (128+8); wasted 128.
            dive=DiveFigures(72 / 136, 128, 128 / 64)))


# --- 8. history rows ---

def test_empty_layer_entries_are_rows_in_order(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    history = [{"created_by": "ENV A=1", "empty_layer": True}, {"created_by": "ADD a"},
               {"created_by": "LABEL x=y", "empty_layer": True}, {"created_by": "RUN b"},
               {"created_by": "CMD sh", "empty_layer": True}]
    img = make(tmp_path, [[tb.file("a", d(1))], [tb.file("b", d(2))]],
               extra={"history": history})
    for r in img.both():
        assert [(row.layer, row.entry.created_by if row.entry else None) for row in r.rows] == [
            (None, "ENV A=1"), (0, "ADD a"), (None, "LABEL x=y"), (1, "RUN b"),
            (None, "CMD sh")]
        assert r.note is None
        assert [x.figures.stored_bytes for x in r.layers] == [1, 2]
    _, shape = cli_json(capsys, img)
    assert [(h["created_by"], h["empty_layer"], h["layer"]) for h in shape["history"]] == [
        ("ENV A=1", True, None), ("ADD a", False, 0), ("LABEL x=y", True, None),
        ("RUN b", False, 1), ("CMD sh", True, None)]


@pytest.mark.parametrize("history", [
    [{"created_by": "one"}, {"created_by": "two"}, {"created_by": "three"}],
    [{"created_by": "one"}],
    [],
], ids=["too-many", "too-few", "none"])
def test_history_not_matching_layers_gives_a_row_per_layer(
        tmp_path: Path, history: list[dict[str, Any]]) -> None:
    img = make(tmp_path, [[tb.file("a", d(1))], [tb.file("b", d(2))]],
               extra={"history": history})
    for r in img.both():
        assert [(row.layer, row.entry) for row in r.rows] == [(0, None), (1, None)]
        assert r.note
        assert [x.figures.added for x in r.layers] == [1, 1]


# --- 9. --ignore ---

IGNORE_LAYERS = [
    [tb.dir("var"), tb.dir("var/cache"), tb.file("var/cache/x.bin", d(1000)),
     tb.file("app.pyc", d(10)), tb.dir("src"), tb.file("src/m.pyc", d(20)),
     tb.file("src/m.py", d(30))],
    [tb.whiteout("var/cache"), tb.file("src/m.py", d(31)), tb.file("src/m.pyc", d(21))],
]


def test_ignore_leaves_paths_out_of_every_figure(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, IGNORE_LAYERS)
    for r in img.both():  # without --ignore: x.bin 1000 + m.pyc 20 + m.py 30 hidden
        assert (r.stored_bytes, r.merged_bytes, r.wasted_bytes) == (1112, 62, 1050)
    expect = Expect(
        # kept: var, src, src/m.py 30 | src/m.py 31 (the whiteout of /var/cache is left out)
        layers=[LF(entries=3, added=3, stored_bytes=30, wasted_bytes=30),
                LF(entries=1, changed=1, stored_bytes=31)],
        stored=61, merged=31, wasted=30, efficiency=31 / 61, user_pct=30 / 31,
        top=[("/src/m.py", 30, 0, 1, False)],
        # dive: var (an empty dir now) [0], src/m.py [30+31, 30, 2]: 30 / 61; wasted 61;
        # user = 31.
        dive=DiveFigures(30 / 61, 61, 61 / 31))
    for r in img.both(ignore=["/var/cache", "*.pyc"]):
        check(r, expect)
    code, shape = cli_json(capsys, img, "--ignore", "/var/cache", "--ignore", "*.pyc")
    assert code == 0
    assert (shape["totals"]["stored_bytes"], shape["totals"]["wasted_bytes"]) == (61, 30)
    assert [t["path"] for t in shape["top"]] == ["/src/m.py"]


def test_ignore_a_hardlinks_target(tmp_path: Path) -> None:
    img = make(tmp_path, [[tb.file("big", d(100)), tb.hardlink("alias", "big")]])
    # Leaving out the name a hardlink points at must not break the link's layer: the link
    # stays, one entry, added, and (its only name left) it carries the inode's 100 bytes.
    for r in img.both(ignore=["/big"]):
        assert r.layers[0].figures == LF(entries=1, added=1, stored_bytes=100)
        assert (r.stored_bytes, r.merged_bytes, r.wasted_bytes) == (100, 100, 0)


# --- 10. the CLI's output ---

def test_cli_json_shape_and_top(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, CHMOD)
    for where in ("source", "store"):
        code, shape = cli_json(capsys, img, where=where)
        assert code == 0
        assert {"history", "layers", "totals", "top", "note"} <= set(shape)
        assert "ci" not in shape
        assert shape["note"] is None
        assert [h["created_by"] for h in shape["history"]] == ["layer 0", "layer 1"]
        assert shape["totals"] == {
            "stored_bytes": 3600, "merged_bytes": 1800, "wasted_bytes": 1800,
            "unchanged_rewrite_bytes": 1500, "efficiency": 0.5, "user_wasted_percent": 1.0,
            "dive_efficiency": 0.5, "dive_wasted_bytes": 3600, "dive_user_wasted_percent": 2.0}
        assert [{k: x[k] for k in ("index", "entries", "added", "changed", "whiteouts",
                                   "opaques", "stored_bytes", "wasted_bytes",
                                   "unchanged_rewrite_bytes", "rewrote_unchanged_bytes")}
                for x in shape["layers"]] == [
            {"index": 0, "entries": 4, "added": 4, "changed": 0, "whiteouts": 0, "opaques": 0,
             "stored_bytes": 1800, "wasted_bytes": 1800, "unchanged_rewrite_bytes": 1500,
             "rewrote_unchanged_bytes": 0},
            {"index": 1, "entries": 4, "added": 0, "changed": 4, "whiteouts": 0, "opaques": 0,
             "stored_bytes": 1800, "wasted_bytes": 0, "unchanged_rewrite_bytes": 0,
             "rewrote_unchanged_bytes": 1500}]
        assert shape["top"] == [
            {"path": "/bin/x", "size": 1000, "layer": 0, "hidden_by": 1, "unchanged": True},
            {"path": "/bin/y", "size": 500, "layer": 0, "hidden_by": 1, "unchanged": True},
            {"path": "/bin/z", "size": 300, "layer": 0, "hidden_by": 1, "unchanged": False}]
        _, one = cli_json(capsys, img, "--top", "1", where=where)
        assert [t["path"] for t in one["top"]] == ["/bin/x"]
        assert one["totals"] == shape["totals"]  # --top changes the list only


def test_cli_text_has_the_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, CHMOD)
    code, out, err = cli(capsys, img, "--top", "1")
    assert (code, err) == (0, "")
    lines = out.splitlines()

    def line(label: str) -> str:
        found = [x for x in lines if x.startswith(label)]
        assert len(found) == 1, (label, out)
        return found[0]

    assert "3600 bytes" in line("Stored:") and "2 layers" in line("Stored:")
    assert "1800 bytes" in line("Merged view:")
    assert "1800 bytes" in line("Wasted:") and "1500" in line("Wasted:")
    assert "50.0%" in line("Efficiency:")
    dive = line("dive figures:")
    assert "50.0%" in dive and "3600 bytes" in dive and "200.0%" in dive
    rows = [x.split() for x in lines if x.startswith(("1 ", "2 "))]
    # #, CREATED (n units ago), CREATED BY, SIZE, COMPRESSED, ADDED, CHANGED, WHITEOUTS,
    # OPAQUE, WASTED, UNCHANGED: the last six of each layer row.
    assert [r[-6:] for r in rows] == [["4", "0", "0", "0", "1.8kB", "1.5kB"],
                                      ["0", "4", "0", "0", "0B", "0B"]]
    top = [x for x in lines if "/bin/" in x]
    assert len(top) == 1  # --top 1
    assert top[0].split()[:3] == ["1kB", "/bin/x", "layer"]
    assert "layer 1" in top[0] and "layer 2" in top[0] and "unchanged" in top[0]


# --- 11. the CI gate ---

def gate(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith(("PASS: ", "FAIL: "))]


def test_ci_passes_on_an_efficient_image(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, [[tb.file("a", d(100))], [tb.file("b", d(100))]])
    code, out, _ = cli(capsys, img, "--ci")
    # efficiency 200 / 200 = 1.0; wasted 0 -> user wasted 0
    assert code == 0
    assert [x.split(":")[:2] for x in gate(out)] == [
        ["PASS", " lowestEfficiency"], ["PASS", " highestUserWastedPercent"]]


def test_ci_fails_on_a_wasteful_image(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, CHMOD)
    code, out, _ = cli(capsys, img, "--ci", "--highest-wasted-bytes", "1kB")
    assert code == 1
    fails = [x for x in gate(out) if x.startswith("FAIL: ")]
    assert [x.split(":")[1].strip() for x in fails] == [
        "lowestEfficiency", "highestWastedBytes", "highestUserWastedPercent"]
    assert "0.5" in fails[0] and "0.9" in fails[0]  # 1800 / 3600 < 0.9
    assert "1800" in fails[1] and "1000" in fails[1]  # 1kB = 1000 bytes
    assert "1.0" in fails[2] and "0.1" in fails[2]  # 1800 / 1800 > 0.1
    code, shape = cli_json(capsys, img, "--ci", "--highest-wasted-bytes", "1kB")
    assert code == 1
    assert shape["ci"]["passed"] is False
    assert [(x["rule"], x["figure"], x["threshold"], x["passed"])
            for x in shape["ci"]["rules"]] == [
        ("lowestEfficiency", 0.5, 0.9, False), ("highestWastedBytes", 1800, 1000, False),
        ("highestUserWastedPercent", 1.0, 0.1, False)]


@pytest.mark.parametrize(("size", "threshold", "passed"), [
    ("1.8kB", 1800, True), ("1.7kB", 1700, False), ("2KiB", 2048, True), ("1800", 1800, True),
    ("1799B", 1799, False),
])
def test_ci_highest_wasted_bytes_units(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       size: str, threshold: int, passed: bool) -> None:
    img = make(tmp_path, CHMOD)  # 1800 wasted bytes
    code, shape = cli_json(capsys, img, "--ci", "--lowest-efficiency", "disabled",
                           "--highest-user-wasted-percent", "disabled",
                           "--highest-wasted-bytes", size)
    assert shape["ci"]["rules"] == [{"rule": "highestWastedBytes", "figure": 1800,
                                     "threshold": threshold, "passed": passed}]
    assert code == (0 if passed else 1)


def test_ci_20mb_on_the_article_example(big_image: Image,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, big_image, "--ci", "--highest-wasted-bytes", "20MB",
                       "--lowest-efficiency", "disabled",
                       "--highest-user-wasted-percent", "disabled")
    assert code == 1
    assert gate(out) == [
        "FAIL: highestWastedBytes: 50000000 bytes (must be <= 20000000 bytes)"]
    code, _, _ = cli(capsys, big_image, "--ci", "--highest-wasted-bytes", "50MB",
                     "--lowest-efficiency", "disabled",
                     "--highest-user-wasted-percent", "disabled")
    assert code == 0  # 50,000,000 <= 50MB


def test_ci_lowest_efficiency_disabled(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, CHMOD)  # efficiency 0.5, user wasted 1.0
    code, out, _ = cli(capsys, img, "--ci", "--lowest-efficiency", "disabled")
    assert code == 1
    assert [x.split(":")[:2] for x in gate(out)] == [["FAIL", " highestUserWastedPercent"]]
    code, out, _ = cli(capsys, img, "--ci", "--lowest-efficiency", "disabled",
                       "--highest-user-wasted-percent", "2")
    assert code == 0
    assert [x.split(":")[:2] for x in gate(out)] == [["PASS", " highestUserWastedPercent"]]


def test_ci_figures_dive_vs_ocilayers(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # The surviving copy: ocilayers counts 1800 wasted bytes, dive 3600.
    chmod = make(tmp_path / "chmod", CHMOD)
    argv = ["--ci", "--lowest-efficiency", "disabled", "--highest-user-wasted-percent",
            "disabled", "--highest-wasted-bytes", "2000"]
    code, out, _ = cli(capsys, chmod, *argv)
    assert (code, gate(out)) == (0, ["PASS: highestWastedBytes: 1800 bytes "
                                     "(must be <= 2000 bytes)"])
    code, out, _ = cli(capsys, chmod, *argv, "--ci-figures", "dive")
    assert (code, gate(out)) == (1, ["FAIL: highestWastedBytes: 3600 bytes "
                                     "(must be <= 2000 bytes)"])
    # A dir whiteout: ocilayers sees 300 of 337 bytes wasted, dive nothing.
    wo = make(tmp_path / "wo", DIR_WHITEOUT)
    code, out, _ = cli(capsys, wo, "--ci")
    assert code == 1  # 37 / 337 < 0.9 and 300 / 30 > 0.1
    assert [x[:4] for x in gate(out)] == ["FAIL", "FAIL"]
    code, shape = cli_json(capsys, wo, "--ci", "--ci-figures", "dive")
    assert code == 0  # dive: efficiency 1.0, user wasted 0
    assert shape["ci"]["figures"] == "dive" and shape["ci"]["passed"] is True
    assert [x["figure"] for x in shape["ci"]["rules"]] == [1.0, 0.0]


# --- 12. the store: no diff dir read ---

def test_store_history_reads_no_diff_dir(tmp_path: Path) -> None:
    img = make(tmp_path, DIR_TO_FILE)
    before = img.history("store")
    proc = run_module(["--root", str(img.root), "inspect", img.tag, "--json"])
    assert proc.returncode == 0, proc.stderr
    cache_ids = [x["cache_id"] for x in json.loads(proc.stdout)["layers"]]
    assert len(cache_ids) == 3
    moved = tmp_path / "moved"
    for n, cache_id in enumerate(cache_ids):
        diff = img.root / "overlay2" / cache_id / "diff"
        (moved / str(n)).mkdir(parents=True)
        names = os.listdir(diff)
        assert names  # every layer has content to move away
        for name in names:
            os.rename(diff / name, moved / str(n) / name)
        assert os.listdir(diff) == []
    after = img.history("store")
    assert summary(after) == summary(before)
    check(after, DIR_TO_FILE_EXPECT)


# --- 13. hostile layers ---

@pytest.mark.parametrize(("members", "needle"), [
    ([tb.hardlink("l", "f"), tb.file("f", d(1))], "/l"),  # target later in the layer
    ([tb.hardlink("l", "nowhere")], "/l"),  # target not in the layer at all
    ([tb.file("../evil", d(1))], "../evil"),
    ([tb.file("f", d(1)), tb.hardlink("l", "../f")], "../f"),
], ids=["link-forward", "link-missing", "dotdot-name", "dotdot-link"])
def test_hostile_layer_is_a_one_line_error(tmp_path: Path, members: list[tb.Member],
                                           needle: str) -> None:
    write_image(tmp_path / "layout", [[tb.file("ok", d(1))], members])
    proc = run_module(["history", str(tmp_path / "layout")])
    assert_one_line_error(proc.returncode, proc.stderr, needle)
    assert proc.stdout == ""


def test_ignore_a_hardlinks_target_with_two_links(tmp_path: Path) -> None:
    # The first kept link holds the data; the second stays a link to it, so the inode is
    # counted once, and deleting one of the names later wastes nothing.
    img = make(tmp_path, [[tb.file("big", d(100)), tb.hardlink("alias", "big"),
                           tb.hardlink("alias2", "big")], [tb.whiteout("alias")]])
    for r in img.both(ignore=["/big"]):
        assert r.layers[0].figures == LF(entries=2, added=2, stored_bytes=100)
        assert (r.stored_bytes, r.merged_bytes, r.wasted_bytes) == (100, 100, 0)


def test_unchanged_rewrite_is_credited_to_the_rewriting_layer(tmp_path: Path) -> None:
    # Layer 2 rewrites /data unchanged; layer 3 deletes /link, the inode's other name. The
    # inode is wasted (both names hidden) by an unchanged rewrite: the top row and the
    # rewriting layer's figure name layer 2 (index 1), not the layer of the whiteout.
    img = make(tmp_path, [[tb.file("data", d(400)), tb.hardlink("link", "data")],
                          [tb.file("data", d(400), mode=0o600)], [tb.whiteout("link")]])
    for r in img.both():
        assert r.layers[0].figures.unchanged_rewrite_bytes == 400
        assert r.layers[1].figures.rewrote_unchanged_bytes == 400
        assert r.layers[2].figures.rewrote_unchanged_bytes == 0
        assert [(t.path, t.size, t.layer, t.hidden_by, t.unchanged) for t in r.top] == [
            ("/data", 400, 0, 1, True)]


# --- merge and dive's figures side by side ---

def _many_entries() -> list[list[Entry]]:
    """Three layers, 4,500 entries: dirs, files, rewrites, file and dir whiteouts, an opaque
    dir, hardlinks."""
    base = [Entry(b"d%d" % i, DIR_KIND) for i in range(30)]
    base += [Entry(b"d%d/f%d" % (i % 30, i), FILE_KIND, 100 + i) for i in range(1470)]
    mid = [Entry(b"d%d/f%d" % (i % 30, i), FILE_KIND, 7) for i in range(0, 1470, 3)]
    mid += [Entry(b"d%d" % i, WHITEOUT_KIND) for i in range(5)]
    mid += [Entry(b"n/%d" % i, FILE_KIND, i) for i in range(1000)]
    top = [Entry(b"d6", OPAQUE_KIND), Entry(b"d7/f7", WHITEOUT_KIND)]
    top += [Entry(b"n/%d" % i, FILE_KIND, 1) for i in range(0, 1000, 2)]
    top += [Entry(b"h/%d" % i, HARDLINK_KIND, 0, 0, b"n/%d" % (i * 2)) for i in range(498)]
    return [base, mid, top]


@pytest.mark.parametrize("fork", [True, False])
def test_merge_and_dive_side_by_side(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     fork: bool) -> None:
    """With enough entries dive's figures come from a forked child while the merge runs
    here: the same figures as one after the other, and really from another process."""
    monkeypatch.setattr(forking, "can_fork", lambda: fork)  # (the suite may hold threads)
    layers = _many_entries()
    assert sum(map(len, layers)) >= history.DIVE_FORK_MIN_ENTRIES
    pids = tmp_path / "pids"
    real = history.dive_figures

    def spy(x: Any) -> DiveFigures:
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(x)

    monkeypatch.setattr(history, "dive_figures", spy)
    merge, dive = history.merge_and_dive(layers)
    assert dive == real(layers)
    alone = history.merge_layers(layers)
    assert merge.layers == alone.layers

    def wasted(m: Any) -> list[tuple[Any, ...]]:
        return [(g.entry.path, g.size, g.layer, g.hidden_by, g.unchanged) for g in m.wasted()]
    assert wasted(merge) == wasted(alone)
    assert wasted(merge)  # the layers do hide files
    assert (int(pids.read_text()) != os.getpid()) is fork
    pids.unlink()
    history.merge_and_dive([layers[0][:100]])  # too few entries to pay for a fork
    assert int(pids.read_text()) == os.getpid()
