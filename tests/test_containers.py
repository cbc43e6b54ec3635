"""Containers and commit (store/containers.py, initlayer.py, lifecycle.py, commit.py, the
`create`/`ps`/`rm`/`commit` commands and `mount`/`umount` of a container).

The expectations come from /work/shared/STORE.md ("The container layers") and FACTS.md ("What
dockerd 20.10 writes for a container"), written out here by hand. The outside oracles:
- the kernel's overlayfs: the init layer ocilayers builds from the image's diff dirs must give
  the merged view that dockerd's own algorithm (moby daemon/initlayer/setup_unix.go, ported
  below) gives when it runs on a real overlay mount of the same layers;
- a committed image, mounted read-only, must show what the container's merged view showed;
- crash safety by fork + os._exit at every store-changing syscall: whatever is left, `prune`
  must bring the store back to exactly what it was, and `verify` must pass.

Everything needs root (the init layer's files are owned 0:0, overlay mounts); tests that mount
skip (like every mount test) where overlay mounts are not permitted.
"""

from __future__ import annotations

import calendar
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
import treecompare as tc
from conftest import assert_one_line_error, chain_ids_by_spec, mountinfo
from test_store import (
    MEDIA_CONFIG,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    REF_NAME,
    check_store,
    diff_size,
    host_arch,
    imagedb,
    layerdb,
    ok,
    ol,
    read_layers,
    tags_of,
    unpack,
    verify_ok,
)
from throwaway_dockerd import wait_group_gone

from ocilayers import api, errors, lifecycle

Capsys = pytest.CaptureFixture[str]

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="containers need root (the init layer is owned 0:0)")

HEX64 = re.compile(r"[0-9a-f]{64}")
LINK = re.compile(r"[A-Z2-7]{26}")
RFC3339_NANO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?Z")
MNT_NS = re.compile(r"mnt:\[\d+\]")

# STORE.md / FACTS.md: what every init layer holds.
INIT_FILES = (".dockerenv", "etc/resolv.conf", "etc/hosts", "etc/hostname", "dev/console")
INIT_DIRS = ("dev/pts", "dev/shm", "proc", "sys")
INIT_PATHS = {*INIT_FILES, *INIT_DIRS, "etc/mtab"}


# ============================================================================================
# Images written by hand (tarbuilder layers, a config we choose)
# ============================================================================================

def write_image(dest: Path, layers: Sequence[Sequence[tb.Member]], *,
                config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                ref: str = "latest") -> bytes:
    """An OCI layout with gzip layers; `config` is the config's `config` object, `extra` more
    top-level members. Returns the config bytes."""
    (dest / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (dest / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    tars = [tb.build(members) for members in layers]
    descs = [{"mediaType": MEDIA_LAYER_GZIP, **put(gzip.compress(t, mtime=0))} for t in tars]
    cfg = json.dumps({
        "architecture": host_arch(), "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": dict(config or {}),
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i}"}
                    for i in range(len(tars))],
        **dict(extra or {}),
    }, sort_keys=True).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                           "config": {"mediaType": MEDIA_CONFIG, **put(cfg)},
                           "layers": descs}).encode()
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": MEDIA_MANIFEST, **put(manifest), "annotations": {REF_NAME: ref}}]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return cfg


def image_id_of(config: bytes) -> str:
    return "sha256:" + hashlib.sha256(config).hexdigest()


BASE_LAYERS: list[list[tb.Member]] = [
    [tb.dir("etc"), tb.file("etc/conf", b"a=1\n"), tb.file("etc/append.txt", b"line1\n"),
     tb.file("etc/gone", b"bye\n"), tb.dir("olddir"), tb.file("olddir/a", b"a\n"),
     tb.dir("olddir/sub"), tb.file("olddir/sub/b", b"b\n"), tb.dir("bin"),
     tb.file("bin/tool", b"#!/bin/sh\n", mode=0o755)],
    [tb.file("etc/hosts", b"127.0.0.1 image\n"), tb.file("keep", b"k\n")],
]
BASE_CONFIG = {"Entrypoint": ["/bin/tool"], "Cmd": ["--serve", "now"], "Env": ["A=1"]}
BASE_EXTRA = {"author": "base author", "container": "f" * 64,
              "container_config": {"Cmd": ["/bin/sh"]}, "docker_version": "20.10.24"}


@dataclass(frozen=True)
class Base:
    root: Path
    image_id: str
    config: bytes

    @property
    def diff_ids(self) -> list[str]:
        return list(json.loads(self.config)["rootfs"]["diff_ids"])

    @property
    def top(self) -> str:
        return chain_ids_by_spec(self.diff_ids)[-1]


def base_store(tmp_path: Path, capsys: Capsys, layers: Sequence[Sequence[tb.Member]] = BASE_LAYERS,
               *, config: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None, tag: str = "img:1") -> Base:
    src = tmp_path / f"src-{len(list(tmp_path.glob('src-*')))}"
    cfg = write_image(src, layers, config=BASE_CONFIG if config is None else config,
                      extra=BASE_EXTRA if extra is None else extra)
    root = tmp_path / "store"
    result = unpack(capsys, root, src, "--tag", tag)
    assert result["image_id"] == image_id_of(cfg)
    return Base(root, image_id_of(cfg), cfg)


# ============================================================================================
# The store, read back by hand
# ============================================================================================

def create(capsys: Capsys, root: Path, *argv: str) -> str:
    """`create ARGV`: stdout must be exactly the new container's 64-hex ID."""
    out = ok(capsys, root, "create", *argv)
    assert re.fullmatch(r"[0-9a-f]{64}\n", out), out
    return out.strip()


def mounts_dir(root: Path) -> Path:
    return layerdb(root) / "mounts"


def mount_id(root: Path, cid: str) -> str:
    return (mounts_dir(root) / cid / "mount-id").read_text()


def rw_dir(root: Path, cid: str) -> Path:
    return root / "overlay2" / mount_id(root, cid)


def init_dir(root: Path, cid: str) -> Path:
    return root / "overlay2" / (mount_id(root, cid) + "-init")


def records_dir(root: Path) -> Path:
    """ocilayers' own container records (outside dockerd's `containers/`)."""
    return root / "ocilayers" / "containers"


def chain_layers(root: Path, top: str) -> list[Any]:
    """The layers of the chain ending at `top`, base first (read from layerdb by hand)."""
    layers = read_layers(root)
    out = []
    cur: str | None = top
    while cur is not None:
        out.append(layers[cur])
        cur = layers[cur].parent
    return out[::-1]


def link_of(d: Path) -> str:
    return (d / "link").read_text()


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def ps(capsys: Capsys, root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok(capsys, root, "ps", "--json"))
    return rows


def mount_ctr(capsys: Capsys, root: Path, mounts: list[Path], cid: str,
              *target: str) -> Path:
    out = ok(capsys, root, "mount", cid, *target)
    path = Path(out.strip())
    assert out == f"{path}\n"
    mounts.append(path)
    return path


