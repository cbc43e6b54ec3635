"""Rootless mode end to end (issue 19), as really unprivileged users, with the real tools
(newuidmap, the kernel's overlayfs with `userxattr`, fuse-overlayfs, runc, docker-registry).

The tests run for both kinds of user of tests/unprivileged.py (a bad case that belongs to one
kind runs for that one): "subid" (`ocirootless`, a subordinate range: inside its namespace 0 is
the user and 1..N the range) and "single" (`nobody`, no range: only 0 is mapped). What is
expensive (the user's store with the image, the build step, the rootful reference) is made
once per kind and module. The image is tests/rootless_image.py's three-layer one
(whiteouts, an opaque dir, setuid/setgid/sticky, devices, a fifo, a symlink owned 5:5, an owner
100000 outside any range, security.capability, trusted.* and user.* xattrs). A fourth layer
with busybox-static (`rootless-test:bb`, made here as root with `ocilayers append`) gives the
build step a shell.

What is checked, per kind:

1. `unpack` works; `images` lists the image; `rootless.json` records the kind and the maps;
   each layer's diff dir (read as root from outside) holds exactly what the issue says: owners
   in the range are real (subid), the rest belong to the user and are recorded in
   `user.containers.override_stat` (every file and dir of a layer with any record, and its
   root), devices are empty stand-in files with `char-M-m`/`block-M-m`, `trusted.*` became
   `user.ocilayers.xattr.trusted.*`, `security.capability` is the kernel's v3 value for the
   namespace, whiteouts are char 0/0, opaque dirs `user.overlay.opaque=y`, owners of
   symlinks/fifos that cannot be made are in the layer's `override_stat.json`.
2. The merged view: `ocilayers mount IMAGE --run python3 listing.py` (kernel overlay) with
   the records applied equals the rootful view (`ocilayers mount` as root of a root store);
   the same through `mount --fuse --run` (fuse-overlayfs) equals what the kernel view predicts
   for FUSE. Every allowed difference is spelled out where it is built (`kernel_exceptions`,
   `fuse_expected`).
3. create, `run` a step (writes a file, deletes a lower file, appends to a setuid file and to
   a 0600 file owned 1000, makes a dir), commit with a tag, export; as root, that export
   unpacked into a fresh rootful store shows the original view plus exactly the step's
   changes: owners (100000, the 5:5 symlink), modes, devices, the fifo, xattrs (v2
   capability bytes, trusted.*, user.*) all come back, and no record leaks into a layer
   (allowed: new mtimes where the step wrote, link counts of dirs the step layer merges).
4. An untouched image exported rootless has the original DiffIDs and image ID, and the very
   bytes a rootful export of the same image has (its blobs are recompressed, so their digests
   are not the source archive's: that is true of a rootful export too).
5. Registry (TLS + htpasswd, `login` into the user's own ~/.docker): push of the committed
   image and pull back into a fresh store, as the unprivileged user: same image ID, DiffIDs
   and merged view.
6. Bad cases are one-line errors, exit 1: OCILAYERS_USERNS=subid without a range, `mount`
   without --run, no newuidmap on PATH, a subid store written under another mapping.
7. `ocilayers unshare -- CMD` runs CMD as 0 with the kind's maps, and passes its exit code on.

A step's chmod and chown of a file that has a record reach the commit (the disk wins over
the copied-up record where they differ; test_step_chmod_chown_reach_commit).

Skips (with the reason) unless root with the test users (.ci/run), the image tools, runc and
busybox-static (step tests), fuse-overlayfs and a 0666 /dev/fuse (FUSE tests), docker-registry
(registry test).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
from conftest import assert_one_line_error
from registry_servers import RegistryServer, unique_repo
from rootless_image import (  # noqa: F401  (rootless_image is a fixture)
    CAP_NET_RAW,
    CAPABILITY_V2,
    EXPECTED,
    LAYERS,
    MTIME,
    REF,
    SPEC,
    TRUSTED_XATTR,
    USER_XATTR,
    image_digests,
    rootless_image_fixture,
)
from unprivileged import (  # noqa: F401  (unpriv* are fixtures)
    KINDS,
    SUBGID,
    SUBUID,
    Unpriv,
    account,
    subid_ranges,
    unpriv_fixture,
    unpriv_single_fixture,
    unpriv_subid_fixture,
    unprivileged,
)

OVERRIDE = "user.containers.override_stat"
RECORD_PREFIX = "user.ocilayers.xattr."
SIDE_RECORD = "override_stat.json"
OVERFLOW_ID = 65534
"""What an ID that the namespace does not map shows as (/proc/sys/kernel/overflowuid)."""
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
BB_REF = "rootless-test:bb"
STEPPED = "rootless-test:stepped"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "rm", "ls", "id", "mkdir", "chmod", "chown")

LISTING = r'''
import hashlib, json, os, stat, sys

root = os.environ.get("OCILAYERS_MOUNT") or sys.argv[1]
entries, unlistable = {}, []


def xattrs(p):
    try:
        names = os.listxattr(p, follow_symlinks=False)
        return {n: os.getxattr(p, n, follow_symlinks=False).hex() for n in names}
    except PermissionError:
        return "EACCES"


def onerror(exc):
    unlistable.append(os.path.relpath(exc.filename, root))


for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
    for name in dirnames + filenames:
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        e = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
             "mtime": st.st_mtime_ns, "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)],
             "size": None, "sha256": None, "target": None, "xattrs": xattrs(p)}
        if stat.S_ISREG(st.st_mode):
            e["size"] = st.st_size
            try:
                with open(p, "rb") as f:
                    e["sha256"] = hashlib.sha256(f.read()).hexdigest()
            except PermissionError:
                e["sha256"] = "EACCES"
        elif stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p)
        entries[os.path.relpath(p, root)] = e
json.dump({"entries": entries, "unlistable": sorted(unlistable)}, sys.stdout)
'''
"""Lists a tree (the mount in $OCILAYERS_MOUNT, else argv[1]) as JSON: every path's lstat,
data digest, symlink target and xattrs (hex; "EACCES" where they cannot be read), and the dirs
that could not be listed. Run by root on a rootful mount and by the user inside its namespace."""

_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}


# --- views: a listing normalized, records applied or not --------------------------------------

View = dict[str, dict[str, Any]]


def normalize(listing: dict[str, Any], *, apply_records: bool) -> View:
    """path -> {type, mode (permissions), uid, gid, nlink, mtime, rdev (char/block only), size,
    sha256, target, xattrs}. The record xattrs never appear: `user.ocilayers.xattr.X` is shown as
    X, and `user.containers.override_stat` is dropped, or with `apply_records` applied (owner,
    mode, and for a device stand-in its type and numbers)."""
    out: View = {}
    for path, raw in listing["entries"].items():
        kind = _TYPES[stat.S_IFMT(raw["mode"])]
        e = {"type": kind, "mode": stat.S_IMODE(raw["mode"]), "uid": raw["uid"],
             "gid": raw["gid"], "nlink": raw["nlink"], "mtime": raw["mtime"],
             "rdev": tuple(raw["rdev"]) if kind in ("char", "block") else None,
             "size": raw["size"], "sha256": raw["sha256"], "target": raw["target"]}
        xattrs = raw["xattrs"]
        if xattrs != "EACCES":
            xattrs = {n: bytes.fromhex(v) for n, v in xattrs.items()}
            record = xattrs.pop(OVERRIDE, None)
            for name in [n for n in xattrs if n.startswith(RECORD_PREFIX)]:
                xattrs[name[len(RECORD_PREFIX):]] = xattrs.pop(name)
            if record is not None and apply_records:
                _apply_record(e, record.decode(), path)
        e["xattrs"] = xattrs
        out[path] = e
    return out


def _apply_record(e: dict[str, Any], text: str, where: str) -> None:
    uid, gid, mode, *kind = text.split(":")
    e.update(uid=int(uid), gid=int(gid), mode=int(mode, 8))
    if kind and kind[0].startswith(("char-", "block-")):
        dev, major, minor = kind[0].split("-")
        # a device is an empty regular file standing in for it
        assert (e["type"], e["size"]) == ("file", 0), (where, e)
        e.update(type=dev, rdev=(int(major), int(minor)), size=None, sha256=None)
    elif kind:
        assert kind[0] == e["type"], (where, text, e["type"])


def differences(want: View, got: View, *, ignore_dir_nlink: bool = False
                ) -> dict[str, Any]:
    """path -> "missing" / "extra" / {field: (want, got)} for every path that differs."""
    out: dict[str, Any] = {}
    for path in sorted(set(want) | set(got)):
        if path not in got:
            out[path] = "missing"
        elif path not in want:
            out[path] = "extra"
        else:
            a, b = want[path], got[path]
            d = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
            if ignore_dir_nlink and a["type"] == "dir":
                d.pop("nlink", None)
            if d:
                out[path] = d
    return out


@functools.cache
def _subid_count() -> int:
    """How many IDs the subid user's (first) range has: 65536 as .ci/run makes it."""
    acct = account("subid")
    ranges = subid_ranges(SUBUID, acct.name, acct.uid) if acct else []
    return ranges[0][1] if ranges else 0


