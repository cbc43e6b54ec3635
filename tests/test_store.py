"""store.py and the commands on an existing store: images, inspect, tag/untag, rmi, prune, verify,
mount/umount, flatten, export; plus the store-layout oracle the unpack tests share.

Every expectation about the on-disk format comes from docs/store-format.md (Docker's overlay2
driver and layer store), written out here independently of the product: ChainIDs with hashlib,
sizes with lstat, links and lowers by reading the files. The kernel's overlayfs, umoci and
skopeo are the outside oracles. Each test gets its own `--root` under tmp_path.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import treecompare as tc
from conftest import (
    ERROR_PREFIX,
    FIXTURES,
    ConfigIds,
    assert_one_line_error,
    chain_ids_by_spec,
    mountinfo,
    requires_tool,
    run_cli,
    skopeo,
)

Capsys = pytest.CaptureFixture[str]

CACHE_VERSION = "v1"
CACHE_ROOT = (Path(os.environ.get("OCILAYERS_TEST_CACHE", "/tmp/ocilayers-test-cache"))
              / CACHE_VERSION)
"""Big or generated inputs, built once per machine (delete the dir to rebuild)."""

HEX64 = re.compile(r"[0-9a-f]{64}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
LINK = re.compile(r"[A-Z2-7]{26}")
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
MTIME = 1_700_000_000

DEMO = FIXTURES / "demo"
DOCKER_SAVE = FIXTURES / "docker-save.tar"


# ============================================================================================
# Reading images independently of the product
# ============================================================================================

def decompress(blob: bytes) -> bytes:
    """A layer blob's tar, by magic (gzip, zstd, or already raw)."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as r:
            return r.read()
    return blob


@dataclass(frozen=True)
class SourceImage(ConfigIds):
    """What a test needs to know about an image source, read with json/tarfile only."""

    config: bytes
    layer_tars: tuple[bytes, ...]
    blobs: tuple[bytes, ...]  # the layer blobs as stored (compressed or not)
    repo_tags: tuple[str, ...]


def _oci_read(get: Callable[[str], bytes]) -> SourceImage:
    index = json.loads(get("index.json"))
    desc = index["manifests"][0]
    ref = (desc.get("annotations") or {}).get(REF_NAME)

    def blob(digest: str) -> bytes:
        return get("blobs/" + digest.replace(":", "/"))

    manifest = json.loads(blob(desc["digest"]))
    blobs = tuple(blob(layer["digest"]) for layer in manifest["layers"])
    return SourceImage(blob(manifest["config"]["digest"]), tuple(decompress(b) for b in blobs),
                       blobs, (ref,) if ref else ())


def read_source(path: Path | str) -> SourceImage:
    """An OCI layout dir, an oci-archive or a docker-save tarball (first image)."""
    path = Path(path)
    if path.is_dir():
        return _oci_read(lambda name: (path / name).read_bytes())
    with tarfile.open(path) as tf:
        names = set(tf.getnames())

        def get(name: str) -> bytes:
            f = tf.extractfile(name)
            assert f is not None, name
            return f.read()

        if "manifest.json" in names:
            entry = json.loads(get("manifest.json"))[0]
            tars = tuple(get(p) for p in entry["Layers"])
            return SourceImage(get(entry["Config"]), tars, tars,
                               tuple(entry.get("RepoTags") or ()))
        return _oci_read(get)


def tar_members(tar: bytes) -> list[tarfile.TarInfo]:
    """The members tarfile can read (it stops quietly at a truncated end)."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf, \
            contextlib.suppress(tarfile.ReadError):
        out.extend(tf)
    return out


def clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def layer_root_mode(tar: bytes) -> int:
    """The mode the layer's diff/ should get: the root entry's, else 0755 (docs/store-format.md)."""
    for m in tar_members(tar):
        if m.isdir() and clean(m.name) == "":
            return m.mode & 0o7777
    return 0o755


def loose_dirs(tar: bytes) -> set[bytes]:
    """Dirs whose mtime no layer entry pins: implicit parents (made with the current time) and
    parents of whiteouts (a deletion touches them). Tools legitimately disagree on those."""
    explicit: set[str] = set()
    parents: set[str] = set()
    whiteout_parents: set[str] = set()
    for m in tar_members(tar):
        name = clean(m.name)
        if not name:
            continue
        if m.isdir():
            explicit.add(name)
        parts = name.split("/")
        for i in range(1, len(parts)):
            parents.add("/".join(parts[:i]))
        if parts[-1].startswith(".wh."):
            whiteout_parents.add("/".join(parts[:-1]))
    return {p.encode() for p in (parents - explicit) | whiteout_parents if p}


def image_loose_dirs(src: SourceImage) -> set[bytes]:
    out: set[bytes] = set()
    for t in src.layer_tars:
        out |= loose_dirs(t)
    return out


# ============================================================================================
# Writing small OCI images in code (cached)
# ============================================================================================

def host_arch() -> str:
    m = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def make_tar(members: Sequence[tuple[str, bytes | None, int]], *, fmt: int = tarfile.PAX_FORMAT,
             root_mode: int | None = None) -> bytes:
    """A deterministic tar: (name, data or None for a dir, mode) members, mtime MTIME."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        if root_mode is not None:
            ti = tarfile.TarInfo("./")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, root_mode, MTIME
            tf.addfile(ti)
        for name, data, mode in members:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = mode, MTIME
            ti.uname = ti.gname = ""
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_oci(dest: Path, layer_tars: Sequence[bytes], *, labels: Mapping[str, str] | None = None,
              ref_name: str | None = "latest") -> SourceImage:
    """An OCI image layout with gzip layers (deterministic bytes) and a minimal config."""
    (dest / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (dest / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    blobs = [gzip.compress(t, compresslevel=1, mtime=0) for t in layer_tars]
    layers = [{"mediaType": MEDIA_LAYER_GZIP, **put(b)} for b in blobs]
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layer_tars]
    config = finish_oci(dest, layers, diff_ids, labels=labels, ref_name=ref_name)
    return SourceImage(config, tuple(layer_tars), tuple(blobs), ())


def finish_oci(dest: Path, layers: Sequence[Mapping[str, Any]], diff_ids: Sequence[str], *,
               labels: Mapping[str, str] | None = None, ref_name: str | None = "latest"
               ) -> bytes:
    """Write config, manifest, index.json and oci-layout for layer blobs already in
    `dest/blobs/sha256` (descriptors `layers`); returns the config bytes."""
    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (dest / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    config = json.dumps({
        "architecture": host_arch(), "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Labels": dict(labels or {})},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i}"}
                    for i in range(len(diff_ids))],
    }, sort_keys=True).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                           "config": {"mediaType": MEDIA_CONFIG, **put(config)},
                           "layers": list(layers)}).encode()
    desc: dict[str, Any] = {"mediaType": MEDIA_MANIFEST, **put(manifest)}
    if ref_name:
        desc["annotations"] = {REF_NAME: ref_name}
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return config


def cached(name: str, build: Callable[[Path], object]) -> Path:
    """`CACHE_ROOT/name`, made by `build(tmpdir)` once and renamed into place atomically."""
    final = CACHE_ROOT / name
    if final.exists():
        return final
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE_ROOT, prefix=f".build-{name}-"))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def one_file_layers(n: int) -> list[bytes]:
    """n layers, layer i adding the file `layer-<i>` (content `i`)."""
    return [make_tar([(f"layer-{i:03d}", f"{i}\n".encode(), 0o644)]) for i in range(n)]


def deep_image(n: int) -> Path:
    """An n-layer OCI image (cached); layer i adds `layer-<i>`."""
    return cached(f"deep-{n}", lambda d: write_oci(d, one_file_layers(n)))