def entries(d: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under `d`: (kind, mode, uid, gid, size or symlink target); no mtimes."""
    return {p.decode(): (e.kind, e.mode, e.uid, e.gid,
                         e.target.decode() if e.target is not None else e.size)
            for p, e in tc.snapshot(d, mtimes=False).items()}


def layer_members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return list(tf)


def exported_layers(capsys: Capsys, root: Path, image: str, out: Path) -> list[bytes]:
    """`export IMAGE --format docker-archive --compression none`: the layer tars, base first."""
    ok(capsys, root, "export", image, "-o", str(out), "--format", "docker-archive",
       "--compression", "none")
    with tarfile.open(out) as tf:
        def get(name: str) -> bytes:
            f = tf.extractfile(name)
            assert f is not None
            return f.read()
        manifest = json.loads(get("manifest.json"))
        return [get(p) for p in manifest[0]["Layers"]]


def image_ids(root: Path) -> set[str]:
    """The image IDs in imagedb (not the `.tmp-*` files a crashed write may leave)."""
    content = imagedb(root) / "content" / "sha256"
    return {"sha256:" + n for n in os.listdir(content) if not n.startswith(".")}


def config_of(root: Path, image_id: str) -> dict[str, Any]:
    raw = (imagedb(root) / "content" / "sha256" / image_id.removeprefix("sha256:")).read_bytes()
    assert image_id_of(raw) == image_id
    obj: dict[str, Any] = json.loads(raw)
    return obj


# ============================================================================================
# 1. create: the layout dockerd writes
# ============================================================================================

def test_create_writes_dockerds_layout(tmp_path: Path, capsys: Capsys) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    before_links = set(os.listdir(root / "overlay2" / "l"))
    cid = create(capsys, root, "img:1")

    # layerdb/mounts/<id>: dir 0755, three files 0644 without newline
    entry = mounts_dir(root) / cid
    assert mode(entry) == 0o755
    # dockerd makes it with os.MkdirAll(layerdb/mounts/<id>, 0755) (moby layer/filestore.go)
    assert mode(mounts_dir(root)) == 0o755
    assert sorted(os.listdir(entry)) == ["init-id", "mount-id", "parent"]
    for f in ("init-id", "mount-id", "parent"):
        assert stat.S_ISREG(os.lstat(entry / f).st_mode) and mode(entry / f) == 0o644, f
    mid = (entry / "mount-id").read_bytes().decode()
    assert HEX64.fullmatch(mid), mid
    assert (entry / "init-id").read_bytes() == f"{mid}-init".encode()
    assert (entry / "parent").read_bytes() == base.top.encode()

    chain = chain_layers(root, base.top)
    top_dir = root / "overlay2" / chain[-1].cache_id
    image_lower = ":".join(f"l/{link_of(root / 'overlay2' / r.cache_id)}" for r in chain[::-1])

    init, rw = root / "overlay2" / f"{mid}-init", root / "overlay2" / mid
    assert sorted(os.listdir(init)) == ["committed", "diff", "link", "lower", "work"]
    assert sorted(os.listdir(rw)) == ["diff", "link", "lower", "work"]
    for d in (init, rw):
        assert mode(d) == 0o710
        assert mode(d / "diff") == 0o755 and (d / "diff").is_dir()
        assert mode(d / "work") == 0o700 and (d / "work").is_dir()
        for f in ("link", "lower"):
            assert mode(d / f) == 0o644, f
        assert LINK.fullmatch(link_of(d))
        assert (d / "link").read_bytes() == (d / "link").read_bytes().strip()
        # l/<LINK> -> ../<dir>/diff, a relative symlink
        assert os.readlink(root / "overlay2" / "l" / link_of(d)) == f"../{d.name}/diff"
    assert os.listdir(rw / "diff") == []
    assert (init / "lower").read_bytes() == image_lower.encode()
    assert (rw / "lower").read_bytes() == f"l/{link_of(init)}:{image_lower}".encode()
    assert set(os.listdir(root / "overlay2" / "l")) == before_links | {link_of(init),
                                                                       link_of(rw)}
    # committed: in the image's top layer and in the init layer, empty, 0600
    for d in (top_dir, init):
        assert (d / "committed").read_bytes() == b"" and mode(d / "committed") == 0o600
    verify_ok(capsys, root)


def test_create_json_and_ps(tmp_path: Path, capsys: Capsys) -> None:
    base = base_store(tmp_path, capsys)
    t0 = time.time()
    obj = json.loads(ok(capsys, base.root, "create", "img:1", "--name", "web", "--json"))
    assert set(obj) == {"id", "name", "image_id", "created", "command", "mount_id", "mounted"}
    assert HEX64.fullmatch(obj["id"]) and obj["mount_id"] == mount_id(base.root, obj["id"])
    assert obj["name"] == "web" and obj["image_id"] == base.image_id and obj["mounted"] == []
    assert RFC3339_NANO.fullmatch(obj["created"]), obj["created"]
    created = calendar.timegm(time.strptime(obj["created"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert t0 - 2 <= created <= time.time() + 1
    assert ps(capsys, base.root) == [obj]

    text = ok(capsys, base.root, "ps").splitlines()
    assert re.split(r"\s{2,}", text[0]) == ["CONTAINER ID", "NAME", "IMAGE", "COMMAND",
                                           "CREATED", "MOUNTED"]
    row = re.split(r"\s{2,}", text[1])
    assert row[:4] == [obj["id"][:12], "web", "img:1", "/bin/tool --serve now"], row
    assert row[-1] == "-"
    assert len(text) == 2
    full = ok(capsys, base.root, "ps", "--no-trunc").splitlines()
    assert full[1].startswith(obj["id"] + " ")


@pytest.mark.parametrize(("argv", "config", "want"), [
    pytest.param([], BASE_CONFIG, ["/bin/tool", "--serve", "now"], id="entrypoint+cmd"),
    pytest.param([], {"Cmd": ["/bin/sh", "-c", "echo hi"]}, ["/bin/sh", "-c", "echo hi"],
                 id="cmd-only"),
    pytest.param([], {"Entrypoint": ["/init"]}, ["/init"], id="entrypoint-only"),
    pytest.param([], {}, [], id="neither"),
    pytest.param(["--", "echo", "hi there", "--name", "xx"], BASE_CONFIG,
                 ["echo", "hi there", "--name", "xx"], id="after-dashes"),
])
def test_create_records_the_command(tmp_path: Path, capsys: Capsys, argv: list[str],
                                    config: dict[str, Any], want: list[str]) -> None:
    base = base_store(tmp_path, capsys, config=config)
    cid = create(capsys, base.root, "img:1", *argv)
    (row,) = ps(capsys, base.root)
    assert row["id"] == cid and row["command"] == want and row["name"] is None


def test_create_name_rules(tmp_path: Path, capsys: Capsys) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    first = create(capsys, root, "img:1", "--name", "web")
    dirs = set(os.listdir(root / "overlay2"))
    for bad in ("-web", "w", "a b", "a/b", "caf\u00e9", ".x", "_x", ""):
        code, out, err = ol(capsys, root, "create", "img:1", f"--name={bad}")
        assert out == ""
        assert_one_line_error(code, err, "invalid container name")
    code, out, err = ol(capsys, root, "create", "img:1", "--name", "web")
    assert out == ""
    assert_one_line_error(code, err, "web", "already in use")
    assert set(os.listdir(root / "overlay2")) == dirs  # refused before any layer was made
    assert [r["id"] for r in ps(capsys, root)] == [first]
    # Names and IDs are separate (docker reserves names only): a name that happens to be a
    # prefix of another container's ID is free, and then names that container exactly.
    prefix = first[:8]
    second = create(capsys, root, "img:1", "--name", prefix)
    for good in ("web.2", "Web_2-x", "0a"):
        create(capsys, root, "img:1", "--name", good)
    assert lifecycle.find_container(api.open_store(str(root)), prefix).id == second
    assert lifecycle.find_container(api.open_store(str(root)), "web").id == first
    verify_ok(capsys, root)


def test_create_errors(tmp_path: Path, capsys: Capsys) -> None:
    base = base_store(tmp_path, capsys)
    code, out, err = ol(capsys, base.root, "create", "nosuch:1")
    assert out == ""
    assert_one_line_error(code, err, "nosuch")
    code, out, err = ol(capsys, tmp_path / "nostore", "create", "img:1")
    assert out == ""
    assert_one_line_error(code, err, "no store", str(tmp_path / "nostore"))
    assert not (tmp_path / "nostore").exists()  # no empty store left behind
    assert not mounts_dir(base.root).exists()


def test_ps_lists_oldest_first(tmp_path: Path, capsys: Capsys) -> None:
    """`created` is RFC 3339 with nanoseconds and trailing zeros trimmed (Go's RFC3339Nano):
    its order is the time's, not the string's ("…00Z" is before "…00.45Z")."""
    base = base_store(tmp_path, capsys)
    ids = [create(capsys, base.root, "img:1", "--name", f"c{i}") for i in range(3)]
    times = ["2024-01-01T00:00:00.5Z", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00.45Z"]
    for cid, when in zip(ids, times, strict=True):
        path = records_dir(base.root) / cid / "container.json"
        obj = json.loads(path.read_bytes())
        obj["created"] = when
        path.write_text(json.dumps(obj))
    assert [r["name"] for r in ps(capsys, base.root)] == ["c1", "c2", "c0"]


# ============================================================================================
# 2. The init layer, against dockerd's algorithm on a real overlay mount
# ============================================================================================

# moby daemon/initlayer/setup_unix.go (20.10), path -> "dir", "file" or a symlink target.
DOCKERD_INIT = {
    "/dev/pts": "dir", "/dev/shm": "dir", "/proc": "dir", "/sys": "dir",
    "/.dockerenv": "file", "/etc/resolv.conf": "file", "/etc/hosts": "file",
    "/etc/hostname": "file", "/dev/console": "file", "/etc/mtab": "/proc/mounts",
}


def _mkdir_all_and_chown_new(path: str) -> None:
    """idtools.MkdirAllAndChownNew(path, 0755, root): only the dirs it makes are chowned."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        os.chown(d, 0, 0)


def dockerd_setup_init_layer(merged: Path) -> None:
    """dockerd's initlayer.Setup, run on a mounted merged view (umask 022, as dockerd's)."""
    old = os.umask(0o022)
    try:
        for pth, typ in DOCKERD_INIT.items():
            prev = str(merged)
            for part in pth.strip("/").split("/"):
                prev = os.path.join(prev, part)
                with contextlib.suppress(OSError):
                    os.unlink(prev)  # unix.Unlink of every component: non-dirs go
            full = str(merged) + pth
            try:
                os.stat(full)
                continue
            except FileNotFoundError:
                pass
            _mkdir_all_and_chown_new(os.path.dirname(full))
            if typ == "dir":
                _mkdir_all_and_chown_new(full)
            elif typ == "file":
                fd = os.open(full, os.O_RDONLY | os.O_CREAT, 0o755)
                os.fchown(fd, 0, 0)
                os.close(fd)
            else:
                os.symlink(typ, full)
    finally:
        os.umask(old)


def init_expect(*, etc: tuple[int, int, int] | None = (0o755, 0, 0),
                dev: tuple[int, int, int] | None = (0o755, 0, 0),
                lacks: Sequence[str] = ()) -> dict[str, tuple[Any, ...]]:
    """The init diff's entries: the fixed files and symlink, the dirs not in `lacks`, and the
    parents `etc`, `dev` with the given (mode, uid, gid)."""
    out: dict[str, tuple[Any, ...]] = {f: ("file", 0o755, 0, 0, 0) for f in INIT_FILES}
    out["etc/mtab"] = ("symlink", 0o777, 0, 0, "/proc/mounts")
    for d in INIT_DIRS:
        if d not in lacks:
            out[d] = ("dir", 0o755, 0, 0, None)
    for name, parent in (("etc", etc), ("dev", dev)):
        if parent is not None:
            out[name] = ("dir", *parent, None)
    return out


@dataclass(frozen=True)
class InitCase:
    layers: list[list[tb.Member]]
    init: dict[str, tuple[Any, ...]]
    merged: dict[str, str | None] = field(default_factory=dict)  # path -> kind, or absent


INIT_CASES = {
    "bare": InitCase([[tb.dir("bin"), tb.file("bin/sh", b"sh", mode=0o755)]], init_expect()),
    "replaces-the-images-own": InitCase(
        [[tb.dir("etc"), tb.file("etc/hosts", b"127.0.0.1 image\n"),
          tb.symlink("etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf"),
          tb.file("etc/mtab", b"rootfs / rootfs rw 0 0\n"), tb.file("etc/hostname", b"img\n"),
          tb.dir("dev"), tb.chardev("dev/console", 5, 1, mode=0o600),
          tb.file(".dockerenv", b"not empty")]],
        init_expect(), {"etc/hosts": "file", "dev/console": "file"}),
    "replaces-in-a-lower-layer": InitCase(
        [[tb.dir("etc"), tb.file("etc/hosts", b"127.0.0.1 image\n"),
          tb.file("etc/mtab", b"x")], [tb.file("other", b"o")]],
        init_expect()),
    "dirs-the-image-has": InitCase(
        [[tb.dir("proc", mode=0o555), tb.dir("sys", mode=0o555), tb.dir("dev"),
          tb.dir("dev/pts"), tb.dir("dev/shm", mode=0o1777)]],
        init_expect(lacks=INIT_DIRS), {"dev/shm": "dir", "proc": "dir"}),
    "parents-keep-mode-and-owner": InitCase(
        [[tb.dir("etc", mode=0o751, uid=5, gid=6), tb.dir("dev", mode=0o710, uid=7, gid=8),
          tb.file("etc/passwd", b"root:x:0:0::/:/bin/sh\n")]],
        init_expect(etc=(0o751, 5, 6), dev=(0o710, 7, 8)), {"etc/passwd": "file"}),
    "setgid-parent": InitCase(
        [[tb.dir("etc", mode=0o2775, gid=50)]],
        {**init_expect(etc=(0o2775, 0, 50)),
         "etc/mtab": ("symlink", 0o777, 0, 50, "/proc/mounts")}),
    "parent-from-the-top-layer": InitCase(
        [[tb.dir("etc", mode=0o700, uid=1, gid=1)], [tb.dir("etc", mode=0o750, uid=2, gid=3)]],
        init_expect(etc=(0o750, 2, 3))),
    "etc-whited-out": InitCase(
        [[tb.dir("etc", mode=0o700, uid=9, gid=9), tb.file("etc/passwd", b"p")],
         [tb.whiteout("etc")]],
        init_expect(), {"etc/passwd": None}),
    "opaque-dev": InitCase(
        [[tb.dir("dev", mode=0o755), tb.dir("dev/pts"), tb.dir("dev/shm"),
          tb.file("dev/null", b"")],
         [tb.dir("dev", mode=0o711), tb.opaque("dev"), tb.file("dev/keep", b"k")]],
        init_expect(dev=(0o711, 0, 0)), {"dev/null": None, "dev/keep": "file"}),
    "dev-pts-whited-out": InitCase(
        [[tb.dir("dev"), tb.dir("dev/pts", mode=0o700), tb.dir("dev/shm")],
         [tb.whiteout("dev/pts")]],
        init_expect(lacks=["dev/shm"])),
    "proc-a-file-sys-a-symlink": InitCase(
        [[tb.file("proc", b"x"), tb.symlink("sys", "proc")]], init_expect(),
        {"proc": "dir", "sys": "dir"}),
    "etc-a-symlink": InitCase(
        [[tb.dir("usr"), tb.dir("usr/etc", mode=0o700), tb.file("usr/etc/hosts", b"x"),
          tb.symlink("etc", "usr/etc")]],
        init_expect(), {"etc": "dir", "usr/etc/hosts": "file"}),
    "dev-a-file": InitCase([[tb.file("dev", b"x")]], init_expect(), {"dev": "dir"}),
    "hosts-and-mtab-dirs": InitCase(
        [[tb.dir("etc"), tb.dir("etc/hosts"), tb.file("etc/hosts/keep", b"k"),
          tb.dir("etc/mtab")]],
        {k: v for k, v in init_expect().items() if k not in ("etc/hosts", "etc/mtab")},
        {"etc/hosts/keep": "file", "etc/mtab": "dir"}),
    "parent-xattrs": InitCase(
        [[tb.dir("etc", xattrs={"user.origin": b"image"}),
          tb.dir("dev", xattrs={"trusted.overlay.opaque": b"y", "user.x": b"1"})]],
        init_expect()),
    "setgid-dev": InitCase(
        [[tb.dir("dev", mode=0o2755, gid=50), tb.dir("etc", mode=0o2750, uid=3, gid=4)]],
        {**init_expect(etc=(0o2750, 3, 4), dev=(0o2755, 0, 50)),
         "dev/pts": ("dir", 0o2755, 0, 0, None), "dev/shm": ("dir", 0o2755, 0, 0, None),
         "etc/mtab": ("symlink", 0o777, 0, 4, "/proc/mounts")}),
}


def overlay_mount(lowers: Sequence[Path], upper: Path, work: Path, target: Path,
                  mounts: list[Path]) -> None:
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], check=True,
                   capture_output=True)
    mounts.append(target)


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in INIT_CASES.items()])
def test_init_layer(tmp_path: Path, capsys: Capsys, mounts: list[Path], case: InitCase) -> None:
    base = base_store(tmp_path, capsys, case.layers, config={}, extra={})
    root = base.root
    cid = create(capsys, root, "img:1")
    init = init_dir(root, cid) / "diff"
    assert entries(init) == case.init
    assert mode(init) == 0o755

    merged = mount_ctr(capsys, root, mounts, cid)
    view = tc.snapshot(merged, mtimes=False)
    for path in INIT_FILES:
        if path not in case.init:
            continue
        e = view[path.encode()]
        assert (e.kind, e.mode, e.uid, e.gid, e.size) == ("file", 0o755, 0, 0, 0), path
    assert "etc/mtab" not in case.init or view[b"etc/mtab"].target == b"/proc/mounts"
    for path, kind in case.merged.items():
        if kind is None:
            assert path.encode() not in view, path
        else:
            assert view[path.encode()].kind == kind, path

    # The oracle: the image's layers on a kernel overlay, dockerd's algorithm on top.
    chain = chain_layers(root, base.top)
    oracle = tmp_path / "oracle"
    overlay_mount([r.diff(root) for r in chain[::-1]], oracle / "upper", oracle / "work",
                  oracle / "merged", mounts)
    dockerd_setup_init_layer(oracle / "merged")
    tc.assert_same(tc.snapshot(oracle / "merged", mtimes=False), view,
                   names=("dockerd on overlayfs", "ocilayers container"))
    ok(capsys, root, "umount", cid)
    verify_ok(capsys, root)


