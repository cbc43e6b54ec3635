"""sources.py: reading every fixture, transports, stdin, refs, platforms, and broken sources."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import random
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FIXTURE_NON_IMAGES,
    FIXTURE_TRANSPORTS,
    FIXTURES,
    Layout,
    assert_one_line_error,
    chain_ids_by_spec,
    fixture_params,
    run_cli,
    run_module,
    skopeo,
    skopeo_transport,
)

REPO = FIXTURES.parent
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

Capsys = pytest.CaptureFixture[str]


def inspect_json(capsys: Capsys, *argv: str) -> dict[str, Any]:
    code, out, err = run_cli(["inspect", *argv, "--json"], capsys)
    assert code == 0, err
    assert err == ""
    result: dict[str, Any] = json.loads(out)
    return result


def test_every_fixture_is_in_the_table() -> None:
    on_disk = {p.name for p in FIXTURES.iterdir()} - FIXTURE_NON_IMAGES
    assert on_disk == set(FIXTURE_TRANSPORTS)


# --- every fixture against skopeo ---

@pytest.mark.parametrize("fixture", fixture_params())
def test_inspect_agrees_with_skopeo(fixture: str, capsys: Capsys) -> None:
    transport = skopeo_transport(fixture)
    config_raw = skopeo("inspect", "--raw", "--config", transport).stdout
    manifest = json.loads(skopeo("inspect", "--raw", transport).stdout)
    diff_ids = json.loads(config_raw)["rootfs"]["diff_ids"]

    info = inspect_json(capsys, str(FIXTURES / fixture))

    image_id = "sha256:" + hashlib.sha256(config_raw).hexdigest()
    assert info["image_id"] == image_id
    assert info["config_digest"] == image_id
    # Base layer first, in config order; ChainIDs by the spec's formula from skopeo's DiffIDs.
    assert [layer["diff_id"] for layer in info["layers"]] == diff_ids
    assert [layer["chain_id"] for layer in info["layers"]] == chain_ids_by_spec(diff_ids)
    assert [(layer["digest"], layer["size"]) for layer in info["layers"]] == [
        (layer["digest"], layer["size"]) for layer in manifest["layers"]]


# --- how a source is named ---

@pytest.mark.parametrize(("spec", "fixture"), [
    pytest.param("oci:fixtures/tiny:latest", "tiny", id="oci-with-ref"),
    pytest.param("oci:fixtures/tiny", "tiny", id="oci-without-ref"),
    pytest.param("oci:fixtures/demo:latest", "demo", id="oci-demo-bare-tag"),
    pytest.param("oci-archive:fixtures/tiny-oci.tar", "tiny-oci.tar", id="oci-archive"),
    pytest.param("oci-archive:fixtures/tiny-oci.tar:tiny:latest", "tiny-oci.tar",
                 id="oci-archive-with-ref"),
    pytest.param("docker-archive:fixtures/tiny-docker.tar", "tiny-docker.tar",
                 id="docker-archive"),
    pytest.param("docker-archive:fixtures/docker-save.tar", "docker-save.tar",
                 id="docker-archive-docker-save"),
    pytest.param("docker-archive:fixtures/docker-save.tar:committed:latest", "docker-save.tar",
                 id="docker-archive-with-ref"),
])
def test_transport_prefixes(spec: str, fixture: str, capsys: Capsys,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    want = inspect_json(capsys, f"fixtures/{fixture}")
    assert inspect_json(capsys, spec) == want


@pytest.mark.parametrize(("spec", "needle"), [
    pytest.param("oci:fixtures/tiny-oci.tar", "not an OCI layout", id="oci-on-a-tarball"),
    pytest.param("docker-archive:fixtures/tiny", "not a docker-archive",
                 id="docker-archive-on-a-dir"),
    pytest.param("oci-archive:fixtures/docker-save.tar", "not a oci-archive",
                 id="oci-archive-on-docker-save"),
    pytest.param("oci:fixtures/tiny:nope", "nope", id="oci-unknown-ref"),
])
def test_transport_mismatch_is_an_error(spec: str, needle: str, capsys: Capsys,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code, _, err = run_cli(["inspect", spec], capsys)
    assert_one_line_error(code, err, needle)


def _gzipped(src: Path, dest: Path) -> Path:
    with open(src, "rb") as fin, gzip.GzipFile(dest, "wb", mtime=0) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return dest


@pytest.mark.parametrize(("fixture", "gzip_it"), [
    pytest.param("tiny-oci.tar", False, id="oci-archive"),
    pytest.param("tiny-docker.tar", False, id="skopeo-docker-archive"),
    pytest.param("docker-save.tar", False, id="docker-save"),
    pytest.param("docker-save.tar", True, id="docker-save-gzipped"),
])
def test_stdin(fixture: str, gzip_it: bool, tmp_path: Path, capsys: Capsys) -> None:
    path = FIXTURES / fixture
    if gzip_it:
        path = _gzipped(path, tmp_path / "image.tar.gz")
    with open(path, "rb") as f:
        proc = run_module(["inspect", "-", "--json"], stdin=f)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert json.loads(proc.stdout) == inspect_json(capsys, str(FIXTURES / fixture))


def test_gzipped_docker_save(tmp_path: Path, capsys: Capsys) -> None:
    # `docker load` takes a gzipped `docker save`; so do we.
    gz = _gzipped(FIXTURES / "docker-save.tar", tmp_path / "committed.tar.gz")
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert inspect_json(capsys, str(gz)) == inspect_json(capsys, str(FIXTURES / "docker-save.tar"))


@pytest.mark.parametrize(("fixture", "name"), [
    pytest.param("tiny-oci.tar", "image.zip", id="oci-archive-named-zip"),
    pytest.param("docker-save.tar", "x.oci", id="docker-save-named-oci"),
    pytest.param("tiny-docker.tar", "noext", id="docker-archive-no-extension"),
])
def test_format_is_detected_by_content(fixture: str, name: str, tmp_path: Path,
                                       capsys: Capsys) -> None:
    shutil.copy(FIXTURES / fixture, tmp_path / name)
    assert inspect_json(capsys, str(tmp_path / name)) == inspect_json(
        capsys, str(FIXTURES / fixture))


# --- picking an image by ref ---

@pytest.mark.parametrize(("fixture", "ref"), [
    pytest.param("tiny-oci.tar", "tiny", id="oci-archive-short"),
    pytest.param("tiny-oci.tar", "tiny:latest", id="oci-archive-repo-tag"),
    pytest.param("tiny-oci.tar", "docker.io/library/tiny:latest", id="oci-archive-full"),
    pytest.param("demo", "latest", id="oci-bare-tag-ref-name"),
    pytest.param("tiny-docker.tar", "tiny", id="docker-archive-normalised-repotag"),
    pytest.param("docker-save.tar", "committed:latest", id="docker-save-repo-tag"),
    pytest.param("docker-save.tar", "docker.io/library/committed", id="docker-save-full"),
])
def test_ref_matching(fixture: str, ref: str, capsys: Capsys) -> None:
    path = str(FIXTURES / fixture)
    assert inspect_json(capsys, path, "--ref", ref) == inspect_json(capsys, path)


@pytest.mark.parametrize(("fixture", "ref", "listed"), [
    pytest.param("tiny-oci.tar", "nope", "tiny:latest", id="oci-archive"),
    pytest.param("tiny-oci.tar", "latest", "tiny:latest", id="bare-tag-is-not-a-repo-tag"),
    pytest.param("demo", "demo:latest", "latest", id="oci-dir"),
    pytest.param("docker-save.tar", "other:latest", "committed:latest", id="docker-save"),
])
def test_missing_ref_lists_refs(fixture: str, ref: str, listed: str, capsys: Capsys) -> None:
    code, _, err = run_cli(["inspect", str(FIXTURES / fixture), "--ref", ref], capsys)
    assert_one_line_error(code, err, repr(ref), listed)


def two_image_layout(tmp_path: Path) -> tuple[Layout, dict[str, str]]:
    """A copy of tiny whose index.json names two images: `one` (tiny) and `two` (its arm64 twin)."""
    lay = Layout.copy_of("tiny", tmp_path / "two-images")
    first = lay.manifest_descriptor()
    second, config_id = _arm64_twin(lay)
    lay.write_index({"schemaVersion": 2, "manifests": [
        {**first, "annotations": {REF_NAME: "one"}},
        {**second, "annotations": {REF_NAME: "two"}},
    ]})
    tiny_id = lay.manifest()["config"]["digest"]
    return lay, {"one": tiny_id, "two": config_id}


def _arm64_twin(lay: Layout) -> tuple[dict[str, Any], str]:
    """Store tiny's manifest again with an arm64 config; return (its descriptor, image ID)."""
    manifest = lay.manifest()
    config = lay.read_json_blob(manifest["config"]["digest"])
    config["architecture"] = "arm64"
    cdesc = lay.put_json_blob(config, manifest["config"]["mediaType"])
    mdesc = lay.put_json_blob({**manifest, "config": cdesc}, MEDIA_MANIFEST)
    return mdesc, cdesc["digest"]