def one_layer_image() -> Path:
    def build(d: Path) -> None:
        write_oci(d, [make_tar([("etc", None, 0o755), ("etc/single", b"single layer\n", 0o644),
                                ("bin", None, 0o755), ("bin/tool", b"#!/bin/sh\n", 0o755)])])
    return cached("one-layer", build)


# ============================================================================================
# Running the CLI on a store
# ============================================================================================

def ol(capsys: Capsys, root: Path, *argv: str) -> tuple[int, str, str]:
    """`ocilayers --root ROOT ARGV` in-process."""
    return run_cli(["--root", str(root), *argv], capsys)


def ok(capsys: Capsys, root: Path, *argv: str) -> str:
    """Like `ol`, but the command must succeed; returns stdout."""
    code, out, err = ol(capsys, root, *argv)
    assert code == 0, f"ocilayers {' '.join(argv)} failed ({code}):\n{err}"
    return out


def unpack(capsys: Capsys, root: Path, source: Path | str, *extra: str) -> dict[str, Any]:
    """`unpack SOURCE --json`; returns the parsed result."""
    result: dict[str, Any] = json.loads(ok(capsys, root, "unpack", str(source), "--json", *extra))
    return result


def verify_ok(capsys: Capsys, root: Path) -> None:
    code, out, err = ol(capsys, root, "verify")
    assert (code, out) == (0, "ok\n"), err


# ============================================================================================
# The store, read back by hand (docs/store-format.md)
# ============================================================================================

def layerdb(root: Path) -> Path:
    return root / "image" / "overlay2" / "layerdb"


def imagedb(root: Path) -> Path:
    return root / "image" / "overlay2" / "imagedb"


def repositories_path(root: Path) -> Path:
    return root / "image" / "overlay2" / "repositories.json"


@dataclass(frozen=True)
class Layer:
    chain_id: str
    diff_id: str
    size: int
    cache_id: str
    parent: str | None

    def dir(self, root: Path) -> Path:
        return root / "overlay2" / self.cache_id

    def diff(self, root: Path) -> Path:
        return self.dir(root) / "diff"


def read_layers(root: Path) -> dict[str, Layer]:
    """layerdb/sha256/*, keyed by ChainID (`sha256:<hex>`)."""
    out = {}
    base = layerdb(root) / "sha256"
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        parent = d / "parent"
        out["sha256:" + d.name] = Layer(
            "sha256:" + d.name, (d / "diff").read_text(), int((d / "size").read_text()),
            (d / "cache-id").read_text(), parent.read_text() if parent.exists() else None)
    return out


def image_ids(root: Path) -> set[str]:
    base = imagedb(root) / "content" / "sha256"
    return {"sha256:" + p.name for p in base.iterdir()} if base.is_dir() else set()


def repositories(root: Path) -> dict[str, Any]:
    p = repositories_path(root)
    if not p.exists():
        return {}
    obj = json.loads(p.read_bytes())
    assert list(obj) == ["Repositories"], obj
    repos: dict[str, Any] = obj["Repositories"]
    return repos


def tags_of(root: Path) -> dict[str, str]:
    return {ref: i for refs in repositories(root).values() for ref, i in refs.items()}


