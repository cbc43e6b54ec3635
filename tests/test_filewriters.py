"""filewriters.py: a layer's new files made by writer processes (or threads) while the applier
reads on. Whatever writes them, the store must be the same to the byte: diff dirs, tar-split
records, sizes, ids. Errors of a writer come back as the applier's own, naming the entry; a
writer that dies is an error, never a hang.

The hostile and ordering tables of test_extract.py run again with writers (its `file_writers`
fixture); here: whole unpacks of layers made to cross every hand-off rule, and the writers'
own failure paths.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
from conftest import FIXTURES
from test_store import assert_same_stores, check_store, write_oci

from ocilayers import filewriters
from ocilayers.errors import OCILayersError
from ocilayers.extract import apply_layer
from ocilayers.filewriters import FileWriters

KINDS = ("off", "procs:2", "threads:2", "procs:3")


def _layers() -> list[bytes]:
    """Three layers whose entries hit each rule of the hand-off: files of many dirs; big files
    (written by the applier); hardlinks before and after their (handed-off) targets; a path
    written twice; a file replaced by a dir and a dir by a file; a dir entry after its files;
    odd modes, owners, xattrs; then whiteouts, opaque dirs and `.wh.X` + `X/child` among new
    files over the lower layers."""
    rnd = random.Random(18)
    a: list[tb.Member] = []
    for d in range(30):
        a.append(tb.dir(f"pkg/d{d:02d}", mode=0o750 if d % 7 == 0 else 0o755))
        for f in range(40):
            a.append(tb.file(f"pkg/d{d:02d}/f{f:02d}", rnd.randbytes(rnd.randrange(0, 2000))))
        if d % 5 == 0:
            a.append(tb.hardlink(f"pkg/d{d:02d}/link-after", f"pkg/d{d:02d}/f03"))
            a.append(tb.symlink(f"pkg/d{d:02d}/sym", "f01"))
    a += [
        tb.hardlink("early/link", "late/target"),  # before its target: deferred to the end
        tb.file("late/target", b"target data\n"),
        tb.file("big/one", rnd.randbytes(filewriters.HANDOFF_MAX + 1)),
        tb.file("big/two", bytes(3 * filewriters.HANDOFF_MAX)),
        tb.file("twice", b"first\n"),
        tb.file("twice", b"second, and it wins\n", mode=0o600),
        tb.file("becomes-dir", b"a file first\n"),
        tb.dir("becomes-dir", mode=0o711),
        tb.file("becomes-dir/inside", b"x"),
        tb.dir("becomes-file"),
        tb.file("becomes-file/gone", b"y"),
        tb.file("becomes-file", b"now a file\n"),
        tb.file("later-dir/a", b"a"),
        tb.file("later-dir/b", b"b"),
        tb.dir("later-dir", mode=0o700, mtime=1_500_000_000),
        tb.file("modes/setuid", b"#!/bin/sh\n", mode=0o4755),
        tb.file("modes/sticky-nothing", b"", mode=0o1000),
        tb.file("modes/all", b"z", mode=0o7777),
        tb.file("owners/app", b"app\n", uid=1000, gid=1000),
        tb.file("owners/odd", b"odd\n", uid=65533, gid=12345, mode=0o2640),
        tb.file("xattrs/user", b"x\n", xattrs={"user.comment": b"hello"}),
        tb.file("xattrs/forged", b"x\n", xattrs={"trusted.overlay.opaque": b"y"}),
    ]
    b: list[tb.Member] = []
    for d in range(0, 30, 3):
        b.append(tb.file(f"pkg/d{d:02d}/new", b"new in layer 2\n"))
        b.append(tb.whiteout(f"pkg/d{d:02d}/f05"))
        b.append(tb.file(f"pkg/d{d:02d}/new2", b"more\n"))
    b += [
        tb.file("pkg/d01/x", b"before the opaque marker\n"),
        tb.opaque("pkg/d01"),
        tb.file("pkg/d01/y", b"after it\n"),
        tb.whiteout("pkg/d02"),
        tb.file("pkg/d02/back", b"a new d02 over the whited-out one\n"),
        tb.file("late/target2", b"t2\n"),
        tb.hardlink("late/link2", "late/target2"),
        tb.file("gone-below/file", b"f\n"),
        tb.whiteout("gone-below/file/below"),  # below a file of this layer: hides nothing
    ]
    c = [tb.file(f"wide/f{i:04d}", b"%d\n" % i) for i in range(1500)]
    return [tb.build(a), tb.build(b), tb.build(c)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fw") / "img"
    write_oci(d, _layers())
    return d


def _unpack(image: Path, root: Path, kind: str) -> None:
    env = dict(os.environ, **{filewriters.ENV: kind})
    proc = subprocess.run([sys.executable, "-m", "ocilayers", "--root", str(root), "unpack",
                           str(image)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_kind_of_writer_gives_the_same_store(image: Path, tmp_path: Path) -> None:
    roots = {}
    for kind in KINDS:
        roots[kind] = tmp_path / kind.replace(":", "-")
        _unpack(image, roots[kind], kind)
    ref = roots["off"]
    for kind, root in roots.items():
        if root == ref:
            continue
        assert_same_stores(ref, root)
        layerdb = Path("image", "overlay2", "layerdb", "sha256")
        for chain in os.listdir(ref / layerdb):  # tar-split records and sizes: byte for byte
            for name in ("tar-split.json.gz", "size", "diff"):
                assert (ref / layerdb / chain / name).read_bytes() == \
                    (root / layerdb / chain / name).read_bytes(), (kind, chain, name)
        check_store(root)


def test_demo_fixtures_same_with_writers(tmp_path: Path) -> None:
    roots = []
    for kind in ("off", "procs:2"):
        root = tmp_path / kind.replace(":", "-")
        for f in ("demo", "docker-save.tar"):
            _unpack(FIXTURES / f, root, kind)
        roots.append(root)
    assert_same_stores(*roots)


@pytest.mark.parametrize("threads", [False, True], ids=["procs", "threads"])
def test_a_writer_error_names_the_entry(tmp_path: Path, threads: bool) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "d").mkdir()
    (target / "d" / "taken").write_bytes(b"")  # O_EXCL: EEXIST in the writer
    w = FileWriters(target, 2, threads=threads)
    try:
        w.add(b"d", b"ok", 0o644, 0, 0, 0, None, b"fine", b"d/ok")
        w.add(b"d", b"taken", 0o644, 0, 0, 0, None, b"boom", b"d/taken")
        with pytest.raises(FileExistsError) as info:
            w.sync()
        assert "apply entry 'd/taken'" in (info.value.__notes__ or [])
    finally:
        w.abort()
    assert (target / "d" / "taken").read_bytes() == b""  # nothing a user had is damaged


def test_a_writer_cannot_write_through_a_symlink(tmp_path: Path) -> None:
    """Confinement holds in the writer itself: a parent that is a symlink is refused."""
    target = tmp_path / "t"
    target.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (target / "link").symlink_to(outside)
    for threads in (False, True):
        w = FileWriters(target, 1, threads=threads)
        try:
            w.add(b"link", b"escaped", 0o644, 0, 0, 0, None, b"x", b"link/escaped")
            with pytest.raises(OSError):
                w.sync()
        finally:
            w.abort()
    assert list(outside.iterdir()) == []


def test_a_dead_writer_is_an_error_not_a_hang(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    w = FileWriters(target, 2)
    try:
        os.kill(w._procs[0][0], signal.SIGKILL)
        with pytest.raises(OCILayersError, match="file writer process"):
            for i in range(2000):  # enough batches to reach the dead one, and more
                name = b"f%d" % i
                w.add(b"", name, 0o644, 0, 0, 0, None, b"data" * 300, name)
            w.sync()
    finally:
        w.abort()


def test_abort_stops_every_writer(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    w = FileWriters(target, 3)
    pids = [p for p, _, _ in w._procs]
    w.abort()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_apply_layer_with_writers_streams_and_counts(tmp_path: Path) -> None:
    """apply_layer's stats with writers equal those without (sizes counted while applying)."""
    data = _layers()[0]
    stats = []
    for kind in ("serial", "procs", "threads"):
        d = tmp_path / kind
        d.mkdir()
        w = None if kind == "serial" else FileWriters(d, 2, threads=kind == "threads")
        try:
            stats.append(apply_layer(io.BytesIO(data), d, writers=w))
        finally:
            if w is not None:
                w.abort()
    assert stats[0] == stats[1] == stats[2]
    assert stats[0].size is None or stats[0].size > 0