def mapped(kind: str, ident: int) -> bool:
    """Does the kind's namespace map `ident`? (single: 0 only; subid: 0, and 1..N for the
    range.)"""
    return ident == 0 if kind == "single" else 0 <= ident <= _subid_count()


# --- running things ---------------------------------------------------------------------------


def ok(p: subprocess.CompletedProcess[str], what: str) -> str:
    assert p.returncode == 0, f"{what} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def root_ocilayers(*args: str | os.PathLike[str]) -> str:
    p = subprocess.run([sys.executable, "-m", "ocilayers", *map(os.fspath, args)],
                       capture_output=True, text=True, timeout=120)
    return ok(p, "ocilayers " + " ".join(map(os.fspath, args)))


def root_view(store: Path, image: str, listing: Path) -> View:
    """The merged view of `image` in the rootful `store`, mounted by `ocilayers mount` as
    root (the kernel's overlay with trusted.* markers)."""
    mnt = Path(tempfile.mkdtemp(prefix="rootless-view-"))
    try:
        root_ocilayers("--root", store, "mount", image, mnt)
        try:
            p = subprocess.run([sys.executable, str(listing), str(mnt)], capture_output=True,
                               text=True, timeout=120)
            raw = json.loads(ok(p, "listing"))
        finally:
            root_ocilayers("--root", store, "umount", mnt)
    finally:
        mnt.rmdir()
    assert raw["unlistable"] == []
    return normalize(raw, apply_records=False)


