"""A container's init layer, as dockerd's setupInitLayer makes it, written straight into a
diff dir: the merged view of the image's lower diff dirs is read (whiteouts and opaque dirs
resolved as overlayfs does), never mounted.

What it holds: `/.dockerenv`, `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname` and
`/dev/console` are always empty regular files (0755, 0:0), and `/etc/mtab` always a symlink
to `/proc/mounts`, whatever the image has there (dockerd unlinks every non-directory on the
way first); `/dev/pts`, `/dev/shm`, `/proc` and `/sys` are dirs (0755, 0:0) made only where
the image has nothing. A parent dir the init layer must hold takes the image's mode, owner
and xattrs for that dir (what overlayfs's copy-up gives dockerd); a missing one is made 0755,
0:0. In a set-group-ID dir a new dir keeps the bit and `/etc/mtab` the dir's group, as there."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence

from ocilayers.whiteout import TRUSTED, OverlayFormat, is_whiteout_stat, unescape_xattr

FILE, DIR = "file", "dir"
# path -> what it must be: a file, a dir, or a symlink's target (dockerd's initlayer table).
INIT_PATHS: dict[str, str] = {
    "/dev/pts": DIR, "/dev/shm": DIR, "/proc": DIR, "/sys": DIR,
    "/.dockerenv": FILE, "/etc/resolv.conf": FILE, "/etc/hosts": FILE, "/etc/hostname": FILE,
    "/dev/console": FILE, "/etc/mtab": "/proc/mounts",
}


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def merged_lstat(lowers: Sequence[str | bytes], parts: Sequence[bytes],
                 fmt: OverlayFormat = TRUSTED) -> os.stat_result | None:
    """What the overlay of `lowers` (diff dirs, top-most first) shows at `parts`, without
    following a symlink at any level; None where it shows nothing."""
    found = merged_find(lowers, parts, fmt)
    return None if found is None else found[0]


def merged_find(lowers: Sequence[str | bytes], parts: Sequence[bytes],
                fmt: OverlayFormat = TRUSTED) -> tuple[os.stat_result, bytes] | None:
    """`merged_lstat`, with the path in the lower diff dir that holds what is shown."""
    name = fmt.opaque_xattr
    for lower in lowers:
        cur = os.fsencode(lower)
        opaque_above = False  # an opaque dir of this layer hides the layers below it
        for depth, comp in enumerate(parts):
            cur = os.path.join(cur, comp)
            st = _lstat(cur)
            if st is None:
                if opaque_above:
                    return None
                break  # this layer has nothing here: a lower one may
            if is_whiteout_stat(st):
                return None
            if depth == len(parts) - 1:
                return st, cur
            if not stat.S_ISDIR(st.st_mode):
                return None  # a non-directory above the path hides everything below
            with contextlib.suppress(OSError):
                opaque_above = opaque_above or os.getxattr(
                    cur, name, follow_symlinks=False) == b"y"
    return None


def _copy_xattrs(src: bytes, dst: bytes) -> None:
    """The image's xattrs of a dir, as overlayfs's copy-up takes them: all but the overlay
    bookkeeping of the lower (an image's own, escaped, `*.overlay.overlay.X` go along)."""
    with contextlib.suppress(OSError):
        for key in os.listxattr(src, follow_symlinks=False):
            if unescape_xattr(key) is None:
                continue
            with contextlib.suppress(OSError):
                os.setxattr(dst, key, os.getxattr(src, key, follow_symlinks=False),
                            follow_symlinks=False)


def _setgid_dir(path: bytes) -> os.stat_result | None:
    """The dir at `path` if it has the set-group-ID bit (what it gives a new entry), else
    None."""
    st = os.lstat(path)
    return st if st.st_mode & stat.S_ISGID else None


def build_init_layer(diff: str, lowers: Sequence[str | bytes],
                     fmt: OverlayFormat = TRUSTED) -> None:
    """Fill the empty dir `diff` with the init layer of an image whose layers are `lowers`
    (diff dirs, top-most first)."""
    root = os.fsencode(diff)
    for path, kind in INIT_PATHS.items():
        parts = [p.encode() for p in path.strip("/").split("/")]
        # Parent dirs: the image's (its mode and owner), or a new 0755 root-owned one where
        # the image has none, or has a non-directory (dockerd unlinks it first).
        for depth in range(1, len(parts)):
            here = os.path.join(root, *parts[:depth])
            if _lstat(here) is not None:
                continue
            found = merged_find(lowers, parts[:depth], fmt)
            if found is not None and stat.S_ISDIR(found[0].st_mode):
                pst, src = found
                os.mkdir(here, 0o700)
                os.chown(here, pst.st_uid, pst.st_gid)
                os.chmod(here, stat.S_IMODE(pst.st_mode))
                _copy_xattrs(src, here)
            else:
                os.mkdir(here, 0o755)
                os.chown(here, 0, 0)
                os.chmod(here, 0o755)
        target = os.path.join(root, *parts)
        st = merged_lstat(lowers, parts, fmt)
        # A new entry in a set-group-ID dir: a dir inherits the bit (dockerd's chown to 0:0
        # keeps it), a symlink the dir's group (dockerd does not chown it).
        sgid = _setgid_dir(os.path.dirname(target))
        if kind == DIR:
            if st is not None and stat.S_ISDIR(st.st_mode):
                continue  # made only where the image lacks it
            os.mkdir(target, 0o755)
            os.chown(target, 0, 0)
            os.chmod(target, 0o755 | (stat.S_ISGID if sgid else 0))
        elif kind == FILE:
            if st is not None and stat.S_ISDIR(st.st_mode):
                continue  # dockerd's Stat finds the dir and leaves it (only non-dirs unlink)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o755)
            try:
                os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o755)
            finally:
                os.close(fd)
        else:
            if st is not None and stat.S_ISDIR(st.st_mode):
                continue
            os.symlink(kind, target)
            os.chown(target, 0, sgid.st_gid if sgid else 0, follow_symlinks=False)
