"""unpack.py / `ocilayers unpack`: the store it writes (docs/store-format.md, byte for byte),
tags, --json,
tar-split records against the real `tar-split` binary, layer reuse, crash safety (bad blobs,
kill -9, Ctrl-C), concurrent runs on one store, and --jobs.

The store-layout oracle (`check_store`) and the image readers/builders live in test_store.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import treecompare as tc
from conftest import (
    ERROR_PREFIX,
    FIXTURES,
    Layout,
    assert_one_line_error,
    chain_ids_by_spec,
    requires_tool,
    run_module,
)
from test_store import (
    DEMO,
    DOCKER_SAVE,
    MEDIA_LAYER_GZIP,
    Capsys,
    SourceImage,
    assert_same_stores,
    cached,
    check_store,
    deep_image,
    finish_oci,
    image_ids,
    layer_root_mode,
    layerdb,
    make_tar,
    ok,
    ol,
    read_layers,
    read_source,
    repositories,
    tags_of,
    unpack,
    verify_ok,
    write_oci,
)
from throwaway_dockerd import pids_referencing, wait_gone, wait_group_gone

# fixture -> the tags `unpack` must give it (RepoTags / full-reference ref names, normalised;
# a bare-tag ref name such as skopeo's and umoci's `latest` names no repository).
FIXTURE_TAGS: dict[str, list[str]] = {
    "demo": [],
    "tiny": [],
    "tiny-oci.tar": ["tiny:latest"],
    "tiny-zstd": [],
    "tiny-docker.tar": ["tiny:latest"],
    "tiny-uncompressed": [],
    "umoci-insert-opaque": [],
    "docker-save.tar": ["committed:latest"],
}


def fixture_ids() -> list[Any]:
    return [pytest.param(name, id=name) for name in FIXTURE_TAGS]


def expect_result(result: dict[str, Any], src: SourceImage, root: Path, tags: list[str],
                  reused: list[bool] | None = None) -> None:
    """The --json shape, with every value checked against the store and hashlib."""
    layers = read_layers(root)
    assert list(result) == ["image_id", "tags", "layers"]
    assert result["image_id"] == src.image_id
    assert sorted(result["tags"]) == sorted(tags)
    want = []
    for i, (diff_id, chain) in enumerate(zip(src.diff_ids, src.chain_ids, strict=True)):
        rec = layers[chain]
        want.append({"diff_id": diff_id, "chain_id": chain, "cache_id": rec.cache_id,
                     "diff_size": rec.size,
                     "reused": reused[i] if reused is not None else result["layers"][i]["reused"]})
    assert result["layers"] == want


def root_modes(*sources: SourceImage) -> dict[str, int]:
    return {d: layer_root_mode(t) for s in sources
            for d, t in zip(s.diff_ids, s.layer_tars, strict=True)}


def staging_dirs(root: Path) -> list[str]:
    overlay = root / "overlay2"
    return sorted(n for n in os.listdir(overlay) if n.startswith(".staging-")) \
        if overlay.is_dir() else []


# ============================================================================================
# Layout, tags, --json
# ============================================================================================

@pytest.mark.parametrize("fixture", fixture_ids())
def test_unpack_writes_docker_layout(tmp_path: Path, capsys: Capsys, fixture: str) -> None:
    root = tmp_path / "store"
    src = read_source(FIXTURES / fixture)
    result = unpack(capsys, root, FIXTURES / fixture)
    expect_result(result, src, root, FIXTURE_TAGS[fixture], [False] * len(src.diff_ids))
    check_store(root, images={src.image_id: src.config},
                tags={t: src.image_id for t in FIXTURE_TAGS[fixture]},
                root_modes=root_modes(src))
    # a base layer has no parent file; every other layer names the previous ChainID
    layers = read_layers(root)
    assert [layers[c].parent for c in src.chain_ids] == [None, *src.chain_ids[:-1]]
    assert {r.diff_id for r in layers.values()} == set(src.diff_ids)
    verify_ok(capsys, root)


def test_store_root_and_repositories_json_bytes(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    saved = read_source(DOCKER_SAVE)
    unpack(capsys, root, DOCKER_SAVE)
    raw = (root / "image" / "overlay2" / "repositories.json").read_bytes()
    assert json.loads(raw) == {"Repositories": {"committed": {
        "committed:latest": saved.image_id}}}
    assert not raw.endswith(b"\n")
    # nothing but Docker's names under the root (plus our lock file)
    assert set(os.listdir(root)) <= {"overlay2", "image", "ocilayers.lock"}
    assert set(os.listdir(root / "image")) == {"overlay2"}
    assert {"layerdb", "imagedb", "repositories.json"} <= set(
        os.listdir(root / "image" / "overlay2")) <= {"layerdb", "imagedb", "repositories.json",
                                                     "distribution"}
    assert set(os.listdir(root / "image" / "overlay2" / "layerdb")) <= {"sha256", "tmp",
                                                                         "mounts"}


def test_unpack_prints_the_image_id(tmp_path: Path, capsys: Capsys) -> None:
    code, out, err = ol(capsys, tmp_path / "store", "unpack", str(DEMO))
    assert code == 0, err
    assert out == read_source(DEMO).image_id + "\n"
    assert "Traceback" not in err


@pytest.mark.parametrize(("tags", "want"), [
    pytest.param(["mine:1"], ["mine:1"], id="one"),
    pytest.param(["mine:1", "example.com/team/app:2", "docker.io/library/plain"],
                 ["mine:1", "example.com/team/app:2", "plain:latest"], id="several-normalised"),
    pytest.param(["mine:1", "mine:1"], ["mine:1"], id="duplicate"),
])
def test_tag_option_replaces_source_tags(tmp_path: Path, capsys: Capsys, tags: list[str],
                                         want: list[str]) -> None:
    root = tmp_path / "store"
    saved = read_source(DOCKER_SAVE)
    args = [a for t in tags for a in ("--tag", t)]
    result = unpack(capsys, root, DOCKER_SAVE, *args)
    assert sorted(result["tags"]) == sorted(want)
    check_store(root, images={saved.image_id: saved.config},
                tags={t: saved.image_id for t in want}, root_modes=root_modes(saved))


def test_tags_accumulate_and_move(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    demo, saved = read_source(DEMO), read_source(DOCKER_SAVE)
    unpack(capsys, root, DEMO, "--tag", "x:1", "--tag", "y:1")
    unpack(capsys, root, DOCKER_SAVE, "--tag", "y:1")  # y:1 moves to the committed image
    assert tags_of(root) == {"x:1": demo.image_id, "y:1": saved.image_id}
    assert repositories(root) == {"x": {"x:1": demo.image_id}, "y": {"y:1": saved.image_id}}


def test_invalid_tag_fails_before_any_work(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    code, _out, err = ol(capsys, root, "unpack", str(DEMO), "--tag", "Not A:Tag")
    assert_one_line_error(code, err)
    assert read_layers(root) == {} and image_ids(root) == set()


@pytest.mark.parametrize(("fixture", "args", "ok_"), [
    pytest.param("docker-save.tar", ["--ref", "committed:latest"], True, id="docker-ref"),
    pytest.param("docker-save.tar", ["--ref", "nope:1"], False, id="docker-ref-missing"),
    pytest.param("demo", ["--ref", "latest"], True, id="oci-ref"),
    pytest.param("demo", ["--ref", "nope"], False, id="oci-ref-missing"),
    pytest.param("demo", ["--platform", "linux/amd64"], True, id="oci-platform"),
    pytest.param("demo", ["--platform", "linux/s390x"], False, id="oci-platform-other"),
    pytest.param("docker-save.tar", ["--platform", "linux/amd64"], True, id="docker-platform"),
    # the config says linux/amd64: another platform must be refused, as for OCI sources
    pytest.param("docker-save.tar", ["--platform", "linux/s390x"], False,
                 id="docker-platform-other"),
])
def test_ref_and_platform(tmp_path: Path, capsys: Capsys, fixture: str, args: list[str],
                          ok_: bool) -> None:
    src = read_source(FIXTURES / fixture)
    if "linux/amd64" in args and json.loads(src.config).get("architecture") != "amd64":
        pytest.skip("fixture is not amd64")
    root = tmp_path / "store"
    code, out, err = ol(capsys, root, "unpack", str(FIXTURES / fixture), *args)
    if ok_:
        assert code == 0, err
        assert out.strip() == src.image_id
    else:
        assert_one_line_error(code, err)
        assert read_layers(root) == {} and image_ids(root) == set()


def test_layer_root_entry_sets_diff_mode(tmp_path: Path, capsys: Capsys) -> None:
    """diff/ is 0755 unless the layer's own root entry says otherwise."""
    image = tmp_path / "img"
    src = write_oci(image, [
        make_tar([("a", b"a\n", 0o644)], root_mode=0o750),
        make_tar([("b", b"b\n", 0o644)]),
        make_tar([("c", b"c\n", 0o644)], root_mode=0o1777),
    ])
    root = tmp_path / "store"
    unpack(capsys, root, image)
    layers = read_layers(root)
    modes = [os.lstat(layers[c].diff(root)).st_mode & 0o7777 for c in src.chain_ids]
    assert modes == [0o750, 0o755, 0o1777]
    check_store(root, images={src.image_id: src.config}, root_modes=root_modes(src))
    verify_ok(capsys, root)