def test_multi_image_layout_needs_a_ref(tmp_path: Path, capsys: Capsys) -> None:
    lay, _ = two_image_layout(tmp_path)
    code, _, err = run_cli(["inspect", str(lay.root)], capsys)
    assert_one_line_error(code, err, "--ref", "one", "two")


@pytest.mark.parametrize("ref", ["one", "two"])
def test_multi_image_layout_with_ref(ref: str, tmp_path: Path, capsys: Capsys) -> None:
    lay, ids = two_image_layout(tmp_path)
    assert inspect_json(capsys, str(lay.root), "--ref", ref)["image_id"] == ids[ref]


# --- picking a platform ---

def multi_platform_layout(tmp_path: Path, nested: bool = False) -> tuple[Layout, dict[str, str]]:
    """A copy of tiny whose index.json points at an image index: linux/amd64 (tiny's manifest)
    and linux/arm64 (a twin with an arm64 config). `nested` puts one more index in between.
    Returns the layout and {arch: image ID}."""
    lay = Layout.copy_of("tiny", tmp_path / "multi-platform")
    amd64 = lay.manifest_descriptor()
    amd64.pop("annotations", None)
    arm64, arm64_id = _arm64_twin(lay)
    index = lay.put_json_blob({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [
        {**amd64, "platform": {"os": "linux", "architecture": "amd64"}},
        {**arm64, "platform": {"os": "linux", "architecture": "arm64"}},
    ]}, MEDIA_INDEX)
    if nested:
        index = lay.put_json_blob({"schemaVersion": 2, "mediaType": MEDIA_INDEX,
                                   "manifests": [index]}, MEDIA_INDEX)
    lay.write_index({"schemaVersion": 2, "manifests": [
        {**index, "annotations": {REF_NAME: "latest"}}]})
    tiny_id = lay.read_json_blob(amd64["digest"])["config"]["digest"]
    return lay, {"amd64": tiny_id, "arm64": arm64_id}


