"""Mount records (store/mounts.py, view.py, mount.py): `rmi` and `prune` keep what a live view
shows, in this mount namespace or another; a target is never stacked; `umount` unmounts only
what ocilayers mounted; mount errors say what is wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, assert_one_line_error, mountinfo, run_cli
from test_store import ok, ol, unpack

Capsys = pytest.CaptureFixture[str]
DEMO = FIXTURES / "demo"
SAVE = FIXTURES / "docker-save.tar"


def count_mounts(target: Path) -> int:
    want = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == want)


@pytest.fixture
def view(tmp_path: Path, capsys: Capsys, mounts: list[Path]) -> tuple[Path, Path, str]:
    """A store with the demo image, mounted read-only at a target: (root, target, image id)."""
    root = tmp_path / "store"
    image_id = unpack(capsys, root, DEMO, "--tag", "demo:1")["image_id"]
    target = tmp_path / "mnt"
    target.mkdir()
    mounts.append(target)
    ok(capsys, root, "mount", "demo:1", str(target))
    return root, target, image_id


def layer_dirs(root: Path) -> set[str]:
    return {n for n in os.listdir(root / "overlay2") if len(n) == 64}


def test_rmi_refuses_while_mounted(view: tuple[Path, Path, str], capsys: Capsys) -> None:
    root, target, _image_id = view
    before = sorted(os.listdir(target))
    code, _out, err = ol(capsys, root, "rmi", "demo:1")
    assert_one_line_error(code, err, "mounted at", str(target))
    assert sorted(os.listdir(target)) == before and before
    ok(capsys, root, "umount", str(target))
    assert count_mounts(target) == 0
    ok(capsys, root, "rmi", "demo:1")
    assert layer_dirs(root) == set()


def test_prune_keeps_layers_a_view_shows(view: tuple[Path, Path, str], capsys: Capsys) -> None:
    """As after a dockerd sharing the store `docker rmi`s the image: its config is gone, the
    view still shows the layers, and prune keeps them, naming the mount."""
    root, target, image_id = view
    layers = layer_dirs(root)
    (root / "image/overlay2/imagedb/content/sha256" / image_id[7:]).unlink()
    ok(capsys, root, "untag", "demo:1")
    out = ok(capsys, root, "prune")
    assert f"mounted at {target}" in out
    assert layer_dirs(root) == layers
    assert os.listdir(target)
    ok(capsys, root, "umount", str(target))
    out = ok(capsys, root, "prune")
    assert layer_dirs(root) == set(), out


def test_second_mount_on_a_target_refused(view: tuple[Path, Path, str],
                                          capsys: Capsys) -> None:
    root, target, _ = view
    code, _out, err = ol(capsys, root, "mount", "demo:1", str(target))
    assert_one_line_error(code, err, "already a mount point", "overlay")
    assert count_mounts(target) == 1


def test_umount_leaves_what_ocilayers_did_not_mount(tmp_path: Path, capsys: Capsys,
                                                   mounts: list[Path]) -> None:
    root = tmp_path / "store"
    unpack(capsys, root, DEMO, "--tag", "demo:1")
    target = tmp_path / "t"
    target.mkdir()
    mounts.append(target)
    subprocess.run(["mount", "-t", "tmpfs", "usertmpfs", str(target)], check=True)
    (target / "mine").write_text("the user's")
    code, _out, err = ol(capsys, root, "umount", str(target))
    assert_one_line_error(code, err, "not mounted by ocilayers", "tmpfs")
    assert (target / "mine").read_text() == "the user's"
    code, _out, err = ol(capsys, root, "umount", str(tmp_path))
    assert_one_line_error(code, err, "not a mount point")


@pytest.mark.parametrize("case", ["missing", "file", "parent-file"])
def test_mount_target_errors(tmp_path: Path, capsys: Capsys, mounts: list[Path],
                             case: str) -> None:
    root = tmp_path / "store"
    unpack(capsys, root, DEMO, "--tag", "demo:1")
    (tmp_path / "file").write_text("")
    target = {"missing": tmp_path / "nodir", "file": tmp_path / "file",
              "parent-file": tmp_path / "file" / "sub"}[case]
    code, _out, err = ol(capsys, root, "mount", "demo:1", str(target))
    want = {"missing": "does not exist", "file": "not a directory",
            "parent-file": "not a directory"}[case]
    line = assert_one_line_error(code, err, str(target), want)
    assert "dmesg(1) may have more" not in line
    assert not (root / "ocilayers" / "mounts").exists()  # checked before any record


def test_mount_with_a_lower_dir_missing(tmp_path: Path, capsys: Capsys,
                                       mounts: list[Path]) -> None:
    root = tmp_path / "store"
    result = unpack(capsys, root, SAVE)
    base = result["layers"][0]["cache_id"]
    shutil.rmtree(root / "overlay2" / base / "diff")
    target = tmp_path / "mnt"
    target.mkdir()
    mounts.append(target)
    code, _out, err = ol(capsys, root, "mount", result["image_id"], str(target))
    assert_one_line_error(code, err, "lower dir", "is missing", base)
    assert count_mounts(target) == 0


def _unshare_available() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                          capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else f"unshare -m fails here: {proc.stderr.strip()}"


def test_view_in_another_namespace_counts_while_it_lives(tmp_path: Path, capsys: Capsys,
                                                         mounts: list[Path]) -> None:
    """The view is invisible from here (another mount namespace), yet it holds its layers
    while that namespace lives; once the namespace is gone, its record is stale."""
    why = _unshare_available()
    if why:
        pytest.skip(why)
    root = tmp_path / "store"
    unpack(capsys, root, DEMO, "--tag", "demo:1")
    target = tmp_path / "mnt"
    target.mkdir()
    ready = tmp_path / "ready"
    script = (f"{sys.executable} -m ocilayers --root {root} mount demo:1 {target} && "
              f"ls {target} > {ready} && exec sleep 60")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text()) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists() and ready.read_text(), proc.stderr.read() if proc.stderr else ""
        assert count_mounts(target) == 0  # not in this namespace
        (rec,) = [json.loads(p.read_text())
                  for p in (root / "ocilayers" / "mounts").iterdir()]
        assert rec["mnt_ns"] != os.readlink("/proc/self/ns/mnt")
        code, _out, err = ol(capsys, root, "rmi", "demo:1")
        assert_one_line_error(code, err, "mounted at", str(target))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    ok(capsys, root, "rmi", "demo:1")
    assert layer_dirs(root) == set()
    assert os.listdir(root / "ocilayers" / "mounts") == []


def test_a_record_whose_mount_is_gone_is_stale(view: tuple[Path, Path, str],
                                               capsys: Capsys) -> None:
    root, target, _ = view
    subprocess.run(["umount", str(target)], check=True)  # behind ocilayers' back
    ok(capsys, root, "rmi", "demo:1")
    assert layer_dirs(root) == set()


def test_cli_run_in_process_sees_the_same(view: tuple[Path, Path, str],
                                          capsys: Capsys) -> None:
    root, target, _ = view
    code, _out, err = run_cli(["--root", str(root), "mount", "demo:1", str(target)], capsys)
    assert code == 1 and "already a mount point" in err
    info = mountinfo(target)
    assert info is not None and info[0] == "overlay"