def diff_size(diff: Path) -> int:
    """docs/store-format.md `size`: st_size of every non-directory in diff/, each inode counted
    once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(diff):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in [*filenames, *links]:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def check_store(root: Path, *, images: Mapping[str, bytes] | None = None,
                tags: Mapping[str, str] | None = None,
                root_modes: Mapping[str, int] | None = None, fresh: bool = True) -> None:
    """Assert the whole store matches docs/store-format.md.

    `images`: image ID -> exact config bytes expected in imagedb (all of them, no others).
    `tags`: normalised `repo:tag` -> image ID expected in repositories.json (exactly).
    `root_modes`: DiffID -> mode of the layer's root entry (default 0755).
    `fresh`: right after unpack: `committed` exactly in the dirs of layers with a child, no
    leftovers. After rmi/prune a parent may keep a stale `committed` (Docker never removes it).
    """
    problems: list[str] = []

    def want(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    def mode_is(path: Path, mode: int) -> None:
        if not os.path.lexists(path):
            problems.append(f"{path.relative_to(root)}: missing")
            return
        have = _mode(path)
        want(have == mode, f"{path.relative_to(root)}: mode {have:04o}, want {mode:04o}")

    def text(path: Path) -> str:
        data = path.read_bytes()
        want(data == data.strip(), f"{path.relative_to(root)}: surrounding whitespace/newline")
        return data.decode()

    overlay = root / "overlay2"
    mode_is(overlay, 0o710)
    mode_is(overlay / "l", 0o700)
    mode_is(layerdb(root), 0o700)
    # layerdb/sha256 itself: moby's filestore makes it with MkdirAll 0755
    want(_mode(layerdb(root) / "sha256") in (0o700, 0o755), "layerdb/sha256: mode")
    tmp = layerdb(root) / "tmp"
    if tmp.exists():
        want(not any(tmp.iterdir()), f"layerdb/tmp not empty: {sorted(os.listdir(tmp))}")

    # layerdb
    layers: dict[str, Layer] = {}
    for d in sorted((layerdb(root) / "sha256").iterdir()):
        where = f"layerdb/sha256/{d.name[:12]}"
        want(bool(HEX64.fullmatch(d.name)), f"{where}: dir name is not 64 hex")
        mode_is(d, 0o700)
        files = set(os.listdir(d))
        has_parent = "parent" in files
        want(files == {"diff", "size", "cache-id", "tar-split.json.gz"} | (
            {"parent"} if has_parent else set()), f"{where}: files {sorted(files)}")
        for f in files:
            want(stat.S_ISREG(os.lstat(d / f).st_mode), f"{where}/{f}: not a regular file")
            mode_is(d / f, 0o644)
        diff_id = text(d / "diff")
        want(bool(DIGEST.fullmatch(diff_id)), f"{where}/diff: {diff_id!r}")
        size_text = text(d / "size")
        want(size_text.isdigit(), f"{where}/size: {size_text!r} is not decimal")
        cache_id = text(d / "cache-id")
        want(bool(HEX64.fullmatch(cache_id)), f"{where}/cache-id: {cache_id!r} is not 64 hex")
        parent = text(d / "parent") if has_parent else None
        if parent is None:
            want(d.name == diff_id.removeprefix("sha256:"),
                 f"{where}: base layer ChainID != DiffID")
        else:
            want(bool(DIGEST.fullmatch(parent)), f"{where}/parent: {parent!r}")
            chain = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
            want(d.name == chain, f"{where}: ChainID != sha256('{parent[:19]}… {diff_id[:19]}…')")
        with contextlib.suppress(OSError, EOFError):
            gzip.decompress((d / "tar-split.json.gz").read_bytes())
        layers["sha256:" + d.name] = Layer("sha256:" + d.name, diff_id,
                                           int(size_text) if size_text.isdigit() else -1,
                                           cache_id, parent)
    cache_ids = [r.cache_id for r in layers.values()]
    want(len(set(cache_ids)) == len(cache_ids), "two layers share a cache-id")
    children = {r.parent for r in layers.values() if r.parent}
    for r in layers.values():
        if r.parent:
            want(r.parent in layers, f"layer {r.chain_id[:19]}: parent {r.parent[:19]} missing")

    # overlay2
    entries = set(os.listdir(overlay))
    if fresh:
        want(entries == {"l", *cache_ids}, f"overlay2/ holds {sorted(entries - {'l', *cache_ids})}"
             f" beyond the layers, lacks {sorted({'l', *cache_ids} - entries)}")
    links: dict[str, str] = {}  # chain -> link
    for r in layers.values():
        ld = r.dir(root)
        where = f"overlay2/{r.cache_id[:12]}"
        if not ld.is_dir():
            problems.append(f"{where}: missing")
            continue
        mode_is(ld, 0o710)
        names = set(os.listdir(ld))
        allowed = {"diff", "link"} | ({"lower", "work"} if r.parent else set()) | {"committed"}
        want(names <= allowed and {"diff", "link"} <= names, f"{where}: holds {sorted(names)}")
        if r.parent:
            want({"lower", "work"} <= names, f"{where}: lower/work missing")
        else:
            want(not ({"lower", "work"} & names), f"{where}: base layer has lower/work")
        if r.chain_id in children:
            want("committed" in names, f"{where}: parent of another layer but no committed")
        elif fresh:
            want("committed" not in names, f"{where}: committed but no child")
        if "committed" in names:
            want((ld / "committed").read_bytes() == b"", f"{where}/committed not empty")
            mode_is(ld / "committed", 0o600)
        if "work" in names:
            want((ld / "work").is_dir() and not (ld / "work").is_symlink(), f"{where}/work")
            mode_is(ld / "work", 0o700)
        diff = ld / "diff"
        want(diff.is_dir() and not diff.is_symlink(), f"{where}/diff is not a dir")
        mode_is(diff, (root_modes or {}).get(r.diff_id, 0o755))
        want(r.size == diff_size(diff), f"{where}: size file {r.size}, diff/ holds "
             f"{diff_size(diff)}")
        mode_is(ld / "link", 0o644)
        link = (ld / "link").read_bytes().decode()
        want(bool(LINK.fullmatch(link)), f"{where}/link: {link!r} is not 26 base32 chars")
        links[r.chain_id] = link
        lpath = overlay / "l" / link
        want(lpath.is_symlink() and os.readlink(lpath) == f"../{r.cache_id}/diff",
             f"l/{link}: does not point to ../{r.cache_id}/diff")
    want(len(set(links.values())) == len(links), "two layers share a link")
    want(set(os.listdir(overlay / "l")) == set(links.values()),
         f"l/ holds {sorted(set(os.listdir(overlay / 'l')) - set(links.values()))} beyond the "
         f"layers' links, lacks {sorted(set(links.values()) - set(os.listdir(overlay / 'l')))}")
    lowers: dict[str, str] = {}

    def lower_of(chain: str) -> str:
        r = layers[chain]
        if r.parent is None:
            return ""
        if chain not in lowers:
            plower = lower_of(r.parent)
            lowers[chain] = f"l/{links.get(r.parent, '?')}" + (f":{plower}" if plower else "")
        return lowers[chain]

    for r in layers.values():
        if r.parent and r.parent in layers and (r.dir(root) / "lower").exists():
            lower_file = r.dir(root) / "lower"
            mode_is(lower_file, 0o644)
            have = lower_file.read_bytes().decode()
            want(have == lower_of(r.chain_id), f"overlay2/{r.cache_id[:12]}/lower: {have!r}, "
                 f"want {lower_of(r.chain_id)!r}")
            want(have.count(":") + 1 <= 128, "lower has more than 128 entries")

    # imagedb
    content = imagedb(root) / "content" / "sha256"
    for d in (imagedb(root), imagedb(root) / "content", content):
        mode_is(d, 0o700)
    have_images: dict[str, bytes] = {}
    for p in content.iterdir():
        mode_is(p, 0o600)
        data = p.read_bytes()
        want(hashlib.sha256(data).hexdigest() == p.name, f"imagedb {p.name[:12]}: wrong digest")
        have_images["sha256:" + p.name] = data
        for chain in chain_ids_by_spec(json.loads(data)["rootfs"]["diff_ids"]):
            want(chain in layers, f"image {p.name[:12]}: layer {chain[:19]} not in layerdb")
    if images is not None:
        want(set(have_images) == set(images), f"imagedb holds {sorted(have_images)}, want "
             f"{sorted(images)}")
        for image_id, raw in images.items():
            if image_id in have_images:
                want(have_images[image_id] == raw, f"imagedb {image_id[:19]}: not the exact "
                     "config bytes")
    meta = imagedb(root) / "metadata"
    if meta.exists():
        stray = [os.path.join(dp, f) for dp, _d, fs in os.walk(meta) for f in fs]
        want(not stray, f"unpack wrote imagedb metadata: {stray}")

    # repositories.json
    repos_path = repositories_path(root)
    if repos_path.exists():
        mode_is(repos_path, 0o600)
        obj = json.loads(repos_path.read_bytes())
        want(isinstance(obj, dict) and list(obj) == ["Repositories"], f"repositories.json: {obj}")
        have_tags: dict[str, str] = {}
        for repo, refs in obj.get("Repositories", {}).items():
            for ref, image_id in refs.items():
                want(ref.rsplit(":", 1)[0].split("@")[0] == repo,
                     f"repositories.json: {ref} filed under {repo}")
                have_tags[ref] = image_id
        if tags is not None:
            want(have_tags == dict(tags), f"tags {have_tags}, want {dict(tags)}")
        for ref, image_id in have_tags.items():
            want(image_id in have_images, f"tag {ref} names missing image {image_id}")
    elif tags:
        problems.append(f"repositories.json missing, want tags {dict(tags)}")
    if fresh:
        for d in (root / "image" / "overlay2", content):
            stray = [n for n in os.listdir(d) if n.startswith(".")]
            want(not stray, f"{d.relative_to(root)}: temp files left {stray}")
    assert not problems, "store does not match docs/store-format.md:\n  " + "\n  ".join(problems)


def tar_split_names(root: Path, chain: str) -> list[str]:
    path = layerdb(root) / "sha256" / chain.removeprefix("sha256:") / "tar-split.json.gz"
    names = []
    for line in gzip.decompress(path.read_bytes()).splitlines():
        rec = json.loads(line)
        if rec["type"] == 1:
            names.append(rec["name"] if "name" in rec else
                         base64.b64decode(rec["name_raw"]).decode("utf-8", "surrogateescape"))
    return names


def store_view(root: Path) -> dict[str, Any]:
    """The store with its random names (cache-ids, links) replaced by ChainIDs: two stores
    unpacked from the same images must give equal views."""
    layers = read_layers(root)
    by_link = {}
    for r in layers.values():
        by_link[(r.dir(root) / "link").read_text()] = r.chain_id
    view: dict[str, Any] = {"images": {i: (imagedb(root) / "content" / "sha256" /
                                          i.removeprefix("sha256:")).read_bytes()
                                       for i in image_ids(root)},
                            "tags": tags_of(root), "layers": {}}
    for r in layers.values():
        ld = r.dir(root)
        lower = (ld / "lower").read_text() if (ld / "lower").exists() else ""
        ts = layerdb(root) / "sha256" / r.chain_id.removeprefix("sha256:") / "tar-split.json.gz"
        view["layers"][r.chain_id] = {
            "diff_id": r.diff_id, "size": r.size, "parent": r.parent,
            "files": sorted(os.listdir(ld)),
            "lower": [by_link.get(x.removeprefix("l/"), x) for x in lower.split(":") if x],
            "tar_split": gzip.decompress(ts.read_bytes()),
            "diff_mode": _mode(ld / "diff"),
        }
    return view


def assert_same_stores(a: Path, b: Path) -> None:
    """Equal views, and equal diff dirs (every field; dir mtimes only where a tar entry sets
    them: implicit parents get the time of the unpack)."""
    va, vb = store_view(a), store_view(b)
    assert va == vb
    la, lb = read_layers(a), read_layers(b)
    for chain, r in la.items():
        names = tar_split_names(a, chain)
        explicit = {clean(n).encode() for n in names}
        implicit = {p for n in names
                    for p in _ancestors(clean(n).encode())} - explicit
        tc.assert_same(_whiteouts_timeless(tc.snapshot(r.diff(a))),
                       _whiteouts_timeless(tc.snapshot(lb[chain].diff(b))),
                       ignore_dir_mtime=implicit, names=(str(a), str(b)),
                       msg=f"diff dirs of layer {chain}")


def _whiteouts_timeless(snap: tc.Snapshot) -> tc.Snapshot:
    """Whiteouts (char 0/0) get the time they were made, as Docker's mknod gives them."""
    return tc.without(snap, "mtime",
                      paths=lambda p: snap[p].kind == "chr" and snap[p].rdev == (0, 0))


