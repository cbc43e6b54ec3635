"""Records of the mounts ocilayers made (`<root>/ocilayers/mounts/`, ocilayers' own files,
which dockerd ignores): what is mounted where, in which mount namespace, using which layers.

`rmi` and `prune` keep every layer a live mount uses, and `umount` unmounts only what has a
record. /proc/self/mountinfo shows only the caller's namespace, so a record is judged there
only: in its own namespace it is live while its target is a mount point; a record from
another namespace is live while that namespace still exists (some process is in it).
Image views are counted once; a container's read-write mount counts its users (`refs`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

from ocilayers.errors import StoreError
from ocilayers.fsutil import write_atomic
from ocilayers.mount import mount_namespace, mounted_at
from ocilayers.store.layout import StoreLayout


@dataclass(frozen=True)
class MountRecord:
    target: str  # absolute path, as mounted
    mnt_ns: str  # `mnt:[<inode>]` of the namespace it was made in
    pid: int  # the process that made it (a quick way to find the namespace again)
    kind: str  # "image" (a read-only view) or "container" (its read-write mount)
    chains: tuple[str, ...]  # the ChainIDs of the layers it uses, base first
    image_id: str | None = None
    container_id: str | None = None
    refs: int = 1  # container mounts: how many users; image views: always 1

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.mnt_ns}\0{self.target}".encode(
            "utf-8", "surrogateescape")).hexdigest()[:32]


def _namespace_alive(ns: str, pid: int) -> bool:
    """Does a process still live in mount namespace `ns`? (The creator first, then all.)"""
    with contextlib.suppress(OSError):
        if mount_namespace(str(pid)) == ns:
            return True
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if mount_namespace(entry) == ns:
                        return True
    return False


class MountStore:
    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout
        self.dir = os.path.join(layout.root, "ocilayers", "mounts")

    def _path(self, rec: MountRecord) -> str:
        return os.path.join(self.dir, rec.key + ".json")

    def all(self) -> Iterator[MountRecord]:
        """Every record, live or not (see `live`)."""
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.dir)):
                if not name.endswith(".json"):
                    continue
                path = os.path.join(self.dir, name)
                try:
                    with open(path, "rb") as f:
                        obj = json.loads(f.read())
                    obj["chains"] = tuple(obj["chains"])
                    yield MountRecord(**obj)
                except FileNotFoundError:
                    continue
                except (ValueError, TypeError, KeyError) as exc:
                    raise StoreError(f"{path}: corrupt mount record: {exc}") from None

    @staticmethod
    def is_live(rec: MountRecord) -> bool:
        here = mount_namespace()
        if rec.mnt_ns == here:
            return mounted_at(rec.target) is not None
        return _namespace_alive(rec.mnt_ns, rec.pid)

    def live(self) -> list[MountRecord]:
        """The records still in use; stale ones are removed (call under the store lock)."""
        out = []
        for rec in self.all():
            if self.is_live(rec):
                out.append(rec)
            else:
                self.remove(rec)
        return out

    def find(self, target: str) -> MountRecord | None:
        """This namespace's record for `target`."""
        want = MountRecord(os.path.abspath(target), mount_namespace(), 0, "", ())
        path = self._path(want)
        for rec in self.all():
            if self._path(rec) == path:
                return rec
        return None

    def add(self, target: str, kind: str, chains: list[str], *, image_id: str | None = None,
            container_id: str | None = None) -> MountRecord:
        """Record a mount about to be made in this namespace (before the mount call, so a
        crash leaves a stale record, never a mount without one)."""
        rec = MountRecord(os.path.abspath(target), mount_namespace(), os.getpid(), kind,
                          tuple(chains), image_id, container_id)
        self.write(rec)
        return rec

    def write(self, rec: MountRecord) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        write_atomic(self._path(rec), json.dumps(asdict(rec), sort_keys=True).encode(), 0o600)

    def add_ref(self, rec: MountRecord, n: int) -> MountRecord:
        new = replace(rec, refs=rec.refs + n)
        self.write(new)
        return new

    def remove(self, rec: MountRecord) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(rec))

    def using(self, chains: set[str]) -> list[MountRecord]:
        """Live mounts that use any of `chains`."""
        return [r for r in self.live() if chains.intersection(r.chains)]
