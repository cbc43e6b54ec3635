"""Every OCI output satisfies the image-spec's JSON schemas (opencontainers/image-spec
schema/*.json, the same in v1.0.2, v1.1.0, v1.1.1 and main): config, manifest, index,
descriptors and oci-layout.

The schemas are encoded below as plain checks (no jsonschema package): `config_problems`
(config-schema.json, plus validator.go's Env rule), `manifest_problems`
(image-manifest-schema.json), `index_problems` (image-index-schema.json),
`descriptor_problems` (content-descriptor.json with defs-descriptor.json and go-digest's
sha256 rule). Each returns what is wrong, [] for a valid document; the validator's own tests
come first.

dockerd writes `"Env":null` for an image with no environment (`docker import`); the schema
wants an array there (it allows null only for Entrypoint, Cmd, Volumes and Labels; OnBuild is
not in it). An OCI output leaves such members out of the config bytes (config.md: a null
OPTIONAL field "is equivalent to being absent") and nothing else; a docker-archive keeps
Docker's bytes, as `docker save` does, so `docker load` gives back the same image ID.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, Layout, fixture_params, run_cli

Capsys = pytest.CaptureFixture[str]

OCI_FORMATS = ["oci", "oci-archive"]
COMPRESSIONS = ["gzip", "zstd", "none"]
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_LAYERS = {"application/vnd.oci.image.layer.v1.tar",
              "application/vnd.oci.image.layer.v1.tar+gzip",
              "application/vnd.oci.image.layer.v1.tar+zstd"}

# defs-descriptor.json
MEDIA_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/"
                           r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
SHA256_RE = re.compile(r"^sha256:[a-f0-9]{64}$")  # go-digest's Validate for sha256
# "format": "date-time" (RFC 3339 section 5.6)
DATE_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?"
                          r"(?:[Zz]|[+-]\d{2}:\d{2})$")
ENV_RE = re.compile(r"^[^=]+=.*$")  # schema/validator.go validateConfig


# ============================================================================================
# The schemas, as checks
# ============================================================================================

def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _string(obj: Mapping[str, Any], key: str, where: str, out: list[str]) -> None:
    if key in obj and not isinstance(obj[key], str):
        out.append(f"{where}{key}: want a string, got {obj[key]!r}")


def _strings(obj: Mapping[str, Any], key: str, where: str, out: list[str], *,
             nullable: bool = False) -> None:
    if key not in obj or (nullable and obj[key] is None):
        return
    v = obj[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        out.append(f"{where}{key}: want an array of strings, got {v!r}")


def _map(obj: Mapping[str, Any], key: str, where: str, out: list[str], values: type, *,
         nullable: bool = False) -> None:
    """mapStringString (values str) / mapStringObject (values dict), defs.json."""
    if key not in obj or (nullable and obj[key] is None):
        return
    v = obj[key]
    if not isinstance(v, dict) or not all(
            isinstance(x, values) for k, x in v.items() if len(k) >= 1):
        out.append(f"{where}{key}: want an object of {values.__name__}, got {v!r}")


def config_problems(config: object) -> list[str]:
    """schema/config-schema.json (+ validator.go: every Env entry is NAME=VALUE)."""
    out: list[str] = []
    if not isinstance(config, dict):
        return ["config: want an object"]
    for key in ("architecture", "os", "rootfs"):
        if key not in config:
            out.append(f"{key}: required")
    for key in ("created", "author", "architecture", "variant", "os", "os.version"):
        _string(config, key, "", out)
    if isinstance(config.get("created"), str) and not DATE_TIME_RE.match(config["created"]):
        out.append(f"created: not a date-time: {config['created']!r}")
    _strings(config, "os.features", "", out)
    if "config" in config:
        c = config["config"]
        if not isinstance(c, dict):
            out.append(f"config: want an object, got {c!r}")
        else:
            for key in ("User", "WorkingDir", "StopSignal"):
                _string(c, key, "config.", out)
            _map(c, "ExposedPorts", "config.", out, dict)
            _strings(c, "Env", "config.", out)
            for e in c.get("Env") or []:
                if isinstance(e, str) and not ENV_RE.match(e):
                    out.append(f"config.Env: unexpected entry {e!r}")
            _strings(c, "Entrypoint", "config.", out, nullable=True)
            _strings(c, "Cmd", "config.", out, nullable=True)
            _map(c, "Volumes", "config.", out, dict, nullable=True)
            _map(c, "Labels", "config.", out, str, nullable=True)
            if "ArgsEscaped" in c and not isinstance(c["ArgsEscaped"], bool):
                out.append(f"config.ArgsEscaped: want a boolean, got {c['ArgsEscaped']!r}")
    rootfs = config.get("rootfs")
    if "rootfs" in config:
        if not isinstance(rootfs, dict):
            out.append(f"rootfs: want an object, got {rootfs!r}")
        else:
            if "diff_ids" not in rootfs:
                out.append("rootfs.diff_ids: required")
            _strings(rootfs, "diff_ids", "rootfs.", out)
            if rootfs.get("type") != "layers":
                out.append(f"rootfs.type: want 'layers', got {rootfs.get('type')!r}")
    if "history" in config:
        history = config["history"]
        if not isinstance(history, list):
            out.append(f"history: want an array, got {history!r}")
        else:
            for i, h in enumerate(history):
                where = f"history[{i}]."
                if not isinstance(h, dict):
                    out.append(f"history[{i}]: want an object, got {h!r}")
                    continue
                for key in ("created", "author", "created_by", "comment"):
                    _string(h, key, where, out)
                if isinstance(h.get("created"), str) and not DATE_TIME_RE.match(h["created"]):
                    out.append(f"{where}created: not a date-time: {h['created']!r}")
                if "empty_layer" in h and not isinstance(h["empty_layer"], bool):
                    out.append(f"{where}empty_layer: want a boolean, got {h['empty_layer']!r}")
    return out


def descriptor_problems(desc: object, where: str = "descriptor") -> list[str]:
    """content-descriptor.json: mediaType, size, digest required; their shapes; urls,
    annotations (string -> string), data, artifactType."""
    if not isinstance(desc, dict):
        return [f"{where}: want an object, got {desc!r}"]
    out: list[str] = []
    for key in ("mediaType", "size", "digest"):
        if key not in desc:
            out.append(f"{where}.{key}: required")
    for key in ("mediaType", "artifactType"):
        if key in desc and not (isinstance(desc[key], str) and MEDIA_TYPE_RE.match(desc[key])):
            out.append(f"{where}.{key}: not a media type: {desc[key]!r}")
    if "size" in desc and not (_is_int(desc["size"]) and 0 <= desc["size"] < 2 ** 63):
        out.append(f"{where}.size: want an integer >= 0, got {desc['size']!r}")
    if "digest" in desc:
        d = desc["digest"]
        if not (isinstance(d, str) and DIGEST_RE.match(d)):
            out.append(f"{where}.digest: not a digest: {d!r}")
        elif d.startswith("sha256:") and not SHA256_RE.match(d):
            out.append(f"{where}.digest: not a sha256 digest: {d!r}")
    _strings(desc, "urls", f"{where}.", out)
    _string(desc, "data", f"{where}.", out)
    _map(desc, "annotations", f"{where}.", out, str)
    return out


def manifest_problems(manifest: object) -> list[str]:
    """image-manifest-schema.json: schemaVersion 2, config and layers (at least one)
    descriptors, optional mediaType, artifactType, subject, annotations."""
    if not isinstance(manifest, dict):
        return ["manifest: want an object"]
    out: list[str] = []
    for key in ("schemaVersion", "config", "layers"):
        if key not in manifest:
            out.append(f"manifest.{key}: required")
    if "schemaVersion" in manifest and not (_is_int(manifest["schemaVersion"])
                                            and manifest["schemaVersion"] == 2):
        out.append(f"manifest.schemaVersion: want 2, got {manifest['schemaVersion']!r}")
    for key in ("mediaType", "artifactType"):
        if key in manifest and not (isinstance(manifest[key], str)
                                    and MEDIA_TYPE_RE.match(manifest[key])):
            out.append(f"manifest.{key}: not a media type: {manifest[key]!r}")
    if "config" in manifest:
        out += descriptor_problems(manifest["config"], "manifest.config")
    if "subject" in manifest:
        out += descriptor_problems(manifest["subject"], "manifest.subject")
    layers = manifest.get("layers")
    if "layers" in manifest:
        if not isinstance(layers, list) or not layers:
            out.append(f"manifest.layers: want an array of at least 1, got {layers!r}")
        else:
            for i, d in enumerate(layers):
                out += descriptor_problems(d, f"manifest.layers[{i}]")
    _map(manifest, "annotations", "manifest.", out, str)
    return out


def index_problems(index: object) -> list[str]:
    """image-index-schema.json: schemaVersion 2, manifests (descriptors, with an optional
    platform: architecture and os required), optional mediaType, subject, annotations."""
    if not isinstance(index, dict):
        return ["index: want an object"]
    out: list[str] = []
    for key in ("schemaVersion", "manifests"):
        if key not in index:
            out.append(f"index.{key}: required")
    if "schemaVersion" in index and not (_is_int(index["schemaVersion"])
                                         and index["schemaVersion"] == 2):
        out.append(f"index.schemaVersion: want 2, got {index['schemaVersion']!r}")
    for key in ("mediaType", "artifactType"):
        if key in index and not (isinstance(index[key], str) and MEDIA_TYPE_RE.match(index[key])):
            out.append(f"index.{key}: not a media type: {index[key]!r}")
    manifests = index.get("manifests")
    if "manifests" in index and not isinstance(manifests, list):
        out.append(f"index.manifests: want an array, got {manifests!r}")
    for i, d in enumerate(manifests if isinstance(manifests, list) else []):
        where = f"index.manifests[{i}]"
        out += descriptor_problems(d, where)
        p = d.get("platform") if isinstance(d, dict) else None
        if isinstance(d, dict) and "platform" in d:
            if not isinstance(p, dict):
                out.append(f"{where}.platform: want an object")
            else:
                for key in ("architecture", "os"):
                    if key not in p:
                        out.append(f"{where}.platform.{key}: required")
                for key in ("architecture", "os", "os.version", "variant"):
                    _string(p, key, f"{where}.platform.", out)
                _strings(p, "os.features", f"{where}.platform.", out)
    if "subject" in index:
        out += descriptor_problems(index["subject"], "index.subject")
    _map(index, "annotations", "index.", out, str)
    return out


def layout_problems(files: Mapping[str, bytes], *, oci_config: bool = True) -> list[str]:
    """An image layout's files (dir or archive): oci-layout (image-layout-schema.json),
    index.json, and every manifest and config it points to; each blob there with its digest
    and size. `oci_config=False` skips the config schema (a docker-archive keeps Docker's)."""
    out: list[str] = []
    layout = json.loads(files["oci-layout"])
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        out.append(f"oci-layout: want imageLayoutVersion, got {layout!r}")

    def blob(desc: Mapping[str, Any], where: str) -> bytes | None:
        data = files.get("blobs/" + str(desc.get("digest", "")).replace(":", "/"))
        if data is None:
            out.append(f"{where}: blob {desc.get('digest')} missing")
        elif ("sha256:" + hashlib.sha256(data).hexdigest(), len(data)) != \
                (desc.get("digest"), desc.get("size")):
            out.append(f"{where}: blob does not match its descriptor")
        return data

    index = json.loads(files["index.json"])
    out += index_problems(index)
    if index.get("mediaType") != OCI_INDEX:
        out.append(f"index.mediaType: {index.get('mediaType')!r}")
    for i, desc in enumerate(index.get("manifests") or []):
        if desc.get("mediaType") != OCI_MANIFEST:
            out.append(f"index.manifests[{i}].mediaType: {desc.get('mediaType')!r}")
            continue
        raw = blob(desc, f"index.manifests[{i}]")
        if raw is None:
            continue
        manifest = json.loads(raw)
        out += manifest_problems(manifest)
        if manifest.get("mediaType") != OCI_MANIFEST:
            out.append(f"manifest.mediaType: {manifest.get('mediaType')!r}")
        if manifest["config"].get("mediaType") != OCI_CONFIG:
            out.append(f"manifest.config.mediaType: {manifest['config'].get('mediaType')!r}")
        for j, layer in enumerate(manifest.get("layers") or []):
            if layer.get("mediaType") not in OCI_LAYERS:
                out.append(f"manifest.layers[{j}].mediaType: {layer.get('mediaType')!r}")
            blob(layer, f"manifest.layers[{j}]")
        config_raw = blob(manifest["config"], "manifest.config")
        if config_raw is not None and oci_config:
            config = json.loads(config_raw)
            out += config_problems(config)
            diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
            if len(diff_ids) != len(manifest.get("layers") or []):
                out.append("config: rootfs.diff_ids and manifest.layers differ in length")
    return out


# ============================================================================================
# The checks themselves
# ============================================================================================

# What dockerd 20.10 writes for `docker import` (daemon/images/image_import.go: an empty
# container.Config; image.Image.MarshalJSON sorts the top-level keys, the rest is in Go
# struct order), for tiny's two layers. `\u003e` is how Go writes `>`.
DOCKER_EMPTY_CONFIG = (
    '{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,'
    '"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,'
    '"Cmd":null,"Image":"","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,'
    '"Labels":null}')


def docker_import_config(diff_ids: list[str]) -> bytes:
    return (
        '{"architecture":"amd64","comment":"Imported from -","config":' + DOCKER_EMPTY_CONFIG
        + ',"container_config":' + DOCKER_EMPTY_CONFIG
        + ',"created":"2026-01-02T03:04:05.123456789Z","docker_version":"20.10.24+dfsg1",'
        '"history":[{"created":"2026-01-02T03:04:05.123456789Z","comment":"Imported from -"},'
        '{"created":"2026-01-02T03:04:05.123456789Z","created_by":"echo a \\u003e b"}],'
        '"os":"linux","rootfs":{"type":"layers","diff_ids":' + json.dumps(diff_ids).replace(" ", "")
        + '}}').encode()


def without_config_env_null(raw: bytes) -> bytes:
    """`raw` with exactly the `"Env":null,` of its `config` object cut out (the one in
    `container_config`, which the schema does not know, stays)."""
    start = raw.index(b'"config":{')
    at = raw.index(b'"Env":null,', start)
    assert at < raw.index(b"}", start)
    return raw[:at] + raw[at + len(b'"Env":null,'):]


def test_the_validator_finds_what_the_schema_rejects() -> None:
    good = {"architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
            "config": {"Env": ["A=1"], "Entrypoint": None, "Cmd": None, "Volumes": None,
                       "Labels": None, "OnBuild": None, "ExposedPorts": {"80/tcp": {}}},
            "history": [{"created": "2026-01-02T03:04:05.1Z", "empty_layer": True}]}
    assert config_problems(good) == []
    for path, value in ((("config", "Env"), None), (("config", "Env"), ["NOEQUALS"]),
                        (("config", "User"), None), (("config", "ExposedPorts"), None),
                        (("config",), None), (("created",), None), (("created",), "yesterday"),
                        (("os",), None), (("history",), None), (("rootfs", "type"), "x")):
        bad: Any = json.loads(json.dumps(good))
        obj = bad
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
        assert config_problems(bad), (path, value)
    assert config_problems(json.loads(docker_import_config(["sha256:" + "a" * 64]))) == \
        ["config.Env: want an array of strings, got None"]
    desc = {"mediaType": OCI_CONFIG, "digest": "sha256:" + "a" * 64, "size": 1}
    assert descriptor_problems(desc) == []
    for key, value in (("digest", "sha256:abc"), ("digest", "nothex"), ("size", -1),
                       ("size", True), ("mediaType", "noslash"), ("annotations", {"a": 1})):
        assert descriptor_problems({**desc, key: value}), (key, value)
    assert descriptor_problems({"digest": desc["digest"], "size": 1})
    manifest = {"schemaVersion": 2, "config": desc, "layers": [desc]}
    assert manifest_problems(manifest) == []
    assert manifest_problems({**manifest, "layers": []})
    assert manifest_problems({**manifest, "schemaVersion": 1})
    index = {"schemaVersion": 2, "manifests": [{**desc, "platform": {"os": "linux"}}]}
    assert index_problems(index) == ["index.manifests[0].platform.architecture: required"]
    assert index_problems({"schemaVersion": 2, "manifests": [desc]}) == []


def test_null_members_are_cut_out_of_the_bytes() -> None:
    from ocilayers.spec import oci_config_nulls

    raw = docker_import_config(["sha256:" + "a" * 64])
    out, dropped = oci_config_nulls(raw)
    assert dropped == ("config.Env",)
    assert out == without_config_env_null(raw)
    assert b"\\u003e" in out  # Go's escapes stay as they were
    pretty = (b'{\n  "author": null,\n  "config": {\n    "Env": null,\n    "User": null,\n'
              b'    "Cmd": ["a"]\n  },\n  "history": [{"comment": null}, {"created": "x",'
              b' "author": null}],\n  "os": "linux"\n}')
    out, dropped = oci_config_nulls(pretty)
    assert dropped == ("author", "config.Env", "config.User", "history[0].comment",
                       "history[1].author")
    assert out == (b'{\n  "config": {\n    "Cmd": ["a"]\n  },\n  "history": [{}, '
                   b'{"created": "x"}],\n  "os": "linux"\n}')
    valid = b'{"config":{"Env":[],"Cmd":null,"Entrypoint":null,"OnBuild":null},"os":"linux"}'
    assert oci_config_nulls(valid) == (valid, ())


def output_files(out: Path) -> dict[str, bytes]:
    if out.is_dir():
        return {os.path.relpath(os.path.join(dp, f), out): Path(dp, f).read_bytes()
                for dp, _d, fs in os.walk(out) for f in fs}
    with tarfile.open(out) as tf:
        files = {}
        for m in tf.getmembers():
            if m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                files[m.name] = f.read()
        return files


def output_config(files: Mapping[str, bytes]) -> bytes:
    """The config bytes of the (only) image of an output."""
    (desc,) = {d["digest"]: d for d in json.loads(files["index.json"])["manifests"]}.values()
    manifest = json.loads(files["blobs/" + desc["digest"].replace(":", "/")])
    return files["blobs/" + manifest["config"]["digest"].replace(":", "/")]


def convert(capsys: Capsys, source: Path | str, out: Path, *extra: str) -> tuple[str, str]:
    code, stdout, err = run_cli(["convert", str(source), "-o", str(out), *extra], capsys)
    assert code == 0, err
    return stdout, err


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", OCI_FORMATS)
@pytest.mark.parametrize("fixture", fixture_params())
def test_every_fixture_converts_to_a_valid_oci_image(fixture: str, fmt: str, compression: str,
                                                     tmp_path: Path, capsys: Capsys) -> None:
    out = tmp_path / "out"
    _, err = convert(capsys, FIXTURES / fixture, out, "--format", fmt, "--compression",
                     compression, "--tag", "x:1")
    assert err == ""  # every fixture's config is schema-valid already: kept as it is
    assert layout_problems(output_files(out)) == []


@pytest.mark.parametrize("fixture", fixture_params())
def test_docker_archive_index_and_manifests_are_valid(fixture: str, tmp_path: Path,
                                                      capsys: Capsys) -> None:
    out = tmp_path / "out.tar"
    convert(capsys, FIXTURES / fixture, out, "--format", "docker-archive")
    assert layout_problems(output_files(out), oci_config=False) == []


def null_config_layout(dest: Path) -> tuple[Layout, bytes]:
    """fixtures/tiny with the config dockerd writes for `docker import` (its DiffIDs)."""
    lay = Layout.copy_of("tiny", dest)
    manifest = lay.manifest()
    diff_ids = lay.read_json_blob(manifest["config"]["digest"])["rootfs"]["diff_ids"]
    raw = docker_import_config(diff_ids)
    manifest["config"] = lay.put_blob(raw, OCI_CONFIG)
    lay.replace_manifest(manifest)
    return lay, raw


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_null_config_output(out: Path, fmt: str, raw: bytes, stdout: str, err: str) -> None:
    files = output_files(out)
    config = output_config(files)
    if fmt == "docker-archive":  # Docker's format keeps Docker's bytes: same image ID
        assert config == raw
        assert err == ""
        assert layout_problems(files, oci_config=False) == []
        return
    want = without_config_env_null(raw)
    assert config == want
    assert json.loads(config)["rootfs"] == json.loads(raw)["rootfs"]  # DiffIDs unchanged
    assert layout_problems(files) == []
    (note,) = err.splitlines()
    assert note.startswith("ocilayers: note: ") and "config.Env" in note, note
    assert sha(raw) in note and sha(want) in note, note
    assert json.loads(stdout)["config_digest"] == sha(want)


@pytest.mark.parametrize("fmt", [*OCI_FORMATS, "docker-archive"])
def test_convert_of_a_config_with_nulls(fmt: str, tmp_path: Path, capsys: Capsys) -> None:
    lay, raw = null_config_layout(tmp_path / "src")
    out = tmp_path / "out"
    stdout, err = convert(capsys, lay.root, out, "--format", fmt, "--tag", "imp:1", "--json")
    check_null_config_output(out, fmt, raw, stdout, err)
    # -q: the same output, no note
    again = tmp_path / "again"
    code, _, err = run_cli(["-q", "convert", str(lay.root), "-o", str(again), "--format", fmt,
                            "--tag", "imp:1"], capsys)
    assert (code, err) == (0, "")
    assert output_files(again) == output_files(out)


@pytest.mark.parametrize("fmt", [*OCI_FORMATS, "docker-archive"])
def test_export_of_a_config_with_nulls(fmt: str, tmp_path: Path, capsys: Capsys) -> None:
    lay, raw = null_config_layout(tmp_path / "src")
    root = tmp_path / "store"
    code, _, err = run_cli(["--root", str(root), "unpack", str(lay.root), "--tag", "imp:1"],
                           capsys)
    assert code == 0, err
    out = tmp_path / "out"
    code, stdout, err = run_cli(["--root", str(root), "export", "imp:1", "-o", str(out),
                                 "--format", fmt, "--json"], capsys)
    assert code == 0, err
    check_null_config_output(out, fmt, raw, stdout, err)


# --- the real thing: dockerd 20.10's `docker import` + `docker save` ---

def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime, info.mode = 6, 1_700_000_000, 0o644
        tf.addfile(info, io.BytesIO(b"hello\n"))
    return buf.getvalue()


def test_docker_import_then_save_converts_to_valid_oci(tmp_path: Path, capsys: Capsys) -> None:
    from throwaway_dockerd import Daemon, DaemonError, mounts_under, unavailable, unmount_all

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="imp-", dir="/tmp"))  # a short unix socket path
    daemon = Daemon(base)
    saved = tmp_path / "saved.tar"
    problems: list[str] = []
    try:
        try:
            daemon.start()
        except DaemonError as exc:
            pytest.skip(f"cannot start a throwaway dockerd here: {exc}")
        (tmp_path / "layer.tar").write_bytes(_layer_tar())
        daemon.docker("import", str(tmp_path / "layer.tar"), "imported:1")
        daemon.docker("save", "-o", str(saved), "imported:1")
        image_id = daemon.docker("inspect", "--format", "{{.Id}}", "imported:1").stdout.strip()
        with tarfile.open(saved) as tf:
            f = tf.extractfile("manifest.json")
            assert f is not None
            (entry,) = json.loads(f.read())
            c = tf.extractfile(entry["Config"])
            assert c is not None
            raw = c.read()
        assert sha(raw) == image_id
        assert json.loads(raw)["config"]["Env"] is None  # what this is about
        for fmt in OCI_FORMATS:
            out = tmp_path / f"out-{fmt}"
            stdout, err = convert(capsys, saved, out, "--format", fmt, "--json")
            check_null_config_output(out, fmt, raw, stdout, err)
        # docker-archive keeps the bytes: docker load gives back the same image ID
        out = tmp_path / "out-docker.tar"
        convert(capsys, saved, out, "--format", "docker-archive", "--tag", "again:1")
        assert output_config(output_files(out)) == raw
        daemon.docker("rmi", "imported:1")
        daemon.docker("load", "-i", str(out))
        assert daemon.docker("inspect", "--format", "{{.Id}}", "again:1").stdout.strip() == \
            image_id
    finally:
        problems += daemon.stop()
        problems += [f"still mounted: {p}" for p in unmount_all(base)]
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)
    assert not problems, problems