# ============================================================================================
# 3. mount / umount of a container
# ============================================================================================

def test_mount_container_default_target_and_refcount(tmp_path: Path, capsys: Capsys,
                                                     mounts: list[Path]) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1", "--name", "web")
    rw = rw_dir(root, cid)
    init_before = tc.snapshot(init_dir(root, cid) / "diff")
    merged = mount_ctr(capsys, root, mounts, "web")
    assert merged == rw / "merged"
    info = mountinfo(merged)
    assert info is not None and info[0] == "overlay"
    assert f"upperdir={rw / 'diff'}" in info[2] and f"workdir={rw / 'work'}" in info[2]
    # The mount point itself (under the mount): dir 0700, as the overlay2 driver makes it.
    peek = tmp_path / "peek"
    peek.mkdir()
    subprocess.run(["mount", "--bind", str(rw), str(peek)], check=True)
    mounts.append(peek)
    assert mode(peek / "merged") == 0o700 and os.listdir(peek / "merged") == []
    subprocess.run(["umount", str(peek)], check=True)

    # the merged view: image + init, writes land in the rw diff only
    assert (merged / "keep").read_bytes() == b"k\n"
    assert (merged / "etc" / "hosts").read_bytes() == b""
    (merged / "new.txt").write_bytes(b"new\n")
    (merged / "etc" / "conf").write_bytes(b"a=2\n")
    assert (rw / "diff" / "new.txt").read_bytes() == b"new\n"
    assert (rw / "diff" / "etc" / "conf").read_bytes() == b"a=2\n"
    assert tc.snapshot(init_dir(root, cid) / "diff") == init_before

    # a second mount: the same path, one more user
    assert ok(capsys, root, "mount", cid) == f"{merged}\n"
    (row,) = ps(capsys, root)
    assert [(m["target"], m["users"]) for m in row["mounted"]] == [(str(merged), 2)]
    assert MNT_NS.fullmatch(row["mounted"][0]["mnt_ns"])
    assert ok(capsys, root, "umount", "web") == ""
    assert os.path.ismount(merged)
    assert ps(capsys, root)[0]["mounted"][0]["users"] == 1
    ok(capsys, root, "umount", "web")
    assert not os.path.ismount(merged) and not merged.exists()
    assert ps(capsys, root)[0]["mounted"] == []
    code, _out, err = ol(capsys, root, "umount", "web")
    assert_one_line_error(code, err, "not mounted")
    # what was written is still there, and is in the next mount
    merged = mount_ctr(capsys, root, mounts, cid)
    assert (merged / "new.txt").read_bytes() == b"new\n"
    ok(capsys, root, "umount", cid)
    verify_ok(capsys, root)


