"""Containers in the store, as dockerd lays them out (docs/store-format.md "Containers"): an
init layer `overlay2/<mount-id>-init` on the image's top layer, a read-write layer
`overlay2/<mount-id>` on it, and `layerdb/mounts/<container id>/{mount-id,init-id,parent}`.
Names, commands and a copy of the base image's config live in ocilayers' own files,
`<root>/ocilayers/containers/<id>/`, out of dockerd's `containers/` (which it parses at start).

Crash safety: the metadata comes first, then the layer dirs, and `layerdb/mounts/<id>` last:
until that rename the dirs are orphans and the metadata stale, which `prune` removes. `remove`
goes the other way round."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from ocilayers.errors import StoreError
from ocilayers.fsutil import rmtree, write_atomic
from ocilayers.spec import Digest, now_rfc3339
from ocilayers.store.layers import MAX_DEPTH, LayerStore
from ocilayers.store.layout import StoreLayout, read_text, write_new

# docker's container name rule (daemon/names: validContainerNamePattern)
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
_ID_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class MountRecord:
    """One `layerdb/mounts/<container id>/` entry; a missing file reads as None."""

    container_id: str
    mount_id: str | None
    init_id: str | None
    parent: str | None  # the image's top ChainID, as written


@dataclass(frozen=True)
class Container:
    """ocilayers' record of a container (`container.json`)."""

    id: str
    mount_id: str
    image_id: str
    parent: str  # the image's top ChainID
    created: str  # RFC 3339, UTC
    command: tuple[str, ...] = ()
    name: str | None = None
    runs: tuple[tuple[str, ...], ...] = field(default=())  # commands of `run` steps

    @property
    def init_id(self) -> str:
        return self.mount_id + "-init"

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def to_json(self) -> dict[str, object]:
        obj = asdict(self)
        obj["command"] = list(self.command)
        obj["runs"] = [list(r) for r in self.runs]
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> Container:
        command = obj.get("command") or []
        runs = obj.get("runs") or []
        assert isinstance(command, list) and isinstance(runs, list)
        return cls(str(obj["id"]), str(obj["mount_id"]), str(obj["image_id"]),
                   str(obj["parent"]), str(obj["created"]), tuple(map(str, command)),
                   None if obj.get("name") is None else str(obj["name"]),
                   tuple(tuple(map(str, r)) for r in runs))


def created_key(created: str) -> tuple[str, str]:
    """A sort key for `now_rfc3339` times in time order: the string's own order is not
    (trailing zeros are trimmed, so "...00Z" sorts after "...00.5Z")."""
    whole, _, frac = created.removesuffix("Z").partition(".")
    return whole, frac.ljust(9, "0")