def _ancestors(path: bytes) -> list[bytes]:
    parts = path.split(b"/")
    return [b"/".join(parts[:i]) for i in range(1, len(parts))]


# ============================================================================================
# Mounts
# ============================================================================================

# ============================================================================================
# Fixtures: a store with demo (untagged) and docker-save.tar (committed:latest)
# ============================================================================================

@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def both(root: Path, capsys: Capsys) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unpack demo, then docker-save.tar; returns both --json results."""
    return unpack(capsys, root, DEMO), unpack(capsys, root, DOCKER_SAVE)


# ============================================================================================
# store.py: staging dirs
# ============================================================================================

def test_clean_stale_never_takes_a_staging_dir_being_made(tmp_path: Path) -> None:
    """Every unpack starts with clean_stale(); another unpack may be inside begin_layer() at
    that moment. The dir it is making is not stale: it must survive, whatever the interleaving.
    (Threads stand in for processes: flock conflicts between open files of one process too.)
    Runs for a few seconds at most, stopping at the first lost dir."""
    import sys
    import threading
    import time

    from ocilayers.store import Store

    store = Store(str(tmp_path / "store"))
    store.init()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    stop = threading.Event()
    problems: list[str] = []
    rounds = 0

    def cleaner() -> None:
        while not stop.is_set():
            store.layers.clean_stale()

    thread = threading.Thread(target=cleaner)
    thread.start()
    deadline = time.monotonic() + 4
    try:
        while not problems and rounds < 2000 and time.monotonic() < deadline:
            rounds += 1
            try:
                staging = store.layers.begin()
            except OSError as exc:
                problems.append(f"begin: {exc!r}")
                continue
            if not os.path.isdir(staging.diff):
                problems.append(f"{staging.path}: removed while its builder holds it")
            store.layers.discard(staging)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    assert not problems, f"round {rounds}: a live staging dir was taken: {problems[0]}"


def test_clean_stale_removes_only_unheld_staging_dirs(tmp_path: Path) -> None:
    from ocilayers.store import Store

    store = Store(str(tmp_path / "store"))
    store.init()
    held = store.layers.begin()
    stale = tmp_path / "store" / "overlay2" / (".staging-" + "cd" * 32)
    (stale / "diff" / "x").mkdir(parents=True)
    (stale / "diff" / "x" / "f").write_text("left by a kill -9")
    os.chmod(stale / "diff" / "x", 0o555)  # read-only dirs inside a layer must not stop it
    removed = store.layers.clean_stale()
    assert removed == [str(stale)]
    assert not stale.exists() and os.path.isdir(held.diff)
    store.layers.discard(held)
    assert not os.path.exists(held.path)


# ============================================================================================
# images / inspect
# ============================================================================================

def test_images_json_rows(root: Path, both: tuple[dict[str, Any], dict[str, Any]],
                          capsys: Capsys) -> None:
    demo, saved = read_source(DEMO), read_source(DOCKER_SAVE)
    rows = json.loads(ok(capsys, root, "images", "--json"))
    layers = read_layers(root)
    want = []
    for src, tags in ((demo, []), (saved, ["committed:latest"])):
        want.append({"image_id": src.image_id, "tags": tags,
                     "created": json.loads(src.config)["created"],
                     "size": sum(layers[c].size for c in src.chain_ids)})
    assert sorted(rows, key=lambda r: r["image_id"]) == sorted(want, key=lambda r: r["image_id"])


def test_images_table_names_tags(root: Path, both: Any, capsys: Capsys) -> None:
    out = ok(capsys, root, "images")
    saved = read_source(DOCKER_SAVE)
    assert "committed:latest" in out and saved.image_id[7:19] in out
    assert "<none>" in out  # demo has no tag


def test_images_without_store_fails(tmp_path: Path, capsys: Capsys) -> None:
    code, _out, err = ol(capsys, tmp_path / "nothing", "images")
    assert_one_line_error(code, err, "no store")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("how", ["tag", "id", "hex", "prefix", "sha-prefix"])
def test_inspect_image_json(root: Path, both: Any, capsys: Capsys, how: str) -> None:
    src = read_source(DOCKER_SAVE)
    name = {"tag": "committed:latest", "id": src.image_id, "hex": src.image_id[7:],
            "prefix": src.image_id[7:19], "sha-prefix": src.image_id[:19]}[how]
    got = json.loads(ok(capsys, root, "inspect", name, "--json"))
    config = json.loads(src.config)
    layers = read_layers(root)
    assert got == {
        "image_id": src.image_id, "tags": ["committed:latest"], "config": config,
        "history": config["history"],
        "layers": [{"diff_id": d, "chain_id": c, "cache_id": layers[c].cache_id,
                    "diff_size": layers[c].size}
                   for d, c in zip(src.diff_ids, src.chain_ids, strict=True)],
    }


def test_inspect_source_when_transport_or_path(root: Path, both: Any, capsys: Capsys) -> None:
    src = read_source(DEMO)
    for arg in (f"oci:{DEMO}:latest", str(DEMO)):
        got = json.loads(ok(capsys, root, "inspect", arg, "--json"))
        assert "manifest_digest" in got and got["image_id"] == src.image_id, arg
        assert [x["diff_id"] for x in got["layers"]] == src.diff_ids


def test_name_both_path_and_tag_is_an_error(root: Path, both: Any, capsys: Capsys,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    shutil.copytree(DEMO, tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    ok(capsys, root, "tag", "committed:latest", "mine")
    code, _out, err = ol(capsys, root, "inspect", "mine", "--json")
    line = assert_one_line_error(code, err, "mine")
    assert "./mine" in line or "oci:mine" in line, line
    # the error's advice works: ./mine is the source, the ID the image
    got = json.loads(ok(capsys, root, "inspect", "./mine", "--json"))
    assert got["image_id"] == read_source(DEMO).image_id and "manifest_digest" in got
    got = json.loads(ok(capsys, root, "inspect", "mine:latest", "--json"))
    assert got["image_id"] == read_source(DOCKER_SAVE).image_id


def _images_sharing_a_prefix(base: Path) -> tuple[Path, Path, str]:
    """Two one-layer images whose IDs share the first hex digit (pigeonhole: <= 17 tries)."""
    layer = make_tar([("f", b"same layer\n", 0o644)])
    seen: dict[str, Path] = {}
    for i in range(17):
        d = base / f"img{i}"
        img = write_oci(d, [layer], labels={"n": str(i)})
        first = img.image_id[7]
        if first in seen:
            return seen[first], d, first
        seen[first] = d
    raise AssertionError("unreachable")


@pytest.mark.parametrize("command", ["inspect", "flatten", "tag", "rmi", "export", "mount",
                                     "verify"])
def test_ambiguous_id_prefix(root: Path, tmp_path: Path, capsys: Capsys,
                             monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    a, b, prefix = _images_sharing_a_prefix(tmp_path / "src")
    ida, idb = unpack(capsys, root, a)["image_id"], unpack(capsys, root, b)["image_id"]
    monkeypatch.chdir(tmp_path)
    extra = {"flatten": ["dest"], "tag": ["x:1"], "export": ["-o", "out"],
             "mount": [str(tmp_path)]}.get(command, [])
    for name in (prefix, "sha256:" + prefix):
        code, _out, err = ol(capsys, root, command, name, *extra)
        assert_one_line_error(code, err, "ambiguous", name)
    assert image_ids(root) == {ida, idb}
    # a longer, unique prefix picks one
    n = next(i for i in range(1, 64) if ida[7:7 + i] != idb[7:7 + i])
    got = json.loads(ok(capsys, root, "inspect", ida[7:7 + n], "--json"))
    assert got["image_id"] == ida


def test_unknown_name_is_an_error(root: Path, both: Any, capsys: Capsys,
                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for cmd in (["inspect", "nosuch"], ["inspect", "nosuch:tag"], ["tag", "nosuch", "x:1"],
                ["rmi", "nosuch"], ["mount", "nosuch", str(tmp_path)],
                ["export", "nosuch", "-o", str(tmp_path / "out")], ["verify", "nosuch"]):
        code, _out, err = ol(capsys, root, *cmd)
        assert_one_line_error(code, err, "nosuch")
    assert not (tmp_path / "out").exists()


# ============================================================================================
# tag / untag
# ============================================================================================

def test_tag_and_untag(root: Path, both: Any, capsys: Capsys) -> None:
    demo, saved = read_source(DEMO), read_source(DOCKER_SAVE)
    ok(capsys, root, "tag", demo.image_id[7:19], "docker.io/library/demo:v1")
    ok(capsys, root, "tag", "committed:latest", "example.com/team/app")
    ok(capsys, root, "tag", "committed", "committed:again")  # a bare name means :latest
    want = {"committed:latest": saved.image_id, "demo:v1": demo.image_id,
            "example.com/team/app:latest": saved.image_id, "committed:again": saved.image_id}
    check_store(root, tags=want, images={demo.image_id: demo.config,
                                         saved.image_id: saved.config})
    assert repositories(root) == {
        "committed": {"committed:latest": saved.image_id, "committed:again": saved.image_id},
        "demo": {"demo:v1": demo.image_id},
        "example.com/team/app": {"example.com/team/app:latest": saved.image_id}}
    rows = {r["image_id"]: r["tags"] for r in json.loads(ok(capsys, root, "images", "--json"))}
    assert sorted(rows[saved.image_id]) == ["committed:again", "committed:latest",
                                            "example.com/team/app:latest"]
    # retag moves the tag
    ok(capsys, root, "tag", saved.image_id, "demo:v1")
    assert tags_of(root)["demo:v1"] == saved.image_id

    ok(capsys, root, "untag", "demo:v1")
    ok(capsys, root, "untag", "example.com/team/app:latest")
    assert "demo" not in repositories(root)
    assert "example.com/team/app" not in repositories(root)
    assert image_ids(root) == {demo.image_id, saved.image_id}  # untag never removes images
    assert len(read_layers(root)) == 5
    code, _out, err = ol(capsys, root, "untag", "demo:v1")
    assert_one_line_error(code, err, "demo:v1")
    code, _out, err = ol(capsys, root, "tag", "committed:latest", "Bad Name")
    assert code == 1 and err.startswith(ERROR_PREFIX) and "Traceback" not in err
    verify_ok(capsys, root)


# ============================================================================================
# rmi / prune
# ============================================================================================

def test_rmi_removes_only_unshared_layers(root: Path, both: Any, capsys: Capsys) -> None:
    demo, saved = read_source(DEMO), read_source(DOCKER_SAVE)
    before = read_layers(root)
    top = saved.chain_ids[-1]
    out = ok(capsys, root, "rmi", "committed:latest")
    assert "untagged committed:latest" in out and saved.image_id in out and top in out
    after = read_layers(root)
    assert set(after) == set(demo.chain_ids)
    assert after == {c: before[c] for c in demo.chain_ids}
    assert not before[top].dir(root).exists()
    assert image_ids(root) == {demo.image_id} and tags_of(root) == {}
    check_store(root, images={demo.image_id: demo.config}, tags={}, fresh=False)
    verify_ok(capsys, root)
    # the demo image still unpacks as "all reused" and flattens
    assert [x["reused"] for x in unpack(capsys, root, DEMO)["layers"]] == [True] * 4

    out = ok(capsys, root, "rmi", demo.image_id[7:19])
    assert demo.image_id in out
    assert read_layers(root) == {} and image_ids(root) == set()
    assert os.listdir(root / "overlay2") == ["l"] and os.listdir(root / "overlay2" / "l") == []


def test_rmi_of_an_image_whose_layers_another_uses(root: Path, both: Any, capsys: Capsys
                                                   ) -> None:
    demo, saved = read_source(DEMO), read_source(DOCKER_SAVE)
    before = read_layers(root)
    out = ok(capsys, root, "rmi", demo.image_id)
    assert "deleted layer" not in out
    assert read_layers(root) == before
    assert image_ids(root) == {saved.image_id}
    check_store(root, images={saved.image_id: saved.config},
                tags={"committed:latest": saved.image_id})
    verify_ok(capsys, root)


def test_rmi_of_one_of_several_tags_only_untags(root: Path, both: Any, capsys: Capsys) -> None:
    saved = read_source(DOCKER_SAVE)
    ok(capsys, root, "tag", "committed:latest", "other:1")
    before = read_layers(root)
    out = ok(capsys, root, "rmi", "other:1")
    assert out.strip() == "untagged other:1"
    assert tags_of(root) == {"committed:latest": saved.image_id}
    assert saved.image_id in image_ids(root) and read_layers(root) == before


def test_prune_removes_unreferenced_layers_and_orphans(root: Path, both: Any,
                                                       capsys: Capsys) -> None:
    from ocilayers.spec import Digest
    from ocilayers.store import Store

    demo, saved = read_source(DEMO), read_source(DOCKER_SAVE)
    layers = read_layers(root)
    top = layers[saved.chain_ids[-1]]
    # drop the committed image (untag, then its config only), as a crash inside rmi would leave
    ok(capsys, root, "untag", "committed:latest")
    Store(str(root)).images.remove(Digest.parse(saved.image_id))
    orphan = root / "overlay2" / ("ab" * 32)
    (orphan / "diff" / "etc").mkdir(parents=True)
    (orphan / "diff" / "etc" / "leftover").write_text("x")
    (orphan / "link").write_text("Q" * 26)
    os.symlink(f"../{orphan.name}/diff", root / "overlay2" / "l" / ("Q" * 26))
    os.symlink("../gone/diff", root / "overlay2" / "l" / ("Z" * 26))

    out = ok(capsys, root, "prune")
    assert saved.chain_ids[-1] in out and orphan.name in out
    assert set(read_layers(root)) == set(demo.chain_ids)
    assert not orphan.exists() and not top.dir(root).exists()
    assert sorted(os.listdir(root / "overlay2" / "l")) == sorted(
        (layers[c].dir(root) / "link").read_text() for c in demo.chain_ids)
    check_store(root, images={demo.image_id: demo.config}, fresh=False)
    verify_ok(capsys, root)


def test_prune_on_a_clean_store_changes_nothing(root: Path, both: Any, capsys: Capsys) -> None:
    before = tc.snapshot(root, root_entry=True)
    assert ok(capsys, root, "prune") == ""
    tc.assert_same(before, tc.snapshot(root, root_entry=True))


def test_a_layer_deeper_than_the_recursion_limit(root: Path, tmp_path: Path,
                                                 capsys: Capsys) -> None:
    """1500 nested dirs (Python's recursion limit is 1000): unpack, verify, flatten, rmi and
    prune all get through. rmi and prune ended in RecursionError in shutil.rmtree; flatten in
    the opaque clearing, and took 20 s walking every dir's path from the top."""
    chain = ["/".join(["d"] * i) for i in range(1, 1501)]
    deep = make_tar([*((p, None, 0o755) for p in chain), (chain[-1] + "/leaf", b"deep", 0o644)])
    img = write_oci(tmp_path / "img", [
        deep, make_tar([("d", None, 0o755), ("d/.wh..wh..opq", b"", 0o644), ("new", b"n", 0o644)]),
    ])
    image_id = unpack(capsys, root, tmp_path / "img")["image_id"]
    assert image_id == img.image_id
    verify_ok(capsys, root)
    ok(capsys, root, "flatten", image_id, str(tmp_path / "flat"))
    assert sorted(os.listdir(tmp_path / "flat")) == ["d", "new"]
    assert os.listdir(tmp_path / "flat" / "d") == []
    ok(capsys, root, "rmi", image_id)
    assert read_layers(root) == {} and os.listdir(root / "overlay2") == ["l"]
    # prune: the layers of an image whose config is gone (a crash inside rmi), and an orphan
    # dir (a crash between the rename and the layerdb write)
    from ocilayers.spec import Digest
    from ocilayers.store import Store

    unpack(capsys, root, tmp_path / "img")
    Store(str(root)).images.remove(Digest.parse(image_id))
    layers = read_layers(root)
    shutil.move(layers[img.chain_ids[0]].dir(root) / "diff", root / "overlay2" / ("ab" * 32))
    out = ok(capsys, root, "prune")
    assert all(c in out for c in img.chain_ids) and "ab" * 32 in out
    assert read_layers(root) == {} and os.listdir(root / "overlay2") == ["l"]


# ============================================================================================
# verify
# ============================================================================================

def _demo_layer(root: Path, index: int) -> Layer:
    return read_layers(root)[read_source(DEMO).chain_ids[index]]


def _append(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"tampered\n")


def _retarget(p: Path, target: str) -> None:
    """Point the symlink `p` elsewhere, keeping its dir's mtime (only the link changes)."""
    st = os.stat(p.parent)
    p.unlink()
    p.symlink_to(target)
    os.utime(p.parent, ns=(st.st_atime_ns, st.st_mtime_ns))


def _add_file(p: Path, data: bytes) -> None:
    """Create `p`, keeping its dir's mtime (so only the new entry differs)."""
    st = os.stat(p.parent)
    p.write_bytes(data)
    os.utime(p.parent, ns=(st.st_atime_ns, st.st_mtime_ns))


def _overwrite_same_size(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[0] ^= 0x01
    st = os.stat(p)
    p.write_bytes(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(("layer", "rel", "change"), [
    pytest.param(0, "etc/passwd", _append, id="append"),
    pytest.param(0, "etc/group", lambda p: os.chmod(p, 0o600), id="chmod"),
    pytest.param(0, "usr/share/demo/a.txt", os.unlink, id="delete"),
    pytest.param(0, "bin/busybox", _overwrite_same_size, id="same-size-same-mtime"),
    pytest.param(1, "etc/motd", lambda p: os.utime(p, (1, 1)), id="touch"),
    pytest.param(0, "usr/bin/suid-demo", lambda p: os.chown(p, 1, 1, follow_symlinks=False),
                 id="chown"),
    pytest.param(1, "var/cache", lambda p: os.chmod(p, 0o700), id="chmod-dir"),
    pytest.param(0, "usr/share/demo/c.txt",
                 lambda p: os.removexattr(p, "user.demo.comment", follow_symlinks=False),
                 id="xattr-removed"),
    pytest.param(3, "opt/other",
                 lambda p: os.removexattr(p, "trusted.overlay.opaque", follow_symlinks=False),
                 id="opaque-removed"),
    pytest.param(0, "bin/sh", lambda p: _retarget(p, "ls"), id="symlink-target"),
    # a file the layer never had: the merged view changes, so verify must notice and say where
    pytest.param(0, "etc/added", lambda p: _add_file(p, b""), id="added-empty-file"),
    pytest.param(0, "etc/added", lambda p: _add_file(p, b"data\n"), id="added-file"),
    # the overlay whiteout (char 0/0) that the tar's usr/share/demo/.wh.b.txt became
    pytest.param(1, "usr/share/demo/b.txt", os.unlink, id="whiteout-deleted"),
    # xattrs the layer never had (found by fuzzing: verify said ok): an opaque mark hides the
    # lower dir in a mount, a capability changes what a binary may do
    pytest.param(0, "etc", lambda p: os.setxattr(p, "trusted.overlay.opaque", b"y"),
                 id="opaque-added"),
    pytest.param(0, "bin/busybox",
                 lambda p: os.setxattr(p, "security.capability",
                                       b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12),
                 id="capability-added"),
    pytest.param(0, "usr/share/demo/c.txt", lambda p: os.setxattr(p, "user.added", b"x"),
                 id="xattr-added"),
])
def test_verify_names_a_changed_path(root: Path, both: Any, capsys: Capsys, layer: int, rel: str,
                                     change: Callable[[Path], None]) -> None:
    verify_ok(capsys, root)
    path = _demo_layer(root, layer).diff(root) / rel
    head, _, base = rel.rpartition("/")
    shown = f"{head}/.wh.{base}"  # how the tar (and a message) may name a whiteout
    assert os.path.lexists(path) or "added" in rel
    change(path)
    code, _out, err = ol(capsys, root, "verify")
    assert code == 1, err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(ERROR_PREFIX + "verify"), err
    assert rel in last or shown in last, err
    # `verify IMAGE` of an image that holds the layer fails too
    code, _out, err = ol(capsys, root, "verify", "committed:latest")
    assert code == 1 and (rel in err or shown in err), err


@pytest.mark.parametrize("what", ["size", "size-garbage", "link", "link-missing",
                                  "lower", "cache-id-dir-missing", "layerdb-entry-missing"])
def test_verify_catches_store_metadata_damage(root: Path, both: Any, capsys: Capsys,
                                              what: str) -> None:
    rec = _demo_layer(root, 1)
    ldb = layerdb(root) / "sha256" / rec.chain_id.removeprefix("sha256:")
    if what == "size":
        (ldb / "size").write_text(str(rec.size + 1))
        needle = "size"
    elif what == "size-garbage":
        (ldb / "size").write_text("twelve")
        needle = "size"
    elif what == "link":
        (rec.dir(root) / "link").write_text("A" * 26)
        needle = "A" * 26
    elif what == "link-missing":
        (rec.dir(root) / "link").unlink()
        needle = "link"
    elif what == "lower":
        (rec.dir(root) / "lower").write_text("l/" + "B" * 26)
        needle = "lower"
    elif what == "layerdb-entry-missing":
        # found by fuzzing: the top layer's layerdb entry gone, and verify of the whole store
        # said ok while `verify IMAGE`, export and flatten failed
        top = _demo_layer(root, len(read_source(DEMO).diff_ids) - 1)
        shutil.rmtree(layerdb(root) / "sha256" / top.chain_id.removeprefix("sha256:"))
        needle = "missing"
    else:
        shutil.rmtree(rec.dir(root))
        needle = rec.cache_id
    code, _out, err = ol(capsys, root, "verify")
    assert code == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(ERROR_PREFIX) and needle in last, err


# ============================================================================================
# flatten / mount / umount
# ============================================================================================

def _snap(path: Path) -> tc.Snapshot:
    return tc.snapshot(path)


@pytest.mark.parametrize("fixture", ["demo", "docker-save.tar", "tiny"])
def test_mount_equals_flatten(root: Path, tmp_path: Path, capsys: Capsys, mounts: list[Path],
                              fixture: str) -> None:
    source = FIXTURES / fixture
    src = read_source(source)
    image_id = unpack(capsys, root, source)["image_id"]
    loose = image_loose_dirs(src)

    target = tmp_path / "mnt"
    target.mkdir()
    mounts.append(target)
    ok(capsys, root, "mount", image_id, str(target))
    info = mountinfo(target)
    assert info is not None and info[0] == "overlay", info
    assert "ro" in info[1].split(","), info
    with pytest.raises(OSError):
        (target / "new-file").write_text("x")
    merged = _snap(target)
    ok(capsys, root, "umount", str(target))
    assert not os.path.ismount(target) and os.listdir(target) == []

    ok(capsys, root, "flatten", image_id, str(tmp_path / "flat-image"))
    ok(capsys, root, "flatten", str(source), str(tmp_path / "flat-source"))
    from_image, from_source = _snap(tmp_path / "flat-image"), _snap(tmp_path / "flat-source")
    tc.assert_same(from_source, from_image, names=("flatten SOURCE", "flatten IMAGE"),
                   ignore_dir_mtime=loose)
    tc.assert_same(from_image, merged, names=("flatten IMAGE", "overlay mount"),
                   ignore_dir_mtime=loose)
    assert merged, "empty merged view"


def test_mount_and_flatten_match_umoci(root: Path, tmp_path: Path, capsys: Capsys,
                                       mounts: list[Path]) -> None:
    umoci = requires_tool("umoci")
    src = read_source(DEMO)
    bundle = tmp_path / "bundle"
    proc = subprocess.run([umoci, "unpack", "--image", f"{DEMO}:latest", str(bundle)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    expected = _snap(bundle / "rootfs")
    image_id = unpack(capsys, root, DEMO)["image_id"]
    target = tmp_path / "mnt"
    target.mkdir()
    mounts.append(target)
    ok(capsys, root, "mount", image_id, str(target))
    merged = _snap(target)
    ok(capsys, root, "umount", str(target))
    ok(capsys, root, "flatten", str(DEMO), str(tmp_path / "flat"))
    loose = image_loose_dirs(src)
    tc.assert_same(expected, merged, names=("umoci", "overlay mount"), ignore_dir_mtime=loose)
    tc.assert_same(expected, _snap(tmp_path / "flat"), names=("umoci", "flatten"),
                   ignore_dir_mtime=loose)


def test_mount_one_layer_is_a_read_only_bind(root: Path, tmp_path: Path, capsys: Capsys,
                                             mounts: list[Path]) -> None:
    image = one_layer_image()
    image_id = unpack(capsys, root, image)["image_id"]
    (rec,) = read_layers(root).values()
    target = tmp_path / "mnt"
    target.mkdir()
    mounts.append(target)
    ok(capsys, root, "mount", image_id, str(target))
    info = mountinfo(target)
    assert info is not None and info[0] != "overlay", info
    assert "ro" in info[1].split(","), info
    with pytest.raises(OSError) as exc:
        (target / "etc" / "new").write_text("x")
    assert exc.value.errno == 30  # EROFS
    tc.assert_same(_snap(rec.diff(root)), _snap(target), names=("diff", "mount"))
    assert (target / "etc" / "single").read_text() == "single layer\n"
    ok(capsys, root, "umount", str(target))
    assert not os.path.ismount(target)
    verify_ok(capsys, root)


def test_mount_125_layers(root: Path, tmp_path: Path, capsys: Capsys, mounts: list[Path]) -> None:
    image = deep_image(125)
    result = unpack(capsys, root, image)
    assert len(result["layers"]) == 125
    layers = read_layers(root)
    top = layers[result["layers"][-1]["chain_id"]]
    assert (top.dir(root) / "lower").read_text().count(":") + 1 == 124
    target = tmp_path / "mnt"
    target.mkdir()
    mounts.append(target)
    ok(capsys, root, "mount", result["image_id"], str(target))
    assert mountinfo(target) is not None
    names = sorted(os.listdir(target))
    assert names == [f"layer-{i:03d}" for i in range(125)]
    for i in (0, 1, 62, 123, 124):
        assert (target / f"layer-{i:03d}").read_text() == f"{i}\n"
    ok(capsys, root, "umount", str(target))
    check_store(root)


def test_mount_errors(root: Path, both: Any, tmp_path: Path, capsys: Capsys,
                      mounts: list[Path]) -> None:
    code, _out, err = ol(capsys, root, "mount", "committed:latest", str(tmp_path / "nodir"))
    assert code == 1 and err.startswith(ERROR_PREFIX) and "Traceback" not in err, err
    code, _out, err = ol(capsys, root, "umount", str(tmp_path))
    assert code == 1 and err.startswith(ERROR_PREFIX) and "Traceback" not in err, err


def test_flatten_source_needs_no_store(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "never-made"
    ok(capsys, root, "flatten", str(FIXTURES / "tiny"), str(tmp_path / "out"))
    assert not root.exists()
    assert (tmp_path / "out" / "hello.txt").read_text() == "hello v2\n"
    assert not (tmp_path / "out" / "docs" / "old.txt").exists()


# ============================================================================================
# export
# ============================================================================================

def read_output(out: Path, fmt: str) -> tuple[bytes, list[bytes], list[str]]:
    """(config bytes, layer blobs, RepoTags/ref names) of an exported image, verifying each
    blob's digest and size against its descriptor."""
    if fmt == "oci":
        files: Mapping[str, bytes] = {
            os.path.relpath(os.path.join(dp, f), out): Path(dp, f).read_bytes()
            for dp, _d, fs in os.walk(out) for f in fs}
    else:
        with tarfile.open(out) as tf:
            files = {}
            for m in tf.getmembers():
                if m.isfile() or m.issym() or m.islnk():
                    f = tf.extractfile(m)
                    assert f is not None
                    files[m.name.removeprefix("./")] = f.read()
    if fmt == "docker-archive":
        entry = json.loads(files["manifest.json"])
        assert len(entry) == 1
        return (files[entry[0]["Config"]], [files[p] for p in entry[0]["Layers"]],
                entry[0].get("RepoTags") or [])
    index = json.loads(files["index.json"])
    desc = index["manifests"][0]

    def blob(d: Mapping[str, Any]) -> bytes:
        data = files["blobs/" + d["digest"].replace(":", "/")]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]
        assert len(data) == d["size"]
        return data

    manifest = json.loads(blob(desc))
    refs = [m.get("annotations", {}).get(REF_NAME) for m in index["manifests"]]
    return blob(manifest["config"]), [blob(x) for x in manifest["layers"]], [r for r in refs if r]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("fmt", ["oci-archive", "oci", "docker-archive"])
def test_export_keeps_diff_ids(root: Path, both: Any, tmp_path: Path, capsys: Capsys, fmt: str,
                               compression: str) -> None:
    saved = read_source(DOCKER_SAVE)
    out = tmp_path / "out"
    ok(capsys, root, "export", "committed:latest", "-o", str(out), "--format", fmt,
       "--compression", compression)
    config, blobs, _names = read_output(out, fmt)
    assert config == saved.config
    assert ["sha256:" + hashlib.sha256(decompress(b)).hexdigest() for b in blobs] == \
        saved.diff_ids
    magic = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}.get(compression)
    if magic and fmt != "docker-archive":
        assert all(b.startswith(magic) for b in blobs)
    # the store is untouched by export
    verify_ok(capsys, root)


@pytest.mark.parametrize("fmt", ["oci-archive", "oci", "docker-archive"])
def test_export_read_by_skopeo(root: Path, both: Any, tmp_path: Path, capsys: Capsys,
                               fmt: str) -> None:
    saved = read_source(DOCKER_SAVE)
    out = tmp_path / "out"
    ok(capsys, root, "export", saved.image_id, "-o", str(out), "--format", fmt)
    transport = {"oci": f"oci:{out}", "oci-archive": f"oci-archive:{out}",
                 "docker-archive": f"docker-archive:{out}"}[fmt]
    # skopeo checks every blob digest while copying
    skopeo("copy", transport, f"oci:{tmp_path / 'copy'}:x")
    copied = read_source(tmp_path / "copy")
    if fmt != "docker-archive":  # skopeo rewrites a docker-archive's config into OCI form
        assert copied.config == saved.config
    assert ["sha256:" + hashlib.sha256(t).hexdigest() for t in copied.layer_tars] == \
        saved.diff_ids


def test_export_docker_archive_uncompressed_is_byte_identical(root: Path, tmp_path: Path,
                                                              capsys: Capsys) -> None:
    saved = read_source(DOCKER_SAVE)
    unpack(capsys, root, DOCKER_SAVE)
    out = tmp_path / "out.tar"
    ok(capsys, root, "export", "committed:latest", "-o", str(out), "--format", "docker-archive",
       "--compression", "none")
    config, blobs, names = read_output(out, "docker-archive")
    assert config == saved.config
    assert len(blobs) == len(saved.layer_tars)
    for i, (have, want) in enumerate(zip(blobs, saved.layer_tars, strict=True)):
        assert hashlib.sha256(have).hexdigest() == hashlib.sha256(want).hexdigest(), f"layer {i}"
    assert names == ["committed:latest"]


@pytest.mark.parametrize("fmt", ["oci-archive", "oci", "docker-archive"])
def test_export_of_a_changed_layer_fails_and_writes_nothing(root: Path, both: Any,
                                                            tmp_path: Path, capsys: Capsys,
                                                            fmt: str) -> None:
    rec = _demo_layer(root, 2)
    changed = rec.diff(root) / "opt" / "app" / "lib" / "libdemo.txt"
    _append(changed)
    out = tmp_path / "out"
    code, _out, err = ol(capsys, root, "export", "committed:latest", "-o", str(out),
                         "--format", fmt)
    assert_one_line_error(code, err, "opt/app/lib/libdemo.txt")
    assert not os.path.lexists(out), os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["store"], os.listdir(tmp_path)


@pytest.mark.parametrize("command", ["export", "convert"])
def test_output_to_stdout_is_the_same_archive(root: Path, tmp_path: Path, capsys: Capsys,
                                              command: str) -> None:
    """`-o -` writes the archive to stdout (the digest or --json goes to stderr), byte for byte
    what `-o FILE` writes; a directory format cannot go there."""
    unpack(capsys, root, DOCKER_SAVE)
    what = "committed:latest" if command == "export" else str(DOCKER_SAVE)
    base = [sys.executable, "-m", "ocilayers", "--root", str(root), command, what,
            "--format", "docker-archive", "--compression", "none"]
    out = tmp_path / "out.tar"
    to_file = subprocess.run([*base, "-o", str(out)], capture_output=True, check=True)
    piped = subprocess.run([*base, "-o", "-", "--json"], capture_output=True, check=True)
    assert piped.stdout == out.read_bytes()
    digest = to_file.stdout.decode().strip()
    assert json.loads(piped.stderr)["manifest_digest"] == digest
    assert not (Path.cwd() / "-").exists()
    bad = subprocess.run([*base[:-4], "--format", "oci", "-o", "-"], capture_output=True,
                         text=True)
    assert_one_line_error(bad.returncode, bad.stderr, "--format oci is a directory")


def test_verify_expects_the_xattrs_of_hardlinks_and_inherited_acls(tmp_path: Path,
                                                                  capsys: Capsys) -> None:
    """Extra-xattr checks must not flag what the layer itself gives: a hardlink shares its
    target's xattrs, and entries made in a dir with a default ACL inherit ACLs."""
    import tarbuilder as tb

    # user::rwx user:1000:r-x group::r-x mask::rwx other::r-x (a named user: not just the mode)
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in
        [(0x01, 7, 0xFFFFFFFF), (0x02, 5, 1000), (0x04, 5, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF),
         (0x20, 5, 0xFFFFFFFF)])
    layer = tb.build([
        tb.file("bin/tool", b"#!/bin/sh\n", mode=0o755, xattrs={"user.note": b"x"}),
        tb.hardlink("bin/tool2", "bin/tool"),
        tb.dir("shared", xattrs={"system.posix_acl_default": acl}),
        tb.file("shared/f", b"f"),
        tb.dir("shared/sub"),
        tb.file("shared/sub/g", b"g"),
    ])
    image = tmp_path / "img"
    write_oci(image, [layer])
    root = tmp_path / "store"
    unpack(capsys, root, image)
    assert "system.posix_acl_access" in os.listxattr(
        next(p for p in (root / "overlay2").glob("*/diff/shared/sub/g")))
    verify_ok(capsys, root)


@pytest.mark.parametrize("command", [["rmi", "committed:latest"], ["prune"]],
                         ids=["rmi", "prune"])
@pytest.mark.parametrize("tamper", ["cache-id-up", "cache-id-absolute", "link-up",
                                    "link-not-utf8", "lower-up", "config-not-json",
                                    "config-not-object"])
def test_tampered_store_files_never_reach_outside(root: Path, tmp_path: Path, capsys: Capsys,
                                                  tamper: str, command: list[str]) -> None:
    """Found by fuzzing: rmi took a layer's cache-id or link file as a path and deleted what it
    named, outside the store. Store files that name paths are checked when read; a corrupt
    one is a one-line error and nothing outside the store (or in it) is removed."""
    saved = read_source(DOCKER_SAVE)
    unpack(capsys, root, DOCKER_SAVE)
    if command[0] == "prune":
        ok(capsys, root, "untag", "committed:latest")  # so that prune would take the image
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "file").write_bytes(b"mine")
    top = read_layers(root)[saved.chain_ids[-1]]
    ldb = layerdb(root) / "sha256" / top.chain_id.removeprefix("sha256:")
    rel_victim = os.path.relpath(victim, ldb)
    if tamper == "cache-id-up":
        (ldb / "cache-id").write_text(os.path.relpath(victim, root / "overlay2"))
    elif tamper == "cache-id-absolute":
        (ldb / "cache-id").write_text(str(victim))
    elif tamper == "link-up":
        (top.dir(root) / "link").write_text(os.path.relpath(victim / "sub" / "file",
                                                            root / "overlay2" / "l"))
    elif tamper == "link-not-utf8":
        (top.dir(root) / "link").write_bytes(b"\xff" * 26)
    elif tamper == "lower-up":
        (top.dir(root) / "lower").write_text("l/../../" + rel_victim)
    else:
        image = root / "image" / "overlay2" / "imagedb" / "content" / "sha256" / \
            saved.image_id.removeprefix("sha256:")
        image.write_bytes(b"not json" if tamper == "config-not-json" else b"-5")
    before = sorted(p.name for p in root.rglob("*"))
    code, _out, err = ol(capsys, root, *command)
    if code == 0:  # prune: the untagged image still names its layers, nothing to remove
        assert command[0] == "prune", err
    else:
        assert_one_line_error(code, err)
        assert "internal error" not in err
    assert (victim / "sub" / "file").read_bytes() == b"mine"
    if code != 0:
        assert sorted(p.name for p in root.rglob("*")) == before
