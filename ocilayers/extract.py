"""`apply_layer`: a layer tar stream into a directory, confined, order-independent, full fidelity.

Two strategies share one loop:
- overlay mode writes the layer's own diff dir: `.wh.X` becomes a char 0/0 device, an opaque
  marker becomes the `<ns>.overlay.opaque=y` xattr (overlayfs.rst "whiteouts and opaque dirs");
- delete mode applies the layer onto a plain rootfs: `.wh.X` deletes lower X, an opaque marker
  clears the lower children of its dir (image-spec layer.md "Whiteouts").

Whiteouts act only on lower content, never on entries of the same layer, whatever the order.
A whiteout or opaque marker below a non-directory of the same layer (umoci 0.4.7 repack turns a
dir into a symlink and still writes `.wh.` entries for the old dir's children under it) hides
nothing the non-directory does not hide already: it is ignored, and counted. The markers and
what the layer has done so far live in `markers`; the rest of the loop is here.
Every path is resolved component by component from a directory fd with O_NOFOLLOW, so nothing
is ever created, changed or deleted outside the target, and no symlink is written through.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ocilayers.dirfds import DirFds, NotDir, SymlinkParent, lstat_at
from ocilayers.errors import ImageError, UnsafeEntryError
from ocilayers.filewriters import (
    ACL_XATTRS,
    FILE_FLAGS,
    HANDOFF_MAX,
    FileWriters,
    default_acl,
    needs_chmod,
    set_file_meta,
    set_override,
    set_xattrs,
    try_chown,
)
from ocilayers.forking import write_all
from ocilayers.fsutil import DIR_FLAGS, remove_at
from ocilayers.markers import LayerBook, Markers, join
from ocilayers.overrides import Override, SideRecord, complete_layer
from ocilayers.tarstream import (
    AREG,
    BLK,
    CHR,
    CONT,
    DIR,
    FIFO,
    LNK,
    PAX_GLOBAL,
    REG,
    SYM,
    TarEntry,
    TarReader,
)
from ocilayers.whiteout import (
    TRUSTED,
    WHITEOUT_PREFIX,
    OverlayFormat,
    classify,
    is_whiteout_stat,
)

MODES = ("overlay", "delete")
_FD_CACHE = 64  # dir fds kept open: a layer's dirs are mostly visited depth first
_PATH_MAX = 4095  # Linux PATH_MAX (4096) less the NUL
_FILE_TYPES = (REG, AREG, CONT)

# on_entry(entry) may return a callable that then receives each chunk of the entry's data.
DataSink = Callable[[bytes | memoryview], None]  # a chunk of entry data: bytes or a read-only view
EntryHook = Callable[[TarEntry], DataSink | None]


@dataclass
class LayerStats:
    entries: int = 0
    bytes: int = 0
    whiteouts: int = 0
    opaques: int = 0
    hardlinks: int = 0
    skipped: int = 0  # AUFS metadata; devices, owners and xattrs a rootless run cannot make
    root_opaque: bool = False  # a `.wh..wh..opq` on the layer root, left to the caller
    # Whiteouts and opaque markers (also counted above) below a symlink, file, node or hardlink
    # of this same layer, as umoci 0.4.7 repack writes them for a dir it turned into a symlink:
    # the non-directory already hides the whole lower dir, so they are no-ops (nothing written,
    # nothing followed), whichever comes first in the tar.
    ignored_whiteouts: int = 0
    # layerdb `size` (st_size of every non-directory, each inode once), counted while writing;
    # None when it cannot be known that way: the dir was not empty, or the layer removed
    # something it had made (then walk the dir: store.diff_size).
    size: int | None = None
    # Rootless: what symlinks and fifos could not carry as user.* xattrs (overrides).
    side: SideRecord = field(default_factory=SideRecord)


def apply_layer(stream: Any, target_dir: str | bytes, *, mode: str = "overlay",
                fmt: OverlayFormat | None = None, on_entry: EntryHook | None = None,
                on_raw: Callable[[bytes], None] | None = None,
                lowers: Sequence[str | bytes] | None = None,
                defer_root_opaque: bool = False,
                writers: FileWriters | None = None) -> LayerStats:
    """Apply the (decompressed) layer tar `stream` to `target_dir`, which must exist.

    `lowers` (top-most first) are the lower layers' diff dirs; overlay mode needs them only to
    expand an opaque marker on the layer root (overlayfs ignores opaque on a layer's root dir)
    with `expand_root_opaque`. Without them it is refused, unless `defer_root_opaque`: then
    `stats.root_opaque` tells the caller to expand it once the lowers are known.
    `fmt` (default `OverlayFormat.native()`) names the opaque xattr's namespace; with
    `fmt.rootless` (default: not euid 0) what an unprivileged user cannot make (device nodes,
    foreign owners, trusted.* xattrs) is skipped and counted in `skipped`.
    `writers` (see filewriters.start) make new regular files in other processes while this one
    reads on; used only in overlay mode on an empty `target_dir`, and closed here on success
    (the caller aborts them on failure).
    Raises UnsafeEntryError for entries that would escape the target; OSErrors carry a note
    naming the entry. The caller owns the partial dir on failure. Reads the stream only up to
    the end-of-archive marker.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    applier = _Applier(target_dir, mode, fmt or OverlayFormat.native(), lowers,
                       defer_root_opaque, writers)
    try:
        reader = TarReader(stream, on_raw)
        for entry in reader:
            sink = on_entry(entry) if on_entry is not None else None
            if entry.type == PAX_GLOBAL:
                continue  # settings for the archive, not a file (Docker ignores them too)
            applier.stats.entries += 1
            try:
                applier.apply(entry, reader, sink)
            except OSError as exc:
                if not any(n.startswith("apply entry ") for n in getattr(exc, "__notes__", ())):
                    # (a file writer's error, raised here at a sync, names its own entry)
                    exc.add_note(f"apply entry '{entry.display_name}'")
                raise
            if sink is not None:  # data the entry kind ignores (a whiteout's) is still tar bytes
                while data := reader.read_data():
                    sink(data)
        applier.finish()
        if applier.writers is not None:
            applier.stats.skipped += applier.writers.close()
            applier.recorded = applier.recorded or applier.writers.recorded
        if applier.recorded and applier.mode == "overlay" and applier.fresh:
            complete_layer(applier.root_fd)  # as fuse-overlayfs needs a layer's records
        if applier.size_known:
            applier.stats.size = applier.size
    finally:
        applier.close()
    return applier.stats


def _split(name: bytes, limit: int = _PATH_MAX) -> list[bytes]:
    """Path components; absolute names are taken relative to the root, `..` is refused, and so
    is a name longer than `limit`: the room PATH_MAX leaves below the target dir. Nothing that
    works with paths (dockerd, a walk of the dir, a shell) could reach it, and deep paths cost
    time and memory by the square of their depth here."""
    if len(name) > limit:
        raise ImageError(f"'{name[:48].decode('utf-8', 'backslashreplace')}...': path of "
                         f"{len(name)} bytes is too long: below the target dir it would pass "
                         f"PATH_MAX ({_PATH_MAX + 1})")
    split = name.split(b"/")
    if b"" not in split and b"." not in split and b".." not in split:
        return split  # the usual name: three C scans instead of a loop
    if b".." in split:
        raise UnsafeEntryError(
            f"'{name.decode('utf-8', 'backslashreplace')}': path escapes root ('..')")
    return [p for p in split if p != b"" and p != b"."]


class _Applier:
    """One layer into one dir: entries made here or handed to the file writers, markers
    given to `Markers`, hardlinks whose target comes later and dir metadata kept for the end.
    It is the markers' `Tree`: the confined lookup (`dirfd`) and removal (`remove`)."""

    def __init__(self, target: str | bytes, mode: str, fmt: OverlayFormat,
                 lowers: Sequence[str | bytes] | None, defer_root_opaque: bool,
                 writers: FileWriters | None = None) -> None:
        self.root_fd = os.open(target, DIR_FLAGS)
        self.max_path = _PATH_MAX - len(os.fsencode(os.path.abspath(target))) - 1
        self.mode = mode
        self.fmt = fmt
        self.lowers = lowers
        self.defer_root_opaque = defer_root_opaque
        self.rootless = fmt.rootless
        self.stats = LayerStats()
        self.book = LayerBook()  # what this layer made, whited out, and left a non-directory
        self.markers = Markers(self, self.book, overlay=mode == "overlay",
                               opaque_name=fmt.opaque_xattr, rootless=fmt.rootless)
        self.dir_meta: dict[bytes, TarEntry] = {}  # dir mode/times, applied after the children
        self.deferred_links: dict[bytes, TarEntry] = {}  # hardlinks whose target comes later
        self.dirs = DirFds(self.root_fd, _FD_CACHE)
        # New entries already have our ids, and (umask allowing) their mode: skip the syscalls.
        self.ids = (os.geteuid(), os.getegid())
        umask = os.umask(0)
        os.umask(umask)
        self.umask = umask
        # In a fresh dir every parent is ours (0700 until finish: no setgid to inherit a gid).
        self.fresh = not os.listdir(self.root_fd)
        # Is the mode a new file or node is made with its header's, the umask aside? Not
        # where a default ACL decides it instead: in a dir we did not make, below a root that
        # has one, and from the first dir of the layer that brings one (its ACL xattr).
        # Otherwise the mode is set after the fact, as dockerd always does.
        self.exact_modes = self.fresh and not default_acl(self.root_fd)
        # Files and symlinks made, by st_size. Hardlinks add nothing (their inode is one of
        # ours: counted already), nodes and whiteouts are 0; exact until something is removed.
        self.size = 0
        self.size_known = self.fresh
        # New regular files go to the writers; only in a fresh diff dir, where the layer's own
        # bookkeeping (created, whited) knows everything that is there.
        self.writers = writers if mode == "overlay" and self.fresh else None
        self._handoff_dir: bytes | None = None  # a parent known to hold no pending file
        self.recorded = False  # rootless: some owner went into user.containers.override_stat

    def close(self) -> None:
        self.dirs.drop()
        os.close(self.root_fd)

    # -- confined path resolution --

    def dirfd(self, parts: Sequence[bytes], display: str, create: bool,
              cache: bool = True) -> int:
        """fd of the directory `parts` inside the root, never following a symlink (see
        DirFds.get): missing parents are made when `create`; a symlink or non-directory in
        the way is refused, or (a whiteout of this layer) replaced by a new dir."""
        fd = self.dirs.cached(parts, cache)  # (the usual case: no callbacks to build)
        if fd is not None:
            return fd
        return self.dirs.walk(parts, self._make_parent if create else None,
                              lambda fd, p: self._replace_parent(fd, p, display, create), cache)

    def _make_parent(self, fd: int, parts: Sequence[bytes]) -> int:
        comp = parts[-1]
        os.mkdir(comp, 0o755, dir_fd=fd)
        os.chmod(comp, 0o755, dir_fd=fd)  # implicit parents are 0755 whatever the umask
        path = join(parts)
        self.book.created.add(path)
        if path in self.book.whited and self.mode == "overlay":
            self.markers.set_opaque_at(fd, comp, path)
        return os.open(comp, DIR_FLAGS, dir_fd=fd)

    def _replace_parent(self, fd: int, parts: Sequence[bytes], display: str,
                        create: bool) -> int:
        comp = parts[-1]
        st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
        where = join(parts).decode("utf-8", "backslashreplace")
        if stat.S_ISLNK(st.st_mode):
            raise SymlinkParent(f"'{display}': parent '{where}' is a symlink; "
                                "refusing to write through it")
        if create and is_whiteout_stat(st) and join(parts) in self.book.whited:
            # `.wh.X` then `X/child` in one layer: X comes back as a new (opaque) directory.
            os.unlink(comp, dir_fd=fd)
            return self._make_parent(fd, parts)
        if not create:  # a non-directory parent: the path does not exist
            raise NotDir(errno.ENOENT, "parent is not a directory", where)
        raise ImageError(f"'{display}': parent '{where}' is not a directory")

    # -- the loop body --

    def apply(self, entry: TarEntry, reader: TarReader, sink: DataSink | None) -> None:
        parts = _split(entry.name, self.max_path)
        if (self.writers is not None and parts and entry.type in _FILE_TYPES
                and not parts[-1].startswith(WHITEOUT_PREFIX)
                and self._handoff(parts, entry, reader, sink)):
            return
        display = entry.display_name
        if not parts:
            if not entry.is_dir:
                raise UnsafeEntryError(f"'{display}': the root entry must be a directory")
            self._meta_now(self.root_fd, entry, is_dir=True, path=b"")
            return
        if not parts[-1].startswith(WHITEOUT_PREFIX):
            self._entry(parts, entry, reader, sink, display)
            return
        kind, target = classify(parts[-1], display)
        if kind == "meta":
            self.stats.skipped += 1
        elif kind == "opaque" or kind == "whiteout":
            self._sync()
            if kind == "opaque":
                self.stats.opaques += 1
            else:
                self.stats.whiteouts += 1
            if not self.markers.apply(kind, parts[:-1], target, entry, display):
                self.stats.ignored_whiteouts += 1
        else:
            self._entry(parts, entry, reader, sink, display)

    def _sync(self) -> None:
        """Wait for the writers: what comes next may see or touch a file handed to them."""
        if self.writers is not None and self.writers.pending:
            self.writers.sync()
            self._handoff_dir = None

    def _must_sync(self, path: bytes, entry: TarEntry) -> bool:
        """Could making `entry` at `path` see or touch a handed-off file that is not written
        yet? Only a new dir or symlink away from every pending path cannot."""
        book = self.book
        if entry.type not in (DIR, SYM) or path in book.whited:
            return True
        if path in book.created and not (entry.is_dir and path not in book.non_dirs):
            return True  # a clash (only dir over dir merges without looking at files)
        return self._pending_above(path)

    def _pending_above(self, path: bytes) -> bool:
        """Is `path`, or a dir it would be made in, a file still pending?"""
        pending = self.writers.pending if self.writers is not None else ()
        end = len(path)
        while end > 0:
            if path[:end] in pending:
                return True
            end = path.rfind(b"/", 0, end)
        return False

    def _handoff(self, parts: list[bytes], entry: TarEntry, reader: TarReader,
                 sink: DataSink | None) -> bool:
        """Hand a new small regular file to the writers; False when it must be made here."""
        writers = self.writers
        assert writers is not None
        path = join(parts)
        book = self.book
        if (entry.size > HANDOFF_MAX or path in book.created or path in book.whited
                or not self.exact_modes):  # (a writer sets no mode its umask would not take)
            return False
        slash = path.rfind(b"/")
        key = path[:slash] if slash >= 0 else b""
        if key != self._handoff_dir:
            # (files of one dir come one after the other: the checks below, once per dir)
            if self._pending_above(key):
                return False
            book.mark_parents(parts)
            self.dirfd(parts[:-1], entry.display_name, create=True)
            self._handoff_dir = key
        if self.deferred_links:
            self.deferred_links.pop(path, None)
        book.non_dirs.add(path)
        book.created.add(path)
        data = reader.read_data(HANDOFF_MAX)
        if reader.data_left:
            chunks = [data]
            while more := reader.read_data():
                chunks.append(more)
            data = b"".join(chunks)
        if sink is not None and data:
            sink(data)
        n = len(data)
        self.stats.bytes += n
        self.size += n
        writers.add(key, parts[-1], entry.mode, entry.uid, entry.gid, entry.mtime_ns,
                    entry.xattrs or None, data, path)
        return True

    def _entry(self, parts: list[bytes], entry: TarEntry, reader: TarReader,
               sink: DataSink | None, display: str) -> None:
        path = join(parts)
        if self.writers is not None and self.writers.pending and self._must_sync(path, entry):
            self._sync()
        book = self.book
        book.mark_parents(parts)
        base = parts[-1]
        self.deferred_links.pop(path, None)  # a later entry at the same path wins
        if entry.is_dir:
            book.non_dirs.discard(path)
        else:
            book.non_dirs.add(path)
        if entry.type == LNK:
            self.stats.hardlinks += 1  # counted here: LNK is the only kind with its own method
            if not self._link(parts, entry, display):
                self.deferred_links[path] = entry
            return
        if not (entry.is_file or entry.type in (DIR, SYM, CHR, BLK, FIFO)):
            raise ImageError(f"'{display}': unsupported entry type {entry.type!r}")
        pfd = self.dirfd(parts[:-1], display, create=True)
        book.created.add(path)
        # Create first and look only on a clash: in a fresh diff dir nothing is ever there.
        for attempt in (1, 2):
            try:
                self._create(pfd, base, path, entry, reader, sink)
                return
            except FileExistsError:
                if attempt == 2:
                    raise
            existing = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if entry.is_dir and stat.S_ISDIR(existing.st_mode):
                self._dir_entry(pfd, base, path, entry)  # dir over dir: merge attributes
                return
            self.remove(pfd, base, existing, path)

    def _create(self, pfd: int, base: bytes, path: bytes, entry: TarEntry, reader: TarReader,
                sink: DataSink | None) -> None:
        """Make the new entry `base`; FileExistsError when something is already there."""
        if entry.is_dir:
            os.mkdir(base, 0o700, dir_fd=pfd)
            self._dir_entry(pfd, base, path, entry)
        elif entry.is_file:
            self._file(pfd, base, entry, reader, sink)
        elif entry.type == SYM:
            os.symlink(entry.linkname, base, dir_fd=pfd)
            self.size += len(entry.linkname)  # a symlink's st_size: its target's length
            self._meta_at(pfd, base, entry, is_link=True, path=path)
        else:
            if self.mode == "overlay" and entry.type == CHR and not (entry.devmajor
                                                                     or entry.devminor):
                # In a diff dir it would hide the lower path: a deletion no `.wh.` entry made,
                # while the image (and a delete-mode flatten) has a device there.
                raise ImageError(f"'{entry.display_name}': a character device 0/0 is an "
                                 "overlay whiteout in a diff dir; overlay2 cannot store it")
            fmt = {CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[entry.type]
            if entry.type != FIFO and not (entry.devmajor < 1 << 12 and entry.devminor < 1 << 20):
                raise ImageError(f"'{entry.display_name}': device {entry.devmajor},"
                                 f"{entry.devminor} cannot exist on Linux (12-bit major, "
                                 "20-bit minor)")
            dev = os.makedev(entry.devmajor, entry.devminor) if entry.type != FIFO else 0
            try:
                os.mknod(base, fmt | (entry.mode & 0o777), dev, dir_fd=pfd)
            except PermissionError:
                if not self.rootless or entry.type == FIFO:
                    raise
                self._placeholder(pfd, base, entry)
                return
            self._meta_at(pfd, base, entry, is_link=False, path=path)

    def _placeholder(self, pfd: int, base: bytes, entry: TarEntry) -> None:
        """Rootless: a device node as an empty regular file recording what it is."""
        fd = os.open(base, FILE_FLAGS, entry.mode & 0o777, dir_fd=pfd)
        try:
            set_file_meta(fd, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs,
                          chown=self._needs_chown(entry), umask=self._made_mask, rootless=True,
                          kind=Override.of(entry))
            self.recorded = True
        finally:
            os.close(fd)

    def _dir_entry(self, pfd: int, base: bytes, path: bytes, entry: TarEntry) -> None:
        fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
        try:
            self._meta_now(fd, entry, is_dir=True, path=path)
        except BaseException:
            os.close(fd)
            raise
        self.dirs.put(path, fd)  # its children come next
        if self.mode == "overlay" and path in self.book.whited:
            self.markers.set_opaque_at(pfd, base, path)

    def _needs_chown(self, entry: TarEntry) -> bool:
        return not self.fresh or (entry.uid, entry.gid) != self.ids

    @property
    def _made_mask(self) -> int | None:
        """What took bits from the mode given at creation: the umask, or (None) not known."""
        return self.umask if self.exact_modes else None

    def _file(self, pfd: int, base: bytes, entry: TarEntry, reader: TarReader,
              sink: DataSink | None) -> None:
        fd = os.open(base, FILE_FLAGS, entry.mode & 0o777, dir_fd=pfd)
        try:
            while data := reader.read_data_view():
                write_all(fd, data)
                if sink is not None:
                    sink(data)
                self.stats.bytes += len(data)
                self.size += len(data)
            self._meta_now(fd, entry, is_dir=False, path=None)
        finally:
            os.close(fd)

    # -- metadata --

    def _xattrs(self, entry: TarEntry, setter: Callable[[str, bytes], None],
                regular: bool, path: bytes) -> None:
        side = self.stats.side
        self.stats.skipped += set_xattrs(
            entry.xattrs, setter, regular=regular, rootless=self.rootless,
            unsettable=lambda n, v: side.set_xattr(path, n, v))

    def _meta_now(self, fd: int, entry: TarEntry, *, is_dir: bool, path: bytes | None) -> None:
        """Owner, mode, xattrs (and times, or defer them for dirs) through an open fd."""
        if not is_dir:
            skipped, recorded = set_file_meta(
                fd, entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs,
                chown=self._needs_chown(entry), umask=self._made_mask,
                rootless=self.rootless)
            self.stats.skipped += skipped
            self.recorded = self.recorded or recorded
            return
        assert path is not None
        if try_chown(lambda: os.fchown(fd, entry.uid, entry.gid), self.rootless):
            set_override(fd, Override(entry.uid, entry.gid, entry.mode, "dir"))
            self.recorded = True
        if entry.xattrs:
            self._xattrs(entry, lambda n, v: os.setxattr(fd, n, v), regular=True, path=path)
            if ACL_XATTRS[1] in entry.xattrs:
                self.exact_modes = False  # (and no more handing off: see _handoff)
        self.dir_meta[path] = entry  # mode and times after the children (rootless: 0555)

    def _meta_at(self, pfd: int, base: bytes, entry: TarEntry, *, is_link: bool,
                 path: bytes) -> None:
        """Owner, mode, xattrs and times of a symlink or node, never following a symlink.
        Rootless, what it cannot carry goes to the layer's side record."""
        chown = self._needs_chown(entry)
        if chown and try_chown(lambda: os.chown(base, entry.uid, entry.gid, dir_fd=pfd,
                                                follow_symlinks=False), self.rootless):
            self.stats.side.set_stat(path, Override.of(entry))
        if entry.xattrs:
            proc = f"/proc/self/fd/{pfd}/".encode() + base
            self._xattrs(entry, lambda n, v: os.setxattr(proc, n, v, follow_symlinks=False),
                         regular=False, path=path)
        if not is_link and needs_chmod(entry.mode, entry.xattrs, self._made_mask):
            os.chmod(base, entry.mode, dir_fd=pfd)  # a node we just made: cannot be redirected
        os.utime(base, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    # -- removal --

    def remove(self, pfd: int, base: bytes, st: os.stat_result, path: bytes) -> None:
        """Remove `base` (at `path`) from `pfd`; `pfd` itself stays valid."""
        self.size_known = False
        self._handoff_dir = None  # a removed inode may live on through a hardlink
        if self.stats.side:
            self.stats.side.drop(path)
        if stat.S_ISDIR(st.st_mode):
            prefix = path + b"/"
            for p in [p for p in self.dir_meta if p == path or p.startswith(prefix)]:
                del self.dir_meta[p]
            self.markers.dir_removed(path)  # (the path may be a symlink next)
            self.dirs.drop(under=path)
        remove_at(pfd, base, st)

    # -- hardlinks --

    def _link(self, parts: list[bytes], entry: TarEntry, display: str) -> bool:
        """Make the link; False when its target does not exist yet (retried at the end)."""
        try:
            tparts = _split(entry.linkname, self.max_path)
        except UnsafeEntryError:
            target = entry.linkname.decode("utf-8", "backslashreplace")
            raise UnsafeEntryError(f"'{display}': hardlink target '{target}' escapes root") \
                from None
        if not tparts:
            raise UnsafeEntryError(f"'{display}': hardlink to the root directory")
        if tparts == parts:
            raise UnsafeEntryError(f"'{display}': hardlink to itself")
        try:
            tfd = self.dirfd(tparts[:-1], display, create=False, cache=False)
        except FileNotFoundError:
            return False
        try:
            tst = lstat_at(tparts[-1], tfd)
            if tst is None:
                return False
            if stat.S_ISDIR(tst.st_mode):
                raise UnsafeEntryError(f"'{display}': hardlink to a directory")
            if self.mode == "overlay" and is_whiteout_stat(tst):
                raise UnsafeEntryError(f"'{display}': hardlink to a whiteout would forge one")
            pfd = self.dirfd(parts[:-1], display, create=True)
            existing = lstat_at(parts[-1], pfd)
            if existing is not None:
                self.remove(pfd, parts[-1], existing, join(parts))
            # follow_symlinks=False: a hardlink to a symlink links the symlink itself.
            os.link(tparts[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd,
                    follow_symlinks=False)
            self.book.created.add(join(parts))
            return True
        finally:
            os.close(tfd)

    # -- the end --

    def finish(self) -> None:
        self._sync()  # hardlinks, markers and dir times look at every file
        for entry in self.deferred_links.values():
            parts = _split(entry.name, self.max_path)
            if not self._link(parts, entry, entry.display_name):
                raise ImageError(f"'{entry.display_name}': hardlink target "
                                 f"'{entry.linkname.decode('utf-8', 'backslashreplace')}' "
                                 "is not in the layer or below it")
        self.stats.ignored_whiteouts += self.markers.settle()
        if self.markers.root_opaque:
            if self.lowers is not None:
                self.dirs.drop()
                expand_root_opaque(self.root_fd, self.lowers, self.fmt)
            elif self.defer_root_opaque:
                self.stats.root_opaque = True
            else:
                raise ImageError("opaque marker on the layer root ('.wh..wh..opq'): overlayfs "
                                 "ignores it there; the lower layers are needed to expand it")
        self.dirs.drop()
        # Directory modes and times last: making children changes a dir's mtime. Deepest
        # first, through the fd cache: the one walk down also caches the parents to come.
        for path, entry in sorted(self.dir_meta.items(), key=lambda kv: -kv[0].count(b"/")):
            parts = path.split(b"/") if path else []
            fd = self.dirfd(parts, path.decode("utf-8", "backslashreplace"), create=False)
            os.fchmod(fd, entry.mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        self.dirs.drop()


def expand_root_opaque(diff: int | str | bytes, lowers: Sequence[str | bytes],
                       fmt: OverlayFormat = TRUSTED) -> None:
    """overlayfs ignores opaque on a layer's root, so hide the lowers' root entries explicitly:
    a whiteout for each lower root name the layer lacks, opaque for each dir it has."""
    root_fd = diff if isinstance(diff, int) else os.open(diff, DIR_FLAGS)
    try:
        before = os.fstat(root_fd)
        names: set[bytes] = set()
        for lower in lowers:
            names.update(os.listdir(os.fsencode(lower)))
        for name in sorted(names):
            st = lstat_at(name, root_fd)
            if st is None:
                os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=root_fd)
            elif stat.S_ISDIR(st.st_mode):
                fd = os.open(name, DIR_FLAGS, dir_fd=root_fd)
                try:
                    os.setxattr(fd, fmt.opaque_xattr, b"y")
                finally:
                    os.close(fd)
        os.utime(root_fd, ns=(before.st_atime_ns, before.st_mtime_ns))
    finally:
        if not isinstance(diff, int):
            os.close(root_fd)
