"""Both whiteout dialects: tar `.wh.` names (image-spec layer.md) and overlayfs whiteouts/xattrs,
and `OverlayFormat`, the one value that says which overlay xattr namespace a dir uses."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ocilayers.errors import UnsafeEntryError

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
# AUFS bookkeeping names (.wh..wh.plnk, .wh..wh.aufs): not content, skipped as Docker does.
WHITEOUT_META_PREFIX = b".wh..wh."

NAMESPACES = ("trusted", "user")


@dataclass(frozen=True)
class OverlayFormat:
    """How a diff dir holds overlay metadata, passed as one value (as umoci's OnDiskFormat)
    instead of loose strings.

    `xattr_namespace`: "trusted" for a default overlay mount, "user" for one mounted with
    `-o userxattr` (rootless; overlayfs.rst "Permission model"). `rootless`: the applier may
    not make device nodes, foreign owners or trusted.* xattrs and skips them."""

    xattr_namespace: str = "trusted"
    rootless: bool = False

    def __post_init__(self) -> None:
        if self.xattr_namespace not in NAMESPACES:
            raise ValueError(f"xattr_namespace must be one of {NAMESPACES}, "
                             f"not {self.xattr_namespace!r}")

    @classmethod
    def native(cls, xattr_namespace: str = "trusted") -> OverlayFormat:
        """The default for this process: rootless unless euid 0 of the initial user namespace
        (root of any other cannot make devices or trusted.* xattrs either)."""
        return cls(xattr_namespace, os.geteuid() != 0 or in_user_namespace())

    @property
    def opaque_xattr(self) -> str:
        return opaque_xattr(self.xattr_namespace)


def in_user_namespace() -> bool:
    """Is this process in a user namespace other than the initial one (whose uid_map maps
    every ID to itself)?"""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except FileNotFoundError:  # no /proc: assume the initial namespace
        return False


TRUSTED = OverlayFormat("trusted")
USERXATTR = OverlayFormat("user")


def opaque_xattr(namespace: str) -> str:
    """overlayfs.rst "whiteouts and opaque directories"; `user.` with the userxattr mount option."""
    return f"{namespace}.overlay.opaque"


def overlay_prefixes() -> tuple[str, str]:
    return ("trusted.overlay.", "user.overlay.")


def is_overlay_xattr(name: str) -> bool:
    return name.startswith(overlay_prefixes())


def escape_xattr(name: str) -> str:
    """Store an image's own `*.overlay.X` xattr as `*.overlay.overlay.X`.

    That is overlayfs's escaping (overlayfs.rst "Nesting overlayfs mounts", Linux 6.7+): the merged
    view shows it as `*.overlay.X` again, and it can never be taken for a whiteout or opaque mark.
    """
    for prefix in overlay_prefixes():
        if name.startswith(prefix):
            return prefix + "overlay." + name[len(prefix):]
    return name


def unescape_xattr(name: str) -> str | None:
    """The image xattr an on-disk name stands for; None for overlay bookkeeping (never content)."""
    for prefix in overlay_prefixes():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith("overlay."):
                return prefix + rest[len("overlay."):]
            return None
    return name


def classify(base: bytes, display: str) -> tuple[str, bytes]:
    """Classify a path's last component: ("entry", name), ("whiteout", target),
    ("opaque", b""), or ("meta", b"") for AUFS bookkeeping to skip."""
    if not base.startswith(WHITEOUT_PREFIX):
        return "entry", base
    if base == OPAQUE_MARKER:
        return "opaque", b""
    if base.startswith(WHITEOUT_META_PREFIX):
        return "meta", b""
    target = base[len(WHITEOUT_PREFIX):]
    if target in (b"", b".", b".."):
        raise UnsafeEntryError(f"'{display}': invalid whiteout (target {target!r} escapes its dir)")
    return "whiteout", target


def is_whiteout_stat(st: os.stat_result) -> bool:
    """An overlayfs whiteout: a char device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
