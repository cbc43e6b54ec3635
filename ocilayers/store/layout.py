"""Where everything lives under a store root (docs/store-format.md), the store lock, and the
small file primitives every room of the store shares."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

from ocilayers import userns
from ocilayers.errors import RootlessError, StoreError
from ocilayers.fsutil import write_atomic
from ocilayers.spec import Digest
from ocilayers.whiteout import OverlayFormat

LOCK_NAME = "ocilayers.lock"
# A rootless store's record (docs/store-format.md): its overlay xattr namespace ("user": the
# diff dirs hold user.overlay.* markers, for `-o userxattr` mounts) and the ID mapping its
# owners were made under.
ROOTLESS_RECORD = "rootless.json"


def default_root() -> str:
    """$OCILAYERS_ROOT; /var/lib/ocilayers as root; else the XDG data dir."""
    env = os.environ.get("OCILAYERS_ROOT")
    if env:
        return env
    if not userns.is_rootless():
        return "/var/lib/ocilayers"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(xdg, "ocilayers")


def read_text(path: str) -> str:
    """A store file's text (no trailing newline is added or stripped); corrupt if not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError(f"{path}: corrupt (not UTF-8)") from None


def write_new(path: str, data: bytes, mode: int) -> None:
    """A file that must not exist yet (inside a staging dir or write-set)."""
    with open(path, "xb") as f:
        f.write(data)
    os.chmod(path, mode)


