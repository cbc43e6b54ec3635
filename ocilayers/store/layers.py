"""Layers in the store: staging, one `ingest` of a tar stream (apply, tar-split, DiffID),
registration into `overlay2/` + `layerdb/`, lookup, removal, and rebuilding a layer's tar.

Crash safety (docs/store-format.md "ocilayers' own files"): a layer is built in a flock-held
`overlay2/.staging-<id>/`, renamed into place only when its digests check out, and its layerdb
entry is written in `layerdb/tmp/` and renamed in after."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ocilayers.errors import StoreError
from ocilayers.fsutil import rmtree
from ocilayers.spec import Digest, chain_ids
from ocilayers.store.layout import StoreLayout, held_by_other, read_text, write_new
from ocilayers.streams import CHUNK, IterReader

if TYPE_CHECKING:
    from ocilayers.extract import LayerStats
    from ocilayers.filewriters import FileWriters
    from ocilayers.whiteout import OverlayFormat

MAX_DEPTH = 125  # Docker's overlay2 maxDepth: lowers + init + rw layer stay within 128
STAGING_PREFIX = ".staging-"
BIRTH_PREFIX = ".birth-"  # a staging dir before it is locked (see LayerStore.begin)
CLAIM_PREFIX = ".claim-"  # layers a running unpack needs (see LayerStore.claim)
_BIRTH_MAX_AGE = 3600  # a birth dir this old was left by a crash in that instant

# What the store's own files may name. They are read back to build paths that are deleted
# (rmi, prune) and mounted: a tampered file must never point outside the store.
CACHE_ID_RE = re.compile(r"[0-9a-f]{64}")
LINK_ID_RE = re.compile(r"[A-Z2-7]{26}")


def new_cache_id() -> str:
    return secrets.token_hex(32)


def new_link_id() -> str:
    """Docker's short link name: 17 random bytes, base32 (A-Z, 2-7), cut to 26 characters."""
    return base64.b32encode(secrets.token_bytes(17)).decode()[:26]


