"""`write_layer`: an overlay upper dir (or two trees' difference) as a deterministic layer tar.

The walk is Go's `filepath.WalkDir` order, as `docker commit` walks: depth first, each dir's
entries sorted by their on-disk byte names, no root entry. Headers are Go archive/tar's dialect
(tarstream.encode_header), so for an upper dir `docker commit` would diff, the output matches it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ocilayers.errors import UnsupportedUpperError, UpperDirError
from ocilayers.fsutil import DIR_FLAGS
from ocilayers.overrides import (
    CAPABILITY,
    OVERRIDE_XATTR,
    SideRecord,
    cap_to_v2,
    record_name,
    restore,
)
from ocilayers.tarstream import (
    BLK,
    BLOCK,
    CHR,
    DIR,
    END_OF_ARCHIVE,
    FIFO,
    LNK,
    REG,
    SYM,
    TarEntry,
    encode_header,
)
from ocilayers.whiteout import (
    OPAQUE_MARKER,
    TRUSTED,
    WHITEOUT_PREFIX,
    OverlayFormat,
    is_whiteout_stat,
    unescape_xattr,
)

XATTR_POLICIES = ("all", "docker")
OPAQUE_POLICIES = ("docker", "lower")
_CHUNK = 1 << 20
# Never content: host labels and NFS ACLs (they describe the host, not the image).
_DROPPED_XATTRS = frozenset({"security.selinux", "system.nfs4_acl"})
# `docker commit` keeps only the capability (and its rootless records, read back as it).
_DOCKER_KEPT = frozenset({CAPABILITY, OVERRIDE_XATTR, record_name(CAPABILITY)})
_TYPE_BITS = {stat.S_IFDIR: (DIR, 0o040000), stat.S_IFLNK: (SYM, 0o120000),
              stat.S_IFCHR: (CHR, 0o020000), stat.S_IFBLK: (BLK, 0o060000),
              stat.S_IFIFO: (FIFO, 0o010000), stat.S_IFREG: (REG, 0o100000)}


@dataclass
class PackStats:
    entries: int = 0
    whiteouts: int = 0
    opaques: int = 0
    hardlinks: int = 0
    bytes: int = 0  # file data
    skipped: int = 0  # sockets


def _overlay_xattr(path: bytes, key: str, ns: str) -> bytes | None:
    """The overlay mount's own `<ns>.overlay.<key>`. Only the mount's namespace is overlay
    metadata: on a default mount `user.overlay.*` is plain content any process can set, and
    reading it as metadata would let the container forge opaque dirs and redirects."""
    try:
        return os.getxattr(path, f"{ns}.overlay.{key}", follow_symlinks=False)
    except OSError:
        return None


def _is_opaque(path: bytes, ns: str) -> bool:
    return _overlay_xattr(path, "opaque", ns) == b"y"


def _listxattr(path: bytes) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


class _Lowers:
    """The merged view of the lower layers (top-most first), read without mounting them."""

    def __init__(self, lowers: Sequence[str | bytes], ns: str) -> None:
        for x in lowers:
            if not os.path.isdir(x):
                raise UpperDirError(f"lower {os.fsdecode(x)}: not a directory")
        self.dirs: list[bytes | None] = [os.fsencode(x) for x in lowers]
        self.ns = ns
        self._memo: dict[tuple[bytes, ...], tuple[list[bytes | None], int]] = {}

    def contributing(self, parts: Sequence[bytes]) -> list[bytes]:
        """Paths of dir `parts` in each lower that shows through, top-most first."""
        paths, cutoff = self._state(tuple(parts))
        return [p for p in paths[:cutoff] if p is not None]

    def _state(self, parts: tuple[bytes, ...]) -> tuple[list[bytes | None], int]:
        """Per lower, the path of dir `parts` in it (None: not there), and how many lowers
        (top-most first) show through: a whiteout or non-dir on the way hides its lower and
        all below, an opaque dir all below. Built level by level from the deepest memoised
        ancestor (a loop, not recursion: a tree may be ~2000 dirs deep), one lstat per lower
        and level: a walk down a deep tree stays linear."""
        known = len(parts)
        while known and parts[:known] not in self._memo:
            known -= 1
        state = self._memo.get(parts[:known]) or (list(self.dirs), len(self.dirs))
        for level in range(known, len(parts)):
            state = self._child_state(state, parts[level])
            if len(self._memo) >= 4096:  # a depth-first walk needs its ancestors, not all
                self._memo.clear()
            self._memo[parts[:level + 1]] = state
        return state

    def _child_state(self, parent: tuple[list[bytes | None], int],
                     name: bytes) -> tuple[list[bytes | None], int]:
        bases, cutoff = parent
        paths: list[bytes | None] = []
        for i, base in enumerate(bases[:cutoff]):
            if base is None:
                paths.append(None)
                continue
            cur = os.path.join(base, name)
            st = _lstat(cur)
            if st is None:
                paths.append(None)
                continue
            if is_whiteout_stat(st) or not stat.S_ISDIR(st.st_mode):
                cutoff = i  # hides this path in this lower and every one below
                break
            paths.append(cur)
            if _is_opaque(cur, self.ns):
                cutoff = i + 1
                break
        return paths, min(cutoff, len(paths))

    def has_dir(self, parts: Sequence[bytes]) -> bool:
        return bool(self.contributing(parts))

    def children(self, parts: Sequence[bytes]) -> dict[bytes, bytes]:
        """name -> path of the top-most visible lower entry, for the merged dir `parts`."""
        out: dict[bytes, bytes] = {}
        hidden: set[bytes] = set()
        for d in self.contributing(parts):
            for name in os.listdir(d):
                if name in out or name in hidden:
                    continue
                p = os.path.join(d, name)
                st = os.lstat(p)
                if is_whiteout_stat(st):
                    hidden.add(name)
                else:
                    out[name] = p
        return out

    def file(self, parts: Sequence[bytes]) -> bytes | None:
        return self.children(parts[:-1]).get(parts[-1])


class _Writer:
    def __init__(self, out: Any, xattrs: str, opaque: str, lowers: _Lowers | None,
                 source_date_epoch: int | None, warn: Callable[[str], None] | None,
                 ns: str = "trusted", records: bool = False,
                 side: SideRecord | None = None) -> None:
        self.out = out
        self.ns = ns
        self.overlay_prefix = f"{ns}.overlay."
        self.xattr_policy = xattrs
        self.opaque_policy = opaque
        self.lowers = lowers
        self.sde = source_date_epoch
        self.warn = warn
        self.stats = PackStats()
        self.links: dict[tuple[int, int], bytes] = {}  # inode -> first name (files)
        self.whiteout_links: dict[tuple[int, int], bytes] = {}  # inode -> first on-disk path
        self.docker = xattrs == "docker"
        # A rootless store's records (overrides): read back into what the image had.
        self.records = records
        self.side = side

    # -- headers --

    def _mtime_ns(self, st: os.stat_result) -> int:
        secs = st.st_mtime_ns // 1_000_000_000  # whole seconds (Go's Truncate)
        if self.sde is not None and secs > self.sde:
            secs = self.sde
        return secs * 1_000_000_000

    def _xattrs(self, path: bytes, names: list[str] | None = None) -> dict[str, bytes]:
        if names is None:
            names = _listxattr(path)
        if not names:
            return {}
        out: dict[str, bytes] = {}
        for name in sorted(names):
            if self.docker:
                if name not in _DOCKER_KEPT:
                    continue
                content = name
            else:
                if name in _DROPPED_XATTRS:
                    continue
                unescaped = unescape_xattr(name)
                if unescaped is None:
                    continue  # overlay bookkeeping: origin, impure, opaque, redirect, ...
                content = unescaped
            try:
                out[content] = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
        return out

    def _emit(self, entry: TarEntry, type_bits: int) -> None:
        self.out.write(encode_header(entry, type_bits=type_bits))
        self.stats.entries += 1

    def _data(self, src: bytes, size: int, shown: str) -> None:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            left = size
            while left > 0:
                data = os.read(fd, min(_CHUNK, left))
                if not data:
                    raise UpperDirError(f"'{shown}' shrank while it was packed")
                self.out.write(data)
                left -= len(data)
            if os.read(fd, 1):
                raise UpperDirError(f"'{shown}' grew while it was packed")
        finally:
            os.close(fd)
        self.stats.bytes += size
        if size % BLOCK:
            self.out.write(b"\0" * (BLOCK - size % BLOCK))

    # -- entries --

    def entry(self, rel: bytes, path: bytes, st: os.stat_result,
              data_from: bytes | None = None, xattr_names: list[str] | None = None) -> None:
        """One filesystem entry (not a whiteout); `data_from` overrides where data is read;
        `xattr_names`: its listxattr, where the caller has it."""
        if rel.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX):
            # Every reader would take it for a whiteout or an opaque marker: the layer would
            # delete what the container still sees. (`docker commit` writes it all the same.)
            raise UpperDirError(f"'{rel.decode('utf-8', 'backslashreplace')}': a name starting "
                             f"with {WHITEOUT_PREFIX.decode()} cannot be stored in a layer")
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFSOCK:
            self.stats.skipped += 1
            if self.warn:
                self.warn(f"skipping socket '{rel.decode('utf-8', 'backslashreplace')}'")
            return
        typeflag, bits = _TYPE_BITS[fmt]
        e = TarEntry(name=rel + (b"/" if fmt == stat.S_IFDIR else b""), type=typeflag,
                     mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                     mtime_ns=self._mtime_ns(st), xattrs=self._xattrs(path, xattr_names))
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):  # kept on a link to a device too, as moby does
            e.devmajor, e.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if self.records:
            if restore(e, self.side):  # a rootless store's stand-in for a device node
                fmt = stat.S_IFCHR if e.type == CHR else stat.S_IFBLK
                bits = _TYPE_BITS[fmt][1]
        elif CAPABILITY in e.xattrs:
            e.xattrs[CAPABILITY] = cap_to_v2(e.xattrs[CAPABILITY])
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            # Any non-dir can be hardlinked (files, fifos, devices, symlinks): the first name
            # in walk order is the entry, later names are type-1 links to it, as moby writes.
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key)
            if first is not None:
                e.type, e.linkname = LNK, first
                self.stats.hardlinks += 1
                self._emit(e, bits)
                return
            self.links[key] = rel
        if fmt == stat.S_IFLNK:
            e.linkname = os.readlink(path)
        elif fmt == stat.S_IFREG:
            source = data_from or path
            e.size = os.lstat(source).st_size if data_from else st.st_size
            self._emit(e, bits)
            self._data(source, e.size, rel.decode("utf-8", "backslashreplace"))
            return
        self._emit(e, bits)

    def whiteout(self, rel: bytes, st: os.stat_result, shared_inode: bool = True) -> None:
        """A `.wh.` entry owned as `st`; `shared_inode` when `st` is the whiteout's own (an
        upper dir's), not a stand-in such as the parent dir of a deleted tree entry."""
        d, _, base = rel.rpartition(b"/")
        name = (d + b"/" if d else b"") + WHITEOUT_PREFIX + base
        e = TarEntry(name=name, type=REG, mode=0o600, uid=st.st_uid, gid=st.st_gid,
                     mtime_ns=self._mtime_ns(st))
        if shared_inode and st.st_nlink > 1:
            # The kernel makes every whiteout a link of one inode: never emit a hardlink.
            # `docker commit` leaves the first one's path as a stray linkname; so do we
            # when asked for Docker's dialect (--xattrs docker), for identical bytes.
            key = (st.st_dev, st.st_ino)
            first = self.whiteout_links.setdefault(key, rel)
            if self.docker and first != rel:
                e.linkname = first
        self.stats.whiteouts += 1
        self._emit(e, 0)

    def opaque_marker(self, rel: bytes, st: os.stat_result) -> None:
        # moby: Mode = dir mode & os.ModePerm (0777: no setuid/setgid/sticky)
        e = TarEntry(name=rel + b"/" + OPAQUE_MARKER, type=REG, mode=st.st_mode & 0o777,
                     uid=st.st_uid, gid=st.st_gid, mtime_ns=0)
        self.stats.opaques += 1
        self._emit(e, 0)

    def finish(self) -> None:
        self.out.write(END_OF_ARCHIVE)