def user_listing(u: Unpriv, image: str, *, fuse: bool = False, root: Path | None = None
                 ) -> dict[str, Any]:
    """`ocilayers mount IMAGE [--fuse] --run python3 listing.py` as the user."""
    args = ["--root", str(root)] if root else []
    args += ["mount", image, *(["--fuse"] if fuse else []), "--run", sys.executable,
             "listing.py"]
    listing: dict[str, Any] = json.loads(ok(u.ocilayers(args), "mount --run"))
    return listing


def one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    return assert_one_line_error(p.returncode, p.stderr, *needles)


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class Assets:
    """World-readable inputs (the users read them in place): the listing script and the image
    with a busybox layer on top."""

    dir: Path
    listing: Path
    bb_image: Path


def _busybox_reason() -> str | None:
    if not BUSYBOX.is_file():
        return "/bin/busybox is absent (Debian's busybox-static)"
    head = BUSYBOX.read_bytes()[:4096]
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        return "/bin/busybox is not static (want busybox-static)"
    return None


@pytest.fixture(scope="module")
def assets(rootless_image: Path) -> Iterator[Assets]:
    base = Path(tempfile.mkdtemp(prefix="ocilayers-rootless-assets-"))
    try:
        os.chmod(base, 0o755)
        listing = base / "listing.py"
        listing.write_text(LISTING)
        os.chmod(listing, 0o644)
        bb_image = base / "rootless-bb.tar"
        if _busybox_reason() is None:
            layer = base / "busybox.tar"
            layer.write_bytes(tb.build([
                tb.dir("bin"), tb.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
                *(tb.symlink(f"bin/{a}", "busybox") for a in APPLETS)]))
            root_ocilayers("append", rootless_image, "--layer", layer, "--tag", BB_REF,
                           "--created-by", "busybox", "--source-date-epoch", str(MTIME),
                           "-o", bb_image)
            os.chmod(bb_image, 0o644)
        yield Assets(base, listing, bb_image)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class RootRef:
    """The rootful reference: a root store with both images, their merged views and a rootful
    export of the untouched image."""

    store: Path
    views: dict[str, View]
    export: dict[str, Any]


@pytest.fixture(scope="module")
def root_ref(rootless_image: Path, assets: Assets,
             tmp_path_factory: pytest.TempPathFactory) -> RootRef:
    base = tmp_path_factory.mktemp("rootful")
    store = base / "store"
    root_ocilayers("--root", store, "-q", "unpack", rootless_image)
    views = {REF: root_view(store, REF, assets.listing)}
    assert set(views[REF]) == set(EXPECTED)
    if assets.bb_image.exists():
        root_ocilayers("--root", store, "-q", "unpack", assets.bb_image)
        views[BB_REF] = root_view(store, BB_REF, assets.listing)
    export = json.loads(root_ocilayers("--root", store, "export", REF, "-o",
                                       base / "export.tar", "--json"))
    return RootRef(store, views, export)


@dataclass
class Rootless:
    """One user (of `kind`) with its own store (the default, $XDG_DATA_HOME/ocilayers) holding
    the image; `listing.py` in its work dir."""

    u: Unpriv
    unpacked: dict[str, Any]
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.u.kind

    @property
    def store(self) -> Path:
        return self.u.dirs.store

    def ocilayers(self, *args: str | os.PathLike[str], **kw: Any
                  ) -> subprocess.CompletedProcess[str]:
        return self.u.ocilayers(list(args), **kw)

    def ok(self, *args: str | os.PathLike[str], **kw: Any) -> str:
        return ok(self.u.ocilayers(list(args), **kw), "ocilayers " + " ".join(map(str, args)))

    def layer_dir(self, cache_id: str) -> Path:
        return self.store / "overlay2" / cache_id


@pytest.fixture(scope="module", params=KINDS)
def rl(request: pytest.FixtureRequest, rootless_image: Path, assets: Assets
       ) -> Iterator[Rootless]:
    """Each kind in turn, once per module: a fresh user tree and the image unpacked rootless."""
    with unprivileged(request.param) as u:
        shutil.copy(assets.listing, u.dirs.work / "listing.py")
        os.chown(u.dirs.work / "listing.py", u.uid, u.gid)
        out = json.loads(ok(u.ocilayers(["unpack", str(rootless_image), "--json"]), "unpack"))
        yield Rootless(u, out)


def _require_step_tools(assets: Assets) -> None:
    reason = _busybox_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    assert assets.bb_image.exists()


