"""dirfds.DirFds: confined dir lookup from a root fd, with an LRU of open dir fds."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from ocilayers.dirfds import DirFds
from ocilayers.fsutil import DIR_FLAGS


def _fds(tmp_path: Path, limit: int = 8) -> tuple[DirFds, int]:
    root = os.open(tmp_path, DIR_FLAGS)
    return DirFds(root, limit), root


def _refuse(fd: int, parts: Sequence[bytes]) -> int:
    raise AssertionError(f"not_dir called for {parts!r}")


def test_get_opens_caches_and_makes_missing_dirs(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    fds, root = _fds(tmp_path)
    made: list[bytes] = []

    def missing(fd: int, parts: Sequence[bytes]) -> int:
        made.append(b"/".join(parts))
        os.mkdir(parts[-1], 0o755, dir_fd=fd)
        return os.open(parts[-1], DIR_FLAGS, dir_fd=fd)

    fd = fds.get([b"a", b"b", b"c", b"d"], missing, _refuse)
    assert made == [b"a/b/c", b"a/b/c/d"]
    assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "a/b/c/d"))
    assert fds.get([b"a", b"b", b"c", b"d"], None, _refuse) == fd  # cached: the same fd
    assert fds.cached([b"a", b"b", b"c", b"d"]) == fd
    assert fds.cached([b"nowhere"]) is None
    dup = fds.cached([b"a", b"b", b"c", b"d"], cache=False)
    assert dup is not None and dup != fd and os.path.samestat(os.fstat(dup), os.fstat(fd))
    os.close(dup)
    own = fds.get([b"a", b"b"], None, _refuse, cache=False)  # the caller's own fd
    assert own != fd and os.path.samestat(os.fstat(own), os.stat(tmp_path / "a/b"))
    os.close(own)
    with pytest.raises(FileNotFoundError):
        fds.get([b"x"], None, _refuse)
    fds.drop()
    os.close(root)


def test_symlink_or_file_in_the_way_goes_to_not_dir(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(outside)
    (tmp_path / "root" / "file").write_text("x")
    fds, root = _fds(tmp_path / "root")
    seen: list[bytes] = []

    def not_dir(fd: int, parts: Sequence[bytes]) -> int:
        seen.append(b"/".join(parts))
        raise PermissionError("refused")

    for name in (b"link", b"file"):
        with pytest.raises(PermissionError):
            fds.get([name, b"child"], None, not_dir)
    assert seen == [b"link", b"file"]
    assert os.listdir(outside) == []
    fds.drop()
    os.close(root)


def test_lru_limit_and_drop_under(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"d{i}" / "sub").mkdir(parents=True)
    fds, root = _fds(tmp_path, limit=4)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(6):
        fds.get([f"d{i}".encode(), b"sub"], None, _refuse)
    assert len(fds._fds) == 4  # the bound is the point
    assert len(os.listdir("/proc/self/fd")) - before == 4  # evicted fds were closed
    fds.drop(under=b"d5")
    assert not any(k == b"d5" or k.startswith(b"d5/") for k in fds._fds)
    fds.drop()
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(root)
