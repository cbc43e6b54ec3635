"""Checking a diff dir against the tar it was unpacked from: every entry's type and metadata."""

from __future__ import annotations

import os
import stat

from ocilayers.overrides import (
    OVERRIDE_XATTR,
    RECORD_PREFIX,
    Override,
    SideRecord,
    record_name,
    take_records,
)
from ocilayers.streams import Readable
from ocilayers.tarstream import BLK, CHR, DIR, FIFO, LNK, PAX_GLOBAL, SYM, TarReader
from ocilayers.whiteout import classify, escape_xattr, is_whiteout_stat

_MAX_PROBLEMS = 50
# Labels the host puts on new files (SELinux, IMA/EVM): not content, and not ours to check.
_HOST_XATTRS = frozenset({"security.selinux", "security.ima", "security.evm"})
# What a dir's default ACL (from the layer) gives the entries made in it.
_INHERITED_ACLS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
_OPAQUE_XATTRS = frozenset({"trusted.overlay.opaque", "user.overlay.opaque"})
_TYPES = {DIR: stat.S_IFDIR, SYM: stat.S_IFLNK, CHR: stat.S_IFCHR, BLK: stat.S_IFBLK,
          FIFO: stat.S_IFIFO}


def _opaque(path: bytes) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _below(root: bytes, parts: list[bytes]) -> bytes:
    """`os.path.join(root, *parts)` for clean parts, in C: that loops in Python, once per part,
    and a layer's paths may be 2000 parts deep."""
    return b"/".join([root, *parts])


def _below_non_dir(parent: list[bytes], non_dirs: set[bytes]) -> bool:
    """Is the dir `parent`, or one above it, a non-directory in the tar (its last entry)?"""
    if not non_dirs:
        return False
    key = b"/".join(parent)
    end = -1
    for comp in parent:
        end += len(comp) + 1
        if key[:end] in non_dirs:
            return True
    return False


