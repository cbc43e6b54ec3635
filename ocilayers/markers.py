"""A layer's whiteouts and opaque markers, applied to the dir the layer goes into (for `extract`).

`LayerBook` is what the layer has done so far, by path: what it made, what it whited out, and
which of its paths are now non-directories. `Markers` applies each `.wh.` entry with it, by the
rules in DESIGN.md:
- a marker acts only on lower content, never on an entry of the same layer, whatever the order
  (`.wh.X` beside a same-layer X keeps X, and makes a dir X opaque: it hides the lower X);
- a marker below a non-directory of the same layer hides nothing more: ignored, and counted;
- overlay mode makes a char 0/0 device or the opaque xattr; delete mode removes the lower
  content instead;
- a marker whose path runs into a symlink is refused at the end, unless by then a
  non-directory of the layer stands in its path.

Every path goes through the applier's confined lookup (`Tree.dirfd`): never through a symlink.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Protocol

from ocilayers.dirfds import NotDir, SymlinkParent, lstat_at
from ocilayers.errors import UnsafeEntryError
from ocilayers.filewriters import try_chown
from ocilayers.fsutil import DIR_FLAGS
from ocilayers.tarstream import TarEntry
from ocilayers.whiteout import is_whiteout_stat


def join(parts: Sequence[bytes]) -> bytes:
    return b"/".join(parts)


class LayerBook:
    """What the layer has done so far, by path (components joined with `/`)."""

    __slots__ = ("created", "non_dirs", "whited")

    def __init__(self) -> None:
        self.created: set[bytes] = set()  # made by the layer (entries and implicit parents)
        self.whited: set[bytes] = set()  # whited out by the layer (overlay mode)
        # Paths whose latest entry in the layer is a non-directory (symlink, file, node,
        # hardlink): a marker below one that is still there hides nothing more.
        self.non_dirs: set[bytes] = set()

    def mark_parents(self, parts: Sequence[bytes]) -> None:
        """Dirs a layer writes into are the layer's too: an opaque marker or whiteout of the
        same layer must not delete them (overlayfs keeps them in the upper dir)."""
        for i in range(len(parts) - 1, 0, -1):
            p = join(parts[:i])
            if p in self.created:
                break
            self.created.add(p)


class Tree(Protocol):
    """The applier's confined access to the layer's dir."""

    def dirfd(self, parts: Sequence[bytes], display: str, create: bool,
              cache: bool = True) -> int:
        """The dir `parts`' fd, made when `create` (cached fds stay the tree's, others are the
        caller's to close); NotDir, FileNotFoundError or SymlinkParent when it cannot be."""
        ...

    def remove(self, pfd: int, base: bytes, st: os.stat_result, path: bytes) -> None:
        """Remove `base` (at `path`) from `pfd`, with what the applier knows of it."""
        ...


