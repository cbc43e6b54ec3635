"""Containers and commit against the real Docker: a throwaway dockerd 20.10 is the oracle.

One module-scoped daemon has `docker load`ed `fixtures/docker-save.tar` (`committed:latest`,
busybox based; only sh, ls, cat, echo, rm and mkdir are linked, everything else is
`busybox APPLET`). Each test makes its own ocilayers store from the same fixture.

1. The article's scenario end to end: `create`, `mount`, changes through the merged view (the
   one shell script `CHANGES`, run in a chroot of it, and a `user.*` xattr set from the host),
   `umount`, `commit`, `export` as docker-archive and oci-archive; `docker load` + `docker run`
   read every change back, `skopeo copy` takes the oci-archive, and an `unpack` of that copy
   into a fresh store mounts to the container's merged view minus the init layer's paths.
2. The same script in `docker run`, then `docker commit`; `ocilayers commit --upper` of that
   container's upper dir gives docker's layer byte for byte once docker's uname/gname (`root`)
   are blanked.
3. A dockerd started on an ocilayers store that holds containers (one mounted at its default
   path, one at a target outside the store, one not mounted) lists and runs the images; a
   second one `docker rmi`s the base image; the containers still commit and `verify` passes.
4. An empty commit (a container mounted and unmounted, nothing changed) is an `empty_layer`
   history entry with no new DiffID, and dockerd loads and runs it.
5. `ocilayers create` makes the init layer `docker create` makes for the same image.

Needs root, /usr/sbin/dockerd and /usr/bin/docker (Debian's docker.io), skopeo and chroot;
skips with the reason otherwise (CI has them all). Every daemon is stopped by its pid, anything
mounted under the scratch dirs is unmounted, and the dirs are removed, also on failure.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import treecompare as tc
from conftest import FIXTURES, run_module, skopeo
from test_docker_commit import blanked_archive, parse_tar
from throwaway_dockerd import Daemon, DaemonError, mounts_under, unavailable, unmount_all

IMAGE = "committed:latest"
XATTR = ("user.article", b"kept")  # set from the host on srv/data/notes.txt

# The changes, as one script: run in a chroot of the merged view (test 1) and in `docker run`
# (test 2). Write, append, overwrite and delete files; rm -rf a lower dir and make it again;
# a hardlink (also one to a lower file: copy-up), a symlink, a setuid file and a fifo.
CHANGES = """set -e
mkdir -p /srv/data /usr/local/bin
echo 'written in the container' >/srv/data/notes.txt
echo 'article:x:3000:' >>/etc/group
echo 'root:x:0:0:root:/root:/bin/sh' >/etc/passwd
rm /opt/other/three.txt /bin/echo
rm -rf /opt/app && mkdir -p /opt/app/conf.d && echo v2 >/opt/app/app.conf
busybox ln /srv/data/notes.txt /srv/data/notes.hard
busybox ln /usr/share/demo/docker.txt /srv/docker.hard
busybox ln -s notes.txt /srv/data/latest
printf '#!/bin/sh\\necho tool ran\\n' >/usr/local/bin/tool
busybox chmod 4755 /usr/local/bin/tool
busybox mkfifo /srv/data/fifo
"""

# Read back in `docker run` (no `set -e`: each line reports what it sees). echo and test are
# shell builtins, so the deleted /bin/echo does not matter.
CHECK = """
echo "notes=$(cat /srv/data/notes.txt)"
echo "latest=$(cat /srv/data/latest)"
echo "group=$(busybox tail -n 1 /etc/group)"
echo "passwd=$(cat /etc/passwd)"
echo app=$(ls /opt/app)
echo "app.conf=$(cat /opt/app/app.conf)"
echo "other=$(ls -A /opt/other)"
test -e /opt/other/three.txt && echo "three=present" || echo "three=gone"
test -e /bin/echo && echo "bin-echo=present" || echo "bin-echo=gone"
echo "tool-ls=$(busybox ls -ln /usr/local/bin/tool)"
echo "tool-runs=$(/usr/local/bin/tool)"
test -p /srv/data/fifo && echo "fifo=fifo" || echo "fifo=not a fifo"
for f in /srv/data/notes.txt /srv/data/notes.hard /srv/docker.hard /usr/share/demo/docker.txt
do echo "stat $f=$(busybox stat -c '%h %i' $f)"; done
echo "docker.hard=$(cat /srv/docker.hard)"
"""

# dockerd's init layer (FACTS.md): always these, replacing the image's ...
INIT_ALWAYS = (b".dockerenv", b"etc/resolv.conf", b"etc/hosts", b"etc/hostname",
               b"dev/console", b"etc/mtab")
# ... and these dirs only where the image lacks them
INIT_DIRS = (b"dev/pts", b"dev/shm", b"proc", b"sys")


# --- the module daemon ---


@dataclass
class Env:
    base: Path  # scratch dir (short: unix socket paths)
    d: Daemon  # has `committed:latest`


def _skip_reason() -> str | None:
    reason = unavailable()
    if reason:
        return reason
    for tool in ("skopeo", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not (FIXTURES / "docker-save.tar").exists():
        return "fixtures/docker-save.tar is absent (make-fixtures.sh skipped it)"
    return None


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="cd-", dir="/tmp"))
    d = Daemon(base / "a")
    problems: list[str] = []
    try:
        try:
            d.start()
        except (DaemonError, OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot start a throwaway dockerd here: {exc}")
        out = d.docker("load", "-i", str(FIXTURES / "docker-save.tar")).stdout
        assert f"Loaded image: {IMAGE}" in out, out
        yield Env(base, d)
    finally:
        problems += d.stop()
        problems += [f"still mounted: {p}" for p in unmount_all(base)]
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)
    assert not problems, problems


# --- helpers ---


def oci(root: Path, *argv: str) -> str:
    """`ocilayers --root ROOT ARGV`; its stdout (fails the test on a non-zero exit)."""
    proc = run_module(["--root", str(root), *argv])
    if proc.returncode != 0:
        raise AssertionError(f"ocilayers {' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc.stdout


def oci_json(root: Path, *argv: str) -> Any:
    return json.loads(oci(root, *argv, "--json"))


def new_store(root: Path) -> Path:
    oci(root, "-q", "unpack", str(FIXTURES / "docker-save.tar"))
    return root


@contextlib.contextmanager
def cleanup_mounts(*dirs: Path) -> Iterator[None]:
    """Whatever a failing test leaves mounted under `dirs` is unmounted."""
    try:
        yield
    finally:
        unmount_all(*dirs)


def mount_id(root: Path, container: str) -> str:
    (found,) = [c["mount_id"] for c in oci_json(root, "ps") if container in (c["name"], c["id"])]
    return str(found)


def mounted(root: Path, container: str) -> list[str]:
    """Where `ocilayers ps` says the container is mounted."""
    for c in oci_json(root, "ps"):
        if container in (c["name"], c["id"]):
            return [m["target"] for m in c["mounted"]]
    raise AssertionError(f"no container {container} in ps")


def _maybe_gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def docker_archive(path: Path) -> tuple[dict[str, Any], list[bytes]]:
    """(config, uncompressed layer tars, base first) of a docker-archive."""
    with tarfile.open(path) as t:
        def member(name: str) -> bytes:
            f = t.extractfile(name)
            assert f is not None, name
            return f.read()
        (manifest,) = json.loads(member("manifest.json"))
        return (json.loads(member(manifest["Config"])),
                [_maybe_gunzip(member(n)) for n in manifest["Layers"]])


def oci_layout(path: Path) -> tuple[dict[str, Any], list[bytes]]:
    """(config, uncompressed layer tars, base first) of a one-image OCI layout dir."""
    def blob(digest: str) -> bytes:
        algo, hex_ = digest.split(":")
        return (path / "blobs" / algo / hex_).read_bytes()
    index = json.loads((path / "index.json").read_text())
    (desc,) = index["manifests"]
    manifest = json.loads(blob(desc["digest"]))
    return (json.loads(blob(manifest["config"]["digest"])),
            [_maybe_gunzip(blob(layer["digest"])) for layer in manifest["layers"]])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def members(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:") as t:
        return {m.name: m for m in t}


def _entry_name(name: str) -> bytes:
    parts = [p for p in os.fsencode(name).split(b"/") if p not in (b"", b".")]
    return b"/".join(parts) or b"."


def clock_dirs(layers: list[bytes]) -> Callable[[bytes], bool]:
    """A predicate: dirs whose mtime no layer tar sets (the top-most layer holding the dir has
    no entry for it, an implicit parent): each store stamps them with its own unpack time."""
    sets = []
    for layer in layers:
        explicit: set[bytes] = set()
        every: set[bytes] = set()
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:") as t:
            for m in t:
                name = _entry_name(m.name)
                parts = name.split(b"/")
                every.update(b"/".join(parts[:i]) for i in range(1, len(parts)))
                if m.isdir():
                    explicit.add(name)
                    every.add(name)
        sets.append((explicit, every))

    def clock(path: bytes) -> bool:
        for explicit, every in reversed(sets):
            if path in every:
                return path not in explicit
        return True
    return clock


def parse_check(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def docker_rmi_all(d: Daemon, *refs: str) -> None:
    for ref in refs:
        d.docker("rmi", "-f", ref, check=False)


# === 1. the article's scenario end to end ===


def test_article_scenario_end_to_end(env: Env, tmp_path: Path) -> None:
    root = new_store(tmp_path / "store")
    fresh = tmp_path / "fresh"
    with cleanup_mounts(tmp_path):
        cid = oci(root, "create", IMAGE, "--name", "article").strip()
        merged = Path(oci(root, "mount", "article").strip())
        assert merged == root / "overlay2" / mount_id(root, "article") / "merged"
        assert mounted(root, cid) == [str(merged)]
        try:
            proc = subprocess.run(["chroot", str(merged), "/bin/sh", "-c", CHANGES],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 0, proc.stderr
            os.setxattr(merged / "srv/data/notes.txt", XATTR[0], XATTR[1])
            view = tc.snapshot(merged, seconds=True)  # before umount: what the container sees
        finally:
            oci(root, "umount", "article")
        assert mounted(root, cid) == [] and not merged.exists()

        # the changes are in the view (so the comparisons below cover them)
        assert view[b"opt/app/app.conf"].size == 3 and b"opt/app/conf.d" in view
        assert b"opt/other/three.txt" not in view and b"bin/echo" not in view
        assert view[b"usr/local/bin/tool"].mode == 0o4755
        assert view[b"srv/data/fifo"].kind == "fifo"
        assert view[b"srv/data/latest"].target == b"notes.txt"
        assert view[b"srv/data/notes.txt"].links == frozenset({b"srv/data/notes.txt",
                                                               b"srv/data/notes.hard"})
        assert view[b"srv/docker.hard"].links == frozenset({b"srv/docker.hard",
                                                            b"usr/share/demo/docker.txt"})
        assert dict(view[b"srv/data/notes.txt"].xattrs) == {XATTR[0]: XATTR[1]}

        res = oci_json(root, "commit", "article", "article:1", "-m", "the article")
        assert res["empty_layer"] is False and res["tags"] == ["article:1"]
        image_id = res["image_id"]
        proc = run_module(["--root", str(root), "verify"])
        assert proc.returncode == 0, proc.stdout + proc.stderr

        docker_tar, oci_tar = tmp_path / "article.docker.tar", tmp_path / "article.oci.tar"
        oci(root, "-q", "export", "article:1", "-o", str(docker_tar), "--format",
            "docker-archive")
        oci(root, "-q", "export", "article:1", "-o", str(oci_tar), "--format", "oci-archive")

        # the layer tar holds every change, as a layer says it
        config, layers = docker_archive(docker_tar)
        assert config["rootfs"]["diff_ids"][-1] == res["diff_id"] == sha256(layers[-1])
        m = members(layers[-1])
        assert m["srv/data/fifo"].isfifo()
        assert m["usr/local/bin/tool"].mode & 0o7777 == 0o4755
        assert m["srv/data/latest"].issym() and m["srv/data/latest"].linkname == "notes.txt"
        # walk order: notes.hard comes first, so it has the data (and the xattr)
        assert m["srv/data/notes.txt"].islnk()
        assert m["srv/data/notes.txt"].linkname == "srv/data/notes.hard"
        assert m["srv/data/notes.hard"].pax_headers.get(f"SCHILY.xattr.{XATTR[0]}") == "kept"
        assert m["usr/share/demo/docker.txt"].linkname == "srv/docker.hard"
        for whiteout in ("opt/other/.wh.three.txt", "bin/.wh.echo", "opt/app/.wh..wh..opq"):
            assert whiteout in m, whiteout
        assert not any(n.startswith(("dev", "proc", "sys", ".dockerenv")) or n in
                       ("etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab")
                       for n in m), "the init layer leaked into the commit"

        # dockerd loads the docker-archive and runs it: every change reads back
        d = env.d
        try:
            loaded = d.docker("load", "-i", str(docker_tar)).stdout
            assert "Loaded image: article:1" in loaded, loaded
            info = json.loads(d.docker("image", "inspect", "article:1").stdout)[0]
            assert info["Id"] == image_id
            out = parse_check(d.docker("run", "--rm", "--network", "none", "article:1",
                                       "sh", "-c", CHECK).stdout)
            # docker load restores user.* xattrs (FACTS.md); busybox has no getfattr, so
            # look in the layer's diff dir dockerd made
            top = Path(info["GraphDriver"]["Data"]["UpperDir"])
            assert os.getxattr(top / "srv/data/notes.txt", XATTR[0]) == XATTR[1]
        finally:
            docker_rmi_all(d, "article:1")
        stats = {k[5:]: v.split() for k, v in out.items() if k.startswith("stat ")}
        tool_ls = out.pop("tool-ls").split()
        assert tool_ls[0] == "-rwsr-xr-x" and tool_ls[2:4] == ["0", "0"], tool_ls
        assert {k: v for k, v in out.items() if not k.startswith("stat ")} == {
            "notes": "written in the container", "latest": "written in the container",
            "group": "article:x:3000:", "passwd": "root:x:0:0:root:/root:/bin/sh",
            "app": "app.conf conf.d", "app.conf": "v2", "other": "", "three": "gone",
            "bin-echo": "gone", "tool-runs": "tool ran", "fifo": "fifo",
            "docker.hard": "made in docker"}
        assert all(nlink == "2" for nlink, _ino in stats.values()), stats
        assert (stats["/srv/data/notes.txt"][1] == stats["/srv/data/notes.hard"][1]
                != stats["/srv/docker.hard"][1] == stats["/usr/share/demo/docker.txt"][1])

        # skopeo takes the oci-archive; its copy unpacks into a fresh store
        layout = tmp_path / "layout"
        skopeo("copy", f"oci-archive:{oci_tar}", f"oci:{layout}:article")
        assert oci_json(root, "inspect", f"oci:{layout}:article")["image_id"] == image_id
        _, oci_layers = oci_layout(layout)
        assert [sha256(x) for x in oci_layers] == config["rootfs"]["diff_ids"]
        assert oci(fresh, "-q", "unpack", f"oci:{layout}:article",
                   "--tag", "article:1").strip() == image_id
        proc = run_module(["--root", str(fresh), "verify"])
        assert proc.returncode == 0, proc.stdout + proc.stderr

        # ... and its read-only view is the container's merged view minus the init layer
        (tmp_path / "fm").mkdir()
        (tmp_path / "bm").mkdir()
        oci(fresh, "mount", "article:1", str(tmp_path / "fm"))
        oci(root, "mount", IMAGE, str(tmp_path / "bm"))
        try:
            got = tc.snapshot(tmp_path / "fm", seconds=True)
            base = tc.snapshot(tmp_path / "bm", seconds=True)
        finally:
            oci(fresh, "umount", str(tmp_path / "fm"))
            oci(root, "umount", str(tmp_path / "bm"))
    init = set(INIT_ALWAYS) | {p for p in INIT_DIRS if p not in base}
    init |= {b"/".join(p.split(b"/")[:i]) for p in init for i in range(1, p.count(b"/") + 1)
             if b"/".join(p.split(b"/")[:i]) not in base}
    assert b"dev" in init, "the fixture has no /dev: the init layer makes it"
    missing = sorted(p for p in init if p not in view)
    assert not missing, f"the container's view lacks init paths {missing}"
    clock = clock_dirs(layers)
    for p in sorted(init):  # the image's own entries there come back, the init layer's do not
        assert (p in got) == (p in base), p
        if p in base:
            tc.assert_same({p: got[p]}, {p: base[p]}, ignore_dir_mtime=clock)
    tc.assert_same({p: e for p, e in view.items() if p not in init},
                   {p: e for p, e in got.items() if p not in init},
                   names=("container", "unpacked export"), ignore_dir_mtime=clock)


# === 2. the same layer as docker commit ===


def test_commit_upper_is_docker_commits_layer(env: Env, tmp_path: Path) -> None:
    d = env.d
    d.docker("run", "--name", "same-changes", "--network", "none", IMAGE, "sh", "-c", CHANGES)
    try:
        info = json.loads(d.docker("inspect", "same-changes").stdout)[0]
        assert info["State"]["ExitCode"] == 0, info["State"]
        upper = Path(info["GraphDriver"]["Data"]["UpperDir"])
        assert upper.is_dir(), upper
        os.setxattr(upper / "srv/data/notes.txt", XATTR[0], XATTR[1])  # both drop user.*
        d.docker("commit", "same-changes", "same:docker")
        saved = tmp_path / "saved.tar"
        d.docker("save", "-o", str(saved), "same:docker")
        root = new_store(tmp_path / "store")
        res = oci_json(root, "commit", "same:ours", "--upper", str(upper), "--from", IMAGE,
                       "--xattrs", "docker", "--opaque", "docker")
    finally:
        d.docker("rm", "-f", "same-changes", check=False)
        docker_rmi_all(d, "same:docker")
    docker_config, docker_layers = docker_archive(saved)
    theirs = docker_layers[-1]
    assert docker_config["rootfs"]["diff_ids"][-1] == sha256(theirs)  # the oracle is sane
    out = tmp_path / "ours"
    oci(root, "-q", "export", "same:ours", "-o", str(out), "--format", "oci",
        "--compression", "none")
    config, layers = oci_layout(out)
    ours = layers[-1]
    assert config["rootfs"]["diff_ids"] == [*docker_config["rootfs"]["diff_ids"][:-1],
                                            res["diff_id"]]
    assert sha256(ours) == res["diff_id"]
    # the scenario reached its cases: opaque dir, whiteouts, links, fifo, setuid
    names = {e.name: e for e in parse_tar(ours).entries}
    for name in (b"opt/app/.wh..wh..opq", b"opt/other/.wh.three.txt", b"bin/.wh.echo",
                 b"srv/data/fifo", b"usr/local/bin/tool"):
        assert name in names, name
    assert names[b"srv/data/notes.txt"].typeflag == b"1"
    assert names[b"usr/share/demo/docker.txt"].typeflag == b"1"
    assert not names[b"srv/data/notes.hard"].pax, "user.* is dropped with --xattrs docker"
    blanked = blanked_archive(parse_tar(theirs))
    assert blanked == ours, "docker commit's layer (uname/gname blanked) != ocilayers commit's"
    assert sha256(blanked) == res["diff_id"]
    proc = run_module(["--root", str(root), "verify"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# === 3. dockerd on a store with containers ===


def _stop(daemon: Daemon) -> None:
    """SIGTERM dockerd and wait, leaving what it leaves (the helper's stop() then cleans)."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(30)


def test_dockerd_on_a_store_with_containers(env: Env, tmp_path: Path) -> None:
    store = new_store(env.base / "s3")  # the daemons' data root: short paths
    outside = tmp_path / "outside"
    outside.mkdir()
    b = Daemon(env.base / "b", store)
    problems: list[str] = []
    with cleanup_mounts(tmp_path, store):
        # c1 mounted at its default path (under the store), c2 at a target outside the store,
        # c3 not mounted; c1 and c2 hold a change made through the view
        for name in ("c1", "c2", "c3"):
            oci(store, "create", IMAGE, "--name", name)
        m1 = Path(oci(store, "mount", "c1").strip())
        oci(store, "mount", "c2", str(outside))
        (m1 / "c1.txt").write_text("c1\n")
        (outside / "c2.txt").write_text("c2\n")
        info = oci_json(store, "inspect", IMAGE)
        image_id = info["image_id"]
        chains = [x["chain_id"] for x in info["layers"]]
        try:
            b.start()
            listed = b.docker("images", "--no-trunc", "--format",
                              "{{.Repository}}:{{.Tag}} {{.ID}}").stdout.split("\n")
            assert f"{IMAGE} {image_id}" in listed, listed
            out = b.docker("run", "--rm", "--network", "none", IMAGE, "cat",
                           "/etc/group").stdout
            assert out == "root:x:0:\ndemo:x:1000:\ndocker:x:2000:\n", out
            assert b.docker("ps", "-aq").stdout == "", "dockerd sees no containers of ours"
            # the view outside the store is untouched by the daemon
            (outside / "during.txt").write_text("while dockerd ran\n")
            # (c1's, under the data root, is hidden by dockerd's bind mount of a data root
            # that is no mount point over itself; where it is one, c1 stays visible)
            print("c1's view while dockerd runs:",
                  "visible" if (m1 / "c1.txt").exists() else "hidden")
            _stop(b)
        finally:
            problems += b.stop()
        # (a dockerd that can see c1's view unmounts it when it stops, as it does every
        # `overlay2/<id>/merged` mount under its root; the helper's stop() unmounts everything
        # under the data root anyway)
        assert mounted(store, "c1") == [], "c1's view is gone: its record is stale"
        assert mounted(store, "c2") == [str(outside)]
        assert (outside / "c2.txt").read_text() == "c2\n"
        assert (outside / "during.txt").exists()
        diff2 = store / "overlay2" / mount_id(store, "c2") / "diff"
        assert sorted(os.listdir(diff2)) == ["c2.txt", "during.txt"]
        m1 = Path(oci(store, "mount", "c1").strip())  # mounts again, nothing lost
        assert (m1 / "c1.txt").read_text() == "c1\n"
        oci(store, "umount", "c1")

        # a dockerd on the store removes the base image: its config goes, the layers stay
        c = Daemon(env.base / "c", store)
        try:
            c.start()
            out = c.docker("rmi", IMAGE).stdout
            assert f"Deleted: {image_id}" in out, out
            assert c.docker("images", "-aq").stdout == ""
        finally:
            problems += c.stop()
        assert IMAGE not in oci(store, "images")
        assert not (store / "image/overlay2/imagedb/content" / image_id.replace(":", "/")
                    ).exists()
        layerdb = store / "image/overlay2/layerdb"
        assert all((layerdb / ch.replace(":", "/")).is_dir() for ch in chains)

        # the containers still commit (c2 while mounted), and the store verifies
        r1 = oci_json(store, "commit", "c1", "after:c1")
        r2 = oci_json(store, "commit", "c2", "after:c2")
        r3 = oci_json(store, "commit", "c3", "after:c3")
        assert not r1["empty_layer"] and not r2["empty_layer"] and r3["empty_layer"]
        for tag in ("after:c1", "after:c2", "after:c3"):
            got = oci_json(store, "inspect", tag)
            assert [x["chain_id"] for x in got["layers"]][:len(chains)] == chains
            assert got["history"][:-1] == info["history"], "the base's config, kept by c*"
        oci(store, "umount", "c2")
        proc = run_module(["--root", str(store), "verify"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # and dockerd runs what was committed after the rmi
        export = tmp_path / "after.tar"
        oci(store, "-q", "export", "after:c2", "-o", str(export), "--format", "docker-archive")
        try:
            env.d.docker("load", "-i", str(export))
            out = env.d.docker("run", "--rm", "--network", "none", "after:c2", "cat",
                               "/c2.txt", "/during.txt").stdout
            assert out == "c2\nwhile dockerd ran\n", out
        finally:
            docker_rmi_all(env.d, "after:c2")
        oci(store, "rm", "c1", "c2", "c3")
        assert oci_json(store, "ps") == [] and not os.listdir(layerdb / "mounts")
        proc = run_module(["--root", str(store), "verify"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not problems, problems


# === 4. an empty commit ===


def test_empty_commit_is_an_empty_layer_entry(env: Env, tmp_path: Path) -> None:
    root = new_store(tmp_path / "store")
    base = oci_json(root, "inspect", IMAGE)
    with cleanup_mounts(tmp_path):
        oci(root, "create", IMAGE, "--name", "idle")
        merged = Path(oci(root, "mount", "idle").strip())
        assert (merged / "etc/group").exists()
        oci(root, "umount", "idle")  # a mount alone changes nothing
    res = oci_json(root, "commit", "idle", "empty:1", "-m", "nothing changed")
    assert res["empty_layer"] is True and res["diff_id"] is None and res["size"] == 0
    got = oci_json(root, "inspect", "empty:1")
    assert got["layers"] == base["layers"]
    assert got["config"]["rootfs"] == base["config"]["rootfs"]
    assert len(got["history"]) == len(base["history"]) + 1
    assert got["history"][-1]["empty_layer"] is True
    assert got["history"][-1]["comment"] == "nothing changed"
    export = tmp_path / "empty.tar"
    oci(root, "-q", "export", "empty:1", "-o", str(export), "--format", "docker-archive")
    d = env.d
    try:
        assert "Loaded image: empty:1" in d.docker("load", "-i", str(export)).stdout
        info = json.loads(d.docker("image", "inspect", "empty:1").stdout)[0]
        assert info["Id"] == res["image_id"]
        assert info["RootFS"]["Layers"] == base["config"]["rootfs"]["diff_ids"]
        out = d.docker("run", "--rm", "--network", "none", "empty:1", "cat",
                       "/etc/group").stdout
        assert out == "root:x:0:\ndemo:x:1000:\ndocker:x:2000:\n", out
        history = json.loads(d.docker("history", "--no-trunc", "--format", "{{json .}}",
                                      "empty:1").stdout.splitlines()[0])
        assert history["Comment"] == "nothing changed" and history["Size"] == "0B", history
    finally:
        docker_rmi_all(d, "empty:1")


# === 5. the init layer is dockerd's ===


def test_init_layer_is_dockerds(env: Env, tmp_path: Path) -> None:
    """`ocilayers create` and `docker create` on the same image make the same init layer:
    entries, types, modes, owners, link targets and xattrs (mtimes are each one's clock; the
    kernel's copy-up bookkeeping on dockerd's side is not content). Two images: the fixture,
    and one whose /etc has a `user.*` xattr (dockerd's copy-up of /etc into the init layer
    takes it along)."""
    root = new_store(tmp_path / "store")
    oci(root, "create", IMAGE, "--name", "setfattr")
    with cleanup_mounts(tmp_path):
        merged = Path(oci(root, "mount", "setfattr").strip())
        try:
            os.setxattr(merged / "etc", "user.etc-note", b"from the image")
        finally:
            oci(root, "umount", "setfattr")
    oci(root, "commit", "setfattr", "etc-xattr:1")
    oci(root, "rm", "setfattr")
    archive = tmp_path / "etc-xattr.tar"
    oci(root, "-q", "export", "etc-xattr:1", "-o", str(archive), "--format", "docker-archive")
    d = env.d
    try:
        d.docker("load", "-i", str(archive))
        for image in (IMAGE, "etc-xattr:1"):
            d.docker("create", "--name", "init-layer", "--network", "none", image)
            try:
                info = json.loads(d.docker("inspect", "init-layer").stdout)[0]
                upper = Path(info["GraphDriver"]["Data"]["UpperDir"])
                theirs = tc.snapshot(upper.parent.with_name(upper.parent.name + "-init")
                                     / "diff", mtimes=False, overlay_xattrs="unescape")
            finally:
                d.docker("rm", "-f", "init-layer", check=False)
            cid = oci(root, "create", image).strip()
            ours = tc.snapshot(root / "overlay2" / f"{mount_id(root, cid)}-init" / "diff",
                               mtimes=False, overlay_xattrs="unescape")
            assert set(INIT_ALWAYS) <= set(theirs)
            if image != IMAGE:
                assert dict(theirs[b"etc"].xattrs) == {"user.etc-note": b"from the image"}
            tc.assert_same(ours, theirs, names=("ocilayers", "dockerd"), msg=image)
    finally:
        docker_rmi_all(d, "etc-xattr:1")
