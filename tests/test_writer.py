"""writer.py (through `ocilayers convert`): every fixture into every format and compression."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import (
    FIXTURES,
    Layout,
    assert_one_line_error,
    fixture_params,
    requires_tool,
    run_cli,
    skopeo,
    tree_files,
)

FORMATS = ["oci", "oci-archive", "docker-archive"]
COMPRESSIONS = ["gzip", "zstd", "none"]
TAG = "ocilayers-test:x"  # written into every output, so every output has one known ref
LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}

Capsys = pytest.CaptureFixture[str]


def convert(capsys: Capsys, source: Path | str, out: Path, fmt: str, compression: str,
            *extra: str) -> dict[str, Any]:
    """`ocilayers convert SOURCE -o OUT --json` that must succeed; returns its JSON."""
    code, stdout, err = run_cli(["convert", str(source), "-o", str(out), "--format", fmt,
                                 "--compression", compression, "--tag", TAG, "--json", *extra],
                                capsys)
    assert code == 0, err
    result: dict[str, Any] = json.loads(stdout)
    return result


def inspect(capsys: Capsys, source: Path | str) -> dict[str, Any]:
    code, out, err = run_cli(["inspect", str(source), "--json"], capsys)
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def snapshot(path: Path) -> dict[str, bytes]:
    """An output's bytes: the archive itself, or every file of a layout dir."""
    return tree_files(path) if path.is_dir() else {"": path.read_bytes()}


def skopeo_transport(out: Path, fmt: str) -> str:
    return {"oci": f"oci:{out}:x", "oci-archive": f"oci-archive:{out}",
            "docker-archive": f"docker-archive:{out}"}[fmt]


@dataclass
class Output:
    path: Path
    layers: list[dict[str, Any]]  # the layer descriptors `convert --json` reported


Outputs = dict[tuple[str, str, str], Output]


@pytest.fixture(scope="session")
def outputs() -> Outputs:
    """Converted outputs, shared by the tests below: (fixture, format, compression) -> Output."""
    return {}


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converted")


def converted(outputs: Outputs, out_dir: Path, capsys: Capsys, fixture: str, fmt: str,
              compression: str) -> Output:
    """The cached output of converting `fixture` (converted on first use)."""
    key = (fixture, fmt, compression)
    if key not in outputs:
        path = out_dir / f"{fixture}.{fmt}.{compression}"
        layers = convert(capsys, FIXTURES / fixture, path, fmt, compression)["layers"]
        outputs[key] = Output(path, layers)
    return outputs[key]


MATRIX = [pytest.param(fx.values[0], fmt, comp, id=f"{fx.id}-{fmt}-{comp}")
          for fx in fixture_params() for fmt in FORMATS for comp in COMPRESSIONS]


@pytest.mark.parametrize(("fixture", "fmt", "compression"), MATRIX)
def test_convert_is_byte_deterministic(fixture: str, fmt: str, compression: str,
                                       outputs: Outputs, out_dir: Path, tmp_path: Path,
                                       capsys: Capsys) -> None:
    first = converted(outputs, out_dir, capsys, fixture, fmt, compression).path
    second = tmp_path / "again"
    convert(capsys, FIXTURES / fixture, second, fmt, compression)
    assert snapshot(second) == snapshot(first)