def diff_size(diff_dir: str) -> int:
    """layerdb `size`: st_size of every non-directory below `diff_dir`, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [os.fsencode(diff_dir)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_size
    return total


@dataclass(frozen=True)
class LayerRecord:
    chain_id: Digest
    diff_id: Digest
    cache_id: str
    parent: Digest | None
    size: int


@dataclass
class Staging:
    """A layer being built: `overlay2/.staging-<cache id>/`, flock-held by its builder."""

    path: str
    cache_id: str
    fd: int
    fmt: OverlayFormat | None = None  # the store's (None: this process's default)

    @property
    def diff(self) -> str:
        return os.path.join(self.path, "diff")

    @property
    def tar_split(self) -> str:
        return os.path.join(self.path, "tar-split.json.gz")


class TarSource(Protocol):
    """An uncompressed layer tar to ingest; `finish()` checks it and returns its DiffID."""

    def read(self, n: int = -1, /) -> bytes: ...

    def finish(self) -> Digest: ...


@dataclass(frozen=True)
class Built:
    """A filled staging dir: what registration needs."""

    diff_id: Digest
    size: int
    stats: LayerStats


def fill_staging(staging: Staging, stream: TarSource,
                 fmt: OverlayFormat | None = None, *, writers: FileWriters | None = None) -> Built:
    """Apply a layer tar into a staging dir in overlay mode, recording its tar-split records
    (every byte that is not file data, and a CRC-64 per file) as dockerd does."""
    from isal import igzip

    from ocilayers.extract import apply_layer
    from ocilayers.tarsplit import TarSplitWriter
    with open(staging.tar_split, "wb") as raw, igzip.GzipFile(
        filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=1  # type: ignore[no-untyped-call]
    ) as gz:
        ts = TarSplitWriter(gz)
        stats = apply_layer(stream, staging.diff, mode="overlay", fmt=fmt or staging.fmt,
                            on_entry=ts.on_entry,
                            on_raw=ts.on_raw, defer_root_opaque=True, writers=writers)
        ts.end_of_archive()
        while chunk := stream.read(CHUNK):
            ts.trailing(chunk)
        diff_id = stream.finish()
        ts.close()
    stats.side.save(staging.path)  # rootless: records for what cannot carry a user.* xattr
    # The size counted while applying; a walk of the dir only when that count is not exact.
    size = stats.size if stats.size is not None else diff_size(staging.diff)
    return Built(diff_id, size, stats)


class LayerStore:
    """`overlay2/<cache-id>/` and `layerdb/sha256/<chain>/`: layers and their chains."""

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    # -- claims: layers an unfinished unpack needs --

    @contextlib.contextmanager
    def claim(self, chains: list[Digest]) -> Iterator[None]:
        """Mark `chains` as needed while the block runs (a flock-held file: a crash drops it).
        Enter it under the store lock: a half-written claim must not look stale to a prune."""
        import tempfile

        fd, path = tempfile.mkstemp(dir=self.layout.overlay, prefix=CLAIM_PREFIX)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, "\n".join(str(c) for c in chains).encode())
        try:
            yield
        finally:
            os.unlink(path)
            os.close(fd)

    def claimed_chains(self) -> set[Digest]:
        """Chains live claims name; stale claims (their unpack died) are removed."""
        out: set[Digest] = set()
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.layout.overlay):
                if not name.startswith(CLAIM_PREFIX):
                    continue
                path = os.path.join(self.layout.overlay, name)
                held = held_by_other(path, shared=True)
                if held:
                    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                        out.update(Digest.parse(line.decode()) for line in f.read().split()
                                   if line)
                elif held is False:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        return out

    # -- staging --

    def begin(self) -> Staging:
        """Make a staging dir, flock-held until registered or discarded (or we die).

        It is born under another name and renamed once locked, so `clean_stale` (which takes
        any `.staging-*` it can lock) never sees it unlocked."""
        cache_id = new_cache_id()
        path = os.path.join(self.layout.overlay, STAGING_PREFIX + cache_id)
        birth = os.path.join(self.layout.overlay, BIRTH_PREFIX + cache_id)
        os.mkdir(birth, 0o700)
        fd = os.open(birth, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(birth, path)  # the lock is on the inode: it moves with the dir
        os.mkdir(os.path.join(path, "diff"), 0o755)
        os.chmod(os.path.join(path, "diff"), 0o755)
        return Staging(path, cache_id, fd, self.layout.overlay_format())

    def discard(self, staging: Staging) -> None:
        with contextlib.suppress(FileNotFoundError):
            rmtree(staging.path)
        with contextlib.suppress(OSError):
            os.close(staging.fd)

    def clean_stale(self) -> list[str]:
        """Remove staging dirs and claims no live process holds (left by a crash or kill -9),
        and layerdb write-sets (only made under the store lock, which the caller holds)."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            now = time.time()
            for name in os.listdir(self.layout.overlay):
                path = os.path.join(self.layout.overlay, name)
                if name.startswith(CLAIM_PREFIX):
                    if held_by_other(path) is False:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)
                elif name.startswith(BIRTH_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if now - os.lstat(path).st_mtime > _BIRTH_MAX_AGE:
                            rmtree(path)
                            removed.append(path)
                elif (name.startswith(STAGING_PREFIX)
                        and held_by_other(path, directory=True) is False):
                    rmtree(path)
                    removed.append(path)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.layout.layerdb_tmp):
                rmtree(os.path.join(self.layout.layerdb_tmp, name))
        return removed

    # -- lookup --

    def get(self, chain_id: Digest) -> LayerRecord | None:
        d = self.layout.layer_meta(chain_id)
        try:
            diff = read_text(os.path.join(d, "diff"))
            cache_id = read_text(os.path.join(d, "cache-id"))
            size_text = read_text(os.path.join(d, "size"))
        except FileNotFoundError:
            return None
        try:
            size = int(size_text)
        except ValueError as exc:
            raise StoreError(f"layer {chain_id}: corrupt size file: {exc}") from None
        if not CACHE_ID_RE.fullmatch(cache_id):
            raise StoreError(f"layer {chain_id}: corrupt cache-id {cache_id[:80]!r} (not 64 "
                             "hex digits)")
        parent_path = os.path.join(d, "parent")
        parent = (Digest.parse(read_text(parent_path)) if os.path.exists(parent_path)
                  else None)
        return LayerRecord(chain_id, Digest.parse(diff), cache_id, parent, size)

    def all(self) -> list[LayerRecord]:
        base = os.path.join(self.layout.layerdb, "sha256")
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(base)):
                rec = self.get(Digest("sha256", name))
                if rec is not None:
                    out.append(rec)
        return out

    def diff_dir(self, rec: LayerRecord) -> str:
        return os.path.join(self.layout.layer_path(rec.cache_id), "diff")

    def lower_of(self, cache_id: str) -> str:
        """The layer dir's `lower` file (`l/<link>:l/<link>...`, top-most first); "" if none."""
        path = os.path.join(self.layout.layer_path(cache_id), "lower")
        try:
            lower = read_text(path)
        except FileNotFoundError:
            return ""
        if not all(p.startswith("l/") and LINK_ID_RE.fullmatch(p[2:])
                   for p in lower.split(":")):
            raise StoreError(f"{path}: corrupt: {lower[:120]!r} is not l/<link>:l/<link>...")
        return lower

    def link_of(self, cache_id: str) -> str:
        path = os.path.join(self.layout.layer_path(cache_id), "link")
        link = read_text(path)
        if not LINK_ID_RE.fullmatch(link):
            raise StoreError(f"{path}: corrupt: {link[:80]!r} is not a 26-character link name")
        return link

    def lowers_of(self, cache_id: str) -> list[str]:
        """The layer itself and every layer below it as `l/<link>` names, top-most first:
        a mount's lowerdir list (relative to `overlay2/`)."""
        lower = self.lower_of(cache_id)
        return [f"l/{self.link_of(cache_id)}", *(lower.split(":") if lower else ())]

    def chain(self, top: Digest) -> list[LayerRecord]:
        """The layer `top` and its parents, base first."""
        out: list[LayerRecord] = []
        cur: Digest | None = top
        while cur is not None:
            rec = self.get(cur)
            if rec is None:
                raise StoreError(f"layer {cur} is missing from the store")
            out.append(rec)
            cur = rec.parent
            if len(out) > MAX_DEPTH + 2:
                raise StoreError(f"layer {top}: parent chain too deep or cyclic")
        out.reverse()
        return out

    def tar_split_path(self, chain_id: Digest) -> str:
        return os.path.join(self.layout.layer_meta(chain_id), "tar-split.json.gz")

    def open_tar(self, rec: LayerRecord) -> IterReader:
        """The layer's original tar, rebuilt from its tar-split records and diff dir; a diff
        dir changed since unpack raises ChangedError naming the first changed path."""
        from ocilayers.tarsplit import assemble, open_records

        return IterReader(assemble(open_records(self.tar_split_path(rec.chain_id)),
                                   self.diff_dir(rec)))

    # -- registration --

    def register(self, staging: Staging, diff_id: Digest, parent: Digest | None,
                 size: int) -> tuple[LayerRecord, bool]:
        """Move a finished staging dir into place and write its layerdb entry (call under
        the store lock). Returns (record, reused): an already registered ChainID is reused
        and the staging dir discarded, never written twice."""
        chain_id = chain_ids([parent, diff_id])[1] if parent else diff_id
        existing = self.get(chain_id)
        if existing is not None:
            self.discard(staging)
            return existing, True
        prec = None
        if parent is not None:
            prec = self.get(parent)
            if prec is None:
                raise StoreError(f"parent layer {parent} is not in the store")
        self.attach(staging.path, staging.cache_id, prec.cache_id if prec else None,
                    what=f"layer {chain_id}")
        final = self.layout.layer_path(staging.cache_id)
        os.rename(staging.path, final)
        os.close(staging.fd)
        # layerdb: staged in tmp/ and renamed into place, as dockerd's fileMetadataTransaction.
        import tempfile

        ws = tempfile.mkdtemp(dir=self.layout.layerdb_tmp, prefix="write-set-")
        write_new(os.path.join(ws, "diff"), str(diff_id).encode(), 0o644)
        write_new(os.path.join(ws, "size"), str(size).encode(), 0o644)
        write_new(os.path.join(ws, "cache-id"), staging.cache_id.encode(), 0o644)
        if parent is not None:
            write_new(os.path.join(ws, "parent"), str(parent).encode(), 0o644)
        os.rename(os.path.join(final, "tar-split.json.gz"), os.path.join(ws, "tar-split.json.gz"))
        os.chmod(ws, 0o700)
        os.rename(ws, self.layout.layer_meta(chain_id))
        rec = self.get(chain_id)
        assert rec is not None
        return rec, False

    def attach(self, path: str, name: str, parent: str | None, *, what: str,
               max_lowers: int = MAX_DEPTH) -> str:
        """Give the layer dir at `path` (to be `overlay2/<name>`) its `link`, the `l/` symlink
        to `../<name>/diff`, and with a parent layer dir (`overlay2/<parent>`) its `lower`
        and `work/`, marking the parent `committed`. Returns the link. An image layer has at
        most MAX_DEPTH lowers; a container's rw layer one more (its init layer)."""
        lower = ""
        if parent is not None:
            lower = ":".join(self.lowers_of(parent))
            if lower.count(":") + 1 > max_lowers:
                raise StoreError(f"{what}: more than {MAX_DEPTH} layers")
        link = new_link_id()
        write_new(os.path.join(path, "link"), link.encode(), 0o644)
        if parent is not None:
            write_new(os.path.join(path, "lower"), lower.encode(), 0o644)
            os.mkdir(os.path.join(path, "work"), 0o700)
            self.mark_committed(parent)
        os.chmod(path, 0o710)
        os.symlink(f"../{name}/diff", os.path.join(self.layout.links, link))
        return link

    def mark_committed(self, cache_id: str) -> None:
        """dockerd's `committed` marker: a child was made on this layer (it is read-only now)."""
        committed = os.path.join(self.layout.layer_path(cache_id), "committed")
        if not os.path.exists(committed):
            write_new(committed, b"", 0o600)

    def register_built(self, staging: Staging, built: Built,
                       parent: Digest | None) -> tuple[LayerRecord, bool]:
        """`register`, after expanding a root opaque marker against the parent's chain
        (overlayfs ignores opaque on a layer root). Call under the store lock."""
        from ocilayers.extract import expand_root_opaque

        if built.stats.root_opaque and parent is not None:
            lowers = [self.diff_dir(r) for r in reversed(self.chain(parent))]
            expand_root_opaque(staging.diff, lowers, staging.fmt or self.layout.overlay_format())
        return self.register(staging, built.diff_id, parent, built.size)

    def ingest(self, stream: TarSource, parent: Digest | None, *,
               hold: Callable[[], contextlib.AbstractContextManager[object]] | None = None
               ) -> tuple[LayerRecord, bool]:
        """One layer tar stream in, one registered layer out, in one pass: staging, apply,
        tar-split, DiffID, layerdb. On any failure nothing is registered. `hold` wraps the
        locked registration (unpack holds Ctrl-C there)."""
        staging = self.begin()
        try:
            built = fill_staging(staging, stream)
            with hold() if hold is not None else contextlib.nullcontext(), self.layout.lock():
                return self.register_built(staging, built, parent)
        finally:
            if os.path.exists(staging.path):
                self.discard(staging)

    # -- removal --

    def check_files(self, rec: LayerRecord) -> None:
        """Read the layer dir's `link` and `lower` as removal and mount would: StoreError if
        either is corrupt (a missing one is no error)."""
        with contextlib.suppress(FileNotFoundError):
            self.link_of(rec.cache_id)
        self.lower_of(rec.cache_id)

    def remove(self, rec: LayerRecord) -> None:
        """Unregister first (layerdb), then delete the dir: a crash leaves an orphan, never a
        registered layer without its files."""
        ld = self.layout.layer_meta(rec.chain_id)
        gone = os.path.join(self.layout.layerdb_tmp, f"remove-{rec.chain_id.hex}")
        path = self.layout.layer_path(rec.cache_id)
        link: str | None = None
        with contextlib.suppress(FileNotFoundError):
            link = self.link_of(rec.cache_id)  # checked before anything is changed
        os.rename(ld, gone)
        if link is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.layout.links, link))
        with contextlib.suppress(FileNotFoundError):
            rmtree(path)
        rmtree(gone)