def test_mount_container_at_a_target(tmp_path: Path, capsys: Capsys, mounts: list[Path]) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1")
    target = tmp_path / "mnt"
    target.mkdir()
    assert mount_ctr(capsys, root, mounts, cid, str(target)) == target
    assert (target / "keep").read_bytes() == b"k\n"
    (target / "w").write_bytes(b"w")
    assert (rw_dir(root, cid) / "diff" / "w").read_bytes() == b"w"
    assert not (rw_dir(root, cid) / "merged").exists()
    assert [m["target"] for m in ps(capsys, root)[0]["mounted"]] == [str(target)]

    # elsewhere while mounted: refused; `umount TARGET` points to the container
    other = tmp_path / "other"
    other.mkdir()
    code, _out, err = ol(capsys, root, "mount", cid, str(other))
    assert_one_line_error(code, err, "mounted at", str(target))
    assert not os.path.ismount(other)
    code, _out, err = ol(capsys, root, "umount", str(target))
    assert_one_line_error(code, err, cid[:12], "container")
    assert os.path.ismount(target)
    # without a target: the mount it has, one more user
    assert ok(capsys, root, "mount", cid) == f"{target}\n"
    assert not (rw_dir(root, cid) / "merged").exists()
    assert ps(capsys, root)[0]["mounted"][0]["users"] == 2
    ok(capsys, root, "umount", cid)
    assert os.path.ismount(target)
    ok(capsys, root, "umount", cid)
    assert not os.path.ismount(target) and target.is_dir()  # the caller's dir stays


def test_name_of_both_a_container_and_an_image(tmp_path: Path, capsys: Capsys,
                                               mounts: list[Path]) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1", "--name", "both")
    ok(capsys, root, "tag", "img:1", "both")
    target = tmp_path / "t"
    target.mkdir()
    for argv in (["mount", "both"], ["mount", "both", str(target)], ["umount", "both"]):
        code, out, err = ol(capsys, root, *argv)
        assert out == ""
        assert_one_line_error(code, err, "both", "container", "image")
    assert not os.path.ismount(target) and not (rw_dir(root, cid) / "merged").exists()
    # by ID it is clear
    mount_ctr(capsys, root, mounts, cid)
    ok(capsys, root, "umount", cid)


# ============================================================================================
# 4. ps, rm, rmi, prune
# ============================================================================================

def container_traces(root: Path, cid: str, mid: str, links: Sequence[str]) -> list[str]:
    """Whatever of the container is still in the store."""
    out = []
    for p in (root / "overlay2" / mid, root / "overlay2" / f"{mid}-init",
              mounts_dir(root) / cid, records_dir(root) / cid):
        if os.path.lexists(p):
            out.append(str(p.relative_to(root)))
    for link in links:
        if os.path.lexists(root / "overlay2" / "l" / link):
            out.append(f"overlay2/l/{link}")
    tmp = layerdb(root) / "tmp"
    out += [f"layerdb/tmp/{n}" for n in os.listdir(tmp)] if tmp.exists() else []
    return out


