"""The rootless records (overrides), the user-namespace plan (userns) and the rootless runtime
spec (bundle.rootless_spec): their formats and rules, without switching users (that is
test_rootless.py)."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
from pathlib import Path

import pytest
import tarbuilder as tb

from ocilayers import userns
from ocilayers.bundle import RunOptions, rootless_spec, runtime_spec
from ocilayers.differ import write_layer
from ocilayers.errors import ImageError, RootlessError
from ocilayers.extract import apply_layer
from ocilayers.overrides import (
    OVERRIDE_XATTR,
    Override,
    SideRecord,
    cap_to_v2,
    complete_layer,
    record_name,
    restore,
)
from ocilayers.tarstream import BLK, CHR, REG, SYM, TarEntry
from ocilayers.verify import compare_tree
from ocilayers.whiteout import OverlayFormat

CAP_V2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep


def test_override_round_trip() -> None:
    for ov, text in [(Override(1000, 1000, 0o4755, "file"), b"1000:1000:4755:file"),
                     (Override(0, 6, 0o660, "block", 8, 0), b"0:6:0660:block-8-0"),
                     (Override(5, 5, 0o777, "symlink"), b"5:5:0777:symlink"),
                     (Override(1, 2, 0o644), b"1:2:0644")]:
        assert ov.encode() == text
        assert Override.decode(text) == ov


@pytest.mark.parametrize("bad", [b"", b"1:2", b"a:b:0644", b"1:2:0999", b"1:2:0644:tape",
                                 b"1:2:0644:char-x-1", b"-1:0:0644", b"1:2:3:4:5"])
def test_override_decode_refuses_garbage(bad: bytes) -> None:
    with pytest.raises(ImageError, match=r"bad user\.containers\.override_stat"):
        Override.decode(bad, "x")


def test_cap_v3_becomes_v2() -> None:
    v3 = struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, 200000)
    assert cap_to_v2(v3) == CAP_V2
    assert cap_to_v2(CAP_V2) == CAP_V2
    assert cap_to_v2(b"junk") == b"junk"


def test_restore_gives_back_what_was_recorded() -> None:
    e = TarEntry(name=b"dev/null", type=REG, mode=0o666, size=0, xattrs={
        OVERRIDE_XATTR: b"0:0:0666:char-1-3", record_name("trusted.t"): b"1",
        "user.k": b"v"})
    assert restore(e) is True
    assert (e.type, e.devmajor, e.devminor, e.mode) == (CHR, 1, 3, 0o666)
    assert e.xattrs == {"trusted.t": b"1", "user.k": b"v"}
    side = SideRecord()
    side.set_stat(b"usr/bin/games", Override(5, 5, 0o777, "symlink"))
    side.set_xattr(b"usr/bin/games", "trusted.x", b"\x00\xff")
    link = TarEntry(name=b"usr/bin/games", type=SYM, linkname=b"x", uid=0, gid=0)
    assert restore(link, side) is False
    assert (link.uid, link.gid, link.xattrs) == (5, 5, {"trusted.x": b"\x00\xff"})
    cap = TarEntry(name=b"ping", type=REG, xattrs={
        "security.capability": struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, 7)})
    restore(cap)
    assert cap.xattrs == {"security.capability": CAP_V2}


def test_side_record_drop_and_dump(tmp_path: Path) -> None:
    side = SideRecord()
    side.set_stat(b"a/b", Override(1, 1, 0o644, "pipe"))
    side.set_stat(b"a/b/c", Override(1, 1, 0o644, "pipe"))
    side.set_stat(b"ab", Override(1, 1, 0o644, "pipe"))
    side.drop(b"a/b")
    assert list(side.entries) == ["ab"]
    side.save(str(tmp_path))
    assert SideRecord.load(str(tmp_path)) == side
    (tmp_path / "override_stat.json").write_text("[]")
    with pytest.raises(ImageError, match="not a version 1 side record"):
        SideRecord.load(str(tmp_path))


def test_complete_layer_only_where_a_record_is(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    os.symlink("f", tmp_path / "d" / "l")
    assert complete_layer(os.open(tmp_path, os.O_RDONLY)) is False
    assert OVERRIDE_XATTR not in os.listxattr(tmp_path / "d")
    os.setxattr(tmp_path / "d" / "f", OVERRIDE_XATTR, b"7:7:0600:file")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert complete_layer(fd) is True
    finally:
        os.close(fd)
    st = os.lstat(tmp_path / "d")
    assert os.getxattr(tmp_path / "d", OVERRIDE_XATTR) == \
        f"{st.st_uid}:{st.st_gid}:{st.st_mode & 0o7777:04o}:dir".encode()
    assert os.getxattr(tmp_path / "d" / "f", OVERRIDE_XATTR) == b"7:7:0600:file"
    assert os.getxattr(tmp_path, OVERRIDE_XATTR).startswith(b"0:0:")


def test_records_round_trip_through_a_diff_dir(tmp_path: Path) -> None:
    """A layer applied with records (as root: the records are forced by a rootless format
    on entries root could make, so only devices and unsettable xattrs are recorded here),
    then written back by the differ, gives the same entries; verify sees no change."""
    if os.geteuid() != 0:
        pytest.skip("needs root to apply a layer with foreign owners")
    layer = tb.build([tb.dir("d", uid=1000, gid=1000, mode=0o2755),
                      tb.file("d/f", b"data", uid=1000, gid=1000, mode=0o4755,
                              xattrs={"security.capability": CAP_V2}),
                      tb.symlink("d/l", "f", uid=5, gid=5),
                      tb.file("d/u", b"", xattrs={OVERRIDE_XATTR: b"9:9:0777"})], "pax")
    diff = tmp_path / "diff"
    diff.mkdir()
    fmt = OverlayFormat("user", rootless=True)
    stats = apply_layer(io.BytesIO(layer), diff, fmt=fmt)
    assert os.getxattr(diff / "d" / "u", record_name(OVERRIDE_XATTR)) == b"9:9:0777"
    assert compare_tree(io.BytesIO(layer), str(diff), records=True, side=stats.side) == []
    out = io.BytesIO()
    write_layer(diff, out, fmt=fmt, side=stats.side)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        members = {m.name: m for m in tf}
    got = {name: (m.type, m.uid, m.gid, stat.S_IMODE(m.mode),
                  m.pax_headers.get("SCHILY.xattr.security.capability"))
           for name, m in members.items()}
    assert got["d"][1:4] == (1000, 1000, 0o2755)
    assert got["d/f"][1:5] == (1000, 1000, 0o4755, CAP_V2.decode("latin-1"))
    assert got["d/l"][1:3] == (5, 5)
    assert members["d/u"].pax_headers["SCHILY.xattr." + OVERRIDE_XATTR] == "9:9:0777"


def test_plan_reads_the_users_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    uid, gid = os.getuid(), os.getgid()
    subuid.write_text(f"other:1:2\n{uid}:300000:65536\n")
    subgid.write_text(f"{uid}:400000:1000\n")
    monkeypatch.setattr(userns, "SUBUID", str(subuid))
    monkeypatch.setattr(userns, "SUBGID", str(subgid))
    monkeypatch.delenv("OCILAYERS_USERNS", raising=False)
    p = userns.plan()
    assert p.kind == "subid"
    assert p.uid_map == (userns.IdMap(0, uid, 1), userns.IdMap(1, 300000, 65536))
    assert p.gid_map == (userns.IdMap(0, gid, 1), userns.IdMap(1, 400000, 1000))
    assert userns.plan(force="single").uid_map == (userns.IdMap(0, uid, 1),)
    subgid.write_text("")
    with pytest.raises(RootlessError, match=r"only one of /.*subuid and /.*subgid"):
        userns.plan()
    subuid.write_text("")
    assert userns.plan().kind == "single"
    with pytest.raises(RootlessError, match=r"no subordinate IDs.*usermod --add-subuids"):
        userns.plan(force="subid")
    monkeypatch.setenv("OCILAYERS_USERNS", "both")
    with pytest.raises(RootlessError, match="use subid or single"):
        userns.plan()


def test_rootless_spec_follows_umoci(tmp_path: Path) -> None:
    config = {"config": {"Cmd": ["/bin/sh"]}}
    spec = runtime_spec(config, "c" * 64, str(tmp_path), RunOptions())
    out = rootless_spec(spec, [(0, 0, 1), (1, 1, 65536)], [(0, 0, 1)])
    linux = out["linux"]
    assert {"type": "user"} in linux["namespaces"]
    assert {"type": "network"} not in linux["namespaces"]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 0, "size": 1},
                                    {"containerID": 1, "hostID": 1, "size": 65536}]
    assert "resources" not in linux
    sys_mount = next(m for m in out["mounts"] if m["destination"] == "/sys")
    assert sys_mount["type"] == "none" and "rbind" in sys_mount["options"]
    assert "ro" in sys_mount["options"]
    assert not any(o.startswith(("uid=", "gid=")) for m in out["mounts"]
                   for o in m.get("options", []))
    assert spec["linux"]["namespaces"] != linux["namespaces"]  # the input is not changed
    with_net = rootless_spec(spec, [(0, 0, 1)], [(0, 0, 1)], network_namespace=True)
    assert {"type": "network"} in with_net["linux"]["namespaces"]


def test_block_device_placeholder_restores(tmp_path: Path) -> None:
    e = TarEntry(name=b"dev/sda", type=REG, xattrs={OVERRIDE_XATTR: b"0:6:0660:block-8-0"})
    assert restore(e) and (e.type, e.devmajor, e.devminor, e.gid) == (BLK, 8, 0, 6)


def test_unshare_errors_say_what_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    msg = str(userns._unshare_error(errno.ENOSPC))
    assert "cannot make a user namespace" in msg and "max_user_namespaces" in msg
    einval = str(userns._unshare_error(errno.EINVAL))
    assert einval == "cannot make a user namespace: Invalid argument"
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(RootlessError, match="apt-get install uidmap"):
        userns._map_tools(userns.Plan("subid", (), ()))
