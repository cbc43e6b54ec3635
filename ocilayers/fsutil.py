"""File-system helpers every level shares: the dir-open flags, atomic writes (temp name, then
rename), and removing a tree as a loop with one dir open at a time, never following a symlink.

A layer may hold a path up to PATH_MAX deep (2000 nested one-letter dirs). Python 3.11's
`shutil.rmtree` recurses once per level and ends in RecursionError near 1000, and holding an fd
per level would run into a 1024 fd limit; this goes down by name and up by `..`, checking
that `..` is the dir it came from.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import IO, Any

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""Open a dir to walk or resolve from: never through a symlink, never inherited by a child."""


@contextlib.contextmanager
def atomic_output(path: str | Callable[[], str], mode: int = 0o644, *, prefix: str = ".tmp-",
                  dir: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file to fill; on success it replaces `path` in one rename, so readers never
    see a partial file. On any failure the temp file is removed and `path` is untouched.

    `path` may be a callable, asked for the name once the file is written (a blob named by
    its digest); the temp file is then made in `dir`."""
    where = dir if callable(path) else os.path.dirname(os.path.abspath(path))
    import tempfile  # (lazy: ~9 ms that a read-only command need not pay)

    fd, tmp = tempfile.mkstemp(dir=where, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, mode)
        os.replace(tmp, path() if callable(path) else path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (see `atomic_output`)."""
    with atomic_output(path, mode) as f:
        f.write(data)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _writable(dfd: int, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Run `fn`; on EACCES (not root, a read-only dir such as a layer's 0555 one) make the
    dir `dfd` writable and searchable, and run it once more."""
    try:
        fn(*args, **kwargs)
    except PermissionError:
        os.fchmod(dfd, 0o700)
        fn(*args, **kwargs)


def _open_dir(dfd: int, name: bytes) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dfd)
    except PermissionError as exc:  # a dir without r or x for us (not root): ours to remove
        try:
            os.chmod(name, 0o700, dir_fd=dfd, follow_symlinks=False)
        except (ValueError, NotImplementedError):  # a symlink by now (fchmodat refuses those)
            raise exc from None
        return os.open(name, DIR_FLAGS, dir_fd=dfd)


def _empty_files(fd: int) -> list[bytes]:
    """Unlink everything in the dir `fd` but its subdirs, and name those."""
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(name)
            else:
                _writable(fd, os.unlink, name, dir_fd=fd)
    return subdirs


def remove_at(dfd: int, name: str | bytes, st: os.stat_result | None = None) -> None:
    """Remove `name` from the dir `dfd`: a file, symlink or node, or a dir with all below it.
    `st` is its lstat, if the caller has it already.

    Raises FileNotFoundError if `name` is not there, and OSError (ESTALE) if a dir it is
    emptying is moved elsewhere meanwhile."""
    name = os.fsencode(name)
    if st is None:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        _writable(dfd, os.unlink, name, dir_fd=dfd)
        return
    cur = _open_dir(dfd, name)
    try:
        # The dirs from `name` down to `cur`: name, identity, subdirs still to remove.
        chain: list[tuple[bytes, tuple[int, int], list[bytes]]] = [
            (name, _ident(cur), _empty_files(cur))]
        while True:
            todo = chain[-1][2]
            if todo:
                sub = todo.pop()
                try:
                    nfd = _open_dir(cur, sub)
                except FileNotFoundError:
                    continue
                os.close(cur)
                cur = nfd
                chain.append((sub, _ident(cur), _empty_files(cur)))
                continue
            again = _empty_files(cur)  # anything that came meanwhile
            if again:
                todo.extend(again)
                continue
            done = chain.pop()[0]
            if not chain:
                _writable(dfd, os.rmdir, done, dir_fd=dfd)
                return
            up = os.open(b"..", DIR_FLAGS, dir_fd=cur)
            os.close(cur)
            cur = up
            if _ident(cur) != chain[-1][1]:
                raise OSError(errno.ESTALE, "a directory moved while it was being removed",
                              os.fsdecode(done))
            _writable(cur, os.rmdir, done, dir_fd=cur)
    finally:
        os.close(cur)


def rmtree(path: str | bytes) -> None:
    """Remove `path` and everything below it (a symlink at `path` is removed, not followed).
    Raises FileNotFoundError if it is not there."""
    path = os.fsencode(path)
    parent, name = os.path.split(path.rstrip(b"/"))
    pfd = os.open(parent or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_at(pfd, name)
    finally:
        os.close(pfd)


_MAX_LINKS = 40  # as the kernel's path walk (ELOOP after 40 symlinks)


def _file_or_dir(mode: int, path: str) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OSError(errno.EINVAL, "not a regular file or directory", path)


def open_in_root(root: str, path: str, flags: int = os.O_RDONLY) -> int:
    """Open `path` as a process chrooted at `root` would: every component is resolved from a
    dir fd with O_NOFOLLOW, a symlink is followed by restarting from `root` (absolute target)
    or from the dir it is in, and `..` never climbs above `root`. So a symlinked
    `/etc/passwd` in a container's rootfs resolves inside it, never on the host. Only a
    regular file or a dir is opened (else OSError(EINVAL)), with O_NONBLOCK added. Returns
    an fd (the caller closes it); raises FileNotFoundError, NotADirectoryError, or
    OSError(ELOOP)."""
    root_fd = os.open(root, DIR_FLAGS)
    stack: list[int] = []  # fds of the dirs walked into, below the root
    try:
        todo = [p for p in path.split("/") if p not in ("", ".")]
        links = 0
        while True:
            cur = stack[-1] if stack else root_fd
            if not todo:
                return os.dup(cur) if flags & os.O_DIRECTORY else os.open(".", flags,
                                                                        dir_fd=cur)
            comp = todo.pop(0)
            if comp == "..":
                if stack:
                    os.close(stack.pop())
                continue
            last = not todo
            st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = os.readlink(comp, dir_fd=cur)
                todo = [p for p in target.split("/") if p not in ("", ".")] + todo
                if target.startswith("/"):
                    while stack:
                        os.close(stack.pop())
                continue
            if last:
                # Never open what the rootfs has there but a file or dir: a FIFO would block
                # for ever, and opening a device node (a watchdog, a tape) as root acts on the
                # host. O_NONBLOCK and the fstat after cover a swap since the stat.
                _file_or_dir(st.st_mode, path)
                fd = os.open(comp, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=cur)
                try:
                    _file_or_dir(os.fstat(fd).st_mode, path)
                except OSError:
                    os.close(fd)
                    raise
                return fd
            stack.append(os.open(comp, DIR_FLAGS, dir_fd=cur))
    finally:
        for d in stack:
            os.close(d)
        os.close(root_fd)
