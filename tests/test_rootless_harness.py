"""The rootless test infrastructure itself (issue 19): tests/unprivileged.py runs commands as a
really unprivileged user, with and without a subordinate range, and cleans up after itself;
tests/rootless_image.py builds a deterministic multi-layer image that skopeo reads and that a
rootful `ocilayers unpack` stores with every owner, mode, device and xattr it describes.

Skips (with the reason) when not root or a tool or the test users are missing; CI prepares them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rootless_image import (  # noqa: F401  (rootless_image is a fixture)
    CAPABILITY_V2,
    EXPECTED,
    LAYERS,
    REF,
    REMOVED,
    TRUSTED_XATTR,
    build_rootless_image,
    image_digests,
    missing_requirement,
    rootless_image_fixture,
)
from unprivileged import (  # noqa: F401  (unpriv* are fixtures)
    SOURCE_ROOT,
    SUBUID,
    UserDirs,
    account,
    mounts_below,
    probe,
    subid_ranges,
    unpriv_fixture,
    unpriv_single_fixture,
    unpriv_subid_fixture,
)

# --- the unprivileged harness ------------------------------------------------------------------


def test_user_is_really_unprivileged(unpriv: Any) -> None:
    script = ('id -u; id -g; id -G; echo "$HOME"; echo "$XDG_DATA_HOME"; echo "$XDG_RUNTIME_DIR";'
              ' pwd; sed -n "s/^CapEff:[[:space:]]*//p" /proc/self/status;'
              ' test -w /etc && echo etc-writable || echo etc-readonly;'
              ' ls /root >/dev/null 2>&1 && echo root-listable || echo root-private')
    p = unpriv.run(["sh", "-c", script])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    d = unpriv.dirs
    assert lines == [str(unpriv.uid), str(unpriv.gid), str(unpriv.gid), str(d.home), str(d.data),
                     str(d.runtime), str(d.work), "0000000000000000", "etc-readonly",
                     "root-private"]
    assert unpriv.uid != 0


def test_environment_is_clean(unpriv: Any) -> None:
    p = unpriv.run(["env"], env={"EXTRA": "1"})
    env = dict(line.split("=", 1) for line in p.stdout.splitlines())
    assert set(env) == {"PATH", "LANG", "HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR", "TMPDIR",
                        "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "EXTRA"}
    assert "OCILAYERS_ROOT" not in env
    assert env["PYTHONPATH"] == str(SOURCE_ROOT)


def test_dirs_are_owned_and_private(unpriv: Any) -> None:
    d = unpriv.dirs
    base = d.base.stat()
    assert (base.st_uid, stat.S_IMODE(base.st_mode)) == (0, 0o711)
    for path, mode in ((d.home, 0o700), (d.data, 0o700), (d.runtime, 0o700), (d.work, 0o755)):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (unpriv.uid, unpriv.gid, mode)
    assert d.store == d.data / "ocilayers"
    p = unpriv.run(["sh", "-c", 'echo hi > "$HOME/f" && mkdir "$XDG_DATA_HOME/x" && cat "$HOME/f"'])
    assert (p.returncode, p.stdout) == (0, "hi\n"), p.stderr
    assert (d.home / "f").stat().st_uid == unpriv.uid


def test_userns_root_inside(unpriv: Any) -> None:
    p = unpriv.run(["unshare", "-Ur", "sh", "-c", "id -u; cat /proc/self/uid_map"])
    assert p.returncode == 0, p.stderr
    inside, mapping = p.stdout.split("\n", 1)
    assert inside == "0"
    assert mapping.split() == ["0", str(unpriv.uid), "1"]


def test_subid_user_maps_its_range(unpriv_subid: Any) -> None:
    u = unpriv_subid
    (start, _count), *_ = subid_ranges(SUBUID, u.user, u.uid)
    p = u.run(["unshare", "--map-auto", "--map-root-user", "sh", "-c",
               "cat /proc/self/uid_map; touch f && chown 1000:1000 f && stat -c %u:%g f"])
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines()[:-1]]
    assert ["0", str(u.uid), "1"] in rows
    assert any(r[0] == "1" and r[1] == str(start) for r in rows), rows
    assert p.stdout.splitlines()[-1] == "1000:1000"
    # Outside, the file belongs to the subordinate id that 1000 maps to.
    assert (u.dirs.work / "f").stat().st_uid == start + 1000 - 1


def test_single_user_cannot_map_a_range(unpriv_single: Any) -> None:
    u = unpriv_single
    p = u.run(["unshare", "--map-auto", "--map-root-user", "true"])
    assert p.returncode != 0
    assert "subuid" in p.stderr, p.stderr
    p = u.run(["unshare", "-Ur", "sh", "-c", "touch f && chown 1000 f"])
    assert p.returncode != 0  # only id 0 exists in a single-ID namespace


def test_ocilayers_runs_as_the_user(unpriv: Any) -> None:
    p = unpriv.ocilayers(["--version"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
    p = unpriv.run([sys.executable, "-c", "import ocilayers, os; print(ocilayers.__file__,"
                    " os.geteuid())"])
    file, euid = p.stdout.split()
    assert Path(file).resolve().is_relative_to(SOURCE_ROOT)
    assert euid == str(unpriv.uid)


def test_give_copies_owned_by_the_user(unpriv: Any, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a").write_text("a\n")
    copy = unpriv.give(src)
    assert copy == unpriv.dirs.work / "in"
    p = unpriv.run(["sh", "-c", "cat in/sub/a && touch in/sub/b"])
    assert (p.returncode, p.stdout) == (0, "a\n"), p.stderr


def test_probe_is_cached() -> None:
    probe("single")
    before = probe.cache_info().hits
    probe("single")
    assert probe.cache_info().hits == before + 1
    with pytest.raises(ValueError):
        probe("nosuchkind")


def test_cleanup_unmounts_and_removes_everything() -> None:
    kind = next((k for k in ("single", "subid") if probe(k) is None), None)
    if kind is None:
        pytest.skip(probe("single") or "no unprivileged user")
    dirs = UserDirs.create(kind)
    acct = account(kind)
    assert acct is not None
    try:
        from unprivileged import run_as
        p = run_as(kind, ["sh", "-c", "mkdir -p a/b mnt && echo x > a/b/f && chmod 0 a/b a "
                          "&& mkdir \"$HOME/h\" && chmod 0 \"$HOME/h\""], dirs=dirs)
        assert p.returncode == 0, p.stderr
        mnt = dirs.work / "mnt"
        m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if m.returncode == 0:
            (mnt / "inside").write_text("x")
            assert mounts_below(dirs.base) == [str(mnt)]
    finally:
        dirs.cleanup()
    assert not dirs.base.exists()
    assert mounts_below(dirs.base) == []
    dirs.cleanup()  # a second cleanup is a no-op


# --- the image ---------------------------------------------------------------------------------


def test_image_is_deterministic(tmp_path: Path, rootless_image: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = build_rootless_image(tmp_path / "a")
    b = build_rootless_image(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes() == rootless_image.read_bytes()
    assert sorted(os.listdir(tmp_path / "a")) == ["rootless.tar"]  # staging removed
    st = rootless_image.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert stat.S_IMODE(rootless_image.parent.stat().st_mode) == 0o755


def _skopeo(*args: str) -> Any:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (not on PATH)")
    p = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_skopeo_sees_three_layers(rootless_image: Path) -> None:
    want = image_digests(rootless_image)
    info = _skopeo("inspect", f"oci-archive:{rootless_image}")
    assert info["Layers"] == want["layers"]
    assert len(want["layers"]) == 3
    assert info["Digest"] == want["manifest"]
    config = _skopeo("inspect", "--config", f"oci-archive:{rootless_image}")
    assert config["rootfs"]["diff_ids"] == want["diff_ids"]
    assert len(LAYERS) == 3


def test_description_is_consistent() -> None:
    assert EXPECTED["etc/chowned"]["uid"] == 1000 and EXPECTED["etc/chowned"]["layer"] == 2
    assert EXPECTED["etc/motd"]["layer"] == 3
    assert EXPECTED["usr/bin/ping"]["xattrs"] == {"security.capability": CAPABILITY_V2}
    assert set(REMOVED) >= {"etc/remove-me", "old", "old/a", "data/keep1", "data/sub"}
    assert not set(REMOVED) & set(EXPECTED)
    assert {p for p, e in EXPECTED.items() if p.startswith("data/")} == {"data/new1", "data/new2"}
    assert LAYERS[1]["data"]["opaque"] and LAYERS[1]["old"]["type"] == "whiteout"
    kinds = {e["type"] for e in EXPECTED.values()}
    assert kinds == {"file", "dir", "symlink", "char", "block", "fifo"}


def _xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def _walk(diff: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(diff):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), diff))
    return out


_IFMT = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
         "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


@pytest.fixture(scope="module")
def root_store(rootless_image: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, dict[str, Any]]:
    """(store root, `unpack --json` result) of the image unpacked as root."""
    store = tmp_path_factory.mktemp("root-store") / "store"
    p = subprocess.run([sys.executable, "-m", "ocilayers", "--root", str(store), "unpack",
                        str(rootless_image), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return store, json.loads(p.stdout)


def _check(full: Path, e: dict[str, Any], where: str, *, opaque_xattr: bool) -> None:
    """`full` is what entry `e` describes (see rootless_image's module docstring)."""
    st = os.lstat(full)
    assert stat.S_IFMT(st.st_mode) == _IFMT[e["type"]], where
    assert (st.st_uid, st.st_gid) == (e["uid"], e["gid"]), where
    if e["type"] != "symlink":
        assert stat.S_IMODE(st.st_mode) == e["mode"], where
    if e["rdev"] is not None:
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == e["rdev"], where
    xattrs = _xattrs(full) if e["type"] != "symlink" else {}
    if e["opaque"] and opaque_xattr:
        assert xattrs.pop("trusted.overlay.opaque") == b"y", where
    assert xattrs == e["xattrs"], where
    if e["type"] == "symlink":
        assert os.readlink(full) == e["target"], where
    if e["type"] == "file":
        assert st.st_size == e["size"], where
        assert hashlib.sha256(full.read_bytes()).hexdigest() == e["sha256"], where


def test_root_unpack_keeps_everything(rootless_image: Path,
                                      root_store: tuple[Path, dict[str, Any]]) -> None:
    store, result = root_store
    assert result["tags"] == [REF]
    assert [x["diff_id"] for x in result["layers"]] == image_digests(rootless_image)["diff_ids"]
    for i, (layer, want) in enumerate(zip(result["layers"], LAYERS, strict=True), 1):
        chain = layer["chain_id"].split(":", 1)[1]
        cache_id = (store / "image/overlay2/layerdb/sha256" / chain / "cache-id").read_text()
        assert cache_id == layer["cache_id"]
        diff = store / "overlay2" / cache_id / "diff"
        assert _walk(diff) == set(want), f"layer {i}"
        for path, e in want.items():
            where = f"layer {i}: {path}"
            full = diff / path
            if e["type"] == "whiteout":
                st = os.lstat(full)
                assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, where
                continue
            _check(full, e, where, opaque_xattr=True)
            if e["hardlink"]:
                assert os.path.samestat(os.lstat(full), os.lstat(diff / e["hardlink"])), where
    # The real tools agree: getcap and getfattr read what the description says.
    top1 = store / "overlay2" / result["layers"][0]["cache_id"] / "diff"
    cap = subprocess.run(["getcap", str(top1 / "usr/bin/ping")], capture_output=True, text=True)
    assert "cap_net_raw=ep" in cap.stdout, (cap.stdout, cap.stderr)
    fattr = subprocess.run(["getfattr", "--absolute-names", "-n", TRUSTED_XATTR, "--only-values",
                            str(top1 / "etc/trusted-file")], capture_output=True)
    assert fattr.stdout == b"trusted-value", fattr.stderr


def test_merged_view_is_expected(root_store: tuple[Path, dict[str, Any]],
                                 tmp_path: Path) -> None:
    """The kernel's overlay of the three diff dirs shows exactly EXPECTED (so the description's
    whiteout and opaque handling is right), and none of REMOVED."""
    store, result = root_store
    lowers = ":".join(str(store / "overlay2" / x["cache_id"] / "diff")
                      for x in reversed(result["layers"]))
    mnt = tmp_path / "merged"
    mnt.mkdir()
    m = subprocess.run(["mount", "-t", "overlay", "-o", f"ro,lowerdir={lowers}", "overlay",
                        str(mnt)], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {m.stderr.strip()}")
    try:
        assert _walk(mnt) == set(EXPECTED)
        for path, e in EXPECTED.items():
            _check(mnt / path, e, f"merged: {path}", opaque_xattr=False)
        for path in REMOVED:
            assert not os.path.lexists(mnt / path), path
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