def held_by_other(path: str, *, directory: bool = False, shared: bool = False) -> bool | None:
    """Is the flock on `path` held by a live process? None when `path` is gone.

    The store's crash-safe markers (staging dirs, claims) are flock-held by the process that
    made them; a crash drops the lock, so a marker nobody holds is stale."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class StoreLayout:
    """The paths of one store root, its set-up and its lock."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        self.overlay = os.path.join(self.root, "overlay2")
        self.links = os.path.join(self.overlay, "l")
        self.image_root = os.path.join(self.root, "image", "overlay2")
        self.layerdb = os.path.join(self.image_root, "layerdb")
        self.layerdb_tmp = os.path.join(self.layerdb, "tmp")
        self.mounts = os.path.join(self.layerdb, "mounts")
        self.imagedb = os.path.join(self.image_root, "imagedb")
        self.repositories_path = os.path.join(self.image_root, "repositories.json")
        self._fmt: OverlayFormat | None = None

    # -- paths --

    def layer_meta(self, chain_id: Digest) -> str:
        """`layerdb/sha256/<chain hex>`."""
        return os.path.join(self.layerdb, chain_id.algorithm, chain_id.hex)

    def layer_path(self, cache_id: str) -> str:
        """`overlay2/<cache-id>`."""
        return os.path.join(self.overlay, cache_id)

    def image_content(self, image_id: Digest) -> str:
        return os.path.join(self.imagedb, "content", image_id.algorithm, image_id.hex)

    def image_metadata(self, image_id: Digest) -> str:
        return os.path.join(self.imagedb, "metadata", image_id.algorithm, image_id.hex)

    # -- set-up and locking --

    def init(self) -> None:
        """Create the store's dirs (and the root's missing parents, as dockerd's --data-root
        does). Modes as dockerd 20.10 makes them (checked against a real daemon's)."""
        self._check_parents()
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        for path, mode in ((self.root, 0o710), (self.overlay, 0o710), (self.links, 0o700),
                           (os.path.join(self.root, "image"), 0o700), (self.image_root, 0o700),
                           (self.layerdb, 0o700), (os.path.join(self.layerdb, "sha256"), 0o755),
                           (self.layerdb_tmp, 0o755),
                           (self.imagedb, 0o700),
                           (os.path.join(self.imagedb, "content"), 0o700),
                           (os.path.join(self.imagedb, "content", "sha256"), 0o700),
                           (os.path.join(self.imagedb, "metadata"), 0o700),
                           (os.path.join(self.imagedb, "metadata", "sha256"), 0o700)):
            try:
                os.mkdir(path, mode)
                os.chmod(path, mode)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise StoreError(f"{path}: exists and is not a directory") from None

        self._record_rootless()

    # -- rootless --

    def rootless_record(self) -> dict[str, Any] | None:
        """The store's rootless record, or None for a rootful store."""
        path = os.path.join(self.root, ROOTLESS_RECORD)
        try:
            doc = json.loads(read_text(path))
        except FileNotFoundError:
            return None
        except ValueError:
            raise StoreError(f"{path}: corrupt (not JSON)") from None
        if not isinstance(doc, dict) or doc.get("xattr_namespace") != "user":
            raise StoreError(f"{path}: not a rootless store record")
        return doc

    def overlay_format(self) -> OverlayFormat:
        """How this store's diff dirs hold overlay metadata: a rootless store's in `user.*`
        (recording what it cannot make), a rootful one's in `trusted.*`."""
        if self._fmt is None:
            rootless = self.rootless_record() is not None
            self._fmt = (OverlayFormat("user", rootless=True) if rootless
                         else OverlayFormat("trusted", rootless=userns.is_rootless()))
        return self._fmt

    def _record_rootless(self) -> None:
        """In rootless mode, a store gets its record when it is made (and an older rootless
        store when it is next written); the record's ID mapping must match this process's."""
        if not userns.rootless_mode():
            return
        here = userns.record_of_process()
        doc = self.rootless_record()
        if doc is None:
            _check_user_xattrs(self.root)
            if not self._is_empty():
                raise self._made_by_root()
            write_atomic(os.path.join(self.root, ROOTLESS_RECORD),
                         json.dumps(here, indent=2).encode() + b"\n", 0o644)
            self._fmt = None
            return
        userns.check_record(doc, here, self.root)

    def _made_by_root(self) -> RootlessError:
        return RootlessError(f"{self.root}: a store made by root (overlay metadata in trusted.* "
                             "xattrs) cannot be used rootless: use it as root, or another "
                             "--root")

    def _is_empty(self) -> bool:
        return not any(n != "l" for n in os.listdir(self.overlay))

    def _check_parents(self) -> None:
        """A root below something that is not a dir gets a message that says so (mkdir
        would say `File exists` or `Not a directory`)."""
        path = self.root
        while True:
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent
            try:
                os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue  # (NotADirectoryError: a component further up is the culprit)
            if not os.path.isdir(path):
                raise StoreError(f"{self.root}: cannot make the store here: {path} is not a "
                                 "directory")
            return

    def exists(self) -> bool:
        return os.path.isdir(self.layerdb) and os.path.isdir(self.overlay)

    def require(self) -> None:
        if not self.exists():
            raise StoreError(f"{self.root}: no store here (run `ocilayers unpack` first, or "
                             "pass --root)")
        if userns.rootless_mode():  # reading too: under another mapping owners would lie
            doc = self.rootless_record()
            if doc is None:
                raise self._made_by_root()
            userns.check_record(doc, userns.record_of_process(), self.root)

    def _open_lock(self) -> int:
        return os.open(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                       0o600)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise registration and removal across processes (flock on a file in the root)."""
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock_if_free(self) -> Iterator[bool]:
        """The lock if no one holds it and this process may take it (True), else nothing
        (False): for work a reader may do in passing, or skip (the scan cache)."""
        try:
            fd = self._open_lock()
        except OSError:
            yield False  # a read-only store, or another user's
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _check_user_xattrs(root: str) -> None:
    """A rootless store keeps overlay markers and records in user.* xattrs."""
    try:
        os.setxattr(root, "user.ocilayers.probe", b"1")
        os.removexattr(root, "user.ocilayers.probe")
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM):
            raise
        raise RootlessError(f"{root}: its file system has no user.* xattrs, which a rootless "
                            "store needs (tmpfs has them only from Linux 6.6): put the store on "
                            "ext4, xfs or btrfs (--root)") from None


@contextlib.contextmanager
def held_interrupt() -> Iterator[None]:
    """Hold Ctrl-C back while the store changes in steps that belong together (a layer's
    registration; an image and its tags): the KeyboardInterrupt comes right after them,
    never between two. Only Python's default SIGINT handler, in the main thread, is held."""
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if held:
            raise KeyboardInterrupt