@pytest.mark.parametrize(("argv", "arch"), [
    pytest.param(["--platform", "linux/amd64"], "amd64", id="amd64"),
    pytest.param(["--platform", "linux/arm64"], "arm64", id="arm64"),
    pytest.param(["--platform", "linux/arm64/v8"], "arm64", id="arm64-v8-normalised"),
    pytest.param(["--platform", "linux/arm64", "--ref", "latest"], "arm64", id="with-ref"),
])
@pytest.mark.parametrize("nested", [pytest.param(False, id="index"),
                                    pytest.param(True, id="nested-index")])
def test_platform_pick(argv: list[str], arch: str, nested: bool, tmp_path: Path,
                       capsys: Capsys) -> None:
    lay, ids = multi_platform_layout(tmp_path, nested)
    info = inspect_json(capsys, str(lay.root), *argv)
    assert info["image_id"] == ids[arch]
    assert info["platform"] == f"linux/{arch}"


def test_platform_defaults_to_host(tmp_path: Path, capsys: Capsys) -> None:
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64",
            "arm64": "arm64"}.get(platform.machine().lower())
    if arch is None:
        pytest.skip(f"the test index has no entry for host machine {platform.machine()}")
    lay, ids = multi_platform_layout(tmp_path)
    assert inspect_json(capsys, str(lay.root))["image_id"] == ids[arch]


def test_platform_list_in_index_json_itself(tmp_path: Path, capsys: Capsys) -> None:
    # index.json may itself be the multi-platform list (no ref names at all).
    lay, ids = multi_platform_layout(tmp_path)
    inner = lay.read_json_blob(lay.manifest_descriptor()["digest"])
    lay.write_index(inner)
    assert inspect_json(capsys, str(lay.root), "--platform", "linux/arm64")["image_id"] == \
        ids["arm64"]


