"""markers: a layer's whiteouts and opaque markers on a real dir, through a plain confined tree
(DirFds), apart from the applier. tests/test_extract.py covers them through apply_layer."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ocilayers.dirfds import DirFds, NotDir, SymlinkParent, lstat_at
from ocilayers.fsutil import DIR_FLAGS, remove_at
from ocilayers.markers import LayerBook, Markers
from ocilayers.tarstream import TarEntry
from ocilayers.whiteout import TRUSTED, classify, is_whiteout_stat


class _Tree:
    """The smallest confined tree: DirFds making missing dirs, refusing symlinks."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, DIR_FLAGS)
        self.dirs = DirFds(self.root_fd, 16)
        self.removed: list[bytes] = []

    def dirfd(self, parts: Sequence[bytes], display: str, create: bool,
              cache: bool = True) -> int:
        def missing(fd: int, p: Sequence[bytes]) -> int:
            os.mkdir(p[-1], 0o755, dir_fd=fd)
            return os.open(p[-1], DIR_FLAGS, dir_fd=fd)

        def not_dir(fd: int, p: Sequence[bytes]) -> int:
            if stat.S_ISLNK(os.stat(p[-1], dir_fd=fd, follow_symlinks=False).st_mode):
                raise SymlinkParent(f"'{display}': symlink in the way")
            raise NotDir(2, "not a directory")

        return self.dirs.get(parts, missing if create else None, not_dir, cache)

    def remove(self, pfd: int, base: bytes, st: os.stat_result, path: bytes) -> None:
        self.removed.append(path)
        remove_at(pfd, base, st)

    def close(self) -> None:
        self.dirs.drop()
        os.close(self.root_fd)


@contextlib.contextmanager
def _opened(root: Path, overlay: bool = True) -> Iterator[tuple[Markers, LayerBook, _Tree]]:
    tree = _Tree(root)
    book = LayerBook()
    try:
        yield Markers(tree, book, overlay=overlay, opaque_name=TRUSTED.opaque_xattr,
                      rootless=False), book, tree
    finally:
        tree.close()


def _mark(markers: Markers, name: bytes) -> bool:
    """Apply the marker entry `name` as the applier does: its kind from `classify`."""
    *parent, base = name.split(b"/")
    display = name.decode()
    kind, target = classify(base, display)
    entry = TarEntry(name=name, type=b"0", mode=0o644, uid=os.geteuid(), gid=os.getegid())
    return markers.apply(kind, parent, target, entry, display)


def _root_with_link_out(tmp_path: Path) -> tuple[Path, Path]:
    """A root dir holding `link`, a symlink to a dir outside it; (root, outside)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    return root, outside


def test_mark_parents_adds_each_dir_up_to_one_already_known() -> None:
    book = LayerBook()
    book.created.add(b"a")
    book.mark_parents([b"a", b"b", b"c", b"file"])
    assert book.created == {b"a", b"a/b", b"a/b/c"}


def test_lstat_at_is_none_for_nothing_and_does_not_follow(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("nowhere")
    fd = os.open(tmp_path, DIR_FLAGS)
    try:
        assert lstat_at(b"missing", fd) is None
        st = lstat_at(b"link", fd)
        assert st is not None and stat.S_ISLNK(st.st_mode)
    finally:
        os.close(fd)


def test_overlay_whiteout_is_a_device_and_a_same_layer_dir_goes_opaque(tmp_path: Path) -> None:
    with _opened(tmp_path) as (markers, book, _):
        assert _mark(markers, b"etc/.wh.gone")
        assert is_whiteout_stat(os.lstat(tmp_path / "etc" / "gone"))
        assert b"etc/gone" in book.whited and b"etc" in book.created

        (tmp_path / "etc" / "mine").mkdir()  # made by this layer before its whiteout
        book.created.add(b"etc/mine")
        assert _mark(markers, b"etc/.wh.mine")
        assert (tmp_path / "etc" / "mine").is_dir()  # the layer's own dir stays...
        assert os.getxattr(tmp_path / "etc" / "mine", TRUSTED.opaque_xattr) == b"y"  # opaque


def test_opaque_dir_drops_the_whiteouts_the_layer_made_below_it(tmp_path: Path) -> None:
    with _opened(tmp_path) as (markers, _, _):
        _mark(markers, b"d/sub/.wh.x")
        assert is_whiteout_stat(os.lstat(tmp_path / "d" / "sub" / "x"))
        _mark(markers, b"d/.wh..wh..opq")
        assert os.getxattr(tmp_path / "d", TRUSTED.opaque_xattr) == b"y"
        assert not os.path.lexists(tmp_path / "d" / "sub" / "x")  # hides nothing more
        # and a later whiteout inside the opaque dir is not made at all
        _mark(markers, b"d/.wh.y")
        assert not os.path.lexists(tmp_path / "d" / "y")


def test_a_marker_below_a_non_directory_of_the_layer_is_ignored(tmp_path: Path) -> None:
    with _opened(tmp_path) as (markers, book, _):
        (tmp_path / "f").write_text("x")
        book.created.add(b"f")
        book.non_dirs.add(b"f")
        assert not _mark(markers, b"f/.wh.x")
        assert markers.settle() == 0


def test_a_marker_through_a_symlink_is_refused_at_the_end(tmp_path: Path) -> None:
    root, outside = _root_with_link_out(tmp_path)
    with _opened(root) as (markers, _, _):
        assert _mark(markers, b"link/.wh.x")
        assert os.listdir(outside) == []  # nothing written through it
        with pytest.raises(SymlinkParent):
            markers.settle()


def test_a_blocked_marker_counts_as_ignored_once_the_layer_puts_a_file_there(
        tmp_path: Path) -> None:
    root, _ = _root_with_link_out(tmp_path)
    with _opened(root) as (markers, book, _):
        _mark(markers, b"link/.wh.x")
        (root / "link").unlink()  # a later file of the layer replaces the symlink
        (root / "link").write_text("x")
        book.non_dirs.add(b"link")
        assert markers.settle() == 1


def test_dir_removed_forgets_the_whiteouts_made_in_it(tmp_path: Path) -> None:
    with _opened(tmp_path) as (markers, _, _):
        _mark(markers, b"a/b/.wh.x")
        _mark(markers, b"ab/.wh.y")
        markers.dir_removed(b"a")
        assert set(markers.whiteout_devs) == {b"ab"}  # not a sibling sharing the prefix


def test_delete_mode_clears_lower_content_but_keeps_the_layers_own(tmp_path: Path) -> None:
    (tmp_path / "d" / "old").mkdir(parents=True)
    (tmp_path / "d" / "old" / "f").write_text("lower")
    (tmp_path / "d" / "lowerfile").write_text("lower")
    (tmp_path / "d" / "new").mkdir()
    (tmp_path / "d" / "new" / "g").write_text("ours")
    (tmp_path / "gone").write_text("lower")
    with _opened(tmp_path, overlay=False) as (markers, book, tree):
        book.created.update({b"d", b"d/new", b"d/new/g"})
        _mark(markers, b"d/.wh..wh..opq")
        assert sorted(os.listdir(tmp_path / "d")) == ["new"]
        assert (tmp_path / "d" / "new" / "g").read_text() == "ours"
        _mark(markers, b".wh.gone")
        assert not os.path.lexists(tmp_path / "gone")
        assert sorted(tree.removed) == [b"d/lowerfile", b"d/old", b"gone"]
        assert not book.whited  # delete mode leaves nothing to hide
