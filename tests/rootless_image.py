"""The multi-layer test image of the rootless tests (issue 19), built with real tools as root.

`build_rootless_image(dest_dir)` writes `dest_dir/rootless.tar`, an oci-archive (index.json,
oci-layout, blobs/sha256/...) of one image, ref name `REF`, with three gzip layers. Each layer is
a real directory tree made here as root (chown, chmod, mknod, `setcap`, `setfattr`) and archived
by GNU tar with `--xattrs --xattrs-include='*' --numeric-owner`, names sorted and every mtime
forced to `MTIME`, so the same input always gives the same bytes and digests.

- layer 1: non-root owners (1000, 5, and 100000, which lies outside any 65536-id subordinate
  range), a symlink owned 5:5, setuid / setgid / sticky / 0700 / 0000 modes, char 1/3, block 8/0,
  a fifo, a hardlink pair, `security.capability` (cap_net_raw+ep, a v2 value), a
  `trusted.ocilayers-test` and a `user.test` xattr, plain content (one ~200 KiB file);
- layer 2: whiteouts of a file and of a dir of layer 1, an opaque dir with new files, a file whose
  owner changed, a new char device;
- layer 3: a new file owned 1000:1000 and a changed file.

What the image holds is described by data, derived from the same spec the builder uses:
- `LAYERS[i]`: path -> entry, every member of layer i+1 as it appears in that layer's tar (a
  whiteout `.wh.x` is listed under `x` with type "whiteout"; an opaque dir has "opaque": True);
- `EXPECTED`: path -> entry, the merged view of all three layers (what a mount shows);
- `REMOVED`: paths of lower layers that the merged view no longer has.

An entry is a dict:
    {"type": "file"|"dir"|"symlink"|"char"|"block"|"fifo"|"whiteout",
     "uid": int, "gid": int, "mode": int (stat.S_IMODE: permissions with setuid/setgid/sticky),
     "rdev": (major, minor) for char/block else None,
     "xattrs": {name: bytes value} (as stored in the tar; the opaque marker is not listed),
     "target": symlink target or None,
     "hardlink": for the second name of a hardlink pair, the first name (tar's linkname); else None,
     "size": file size or None, "sha256": hex digest of the file's data or None,
     "opaque": bool, "layer": 1-based layer that last wrote the entry}

`rootless_image` is a session-scoped pytest fixture (function `rootless_image_fixture`; import
that name: `from rootless_image import rootless_image_fixture  # noqa: F401`, and take
`rootless_image` as a test's parameter) that builds the image once into a fresh
world-readable dir (/tmp/ocilayers-rootless-image-*, 0755; the archive is 0644) so that the
unprivileged users of tests/unprivileged.py can read it in place; the dir is removed at the end of
the session. It skips (with the reason) unless root with every tool present.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MTIME = 1_600_000_000
"""Every mtime in the image (layer members, config `created`, outer archive members)."""

REF = "rootless-test:latest"
"""The `org.opencontainers.image.ref.name` of the one manifest in index.json."""

ARCHIVE_NAME = "rootless.tar"

TOOLS = ("tar", "setcap", "getcap", "setfattr", "getfattr")
"""External tools the builder runs (GNU tar, libcap2-bin, attr)."""

CAP_NET_RAW = 13
CAPABILITY_V2 = struct.pack("<5I", 0x02000000 | 0x1, 1 << CAP_NET_RAW, 0, 0, 0)
"""`security.capability` of `setcap cap_net_raw+ep` as root in the initial user namespace:
VFS_CAP_REVISION_2 with the effective flag, permitted = CAP_NET_RAW, nothing inheritable."""

TRUSTED_XATTR = "trusted.ocilayers-test"
USER_XATTR = "user.test"


def _blob(n: int, seed: bytes) -> bytes:
    """`n` deterministic bytes that do not compress (a sha256 counter stream)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + i.to_bytes(8, "big")).digest()
        i += 1
    return bytes(out[:n])


@dataclass(frozen=True)
class Node:
    """One member of a layer as the builder makes it."""

    path: str
    type: str  # file dir symlink hardlink char block fifo whiteout opaque
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""  # symlink target, or the first name of a hardlink pair
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    cap: str = ""  # a setcap text, e.g. "cap_net_raw+ep"


def _d(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Node:
    return Node(path, "dir", mode, uid, gid)


def _f(path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, **kw: Any) -> Node:
    return Node(path, "file", mode, uid, gid, data, **kw)


PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"tty:x:5:5:tty:/dev:/usr/sbin/nologin\n"
          b"user:x:1000:1000:user:/home/user:/bin/sh\n"
          b"far:x:100000:100000:far:/opt/far:/usr/sbin/nologin\n")