def test_no_matching_platform_lists_available(tmp_path: Path, capsys: Capsys) -> None:
    lay, _ = multi_platform_layout(tmp_path)
    code, _, err = run_cli(["inspect", str(lay.root), "--platform", "linux/s390x"], capsys)
    assert_one_line_error(code, err, "linux/s390x", "linux/amd64", "linux/arm64")


def test_bad_platform_syntax(tmp_path: Path, capsys: Capsys) -> None:
    lay, _ = multi_platform_layout(tmp_path)
    code, _, err = run_cli(["inspect", str(lay.root), "--platform", "amd64"], capsys)
    assert_one_line_error(code, err, "amd64")


# --- hostile and broken sources ---

Broken = Callable[[Path], tuple[list[str], tuple[str, ...]]]
"""Build a broken source under tmp_path; return (ocilayers argv, needles for the message)."""


def _flip_layer(fixture: str, layer: int, where: float) -> Broken:
    def build(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
        lay = Layout.copy_of(fixture, tmp / "img")
        digest = lay.manifest()["layers"][layer]["digest"]
        path = lay.blob_path(digest)
        data = bytearray(path.read_bytes())
        data[int(len(data) * where)] ^= 0xFF
        path.write_bytes(bytes(data))
        # inspect does not read layers, so the damage is found by convert.
        return ["convert", str(lay.root), "-o", str(tmp / "out.tar")], (digest[7:19],)
    return build


def _flip_docker_layer(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    out = tmp / "img.tar"
    with tarfile.open(FIXTURES / "tiny-docker.tar") as src, tarfile.open(out, "w") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isreg() else None  # type: ignore[union-attr]
            if data is not None and member.name.endswith(".tar"):
                data = data[:700] + bytes([data[700] ^ 0xFF]) + data[701:]
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return ["convert", str(out), "-o", str(tmp / "out.tar")], ("digest mismatch",)


def _wrong_layer_size(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    manifest = lay.manifest()
    manifest["layers"][1]["size"] += 1
    lay.replace_manifest(manifest)
    return ["inspect", str(lay.root)], (manifest["layers"][1]["digest"], "size")


def _missing_layer_blob(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    digest = lay.manifest()["layers"][0]["digest"]
    lay.blob_path(digest).unlink()
    return ["inspect", str(lay.root)], (digest, "missing")


def _missing_manifest_blob(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    digest = lay.manifest_descriptor()["digest"]
    lay.blob_path(digest).unlink()
    return ["inspect", str(lay.root)], (digest, "missing")


def _index_not_json(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    (lay.root / "index.json").write_text('{"schemaVersion": 2, "manifests": [')
    return ["inspect", str(lay.root)], ("index.json", "JSON")


def _missing_oci_layout(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    (lay.root / "oci-layout").unlink()
    return ["inspect", str(lay.root)], ("oci-layout",)


def _bad_layout_version(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    (lay.root / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    return ["inspect", str(lay.root)], ("2.0.0",)


def _config_digest_mismatch(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    digest = lay.manifest()["config"]["digest"]
    path = lay.blob_path(digest)
    path.write_bytes(path.read_bytes().replace(b"tiny", b"tinY"))  # same size, other bytes
    return ["inspect", str(lay.root)], (digest, "digest mismatch")


def _diff_ids_count_mismatch(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    manifest = lay.manifest()
    manifest["layers"] = manifest["layers"][:1]
    lay.replace_manifest(manifest)
    return ["inspect", str(lay.root)], ("diff_ids",)


def _blob_symlink_escapes(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    lay = Layout.copy_of("tiny", tmp / "img")
    path = lay.blob_path(lay.manifest()["layers"][0]["digest"])
    shutil.copy(path, tmp / "outside")
    path.unlink()
    path.symlink_to(tmp / "outside")
    return ["inspect", str(lay.root)], ("escapes",)


def _no_such_path(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    return ["inspect", str(tmp / "nope")], (str(tmp / "nope"),)


def _not_an_image_dir(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    (tmp / "dir").mkdir()
    (tmp / "dir" / "hello.txt").write_text("hi\n")
    return ["inspect", str(tmp / "dir")], (str(tmp / "dir"),)


def _empty_file(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    (tmp / "empty.tar").write_bytes(b"")
    return ["inspect", str(tmp / "empty.tar")], ("empty.tar",)


def _text_file(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    (tmp / "notes.tar").write_text("not a tar\n" * 200)
    return ["inspect", str(tmp / "notes.tar")], ("notes.tar",)


def _truncated_oci_archive(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    data = (FIXTURES / "tiny-oci.tar").read_bytes()
    (tmp / "cut.tar").write_bytes(data[: len(data) // 2])
    return ["inspect", str(tmp / "cut.tar")], ("cut.tar",)


def _truncated_gzip_archive(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    gz = _gzipped(FIXTURES / "tiny-docker.tar", tmp / "img.tar.gz").read_bytes()
    (tmp / "cut.tar.gz").write_bytes(gz[: len(gz) // 2])
    return ["inspect", str(tmp / "cut.tar.gz")], ("cut.tar.gz", "gzip")


def _rewrite_docker_save(tmp: Path, edit: Callable[[list[dict[str, Any]]], str | None]
                         ) -> Path:
    """Copy docker-save.tar with manifest.json edited; `edit` may name one member to drop."""
    with tarfile.open(FIXTURES / "docker-save.tar") as src:
        members = [(m, src.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
                   for m in src]
    raw = dict((m.name, d) for m, d in members)["manifest.json"]
    assert raw is not None
    manifest = json.loads(raw)
    drop = edit(manifest)
    out = tmp / "broken-save.tar"
    with tarfile.open(out, "w") as dst:
        for m, data in members:
            if m.name == drop:
                continue
            if m.name == "manifest.json":
                data = json.dumps(manifest).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    return out


def _compressed_garbage(magic: bytes) -> Callable[[Path], tuple[list[str], tuple[str, ...]]]:
    """Found by fuzzing: gzip or zstd magic, then noise, as a whole archive: the spooling step
    let IsalError / ZstdError through."""
    def build(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
        path = tmp / "garbage.bin"
        path.write_bytes(magic + bytes(random.Random(7).getrandbits(8) for _ in range(65536)))
        return ["inspect", str(path)], ("corrupt",)
    return build


def _docker_save_nested_manifest(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    """JSON nested deeper than the decoder's recursion limit: an error, not a RecursionError."""
    data = b"[" * 100_000 + b"]" * 100_000
    out = tmp / "nested.tar"
    with tarfile.open(out, "w") as t:
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    return ["inspect", str(out)], ("manifest.json is not valid JSON",)


def _docker_save_missing_layer(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    def edit(manifest: list[dict[str, Any]]) -> str:
        return str(manifest[0]["Layers"][2])  # drop the member the manifest points at
    out = _rewrite_docker_save(tmp, edit)
    return ["inspect", str(out)], ("missing",)


def _docker_save_dangling_layer_path(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    def edit(manifest: list[dict[str, Any]]) -> None:
        manifest[0]["Layers"][1] = "0" * 64 + "/layer.tar"
    out = _rewrite_docker_save(tmp, edit)
    return ["inspect", str(out)], ("0" * 64,)


BROKEN = [
    pytest.param(_flip_layer("tiny", 0, 0.5), id="corrupt-gzip-layer-crc"),
    pytest.param(_flip_layer("tiny", 1, 0.5), id="corrupt-gzip-layer-deflate"),
    pytest.param(_flip_layer("demo", 3, 0.9), id="corrupt-gzip-layer-length"),
    pytest.param(_flip_layer("tiny-zstd", 0, 0.5), id="corrupt-zstd-layer"),
    pytest.param(_flip_layer("tiny-uncompressed", 1, 0.5), id="corrupt-uncompressed-layer"),
    pytest.param(_flip_docker_layer, id="corrupt-docker-archive-layer"),
    pytest.param(_wrong_layer_size, id="wrong-size-in-descriptor"),
    pytest.param(_missing_layer_blob, id="missing-layer-blob"),
    pytest.param(_missing_manifest_blob, id="missing-manifest-blob"),
    pytest.param(_index_not_json, id="index-json-not-json"),
    pytest.param(_missing_oci_layout, id="missing-oci-layout"),
    pytest.param(_bad_layout_version, id="unsupported-layout-version"),
    pytest.param(_config_digest_mismatch, id="config-digest-mismatch"),
    pytest.param(_diff_ids_count_mismatch, id="diff-ids-count-mismatch"),
    pytest.param(_blob_symlink_escapes, id="blob-symlink-escapes-layout"),
    pytest.param(_no_such_path, id="path-does-not-exist"),
    pytest.param(_not_an_image_dir, id="dir-not-an-image"),
    pytest.param(_empty_file, id="empty-file"),
    pytest.param(_text_file, id="text-file"),
    pytest.param(_truncated_oci_archive, id="truncated-oci-archive"),
    pytest.param(_truncated_gzip_archive, id="truncated-gzipped-archive"),
    pytest.param(_docker_save_missing_layer, id="docker-save-missing-layer"),
    pytest.param(_docker_save_nested_manifest, id="docker-save-manifest-nested-100k-deep"),
    pytest.param(_compressed_garbage(b"\x1f\x8b\x08\x00"), id="gzip-magic-then-noise"),
    pytest.param(_compressed_garbage(b"\x28\xb5\x2f\xfd"), id="zstd-magic-then-noise"),
    pytest.param(_docker_save_dangling_layer_path, id="docker-save-dangling-layer-path"),
]


@pytest.mark.parametrize("build", BROKEN)
def test_broken_source_is_one_line_error(build: Broken, tmp_path: Path, capsys: Capsys) -> None:
    argv, needles = build(tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *needles)
    assert out == ""
    if argv[0] == "convert":
        assert not os.path.lexists(argv[3])


# --- found by fuzzing ---

def test_fifo_in_a_layout_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """open() of a FIFO blocks until a writer comes: a layout's files are opened non-blocking
    and must be regular files."""
    layout = tmp_path / "fifo"
    shutil.copytree(FIXTURES / "demo", layout)
    (layout / "index.json").unlink()
    os.mkfifo(layout / "index.json")
    proc = run_module(["inspect", str(layout)])  # (a hang fails by run_module's timeout)
    assert_one_line_error(proc.returncode, proc.stderr, "index.json: not a regular file")


def test_archive_with_too_many_members_refused(tmp_path: Path) -> None:
    """Not an image: tarfile keeps every member header, so memory would grow with them."""
    path = tmp_path / "many.tar"
    empty = tarfile.TarInfo("f")
    with open(path, "wb") as f:
        for i in range(65537):
            empty.name = f"f{i}"
            f.write(empty.tobuf(format=tarfile.USTAR_FORMAT))
        f.write(b"\0" * 1024)
    proc = run_module(["inspect", str(path)])
    assert_one_line_error(proc.returncode, proc.stderr, "more than 65536 members")


def test_lone_surrogate_in_the_config_is_printed(tmp_path: Path) -> None:
    """JSON may escape a lone surrogate ("\\ud800"): it is the image's text, and printing it
    must not end in UnicodeEncodeError."""
    layout = tmp_path / "img"
    shutil.copytree(FIXTURES / "demo", layout)
    blobs = layout / "blobs" / "sha256"

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return digest

    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads((blobs / mdesc["digest"].split(":")[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    config["os"] = "linux\ud800"
    raw = json.dumps(config).encode()  # ensure_ascii: the surrogate travels as \\ud800
    manifest["config"].update(digest="sha256:" + put(raw), size=len(raw))
    mraw = json.dumps(manifest).encode()
    mdesc.update(digest="sha256:" + put(mraw), size=len(mraw))
    mdesc.pop("platform", None)
    (layout / "index.json").write_text(json.dumps(index))
    proc = run_module(["inspect", str(layout)])
    assert proc.returncode == 0, proc.stderr
    assert "linux\\ud800" in proc.stdout


def test_pipe_as_source_is_spooled(tmp_path: Path) -> None:
    """A FIFO or a pipe (`unpack <(zcat image.tar.gz)`) cannot seek: it is read once into a
    temp file, as stdin is, instead of failing with 'not seekable'."""
    import threading

    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    data = (FIXTURES / "docker-save.tar").read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        proc = run_module(["inspect", str(fifo), "--json"])
    finally:
        writer.join(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tags"] == ["committed:latest"]