STEP = ("echo step > /etc/step-new && rm /etc/motd && echo modified >> /usr/bin/su-helper && "
        "echo more >> /data/new2 && mkdir /srv/step-dir && id -u")
"""The build step: a new file, a lower layer's file deleted, a setuid file and a 0600 file
owned 1000 (recorded in single mode) written to, a new dir."""


@dataclass
class Stepped:
    image_id: str
    diff_ids: list[str]
    archive: Path
    run_stdout: str


@pytest.fixture(scope="module")
def stepped(rl: Rootless, assets: Assets) -> Stepped:
    """The kind's user: unpack the busybox image, create a container, run STEP, commit it as
    STEPPED and export that to an oci-archive in its work dir."""
    _require_step_tools(assets)
    rl.ok("-q", "unpack", assets.bb_image)
    rl.ok("create", BB_REF, "--name", "step")
    run = rl.ok("run", "step", "--", "sh", "-c", STEP)
    committed = json.loads(rl.ok("commit", "step", STEPPED, "--json"))
    archive = rl.u.dirs.work / "stepped.tar"
    rl.ok("-q", "export", STEPPED, "-o", archive)
    info = json.loads(rl.ok("inspect", STEPPED, "--json"))
    assert info["image_id"] == committed["image_id"]
    return Stepped(committed["image_id"], [x["diff_id"] for x in info["layers"]], archive, run)


def _require_fuse() -> None:
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("fuse-overlayfs is not installed")
    try:
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    except FileNotFoundError:
        pytest.skip("/dev/fuse is missing")
    if mode & 0o006 != 0o006:
        pytest.skip(f"/dev/fuse is mode {mode:04o}, not 0666 (.ci/run makes it so)")


# --- 1. unpack ---------------------------------------------------------------------------------


def _host_id(rl: Rootless, ident: int, which: str) -> int:
    """The ID outside the namespace that an owner `ident` of the image gets on disk: its own
    range ID where mapped, else the user itself (and a record)."""
    own = rl.u.uid if which == "uid" else rl.u.gid
    if ident == 0 or not mapped(rl.kind, ident):
        return own
    (start, _count), *_ = subid_ranges(SUBUID if which == "uid" else SUBGID, rl.u.user,
                                       rl.u.uid)
    return start + ident - 1


def _record_of(e: dict[str, Any]) -> str:
    kind = e["type"]
    if kind in ("char", "block"):
        kind = f"{kind}-{e['rdev'][0]}-{e['rdev'][1]}"
    return f"{e['uid']}:{e['gid']}:{e['mode']:04o}:{kind}"


def _xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


def test_unpack(rl: Rootless, rootless_image: Path) -> None:
    u, kind = rl.u, rl.kind
    want = image_digests(rootless_image)
    assert [x["diff_id"] for x in rl.unpacked["layers"]] == want["diff_ids"]
    assert rl.unpacked["image_id"] == want["config"]
    assert rl.unpacked["tags"] == [REF]
    images = json.loads(rl.ok("images", "--json"))
    assert [(i["image_id"], i["tags"]) for i in images
            if i["image_id"] == want["config"]] == [(want["config"], [REF])]

    record = json.loads((rl.store / "rootless.json").read_text())
    assert record["xattr_namespace"] == "user" and record["ids"] == kind
    for which, path, own in (("uid", SUBUID, u.uid), ("gid", SUBGID, u.gid)):
        expect = [[0, own, 1]]
        if kind == "subid":
            expect += [[1, start, count] for start, count in subid_ranges(path, u.user, u.uid)]
        assert record[f"{which}_map"] == expect

    # Each layer's diff dir as it is on disk (read as root, outside the namespace).
    cap_v3 = struct.pack("<6I", 0x03000000 | 0x1, 1 << CAP_NET_RAW, 0, 0, 0, u.uid)
    for i, (layer, entries) in enumerate(zip(rl.unpacked["layers"], LAYERS, strict=True), 1):
        ldir = rl.layer_dir(layer["cache_id"])
        diff = ldir / "diff"
        unmapped = [p for p, e in entries.items()
                    if not (mapped(kind, e["uid"]) and mapped(kind, e["gid"]))]
        recorded = any(e["type"] in ("char", "block") or
                       (e["type"] in ("file", "dir") and p in unmapped)
                       for p, e in entries.items())
        side: dict[str, Any] = {}
        for path, e in entries.items():
            where = f"layer {i}: {path}"
            full = diff / path
            st = os.lstat(full)
            if e["type"] == "whiteout":
                assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, where
                continue
            assert (st.st_uid, st.st_gid) == (_host_id(rl, e["uid"], "uid"),
                                              _host_id(rl, e["gid"], "gid")), where
            if e["type"] in ("symlink", "fifo"):
                assert stat.S_IFMT(st.st_mode) == (stat.S_IFLNK if e["type"] == "symlink"
                                                   else stat.S_IFIFO), where
                if path in unmapped:
                    kind_name = "pipe" if e["type"] == "fifo" else "symlink"
                    side[path] = {"stat": f"{e['uid']}:{e['gid']}:{e['mode']:04o}:{kind_name}"}
                continue
            # files, dirs and device stand-ins: the image's permission bits on disk
            assert stat.S_IMODE(st.st_mode) == e["mode"], where
            if e["type"] in ("char", "block"):
                assert stat.S_ISREG(st.st_mode) and st.st_size == 0, where
            else:
                assert stat.S_IFMT(st.st_mode) == (stat.S_IFDIR if e["type"] == "dir"
                                                   else stat.S_IFREG), where
            expect: dict[str, bytes] = {}
            for name, value in e["xattrs"].items():
                if name.startswith("trusted."):
                    expect[RECORD_PREFIX + name] = value
                elif name == "security.capability":
                    assert value == CAPABILITY_V2
                    # set in the namespace: the kernel stores v3 with the namespace's root
                    expect[name] = cap_v3
                else:
                    expect[name] = value
            if recorded:
                expect[OVERRIDE] = _record_of(e).encode()
            if e["opaque"]:
                expect["user.overlay.opaque"] = b"y"
            assert _xattrs(full) == expect, where
        root_xattrs = _xattrs(diff)
        if recorded:  # fuse-overlayfs reads records only in a layer whose root has one
            assert root_xattrs[OVERRIDE].startswith(b"0:0:"), f"layer {i}"
        else:
            assert OVERRIDE not in root_xattrs, f"layer {i}"
        if side:
            doc = json.loads((ldir / SIDE_RECORD).read_text())
            assert doc == {"version": 1, "entries": side}, f"layer {i}"
        else:
            assert not (ldir / SIDE_RECORD).exists(), f"layer {i}"
        for dirpath, dirnames, filenames in os.walk(diff):
            for n in [".", *dirnames, *filenames]:
                names = os.listxattr(os.path.join(dirpath, n), follow_symlinks=False)
                assert not [x for x in names if x.startswith("trusted.")], (dirpath, n)
    if kind == "single":
        # the single kind records the symlink's and the fifo's owners (layer 1)
        assert rl.layer_dir(rl.unpacked["layers"][0]["cache_id"]).joinpath(SIDE_RECORD).exists()


