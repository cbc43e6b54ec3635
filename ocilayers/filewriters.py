"""File writers: other processes (or threads) that make a layer's new regular files while
`apply_layer` goes on reading the tar. One layer then uses every core.

Making a small file costs the kernel about as much as parsing its header costs Python, and the
two ran one after the other on one core. The applier (`extract._Applier`) stays the one place
that reads the tar, decides what every entry means and keeps the layer's bookkeeping; it hands
a writer only a new regular file in a fresh diff dir, whose parent dir it has made already:
(parent dir, name, mode, owner, mtime, xattrs, data). Anything that could see or touch such a
file before it is written (an entry at its path or below it, a clash, a marker, a hardlink, the
end of the layer) first waits for every writer to catch up (`sync`).

Confinement stays in every writer: the parent dir is resolved from the writer's own fd of the
target, component by component with O_NOFOLLOW, and the file is made with O_CREAT|O_EXCL|
O_NOFOLLOW. Metadata is set exactly as the applier sets it on a file it writes itself
(`set_file_meta`, shared by both).

Processes are plain os.fork() children fed through a pipe (batches pickled), started before
any other thread exists (a fork copies no other thread). `OCILAYERS_FILE_WRITERS` picks the
kind for measuring: `procs` (default), `threads`, or `off`; `procs:N` / `threads:N` sets how
many (default: one per core) and uses them for every layer, however small (tests do).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ocilayers.errors import OCILayersError
from ocilayers.forking import can_fork, pickled_error, prepare_children, start_child, write_all
from ocilayers.fsutil import DIR_FLAGS
from ocilayers.overrides import OVERRIDE_XATTR, Override, is_reserved, record_name
from ocilayers.whiteout import escape_xattr

FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
HANDOFF_MAX = 64 << 10  # bigger files are written by the applier: they cost bytes, not entries
_BATCH_ENTRIES = 256
_BATCH_BYTES = 1 << 20
_DIR_CACHE = 64
_MAX_PENDING = 1 << 16
_FRAME = struct.Struct("<cI")
_BATCH, _SYNC, _END = b"B", b"S", b"E"
ENV = "OCILAYERS_FILE_WRITERS"
MIN_LAYER = 4 << 20  # compressed bytes below which a layer is not worth the forks

# (parent dir key, name, mode, uid, gid, mtime_ns, xattrs or None, data)
Job = tuple[bytes, bytes, int, int, int, int, "dict[str, bytes] | None", bytes]


# -- metadata of a new regular file, shared with the applier --

def try_chown(fn: Callable[[], None], rootless: bool) -> int:
    """Run a chown; in rootless mode an owner the user cannot give is not given (returns 1:
    the caller records it)."""
    try:
        fn()
    except OSError as exc:
        # EPERM: not root; EINVAL: the id has no mapping in this user namespace.
        if not rootless or exc.errno not in (errno.EPERM, errno.EINVAL):
            raise
        return 1
    return 0


Unsettable = Callable[[str, bytes], None]


def set_xattrs(xattrs: dict[str, bytes], setter: Callable[[str, bytes], None], *,
               regular: bool, rootless: bool, unsettable: Unsettable | None = None) -> int:
    """Set an entry's xattrs (overlay ones escaped); returns how many were skipped.

    Rootless, an xattr that cannot be set (trusted.*, or any on a symlink or fifo) is recorded
    (overrides): as a `user.ocilayers.xattr.*` xattr where the entry can carry one
    (`regular`: files and dirs), else through `unsettable` (the layer's side record)."""
    skipped = 0
    for original, value in xattrs.items():
        # An image must never forge overlay metadata: escape it (see whiteout.escape_xattr).
        name = escape_xattr(original)
        if rootless and is_reserved(original):
            name = record_name(original)  # never to be taken for one of our records
        try:
            setter(name, value)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                exc.add_note(f"set xattr {name}")
                raise
            if rootless and regular:
                try:
                    setter(record_name(original), value)
                except OSError as exc2:
                    exc2.add_note(f"record xattr {original} as {record_name(original)} (a "
                                  "rootless store needs user.* xattrs on its file system)")
                    raise
            elif rootless and unsettable is not None:
                unsettable(original, value)
            elif rootless or (not regular and name.startswith("user.")):
                skipped += 1  # e.g. user.* is not allowed on symlinks
            else:
                exc.add_note(f"set xattr {name}")
                raise
    return skipped


ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def needs_chmod(mode: int, xattrs: dict[str, bytes] | None, umask: int | None) -> bool:
    """Is `mode` not the mode of a file or node just made with `mode & 0o777`, which `umask`
    alone took bits from (None: not known, a default ACL may have)? Also when the entry
    carries a POSIX ACL: setting one rewrites the mode's group and other bits. (A chown
    clears only setuid/setgid, and a mode with them was never the one made.)"""
    return (umask is None or mode != (mode & 0o777 & ~umask)
            or (xattrs is not None and (ACL_XATTRS[0] in xattrs or ACL_XATTRS[1] in xattrs)))


def default_acl(fd: int) -> bool:
    """Has the dir `fd` a default ACL (which then decides the mode of what is made in it)?"""
    try:
        os.getxattr(fd, ACL_XATTRS[1])
    except OSError:  # ENODATA: none; EOPNOTSUPP: no ACLs on this file system
        return False
    return True


def set_file_meta(fd: int, mode: int, uid: int, gid: int, mtime_ns: int,
                  xattrs: dict[str, bytes] | None, *, chown: bool, umask: int | None,
                  rootless: bool, kind: Override | None = None) -> tuple[int, bool]:
    """Owner, xattrs, mode and times of a regular file just made with `mode & 0o777`, which
    `umask` alone took bits from (None: not known, a default ACL may have: the mode is set
    whatever it is); returns how many settings a rootless run skipped, and whether it
    recorded an owner. Rootless, an owner that cannot be given is recorded in
    `user.containers.override_stat`, as is `kind` (the device a placeholder file stands for)
    always."""
    skipped = 0
    record = kind
    if chown and try_chown(lambda: os.fchown(fd, uid, gid), rootless):
        record = record or Override(uid, gid, mode, "file")
    if xattrs:
        skipped += set_xattrs(xattrs, lambda n, v: os.setxattr(fd, n, v), regular=True,
                              rootless=rootless)
    if record is not None:
        set_override(fd, record)
    # The header's mode, as dockerd sets it (after chown, which clears setuid/setgid, and the
    # xattrs, among them an ACL that rewrites it) where the mode made is not it already.
    if needs_chmod(mode, xattrs, umask):
        os.fchmod(fd, mode)
    os.utime(fd, ns=(mtime_ns, mtime_ns))
    return skipped, record is not None


def set_override(fd: int, record: Override) -> None:
    try:
        os.setxattr(fd, OVERRIDE_XATTR, record.encode())
    except OSError as exc:
        exc.add_note(f"record the owner in {OVERRIDE_XATTR} (a rootless store needs user.* "
                     "xattrs on its file system)")
        raise


# -- the writing side --

class _Writer:
    """Makes handed-off files below `target` (in a writer process or thread)."""

    def __init__(self, target: str | bytes, ids: tuple[int, int], umask: int,
                 rootless: bool) -> None:
        self.root = os.open(target, DIR_FLAGS)
        self.ids = ids
        self.umask = umask
        self.rootless = rootless
        self.skipped = 0
        self.recorded = False  # made a user.containers.override_stat record
        self._fds: dict[bytes, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root)

    def _dir(self, key: bytes) -> int:
        """The dir `key` below the root (made by the applier already), resolved without ever
        following a symlink; cached, owned by the cache."""
        fd = self._fds.get(key)
        if fd is not None:
            return fd
        if len(self._fds) >= _DIR_CACHE:
            for old in list(self._fds)[: _DIR_CACHE // 2]:
                os.close(self._fds.pop(old))
        fd = os.dup(self.root)
        try:
            if key:
                for comp in key.split(b"/"):
                    nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._fds[key] = fd
        return fd

    def run(self, jobs: Sequence[Job]) -> None:
        ids, umask, rootless = self.ids, self.umask, self.rootless
        for key, base, mode, uid, gid, mtime_ns, xattrs, data in jobs:
            try:
                fd = os.open(base, FILE_FLAGS, mode & 0o777, dir_fd=self._dir(key))
                try:
                    if data:
                        n = os.write(fd, data)
                        if n < len(data):
                            write_all(fd, memoryview(data)[n:])
                    if xattrs or (uid, gid) != ids or mode != (mode & 0o777 & ~umask):
                        skipped, recorded = set_file_meta(
                            fd, mode, uid, gid, mtime_ns, xattrs, chown=(uid, gid) != ids,
                            umask=umask, rootless=rootless)
                        self.skipped += skipped
                        self.recorded = self.recorded or recorded
                    else:
                        os.utime(fd, ns=(mtime_ns, mtime_ns))
                finally:
                    os.close(fd)
            except OSError as exc:
                shown = (key + b"/" + base if key else base).decode("utf-8", "backslashreplace")
                exc.add_note(f"apply entry '{shown}'")
                raise


# -- the handing side --

class FileWriters:
    """Writers for one layer; the applier calls `add`, `sync` and, at the end, `close`."""

    def __init__(self, target: str | bytes, count: int, *, threads: bool = False,
                 rootless: bool = False) -> None:
        umask = os.umask(0)
        os.umask(umask)
        self._args = (target, (os.geteuid(), os.getegid()), umask, rootless)
        self.threads = threads
        self.count = count
        self.pending: set[bytes] = set()  # paths handed off since the last sync
        self.skipped = 0
        self.recorded = False  # (after close) a writer recorded an owner (rootless)
        self._batch: list[Job] = []
        self._bytes = 0
        self._next = 0
        self._dirty = [False] * count  # sent work since its last sync
        self._closed = False
        self._procs: list[tuple[int, int, int]] = []  # (pid, to-writer fd, from-writer fd)
        self._queues: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._writers: list[_Writer] = []
        try:
            for _ in range(count):
                if threads:
                    self._start_thread()
                else:
                    self._start_process()
        except BaseException:
            self.abort()
            raise

    # -- start --

    def _start_process(self) -> None:
        to_r, to_w = os.pipe2(os.O_CLOEXEC)
        from_r, from_w = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(to_w, 1031, 1 << 20)  # F_SETPIPE_SZ: a whole batch in flight
        prepare_children()
        parent = os.getpid()
        try:
            pid = os.fork()
        except BaseException:
            for fd in (to_r, to_w, from_r, from_w):
                os.close(fd)
            raise
        if pid == 0:
            _process_main(self._args, to_r, from_w, parent)
        os.close(to_r)
        os.close(from_w)
        self._procs.append((pid, to_w, from_r))

    def _start_thread(self) -> None:
        import queue

        q: queue.Queue[list[Job] | None] = queue.Queue(4)
        writer = _Writer(*self._args)
        self._writers.append(writer)
        t = threading.Thread(target=self._thread_main, args=(writer, q),
                             name="ocilayers-file-writer", daemon=True)
        self._queues.append(q)
        self._threads.append(t)
        t.start()

    def _thread_main(self, writer: _Writer, q: Any) -> None:
        failed = False
        while True:
            jobs = q.get()
            try:
                if jobs is None:
                    return
                if not failed:
                    writer.run(jobs)
            except BaseException as exc:
                failed = True
                self._errors.append(exc)
            finally:
                q.task_done()

    # -- the applier's side --

    def add(self, key: bytes, base: bytes, mode: int, uid: int, gid: int, mtime_ns: int,
            xattrs: dict[str, bytes] | None, data: bytes, path: bytes) -> None:
        """Hand off the new file `path` (= key/base): written some time before `sync` returns."""
        self._batch.append((key, base, mode, uid, gid, mtime_ns, xattrs, data))
        self.pending.add(path)
        self._bytes += len(data)
        if len(self._batch) >= _BATCH_ENTRIES or self._bytes >= _BATCH_BYTES:
            self._send()
            if len(self.pending) >= _MAX_PENDING:
                self.sync()  # (the set of paths in flight stays bounded)

    def _send(self) -> None:
        batch, self._batch, self._bytes = self._batch, [], 0
        if not batch:
            return
        i = self._next
        self._next = (i + 1) % self.count
        self._dirty[i] = True
        if self.threads:
            self._check_threads()
            self._queues[i].put(batch)
            return
        payload = pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)
        try:
            write_all(self._procs[i][1], _FRAME.pack(_BATCH, len(payload)) + payload)
        except BrokenPipeError:
            self._reply(i)  # it stopped: its error says why
            raise OCILayersError("a file writer process stopped early") from None

    def sync(self) -> None:
        """Every file handed off so far is written (or its error raised)."""
        if not self.pending:
            return
        self._send()
        if self.threads:
            for q, dirty in zip(self._queues, self._dirty, strict=True):
                if dirty:
                    q.join()
            self._check_threads()
        else:
            for i, dirty in enumerate(self._dirty):
                if dirty:
                    self._tell(i, _SYNC)
            for i, dirty in enumerate(self._dirty):
                if dirty:
                    self._reply(i)
        self._dirty = [False] * self.count
        self.pending.clear()

    def close(self) -> int:
        """Write what is left, stop the writers; returns the settings they skipped."""
        if self._closed:
            return self.skipped
        self.sync()
        self._closed = True
        if self.threads:
            for q in self._queues:
                q.put(None)
            for t in self._threads:
                t.join()
            for w in self._writers:
                self.skipped += w.skipped
                self.recorded = self.recorded or w.recorded
                w.close()
            self._check_threads()
            return self.skipped
        for i in range(self.count):
            self._tell(i, _END)
        try:
            for i in range(self.count):
                skipped, recorded = self._reply(i)
                self.skipped += skipped
                self.recorded = self.recorded or recorded
        finally:
            self.abort()
        return self.skipped

    def abort(self) -> None:
        """Stop every writer now (after an error elsewhere): nothing more is written."""
        self._closed = True
        for pid, w, r in self._procs:
            for fd in (w, r):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
        self._procs = []
        for q in self._queues:  # threads: drop queued work, then stop
            with contextlib.suppress(Exception):
                while True:
                    q.get_nowait()
                    q.task_done()
            q.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        self._queues = []
        for writer in self._writers:
            with contextlib.suppress(OSError):
                writer.close()
        self._writers = []

    def _tell(self, i: int, kind: bytes) -> None:
        with contextlib.suppress(BrokenPipeError):  # it stopped: its answer says why
            write_all(self._procs[i][1], _FRAME.pack(kind, 0))

    def _check_threads(self) -> None:
        if self._errors:
            raise self._errors[0]

    def _reply(self, i: int) -> tuple[int, bool]:
        """Read writer `i`'s answer: its count of skipped settings and whether it recorded an
        owner (at the end; (0, False) at a sync), or its error raised."""
        rfd = self._procs[i][2]
        head = _read_exact(rfd, _FRAME.size)
        if len(head) < _FRAME.size:
            raise OCILayersError("a file writer process died before it was done")
        _, n = _FRAME.unpack(head)
        ok, value, _tb = pickle.loads(_read_exact(rfd, n))
        if not ok:
            raise value
        return value or (0, False)


def _max_fd() -> int:
    try:
        return max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n > 0:
        data = os.read(fd, n)
        if not data:
            break
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def _answer(fd: int, payload: bytes) -> None:
    write_all(fd, _FRAME.pack(_SYNC, len(payload)) + payload)


def _process_main(args: tuple[Any, ...], rfd: int, wfd: int, parent: int) -> NoReturn:
    """A writer process: batches in until the end, an answer per sync and one at the end."""
    status = 1
    try:
        start_child(parent)
        # Keep only its two pipe ends: no lock, no other writer's pipe, nothing of the
        # applier's stays open for as long as this process lives.
        low, high = sorted((rfd, wfd))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, _max_fd())
        import gc

        gc.disable()  # the loop makes no cycles
        writer = _Writer(*args)
        ok = pickle.dumps((True, None, ""), pickle.HIGHEST_PROTOCOL)
        while True:
            head = _read_exact(rfd, _FRAME.size)
            if len(head) < _FRAME.size:
                break  # the applier is gone
            kind, n = _FRAME.unpack(head)
            if kind == _BATCH:
                try:
                    writer.run(pickle.loads(_read_exact(rfd, n)))
                except BaseException as exc:
                    _answer(wfd, pickled_error(exc))
                    break
            elif kind == _SYNC:
                _answer(wfd, ok)
            else:
                _answer(wfd, pickle.dumps((True, (writer.skipped, writer.recorded), ""),
                                          pickle.HIGHEST_PROTOCOL))
                break
        status = 0
    finally:
        os._exit(status)