@pytest.mark.parametrize(("fixture", "fmt", "compression"), MATRIX)
def test_convert_keeps_image_and_skopeo_accepts_it(
        fixture: str, fmt: str, compression: str, outputs: Outputs, out_dir: Path,
        tmp_path: Path, capsys: Capsys) -> None:
    output = converted(outputs, out_dir, capsys, fixture, fmt, compression)
    out, written = output.path, output.layers
    assert {layer["media_type"] for layer in written} <= {LAYER_MEDIA_TYPES[compression]}
    before, after = inspect(capsys, FIXTURES / fixture), inspect(capsys, out)
    assert after["image_id"] == before["image_id"]
    assert [layer["diff_id"] for layer in after["layers"]] == \
        [layer["diff_id"] for layer in before["layers"]]
    assert [(layer["digest"], layer["size"]) for layer in after["layers"]] == \
        [(layer["digest"], layer["size"]) for layer in written]
    # skopeo checks every blob's digest and size as it copies.
    skopeo("copy", "--quiet", skopeo_transport(out, fmt), f"oci:{tmp_path / 'copy'}:x")
    # Read the config from the output itself: a docker-archive -> oci copy rewrites it.
    config = skopeo("inspect", "--raw", "--config", skopeo_transport(out, fmt)).stdout
    assert "sha256:" + hashlib.sha256(config).hexdigest() == before["image_id"]


def output_blob(out: Path, digest: str) -> bytes:
    """A blob of a written image, from a layout dir or from inside an archive."""
    name = "blobs/" + digest.replace(":", "/")
    if out.is_dir():
        return (out / name).read_bytes()
    with tarfile.open(out) as tf:
        f = tf.extractfile(name)
        assert f is not None, name
        with f:
            return f.read()


MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd", "none": b""}


def decompress(blob: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.decompress(blob)
    if compression == "zstd":
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob),
                                                        read_across_frames=True) as r:
            return r.read()
    return blob


@pytest.mark.parametrize(("fixture", "fmt", "compression"), MATRIX)
def test_written_layers_are_what_they_claim(fixture: str, fmt: str, compression: str,
                                            outputs: Outputs, out_dir: Path,
                                            capsys: Capsys) -> None:
    # Checked without ocilayers: each blob has its digest, its compression's magic, and
    # decompresses (gzip module / zstandard) to the DiffID the config lists.
    output = converted(outputs, out_dir, capsys, fixture, fmt, compression)
    diff_ids = [layer["diff_id"] for layer in inspect(capsys, FIXTURES / fixture)["layers"]]
    assert len(output.layers) == len(diff_ids)
    for desc, diff_id in zip(output.layers, diff_ids, strict=True):
        blob = output_blob(output.path, desc["digest"])
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
        assert len(blob) == desc["size"]
        assert blob.startswith(MAGIC[compression])
        assert "sha256:" + hashlib.sha256(decompress(blob, compression)).hexdigest() == diff_id


# --- umoci unpacks what we write, to the same tree as the original ---