# --- 2. the merged view ---------------------------------------------------------------------------


def kernel_exceptions(kind: str, root: View) -> dict[str, Any]:
    """Where the rootless kernel view (records applied) may differ from the rootful one: a
    symlink or fifo cannot carry a user.* xattr, so an owner the namespace cannot make is in the
    layer's side record (checked by test_unpack), which no mount shows; on disk it belongs to
    the user, 0 inside. (single: the 5:5 symlink and the 1000:1000 fifo; subid: none, both
    owners are in the range.) Everything else (owners, modes, types, device numbers, sizes,
    data, mtimes, link counts, symlink targets, xattrs) must be equal."""
    out: dict[str, Any] = {}
    for path, e in root.items():
        if e["type"] in ("symlink", "fifo"):
            d = {k: (e[k], 0) for k in ("uid", "gid") if not mapped(kind, e[k])}
            if d:
                out[path] = d
    return out


def fuse_expected(kind: str, kernel: View) -> tuple[View, list[str]]:
    """What fuse-overlayfs should show inside the namespace, from the kernel view with the
    records applied, and the dirs that cannot be listed there:
    - it applies a record's owner and mode but ignores its type: a device is its empty
      stand-in file (the record's permissions);
    - it does not read the side record: a symlink's or fifo's owner is its owner on disk, as
      in the kernel view before records;
    - an owner the namespace does not map shows as the overflow ID 65534, and root of the
      namespace has no DAC override on such a file: only the permission bits that apply to
      0:0 (owner bits if the owner is 0, group bits if the group is 0, else other bits) let
      it read the data and user.* xattrs, or list a dir (whose entries are then missing)."""
    out: View = {}
    blocked: list[str] = []
    for path, e in sorted(kernel.items()):
        f = dict(e)
        if e["type"] in ("char", "block"):
            f.update(type="file", rdev=None, size=0, sha256=EMPTY_SHA256)
        if f["type"] in ("file", "dir"):
            uid_ok, gid_ok = mapped(kind, e["uid"]), mapped(kind, e["gid"])
            f["uid"] = e["uid"] if uid_ok else OVERFLOW_ID
            f["gid"] = e["gid"] if gid_ok else OVERFLOW_ID
            if not (uid_ok and gid_ok):
                shift = 6 if f["uid"] == 0 else 3 if f["gid"] == 0 else 0
                bits = (e["mode"] >> shift) & 0o7
                if not bits & 0o4:
                    f["xattrs"] = "EACCES"
                    if f["type"] == "file":
                        f["sha256"] = "EACCES"
                if f["type"] == "dir" and (bits & 0o5) != 0o5:
                    blocked.append(path)
        out[path] = f
    out = {p: e for p, e in out.items()
           if not any(p.startswith(b + "/") for b in blocked)}
    return out, blocked