@pytest.mark.parametrize("force", [False, True])
def test_rm(tmp_path: Path, capsys: Capsys, mounts: list[Path], force: bool) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1", "--name", "web")
    other = create(capsys, root, "img:1")
    mid = mount_id(root, cid)
    links = [link_of(rw_dir(root, cid)), link_of(init_dir(root, cid))]
    merged = mount_ctr(capsys, root, mounts, "web")
    (merged / "x").write_bytes(b"x")
    if not force:
        code, out, err = ol(capsys, root, "rm", "web")
        assert out == ""
        assert_one_line_error(code, err, "mounted at", str(merged))
        assert os.path.ismount(merged) and (merged / "x").exists()
        ok(capsys, root, "umount", "web")
        assert ok(capsys, root, "rm", "web") == "web\n"
    else:
        ok(capsys, root, "mount", "web")  # two users: -f unmounts whatever the count
        assert ok(capsys, root, "rm", "-f", "web") == "web\n"
        assert not os.path.ismount(merged)
    assert container_traces(root, cid, mid, links) == []
    assert [r["id"] for r in ps(capsys, root)] == [other]
    code, _out, err = ol(capsys, root, "rm", "web")
    assert_one_line_error(code, err, "no such container", "web")
    ok(capsys, root, "rm", other)
    assert ps(capsys, root) == []
    assert os.listdir(mounts_dir(root)) == []
    # the store is an image store again, as docs/store-format.md has it
    check_store(root, images={base.image_id: base.config}, tags={"img:1": base.image_id},
                fresh=False)
    assert sorted(os.listdir(root / "overlay2")) == sorted(
        ["l", *(r.cache_id for r in read_layers(root).values())])
    verify_ok(capsys, root)


@pytest.mark.parametrize("named", [True, False])
def test_rmi_refuses_while_a_container_uses_the_image(tmp_path: Path, capsys: Capsys,
                                                      named: bool) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1", *(["--name", "web"] if named else []))
    code, out, err = ol(capsys, root, "rmi", "img:1")
    assert out == ""
    assert_one_line_error(code, err, "web" if named else cid[:12])
    assert image_ids(root) == {base.image_id} and tags_of(root) == {"img:1": base.image_id}
    ok(capsys, root, "rm", cid)
    ok(capsys, root, "rmi", "img:1")
    assert read_layers(root) == {}


def test_prune_keeps_what_a_container_stands_on(tmp_path: Path, capsys: Capsys) -> None:
    """As after a dockerd sharing the store removed the image's config (FACTS.md): the
    container keeps the layers."""
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1")
    ok(capsys, root, "untag", "img:1")
    (imagedb(root) / "content" / "sha256" / base.image_id.removeprefix("sha256:")).unlink()
    layers = read_layers(root)
    dirs = sorted(os.listdir(root / "overlay2"))
    out = ok(capsys, root, "prune")
    assert "deleted" not in out
    assert read_layers(root) == layers and sorted(os.listdir(root / "overlay2")) == dirs
    verify_ok(capsys, root)
    ok(capsys, root, "rm", cid)
    ok(capsys, root, "prune")
    assert read_layers(root) == {}
    assert os.listdir(root / "overlay2" / "l") == []
    assert sorted(os.listdir(root / "overlay2")) == ["l"]


# ============================================================================================
# 5. Crash safety: a fork dies (os._exit) at each store-changing call
# ============================================================================================

CRASHED = 99
CRASH_OS = ("mkdir", "rename", "replace", "symlink", "unlink", "rmdir", "chmod", "chown",
            "open", "link", "mknod", "setxattr")


def run_crashing(fn: Callable[[], object], n: int, *, after: bool) -> bool:
    """Run `fn` in a forked child that dies with os._exit (no cleanup, no finally) at its
    n-th call (from the main thread) of one of CRASH_OS: before the call, or right after it
    with `after`. True if it died there, False if `fn` finished first. Returns once every
    process the child forked (file writers, a second-core worker) is dead too: until then
    they hold its staging dir's lock, and prune rightly leaves what a live process holds."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 3
        try:
            os.setpgid(0, 0)  # a process group of its own, and of all it forks
            main = threading.current_thread()
            count = [0]

            def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
                def crashing(*args: Any, **kwargs: Any) -> Any:
                    if threading.current_thread() is not main:
                        return orig(*args, **kwargs)
                    count[0] += 1
                    if count[0] == n and not after:
                        os._exit(CRASHED)
                    try:
                        return orig(*args, **kwargs)
                    finally:  # (also when the call failed: the caller may handle that)
                        if count[0] == n and after:
                            os._exit(CRASHED)
                return crashing

            for name in CRASH_OS:
                setattr(os, name, wrap(getattr(os, name)))
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    left = wait_group_gone(pid)
    assert not left, f"processes left behind by a crash at step {n}: {left}"
    rc = os.waitstatus_to_exitcode(status)
    assert rc in (0, CRASHED), f"the child failed ({rc}) before step {n}"
    return rc == CRASHED


def listing(root: Path) -> set[str]:
    """Every path in the store, but what a crash may leave by design (docs/store-format.md):
    `.tmp-*` files of atomic writes in imagedb and image/overlay2 (dockerd skips them),
    an empty `.birth-*` dir (prune takes it once an hour old); and the lock file."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if rel == "ocilayers.lock" or rel.startswith("ocilayers/mounts"):
                continue
            if name.startswith(".tmp-") and p.parent in (
                    root / "image" / "overlay2", imagedb(root) / "content" / "sha256"):
                continue
            if name.startswith(".birth-") and p.parent == root / "overlay2" and not any(
                    p.iterdir()):
                continue
            out.add(rel)
    return out


def assert_container_whole(root: Path, cid: str) -> None:
    entry = mounts_dir(root) / cid
    assert sorted(os.listdir(entry)) == ["init-id", "mount-id", "parent"]
    for d in (rw_dir(root, cid), init_dir(root, cid)):
        assert {"diff", "link", "lower", "work"} <= set(os.listdir(d)), d
        assert os.readlink(root / "overlay2" / "l" / link_of(d)) == f"../{d.name}/diff"
    assert (records_dir(root) / cid / "container.json").exists()


def recover(capsys: Capsys, root: Path, baseline: set[str], what: str) -> None:
    """`prune`; then the store must be exactly `baseline` again and pass `verify`."""
    ok(capsys, root, "prune")
    left = listing(root)
    assert left == baseline, (f"{what}: prune left {sorted(left - baseline)}, "
                              f"lost {sorted(baseline - left)}")
    verify_ok(capsys, root)


CRASH_LAYERS = [[tb.dir("etc"), tb.file("etc/hosts", b"h"), tb.file("a", b"a")],
                [tb.dir("dev"), tb.file("b", b"b")]]


@pytest.mark.parametrize("after", [False, True], ids=["before-call", "after-call"])
def test_crash_during_create(tmp_path: Path, capsys: Capsys, after: bool) -> None:
    base = base_store(tmp_path, capsys, CRASH_LAYERS, config={}, extra={})
    root = base.root
    ok(capsys, root, "rm", create(capsys, root, "img:1", "--name", "xx"))
    baseline = listing(root)
    n = 0
    while True:
        n += 1
        assert n < 500
        if not run_crashing(lambda: lifecycle.create_container(
                api.open_store(str(root)), "img:1", name="xx"), n, after=after):
            break
        rows = ps(capsys, root)
        for row in rows:  # it made it: it must be whole
            assert_container_whole(root, row["id"])
            verify_ok(capsys, root)
            ok(capsys, root, "rm", row["id"])
        recover(capsys, root, baseline, f"crash at step {n}")  # (so the name is free again)
    assert n > 20  # every step of create was a crash point
    assert [r["name"] for r in ps(capsys, root)] == ["xx"]