GROUP = (b"root:x:0:\ntty:x:5:\ndisk:x:6:\nuser:x:1000:\nfar:x:100000:\n")

SPEC: list[list[Node]] = [
    [  # layer 1
        _d("etc"),
        _f("etc/hostname", b"rootless-test\n"),
        _f("etc/passwd", PASSWD),
        _f("etc/group", GROUP),
        _f("etc/motd", b"layer 1 motd\n"),
        _f("etc/locked", b"nobody may read this\n", mode=0o000),
        _f("etc/remove-me", b"removed by a whiteout in layer 2\n"),
        _f("etc/chowned", b"owner changes in layer 2\n"),
        _f("etc/trusted-file", b"has a trusted xattr\n",
           xattrs={TRUSTED_XATTR: b"trusted-value"}),
        _f("etc/user-file", b"has a user xattr\n", xattrs={USER_XATTR: b"user-value"}),
        _d("usr"),
        _d("usr/bin"),
        _f("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
        _f("usr/bin/su-helper", b"#!/bin/sh\necho setuid\n", mode=0o4755),
        _f("usr/bin/ping", b"#!/bin/sh\necho ping\n", mode=0o755, cap="cap_net_raw+ep"),
        _f("usr/bin/link-a", b"hardlinked content\n", mode=0o755),
        Node("usr/bin/link-b", "hardlink", target="usr/bin/link-a"),
        Node("usr/bin/games", "symlink", 0o777, 5, 5, target="../../var/games"),
        _d("usr/share"),
        _f("usr/share/big.bin", _blob(200 * 1024, b"big.bin")),
        _d("var"),
        _d("var/games", 0o755, 5, 5),
        _f("var/games/score", b"0\n", 0o664, 5, 5),
        _d("srv"),
        _d("srv/shared", 0o2755, 0, 5),
        _f("srv/shared/readme", b"setgid dir\n", 0o644, 0, 5),
        _d("tmp", 0o1777),
        _d("home"),
        _d("home/user", 0o755, 1000, 1000),
        _f("home/user/notes.txt", b"user notes\n", 0o644, 1000, 1000),
        _d("home/user/private", 0o700, 1000, 1000),
        _f("home/user/private/secret.txt", b"secret\n", 0o600, 1000, 1000),
        _d("opt"),
        _d("opt/far", 0o755, 100000, 100000),
        _f("opt/far/outside", b"owner outside a 65536 subordinate range\n", 0o640,
           100000, 100000),
        _d("dev"),
        Node("dev/null", "char", 0o666, rdev=(1, 3)),
        Node("dev/sda", "block", 0o660, 0, 6, rdev=(8, 0)),
        _d("run"),
        Node("run/fifo", "fifo", 0o620, 1000, 1000),
        _d("old"),
        _f("old/a", b"old a\n"),
        _d("old/sub"),
        _f("old/sub/b", b"old b\n"),
        _d("data"),
        _f("data/keep1", b"hidden by the opaque dir of layer 2\n"),
        _d("data/sub", 0o750, 1000, 1000),
        _f("data/sub/keep2", b"hidden too\n", 0o644, 1000, 1000),
    ],
    [  # layer 2
        Node("etc/remove-me", "whiteout"),
        Node("old", "whiteout"),
        Node("data", "opaque", 0o755),
        _f("data/new1", b"new in the opaque dir\n"),
        _f("data/new2", b"new too\n", 0o600, 1000, 1000),
        _f("etc/chowned", b"owner changes in layer 2\n", 0o644, 1000, 1000),
        Node("dev/zero", "char", 0o666, rdev=(1, 5)),
    ],
    [  # layer 3
        _f("home/user/new.txt", b"new in layer 3\n", 0o644, 1000, 1000),
        _f("etc/motd", b"layer 3 motd\n"),
    ],
]
"""The image, layer by layer. Parent dirs that a layer does not list are added with the
attributes the lower layers gave them (see `_with_parents`)."""

_TYPES = {"file", "dir", "symlink", "char", "block", "fifo"}


def _entry(node: Node, layer: int, first_name: str | None = None) -> dict[str, Any]:
    """The description of `node` (see the module docstring)."""
    type_ = {"hardlink": "file", "opaque": "dir"}.get(node.type, node.type)
    xattrs = dict(node.xattrs)
    if node.cap:
        xattrs["security.capability"] = CAPABILITY_V2
    data = node.data
    return {
        "type": type_,
        "uid": node.uid,
        "gid": node.gid,
        "mode": node.mode,
        "rdev": node.rdev,
        "xattrs": xattrs,
        "target": node.target if node.type == "symlink" else None,
        "hardlink": first_name,
        "size": len(data) if type_ == "file" else None,
        "sha256": hashlib.sha256(data).hexdigest() if type_ == "file" else None,
        "opaque": node.type == "opaque",
        "layer": layer,
    }


def _with_parents(nodes: list[Node], lower: dict[str, Node]) -> list[Node]:
    """`nodes` plus every parent dir they need that they do not list, copied from `lower`."""
    have = {n.path for n in nodes}
    out = list(nodes)
    for n in nodes:
        parent = os.path.dirname(n.path)
        while parent and parent not in have:
            base = lower.get(parent)
            out.append(_d(parent) if base is None else
                       Node(parent, "dir", base.mode, base.uid, base.gid, xattrs=base.xattrs))
            have.add(parent)
            parent = os.path.dirname(parent)
    return out


def _plan() -> tuple[list[list[Node]], list[dict[str, dict[str, Any]]],
                     dict[str, dict[str, Any]], list[str]]:
    """(per-layer nodes with parents, LAYERS, EXPECTED, REMOVED) from SPEC."""
    merged_nodes: dict[str, Node] = {}
    merged: dict[str, dict[str, Any]] = {}
    removed: set[str] = set()
    layers_nodes: list[list[Node]] = []
    layers: list[dict[str, dict[str, Any]]] = []
    for i, spec in enumerate(SPEC, 1):
        nodes = _with_parents(spec, merged_nodes)
        layers_nodes.append(nodes)
        by_path = {n.path: n for n in nodes}
        desc: dict[str, dict[str, Any]] = {}
        for n in sorted(nodes, key=lambda n: n.path):
            first = None
            if n.type == "hardlink":
                first = n.target
                src = by_path[n.target]
                n = Node(n.path, "hardlink", src.mode, src.uid, src.gid, src.data,
                         n.target, None, src.xattrs, src.cap)
            desc[n.path] = _entry(n, i, first)
        layers.append(desc)
        for path, e in desc.items():
            gone: list[str] = []
            if e["type"] == "whiteout":
                gone = [p for p in merged if p == path or p.startswith(path + "/")]
            elif e["opaque"]:
                gone = [p for p in merged if p.startswith(path + "/") and merged[p]["layer"] < i]
            for p in gone:
                del merged[p]
                merged_nodes.pop(p, None)
                removed.add(p)
        for path, e in desc.items():
            if e["type"] != "whiteout":
                merged[path] = e
                merged_nodes[path] = by_path[path]
    removed -= set(merged)
    return layers_nodes, layers, dict(sorted(merged.items())), sorted(removed)


_LAYER_NODES, LAYERS, EXPECTED, REMOVED = _plan()


def missing_requirement() -> str | None:
    """Why the image cannot be built here (not root, a tool missing, not GNU tar), or None."""
    if os.geteuid() != 0:
        return "building the rootless test image needs root (chown, mknod, trusted.* xattrs)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (not on PATH); the rootless test image needs it"
    out = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
    if "GNU tar" not in out:
        return "tar is not GNU tar; the rootless test image needs GNU tar's --xattrs"
    return None


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"{argv!r} failed ({p.returncode}): {p.stderr.strip()}")