class _UpperDir:
    """A dir of the upper dir, held open: its entries are reached as
    `/proc/self/fd/<fd>/<name>`, which the kernel resolves from the open dir, not by path. A
    process still running in the container can swap a dir for a symlink while pack is inside
    it, and pack still reads the dir it opened, never what the symlink points to."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.path = b"/proc/self/fd/%d" % fd
        self.names = sorted(os.fsencode(n) for n in os.listdir(fd))

    def child(self, name: bytes, st: os.stat_result, rel: bytes) -> _UpperDir:
        """Open subdir `name`, lstat'ed as `st` a moment ago; refused if it is not that dir."""
        fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise UpperDirError(f"'{rel.decode('utf-8', 'backslashreplace')}' changed while "
                                 "it was packed")
            return _UpperDir(fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        os.close(self.fd)


def _parts(rel: bytes) -> list[bytes]:
    return rel.split(b"/") if rel else []


def write_layer(upper: str | bytes, out: Any, *, lowers: Sequence[str | bytes] | None = None,
                xattrs: str = "all", opaque: str | None = None,
                source_date_epoch: int | None = None,
                warn: Callable[[str], None] | None = None,
                fmt: OverlayFormat = TRUSTED, side: SideRecord | None = None) -> PackStats:
    """Write the overlay upper dir `upper` to `out` (anything with `write`) as a layer tar.

    - char 0/0 whiteouts become `.wh.NAME` (never hardlinks, though the kernel links them);
    - opaque dirs become the dir entry plus `DIR/.wh..wh..opq`: every one with
      `opaque="docker"` (default without lowers), only dirs a lower has with `"lower"`
      (default with lowers: the kernel also marks dirs new to the image);
    - `xattrs="all"` keeps every xattr but security.selinux, system.nfs4_acl and overlay
      bookkeeping; `"docker"` keeps only security.capability, as `docker commit` does;
    - a redirected dir (renamed) or a metacopy file (data still below) needs `lowers` to be
      written right; without them it is refused, never written wrong;
    - `fmt` is the mount's overlay format: TRUSTED (a default mount) or USERXATTR (mounted
      with `-o userxattr`, rootless). Only its `<namespace>.overlay.*` is overlay metadata.
      A rootless dir (`fmt.rootless`, or the `user` namespace) has its records read back:
      owners, modes, devices and xattrs it could not hold (overrides.restore; `side` is the
      layer's side record). A v3 `security.capability` always leaves as v2.
    """
    if xattrs not in XATTR_POLICIES:
        raise ValueError(f"xattrs must be one of {XATTR_POLICIES}")
    opaque = opaque or ("lower" if lowers else "docker")
    if opaque not in OPAQUE_POLICIES:
        raise ValueError(f"opaque must be one of {OPAQUE_POLICIES}")
    if opaque == "lower" and not lowers:
        raise ValueError("opaque='lower' needs lowers")
    low = _Lowers(lowers, fmt.xattr_namespace) if lowers else None
    w = _Writer(out, xattrs, opaque, low, source_date_epoch, warn, fmt.xattr_namespace,
                records=fmt.rootless or fmt.xattr_namespace == "user", side=side)
    root = os.fsencode(upper)
    if not os.path.isdir(root):
        raise UpperDirError(f"{os.fsdecode(root)}: not a directory")
    top = _UpperDir(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    try:
        _walk_upper(w, top)
    finally:
        top.close()
    w.finish()
    return w.stats


def _walk_upper(w: _Writer, top: _UpperDir) -> None:
    # Depth first with a stack of open dirs, not recursion: a tree may be ~2000 dirs deep.
    todo = [(b"", top, iter(top.names))]
    try:
        while todo:
            rel, d, names = todo[-1]
            name = next(names, None)
            if name is None:
                todo.pop()
                if d is not top:
                    d.close()
                continue
            crel = rel + b"/" + name if rel else name
            try:
                sub = _upper_entry(w, d, name, crel)
            except OSError as exc:  # its filename is /proc/self/fd/N/...: say which entry
                exc.add_note(f"pack '{crel.decode('utf-8', 'backslashreplace')}'")
                raise
            if sub is not None:
                todo.append((crel, sub, iter(sub.names)))
    finally:
        for _rel, d, _names in todo:
            if d is not top:
                d.close()


def _upper_entry(w: _Writer, d: _UpperDir, name: bytes, crel: bytes) -> _UpperDir | None:
    """Write one entry of the upper dir; a dir to walk next comes back, open."""
    path = d.path + b"/" + name
    st = os.lstat(path)
    if is_whiteout_stat(st):
        w.whiteout(crel, st)
        return None
    # One listxattr: most entries carry no overlay xattr, and then none is asked for.
    names = _listxattr(path)
    prefix = w.overlay_prefix
    marked = any(n.startswith(prefix) for n in names)
    if stat.S_ISDIR(st.st_mode):
        redirect = _overlay_xattr(path, "redirect", w.ns) if marked else None
        if redirect is not None:
            _redirected_dir(w, crel, path, st, redirect, d.child(name, st, crel))
            return None
        w.entry(crel, path, st, xattr_names=names)
        if marked and _is_opaque(path, w.ns) and (
            w.opaque_policy == "docker"
            or (w.lowers is not None and w.lowers.has_dir(_parts(crel)))
        ):
            w.opaque_marker(crel, st)
        return d.child(name, st, crel)
    if marked and stat.S_ISREG(st.st_mode) and _overlay_xattr(path, "metacopy",
                                                              w.ns) is not None:
        w.entry(crel, path, st, data_from=_metacopy_source(w, crel, path, _parts(crel)),
                xattr_names=names)
        return None
    w.entry(crel, path, st, xattr_names=names)
    return None


def _need_lowers(w: _Writer, what: str, rel: bytes) -> _Lowers:
    if w.lowers is None:
        raise UnsupportedUpperError(
            f"'{rel.decode('utf-8', 'backslashreplace')}' is a {what}: the upper dir alone is "
            "not the diff; pass the lower layers (--lower) to write it correctly")
    return w.lowers


def _metacopy_source(w: _Writer, rel: bytes, path: bytes, lower_parts: list[bytes]) -> bytes:
    """Where a metacopy file's data is: its own redirect, else its path in the lowers as seen
    through any renamed dir above it (`lower_parts`)."""
    low = _need_lowers(w, "metacopy file (its data is still in a lower layer)", rel)
    redirect = _overlay_xattr(path, "redirect", w.ns)
    parts = _redirect_parts(lower_parts[:-1], redirect, rel) if redirect is not None \
        else lower_parts
    src = low.file(parts)
    if src is None or not stat.S_ISREG(os.lstat(src).st_mode):
        raise UpperDirError(f"'{rel.decode('utf-8', 'backslashreplace')}': metacopy data not "
                         "found in the lower layers")
    return src


def _redirect_parts(lower_parent: list[bytes], redirect: bytes, rel: bytes) -> list[bytes]:
    """overlayfs.rst "Redirect dir": absolute from the layer root, or a name in the same dir
    (the parent as the lowers see it: below a renamed dir, that is the renamed dir's source).
    Anything else is refused as the kernel refuses it (and `.`/`..` never leave the lowers)."""
    parts = redirect[1:].split(b"/") if redirect.startswith(b"/") else [redirect]
    if any(p in (b"", b".", b"..") or b"/" in p or b"\0" in p for p in parts):
        raise UpperDirError(f"'{rel.decode('utf-8', 'backslashreplace')}': invalid overlay "
                         f"redirect {redirect.decode('utf-8', 'backslashreplace')!r}")
    return parts if redirect.startswith(b"/") else [*lower_parent, redirect]


def _redirected_dir(w: _Writer, rel: bytes, path: bytes, st: os.stat_result,
                    redirect: bytes, upper: _UpperDir) -> None:
    """A renamed lower dir: its whole content, opaque, at the new path (the old path already
    holds a whiteout in the upper dir). Takes over `upper`, the renamed dir held open."""
    try:
        low = _need_lowers(w, "renamed directory (redirect)", rel)
        w.entry(rel, path, st)
        # The content below is complete; a marker only matters to hide a lower dir at the
        # new path.
        if w.opaque_policy == "docker" or low.has_dir(_parts(rel)):
            w.opaque_marker(rel, st)
        lower_parts = _redirect_parts(_parts(rel)[:-1], redirect, rel)
    except BaseException:
        upper.close()
        raise
    _merged_subtree(w, low, rel, upper, lower_parts)


class _MergedDir:
    """One dir of a merged subtree being written: upper entries (a dir held open, if the
    upper dir has it) over the lower dir."""

    def __init__(self, low: _Lowers, rel: bytes, upper: _UpperDir | None,
                 lower_parts: list[bytes] | None) -> None:
        self.rel, self.upper, self.lower_parts = rel, upper, lower_parts
        self.upper_names = set(upper.names) if upper is not None else set()
        self.lower_children = low.children(lower_parts) if lower_parts is not None else {}
        self.names = iter(sorted(self.upper_names | set(self.lower_children)))


def _merged_subtree(w: _Writer, low: _Lowers, rel: bytes, upper: _UpperDir | None,
                    lower_parts: list[bytes] | None) -> None:
    """Everything below `rel`: upper entries over the lower dir `lower_parts`, fully (depth
    first with a stack, not recursion). Takes over `upper`."""
    try:
        todo = [_MergedDir(low, rel, upper, lower_parts)]
    except BaseException:
        if upper is not None:
            upper.close()
        raise
    try:
        _merged_walk(w, low, todo)
    finally:
        for cur in todo:
            if cur.upper is not None:
                cur.upper.close()


def _merged_walk(w: _Writer, low: _Lowers, todo: list[_MergedDir]) -> None:
    while todo:
        cur = todo[-1]
        name = next(cur.names, None)
        if name is None:
            todo.pop()
            if cur.upper is not None:
                cur.upper.close()
            continue
        crel = cur.rel + b"/" + name
        try:
            _merged_entry(w, low, todo, cur, name, crel)
        except OSError as exc:  # its filename may be /proc/self/fd/N/...: say which entry
            exc.add_note(f"pack '{crel.decode('utf-8', 'backslashreplace')}'")
            raise


def _merged_entry(w: _Writer, low: _Lowers, todo: list[_MergedDir], cur: _MergedDir,
                  name: bytes, crel: bytes) -> None:
    """Write one entry of a merged subtree; a dir to walk next is pushed on `todo`."""
    rel, upper, lower_parts = cur.rel, cur.upper, cur.lower_parts
    if name in cur.upper_names:
        assert upper is not None
        path = upper.path + b"/" + name
        st = os.lstat(path)
        if is_whiteout_stat(st):
            return  # the new dir is opaque: the lower entry is simply left out
        if stat.S_ISDIR(st.st_mode):
            w.entry(crel, path, st)
            redirect = _overlay_xattr(path, "redirect", w.ns)
            if redirect is not None:
                sub_lower: list[bytes] | None = _redirect_parts(
                    lower_parts if lower_parts is not None else _parts(rel), redirect,
                    crel)
            elif _is_opaque(path, w.ns) or lower_parts is None:
                sub_lower = None
            else:
                sub_lower = [*lower_parts, name]
            sub = upper.child(name, st, crel)
            try:
                todo.append(_MergedDir(low, crel, sub, sub_lower))
            except BaseException:
                sub.close()
                raise
        elif stat.S_ISREG(st.st_mode) and _overlay_xattr(path, "metacopy", w.ns) is not None:
            if lower_parts is None and _overlay_xattr(path, "redirect", w.ns) is None:
                raise UpperDirError(f"'{crel.decode('utf-8', 'backslashreplace')}': metacopy "
                                 "file below an opaque dir has no lower data")
            here = [*lower_parts, name] if lower_parts is not None else _parts(crel)
            w.entry(crel, path, st, data_from=_metacopy_source(w, crel, path, here))
        else:
            w.entry(crel, path, st)
    else:
        assert lower_parts is not None
        lpath = cur.lower_children[name]
        st = os.lstat(lpath)
        w.entry(crel, lpath, st)
        if stat.S_ISDIR(st.st_mode):
            todo.append(_MergedDir(low, crel, None, [*lower_parts, name]))


# --- two plain trees ---

def _same(a: os.stat_result, b: os.stat_result, pa: bytes, pb: bytes, content: bool) -> bool:
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
        return False
    if (a.st_mode, a.st_uid, a.st_gid) != (b.st_mode, b.st_uid, b.st_gid):
        return False
    if a.st_mtime_ns // 1_000_000_000 != b.st_mtime_ns // 1_000_000_000:
        return False
    fmt = stat.S_IFMT(a.st_mode)
    if fmt == stat.S_IFREG and a.st_size != b.st_size:
        return False
    if fmt == stat.S_IFLNK and os.readlink(pa) != os.readlink(pb):
        return False
    if fmt in (stat.S_IFCHR, stat.S_IFBLK) and a.st_rdev != b.st_rdev:
        return False
    if _all_xattrs(pa) != _all_xattrs(pb):
        return False
    return not (content and fmt == stat.S_IFREG and not _same_bytes(pa, pb))


def _all_xattrs(path: bytes) -> dict[str, bytes]:
    try:
        return {n: os.getxattr(path, n, follow_symlinks=False)
                for n in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        return {}


def _same_bytes(a: bytes, b: bytes) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(_CHUNK), fb.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


def write_tree_diff(new: str | bytes, base: str | bytes, out: Any, *, content: bool = False,
                    xattrs: str = "all", source_date_epoch: int | None = None,
                    warn: Callable[[str], None] | None = None) -> PackStats:
    """The layer that turns plain tree `base` into plain tree `new`: added and changed entries
    (type, mode, owner, whole-second mtime, size, link target, device numbers, xattrs; with
    `content`, bytes too), and a `.wh.` for the top of each deleted subtree."""
    if xattrs not in XATTR_POLICIES:
        raise ValueError(f"xattrs must be one of {XATTR_POLICIES}")
    w = _Writer(out, xattrs, "docker", None, source_date_epoch, warn)
    nroot, broot = os.fsencode(new), os.fsencode(base)
    for root in (nroot, broot):
        if not os.path.isdir(root):
            raise UpperDirError(f"{os.fsdecode(root)}: not a directory")
    for kind, rel, path, st in _tree_changes(nroot, broot, b"", content):
        if kind == "deleted":
            w.whiteout(rel, st, shared_inode=False)
        else:
            w.entry(rel, path, st)
    w.finish()
    return w.stats


def _tree_changes(nroot: bytes, broot: bytes, rel: bytes,
                  content: bool) -> Iterator[tuple[str, bytes, bytes, os.stat_result]]:
    """Go's walk order, depth first, with a stack of dirs being compared (not recursion)."""
    def open_dir(rel: bytes) -> tuple[bytes, bytes, bytes, set[bytes], set[bytes],
                                      Iterator[bytes]]:
        nd = os.path.join(nroot, rel) if rel else nroot
        bd = os.path.join(broot, rel) if rel else broot
        bst = _lstat(bd)
        base_names = (set(os.listdir(bd)) if bst is not None and stat.S_ISDIR(bst.st_mode)
                      else set())
        new_names = set(os.listdir(nd))
        return rel, nd, bd, new_names, base_names, iter(sorted(new_names | base_names))

    todo = [open_dir(rel)]
    while todo:
        rel, nd, bd, new_names, base_names, names = todo[-1]
        name = next(names, None)
        if name is None:
            todo.pop()
            continue
        crel = rel + b"/" + name if rel else name
        npath = os.path.join(nd, name)
        if name not in new_names:
            # deleted: one whiteout for the top of the subtree, owned as its parent dir
            yield "deleted", crel, npath, os.lstat(nd)
            continue
        st = os.lstat(npath)
        bpath = os.path.join(bd, name)
        old = _lstat(bpath) if name in base_names else None
        if old is None or not _same(st, old, npath, bpath, content):
            yield "changed", crel, npath, st
        if stat.S_ISDIR(st.st_mode):
            todo.append(open_dir(crel))