def compare_tree(stream: Readable, diff_dir: str, *, records: bool = False,
                 side: SideRecord | None = None) -> list[str]:
    """Differences between the layer tar `stream` and the overlay-mode diff dir it made.

    `records`: a rootless store's diff dir, whose records (overrides; `side` is the layer's
    side record) stand for the owners, modes, devices and xattrs it could not hold.

    Content is checked elsewhere (tar-split CRCs); this covers what tar-split cannot see:
    types, modes, owners, mtimes, link targets, device numbers, xattrs, whiteouts, opaques.
    A whiteout or opaque marker below a non-directory of the same layer (umoci repack writes
    them) hides nothing and left nothing on disk (extract.LayerStats.ignored_whiteouts):
    nothing is looked for, and no path through that non-directory is looked up."""
    root = os.fsencode(diff_dir)
    problems: list[str] = []
    seen: set[bytes] = set()  # every path the tar accounts for, with its parents
    missing_whiteouts: list[tuple[list[bytes], str]] = []
    root_opaque = False
    opaque_dirs: set[bytes] = set()  # dirs that may be opaque: marked, or whited out and made
    expected_xattrs: dict[bytes, set[str]] = {}  # path -> on-disk xattr names the tar gave
    links: dict[bytes, bytes] = {}  # hardlink path -> its target's (one inode, one set)
    acl_dirs: set[bytes] = set()  # dirs with a default ACL: their children inherit ACLs
    non_dirs: set[bytes] = set()  # paths whose last entry is not a dir
    markers: list[tuple[str, list[bytes], bytes, str]] = []  # checked once non_dirs is whole

    def bad(msg: str) -> None:
        if len(problems) < _MAX_PROBLEMS:
            problems.append(msg)

    def account(parts: list[bytes]) -> None:
        for i in range(len(parts), 0, -1):
            p = b"/".join(parts[:i])
            if p in seen:
                break
            seen.add(p)

    for entry in TarReader(stream):
        if entry.type == PAX_GLOBAL:
            continue
        parts = [p for p in entry.name.split(b"/") if p not in (b"", b".")]
        shown = entry.display_name
        if not parts:
            continue
        try:
            kind, target = classify(parts[-1], shown)
        except ValueError:
            bad(f"'{shown}': invalid whiteout")
            continue
        if kind == "meta":
            continue
        if kind in ("opaque", "whiteout"):
            # (the non-directory may come later in the tar: whiteouts are order-independent)
            markers.append((kind, parts, target, shown))
            continue
        account(parts)
        if entry.is_dir:
            non_dirs.discard(b"/".join(parts))
        else:
            non_dirs.add(b"/".join(parts))
        path = _below(root, parts)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            bad(f"'{shown}': missing")
            continue
        if entry.type == LNK:
            tparts = [p for p in entry.linkname.split(b"/") if p not in (b"", b".")]
            try:
                tst = os.lstat(_below(root, tparts))
            except FileNotFoundError:
                bad(f"'{shown}': hardlink target is missing")
                continue
            if (tst.st_dev, tst.st_ino) != (st.st_dev, st.st_ino):
                link = entry.linkname.decode(errors="replace")
                bad(f"'{shown}': no longer a hardlink of '{link}'")
            links[b"/".join(parts)] = b"/".join(tparts)
            continue
        want = _TYPES.get(entry.type, stat.S_IFREG)
        fmt, mode, uid, gid, rdev = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                     st.st_uid, st.st_gid, st.st_rdev)
        key = b"/".join(parts)
        recorded: dict[str, bytes] = {}
        if records:
            ov, recorded = _records(path, st, side, key)
            if ov is not None:
                mode, uid, gid = ov.mode, ov.uid, ov.gid
                if ov.kind in ("char", "block") and fmt == stat.S_IFREG:
                    fmt = stat.S_IFCHR if ov.kind == "char" else stat.S_IFBLK
                    rdev = os.makedev(ov.major, ov.minor)
        if fmt != want:
            if not (is_whiteout_stat(st) and entry.is_dir):
                bad(f"'{shown}': type changed")
            continue
        if mode != entry.mode and want != stat.S_IFLNK:
            bad(f"'{shown}': mode {oct(mode)}, tar says {oct(entry.mode)}")
        if (uid, gid) != (entry.uid, entry.gid):
            bad(f"'{shown}': owner {uid}:{gid}, tar says {entry.uid}:{entry.gid}")
        if st.st_mtime_ns != entry.mtime_ns:
            bad(f"'{shown}': mtime changed")
        if want == stat.S_IFLNK and os.readlink(path) != entry.linkname:
            bad(f"'{shown}': symlink target changed")
        if want in (stat.S_IFCHR, stat.S_IFBLK) and rdev != os.makedev(
            entry.devmajor, entry.devminor
        ):
            bad(f"'{shown}': device number changed")
        if want == stat.S_IFREG and st.st_size != entry.size:
            bad(f"'{shown}': size {st.st_size}, tar says {entry.size}")
        expected_xattrs[key] = {escape_xattr(n) for n in entry.xattrs}
        if records:
            expected_xattrs[key] |= {OVERRIDE_XATTR, *(record_name(n) for n in entry.xattrs)}
        if entry.is_dir and "system.posix_acl_default" in entry.xattrs:
            acl_dirs.add(key)
        for name, value in entry.xattrs.items():
            have: bytes | None
            try:
                have = os.getxattr(path, escape_xattr(name), follow_symlinks=False)
            except OSError:
                have = recorded.get(name)
            if have != value:
                bad(f"'{shown}': xattr {name} changed")
    for kind, parts, target, shown in markers:
        if _below_non_dir(parts[:-1], non_dirs):
            continue  # hides nothing the layer's own non-directory does not hide
        parent = _below(root, parts[:-1])
        if kind == "opaque":
            account(parts[:-1])
            opaque_dirs.add(b"/".join(parts[:-1]))
            if not parts[:-1]:
                root_opaque = True
            elif not _opaque(parent):
                bad(f"'{shown}': directory is no longer opaque")
            continue
        account([*parts[:-1], target])
        opaque_dirs.add(b"/".join([*parts[:-1], target]))  # if it comes back, as a new dir
        path = os.path.join(parent, target)
        if not os.path.lexists(path) and not any(
            _opaque(_below(root, parts[:i])) for i in range(1, len(parts))
        ):
            missing_whiteouts.append((parts, shown))
    if not root_opaque:  # a root marker makes every whiteout of the layer redundant
        for _parts, shown in missing_whiteouts:
            bad(f"'{shown}': whiteout is missing")
    for rel, st in _walk(root):
        if rel in seen:
            if not is_whiteout_stat(st):
                expected = set(expected_xattrs.get(links.get(rel, rel), ()))
                if acl_dirs and any(rel == d or rel.startswith(d + b"/") for d in acl_dirs):
                    expected |= _INHERITED_ACLS
                extra = _extra_xattrs(os.path.join(root, rel), expected,
                                      rel in opaque_dirs or (root_opaque and b"/" not in rel))
                for name in extra:
                    bad(f"'{rel.decode('utf-8', 'backslashreplace')}': xattr {name} was added "
                        "since unpack")
            continue
        if root_opaque and b"/" not in rel and is_whiteout_stat(st):
            continue  # made when the root marker was expanded into whiteouts
        bad(f"'{rel.decode('utf-8', 'backslashreplace')}': not in the layer (added since "
            "unpack)")
    return problems


def _records(path: bytes, st: os.stat_result, side: SideRecord | None,
             key: bytes) -> tuple[Override | None, dict[str, bytes]]:
    """A rootless entry's override and recorded xattrs (by their own names)."""
    xattrs: dict[str, bytes] = {}
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):  # (others cannot carry one)
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            names = []
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in names
                  if n == OVERRIDE_XATTR or n.startswith(RECORD_PREFIX)}
    return take_records(xattrs, side, key)


def _extra_xattrs(path: bytes, expected: set[str], may_be_opaque: bool) -> list[str]:
    """xattrs on `path` the tar did not give it: an added opaque mark or capability changes
    what a mount shows or what a binary may do, so verify must see them. The opaque mark of a
    dir the tar marks opaque (or a re-added root dir, when the root marker was expanded) and
    host labels are expected."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    return sorted(n for n in names if n not in expected and n not in _HOST_XATTRS
                  and not (may_be_opaque and n in _OPAQUE_XATTRS))


def _walk(root: bytes) -> list[tuple[bytes, os.stat_result]]:
    out = []
    stack = [b""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(os.path.join(root, rel) if rel else root)):
            crel = rel + b"/" + name if rel else name
            st = os.lstat(os.path.join(root, crel))
            out.append((crel, st))
            if stat.S_ISDIR(st.st_mode):
                stack.append(crel)
    return out