def test_merged_view_kernel(rl: Rootless, root_ref: RootRef) -> None:
    raw = user_listing(rl.u, REF)
    assert raw["unlistable"] == []
    root = root_ref.views[REF]
    # before records: a device is an empty regular file, an unmapped owner is the user (0)
    plain = normalize(raw, apply_records=False)
    assert plain["dev/null"]["type"] == "file" and plain["dev/null"]["size"] == 0
    assert (plain["opt/far/outside"]["uid"], plain["opt/far/outside"]["gid"]) == (0, 0)
    assert plain["usr/bin/ping"]["xattrs"]["security.capability"] == CAPABILITY_V2
    if rl.kind == "subid":  # owners in the range are real
        assert (plain["home/user/notes.txt"]["uid"], plain["var/games/score"]["gid"]) == (1000, 5)
    view = normalize(raw, apply_records=True)
    exceptions = kernel_exceptions(rl.kind, root)
    assert differences(root, view) == exceptions
    assert exceptions == ({} if rl.kind == "subid" else {
        "usr/bin/games": {"uid": (5, 0), "gid": (5, 0)},
        "run/fifo": {"uid": (1000, 0), "gid": (1000, 0)}})
    rl.cache["kernel"] = view


def test_merged_view_fuse(rl: Rootless, root_ref: RootRef) -> None:
    _require_fuse()
    kernel = rl.cache.get("kernel") or normalize(user_listing(rl.u, REF), apply_records=True)
    raw = user_listing(rl.u, REF, fuse=True)
    view = normalize(raw, apply_records=False)
    want, blocked = fuse_expected(rl.kind, kernel)
    assert raw["unlistable"] == blocked
    # fuse-overlayfs counts no subdirs in a dir's link count (1): dirs' nlink is not compared
    assert differences(want, view, ignore_dir_nlink=True) == {}
    # Owners only the records know did show (on disk these belong to the user, 0 inside).
    assert (view["opt/far"]["uid"], view["opt/far"]["gid"]) == (OVERFLOW_ID, OVERFLOW_ID)
    if rl.kind == "single":
        assert (view["var/games"]["uid"], view["etc/chowned"]["gid"]) == (OVERFLOW_ID,) * 2
        assert "home/user/private" in blocked


# --- 3. a build step, commit, export, and root unpacks it ---------------------------------------


def test_step_commit_export_round_trip(rl: Rootless, stepped: Stepped, root_ref: RootRef,
                                       assets: Assets, tmp_path: Path) -> None:
    assert stepped.run_stdout.strip() == "0"  # the step ran as root of its namespace
    store = tmp_path / "store"
    out = json.loads(root_ocilayers("--root", store, "unpack", stepped.archive, "--json"))
    assert out["image_id"] == stepped.image_id and out["tags"] == [STEPPED]
    got_diff_ids = [x["diff_id"] for x in out["layers"]]
    assert got_diff_ids == stepped.diff_ids
    # the four layers under the step come out of the rootless store as they went in
    bb = json.loads(root_ocilayers("inspect", assets.bb_image, "--json"))
    assert got_diff_ids[:4] == [x["diff_id"] for x in bb["layers"]]

    before = root_ref.views[BB_REF]
    after = root_view(store, STEPPED, assets.listing)
    for path, e in after.items():  # no record reached a layer
        assert not [n for n in e["xattrs"] if n == OVERRIDE or n.startswith(RECORD_PREFIX)], path
    new_mtime = {k: (before[k]["mtime"], after[k]["mtime"]) for k in
                 ("etc", "srv", "data/new2", "usr/bin/su-helper")}
    for path, (old, new) in new_mtime.items():
        assert new > old == MTIME * 10**9, path
    step_new = {"type": "file", "mode": 0o644, "uid": 0, "gid": 0, "nlink": 1,
                "rdev": None, "size": 5, "sha256": hashlib.sha256(b"step\n").hexdigest(),
                "target": None, "xattrs": {}}
    su, new2 = before["usr/bin/su-helper"], before["data/new2"]
    su_data = _data("usr/bin/su-helper") + b"modified\n"
    new2_data = _data("data/new2") + b"more\n"
    assert {k: v for k, v in after["etc/step-new"].items() if k != "mtime"} == step_new
    assert (after["srv/step-dir"]["type"], after["srv/step-dir"]["mode"],
            after["srv/step-dir"]["uid"]) == ("dir", 0o755, 0)
    # Dirs the step layer has again are merged dirs, which overlayfs gives link count 1;
    # mtimes of what the step wrote are new. Everything else is the image's, exactly: every
    # owner (100000, the 5:5 symlink, 1000), mode, device, the fifo, every xattr.
    assert differences(before, after, ignore_dir_nlink=True) == {
        "etc/motd": "missing",
        "etc/step-new": "extra",
        "srv/step-dir": "extra",
        # (a copy-up keeps its parent dir's mtime: usr/bin and data keep theirs)
        "etc": {"mtime": new_mtime["etc"]},
        "srv": {"mtime": new_mtime["srv"]},
        # The kernel dropped the setuid bit when the rootless step wrote to the file (a
        # rootful step's root keeps it with CAP_FSETID): the step saw 0755, and the commit
        # has what the step saw.
        "usr/bin/su-helper": {"mode": (0o4755, 0o755),
                              "mtime": new_mtime["usr/bin/su-helper"],
                              "size": (su["size"], len(su_data)),
                              "sha256": (su["sha256"], hashlib.sha256(su_data).hexdigest())},
        "data/new2": {"mtime": new_mtime["data/new2"],
                      "size": (new2["size"], len(new2_data)),
                      "sha256": (new2["sha256"], hashlib.sha256(new2_data).hexdigest())},
    }
    assert (after["usr/bin/su-helper"]["mode"], after["data/new2"]["uid"],
            after["data/new2"]["mode"]) == (0o755, 1000, 0o600)
    assert after["usr/bin/ping"]["xattrs"] == {"security.capability": CAPABILITY_V2}
    assert after["etc/trusted-file"]["xattrs"] == {TRUSTED_XATTR: b"trusted-value"}
    assert after["etc/user-file"]["xattrs"] == {USER_XATTR: b"user-value"}
    assert (after["dev/sda"]["type"], after["dev/sda"]["rdev"], after["dev/sda"]["gid"]) == (
        "block", (8, 0), 6)
    assert (after["opt/far/outside"]["uid"], after["usr/bin/games"]["uid"],
            after["run/fifo"]["type"]) == (100000, 5, "fifo")