class Markers:
    """The whiteouts and opaque markers of one layer; `overlay` or delete mode."""

    def __init__(self, tree: Tree, book: LayerBook, *, overlay: bool, opaque_name: str,
                 rootless: bool) -> None:
        self.tree = tree
        self.book = book
        self.overlay = overlay
        self.opaque_name = opaque_name
        self.rootless = rootless
        self.opaque_dirs: set[bytes] = set()  # dirs this layer made opaque
        self.whiteout_devs: dict[bytes, set[bytes]] = {}  # overlay: dir -> whiteouts made in it
        # Markers applied, by the dir holding them: a non-directory of the layer may still come
        # over that dir (or one above it) later in the tar.
        self.marker_dirs: dict[bytes, int] = {}
        # Markers whose path ran into a symlink not (yet) of this layer: refused at the end
        # unless by then a non-directory of the layer stands in their path.
        self.blocked: list[tuple[list[bytes], SymlinkParent]] = []
        self.root_opaque = False  # overlay: an opaque marker on the layer root, for the caller

    def apply(self, kind: str, parent: list[bytes], target: bytes, entry: TarEntry,
              display: str) -> bool:
        """A whiteout (`kind` "whiteout", of `target`) or opaque marker in the dir `parent`:
        False when ignored (below a non-directory of this layer), else applied; one whose path
        runs into a symlink is decided in settle()."""
        if parent and self._below_own_non_dir(parent, display):
            return False
        try:
            if kind == "opaque":
                self._opaque(parent, display)
            else:
                self._whiteout(parent, target, entry, display)
        except SymlinkParent as exc:
            # Nothing was written. A later entry of the layer may still put a non-directory
            # over the symlink (or above it): then this marker hides nothing; if not, refused.
            self.blocked.append((parent, exc))
            return True
        if parent:
            key = join(parent)
            self.marker_dirs[key] = self.marker_dirs.get(key, 0) + 1
        return True

    def settle(self) -> int:
        """At the end of the layer: how many markers, seen before the non-directory of this
        layer that stands over their dir (whiteouts apply to lower content whatever the
        order), turn out to hide nothing; those a symlink blocked are refused unless such a
        non-directory now stands in their path."""
        ignored = 0
        for parent, exc in self.blocked:
            if not self._below_own_non_dir(parent, str(exc)):
                raise exc
            ignored += 1
        if not self.book.non_dirs:
            return ignored
        for key, count in self.marker_dirs.items():
            if self._below_own_non_dir(key.split(b"/"), key.decode("utf-8", "backslashreplace")):
                ignored += count
        return ignored

    def set_opaque_at(self, pfd: int, base: bytes, path: bytes) -> None:
        """Make the dir `base` in `pfd` (at `path`) opaque: whiteouts the layer made below it
        hide nothing more, and go."""
        fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
        try:
            os.setxattr(fd, self.opaque_name, b"y")
        finally:
            os.close(fd)
        if path not in self.opaque_dirs:
            self.opaque_dirs.add(path)
            self._drop_redundant_whiteouts(path)

    def dir_removed(self, path: bytes) -> None:
        """The dir at `path` is being removed: the whiteouts made in it go with it."""
        prefix = path + b"/"
        for p in [p for p in self.whiteout_devs if p == path or p.startswith(prefix)]:
            del self.whiteout_devs[p]

    # -- the markers --

    def _below_own_non_dir(self, parent: Sequence[bytes], display: str) -> bool:
        """Is the dir `parent`, or one above it, a non-directory this layer made that is still
        there? Checked from the top down, never through a symlink: anything else in the way
        (a lower symlink or file, a missing dir) answers False and is the caller's to handle."""
        non_dirs = self.book.non_dirs
        if not non_dirs:
            return False
        key = join(parent)
        end = -1
        for i, comp in enumerate(parent):
            end += len(comp) + 1
            if key[:end] not in non_dirs:
                continue
            try:
                pfd = self.tree.dirfd(parent[:i], display, create=False)
            except (FileNotFoundError, UnsafeEntryError):
                return False
            st = lstat_at(comp, pfd)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                return True
            # (a dir or nothing there now: the layer's non-directory was removed since)
        return False

    def _inside_opaque(self, parent: Sequence[bytes]) -> bool:
        if self.root_opaque:
            return True
        return any(join(parent[:i]) in self.opaque_dirs for i in range(len(parent) + 1))

    def _whiteout(self, parent: list[bytes], target: bytes, entry: TarEntry,
                  display: str) -> None:
        path = join([*parent, target])
        self.book.mark_parents([*parent, target])
        if path in self.book.created:
            # `.wh.X` beside a same-layer X: X stays; it hides the lower X, so a dir is opaque.
            self.book.whited.add(path)
            self._same_layer_dir_hides_lower(parent, target, path, display)
            return
        if self.overlay:
            if self._inside_opaque(parent) or self._under_non_dir(parent, display):
                return  # redundant: something of this layer already hides everything below
            self.book.whited.add(path)
            pfd = self.tree.dirfd(parent, display, create=True)
            existing = lstat_at(target, pfd)
            if existing is not None:
                self.tree.remove(pfd, target, existing, path)
            os.mknod(target, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            try_chown(lambda: os.chown(target, entry.uid, entry.gid, dir_fd=pfd,
                                       follow_symlinks=False), self.rootless)
            self.whiteout_devs.setdefault(join(parent), set()).add(target)
            return
        try:
            pfd = self.tree.dirfd(parent, display, create=False)
        except FileNotFoundError:
            return  # nothing below to hide
        existing = lstat_at(target, pfd)
        if existing is not None:
            self.tree.remove(pfd, target, existing, path)

    def _same_layer_dir_hides_lower(self, parent: list[bytes], target: bytes, path: bytes,
                                    display: str) -> None:
        pfd = self.tree.dirfd(parent, display, create=False)
        st = lstat_at(target, pfd)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return
        if self.overlay:
            self.set_opaque_at(pfd, target, path)
        else:
            self._clear_lower(list(path.split(b"/")), display)

    def _under_non_dir(self, parent: Sequence[bytes], display: str) -> bool:
        """Is the dir `parent` (or one above it) a non-directory, such as a file or whiteout
        this layer made? A symlink there is refused: nothing is written through one."""
        try:
            fd = self.tree.dirfd(parent, display, create=False, cache=False)
        except NotDir:
            return True
        except FileNotFoundError:
            return False
        os.close(fd)
        return False

    def _drop_redundant_whiteouts(self, path: bytes) -> None:
        """Whiteouts this layer made below a dir it has now made opaque hide nothing more."""
        prefix = path + b"/"
        for d in [d for d in self.whiteout_devs
                  if not path or d == path or d.startswith(prefix)]:
            names = self.whiteout_devs.pop(d)
            parts = d.split(b"/") if d else []
            try:
                dfd = self.tree.dirfd(parts, d.decode("utf-8", "backslashreplace"),
                                      create=False)
            except FileNotFoundError:
                continue
            for name in names:
                st = lstat_at(name, dfd)
                if st is not None and is_whiteout_stat(st):
                    os.unlink(name, dir_fd=dfd)

    def _opaque(self, parent: list[bytes], display: str) -> None:
        path = join(parent)
        if not parent:
            if self.overlay:
                self.root_opaque = True  # expanded by the applier, where lowers are known
                self._drop_redundant_whiteouts(b"")
            else:
                self._clear_lower([], display)
            return
        if self.overlay:
            if self._under_non_dir(parent, display):
                return  # a marker under a file or whiteout of this layer hides nothing more
            gfd = self.tree.dirfd(parent[:-1], display, create=True)
            if lstat_at(parent[-1], gfd) is None:
                self.tree.dirfd(parent, display, create=True)
                gfd = self.tree.dirfd(parent[:-1], display, create=True)
            self.set_opaque_at(gfd, parent[-1], path)
        else:
            self._clear_lower(parent, display)

    def _clear_lower(self, parts: list[bytes], display: str) -> None:
        """Delete mode: remove everything under `parts` that this layer did not make (a loop
        over the dirs the layer made, not recursion: they may be 2000 deep)."""
        todo = [parts]
        while todo:
            parts = todo.pop()
            try:
                dfd = self.tree.dirfd(parts, display, create=False, cache=False)
            except FileNotFoundError:
                continue
            try:
                names = os.listdir(dfd)
            finally:
                os.close(dfd)
            prefix = join(parts)
            for name in names:
                bname = os.fsencode(name)
                child = prefix + b"/" + bname if prefix else bname
                dfd = self.tree.dirfd(parts, display, create=False)
                st = lstat_at(bname, dfd)
                if st is None:
                    continue
                if child not in self.book.created:
                    self.tree.remove(dfd, bname, st, child)
                elif stat.S_ISDIR(st.st_mode):
                    todo.append([*parts, bname])