def _make_tree(root: Path, nodes: list[Node]) -> None:
    """Create `nodes` under `root` with their owners, modes, devices and xattrs."""
    root.mkdir(mode=0o755)
    ordered = sorted(nodes, key=lambda n: (n.path.count("/"), n.path))
    for n in ordered:
        p = root / n.path
        if n.type in ("dir", "opaque"):
            p.mkdir()
            if n.type == "opaque":
                (p / ".wh..wh..opq").write_bytes(b"")
                os.chmod(p / ".wh..wh..opq", 0o644)
        elif n.type == "file":
            p.write_bytes(n.data)
        elif n.type == "hardlink":
            continue  # after its source has its final attributes
        elif n.type == "symlink":
            p.symlink_to(n.target)
        elif n.type in ("char", "block"):
            assert n.rdev is not None
            kind = stat.S_IFCHR if n.type == "char" else stat.S_IFBLK
            os.mknod(p, kind | 0o600, os.makedev(*n.rdev))
        elif n.type == "fifo":
            os.mkfifo(p, 0o600)
        elif n.type == "whiteout":
            p.with_name(".wh." + p.name).write_bytes(b"")
        else:
            raise ValueError(n.type)
    # chown clears setuid/setgid and security.capability: owners first, then modes, then xattrs.
    for n in ordered:
        if n.type == "hardlink":
            continue
        p = root / n.path
        if n.type == "whiteout":
            p = p.with_name(".wh." + p.name)
        os.lchown(p, n.uid, n.gid)
        if n.type != "symlink":
            os.chmod(p, n.mode)
        for name, value in n.xattrs.items():
            _run(["setfattr", "-h", "-n", name, "-v", "0x" + value.hex(), str(p)])
        if n.cap:
            _run(["setcap", n.cap, str(p)])
            got = os.getxattr(p, "security.capability")
            if got != CAPABILITY_V2:
                raise RuntimeError(f"setcap {n.cap} wrote {got.hex()}, want the v2 value "
                                   f"{CAPABILITY_V2.hex()}")
    for n in ordered:
        if n.type == "hardlink":
            os.link(root / n.target, root / n.path)
    # The root itself: mode 0755 root:root (it is not archived, only its children are).
    os.chmod(root, 0o755)


