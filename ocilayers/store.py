"""The on-disk store in Docker's overlay2 layout, byte for byte (STORE.md): layers, images, tags."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ocilayers.errors import OCILayersError, StoreError
from ocilayers.fsutil import rmtree
from ocilayers.spec import Digest, chain_ids, split_reference

MAX_DEPTH = 125  # Docker's overlay2 maxDepth: lowers + init + rw layer stay within 128
STAGING_PREFIX = ".staging-"
BIRTH_PREFIX = ".birth-"  # a staging dir before it is locked (see Store.begin_layer)
CLAIM_PREFIX = ".claim-"  # layers a running unpack needs (see Store.claim)
_BIRTH_MAX_AGE = 3600  # a birth dir this old was left by a crash in that instant
LOCK_NAME = "ocilayers.lock"


def default_root() -> str:
    """$OCILAYERS_ROOT; /var/lib/ocilayers as root; else the XDG data dir."""
    env = os.environ.get("OCILAYERS_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/ocilayers"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(xdg, "ocilayers")


def new_cache_id() -> str:
    return secrets.token_hex(32)


def new_link_id() -> str:
    """Docker's short link name: 17 random bytes, base32 (A-Z, 2-7), cut to 26 characters."""
    return base64.b32encode(secrets.token_bytes(17)).decode()[:26]


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write to a temp name beside `path`, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_new(path: str, data: bytes, mode: int) -> None:
    with open(path, "xb") as f:
        f.write(data)
    os.chmod(path, mode)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError(f"{path}: corrupt (not UTF-8)") from None


# What the store's own files may name. They are read back to build paths that are deleted
# (rmi, prune) and mounted: a tampered file must never point outside the store.
_CACHE_ID = re.compile(r"[0-9a-f]{64}")
_LINK_ID = re.compile(r"[A-Z2-7]{26}")


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

    @property
    def diff(self) -> str:
        return os.path.join(self.path, "diff")

    @property
    def tar_split(self) -> str:
        return os.path.join(self.path, "tar-split.json.gz")