def chosen(layer_size: int | None = None, busy: int = 1) -> tuple[str, int]:
    """The kind of writers to use (`procs`, `threads` or `off`) and how many, from
    `OCILAYERS_FILE_WRITERS` and the machine; `off` for a layer too small to gain. `busy`
    layer builds run at once, this one included: alone, a build gets a writer per core;
    beside others, the cores they leave (on 2 cores: none; writers beside busy cores only
    add copying)."""
    cores = os.cpu_count() or 1
    kind, _, count = os.environ.get(ENV, "procs").partition(":")
    if kind not in ("procs", "threads", "off"):
        raise OCILayersError(f"{ENV}={os.environ[ENV]!r}: expected procs[:N], threads[:N] "
                             "or off")
    try:
        n = int(count) if count else (cores if busy <= 1 else cores - busy)
    except ValueError:
        raise OCILayersError(f"{ENV}: {count!r} is not a number") from None
    if kind == "off" or n < 1 or (not count and cores < 2):
        return "off", 0
    if not count and layer_size is not None and layer_size < MIN_LAYER:
        return "off", 0  # (a count given forces them, as tests do on tiny layers)
    if kind == "procs" and not can_fork():
        return "off", 0
    return kind, n


def start(target: str | bytes, layer_size: int | None = None, *,
          rootless: bool = False, busy: int = 1) -> FileWriters | None:
    """File writers for a layer about to be applied into the fresh dir `target`, or None
    where they would not pay (one core, a small layer) or cannot run (a process with other
    threads cannot fork safely). Call it before starting any thread of your own."""
    kind, n = chosen(layer_size, busy)
    if kind == "off":
        return None
    return FileWriters(target, n, threads=kind == "threads", rootless=rootless)