class ContainerStore:
    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout
        self.meta = os.path.join(layout.root, "ocilayers", "containers")

    # -- layerdb/mounts (dockerd's view) --

    def mounts(self) -> list[MountRecord]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.layout.mounts)):
                d = os.path.join(self.layout.mounts, name)
                values: list[str | None] = []
                for f in ("mount-id", "init-id", "parent"):
                    try:
                        values.append(read_text(os.path.join(d, f)))
                    except (FileNotFoundError, NotADirectoryError):
                        values.append(None)
                out.append(MountRecord(name, *values))
        return out

    def using(self, image_top: Digest | None) -> list[str]:
        """Containers whose parent is this chain: they block removing the image."""
        if image_top is None:
            return []
        names = {c.id: c.name for c in self.all()}
        return [names.get(m.container_id) or m.container_id[:12]
                for m in self.mounts() if m.parent == str(image_top)]

    def parents(self) -> list[Digest]:
        """Every container's parent chain (their layers must stay)."""
        return [Digest.parse(m.parent) for m in self.mounts() if m.parent]

    def cache_ids(self) -> set[str]:
        """The layer dirs containers own (rw and init layers)."""
        return {x for m in self.mounts() for x in (m.mount_id, m.init_id) if x is not None}

    # -- ocilayers' records --

    def _dir(self, container_id: str) -> str:
        if not _ID_RE.fullmatch(container_id):
            raise StoreError(f"corrupt container id {container_id[:80]!r}")
        return os.path.join(self.meta, container_id)

    def get(self, container_id: str) -> Container | None:
        path = os.path.join(self._dir(container_id), "container.json")
        try:
            with open(path, "rb") as f:
                obj = json.loads(f.read())
            c = Container.from_json(obj)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise StoreError(f"{path}: corrupt container record: {exc}") from None
        if c.id != container_id or not _ID_RE.fullmatch(c.mount_id):
            raise StoreError(f"{path}: corrupt container record (ids)")
        return c

    def all(self) -> list[Container]:
        """Every container with both records (ocilayers' and layerdb/mounts), by creation."""
        known = {m.container_id for m in self.mounts()}
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.meta)):
                if name in known and _ID_RE.fullmatch(name):
                    c = self.get(name)
                    if c is not None:
                        out.append(c)
        return sorted(out, key=lambda c: created_key(c.created))

    def find(self, name: str) -> Container | None:
        """A container by name, full ID or unique ID prefix; None if nothing matches."""
        every = self.all()
        for c in every:
            if c.name == name or c.id == name:
                return c
        if name and all(ch in "0123456789abcdef" for ch in name):
            matches = [c for c in every if c.id.startswith(name)]
            if len(matches) > 1:
                raise StoreError(f"container ID prefix {name!r} is ambiguous")
            if matches:
                return matches[0]
        return None

    def base_config(self, c: Container) -> bytes:
        """The config of the image the container was made from, as it was then (a dockerd
        sharing the store may have removed the image since)."""
        path = os.path.join(self._dir(c.id), "image-config.json")
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"container {c.short_id}: its copy of the image config is "
                             "missing") from None

    def update(self, c: Container) -> None:
        write_atomic(os.path.join(self._dir(c.id), "container.json"),
                     json.dumps(c.to_json(), sort_keys=True).encode(), 0o600)

    def run_file(self, c: Container) -> str:
        return os.path.join(self._dir(c.id), "run")

    def running(self, c: Container) -> int | None:
        """The pid of a `run` step holding the container, or None."""
        return holder(self.run_file(c))

    def check_idle(self, c: Container, what: str) -> None:
        pid = self.running(c)
        if pid is not None:
            raise StoreError(f"cannot {what} container {c.short_id}: a step is running in it "
                             f"(ocilayers run, pid {pid})")

    def add_run(self, c: Container, argv: Sequence[str]) -> Container:
        new = replace(c, runs=(*c.runs, tuple(argv)))
        self.update(new)
        return new

    # -- paths --

    def diff_dir(self, c: Container) -> str:
        return os.path.join(self.layout.layer_path(c.mount_id), "diff")

    def work_dir(self, c: Container) -> str:
        return os.path.join(self.layout.layer_path(c.mount_id), "work")

    def merged_dir(self, c: Container) -> str:
        return os.path.join(self.layout.layer_path(c.mount_id), "merged")

    # -- create and remove (call under the store lock) --

    def create(self, layers: LayerStore, image_id: Digest, base_config: bytes, top: Digest,
               *, name: str | None = None, command: Sequence[str] = ()) -> Container:
        from ocilayers.initlayer import build_init_layer

        if name is not None:
            if not NAME_RE.fullmatch(name):
                raise StoreError(f"invalid container name {name!r}: want "
                                 "[a-zA-Z0-9][a-zA-Z0-9_.-]+")
            if any(c.name == name for c in self.all()):  # names only: IDs are apart
                raise StoreError(f"the container name {name!r} is already in use")
        chain = layers.chain(top)
        if len(chain) > MAX_DEPTH:
            raise StoreError(f"image has {len(chain)} layers; a container allows {MAX_DEPTH}")
        c = Container(secrets.token_hex(32), secrets.token_hex(32), str(image_id), str(top),
                      now_rfc3339(), tuple(command), name)
        # 1. ocilayers' records (stale until step 3; prune removes them)
        os.makedirs(self.meta, mode=0o700, exist_ok=True)
        import tempfile

        tmp = tempfile.mkdtemp(dir=self.meta, prefix=".new-")
        write_new(os.path.join(tmp, "image-config.json"), base_config, 0o600)
        write_new(os.path.join(tmp, "container.json"),
                  json.dumps(c.to_json(), sort_keys=True).encode(), 0o600)
        os.rename(tmp, self._dir(c.id))
        # 2. the init layer and the rw layer (orphans until step 3)
        top_cache = chain[-1].cache_id
        init = self.layout.layer_path(c.init_id)
        os.mkdir(init, 0o700)
        os.mkdir(os.path.join(init, "diff"), 0o755)
        os.chmod(os.path.join(init, "diff"), 0o755)
        build_init_layer(os.path.join(init, "diff"),
                         [layers.diff_dir(r) for r in reversed(chain)])
        layers.attach(init, c.init_id, top_cache, what=f"container {c.short_id} init layer")
        rw = self.layout.layer_path(c.mount_id)
        os.mkdir(rw, 0o700)
        os.mkdir(os.path.join(rw, "diff"), 0o755)
        os.chmod(os.path.join(rw, "diff"), 0o755)
        layers.attach(rw, c.mount_id, c.init_id, what=f"container {c.short_id}",
                      max_lowers=MAX_DEPTH + 1)
        # 3. layerdb/mounts/<id>: from here on it is a container
        import tempfile

        ws = tempfile.mkdtemp(dir=self.layout.layerdb_tmp, prefix="mount-")
        write_new(os.path.join(ws, "mount-id"), c.mount_id.encode(), 0o644)
        write_new(os.path.join(ws, "init-id"), c.init_id.encode(), 0o644)
        write_new(os.path.join(ws, "parent"), c.parent.encode(), 0o644)
        os.chmod(ws, 0o755)
        if not os.path.isdir(self.layout.mounts):  # dockerd: MkdirAll(mounts/<id>, 0755)
            os.mkdir(self.layout.mounts, 0o755)
            os.chmod(self.layout.mounts, 0o755)
        os.rename(ws, os.path.join(self.layout.mounts, c.id))
        return c

    def remove(self, layers: LayerStore, c: Container) -> None:
        """The other way round: layerdb/mounts first (then the dirs are orphans), then the
        layer dirs and their `l/` links, then ocilayers' records."""
        entry = os.path.join(self.layout.mounts, c.id)
        gone = os.path.join(self.layout.layerdb_tmp, f"remove-mount-{c.id}")
        links = []
        for cache_id in (c.mount_id, c.init_id):
            with contextlib.suppress(FileNotFoundError):
                links.append(layers.link_of(cache_id))  # checked before anything changes
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, gone)
        for link in links:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.layout.links, link))
        for cache_id in (c.mount_id, c.init_id):
            with contextlib.suppress(FileNotFoundError):
                rmtree(self.layout.layer_path(cache_id))
        with contextlib.suppress(FileNotFoundError):
            rmtree(gone)
        with contextlib.suppress(FileNotFoundError):
            rmtree(self._dir(c.id))

    def stale_records(self) -> list[str]:
        """ocilayers' container records without a layerdb/mounts entry (a crash in create or
        rm): what `prune` removes."""
        known = {m.container_id for m in self.mounts()}
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.meta)):
                if name not in known:
                    out.append(os.path.join(self.meta, name))
        return out


class RunHold:
    """A running step's hold on its container: `<root>/ocilayers/containers/<id>/run`, a file
    flock-held by the `run` process and naming its pid. A crash drops the lock with it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> RunHold:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"the container is running a step already (pid "
                             f"{holder(self.path) or '?'})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def holder(path: str) -> int | None:
    """The pid of the process holding the run file at `path`, or None."""
    from ocilayers.store.layout import held_by_other

    if not held_by_other(path):
        return None
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode()
        return int(text) if text.isdigit() else -1
    except (OSError, ValueError):
        return -1
