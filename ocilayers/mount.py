"""Overlay mounts as plain data, and the mount call: the lowerdir option with dockerd's
short-`l/`-name rule, read-only and read-write, `userxattr`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ocilayers.errors import StoreError


@dataclass(frozen=True)
class OverlayMount:
    """An overlay of `lowers` (names relative to `base`, such as `l/<LINK>`, top-most first),
    read-only without `upper`, read-write with `upper` and `work` (absolute paths)."""

    base: str
    lowers: tuple[str, ...]
    upper: str | None = None
    work: str | None = None
    userxattr: bool = False

    def options(self, *, relative: bool) -> str:
        """The `-o` string; lowers absolute, or relative to `base` (mount from inside it)."""
        lowers = self.lowers if relative else [os.path.join(self.base, x) for x in self.lowers]
        opts = [] if self.upper else ["ro"]
        opts.append("lowerdir=" + ":".join(lowers))
        if self.upper is not None:
            opts += [f"upperdir={self.upper}", f"workdir={self.work}"]
        if self.userxattr:
            opts.append("userxattr")
        return ",".join(opts)


def mount_overlay(m: OverlayMount, target: str) -> None:
    """Mount `m` on `target`. As dockerd does, when the option string with absolute lowers
    would not fit in a page (the kernel's limit for mount data), mount from inside `base`
    with the short relative names."""
    target = os.path.abspath(target)
    if m.upper is None and len(m.lowers) == 1:
        raise ValueError("overlayfs needs two lowers for a read-only mount; bind-mount one")
    opts = m.options(relative=False)
    if len(opts) < os.sysconf("SC_PAGE_SIZE") - 1:
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, target])
    else:
        _run(["mount", "-t", "overlay", "overlay", "-o", m.options(relative=True), target],
             cwd=m.base)


def bind_readonly(source: str, target: str) -> None:
    """A read-only bind mount (a one-layer image's view)."""
    _run(["mount", "--bind", "-o", "ro", source, target])
    _run(["mount", "-o", "remount,bind,ro", target])


def umount(target: str) -> None:
    _run(["umount", target])


def _run(argv: Sequence[str], cwd: str | None = None) -> None:
    import subprocess

    proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise StoreError(f"{argv[0]} failed: {msg[-1] if msg else proc.returncode}")
