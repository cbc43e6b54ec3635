"""`ocilayers append`: a build step with no store, read back by other tools.

Bases: `fixtures/docker-save.tar` (dockerd's own `docker save`, a Docker schema 2 image whose
config has the Docker host fields `container`, `container_config`, `docker_version`) and OCI
layouts made here with write_oci (no host fields). What is checked:

- the output passes `skopeo copy`, `umoci unpack`, `docker load` + `docker run` (a throwaway
  dockerd) and `ocilayers unpack` + `verify`; the new layers are what was given (flattened);
- the base's layer blobs keep their digests, and from a layout on the same file system the
  output's blob files are hardlinks (or reflinks: same bytes) of the base's;
- the same inputs and --source-date-epoch give the same bytes (run several times: a --diff
  is packed through a pipe, whose reads come in any sizes);
- `--compression zstd` on a Docker base fails, naming --manifest oci, and works with it (the
  base's layers then get their OCI media types, which umoci insists on);
- `-c` alone adds an empty_layer history entry and no layer; the manifest names its base
  (org.opencontainers.image.base.name / .base.digest); `-o -` writes to stdout;
- `--layer` takes gzip, zstd and plain tars (same DiffID, same blob); `--dir` with `--lower`
  turns overlay whiteouts and opaque dirs into the layer's;
- `pack --base` of two trees + `append --layer` gives the image ID that create + copy-in +
  commit gives for the same change (same --source-date-epoch, --created-by, -m), for a base
  without Docker's host fields; with them, the configs differ in exactly those fields
  (commit drops them, append keeps the base's config as it is).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
from conftest import FIXTURES, assert_one_line_error, requires_tool, run_module, skopeo
from test_run import throwaway_daemon
from test_store import MTIME, write_oci
from throwaway_dockerd import Daemon, unmount_all

DOCKER_SAVE = FIXTURES / "docker-save.tar"
SDE = "1700000000"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_TYPES = {"application/vnd.oci.image.layer.v1.tar",
             "application/vnd.oci.image.layer.v1.tar+gzip",
             "application/vnd.oci.image.layer.v1.tar+zstd"}
HOST_FIELDS = ("container", "container_config", "docker_version")


# --- reading an output with json/tarfile only ---


class Out:
    """An image written by append: an OCI layout dir, an oci-archive or a docker-archive
    (ocilayers' docker-archive is an OCI layout with manifest.json beside)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_dir():
            self.files = {str(p.relative_to(path)): p.read_bytes()
                          for p in path.rglob("*") if p.is_file()}
        else:
            with tarfile.open(path) as t:
                self.files = {}
                for m in t.getmembers():
                    f = t.extractfile(m) if m.isfile() else None
                    if f is not None:
                        self.files[m.name] = f.read()

    def blob(self, digest: str) -> bytes:
        return self.files["blobs/" + digest.replace(":", "/")]

    @property
    def index(self) -> dict[str, Any]:
        return dict(json.loads(self.files["index.json"]))

    @property
    def manifest_digest(self) -> str:
        return str(self.index["manifests"][0]["digest"])

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(json.loads(self.blob(self.manifest_digest)))

    @property
    def config_raw(self) -> bytes:
        return self.blob(self.manifest["config"]["digest"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(json.loads(self.config_raw))

    def layer_tar(self, i: int) -> bytes:
        blob = self.blob(self.manifest["layers"][i]["digest"])
        return plain(blob)


def plain(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as r:
            return r.read()
    return blob


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entries(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as t:
        return {m.name.rstrip("/").removeprefix("./"): m for m in t.getmembers()}


def docker_save_layers() -> tuple[dict[str, Any], list[str]]:
    """The fixture's config and its layer digests (docker save: plain tars, digest = DiffID)."""
    with tarfile.open(DOCKER_SAVE) as t:
        def member(name: str) -> bytes:
            f = t.extractfile(name)
            assert f is not None
            return f.read()
        (m,) = json.loads(member("manifest.json"))
        return json.loads(member(m["Config"])), [sha256(member(x)) for x in m["Layers"]]


# --- running it ---


def append(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = run_module(["append", *argv])
    if check and proc.returncode != 0:
        raise AssertionError(f"append {' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stderr}")
    return proc


def append_json(*argv: str) -> dict[str, Any]:
    return dict(json.loads(append(*argv, "--json").stdout))


def oci(root: Path, *argv: str) -> str:
    proc = run_module(["--root", str(root), *argv])
    assert proc.returncode == 0, f"ocilayers {' '.join(argv)}: {proc.stderr}"
    return proc.stdout


# --- inputs ---


def write_tree(root: Path, files: dict[str, bytes | None], mtime: int = MTIME) -> Path:
    """Files (bytes) and dirs (None) under `root`, every mtime `mtime`."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            p.mkdir(exist_ok=True)
        else:
            p.write_bytes(data)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))
    return root


def step_tar(files: dict[str, bytes]) -> bytes:
    return tb.build([tb.file(name, data) for name, data in files.items()])


BASE_FILES = {"etc/passwd": b"root:x:0:0::/:/bin/sh\n", "etc/group": b"root:x:0:\n",
              "opt/x/old": b"old\n", "keep/a": b"a\n"}


@pytest.fixture(scope="module")
def oci_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer OCI layout, ref `latest`, no Docker host fields in its config."""
    d = tmp_path_factory.mktemp("oci-base") / "base"
    members = [tb.dir("etc"), tb.dir("opt"), tb.dir("opt/x"), tb.dir("keep"),
               *(tb.file(n, data) for n, data in BASE_FILES.items())]
    write_oci(d, [tb.build(members)])
    return d


@pytest.fixture
def step_files(tmp_path: Path) -> dict[str, Path]:
    """A layer tar as gzip, zstd and plain, and a tree pair for --diff."""
    import zstandard

    tar = step_tar({"srv/step.txt": b"from a layer tar\n"})
    out = {"plain": tmp_path / "step.tar", "gzip": tmp_path / "step.tar.gz",
           "zstd": tmp_path / "step.tar.zst"}
    out["plain"].write_bytes(tar)
    out["gzip"].write_bytes(gzip.compress(tar, mtime=0))
    out["zstd"].write_bytes(zstandard.ZstdCompressor().compress(tar))
    old = write_tree(tmp_path / "old", {"etc/motd": b"hi\n"})
    new = write_tree(tmp_path / "new", {
        "etc/motd": b"hi\n", "srv/diff.txt": b"from a diff\n",
        # a few MB in files of many sizes: enough for the pipe's reads to come short
        **{f"srv/many/f{i:03d}": os.urandom(1000 + 4099 * i) for i in range(60)}})
    out["old"], out["new"] = old, new
    return out


# --- other tools read it ---


def test_docker_base_read_by_skopeo_umoci_and_ocilayers(tmp_path: Path,
                                                        step_files: dict[str, Path]) -> None:
    requires_tool("skopeo")
    _base_config, base_digests = docker_save_layers()
    out = tmp_path / "out.tar"
    res = append_json(str(DOCKER_SAVE), "-o", str(out), "--layer", str(step_files["gzip"]),
                      "--diff", str(step_files["new"]), "--base", str(step_files["old"]),
                      "-c", "ENV STEP=1", "--tag", "app:1", "--source-date-epoch", SDE)
    img = Out(out)
    assert img.manifest["mediaType"] == DOCKER_MANIFEST  # the base's family
    digests = [d["digest"] for d in img.manifest["layers"]]
    assert digests[:len(base_digests)] == base_digests  # copied, not recompressed
    assert len(digests) == len(base_digests) + 2
    assert res["config_digest"] == sha256(img.config_raw)
    config = img.config
    assert "STEP=1" in config["config"]["Env"]
    assert [h["created_by"] for h in config["history"][-2:]] == [
        "ocilayers append --layer step.tar.gz", "ocilayers append --diff new --base old"]
    assert config["rootfs"]["diff_ids"][-2:] == [sha256(img.layer_tar(-2)),
                                                 sha256(img.layer_tar(-1))]
    assert set(entries(img.layer_tar(-2))) == {"srv/step.txt"}

    skopeo("copy", f"oci-archive:{out}", f"oci:{tmp_path / 'copied'}:app")
    root = tmp_path / "root"
    unpacked = json.loads(oci(root, "unpack", str(out), "--json"))
    assert unpacked["image_id"] == res["config_digest"]
    assert oci(root, "verify") == "ok\n"
    oci(root, "flatten", "app:1", str(tmp_path / "flat"))
    flat = tmp_path / "flat"
    assert (flat / "srv" / "step.txt").read_bytes() == b"from a layer tar\n"
    assert (flat / "srv" / "diff.txt").read_bytes() == b"from a diff\n"
    assert len(list((flat / "srv" / "many").iterdir())) == 60
    assert (flat / "bin" / "busybox").is_file()  # the base is under it


@pytest.mark.parametrize("base", ["docker-manifest-oci", "oci"])
def test_umoci_unpacks_it(tmp_path: Path, oci_base: Path, base: str,
                          step_files: dict[str, Path]) -> None:
    umoci = requires_tool("umoci")
    if os.geteuid() != 0:
        pytest.skip("umoci unpack without --rootless needs root")
    out = tmp_path / "out"
    src, extra = ((str(DOCKER_SAVE), ["--manifest", "oci"]) if base != "oci"
                  else (str(oci_base), []))
    append(src, "-o", str(out), "--format", "oci", "--tag", "app:1", *extra,
           "--layer", str(step_files["plain"]))
    img = Out(out)
    assert img.manifest["mediaType"] == OCI_MANIFEST
    # a Docker base's layers get their OCI names: umoci refuses any other media type
    assert {d["mediaType"] for d in img.manifest["layers"]} <= OCI_TYPES
    proc = subprocess.run([umoci, "unpack", "--image", f"{out}:1", str(tmp_path / "bundle")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / "srv" / "step.txt").read_bytes() == b"from a layer tar\n"
    assert (rootfs / "etc" / "passwd").is_file()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with throwaway_daemon("ap-") as d:
        yield d


def test_docker_loads_and_runs_a_docker_archive(tmp_path: Path, daemon: Daemon,
                                                step_files: dict[str, Path]) -> None:
    out = tmp_path / "out.tar"
    res = append_json(str(DOCKER_SAVE), "-o", str(out), "--format", "docker-archive",
                      "--tag", "appended:1", "--layer", str(step_files["plain"]),
                      "--diff", str(step_files["new"]), "--base", str(step_files["old"]),
                      "-c", 'CMD ["cat", "/srv/step.txt", "/srv/diff.txt"]')
    loaded = daemon.docker("load", "-i", str(out)).stdout
    assert "appended:1" in loaded, loaded
    image_id = daemon.docker("image", "inspect", "-f", "{{.Id}}", "appended:1").stdout.strip()
    assert image_id == res["config_digest"]
    run = daemon.docker("run", "--rm", "--network", "none", "appended:1")
    assert run.stdout == "from a layer tar\nfrom a diff\n"


# --- the base's blobs ---


def reflink_or_hardlink(a: Path, b: Path) -> str:
    """How `b` shares `a`'s bytes: "hardlink" (same inode), "reflink"/"copy" (same bytes;
    FICLONE cannot be told from a copy by stat), or raises."""
    if os.path.samefile(a, b):
        return "hardlink"
    assert a.read_bytes() == b.read_bytes(), (a, b)
    return "reflink or copy"


def _ficlone_works(d: Path) -> bool:
    import fcntl

    (d / "probe-a").write_bytes(b"x" * 4096)
    try:
        with open(d / "probe-a", "rb") as src, open(d / "probe-b", "wb") as dst:
            fcntl.ioctl(dst.fileno(), 0x40049409, src.fileno())
        return True
    except OSError:
        return False
    finally:
        for n in ("probe-a", "probe-b"):
            (d / n).unlink(missing_ok=True)


def test_base_blobs_are_linked_not_copied(tmp_path: Path, oci_base: Path,
                                          step_files: dict[str, Path]) -> None:
    base = tmp_path / "base"
    shutil.copytree(oci_base, base)  # same file system as the output
    out = tmp_path / "out"
    append(str(base), "-o", str(out), "--format", "oci", "--layer", str(step_files["gzip"]))
    manifest = Out(out).manifest
    base_layers = Out(base).manifest["layers"]
    assert manifest["layers"][:len(base_layers)] == base_layers
    for d in base_layers:
        rel = Path("blobs") / d["digest"].replace(":", "/")
        how = reflink_or_hardlink(base / rel, out / rel)
        if not _ficlone_works(tmp_path):
            assert how == "hardlink"
        assert sha256((out / rel).read_bytes()) == d["digest"]


# --- determinism ---


def test_same_inputs_same_bytes(tmp_path: Path, step_files: dict[str, Path]) -> None:
    def once(n: int) -> bytes:
        out = tmp_path / f"out{n}.tar"
        append(str(DOCKER_SAVE), "-o", str(out), "--layer", str(step_files["plain"]),
               "--diff", str(step_files["new"]), "--base", str(step_files["old"]),
               "-c", "LABEL a=b", "-m", "msg", "--tag", "app:1", "--source-date-epoch", SDE)
        return out.read_bytes()

    first = once(0)
    # the --diff layer comes through a pipe: short reads in any sizes must not change the
    # compressed bytes (they did, before the builder fed the compressor whole chunks)
    for n in range(1, 5):
        assert once(n) == first, f"run {n} differs"
    created = Out(tmp_path / "out0.tar").config["history"][-1]["created"]
    assert created == "2023-11-14T22:13:20Z"


def test_stdout_is_the_same_archive(tmp_path: Path, step_files: dict[str, Path]) -> None:
    args = [str(DOCKER_SAVE), "--layer", str(step_files["plain"]), "--source-date-epoch", SDE]
    append(*args, "-o", str(tmp_path / "file.tar"))
    proc = subprocess.run([sys.executable, "-m", "ocilayers", "append", *args, "-o", "-"],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (tmp_path / "file.tar").read_bytes()


# --- compression and manifest families ---


def test_zstd_on_a_docker_base_needs_manifest_oci(tmp_path: Path,
                                                  step_files: dict[str, Path]) -> None:
    out = tmp_path / "out.tar"
    r = append(str(DOCKER_SAVE), "-o", str(out), "--layer", str(step_files["plain"]),
               "--compression", "zstd", check=False)
    assert_one_line_error(r.returncode, r.stderr, "zstd", "--manifest oci")
    assert not out.exists()

    append(str(DOCKER_SAVE), "-o", str(out), "--layer", str(step_files["plain"]),
           "--compression", "zstd", "--manifest", "oci", "--tag", "z:1")
    img = Out(out)
    assert img.manifest["mediaType"] == OCI_MANIFEST
    types = [d["mediaType"] for d in img.manifest["layers"]]
    assert types[-1] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert set(types[:-1]) == {"application/vnd.oci.image.layer.v1.tar"}  # docker save's
    assert img.blob(img.manifest["layers"][-1]["digest"])[:4] == b"\x28\xb5\x2f\xfd"
    _config, base_digests = docker_save_layers()
    assert [d["digest"] for d in img.manifest["layers"][:-1]] == base_digests
    requires_tool("skopeo")
    skopeo("copy", f"oci-archive:{out}", f"oci:{tmp_path / 'copied'}:z")
    oci(tmp_path / "root", "unpack", str(out))
    assert oci(tmp_path / "root", "verify") == "ok\n"


def test_a_zstd_base_cannot_become_docker(tmp_path: Path,
                                          step_files: dict[str, Path]) -> None:
    zbase = tmp_path / "zbase"
    append(str(DOCKER_SAVE), "-o", str(zbase), "--format", "oci", "--manifest", "oci",
           "--layer", str(step_files["plain"]), "--compression", "zstd", "--tag", "z:1")
    r = append(f"oci:{zbase}:1", "-o", str(tmp_path / "out.tar"), "--manifest", "docker",
               "-c", "ENV A=1", check=False)
    assert_one_line_error(r.returncode, r.stderr, "zstd", "--manifest oci")


def test_oci_base_to_docker_manifest(tmp_path: Path, oci_base: Path,
                                     step_files: dict[str, Path]) -> None:
    out = tmp_path / "out.tar"
    append(str(oci_base), "-o", str(out), "--manifest", "docker", "--format",
           "docker-archive", "--layer", str(step_files["plain"]))
    img = Out(out)
    assert img.manifest["mediaType"] == DOCKER_MANIFEST
    assert {d["mediaType"] for d in img.manifest["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"}


# --- config only, annotations ---


def test_change_alone_is_an_empty_layer_history_entry(tmp_path: Path, oci_base: Path) -> None:
    out = tmp_path / "out"
    append(str(oci_base), "-o", str(out), "--format", "oci", "-c", 'CMD ["/bin/sh"]',
           "-m", "just a cmd", "--source-date-epoch", SDE)
    base, img = Out(oci_base), Out(out)
    assert img.manifest["layers"] == base.manifest["layers"]
    assert img.config["rootfs"] == base.config["rootfs"]
    assert img.config["history"][:-1] == base.config["history"]
    assert img.config["history"][-1] == {
        "created": "2023-11-14T22:13:20Z", "created_by": "ocilayers append",
        "comment": "just a cmd", "empty_layer": True}
    assert img.config["config"]["Cmd"] == ["/bin/sh"]


def test_manifest_names_its_base(tmp_path: Path, oci_base: Path) -> None:
    # an OCI layout: its manifest digest; its ref name `latest` names no repository
    append(str(oci_base), "-o", str(tmp_path / "a"), "--format", "oci", "-c", "ENV A=1")
    assert Out(tmp_path / "a").manifest["annotations"] == {
        "org.opencontainers.image.base.digest": Out(oci_base).manifest_digest}
    # an oci-archive with a full name: both
    tiny = FIXTURES / "tiny-oci.tar"
    append(str(tiny), "-o", str(tmp_path / "b"), "--format", "oci", "-c", "ENV A=1")
    assert Out(tmp_path / "b").manifest["annotations"] == {
        "org.opencontainers.image.base.name": "docker.io/library/tiny:latest",
        "org.opencontainers.image.base.digest": Out(tiny).manifest_digest}
    # docker save: a name, but no manifest (so no manifest digest) to name
    append(str(DOCKER_SAVE), "-o", str(tmp_path / "c"), "--format", "oci", "-c", "ENV A=1")
    assert Out(tmp_path / "c").manifest["annotations"] == {
        "org.opencontainers.image.base.name": "docker.io/library/committed:latest"}


# --- the kinds of layer ---


def test_layer_gzip_zstd_and_plain_give_one_layer(tmp_path: Path, oci_base: Path,
                                                  step_files: dict[str, Path]) -> None:
    out = tmp_path / "out"
    append(str(oci_base), "-o", str(out), "--format", "oci",
           *(x for k in ("gzip", "zstd", "plain") for x in ("--layer", str(step_files[k]))))
    img = Out(out)
    tar = step_files["plain"].read_bytes()
    assert img.config["rootfs"]["diff_ids"][1:] == [sha256(tar)] * 3
    new = img.manifest["layers"][1:]
    assert len({d["digest"] for d in new}) == 1  # one tar, one blob, whatever came in
    assert plain(img.blob(new[0]["digest"])) == tar
    assert [h["created_by"] for h in img.config["history"][1:]] == [
        "ocilayers append --layer step.tar.gz", "ocilayers append --layer step.tar.zst",
        "ocilayers append --layer step.tar"]


def test_dir_with_lower_turns_overlay_markers_into_whiteouts(tmp_path: Path,
                                                             oci_base: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("an overlay whiteout (0:0 char device) and trusted.* xattrs need root")
    lower = tmp_path / "lower"
    oci(tmp_path / "root", "flatten", str(oci_base), str(lower))
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc" / "passwd", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # rm
    (upper / "etc" / "new").write_bytes(b"new\n")
    (upper / "opt" / "x").mkdir(parents=True)  # rm -rf + mkdir: opaque
    os.setxattr(upper / "opt" / "x", "trusted.overlay.opaque", b"y")
    (upper / "opt" / "x" / "newfile").write_bytes(b"fresh\n")
    (upper / "brand-new").mkdir()  # not in the lower: no marker
    (upper / "brand-new" / "f").write_bytes(b"f\n")
    out = tmp_path / "out"
    append(str(oci_base), "-o", str(out), "--format", "oci", "--dir", str(upper),
           "--lower", str(lower))
    img = Out(out)
    # (the walk's child hashed the tar it wrote: the DiffID is that of the blob's tar)
    assert img.config["rootfs"]["diff_ids"][-1] == sha256(img.layer_tar(-1))
    names = set(entries(img.layer_tar(-1)))
    assert names == {"etc", "etc/.wh.passwd", "etc/new", "opt", "opt/x",
                     "opt/x/.wh..wh..opq", "opt/x/newfile", "brand-new", "brand-new/f"}
    assert img.config["history"][-1]["created_by"] == "ocilayers append --dir upper --lower lower"
    flat = tmp_path / "flat"
    oci(tmp_path / "root", "flatten", str(out), str(flat))
    got = {str(p.relative_to(flat)) for p in flat.rglob("*") if not p.is_dir()}
    assert got == {"etc/group", "etc/new", "opt/x/newfile", "keep/a", "brand-new/f"}


def test_usage_errors(tmp_path: Path, oci_base: Path) -> None:
    r = append(str(oci_base), "-o", str(tmp_path / "o"), "--lower", "x", check=False)
    assert r.returncode == 2 and "--lower belongs to the --dir" in r.stderr
    r = append(str(oci_base), "-o", str(tmp_path / "o"), "--diff", str(tmp_path), check=False)
    assert_one_line_error(r.returncode, r.stderr, "--base")
    r = append(str(oci_base), "-o", str(tmp_path / "o"), "--layer", str(tmp_path / "nope"),
               check=False)
    assert_one_line_error(r.returncode, r.stderr, "nope", "no such file")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["text", "random", "truncated", "bad-checksum"])
def test_a_layer_that_is_no_tar_fails_the_append(tmp_path: Path, oci_base: Path,
                                                 kind: str) -> None:
    tar = step_tar({"a": b"x" * 3000})
    data = {"text": b"hello, not a tar\n", "random": os.urandom(4096),
            "truncated": tar[:1200],
            "bad-checksum": tar[:148] + b"0000000\0" + tar[156:]}[kind]
    (tmp_path / "layer").write_bytes(gzip.compress(data) if kind == "random" else data)
    out = tmp_path / "o"
    r = append(str(oci_base), "-o", str(out), "--format", "oci", "--layer",
               str(tmp_path / "layer"), check=False)
    assert_one_line_error(r.returncode, r.stderr, "--layer", "not a well-formed tar")
    assert not out.exists()


def test_a_layer_keeps_its_bytes_padding_and_all(tmp_path: Path, oci_base: Path) -> None:
    # GNU tar and Python's tarfile pad to 10240-byte records, past the end-of-archive blocks;
    # an archive without end blocks is accepted, as dockerd does: each DiffID is the file's
    tar = step_tar({"a": b"x" * 100})
    end = tar.rindex(b"x" * 100) + 512  # after the data block: the end blocks start
    layers = {"padded": tar + b"\0" * 9216, "no-end": tar[:end]}
    args = []
    for name, data in layers.items():
        (tmp_path / name).write_bytes(data)
        args += ["--layer", str(tmp_path / name)]
    append(str(oci_base), "-o", str(tmp_path / "o"), "--format", "oci", *args)
    img = Out(tmp_path / "o")
    assert img.config["rootfs"]["diff_ids"][1:] == [sha256(x) for x in layers.values()]
    assert [img.layer_tar(i) for i in (1, 2)] == list(layers.values())


# --- append == commit ---


CHANGE_SH = """set -e
R=$1
mkdir -p "$R/data/sub"
echo hello >"$R/data/sub/hello.txt"
echo more >>"$R/etc/group"
rm "$R/etc/passwd"
rm -rf "$R/opt/x"
touch -d @1650000000 "$R/data/sub/hello.txt" "$R/etc/group"
"""


def _commit_and_append(tmp_path: Path, base: Path) -> tuple[dict[str, Any], dict[str, Any],
                                                            bytes, bytes]:
    """The same change made twice: (1) to a copy of the flattened base, packed with
    `pack --base` and appended; (2) copied into a container's mount and committed. Returns
    (append's --json, commit's --json, append's config, commit's config)."""
    if os.geteuid() != 0:
        pytest.skip("create + mount + commit need root (overlay)")
    root = tmp_path / "root"
    meta = ["--created-by", "copy files in", "-m", "the change", "--source-date-epoch", SDE]
    oci(root, "flatten", str(base), str(tmp_path / "old"))
    shutil.copytree(tmp_path / "old", tmp_path / "new", symlinks=True)
    (tmp_path / "change.sh").write_text(CHANGE_SH)
    subprocess.run(["sh", str(tmp_path / "change.sh"), str(tmp_path / "new")], check=True)
    oci(root, "pack", str(tmp_path / "new"), "--base", str(tmp_path / "old"), "-o",
        str(tmp_path / "layer.tar"), "--compression", "none", "--source-date-epoch", SDE)
    appended = append_json(str(base), "-o", str(tmp_path / "out"), "--format", "oci",
                           "--layer", str(tmp_path / "layer.tar"), *meta)

    oci(root, "unpack", str(base), "--tag", "base:1")
    c = oci(root, "create", "base:1").strip()
    try:
        target = oci(root, "mount", c).strip()
        subprocess.run(["sh", str(tmp_path / "change.sh"), target], check=True)
        oci(root, "umount", c)
    finally:
        unmount_all(root)
    committed = json.loads(oci(root, "commit", c, *meta, "--json"))
    commit_config = (root / "image" / "overlay2" / "imagedb" / "content" / "sha256" /
                     committed["image_id"].split(":")[1]).read_bytes()
    return appended, committed, Out(tmp_path / "out").config_raw, commit_config


def test_pack_base_plus_append_is_commits_image(tmp_path: Path, oci_base: Path) -> None:
    appended, committed, a_config, c_config = _commit_and_append(tmp_path, oci_base)
    # the layer: pack --base of the trees is the commit's diff of the upper dir, byte for byte
    layer = (tmp_path / "layer.tar").read_bytes()
    assert committed["diff_id"] == sha256(layer)
    assert set(entries(layer)) == {"data", "data/sub", "data/sub/hello.txt", "etc",
                                   "etc/group", "etc/.wh.passwd", "opt", "opt/.wh.x"}
    # the image: the same config bytes, so the same image ID (commit's lastUpdated and
    # parent are store metadata, outside the config)
    assert a_config == c_config
    assert appended["config_digest"] == committed["image_id"]


def test_append_keeps_the_docker_host_fields_commit_drops(tmp_path: Path) -> None:
    appended, committed, a_config, c_config = _commit_and_append(tmp_path, DOCKER_SAVE)
    assert committed["diff_id"] == sha256((tmp_path / "layer.tar").read_bytes())
    a, c = json.loads(a_config), json.loads(c_config)
    assert all(k in a for k in HOST_FIELDS)
    assert not any(k in c for k in HOST_FIELDS)
    for k in HOST_FIELDS:
        del a[k]
    assert a == c  # nothing else differs
    assert appended["config_digest"] != committed["image_id"]