class Store:
    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        self.overlay = os.path.join(self.root, "overlay2")
        self.links = os.path.join(self.overlay, "l")
        self.image_root = os.path.join(self.root, "image", "overlay2")
        self.layerdb = os.path.join(self.image_root, "layerdb")
        self.imagedb = os.path.join(self.image_root, "imagedb")
        self.repositories_path = os.path.join(self.image_root, "repositories.json")

    # -- set-up and locking --

    def init(self) -> None:
        """Create the store's dirs (and the root's missing parents, as dockerd's --data-root
        does). Modes as dockerd 20.10 makes them (checked against a real daemon's)."""
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        for path, mode in ((self.root, 0o710), (self.overlay, 0o710), (self.links, 0o700),
                           (os.path.join(self.root, "image"), 0o700), (self.image_root, 0o700),
                           (self.layerdb, 0o700), (os.path.join(self.layerdb, "sha256"), 0o755),
                           (os.path.join(self.layerdb, "tmp"), 0o755),
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

    def exists(self) -> bool:
        return os.path.isdir(self.layerdb) and os.path.isdir(self.overlay)

    def require(self) -> None:
        if not self.exists():
            raise StoreError(f"{self.root}: no store here (run `ocilayers unpack` first, or "
                             "pass --root)")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise registration and removal across processes (flock on a file in the root)."""
        fd = os.open(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- claims: layers an unfinished unpack needs --

    @contextlib.contextmanager
    def claim(self, chains: list[Digest]) -> Iterator[None]:
        """Mark `chains` as needed while the block runs (a flock-held file: a crash drops it).
        Enter it under `lock()`: a half-written claim must not look stale to a prune."""
        fd, path = tempfile.mkstemp(dir=self.overlay, prefix=CLAIM_PREFIX)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, "\n".join(str(c) for c in chains).encode())
        try:
            yield
        finally:
            os.unlink(path)
            os.close(fd)

    @staticmethod
    def _drop_if_stale(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # held: a live unpack
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def claimed_chains(self) -> set[Digest]:
        out: set[Digest] = set()
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.overlay):
                if not name.startswith(CLAIM_PREFIX):
                    continue
                path = os.path.join(self.overlay, name)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:  # held: a live unpack
                        with os.fdopen(os.dup(fd), "rb") as f:
                            out.update(Digest.parse(line.decode()) for line in f.read().split()
                                       if line)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)  # stale: its unpack died
                finally:
                    os.close(fd)
        return out

    # -- staging --

    def begin_layer(self) -> Staging:
        """Make a staging dir, flock-held until registered or discarded (or we die).

        It is born under another name and renamed once locked, so `clean_stale` (which takes
        any `.staging-*` it can lock) never sees it unlocked."""
        cache_id = new_cache_id()
        path = os.path.join(self.overlay, STAGING_PREFIX + cache_id)
        birth = os.path.join(self.overlay, BIRTH_PREFIX + cache_id)
        os.mkdir(birth, 0o700)
        fd = os.open(birth, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(birth, path)  # the lock is on the inode: it moves with the dir
        os.mkdir(os.path.join(path, "diff"), 0o755)
        os.chmod(os.path.join(path, "diff"), 0o755)
        return Staging(path, cache_id, fd)

    def discard(self, staging: Staging) -> None:
        with contextlib.suppress(FileNotFoundError):
            rmtree(staging.path)
        with contextlib.suppress(OSError):
            os.close(staging.fd)

    def clean_stale(self) -> list[str]:
        """Remove staging dirs no live process holds (left by a crash or kill -9)."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            now = time.time()
            for name in os.listdir(self.overlay):
                path = os.path.join(self.overlay, name)
                if name.startswith(CLAIM_PREFIX):
                    self._drop_if_stale(path)
                    continue
                if name.startswith(BIRTH_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if now - os.lstat(path).st_mtime > _BIRTH_MAX_AGE:
                            rmtree(path)
                            removed.append(path)
                    continue
                if not name.startswith(STAGING_PREFIX):
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live builder holds it
                finally:
                    os.close(fd)
                rmtree(path)
                removed.append(path)
        tmp = os.path.join(self.layerdb, "tmp")
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(tmp):  # write-sets are only made under the store lock
                rmtree(os.path.join(tmp, name))
        return removed

    # -- layers --

    def _layer_dir(self, chain_id: Digest) -> str:
        return os.path.join(self.layerdb, chain_id.algorithm, chain_id.hex)

    def layer(self, chain_id: Digest) -> LayerRecord | None:
        d = self._layer_dir(chain_id)
        try:
            diff = _read_text(os.path.join(d, "diff"))
            cache_id = _read_text(os.path.join(d, "cache-id"))
            size_text = _read_text(os.path.join(d, "size"))
        except FileNotFoundError:
            return None
        try:
            size = int(size_text)
        except ValueError as exc:
            raise StoreError(f"layer {chain_id}: corrupt size file: {exc}") from None
        if not _CACHE_ID.fullmatch(cache_id):
            raise StoreError(f"layer {chain_id}: corrupt cache-id {cache_id[:80]!r} (not 64 "
                             "hex digits)")
        parent_path = os.path.join(d, "parent")
        parent = (Digest.parse(_read_text(parent_path)) if os.path.exists(parent_path)
                  else None)
        return LayerRecord(chain_id, Digest.parse(diff), cache_id, parent, size)

    def layers(self) -> list[LayerRecord]:
        base = os.path.join(self.layerdb, "sha256")
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(base)):
                rec = self.layer(Digest("sha256", name))
                if rec is not None:
                    out.append(rec)
        return out

    def layer_path(self, cache_id: str) -> str:
        return os.path.join(self.overlay, cache_id)

    def lower_of(self, cache_id: str) -> str:
        path = os.path.join(self.layer_path(cache_id), "lower")
        try:
            lower = _read_text(path)
        except FileNotFoundError:
            return ""
        if not all(p.startswith("l/") and _LINK_ID.fullmatch(p[2:]) for p in lower.split(":")):
            raise StoreError(f"{path}: corrupt: {lower[:120]!r} is not l/<link>:l/<link>...")
        return lower

    def link_of(self, cache_id: str) -> str:
        path = os.path.join(self.layer_path(cache_id), "link")
        link = _read_text(path)
        if not _LINK_ID.fullmatch(link):
            raise StoreError(f"{path}: corrupt: {link[:80]!r} is not a 26-character link name")
        return link

    def chain(self, top: Digest) -> list[LayerRecord]:
        """The layer `top` and its parents, base first."""
        out: list[LayerRecord] = []
        cur: Digest | None = top
        while cur is not None:
            rec = self.layer(cur)
            if rec is None:
                raise StoreError(f"layer {cur} is missing from the store")
            out.append(rec)
            cur = rec.parent
            if len(out) > MAX_DEPTH + 2:
                raise StoreError(f"layer {top}: parent chain too deep or cyclic")
        out.reverse()
        return out

    def register_layer(self, staging: Staging, diff_id: Digest, parent: Digest | None,
                       size: int) -> tuple[LayerRecord, bool]:
        """Move a finished staging dir into place and write its layerdb entry (call under
        `lock()`). Returns (record, reused): an already registered ChainID is reused and the
        staging dir discarded, never written twice."""
        chain_id = chain_ids([parent, diff_id])[1] if parent else diff_id
        existing = self.layer(chain_id)
        if existing is not None:
            self.discard(staging)
            return existing, True
        lower = ""
        prec = None
        if parent is not None:
            prec = self.layer(parent)
            if prec is None:
                raise StoreError(f"parent layer {parent} is not in the store")
            plink = self.link_of(prec.cache_id)
            plower = self.lower_of(prec.cache_id)
            lower = f"l/{plink}" + (f":{plower}" if plower else "")
            if lower.count(":") + 1 > MAX_DEPTH:
                raise StoreError(f"layer {chain_id}: more than {MAX_DEPTH} layers")
        link = new_link_id()
        _write_new(os.path.join(staging.path, "link"), link.encode(), 0o644)
        if prec is not None:
            _write_new(os.path.join(staging.path, "lower"), lower.encode(), 0o644)
            os.mkdir(os.path.join(staging.path, "work"), 0o700)
            committed = os.path.join(self.layer_path(prec.cache_id), "committed")
            if not os.path.exists(committed):
                _write_new(committed, b"", 0o600)
        os.chmod(staging.path, 0o710)
        os.symlink(f"../{staging.cache_id}/diff", os.path.join(self.links, link))
        final = self.layer_path(staging.cache_id)
        os.rename(staging.path, final)
        os.close(staging.fd)
        # layerdb: staged in tmp/ and renamed into place, as dockerd's fileMetadataTransaction.
        ws = tempfile.mkdtemp(dir=os.path.join(self.layerdb, "tmp"), prefix="write-set-")
        _write_new(os.path.join(ws, "diff"), str(diff_id).encode(), 0o644)
        _write_new(os.path.join(ws, "size"), str(size).encode(), 0o644)
        _write_new(os.path.join(ws, "cache-id"), staging.cache_id.encode(), 0o644)
        if parent is not None:
            _write_new(os.path.join(ws, "parent"), str(parent).encode(), 0o644)
        os.rename(os.path.join(final, "tar-split.json.gz"), os.path.join(ws, "tar-split.json.gz"))
        os.chmod(ws, 0o700)
        os.rename(ws, self._layer_dir(chain_id))
        rec = self.layer(chain_id)
        assert rec is not None
        return rec, False

    def tar_split_path(self, chain_id: Digest) -> str:
        return os.path.join(self._layer_dir(chain_id), "tar-split.json.gz")

    def check_layer_files(self, rec: LayerRecord) -> None:
        """Read the layer dir's `link` and `lower` as removal and mount would: StoreError if
        either is corrupt (a missing one is no error)."""
        with contextlib.suppress(FileNotFoundError):
            self.link_of(rec.cache_id)
        self.lower_of(rec.cache_id)

    def remove_layer(self, rec: LayerRecord) -> None:
        """Unregister first (layerdb), then delete the dir: a crash leaves an orphan, never a
        registered layer without its files."""
        ld = self._layer_dir(rec.chain_id)
        gone = os.path.join(self.layerdb, "tmp", f"remove-{rec.chain_id.hex}")
        path = self.layer_path(rec.cache_id)
        link: str | None = None
        with contextlib.suppress(FileNotFoundError):
            link = self.link_of(rec.cache_id)  # checked before anything is changed
        os.rename(ld, gone)
        if link is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.links, link))
        with contextlib.suppress(FileNotFoundError):
            rmtree(path)
        rmtree(gone)

    # -- images and tags --

    def _content(self, image_id: Digest) -> str:
        return os.path.join(self.imagedb, "content", image_id.algorithm, image_id.hex)

    def put_image(self, config_raw: bytes) -> Digest:
        image_id = Digest.of_bytes(config_raw)
        path = self._content(image_id)
        if not os.path.exists(path):
            write_atomic(path, config_raw, 0o600)
        return image_id

    def image_config(self, image_id: Digest) -> bytes:
        try:
            with open(self._content(image_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"image {image_id} is not in the store") from None

    def image_ids(self) -> list[Digest]:
        base = os.path.join(self.imagedb, "content", "sha256")
        with contextlib.suppress(FileNotFoundError):
            return [Digest("sha256", n) for n in sorted(os.listdir(base))
                    if not n.startswith(".")]
        return []

    def remove_image(self, image_id: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._content(image_id))
        meta = os.path.join(self.imagedb, "metadata", image_id.algorithm, image_id.hex)
        with contextlib.suppress(FileNotFoundError):
            rmtree(meta)

    def repositories(self) -> dict[str, dict[str, str]]:
        try:
            with open(self.repositories_path, "rb") as f:
                obj = json.loads(f.read())
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreError(f"{self.repositories_path}: corrupt: {exc}") from None
        repos = obj.get("Repositories") if isinstance(obj, dict) else None
        if not isinstance(repos, dict):
            raise StoreError(f"{self.repositories_path}: no Repositories object")
        return repos

    def _write_repositories(self, repos: dict[str, dict[str, str]]) -> None:
        repos = {k: v for k, v in repos.items() if v}
        data = json.dumps({"Repositories": repos}, sort_keys=True, separators=(",", ":"))
        write_atomic(self.repositories_path, data.encode(), 0o600)

    def tags(self) -> dict[str, Digest]:
        """Normalised `repo:tag` -> image ID."""
        out = {}
        for refs in self.repositories().values():
            for ref, image_id in refs.items():
                out[ref] = Digest.parse(image_id)
        return out

    def set_tag(self, ref: str, image_id: Digest) -> str:
        repo, norm = split_reference(ref)
        repos = self.repositories()
        if repos.get(repo, {}).get(norm) != str(image_id):
            repos.setdefault(repo, {})[norm] = str(image_id)
            self._write_repositories(repos)
        return norm

    def remove_tag(self, ref: str) -> Digest:
        repo, norm = split_reference(ref)
        repos = self.repositories()
        if norm not in repos.get(repo, {}):
            raise StoreError(f"no such tag: {norm}")
        image_id = Digest.parse(repos[repo].pop(norm))
        self._write_repositories(repos)
        return image_id

    def containers_using(self, image_top: Digest | None) -> list[str]:
        """Containers whose parent is this chain. (Containers come with the commit issue; this
        is the one place that blocks removing an image in use.)"""
        base = os.path.join(self.layerdb, "mounts")
        out = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(base)):
                try:
                    parent = _read_text(os.path.join(base, name, "parent"))
                except FileNotFoundError:
                    continue
                if image_top is not None and parent == str(image_top):
                    out.append(name)
        return out

    def referenced_chains(self) -> set[Digest]:
        """Every layer some image, container or running unpack still needs."""
        needed: set[Digest] = set(self.claimed_chains())
        for image_id in self.image_ids():
            try:
                top = image_top_chain(self.image_config(image_id))
            except StoreError as exc:
                raise StoreError(f"image {image_id.short}: {exc}") from None
            if top is not None:
                needed.update(r.chain_id for r in self.chain(top))
        base = os.path.join(self.layerdb, "mounts")
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(base):
                with contextlib.suppress(FileNotFoundError):
                    parent = Digest.parse(_read_text(os.path.join(base, name, "parent")))
                    needed.update(r.chain_id for r in self.chain(parent))
        return needed


    # -- maintenance --

    def _known_cache_ids(self) -> set[str]:
        ids = {r.cache_id for r in self.layers()}
        base = os.path.join(self.layerdb, "mounts")
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(base):
                for f in ("mount-id", "init-id"):
                    with contextlib.suppress(FileNotFoundError):
                        ids.add(_read_text(os.path.join(base, name, f)))
        return ids

    def remove_orphans(self) -> list[str]:
        """Layer dirs no layerdb entry or container names (a crash between the rename and the
        layerdb write), and `l/` links that point nowhere. Call under `lock()`."""
        removed = []
        known = self._known_cache_ids()
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.overlay)):
                if (name == "l" or name.startswith((STAGING_PREFIX, BIRTH_PREFIX, CLAIM_PREFIX))
                        or name in known):
                    continue
                rmtree(os.path.join(self.overlay, name))
                removed.append(f"deleted orphan overlay2/{name}")
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.links)):
                if not os.path.exists(os.path.join(self.links, name)):
                    os.unlink(os.path.join(self.links, name))
                    removed.append(f"deleted dangling l/{name}")
        return removed

    def check_format(self) -> list[str]:
        """Every store file against the overlay2 format (STORE.md); problems as text."""
        problems: list[str] = []
        link_re = re.compile(r"^[A-Z2-7]{26}$")

        def mode_is(path: str, want: int) -> None:
            have = stat.S_IMODE(os.lstat(path).st_mode)
            if have != want:
                problems.append(f"{os.path.relpath(path, self.root)}: mode {oct(have)}, "
                                f"want {oct(want)}")

        for rec in self.layers():
            d = self._layer_dir(rec.chain_id)
            where = f"layer {rec.chain_id.short}"
            mode_is(d, 0o700)
            for f in ("diff", "size", "cache-id", "tar-split.json.gz"):
                if not os.path.exists(os.path.join(d, f)):
                    problems.append(f"{where}: layerdb {f} is missing")
                else:
                    mode_is(os.path.join(d, f), 0o644)
            want = chain_ids([rec.parent, rec.diff_id])[1] if rec.parent else rec.diff_id
            if want != rec.chain_id:
                problems.append(f"{where}: ChainID does not match its parent and diff")
            if rec.parent is not None and self.layer(rec.parent) is None:
                problems.append(f"{where}: parent {rec.parent} is missing")
            ld = self.layer_path(rec.cache_id)
            if not re.fullmatch(r"[0-9a-f]{64}", rec.cache_id):
                problems.append(f"{where}: cache-id {rec.cache_id!r} is not 64 hex digits")
            if not os.path.isdir(os.path.join(ld, "diff")):
                problems.append(f"{where}: overlay2/{rec.cache_id}/diff is missing")
                continue
            mode_is(ld, 0o710)
            try:
                link = self.link_of(rec.cache_id)
            except FileNotFoundError:
                problems.append(f"{where}: link file is missing")
                continue
            mode_is(os.path.join(ld, "link"), 0o644)
            if not link_re.match(link):
                problems.append(f"{where}: link {link!r} is not 26 base32 characters")
            lpath = os.path.join(self.links, link)
            if not os.path.islink(lpath) or os.readlink(lpath) != f"../{rec.cache_id}/diff":
                problems.append(f"{where}: l/{link} does not point to ../{rec.cache_id}/diff")
            lower = self.lower_of(rec.cache_id)
            if rec.parent is None:
                if lower:
                    problems.append(f"{where}: a base layer must have no lower file")
            else:
                prec = self.layer(rec.parent)
                if prec is not None:
                    with contextlib.suppress(FileNotFoundError):
                        plower = self.lower_of(prec.cache_id)
                        want_lower = f"l/{self.link_of(prec.cache_id)}" + (
                            f":{plower}" if plower else "")
                        if lower != want_lower:
                            problems.append(f"{where}: lower is {lower!r}, want {want_lower!r}")
                if not os.path.isdir(os.path.join(ld, "work")):
                    problems.append(f"{where}: work/ is missing")
        for image_id in self.image_ids():
            content = self._content(image_id)
            with open(content, "rb") as cf:
                if Digest.of_bytes(cf.read()) != image_id:
                    problems.append(f"image {image_id.short}: config does not match its ID")
            mode_is(content, 0o600)
        known = set(self.image_ids())
        try:
            tags = self.tags()
        except (StoreError, ValueError) as exc:
            problems.append(str(exc))
            tags = {}
        for t, image_id in tags.items():
            if image_id not in known:
                problems.append(f"tag {t} names missing image {image_id}")
        return problems


def image_top_chain(config_raw: bytes) -> Digest | None:
    try:
        obj = json.loads(config_raw)
        ids = (obj.get("rootfs") or {}).get("diff_ids") or []
        chains = chain_ids(ids)
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError,
            OCILayersError) as exc:
        raise StoreError(f"image config is corrupt: {type(exc).__name__}: {exc}") from None
    return chains[-1] if chains else None
