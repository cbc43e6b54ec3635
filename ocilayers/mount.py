"""Overlay mounts as plain data, and the mount calls: mount(2) and umount2(2) themselves (an
errno per failure, where mount(8) gives only text), the lowerdir option with dockerd's
short-`l/`-name rule, read-only and read-write, `userxattr`, and what is mounted where
(`/proc/self/mountinfo`)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ocilayers.errors import MountError

if TYPE_CHECKING:
    import ctypes

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2


@dataclass(frozen=True)
class OverlayMount:
    """An overlay of `lowers` (names relative to `base`, such as `l/<LINK>`, top-most first),
    read-only without `upper`, read-write with `upper` and `work` (absolute paths)."""

    base: str
    lowers: tuple[str, ...]
    upper: str | None = None
    work: str | None = None
    userxattr: bool = False

    @property
    def flags(self) -> int:
        """mount(2) flags: a view without an upper dir is read-only (MS_RDONLY, as mount(8)
        turns `-o ro` into; the data string does not carry it)."""
        return 0 if self.upper else MS_RDONLY

    def options(self, *, relative: bool) -> str:
        """The data string; lowers absolute, or relative to `base` (mount from inside it)."""
        lowers = self.lowers if relative else [os.path.join(self.base, x) for x in self.lowers]
        opts = ["lowerdir=" + ":".join(lowers)]
        if self.upper is not None:
            opts += [f"upperdir={self.upper}", f"workdir={self.work}"]
        if self.userxattr:
            opts.append("userxattr")
        return ",".join(opts)


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo (proc(5))."""

    mount_point: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


def mounts(pid: str = "self") -> list[MountInfo]:
    """Every mount of the mount namespace `pid` is in, in mount order."""
    out = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) < 6 or len(rest) < 3:
                continue
            out.append(MountInfo(_unescape(fields[4]), rest[0], _unescape(rest[1]),
                                 fields[5]))
    return out


def mounted_at(path: str) -> MountInfo | None:
    """The top-most mount whose mount point is `path` (resolved), or None."""
    real = os.path.realpath(path)
    found = None
    for m in mounts():
        if m.mount_point == real:
            found = m
    return found


def mount_namespace(pid: str = "self") -> str:
    """The mount namespace of `pid`, as its /proc link reads (`mnt:[4026531841]`)."""
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _libc() -> ctypes.CDLL:
    import ctypes  # (here: a command that mounts nothing does not pay for it)

    return ctypes.CDLL(None, use_errno=True)


def _sys_mount(source: str | None, target: str, fstype: str | None, flags: int,
               data: str | None, what: str) -> None:
    import ctypes

    enc = [None if x is None else os.fsencode(x) for x in (source, target, fstype, data)]
    if _libc().mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        err = ctypes.get_errno()
        hint = ""
        if err == errno.EINVAL and fstype == "overlay":
            hint = " (overlayfs writes its reason to the kernel log: see dmesg)"
        elif err == errno.EPERM:
            hint = " (mounting needs root, or a user namespace)"
        raise MountError(f"{what}: {os.strerror(err)}{hint}")


def check_target(target: str) -> str:
    """The absolute target, after the checks that can be made before mounting: it exists, is
    a directory, and nothing is mounted on it yet."""
    path = os.path.abspath(target)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{target}: the mount target does not exist") from None
    except NotADirectoryError:
        raise MountError(f"{target}: a parent of the mount target is not a directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{target}: the mount target is not a directory")
    busy = mounted_at(path)
    if busy is not None:
        raise MountError(f"{target}: already a mount point ({busy.fstype} {busy.source} is "
                         "mounted there); refusing to stack another mount on it")
    return path


def _check_dirs(m: OverlayMount) -> None:
    for name in m.lowers:
        if not os.path.isdir(os.path.join(m.base, name)):
            raise MountError(f"lower dir {name} ({os.path.realpath(os.path.join(m.base, name))})"
                             " is missing")
    for what, path in (("upper", m.upper), ("work", m.work)):
        if path is not None and not os.path.isdir(path):
            raise MountError(f"{what} dir {path} is missing")