@pytest.mark.parametrize(("env", "size", "want"), [
    ("off", 1 << 30, ("off", 0)),
    ("procs:3", 10, ("procs", 3)),  # a count given: used even for a tiny layer
    ("threads:2", None, ("threads", 2)),
])
def test_chosen(monkeypatch: pytest.MonkeyPatch, env: str, size: int | None,
                want: tuple[str, int]) -> None:
    monkeypatch.setenv(filewriters.ENV, env)
    assert filewriters.chosen(size) == want


def test_chosen_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(filewriters.ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert filewriters.chosen(filewriters.MIN_LAYER - 1) == ("off", 0)  # too small to gain
    assert filewriters.chosen(filewriters.MIN_LAYER) == ("procs", 4)  # alone: every core
    assert filewriters.chosen(filewriters.MIN_LAYER, busy=3) == ("procs", 1)  # what is left
    assert filewriters.chosen(filewriters.MIN_LAYER, busy=4) == ("off", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert filewriters.chosen(filewriters.MIN_LAYER) == ("off", 0)


@pytest.mark.parametrize("bad", ["fast", "procs:x"])
def test_chosen_refuses_a_bad_setting(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(filewriters.ENV, bad)
    with pytest.raises(OCILayersError, match=filewriters.ENV):
        filewriters.chosen(1 << 30)


def test_tarfile_sanity_of_the_mixed_layer() -> None:
    """The mixed layer really holds what the test above relies on."""
    with tarfile.open(fileobj=io.BytesIO(_layers()[0])) as tf:
        names = [m.name for m in tf]
    assert names.count("twice") == 2 and "early/link" in names
    assert names.index("early/link") < names.index("late/target")


def test_a_writer_error_met_at_a_later_entry_names_only_its_own(tmp_path: Path) -> None:
    """The applier meets a writer's error at a sync while on a later entry (here a
    whiteout): the message names the file that failed, not the entry at hand."""
    target = tmp_path / "t"
    target.mkdir()
    layer = tb.build([tb.file("d/taken", b"new"), tb.whiteout("d/other")])

    def on_entry(entry: Any) -> None:
        if entry.name == b"d/.wh.other":  # "d/taken" is handed off, not written yet
            (target / "d" / "taken").write_bytes(b"")  # behind the writer's back: EEXIST

    w = FileWriters(target, 1)
    try:
        with pytest.raises(FileExistsError) as info:
            apply_layer(io.BytesIO(layer), target, writers=w, on_entry=on_entry)
    finally:
        w.abort()
    assert info.value.__notes__ == ["apply entry 'd/taken'"]