def _tar(root: Path) -> bytes:
    """GNU tar of `root`'s children, deterministic: sorted names, fixed mtime, numeric owners,
    PAX headers without atime/ctime and with a fixed name, every xattr."""
    members = sorted(os.listdir(root))
    argv = ["tar", "--create", "--format=posix", "--numeric-owner", "--sort=name",
            f"--mtime=@{MTIME}", "--xattrs", "--xattrs-include=*",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "-C", str(root), "-f", "-", "--", *members]
    p = subprocess.run(argv, capture_output=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
    if p.returncode != 0:
        raise RuntimeError(f"GNU tar failed ({p.returncode}): {p.stderr.decode().strip()}")
    return p.stdout


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
            "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)


def build_rootless_image(dest_dir: Path) -> Path:
    """Build the image into `dest_dir` (must exist; needs root and `TOOLS`) and return the path
    of the oci-archive, `dest_dir/rootless.tar` (0644). Staging trees go into a temp dir inside
    `dest_dir`, removed before returning. Raises RuntimeError if a tool fails."""
    dest_dir = Path(dest_dir)
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=dest_dir))
    try:
        diff_ids: list[str] = []
        layer_blobs: list[bytes] = []
        for i, nodes in enumerate(_LAYER_NODES, 1):
            tree = stage / f"layer{i}"
            _make_tree(tree, nodes)
            raw = _tar(tree)
            diff_ids.append(_digest(raw))
            layer_blobs.append(gzip.compress(raw, compresslevel=6, mtime=0))
    finally:
        shutil.rmtree(stage)

    created = "2020-09-13T12:26:40Z"  # MTIME
    config = {
        "created": created,
        "architecture": _arch(),
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": f"ocilayers rootless test: layer {i}"}
                    for i in range(1, len(diff_ids) + 1)],
    }
    config_bytes = _canon(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _digest(b), "size": len(b)} for b in layer_blobs],
    }
    manifest_bytes = _canon(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": manifest["mediaType"], "digest": _digest(manifest_bytes),
                       "size": len(manifest_bytes),
                       "annotations": {"org.opencontainers.image.ref.name": REF}}],
    }
    blobs = {_digest(b): b for b in (*layer_blobs, config_bytes, manifest_bytes)}

    out = dest_dir / ARCHIVE_NAME
    tmp = dest_dir / (ARCHIVE_NAME + ".tmp")
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                t.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        add("oci-layout", _canon({"imageLayoutVersion": "1.0.0"}))
        add("index.json", _canon(index))
        add("blobs", None)
        add("blobs/sha256", None)
        for digest in sorted(blobs):
            add("blobs/sha256/" + digest.split(":", 1)[1], blobs[digest])
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def image_digests(archive: Path) -> dict[str, Any]:
    """{"manifest": digest, "config": digest, "layers": [blob digests], "diff_ids": [...]} of an
    archive made by `build_rootless_image` (read with tarfile, not with the product)."""
    with tarfile.open(archive) as t:
        def read(name: str) -> Any:
            f = t.extractfile(name)
            assert f is not None
            return json.loads(f.read())
        index = read("index.json")
        mdigest = index["manifests"][0]["digest"]
        manifest = read("blobs/sha256/" + mdigest.split(":", 1)[1])
        config = read("blobs/sha256/" + manifest["config"]["digest"].split(":", 1)[1])
    return {"manifest": mdigest, "config": manifest["config"]["digest"],
            "layers": [x["digest"] for x in manifest["layers"]],
            "diff_ids": list(config["rootfs"]["diff_ids"])}


@pytest.fixture(scope="session", name="rootless_image")
def rootless_image_fixture() -> Iterator[Path]:
    """The path of the built oci-archive (see the module docstring), in a world-readable temp
    dir removed at the end of the session. Skips unless root with every tool."""
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="ocilayers-rootless-image-"))
    try:
        os.chmod(base, 0o755)
        yield build_rootless_image(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
