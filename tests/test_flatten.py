"""flatten.py: DEST must be missing or empty, and any failure leaves it as it was found."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import tarbuilder as tb
from conftest import FIXTURES, assert_one_line_error
from test_store import ok, ol, unpack, write_oci

Capsys = pytest.CaptureFixture[str]
TINY = str(FIXTURES / "tiny")


def bad_image(dest: Path) -> Path:
    """Two layers: a good one, then one with a `../` entry (refused mid-apply)."""
    write_oci(dest, [tb.build([tb.dir("etc"), tb.file("etc/ok", b"fine")]),
                     tb.build([tb.file("etc/more", b"x"), tb.file("../escape", b"bad")])])
    return dest


@pytest.mark.parametrize("from_store", [False, True], ids=["source", "image"])
@pytest.mark.parametrize("dest_state", ["missing", "empty"])
def test_failure_leaves_dest_as_found(tmp_path: Path, capsys: Capsys, dest_state: str,
                                      from_store: bool) -> None:
    image = bad_image(tmp_path / "bad")
    arg = str(image)
    root = tmp_path / "store"
    if from_store:  # the store's copy of the bad layer: tamper with a diff dir afterwards
        result = unpack(capsys, root, TINY)
        arg = result["image_id"]
        top = result["layers"][-1]["cache_id"]
        (root / "overlay2" / top / "diff" / "hello.txt").write_text("tampered\n")
    dest = tmp_path / "dest"
    if dest_state == "empty":
        dest.mkdir(mode=0o750)
        os.chmod(dest, 0o750)
    before = sorted(os.listdir(tmp_path))
    code, _out, err = ol(capsys, root, "flatten", arg, str(dest))
    assert_one_line_error(code, err)
    assert sorted(os.listdir(tmp_path)) == before  # no temp dir left beside DEST
    if dest_state == "missing":
        assert not dest.exists()
    else:
        assert os.listdir(dest) == []
        assert stat.S_IMODE(dest.stat().st_mode) == 0o750


def test_non_empty_dest_refused_and_untouched(tmp_path: Path, capsys: Capsys) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine").write_text("the user's")
    code, _out, err = ol(capsys, tmp_path / "store", "flatten", TINY, str(dest))
    assert_one_line_error(code, err, str(dest), "not empty")
    assert os.listdir(dest) == ["mine"] and (dest / "mine").read_text() == "the user's"
    (tmp_path / "file").write_text("")
    code, _out, err = ol(capsys, tmp_path / "store", "flatten", TINY, str(tmp_path / "file"))
    assert_one_line_error(code, err, "not a directory")


@pytest.mark.parametrize("dest_state", ["missing", "empty"])
def test_success_fills_dest(tmp_path: Path, capsys: Capsys, dest_state: str) -> None:
    dest = tmp_path / "dest"
    if dest_state == "empty":
        dest.mkdir()
    ok(capsys, tmp_path / "store", "flatten", TINY, str(dest))
    assert (dest / "hello.txt").read_text() == "hello v2\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ocilayers")]


def test_missing_parent_is_named(tmp_path: Path, capsys: Capsys) -> None:
    dest = tmp_path / "no" / "dest"
    code, _out, err = ol(capsys, tmp_path / "store", "flatten", TINY, str(dest))
    assert_one_line_error(code, err, str(dest), "does not exist")