@pytest.mark.parametrize("after", [False, True], ids=["before-call", "after-call"])
def test_crash_during_rm(tmp_path: Path, capsys: Capsys, after: bool) -> None:
    base = base_store(tmp_path, capsys, CRASH_LAYERS, config={}, extra={})
    root = base.root
    ok(capsys, root, "rm", create(capsys, root, "img:1", "--name", "xx"))
    baseline = listing(root)
    n = 0
    while True:
        n += 1
        assert n < 500
        cid = create(capsys, root, "img:1", "--name", "xx")
        (rw_dir(root, cid) / "diff" / "file").write_bytes(b"data")
        if not run_crashing(lambda: lifecycle.remove_container(
                api.open_store(str(root)), lifecycle.find_container(api.open_store(str(root)),
                                                                    "xx")), n, after=after):
            break
        rows = ps(capsys, root)
        if rows:  # not gone: still whole, and rm finishes the job
            assert [r["id"] for r in rows] == [cid]
            assert_container_whole(root, cid)
            ok(capsys, root, "rm", "xx")
        recover(capsys, root, baseline, f"crash at step {n}")
    assert n > 5
    assert ps(capsys, root) == []


def commit_setup(tmp_path: Path, capsys: Capsys) -> tuple[Base, str]:
    base = base_store(tmp_path, capsys)
    cid = create(capsys, base.root, "img:1", "--name", "ctr")
    diff = rw_dir(base.root, cid) / "diff"
    (diff / "etc").mkdir()
    (diff / "etc" / "new").write_bytes(b"new\n")
    (diff / "big").write_bytes(os.urandom(1 << 16))
    os.mknod(diff / "keep", stat.S_IFCHR, os.makedev(0, 0))  # a whiteout
    return base, cid


@pytest.mark.parametrize("after", [False, True], ids=["before-call", "after-call"])
def test_crash_during_commit(tmp_path: Path, capsys: Capsys, after: bool) -> None:
    from ocilayers.commit import CommitOptions, commit_container

    base, _cid = commit_setup(tmp_path, capsys)
    root = base.root
    baseline = listing(root)

    def commit() -> None:
        store = api.open_store(str(root))
        commit_container(store, lifecycle.find_container(store, "ctr"),
                         CommitOptions(tags=["new:1"], message="m"))

    n = 0
    while True:
        n += 1
        assert n < 500
        if not run_crashing(commit, n, after=after):
            break
        new = image_ids(root) - {base.image_id}
        if new:  # the image made it: whole, and its layer with it
            verify_ok(capsys, root)
            (image_id,) = new
            assert len(config_of(root, image_id)["rootfs"]["diff_ids"]) == 3
            ok(capsys, root, "rmi", image_id)
        assert tags_of(root) == {"img:1": base.image_id}
        recover(capsys, root, baseline, f"crash at step {n}")
    assert n > 10
    assert set(tags_of(root)) == {"img:1", "new:1"}
    verify_ok(capsys, root)


