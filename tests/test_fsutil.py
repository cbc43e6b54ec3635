"""fsutil: removing trees without recursion, never through a symlink, read-only dirs included."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from ocilayers import fsutil
from ocilayers.fsutil import remove_at, rmtree

DEPTH = 2000  # a layer path may be this deep (PATH_MAX of one-letter dirs); Python's limit: 1000


def _deep(root: Path, depth: int = DEPTH) -> None:
    """`root/d/d/.../d` with a file and a symlink at each level, made through fds (the paths
    grow past PATH_MAX's reach of a shell, and mkdir(parents=True) recurses)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            wfd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.close(wfd)
            os.symlink("/", "up", dir_fd=fd)
    finally:
        os.close(fd)


def test_deep_tree(tmp_path: Path) -> None:
    _deep(tmp_path / "t")
    rmtree(tmp_path / "t")
    assert os.listdir(tmp_path) == []


def test_wide_tree_and_what_is_in_it(tmp_path: Path) -> None:
    t = tmp_path / "t"
    for i in range(300):
        (t / f"s{i}" / "sub").mkdir(parents=True)
        (t / f"s{i}" / "sub" / "f").write_bytes(b"x")
        (t / f"f{i}").write_bytes(b"y")
    os.mkfifo(t / "fifo")
    (t / "s0" / "hard").hardlink_to(t / "f0")
    rmtree(str(t))
    assert os.listdir(tmp_path) == []


def test_symlinks_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep").write_bytes(b"keep")
    t = tmp_path / "t"
    (t / "a").mkdir(parents=True)
    (t / "a" / "to-dir").symlink_to(outside)
    (t / "to-sub").symlink_to(outside / "sub")
    (tmp_path / "top-link").symlink_to(outside)
    rmtree(t)
    rmtree(tmp_path / "top-link")  # the link itself, not what it points at
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert (outside / "sub" / "keep").read_bytes() == b"keep"


def test_a_file_and_a_missing_name(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_at(fd, "f")
        with pytest.raises(FileNotFoundError):
            remove_at(fd, b"f")
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        rmtree(tmp_path / "nothing")


def test_read_only_dirs_of_an_unprivileged_owner() -> None:
    """A layer unpacked rootless has 0555 dirs (and may have 0000 ones): its owner can still
    remove them. Run as that owner (uid 65534) in a child process, in a dir it can reach
    (pytest's tmp dirs are 0700 root's)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user for the test")
    base = Path(tempfile.mkdtemp(prefix="ocilayers-test-"))
    try:
        os.chmod(base, 0o755)
        t = base / "t"
        (t / "ro" / "sub").mkdir(parents=True)
        (t / "ro" / "sub" / "f").write_bytes(b"x")
        (t / "closed" / "inner").mkdir(parents=True)
        (t / "closed" / "inner" / "g").write_bytes(b"y")
        for dirpath, _dirnames, filenames in os.walk(base):
            os.lchown(dirpath, 65534, 65534)
            for n in filenames:
                os.lchown(os.path.join(dirpath, n), 65534, 65534)
        os.chmod(t / "ro" / "sub", 0o555)
        os.chmod(t / "ro", 0o555)
        os.chmod(t / "closed", 0o000)
        os.chmod(t, 0o555)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                rmtree(t)
                code = 0
            except BaseException as exc:
                os.write(2, f"child: {exc!r}\n".encode())
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.listdir(base) == []
    finally:
        rmtree(base)


def test_a_dir_moved_away_while_emptied_is_left_alone(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Going up is by `..`, checked against the dir it came from: if a dir being emptied is
    moved elsewhere meanwhile, its new parent is not touched (ESTALE)."""
    t = tmp_path / "t"
    (t / "a" / "b").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    b_ino = os.stat(t / "a" / "b").st_ino
    real = fsutil._empty_files

    def moving(fd: int) -> list[bytes]:
        if os.fstat(fd).st_ino == b_ino and (t / "a").exists():
            os.rename(t / "a", elsewhere / "a")  # while inside t/a/b
        return real(fd)

    monkeypatch.setattr(fsutil, "_empty_files", moving)
    with pytest.raises(OSError) as info:
        rmtree(t)
    assert info.value.errno == errno.ESTALE
    assert (elsewhere / "keep").is_dir()  # the dir it came up into is not emptied
    assert stat.S_ISDIR(os.lstat(elsewhere / "a").st_mode)  # nor removed from its new parent
