"""`DirFds`: the directories inside one root dir, opened component by component from a dir fd
with O_NOFOLLOW (never through a symlink), and the last few kept open in an LRU cache.

The applier (extract) resolves every entry's parent through it: a tar's entries come depth
first, so the parent, or an ancestor close to it, is almost always cached. What to do when a
component is missing or is not a directory is the caller's: `get` asks its callbacks, which
may raise `NotDir` or `SymlinkParent`.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ocilayers.errors import UnsafeEntryError
from ocilayers.fsutil import DIR_FLAGS

# (parent fd, the path's components up to and including the one to make or replace) -> the
# new dir's fd, which `get` then owns.
Resolve = Callable[[int, Sequence[bytes]], int]


class NotDir(FileNotFoundError):
    """A path's parent exists but is not a directory (so the path cannot exist)."""


class SymlinkParent(UnsafeEntryError):
    """A path's parent (or one above it) is a symlink: nothing is written through it."""


def lstat_at(name: bytes, dir_fd: int) -> os.stat_result | None:
    """`name` in `dir_fd`, not followed if a symlink; None if there is nothing."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


class DirFds:
    """Dir fds under `root_fd` by path (components joined with `/`), at most `limit` cached.
    `root_fd` stays the caller's to close."""

    def __init__(self, root_fd: int, limit: int) -> None:
        self.root_fd = root_fd
        self.limit = limit
        self._fds: OrderedDict[bytes, int] = OrderedDict()  # dir path -> fd, LRU

    def drop(self, under: bytes | None = None) -> None:
        """Forget cached dir fds: all, or those at `under` and below (a dir being removed)."""
        if under is None:
            doomed = list(self._fds)
        else:
            prefix = under + b"/"
            doomed = [k for k in self._fds if k == under or k.startswith(prefix)]
        for key in doomed:
            os.close(self._fds.pop(key))

    def put(self, key: bytes, fd: int) -> None:
        """Cache `fd` (now owned here) as the dir at `key`."""
        old = self._fds.pop(key, None)
        if old is not None:
            os.close(old)
        self._fds[key] = fd
        while len(self._fds) > self.limit:
            os.close(self._fds.popitem(last=False)[1])

    def cached(self, parts: Sequence[bytes], cache: bool = True) -> int | None:
        """The fd of `parts` if it is cached (owned by the cache with `cache`, else a dup of
        it the caller owns), else None. `get` looks here first; so can a caller that would
        build its callbacks for each call, and then `walk` on a miss."""
        key = b"/".join(parts)
        hit = self._fds.get(key)
        if hit is None:
            return None
        self._fds.move_to_end(key)
        return hit if cache else os.dup(hit)

    def get(self, parts: Sequence[bytes], missing: Resolve | None, not_dir: Resolve,
            cache: bool = True) -> int:
        """fd of the directory `parts` inside the root, never following a symlink.

        A component that does not exist is made by `missing` (without it: FileNotFoundError);
        one that is a symlink or not a directory (ELOOP, ENOTDIR) goes to `not_dir`, which
        returns a dir fd or raises. With `cache`, the fd is owned by the cache (do not close
        it; it stays valid until the next few dozen lookups). Without, it is the caller's."""
        hit = self.cached(parts, cache)
        return hit if hit is not None else self.walk(parts, missing, not_dir, cache)

    def walk(self, parts: Sequence[bytes], missing: Resolve | None, not_dir: Resolve,
             cache: bool = True) -> int:
        """`get` for a `parts` not cached itself (see `cached`)."""
        key = b"/".join(parts)
        # Walk from the deepest cached ancestor (tar order is depth first: usually the parent).
        # Ancestor keys are prefixes of `key` (no list slicing and joining per level: paths
        # may be 2000 levels deep), and the dirs passed on the way are cached too.
        start = 0
        fd = self.root_fd
        end = len(key)
        for i in range(len(parts) - 1, 0, -1):
            end = key.rfind(b"/", 0, end)
            anc = self._fds.get(key[:end])
            if anc is not None:
                fd = os.dup(anc)
                start = i
                break
        try:
            for i in range(start, len(parts)):
                if i > start and i >= len(parts) - self.limit // 2:
                    # (the deepest ones only: one lookup must not evict an fd a caller holds)
                    self.put(b"/".join(parts[:i]), os.dup(fd))
                comp = parts[i]
                try:
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if missing is None:
                        raise
                    nfd = missing(fd, parts[: i + 1])
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    nfd = not_dir(fd, parts[: i + 1])
                if fd != self.root_fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self.root_fd:
                os.close(fd)
            raise
        if fd == self.root_fd:
            fd = os.dup(self.root_fd)
        if cache:
            self.put(key, fd)
        return fd