def mount_overlay(m: OverlayMount, target: str, *, fuse: bool = False) -> None:
    """Mount `m` on `target`. As dockerd does, when the option string with absolute lowers
    would not fit in a page (the kernel's limit for mount data), mount from inside `base`
    with the short relative names (in a child process: the cwd is per process).

    `fuse=True` mounts with fuse-overlayfs instead of the kernel (it shows the owners a
    rootless store recorded). A `userxattr` (rootless) mount the kernel refuses, as one
    without `userxattr` overlays would, falls back to fuse-overlayfs where it is installed."""
    if m.upper is None and len(m.lowers) == 1 and not fuse:
        raise ValueError("overlayfs needs two lowers for a read-only mount; bind-mount one")
    path = check_target(target)
    _check_dirs(m)
    if fuse:
        mount_fuse_overlay(m, path)
        return
    try:
        _kernel_overlay(m, path, target)
    except MountError as exc:
        import shutil

        if m.userxattr and shutil.which("fuse-overlayfs"):
            try:
                mount_fuse_overlay(m, path)
            except MountError as fexc:
                raise MountError(f"{exc}; fuse-overlayfs failed too: {fexc}") from None
            return
        raise


def _kernel_overlay(m: OverlayMount, path: str, target: str) -> None:
    what = f"mount overlay on {target}"
    opts = m.options(relative=False)
    if len(opts) < os.sysconf("SC_PAGE_SIZE") - 1:
        _sys_mount("overlay", path, "overlay", m.flags, opts, what)
        return
    _in_child(m.base, lambda: _sys_mount("overlay", path, "overlay", m.flags,
                                         m.options(relative=True), what), what)


def mount_fuse_overlay(m: OverlayMount, path: str) -> None:
    """Mount `m` on `path` with fuse-overlayfs (containers/fuse-overlayfs): lowers resolved to
    absolute paths, `squash_to_root` never, its own process serving the mount until unmount."""
    import shutil
    import subprocess

    tool = shutil.which("fuse-overlayfs")
    if tool is None:
        raise MountError("fuse-overlayfs is not installed (Debian: apt-get install "
                         "fuse-overlayfs)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("cannot open /dev/fuse (it must be mode 0666 for rootless FUSE "
                         "mounts, as on a normal Debian system: chmod 0666 /dev/fuse)")
    lowers = [os.path.realpath(os.path.join(m.base, x)) for x in m.lowers]
    opts = ["lowerdir=" + ":".join(lowers)]
    if m.upper is not None:
        opts += [f"upperdir={m.upper}", f"workdir={m.work}"]
    res = subprocess.run([tool, "-o", ",".join(opts), path], stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=60)
    if res.returncode != 0:
        lines = res.stderr.decode(errors="replace").strip().splitlines()
        raise MountError(f"fuse-overlayfs on {path}: {lines[-1] if lines else 'failed'}")


def _in_child(cwd: str, call: Callable[[], None], what: str) -> None:
    """Run `call` in a forked child whose cwd is `cwd`; its MountError comes back as ours."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.chdir(cwd)
            call()
        except MountError as exc:
            os.write(w, str(exc).encode()[:4000])
            code = 1
        except BaseException as exc:  # anything else, as text
            os.write(w, f"{what}: {exc}".encode()[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise MountError(msg or f"{what}: failed")


def bind_readonly(source: str, target: str) -> None:
    """A read-only bind mount (a one-layer image's view)."""
    path = check_target(target)
    if not os.path.isdir(source):
        raise MountError(f"layer dir {source} is missing")
    _sys_mount(source, path, None, MS_BIND, None, f"bind-mount {source} on {target}")
    try:
        _sys_mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None,
                   f"make {target} read-only")
    except BaseException:
        unmount(path)
        raise


def unmount(target: str, *, detach: bool = False) -> None:
    """umount2(2) the mount on `target`."""
    import ctypes

    if _libc().umount2(os.fsencode(target), ctypes.c_int(MNT_DETACH if detach else 0)) != 0:
        err = ctypes.get_errno()
        hint = {errno.EBUSY: " (a process is using it)",
                errno.EINVAL: " (not a mount point here: a later mount may hide it, such as the "
                              "bind mount a dockerd started on the store makes of its root)",
                }.get(err, "")
        raise MountError(f"unmount {target}: {os.strerror(err)}{hint}")