def _data(path: str) -> bytes:
    """The bytes the image's merged view has at `path` (from rootless_image's spec)."""
    for layer in reversed(SPEC):
        for node in layer:
            if node.path == path and node.type == "file":
                return node.data
    raise LookupError(path)


def test_step_chmod_chown_reach_commit(rl: Rootless, stepped: Stepped, tmp_path: Path
                                       ) -> None:
    """A step's chmod and chown of files that have a record (every file of a layer with
    records) must reach the commit, as they do rootful. (single: chown to anything but 0 fails
    with EINVAL in a one-ID namespace, so the chown there is to 0:0 of a file recorded 1000.)"""
    chown = "chown 5:5 /etc/group" if rl.kind == "subid" else "chown 0:0 /etc/chowned"
    rl.ok("create", BB_REF, "--name", "chmod")
    rl.ok("run", "chmod", "--", "sh", "-c",
          f"chmod 0700 /usr/bin/tool && chmod 0600 /etc/passwd && {chown}")
    rl.ok("commit", "chmod", "rootless-test:chmod")
    archive = rl.u.dirs.work / "chmod.tar"
    rl.ok("-q", "export", "rootless-test:chmod", "-o", archive)
    out = json.loads(root_ocilayers("--root", tmp_path / "store", "unpack", archive, "--json"))
    top = tmp_path / "store" / "overlay2" / out["layers"][-1]["cache_id"] / "diff"
    owned = "etc/group" if rl.kind == "subid" else "etc/chowned"
    got = {}
    for path in ("usr/bin/tool", "etc/passwd", owned):
        st = os.lstat(top / path)
        got[path] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    # single: the file recorded 1000:1000 is 0:0 on disk, so a chown to 0:0 changes nothing
    # there and cannot be seen: the recorded owner stays, as the image had it.
    want = {"usr/bin/tool": (0o700, 0, 0), "etc/passwd": (0o600, 0, 0),
            owned: (0o644, 5, 5) if rl.kind == "subid" else (0o644, 1000, 1000)}
    assert got == want


# --- 4. an untouched image exports as it came ----------------------------------------------------


def test_untouched_export_keeps_diff_ids(rl: Rootless, rootless_image: Path,
                                         root_ref: RootRef) -> None:
    archive = rl.u.dirs.work / "untouched.tar"
    out = json.loads(rl.ok("export", REF, "-o", archive, "--json"))
    want = image_digests(rootless_image)
    got = image_digests(archive)
    assert got["diff_ids"] == want["diff_ids"]
    assert got["config"] == want["config"]  # so the image ID too
    # Byte for byte what root exports from its own store. (Both recompress the layers, so the
    # blob digests are not the source archive's; the DiffIDs are.)
    assert out["manifest_digest"] == root_ref.export["manifest_digest"] == got["manifest"]
    assert got["layers"] == [x["digest"] for x in root_ref.export["layers"]]


# --- 5. registry ----------------------------------------------------------------------------------


def test_registry_push_and_pull(rl: Rootless, stepped: Stepped, tls_registry: RegistryServer
                                ) -> None:
    reg = tls_registry
    assert reg.cert_dir is not None and reg.username and reg.password
    certs = rl.u.give(reg.cert_dir, "registry-certs")  # the test's CA, readable by the user
    ref = f"docker://{reg.host}/{unique_repo('rootless-' + rl.kind)}:1"
    # login stores the credentials in the user's own ~/.docker/config.json (0600)
    rl.ok("login", reg.host, "-u", reg.username, "--password-stdin", "--cert-dir", certs,
          input=reg.password + "\n")
    config = rl.u.dirs.home / ".docker" / "config.json"
    st = config.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (rl.u.uid, 0o600)
    assert reg.host in json.loads(config.read_text())["auths"]

    pushed = json.loads(rl.ok("push", STEPPED, ref, "--cert-dir", certs, "--json"))
    assert pushed["image_id"] == stepped.image_id
    pulled_root = rl.u.dirs.work / "pulled"
    out = json.loads(rl.ok("--root", pulled_root, "unpack", ref, "--cert-dir", certs, "--json"))
    assert out["image_id"] == stepped.image_id
    assert [x["diff_id"] for x in out["layers"]] == stepped.diff_ids
    assert json.loads((pulled_root / "rootless.json").read_text())["ids"] == rl.kind
    # what came back from the registry shows what the committed image shows
    name = ref.removeprefix("docker://")
    pulled = normalize(user_listing(rl.u, name, root=pulled_root), apply_records=True)
    original = normalize(user_listing(rl.u, STEPPED), apply_records=True)
    assert differences(original, pulled) == {}
    assert pulled["opt/far/outside"]["uid"] == 100000 and pulled["dev/zero"]["type"] == "char"