def umoci_unpack(image: str, bundle: Path) -> Path:
    """`umoci unpack --image IMAGE BUNDLE`; returns the rootfs."""
    exe = requires_tool("umoci")
    proc = subprocess.run([exe, "unpack", "--image", image, str(bundle)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return bundle / "rootfs"


def describe_tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """What a rootfs holds: per path its type, mode, owner, size, content, link target, xattrs."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            content = target = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                k: os.getxattr(path, k) for k in sorted(os.listxattr(path))}
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                        st.st_nlink if stat.S_ISREG(st.st_mode) else None,
                        content, target, xattrs)
    return out


@pytest.fixture(scope="session")
def reference_trees() -> dict[str, dict[str, Any]]:
    """umoci's rootfs of an original fixture, computed once per fixture."""
    return {}


def reference_tree(cache: dict[str, Any], factory: pytest.TempPathFactory,
                   original: str) -> dict[str, tuple[Any, ...]]:
    """umoci's rootfs of an original fixture (unpacked from a private copy, once per session)."""
    if original not in cache:
        base = factory.mktemp(f"orig-{original}")
        lay = Layout.copy_of(original, base / "image")
        cache[original] = describe_tree(umoci_unpack(f"{lay.root}:latest", base / "bundle"))
    tree: dict[str, tuple[Any, ...]] = cache[original]
    return tree


# (converted fixture, the umoci-readable original whose tree it must reproduce)
UNPACK_CASES = [
    ("demo", "demo"), ("tiny", "tiny"), ("umoci-insert-opaque", "umoci-insert-opaque"),
    ("tiny-oci.tar", "tiny"), ("tiny-zstd", "tiny"), ("tiny-uncompressed", "tiny"),
    ("tiny-docker.tar", "tiny"),
]


@pytest.mark.parametrize("compression", ["gzip", "none"])  # umoci 0.4.7 cannot read zstd
@pytest.mark.parametrize(("fixture", "original"),
                         [pytest.param(f, o, id=f) for f, o in UNPACK_CASES])
def test_umoci_unpacks_output_like_original(
        fixture: str, original: str, compression: str, reference_trees: dict[str, Any],
        outputs: Outputs, out_dir: Path, tmp_path_factory: pytest.TempPathFactory,
        tmp_path: Path, capsys: Capsys) -> None:
    requires_tool("umoci")
    want = reference_tree(reference_trees, tmp_path_factory, original)
    out = converted(outputs, out_dir, capsys, fixture, "oci", compression).path
    layout = tmp_path / "image"
    shutil.copytree(out, layout)  # a private copy: the shared output stays untouched
    assert describe_tree(umoci_unpack(f"{layout}:x", tmp_path / "bundle")) == want


def test_demo_rootfs_is_the_documented_merge(
        reference_trees: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    # Guards the oracle itself: umoci's tree of the demo fixture is the merge README.md describes.
    requires_tool("umoci")
    tree = reference_tree(reference_trees, tmp_path_factory, "demo")
    assert sorted(p for p in tree if p.startswith("opt/other/")) == ["opt/other/three.txt"]
    assert "usr/share/demo/b.txt" not in tree
    assert "var/cache" in tree
    assert not [p for p in tree if p.startswith("var/cache/")]
    assert tree["usr/share/demo/hard1"][5] == 2  # the hardlink pair survives (nlink)


# --- where the output goes ---

def test_oci_output_into_non_empty_dir_errors(tmp_path: Path, capsys: Capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    code, stdout, err = run_cli(["convert", str(FIXTURES / "tiny-oci.tar"), "-o", str(out),
                                 "--format", "oci"], capsys)
    assert_one_line_error(code, err, str(out))
    assert stdout == ""
    assert tree_files(out) == {"keep.txt": b"mine\n"}


def test_oci_output_into_empty_dir_works(tmp_path: Path, capsys: Capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    convert(capsys, FIXTURES / "tiny-oci.tar", out, "oci", "gzip")
    assert (out / "index.json").is_file()
    assert inspect(capsys, out)["image_id"] == inspect(capsys, FIXTURES / "tiny")["image_id"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_convert_leaves_nothing(fmt: str, tmp_path: Path, capsys: Capsys) -> None:
    lay = Layout.copy_of("tiny-uncompressed", tmp_path / "src")
    top = lay.blob_path(lay.manifest()["layers"][-1]["digest"])  # fail after layer 1 is written
    data = bytearray(top.read_bytes())
    data[len(data) // 2] ^= 0xFF
    top.write_bytes(bytes(data))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    code, _, err = run_cli(["convert", str(lay.root), "-o", str(out), "--format", fmt], capsys)
    assert_one_line_error(code, err, "mismatch")
    assert os.listdir(work) == []  # no output, no temp files beside it


def test_convert_from_oci_dir_closes_its_blobs(tmp_path: Path, capsys: Capsys) -> None:
    # filterwarnings=error turns a blob file left for the GC to close into a failure here.
    convert(capsys, FIXTURES / "tiny", tmp_path / "out.tar", "oci-archive", "gzip")


# --- errors name the output path, never a temp file ---

@pytest.mark.parametrize("command", ["convert", "export"])
def test_output_in_a_missing_dir_names_the_output(command: str, tmp_path: Path,
                                                  capsys: Capsys) -> None:
    root = tmp_path / "store"
    what = str(FIXTURES / "tiny")
    if command == "export":
        code, _, err = run_cli(["--root", str(root), "unpack", what, "--tag", "tiny:1"],
                               capsys)
        assert code == 0, err
        what = "tiny:1"
    for fmt in FORMATS:
        out_path = f"/nonexistent-{os.getpid()}/dir/x.tar"
        code, stdout, err = run_cli(["--root", str(root), command, what, "-o", out_path,
                                     "--format", fmt], capsys)
        line = assert_one_line_error(
            code, err, f"{out_path}: the directory /nonexistent-{os.getpid()}/dir does not exist")
        assert ".ocilayers-" not in line and stdout == ""
    # a parent that is a file, and (archive formats) an output that is a directory
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["--root", str(root), command, what, "-o",
                            str(tmp_path / "file" / "x.tar")], capsys)
    assert_one_line_error(code, err, f"{tmp_path / 'file' / 'x.tar'}: the directory "
                                     f"{tmp_path / 'file'} is not a directory")
    (tmp_path / "adir").mkdir()
    code, _, err = run_cli(["--root", str(root), command, what, "-o", str(tmp_path / "adir")],
                           capsys)
    line = assert_one_line_error(code, err, f"{tmp_path / 'adir'}: is a directory")
    assert ".ocilayers-" not in line
    assert sorted(os.listdir(tmp_path)) == sorted(["adir", "file"]
                                                  + (["store"] if command == "export" else []))
    assert os.listdir(tmp_path / "adir") == []


def test_relative_output_in_a_missing_dir(tmp_path: Path, capsys: Capsys,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["convert", str(FIXTURES / "tiny"), "-o", "sub/x.tar"], capsys)
    assert_one_line_error(code, err, "sub/x.tar: the directory sub does not exist")


# --- an output without a tag says so ---

@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_without_a_tag_notes_it(fmt: str, tmp_path: Path, capsys: Capsys) -> None:
    """fixtures/demo's only ref name is the bare `latest`, which names no repository: the
    output has no tag, and convert says so once (not with -q, not with --tag)."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(["convert", str(FIXTURES / "demo"), "-o", str(out),
                                 "--format", fmt], capsys)
    assert code == 0, err
    assert stdout.strip().startswith("sha256:")
    notes = [ln for ln in err.splitlines() if ln]
    assert len(notes) == 1, err
    assert notes[0].startswith("ocilayers: note: ") and "no tag" in notes[0], notes
    assert "--tag" in notes[0]
    if fmt == "docker-archive":
        with tarfile.open(out) as tf:
            f = tf.extractfile("manifest.json")
            assert f is not None
            (entry,) = json.loads(f.read())
            assert entry["RepoTags"] is None  # as dockerd writes an untagged image
            assert "repositories" not in tf.getnames()
    for extra in (["-q"], ["--tag", "demo:1"]):
        again = tmp_path / f"again{extra[0]}"
        code, _, err = run_cli(["convert", str(FIXTURES / "demo"), "-o", str(again),
                                "--format", fmt, *extra], capsys)
        assert (code, err) == (0, ""), err
    code, _, err = run_cli(["convert", str(FIXTURES / "docker-save.tar"), "-o",
                            str(tmp_path / "tagged"), "--format", fmt], capsys)
    assert (code, err) == (0, ""), err  # the source's RepoTags: a tag, no note


# --- help states the defaults ---

@pytest.mark.parametrize("command", ["convert", "export"])
def test_help_states_every_default(command: str, capsys: Capsys) -> None:
    import argparse

    from ocilayers.cli import build_parser, commands

    parser = commands(build_parser())[command]
    checked = 0
    for action in parser._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        text = (action.help or "") % {**vars(action), "prog": parser.prog}  # as argparse does
        assert f"(default: {action.default})" in text, (action.option_strings, action.help)
        checked += 1
    assert checked >= 2  # --format and --compression
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "(default: oci-archive)" in text and "(default: gzip)" in text