@pytest.mark.parametrize("wait_for", ["staging", "30ms", "200ms"])
def test_kill_9_during_commit(tmp_path: Path, capsys: Capsys, wait_for: str) -> None:
    base, cid = commit_setup(tmp_path, capsys)
    root = base.root
    diff = rw_dir(root, cid) / "diff"
    chunk = os.urandom(1 << 16)
    for i in range(64):
        d = diff / f"d{i:02d}"
        d.mkdir()
        for j in range(24):
            (d / f"f{j:02d}").write_bytes(chunk)  # 96 MiB in all
    baseline = listing(root)
    proc = subprocess.Popen([sys.executable, "-m", "ocilayers", "--root", str(root), "commit",
                             "ctr", "big:1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    if wait_for == "staging":
        def staging_started() -> bool:
            return any(n.startswith(".staging-") and any((root / "overlay2" / n).glob("diff/d*"))
                       for n in os.listdir(root / "overlay2"))
        while proc.poll() is None and not staging_started() and time.monotonic() < deadline:
            time.sleep(0.002)
    else:
        time.sleep(int(wait_for.removesuffix("ms")) / 1000)
    os.kill(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    if rc != -signal.SIGKILL:
        pytest.fail(f"the commit finished ({rc}) before it was killed: make the upper bigger")
    # its forked file writers die with it (PR_SET_PDEATHSIG), a moment later; until then they
    # hold the staging dir's lock, and prune rightly leaves a dir a live process holds
    left = wait_group_gone(proc.pid)
    assert not left, f"processes left behind after kill -9: {left}"
    ok(capsys, root, "prune")
    assert listing(root) == baseline
    verify_ok(capsys, root)
    assert image_ids(root) == {base.image_id}
    if wait_for == "staging":  # and it can be done after all
        ok(capsys, root, "commit", "ctr", "big:1")
        verify_ok(capsys, root)


# ============================================================================================
# 6. commit
# ============================================================================================

def change_everything(merged: Path) -> None:
    """The changes a container makes, through its mounted view."""
    (merged / "new.txt").write_bytes(b"new\n")
    with open(merged / "etc" / "append.txt", "ab") as f:
        f.write(b"line2\n")
    (merged / "etc" / "gone").unlink()
    shutil.rmtree(merged / "olddir")
    (merged / "olddir").mkdir()
    (merged / "olddir" / "c").write_bytes(b"c\n")
    os.link(merged / "new.txt", merged / "hard.txt")
    os.symlink("/etc/conf", merged / "link")
    os.setxattr(merged / "new.txt", "user.note", b"hello")
    (merged / "bin" / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(merged / "bin" / "suid", 0o4755)
    os.mkfifo(merged / "fifo", 0o640)


# the layer a commit of change_everything() gives: name -> (type, mode, data or linkname)
CHANGED_LAYER = {
    "bin/": (tarfile.DIRTYPE, 0o755, None),
    "bin/suid": (tarfile.REGTYPE, 0o4755, b"#!/bin/sh\n"),
    "etc/": (tarfile.DIRTYPE, 0o755, None),
    "etc/.wh.gone": (tarfile.REGTYPE, 0o600, b""),  # FACTS.md: mode 0000600
    "etc/append.txt": (tarfile.REGTYPE, 0o644, b"line1\nline2\n"),
    "fifo": (tarfile.FIFOTYPE, 0o640, None),
    "hard.txt": (tarfile.REGTYPE, 0o644, b"new\n"),
    "link": (tarfile.SYMTYPE, 0o777, "/etc/conf"),
    "new.txt": (tarfile.LNKTYPE, 0o644, "hard.txt"),
    "olddir/": (tarfile.DIRTYPE, 0o755, None),
    "olddir/.wh..wh..opq": (tarfile.REGTYPE, 0o755, b""),  # the dir's permission bits
    "olddir/c": (tarfile.REGTYPE, 0o644, b"c\n"),
}


def test_commit(tmp_path: Path, capsys: Capsys, mounts: list[Path]) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1", "--name", "ctr")
    merged = mount_ctr(capsys, root, mounts, "ctr")
    old_umask = os.umask(0o022)
    try:
        change_everything(merged)
    finally:
        os.umask(old_umask)
    t0 = time.time()
    result = json.loads(ok(capsys, root, "commit", "ctr", "new:1", "-m", "the message",
                           "-a", "Someone <s@example.com>", "--json"))
    assert set(result) == {"image_id", "diff_id", "chain_id", "empty_layer", "size", "tags"}
    image_id, diff_id = result["image_id"], result["diff_id"]
    assert result["empty_layer"] is False and result["tags"] == ["new:1"]
    assert result["chain_id"] == chain_ids_by_spec([*base.diff_ids, diff_id])[-1]
    assert tags_of(root) == {"img:1": base.image_id, "new:1": image_id}
    assert os.path.ismount(merged)  # committed while mounted, and still mounted

    # the config: the base's, plus the layer and a history entry, minus Docker's host fields
    cfg = config_of(root, image_id)
    want_base = json.loads(base.config)
    assert cfg["rootfs"]["diff_ids"] == [*base.diff_ids, diff_id]
    entry = cfg["history"][-1]
    assert cfg["history"][:-1] == want_base["history"]
    assert set(entry) == {"created", "created_by", "comment", "author"}
    assert entry["comment"] == "the message" and entry["author"] == "Someone <s@example.com>"
    assert entry["created_by"] == "/bin/tool --serve now"
    assert RFC3339_NANO.fullmatch(entry["created"]) and cfg["created"] == entry["created"]
    assert cfg["author"] == "Someone <s@example.com>"
    for gone in ("container", "container_config", "docker_version"):
        assert gone not in cfg
    assert cfg["config"] == want_base["config"]
    assert {k: v for k, v in cfg.items() if k not in ("rootfs", "history", "created", "author")
            } == {k: v for k, v in want_base.items()
                  if k not in ("rootfs", "history", "created", "author", "container",
                               "container_config", "docker_version")}
    # imagedb metadata, as dockerd's commit writes it (moby image/fs.go: dir 0700, files 0600)
    meta = imagedb(root) / "metadata" / "sha256" / image_id.removeprefix("sha256:")
    assert sorted(os.listdir(meta)) == ["lastUpdated", "parent"]
    assert (meta / "parent").read_bytes() == base.image_id.encode()
    updated = (meta / "lastUpdated").read_bytes().decode()
    assert RFC3339_NANO.fullmatch(updated), updated
    assert abs(calendar.timegm(time.strptime(updated[:19], "%Y-%m-%dT%H:%M:%S")) - t0) < 5
    assert mode(meta) == 0o700 and all(mode(meta / f) == 0o600 for f in os.listdir(meta))

    # the layer in the store: registered on the image's top ChainID
    new = read_layers(root)[result["chain_id"]]
    assert new.parent == base.top and new.diff_id == diff_id
    assert new.size == result["size"] == diff_size(new.diff(root))
    verify_ok(capsys, root)

    # export rebuilds it byte for byte; what is in it
    tars = exported_layers(capsys, root, "new:1", tmp_path / "out.tar")
    assert ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars] == cfg["rootfs"]["diff_ids"]
    members = layer_members(tars[-1])
    have: dict[str, tuple[Any, ...]] = {}
    with tarfile.open(fileobj=io.BytesIO(tars[-1])) as tf:
        for m in members:
            if m.isreg():
                f = tf.extractfile(m)
                data: Any = f.read() if f is not None else None
            elif m.issym() or m.islnk():
                data = m.linkname
            else:
                data = None
            have[m.name + ("/" if m.isdir() else "")] = (m.type, m.mode & 0o7777, data)
    assert have == CHANGED_LAYER
    xattrs = {m.name: m.pax_headers.get("SCHILY.xattr.user.note") for m in members}
    assert xattrs["hard.txt"] == "hello"  # --xattrs all (the default) keeps user.*
    for init_path in INIT_PATHS | {"dev", "proc", "sys"}:
        assert not any(m.name.rstrip("/") == init_path for m in members), init_path

    # The new image, mounted read-only, shows what the container showed (but its init files)
    view = tmp_path / "view"
    view.mkdir()
    mounts.append(view)
    ok(capsys, root, "mount", "new:1", str(view))

    def no_init(snap: tc.Snapshot) -> tc.Snapshot:
        return {p: e for p, e in snap.items()
                if p.decode() not in INIT_PATHS and not p.startswith((b"dev", b"proc", b"sys",
                                                                       b".dockerenv"))}
    container_view = tc.snapshot(merged, seconds=True)
    image_view = tc.snapshot(view, seconds=True)
    assert container_view[b"etc/hosts"].size == 0  # the init layer's
    assert image_view[b"etc/hosts"].sha256 == hashlib.sha256(b"127.0.0.1 image\n").hexdigest()
    container_view, image_view = no_init(container_view), no_init(image_view)
    tc.assert_same(container_view, image_view, ignore_dir_mtime=True,
                   names=("container", "committed image"))
    ok(capsys, root, "umount", str(view))
    ok(capsys, root, "umount", "ctr")
    assert cid


def test_commit_of_an_unchanged_container(tmp_path: Path, capsys: Capsys) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    create(capsys, root, "img:1", "--name", "ctr")
    layers = read_layers(root)
    result = json.loads(ok(capsys, root, "commit", "ctr", "same:1", "--json"))
    assert result == {"image_id": result["image_id"], "diff_id": None, "chain_id": None,
                      "empty_layer": True, "size": 0, "tags": ["same:1"]}
    assert read_layers(root) == layers
    cfg = config_of(root, result["image_id"])
    assert cfg["rootfs"]["diff_ids"] == base.diff_ids
    entry = cfg["history"][-1]
    assert entry["empty_layer"] is True and "comment" not in entry and "author" not in entry
    assert set(entry) == {"created", "created_by", "empty_layer"}
    assert len(cfg["history"]) == len(json.loads(base.config)["history"]) + 1
    assert not any(n.startswith((".staging-", ".birth-")) for n in os.listdir(root / "overlay2"))
    verify_ok(capsys, root)


@pytest.mark.parametrize(("create_argv", "config", "commit_argv", "want"), [
    pytest.param([], BASE_CONFIG, [], "/bin/tool --serve now", id="image-command"),
    pytest.param(["--", "sh", "-c", "echo hi > /x"], BASE_CONFIG, [], "sh -c echo hi > /x",
                 id="create-command"),
    pytest.param(["--", "sh"], BASE_CONFIG, ["--created-by", "RUN make"], "RUN make",
                 id="created-by-wins"),
    pytest.param([], {}, [], None, id="no-command"),
])
def test_commit_created_by(tmp_path: Path, capsys: Capsys, create_argv: list[str],
                           config: dict[str, Any], commit_argv: list[str],
                           want: str | None) -> None:
    base = base_store(tmp_path, capsys, config=config)
    cid = create(capsys, base.root, "img:1", *create_argv)
    image_id = ok(capsys, base.root, "commit", cid, *commit_argv).strip()
    entry = config_of(base.root, image_id)["history"][-1]
    assert entry.get("created_by") == want


def test_commit_source_date_epoch(tmp_path: Path, capsys: Capsys,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With --source-date-epoch (or $SOURCE_DATE_EPOCH) the times come from it, and equal
    content gives an equal image, whenever it is committed."""
    base = base_store(tmp_path, capsys)
    root = base.root
    ids = []
    for i in range(3):
        cid = create(capsys, root, "img:1")
        diff = rw_dir(root, cid) / "diff"
        (diff / "etc").mkdir(mode=0o755)
        (diff / "etc" / "new").write_bytes(b"same\n")
        os.chmod(diff / "etc", 0o755)
        os.chmod(diff / "etc" / "new", 0o644)
        if i == 2:
            monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
            argv = []
        else:
            argv = ["--source-date-epoch", "86400"]
            time.sleep(1.1 * i)  # other mtimes, another second
        ids.append(json.loads(ok(capsys, root, "commit", cid, "-m", "m", "--json", *argv)))
    assert ids[0]["image_id"] == ids[1]["image_id"] == ids[2]["image_id"]
    cfg = config_of(root, ids[0]["image_id"])
    assert cfg["created"] == cfg["history"][-1]["created"] == "1970-01-02T00:00:00Z"
    (tar,) = exported_layers(capsys, root, ids[0]["image_id"], tmp_path / "o.tar")[-1:]
    assert {m.name: m.mtime for m in layer_members(tar)} == {"etc": 86400, "etc/new": 86400}
    verify_ok(capsys, root)


def test_failing_commit_registers_nothing(tmp_path: Path, capsys: Capsys) -> None:
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1", "--name", "ctr")
    diff = rw_dir(root, cid) / "diff"
    (diff / "d").mkdir()
    (diff / "d" / "big").write_bytes(os.urandom(1 << 20))
    (diff / "zz").mkdir()
    (diff / "zz" / ".wh.x").write_bytes(b"")  # a name no layer can hold (pack refuses it)
    before = listing(root)
    repos = (root / "image" / "overlay2" / "repositories.json").read_bytes()
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        (["commit", "ctr", "new:1"], (".wh.x",)),
        (["commit", "ctr", "Bad:Tag!"], ("Bad:Tag!",)),
        (["commit", "nosuch", "new:1"], ("no such container", "nosuch")),
        (["commit"], ("CONTAINER",)),
        (["commit", "ctr", "--from", "img:1"], ("--upper",)),
        (["commit", "--upper", str(diff)], ("--from",)),
        (["commit", "--upper", str(tmp_path / "none"), "--from", "img:1"], ("none",)),
        (["commit", "--upper", str(diff), "--from", "nosuch:1"], ("nosuch",)),
    ]
    with contextlib.suppress(ImportError):
        from ocilayers.changes import parse_change  # noqa: F401 (being written elsewhere)
        cases.append((["commit", "ctr", "new:1", "--change", "BOGUS x"], ("BOGUS",)))
    for argv, needles in cases:
        code, out, err = ol(capsys, root, *argv)
        assert out == "", argv
        assert_one_line_error(code, err, *needles)
        assert listing(root) == before, argv
        assert (root / "image" / "overlay2" / "repositories.json").read_bytes() == repos
    assert image_ids(root) == {base.image_id}
    verify_ok(capsys, root)


def test_commit_upper_from_image(tmp_path: Path, capsys: Capsys, mounts: list[Path]) -> None:
    """`commit --upper DIR --from IMAGE TAG`: an upper dir made by hand, as the kernel makes
    them (whiteouts char 0/0, an opaque dir)."""
    base = base_store(tmp_path, capsys)
    root = base.root
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "conf").write_bytes(b"a=3\n")
    os.mknod(upper / "etc" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "olddir").mkdir()
    os.setxattr(upper / "olddir", "trusted.overlay.opaque", b"y")
    (upper / "olddir" / "fresh").write_bytes(b"f\n")
    os.setxattr(upper, "trusted.overlay.uuid", b"0123456789abcdef")  # bookkeeping: dropped
    result = json.loads(ok(capsys, root, "commit", "--upper", str(upper), "--from", "img:1",
                           "up:1", "-m", "by hand", "--json"))
    assert result["tags"] == ["up:1"] and not result["empty_layer"]
    cfg = config_of(root, result["image_id"])
    assert cfg["rootfs"]["diff_ids"] == [*base.diff_ids, result["diff_id"]]
    entry = cfg["history"][-1]
    assert entry["comment"] == "by hand" and "created_by" not in entry
    meta = imagedb(root) / "metadata" / "sha256" / result["image_id"].removeprefix("sha256:")
    assert (meta / "parent").read_bytes() == base.image_id.encode()
    view = tmp_path / "view"
    view.mkdir()
    mounts.append(view)
    ok(capsys, root, "mount", "up:1", str(view))
    assert (view / "etc" / "conf").read_bytes() == b"a=3\n"
    assert not (view / "etc" / "gone").exists() and (view / "etc" / "append.txt").exists()
    assert sorted(os.listdir(view / "olddir")) == ["fresh"]
    assert (view / "keep").read_bytes() == b"k\n"
    ok(capsys, root, "umount", str(view))
    verify_ok(capsys, root)


def test_commit_after_the_base_config_is_gone(tmp_path: Path, capsys: Capsys) -> None:
    """A dockerd sharing the store may `docker rmi` the image (its config goes, the layers
    stay: FACTS.md); commit uses the container's own copy of the config."""
    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1", "--name", "ctr")
    (rw_dir(root, cid) / "diff" / "added").write_bytes(b"added\n")
    ok(capsys, root, "untag", "img:1")
    (imagedb(root) / "content" / "sha256" / base.image_id.removeprefix("sha256:")).unlink()
    assert image_ids(root) == set()
    result = json.loads(ok(capsys, root, "commit", "ctr", "new:1", "--json"))
    cfg = config_of(root, result["image_id"])
    want_base = json.loads(base.config)
    assert cfg["rootfs"]["diff_ids"] == [*base.diff_ids, result["diff_id"]]
    assert cfg["history"][:-1] == want_base["history"]
    assert cfg["config"] == want_base["config"]
    meta = imagedb(root) / "metadata" / "sha256" / result["image_id"].removeprefix("sha256:")
    assert (meta / "parent").read_bytes() == base.image_id.encode()
    verify_ok(capsys, root)
    ok(capsys, root, "rm", "ctr")
    ok(capsys, root, "prune")  # the new image holds the base's layers now
    assert set(read_layers(root)) == set(chain_ids_by_spec(cfg["rootfs"]["diff_ids"]))
    verify_ok(capsys, root)


def test_commit_with_changes(tmp_path: Path, capsys: Capsys) -> None:
    pytest.importorskip("ocilayers.changes")
    base = base_store(tmp_path, capsys)
    create(capsys, base.root, "img:1", "--name", "ctr")
    image_id = ok(capsys, base.root, "commit", "ctr", "--change", "ENV FOO=bar",
                  "--change", 'CMD ["sh"]').strip()
    cfg = config_of(base.root, image_id)["config"]
    assert cfg["Cmd"] == ["sh"] and cfg["Entrypoint"] == ["/bin/tool"]
    assert cfg["Env"] == ["A=1", "FOO=bar"]


def test_commit_is_never_undone_by_a_concurrent_prune(tmp_path: Path, capsys: Capsys,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The new layer is registered and its image written under one lock: a `prune` (or an
    `rmi`, which prunes) run by another process in between cannot see an unreferenced layer."""
    import ocilayers.commit as commit_mod

    base = base_store(tmp_path, capsys)
    root = base.root
    cid = create(capsys, root, "img:1", "--name", "ctr")
    (rw_dir(root, cid) / "diff" / "added").write_bytes(b"added\n")
    real = commit_mod._new_config
    pruned: list[str] = []

    def new_config_then_prune(*args: Any, **kwargs: Any) -> bytes:
        out = real(*args, **kwargs)
        proc = subprocess.run([sys.executable, "-m", "ocilayers", "--root", str(root),
                               "prune"], capture_output=True, text=True, timeout=60)
        pruned.append(proc.stdout + proc.stderr)
        return out

    monkeypatch.setattr(commit_mod, "_new_config", new_config_then_prune)
    result = json.loads(ok(capsys, root, "commit", "ctr", "new:1", "--json"))
    assert len(pruned) == 1
    assert result["chain_id"] in read_layers(root), pruned
    verify_ok(capsys, root)


def test_a_container_name_beats_an_image_id_prefix(tmp_path: Path, capsys: Capsys) -> None:
    """A container named like the start of an image ID (`c2`) is that container for mount and
    umount, as docker resolves names before ID prefixes; a tag of the same name is still
    ambiguous, and so is a prefix of both IDs."""
    base = base_store(tmp_path, capsys)
    prefix = base.image_id.removeprefix("sha256:")[:2]
    store = api.open_store(str(base.root))
    cid = create(capsys, base.root, "img:1", "--name", prefix)
    assert lifecycle.resolve_name(store, prefix) == "container"
    assert lifecycle.resolve_name(store, "img:1") == "image"
    ok(capsys, base.root, "tag", "img:1", "both")
    create(capsys, base.root, "img:1", "--name", "both")
    with pytest.raises(errors.OCILayersError, match="names both a container and an image"):
        lifecycle.resolve_name(store, "both")
    assert lifecycle.resolve_name(store, cid) == "container"