# --- 6. bad cases ---------------------------------------------------------------------------------


def test_subid_forced_without_a_range(unpriv_single: Unpriv) -> None:
    p = unpriv_single.ocilayers(["images"], env={"OCILAYERS_USERNS": "subid"})
    one_line_error(p, "/etc/subuid", "nobody")
    p = unpriv_single.ocilayers(["images"], env={"OCILAYERS_USERNS": "bogus"})
    one_line_error(p, "OCILAYERS_USERNS", "subid or single")


def test_mount_without_run(rl: Rootless) -> None:
    target = rl.u.dirs.work / "mnt"
    target.mkdir(exist_ok=True)
    os.chown(target, rl.u.uid, rl.u.gid)
    one_line_error(rl.ocilayers("mount", REF, target), "--run")
    one_line_error(rl.ocilayers("mount", REF, "--run"), "--run needs a command")


def test_missing_newuidmap(unpriv_subid: Unpriv) -> None:
    # PATH without newuidmap (env is found on the harness's PATH; python by its full path)
    argv = ["/usr/bin/env", "PATH=/nonexistent", sys.executable, "-m", "ocilayers"]
    p = unpriv_subid.run([*argv, "unshare", "/usr/bin/id", "-u"])
    one_line_error(p, "newuidmap", "uidmap", "OCILAYERS_USERNS=single")
    # the way out the message names works
    p = unpriv_subid.run(["/usr/bin/env", "PATH=/nonexistent", "OCILAYERS_USERNS=single",
                          *argv[2:], "unshare", "/usr/bin/id", "-u"])
    assert (p.returncode, p.stdout) == (0, "0\n"), p.stderr


def test_subid_store_needs_its_mapping(unpriv_subid: Unpriv, rootless_image: Path) -> None:
    u = unpriv_subid
    ok(u.ocilayers(["-q", "unpack", str(rootless_image)]), "unpack")
    p = u.ocilayers(["-q", "unpack", str(rootless_image), "--tag", "again:1"],
                    env={"OCILAYERS_USERNS": "single"})
    one_line_error(p, "subordinate IDs", str(u.dirs.store))


# --- 7. unshare -----------------------------------------------------------------------------------


def test_unshare(unpriv: Unpriv) -> None:
    u = unpriv
    p = u.ocilayers(["unshare", "--", "sh", "-c",
                     "id -u; cat /proc/self/uid_map /proc/self/gid_map"])
    assert p.returncode == 0, p.stderr
    lines = [line.split() for line in p.stdout.splitlines()]
    assert lines[0] == ["0"]
    maps = lines[1:]
    want = []
    for path, own in ((SUBUID, u.uid), (SUBGID, u.gid)):
        want.append([0, own, 1])
        if u.kind == "subid":
            want += [[1, start, count] for start, count in subid_ranges(path, u.user, u.uid)]
    assert [[int(x) for x in m] for m in maps] == want
    p = u.ocilayers(["unshare", "sh", "-c", "exit 7"])
    assert p.returncode == 7, p.stderr


def test_root_with_rootless_flag(rootless_image: Path, tmp_path: Path) -> None:
    """`--rootless` as root: a rootless store (user.* overlay markers; root can make every
    owner, so nothing needs a record), which verifies, and which a later command without the
    flag still reads in its recorded format (a userxattr mount)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    store = tmp_path / "store"
    root_ocilayers("--rootless", "--root", store, "-q", "unpack", rootless_image)
    assert json.loads((store / "rootless.json").read_text()) == {
        "xattr_namespace": "user", "ids": "root"}
    diffs = list((store / "overlay2").glob("*/diff"))
    assert diffs and not any(n.startswith("trusted.overlay.") for d in diffs
                             for p in [d, *d.rglob("*")] if not p.is_symlink()
                             for n in os.listxattr(p))
    assert any("user.overlay.opaque" in os.listxattr(p) for d in diffs for p in d.rglob("*")
               if p.is_dir() and not p.is_symlink())
    assert root_ocilayers("--rootless", "--root", store, "verify").strip() == "ok"
    out = root_ocilayers("--root", store, "mount", "rootless-test:latest", "--run", "sh", "-c",
                         'stat -c %u:%g:%a "$OCILAYERS_MOUNT/opt/far/outside"')
    assert out.strip() == "100000:100000:640"