def test_size_counts_hardlinked_inodes_once(tmp_path: Path, capsys: Capsys) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        data = b"x" * 1000
        ti = tarfile.TarInfo("one")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
        for name in ("two", "three"):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.LNKTYPE, "one"
            tf.addfile(ti)
        ti = tarfile.TarInfo("sym")
        ti.type, ti.linkname = tarfile.SYMTYPE, "0123456789"
        tf.addfile(ti)
    image = tmp_path / "img"
    src = write_oci(image, [buf.getvalue()])
    root = tmp_path / "store"
    result = unpack(capsys, root, image)
    assert result["layers"][0]["diff_size"] == 1000 + 10
    check_store(root, images={src.image_id: src.config})


def test_126_layers_are_refused(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    code, _out, err = ol(capsys, root, "unpack", str(deep_image(126)))
    assert_one_line_error(code, err, "126", "125")
    assert read_layers(root) == {} and image_ids(root) == set()


def test_125_layers_unpack(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    image = deep_image(125)
    src = read_source(image)
    result = unpack(capsys, root, image)
    expect_result(result, src, root, [], [False] * 125)
    check_store(root, images={src.image_id: src.config})


# ============================================================================================
# tar-split records: the real binary is the oracle
# ============================================================================================

def _records(data: bytes) -> list[bytes]:
    return gzip.decompress(data).splitlines()


@pytest.mark.parametrize("fixture", fixture_ids())
def test_tar_split_matches_real_tool(tmp_path: Path, capsys: Capsys, fixture: str) -> None:
    exe = requires_tool("tar-split")
    root = tmp_path / "store"
    src = read_source(FIXTURES / fixture)
    unpack(capsys, root, FIXTURES / fixture)
    layers = read_layers(root)
    for i, (tar, chain, diff_id) in enumerate(zip(src.layer_tars, src.chain_ids, src.diff_ids,
                                                  strict=True)):
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        ts = layerdb(root) / "sha256" / chain.removeprefix("sha256:") / "tar-split.json.gz"
        # 1. the real assembler rebuilds the exact layer tar from our records + diff dir
        proc = subprocess.run([exe, "asm", "--input", str(ts), "--path",
                               str(layers[chain].diff(root)), "--output", "-"],
                              capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        assert "sha256:" + hashlib.sha256(proc.stdout).hexdigest() == diff_id, f"layer {i}"
        assert proc.stdout == tar
        # 2. our records are the ones the real disassembler writes for that tar
        layer_tar = tmp_path / f"layer{i}.tar"
        layer_tar.write_bytes(tar)
        ref = tmp_path / f"layer{i}.json.gz"
        proc = subprocess.run([exe, "disasm", "--no-stdout", "--output", str(ref),
                               str(layer_tar)], capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        ours, theirs = _records(ts.read_bytes()), _records(ref.read_bytes())
        for n, (a, b) in enumerate(zip(ours, theirs, strict=False)):
            assert a == b, f"layer {i} record {n}:\n ours   {a[:300]!r}\n theirs {b[:300]!r}"
        assert len(ours) == len(theirs), f"layer {i}: {len(ours)} records, tar-split " \
                                         f"{len(theirs)}"


# ============================================================================================
# Reuse
# ============================================================================================

@pytest.mark.parametrize("fixture", ["demo", "docker-save.tar"])
def test_second_unpack_reuses_and_changes_nothing(tmp_path: Path, capsys: Capsys,
                                                  fixture: str) -> None:
    root = tmp_path / "store"
    src = read_source(FIXTURES / fixture)
    first = unpack(capsys, root, FIXTURES / fixture)
    before = tc.snapshot(root, root_entry=True)
    time.sleep(0.01)  # any rewrite would show in the ns mtimes
    second = unpack(capsys, root, FIXTURES / fixture)
    expect_result(second, src, root, FIXTURE_TAGS[fixture], [True] * len(src.diff_ids))
    assert [x["cache_id"] for x in first["layers"]] == [x["cache_id"] for x in second["layers"]]
    after = tc.snapshot(root, root_entry=True)
    repos = b"image/overlay2/repositories.json"
    if FIXTURE_TAGS[fixture]:
        # re-setting the same tag rewrites repositories.json atomically, as dockerd does
        before = tc.without(before, "mtime", paths=lambda p: p in (repos, b"image/overlay2"))
        after = tc.without(after, "mtime", paths=lambda p: p in (repos, b"image/overlay2"))
    tc.assert_same(before, after, names=("before", "after"))


def test_docker_save_after_demo_reuses_the_shared_layers(tmp_path: Path,
                                                         capsys: Capsys) -> None:
    root = tmp_path / "store"
    demo, saved = read_source(DEMO), read_source(DOCKER_SAVE)
    assert saved.diff_ids[:4] == demo.diff_ids
    first = unpack(capsys, root, DEMO)
    layers = read_layers(root)
    before = {c: (tc.snapshot(layers[c].diff(root), root_entry=True),
                  tc.snapshot(layerdb(root) / "sha256" / c.removeprefix("sha256:"),
                              root_entry=True)) for c in demo.chain_ids}
    time.sleep(0.01)
    result = unpack(capsys, root, DOCKER_SAVE)
    expect_result(result, saved, root, ["committed:latest"], [True] * 4 + [False])
    assert [x["cache_id"] for x in result["layers"][:4]] == \
        [x["cache_id"] for x in first["layers"]]
    for c in demo.chain_ids:
        tc.assert_same(before[c][0], tc.snapshot(layers[c].diff(root), root_entry=True),
                       msg=f"diff of {c}")
        tc.assert_same(before[c][1], tc.snapshot(layerdb(root) / "sha256" /
                                                 c.removeprefix("sha256:"), root_entry=True),
                       msg=f"layerdb of {c}")
    assert len(read_layers(root)) == 5
    assert (layers[demo.chain_ids[-1]].dir(root) / "committed").exists()
    check_store(root, images={demo.image_id: demo.config, saved.image_id: saved.config},
                tags={"committed:latest": saved.image_id}, root_modes=root_modes(demo, saved))
    verify_ok(capsys, root)


# ============================================================================================
# Crash safety: a bad blob
# ============================================================================================

def _flip_deflate_byte(blob: bytearray) -> None:
    blob[len(blob) // 2] ^= 0xFF  # inside the deflate data: a decode or CRC error


def _flip_gzip_mtime(blob: bytearray) -> None:
    blob[4] ^= 0xFF  # the gzip header's MTIME: still a valid stream, only the digest is wrong


@pytest.mark.parametrize("jobs", ["1", "4"])
@pytest.mark.parametrize("corrupt", [_flip_deflate_byte, _flip_gzip_mtime],
                         ids=["deflate", "valid-gzip"])
@pytest.mark.parametrize("bad", [0, 2, 3], ids=["layer1", "layer3", "layer4"])
def test_bad_blob_registers_nothing_for_it(tmp_path: Path, capsys: Capsys, jobs: str,
                                           corrupt: Any, bad: int) -> None:
    layout = Layout.copy_of("demo", tmp_path / "demo")
    desc = layout.manifest()["layers"][bad]
    blob = bytearray(layout.read_blob(desc["digest"]))
    corrupt(blob)
    layout.blob_path(desc["digest"]).write_bytes(bytes(blob))
    src = read_source(DEMO)

    root = tmp_path / "store"
    proc = run_module(["--root", str(root), "unpack", str(layout.root), "--jobs", jobs])
    assert_one_line_error(proc.returncode, proc.stderr, desc["digest"][:19])
    assert proc.stdout == ""
    assert not wait_gone(root, timeout=5), "worker processes outlived the failed unpack"
    layers = read_layers(root)
    assert not set(src.chain_ids[bad:]) & set(layers), "a layer at or above the bad blob"
    assert set(layers) <= set(src.chain_ids[:bad])
    assert staging_dirs(root) == []
    assert image_ids(root) == set()
    check_store(root, images={}, tags={}, root_modes=root_modes(src))
    verify_ok(capsys, root)
    # the good image still unpacks into that store, reusing what was registered
    result = unpack(capsys, root, DEMO)
    assert [x["reused"] for x in result["layers"]] == [c in layers for c in src.chain_ids]
    check_store(root, images={src.image_id: src.config}, root_modes=root_modes(src))
    verify_ok(capsys, root)


def _pax_layer(records: dict[str, str | bytes], name: str = "x") -> bytes:
    import tarbuilder as tb

    return tb.build([tb.file("ok", b"fine")], end=False) + tb.pax_header(records) \
        + tb.entry(tb.header(name)) + tb.END


@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize("layer", [
    pytest.param(lambda: _pax_layer({"uid": "4294967296"}), id="uid-2^32"),
    pytest.param(lambda: _pax_layer({"path": b"a\0b"}), id="nul-in-path"),
    pytest.param(lambda: _pax_layer({"mtime": "9" * 30}), id="mtime-huge"),
    pytest.param(lambda: _pax_layer({"path": "a/" * 2100 + "f"}), id="path-over-path-max"),
])
def test_unrepresentable_entry_fails_in_one_line(tmp_path: Path, jobs: str, layer: Any) -> None:
    """Entries no file system can hold (found by fuzzing) end the unpack with one error line
    and exit 1, register nothing and leave no staging dir, with or without workers."""
    image = tmp_path / "img"
    src = write_oci(image, [make_tar([("base", b"x", 0o644)]), layer()])
    root = tmp_path / "store"
    proc = run_module(["--root", str(root), "unpack", str(image), "--jobs", jobs])
    assert_one_line_error(proc.returncode, proc.stderr, "unpack layer sha256:")
    assert "internal error" not in proc.stderr
    assert set(read_layers(root)) <= {src.chain_ids[0]}
    assert staging_dirs(root) == [] and image_ids(root) == set()


def test_missing_blob_fails_cleanly(tmp_path: Path, capsys: Capsys) -> None:
    layout = Layout.copy_of("demo", tmp_path / "demo")
    desc = layout.manifest()["layers"][1]
    layout.blob_path(desc["digest"]).unlink()
    root = tmp_path / "store"
    code, out, err = ol(capsys, root, "unpack", str(layout.root))
    assert_one_line_error(code, err, desc["digest"][7:19])
    assert out == "" and read_layers(root) == {} and image_ids(root) == set()
    assert staging_dirs(root) == []


# ============================================================================================
# Crash safety: kill -9 and Ctrl-C in the middle of a big layer
# ============================================================================================

BIG_FILES = 1800
BIG_FILE_SIZE = 256 * 1024  # ~470 MB uncompressed, half random, half zeros


class _HashingFile:
    def __init__(self, f: Any) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        pass


def big_image() -> Path:
    """Two layers: a small base, then ~470 MB in BIG_FILES files under big/ (cached)."""
    def build(d: Path) -> None:
        blobs = d / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        base = make_tar([("etc", None, 0o755), ("etc/base", b"base layer\n", 0o644)])
        base_blob = gzip.compress(base, mtime=0)
        (blobs / hashlib.sha256(base_blob).hexdigest()).write_bytes(base_blob)
        descs = [{"mediaType": MEDIA_LAYER_GZIP,
                  "digest": "sha256:" + hashlib.sha256(base_blob).hexdigest(),
                  "size": len(base_blob)}]
        rnd = random.Random(20240601)
        tmp = d / "big.tmp"
        with open(tmp, "wb") as raw:
            compressed = _HashingFile(raw)
            with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=1, mtime=0) as gz:
                plain = _HashingFile(gz)
                with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tf:
                    ti = tarfile.TarInfo("big")
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tf.addfile(ti)
                    for i in range(BIG_FILES):
                        data = rnd.randbytes(BIG_FILE_SIZE // 2) + bytes(BIG_FILE_SIZE // 2)
                        ti = tarfile.TarInfo(f"big/f{i:05d}")
                        ti.size, ti.mtime = len(data), 1_700_000_000
                        tf.addfile(ti, io.BytesIO(data))
        digest = compressed.h.hexdigest()
        os.rename(tmp, blobs / digest)
        descs.append({"mediaType": MEDIA_LAYER_GZIP, "digest": "sha256:" + digest,
                      "size": compressed.n})
        finish_oci(d, descs, ["sha256:" + hashlib.sha256(base).hexdigest(),
                              "sha256:" + plain.h.hexdigest()])
    return cached("big-2-layers", build)


@pytest.fixture
def big_run(tmp_path: Path) -> Iterator[Any]:
    """Start an unpack of the big image; yields a function that waits until the big layer is
    being written into a staging dir, then returns the Popen. Anything left is killed."""
    image = big_image()
    root = tmp_path / "store"
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "ocilayers", "--root", str(root),
                                 "unpack", str(image), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                assert proc.stderr is not None
                pytest.fail("unpack finished before it could be interrupted "
                            f"(rc {proc.returncode}; {proc.stderr.read().decode()!r}); "
                            "make the big layer bigger")
            for name in staging_dirs(root):
                with_data = root / "overlay2" / name / "diff" / "big"
                try:
                    if len(os.listdir(with_data)) >= 40:
                        return proc
                except FileNotFoundError:
                    continue
            time.sleep(0.005)
        pytest.fail("no staging dir with data appeared")

    yield start, root, image
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_kill_9_mid_layer(big_run: Any, capsys: Capsys, jobs: str) -> None:
    start, root, image = big_run
    src_diff_ids = json.loads(read_source_config(image))["rootfs"]["diff_ids"]
    chains = chain_ids_by_spec(src_diff_ids)
    proc = start("--jobs", jobs)
    running = pids_referencing(root)
    assert proc.pid in running
    if jobs != "1":
        assert len(running) >= 2, f"no worker processes seen: {running}"
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: workers must die with it
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = wait_group_gone(proc.pid)
    assert not left, f"processes left behind after kill -9: {left}"
    stale = staging_dirs(root)
    assert stale, "the kill left no staging dir: it did not hit mid-layer"
    layers = read_layers(root)
    assert chains[1] not in layers
    assert set(layers) <= {chains[0]}
    assert image_ids(root) == set()

    # a new run cleans up and finishes the job
    proc2 = run_module(["--root", str(root), "unpack", str(image), "--json", "--jobs", jobs])
    assert proc2.returncode == 0, proc2.stderr
    result = json.loads(proc2.stdout)
    assert [x["reused"] for x in result["layers"]] == [chains[0] in layers, False]
    assert staging_dirs(root) == []
    assert not any((root / "overlay2" / s).exists() for s in stale)
    check_store(root, images={json.loads(proc2.stdout)["image_id"]: read_source_config(image)})
    verify = run_module(["--root", str(root), "verify"])
    assert (verify.returncode, verify.stdout) == (0, "ok\n"), verify.stderr


def read_source_config(image: Path) -> bytes:
    """The config bytes of a (possibly huge) OCI layout, without reading its layers."""
    index = json.loads((image / "index.json").read_bytes())
    digest = index["manifests"][0]["digest"].replace(":", "/")
    manifest = json.loads((image / "blobs" / digest).read_bytes())
    return (image / "blobs" / manifest["config"]["digest"].replace(":", "/")).read_bytes()


@pytest.mark.parametrize(("jobs", "debug"), [("1", False), ("2", False), ("2", True)],
                         ids=["jobs1", "jobs2", "jobs2-debug"])
def test_ctrl_c_mid_layer(big_run: Any, jobs: str, debug: bool) -> None:
    start, root, image = big_run
    chains = chain_ids_by_spec(json.loads(read_source_config(image))["rootfs"]["diff_ids"])
    proc = start("--jobs", jobs, *(["--debug"] if debug else []))
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    try:
        _out, err_bytes = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("unpack did not stop on SIGINT")
    err = err_bytes.decode()
    assert proc.returncode > 0, (proc.returncode, err)
    assert ("Traceback" in err) == debug, err
    assert err.splitlines()[-1].startswith(ERROR_PREFIX), err
    if not debug:
        assert len(err.splitlines()) == 1, err
    assert not wait_group_gone(proc.pid)
    assert staging_dirs(root) == [], "Ctrl-C left a staging dir"
    layers = read_layers(root)
    assert chains[1] not in layers and image_ids(root) == set()
    check_store(root, images={}, tags={})


@pytest.mark.parametrize("step", ["/tar-split.json.gz", "/write-set-"],
                         ids=["tar-split-moved", "layerdb-entry-renamed"])
def test_ctrl_c_during_a_registration_waits_for_it(tmp_path: Path, capsys: Capsys,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   step: str) -> None:
    """SIGINT while a layer is registered (its dir already in place, its layerdb entry not
    yet) is held until the layer is whole; the unpack stops right after. Before, the
    KeyboardInterrupt left an orphan dir and a write-set in layerdb/tmp."""
    root = tmp_path / "store"
    real_rename = os.rename
    sent: list[str] = []

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        if not sent and step in str(src) and "/.staging-" not in str(src):
            sent.append(str(src))
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the handler runs right here
        real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "rename", rename)
    code, _out, err = ol(capsys, root, "unpack", "--jobs", "1", str(DEMO))
    monkeypatch.undo()
    assert sent, "the registration step was never reached"
    assert code == 130 and err == f"{ERROR_PREFIX}interrupted\n", err
    assert len(read_layers(root)) == 1  # the layer being registered is whole; none after it
    assert image_ids(root) == set()
    check_store(root, images={}, tags={})


# ============================================================================================
# Concurrent runs on one store; --jobs
# ============================================================================================

@pytest.mark.parametrize("command", [["prune"], ["rmi", "other:1"]], ids=["prune", "rmi"])
def test_prune_or_rmi_during_unpack_leaves_it_intact(big_run: Any, capsys: Capsys,
                                                     command: list[str]) -> None:
    """Layers an unpack has registered but no image names yet belong to that unpack: a
    concurrent prune (or the layer GC of an rmi) must not delete them under it."""
    start, root, image = big_run
    unpack(capsys, root, FIXTURES / "tiny", "--tag", "other:1")  # something for rmi to remove
    config = read_source_config(image)
    chains = chain_ids_by_spec(json.loads(config)["rootfs"]["diff_ids"])
    proc = start("--jobs", "1")
    assert chains[0] in read_layers(root), "base layer not registered before the big one"
    done = run_module(["--root", str(root), *command])
    assert done.returncode == 0, done.stderr
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert set(chains) <= set(read_layers(root))
    check_store(root, fresh=False)
    verify = run_module(["--root", str(root), "verify"])
    assert (verify.returncode, verify.stdout) == (0, "ok\n"), verify.stderr


@pytest.mark.parametrize("pair", [("demo", "docker-save.tar"),
                                  ("docker-save.tar", "docker-save.tar")],
                         ids=["demo+docker-save", "docker-save-twice"])
def test_concurrent_unpacks(tmp_path: Path, capsys: Capsys, pair: tuple[str, str]) -> None:
    sources = [read_source(FIXTURES / f) for f in pair]
    for rnd in range(4):
        root = tmp_path / f"store{rnd}"
        procs = [subprocess.Popen([sys.executable, "-m", "ocilayers", "--root", str(root),
                                   "unpack", str(FIXTURES / f), "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for f in pair]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"round {rnd}: {err.decode()}"
            results.append(json.loads(out))
        layers = read_layers(root)
        all_chains = {c for s in sources for c in s.chain_ids}
        assert set(layers) == all_chains, f"round {rnd}"
        # a shared layer exists once: both runs report the same cache-id for it
        by_chain: dict[str, set[str]] = {}
        for r in results:
            for x in r["layers"]:
                by_chain.setdefault(x["chain_id"], set()).add(x["cache_id"])
        assert all(len(v) == 1 for v in by_chain.values()), by_chain
        check_store(root, images={s.image_id: s.config for s in sources},
                    tags={t: s.image_id for f, s in zip(pair, sources, strict=True)
                          for t in FIXTURE_TAGS[f]},
                    root_modes=root_modes(*sources))
        verify_ok(capsys, root)


def test_jobs_1_and_4_give_the_same_store(tmp_path: Path) -> None:
    stores = {}
    for jobs in ("1", "4"):
        root = tmp_path / f"jobs{jobs}"
        for f in ("demo", "docker-save.tar", "tiny-docker.tar"):
            proc = run_module(["--root", str(root), "unpack", str(FIXTURES / f), "--jobs", jobs])
            assert proc.returncode == 0, proc.stderr
        stores[jobs] = root
    assert_same_stores(stores["1"], stores["4"])
    check_store(stores["4"])


def test_jobs_1_and_4_same_store_many_layers(tmp_path: Path) -> None:
    image = tmp_path / "img"
    rnd = random.Random(7)
    tars = []
    for i in range(12):
        files = [(f"d{i % 3}", None, 0o755)]
        files += [(f"d{i % 3}/f{i}-{k}", rnd.randbytes(rnd.randrange(0, 300_000)), 0o644)
                  for k in range(rnd.randrange(1, 6))]
        tars.append(make_tar(files))
    write_oci(image, tars)
    stores = []
    for jobs in ("1", "4"):
        root = tmp_path / f"jobs{jobs}"
        proc = run_module(["--root", str(root), "unpack", str(image), "--jobs", jobs])
        assert proc.returncode == 0, proc.stderr
        stores.append(root)
    assert_same_stores(*stores)
    check_store(stores[1])


def test_unpack_without_json_reports_on_stderr(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    ok(capsys, root, "unpack", str(DEMO))
    code, out, err = ol(capsys, root, "unpack", str(DEMO))
    assert code == 0 and out == read_source(DEMO).image_id + "\n"
    code, out, err = ol(capsys, root, "-q", "unpack", str(DEMO))
    assert code == 0 and err == ""


_ORDER_OF_EVENTS = """
import sys
from ocilayers import api, unpack
from ocilayers.store.layers import LayerStore
events = []
start, register = unpack._start_worker, LayerStore.register_built
def logged_start(src, image, index, *args, **kw):
    events.append(("start", index))
    return start(src, image, index, *args, **kw)
def logged_register(self, staging, built, parent):
    events.append(("register", str(built.diff_id)))
    return register(self, staging, built, parent)
unpack._start_worker = logged_start
LayerStore.register_built = logged_register
api.unpack(sys.argv[1], root=sys.argv[2], jobs=2)
print(events)
"""


def test_a_freed_worker_slot_takes_the_next_layer_before_registrations(tmp_path: Path) -> None:
    """A worker that finishes frees its core for the next layer at once: the parent forks
    the next worker first, then registers what is ready (renames, layerdb files)."""
    rnd = random.Random(3)
    tars = [make_tar([("a", rnd.randbytes(200_000), 0o644)]),  # done first, registered first
            make_tar([("b", rnd.randbytes(6_000_000), 0o644)]),  # the biggest: started first
            make_tar([("c", b"c", 0o644)]),
            make_tar([("d", b"d", 0o644)])]
    image = tmp_path / "img"
    write_oci(image, tars)
    proc = subprocess.run([sys.executable, "-c", _ORDER_OF_EVENTS, str(image),
                           str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = eval(proc.stdout)  # a printed list of tuples of str and int
    kinds = [kind for kind, _ in events]
    assert kinds.count("start") == 4 and kinds.count("register") == 4, events
    assert [i for kind, i in events if kind == "start"][:2] == [1, 0]  # biggest first
    # the third worker was forked before the first registration, whichever finished first
    assert kinds.index("register") > [n for n, k in enumerate(kinds) if k == "start"][2], events


_SPARE_CORE = """
import os, sys, time
from ocilayers import api, unpack
os.cpu_count = lambda: 2  # (read by the parent before the first fork)
real = unpack.build_layer
def build_layer(src, layer, staging, progress=None, *, busy=1, spare_core=None):
    first = spare_core()
    later = None
    if str(layer.diff_id) == sys.argv[3]:  # the big one waits for the others to finish
        deadline = time.monotonic() + 30
        while not spare_core() and time.monotonic() < deadline:
            time.sleep(0.01)
        later = spare_core()
    with open(sys.argv[4], "a") as f:
        f.write(f"{layer.diff_id} {first} {later}\\n")
    return real(src, layer, staging, progress, busy=busy, spare_core=spare_core)
unpack.build_layer = build_layer
api.unpack(sys.argv[1], root=sys.argv[2], jobs=2)
"""


def test_a_worker_is_told_when_a_core_comes_free(tmp_path: Path) -> None:
    """On 2 cores with 2 workers running, a worker has no spare core (it decompresses and
    hashes itself, without a readahead thread); once the others are done, the one still
    running is told a core is free (and starts its readahead thread)."""
    rnd = random.Random(5)
    tars = [make_tar([("big", rnd.randbytes(3_000_000), 0o644)]),
            make_tar([("a", b"a", 0o644)]), make_tar([("b", b"b", 0o644)])]
    image = tmp_path / "img"
    write_oci(image, tars)
    big = "sha256:" + hashlib.sha256(tars[0]).hexdigest()
    log = tmp_path / "log"
    proc = subprocess.run([sys.executable, "-c", _SPARE_CORE, str(image), str(tmp_path / "s"),
                           big, str(log)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = {d: (first, later) for d, first, later in
            (line.split() for line in log.read_text().splitlines())}
    assert len(seen) == 3
    assert seen.pop(big) == ("False", "True")
    assert set(seen.values()) == {("False", "None")}


# What a local unpack loads in the parent process (start-up is on every unpack's critical path).

_MODULES_AFTER_UNPACK = """
import sys
from ocilayers import api, forking
api.unpack(sys.argv[1], root=sys.argv[2], jobs=int(sys.argv[3]))
print(sorted(m for m in sys.modules if m.startswith(("ocilayers", "isal", "zstandard"))))
print(forking._prctl is not None)
"""


@pytest.mark.parametrize("jobs", ["1", "4"])
def test_local_unpack_loads_no_registry_or_container_modules(tmp_path: Path, jobs: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _MODULES_AFTER_UNPACK, str(DEMO),
                           str(tmp_path / "store"), jobs],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    modules_line, prctl_line = proc.stdout.splitlines()
    modules = set(eval(modules_line))  # a printed list of str
    assert not modules & {"ocilayers.remote", "ocilayers.registry", "ocilayers.httpclient",
                          "ocilayers.credentials", "ocilayers.store.containers",
                          "ocilayers.store.mounts", "ocilayers.mount", "zstandard"}, modules
    if jobs == "4":
        # Forked workers: the parent loaded their modules once (gzip layers: ISA-L, not
        # zstandard) and libc's prctl, so that no worker loads them again.
        assert {"ocilayers.extract", "ocilayers.tarsplit", "ocilayers.filewriters",
                "isal.igzip"} <= modules, modules
        assert prctl_line == "True"
