"""`ocilayers export NAME`: what is written is what NAME names, as dockerd 20.10's
`docker save NAME` does (moby v20.10.24 image/tarexport/save.go, parseNames and save):

- `repo:tag` -> that image, with that one tag;
- a bare repository name `repo` -> every tag of that repository (`repo:latest` included when
  it exists: `docker save foo` goes by `reference.IsNameOnly`, never by `foo:latest`), one
  entry per image in manifest.json, one index.json entry per tag;
- an image ID (`sha256:<hex>`, 64 hex digits) or a unique ID prefix -> the image untagged:
  `"RepoTags": null` in manifest.json, no `repositories` file, an index.json entry without
  annotations.

Outputs are read with json/tarfile only; the expectations are written from the rules above.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, assert_one_line_error, run_cli, skopeo

Capsys = pytest.CaptureFixture[str]

FORMATS = ["oci-archive", "oci", "docker-archive"]
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


def ol(capsys: Capsys, root: Path, *argv: str) -> tuple[int, str, str]:
    return run_cli(["--root", str(root), *argv], capsys)


def ok(capsys: Capsys, root: Path, *argv: str) -> str:
    code, out, err = ol(capsys, root, *argv)
    assert code == 0, f"ocilayers {' '.join(argv)} failed ({code}):\n{err}"
    return out


def config_id(path: Path) -> str:
    """The image ID of a fixture, from its config bytes."""
    if path.is_dir():
        index = json.loads((path / "index.json").read_bytes())
        digest = index["manifests"][0]["digest"]
        manifest = json.loads((path / "blobs" / "sha256" / digest[7:]).read_bytes())
        return str(manifest["config"]["digest"])
    with tarfile.open(path) as tf:
        f = tf.extractfile("manifest.json")
        assert f is not None
        entry = json.loads(f.read())[0]
        c = tf.extractfile(entry["Config"])
        assert c is not None
        return "sha256:" + hashlib.sha256(c.read()).hexdigest()


COMMITTED = config_id(FIXTURES / "docker-save.tar")
DEMO = config_id(FIXTURES / "demo")


@pytest.fixture
def root(tmp_path: Path, capsys: Capsys) -> Path:
    """A store with both images: committed:latest (docker-save.tar) and demo (untagged), then
    base:1, base:2 -> committed, base:3 -> demo; foo:latest -> committed, foo:1 -> demo."""
    root = tmp_path / "store"
    ok(capsys, root, "unpack", str(FIXTURES / "docker-save.tar"))
    ok(capsys, root, "unpack", str(FIXTURES / "demo"))
    for image, tag in ((COMMITTED, "base:1"), (COMMITTED, "base:2"), (DEMO, "base:3"),
                       (COMMITTED, "foo:latest"), (DEMO, "foo:1")):
        ok(capsys, root, "tag", image, tag)
    return root


def output_files(out: Path) -> dict[str, bytes]:
    if out.is_dir():
        return {os.path.relpath(os.path.join(dp, f), out): Path(dp, f).read_bytes()
                for dp, _d, fs in os.walk(out) for f in fs}
    files = {}
    with tarfile.open(out) as tf:
        for m in tf.getmembers():
            if m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                files[m.name] = f.read()
    return files


def what_was_written(out: Path, fmt: str) -> dict[str, Any]:
    """image ID -> the tags the output gives it, read from index.json (config digest of each
    manifest, ref-name annotations) and, for docker-archive, from manifest.json too (which
    must agree)."""
    files = output_files(out)
    index = json.loads(files["index.json"])
    by_index: dict[str, list[str]] = {}
    for desc in index["manifests"]:
        manifest = json.loads(files["blobs/sha256/" + desc["digest"][7:]])
        tags = by_index.setdefault(manifest["config"]["digest"], [])
        ann = desc.get("annotations")
        if ann is None:
            continue
        name = ann[CONTAINERD_NAME]
        assert name.startswith("docker.io/library/"), name
        tag = name[len("docker.io/library/"):]
        assert tag.rsplit(":", 1)[1] == ann[REF_NAME]
        tags.append(tag)
    result = {k: sorted(v) for k, v in by_index.items()}
    if fmt == "docker-archive":
        entries = json.loads(files["manifest.json"])
        by_manifest = {"sha256:" + e["Config"].rsplit("/", 1)[1]: e["RepoTags"] for e in entries}
        assert len(by_manifest) == len(entries), entries
        for repo_tags in by_manifest.values():  # dockerd: a nil []string is `null`, not `[]`
            assert repo_tags is None or repo_tags, entries
        assert {k: sorted(v or []) for k, v in by_manifest.items()} == result
        if any(by_manifest.values()):
            repos = json.loads(files["repositories"])
            assert {f"{r}:{t}" for r, tags in repos.items() for t in tags} == \
                {t for v in result.values() for t in v}
        else:
            assert "repositories" not in files  # dockerd writes it only with a tag
    return result


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tag_exports_that_tag_only(root: Path, tmp_path: Path, capsys: Capsys,
                                     fmt: str) -> None:
    out = tmp_path / "out"
    ok(capsys, root, "export", "base:1", "-o", str(out), "--format", fmt)
    assert what_was_written(out, fmt) == {COMMITTED: ["base:1"]}
    out2 = tmp_path / "out2"
    ok(capsys, root, "export", "committed", "-o", str(out2), "--format", fmt)  # only tag
    assert what_was_written(out2, fmt) == {COMMITTED: ["committed:latest"]}


@pytest.mark.parametrize("how", ["id", "hex", "prefix", "sha-prefix"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_image_id_exports_no_tag(root: Path, tmp_path: Path, capsys: Capsys, fmt: str,
                                    how: str) -> None:
    name = {"id": COMMITTED, "hex": COMMITTED[7:], "prefix": COMMITTED[7:19],
            "sha-prefix": COMMITTED[:19]}[how]
    out = tmp_path / "out"
    ok(capsys, root, "export", name, "-o", str(out), "--format", fmt)
    assert what_was_written(out, fmt) == {COMMITTED: []}
    files = output_files(out)
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert "annotations" not in entry
    if fmt == "docker-archive":
        assert b'"RepoTags":null' in files["manifest.json"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_repository_name_exports_all_its_tags(root: Path, tmp_path: Path, capsys: Capsys,
                                                fmt: str) -> None:
    out = tmp_path / "out"
    stdout = ok(capsys, root, "export", "base", "-o", str(out), "--format", fmt)
    assert what_was_written(out, fmt) == {COMMITTED: ["base:1", "base:2"], DEMO: ["base:3"]}
    # one manifest digest printed per image
    index = json.loads(output_files(out)["index.json"])
    assert sorted(stdout.split()) == sorted({d["digest"] for d in index["manifests"]})
    # a layer both images have (demo's base layers) is in the output once, as one blob
    files = output_files(out)
    manifests = {d["digest"]: json.loads(files["blobs/sha256/" + d["digest"][7:]])
                 for d in index["manifests"]}
    digests = [lay["digest"] for m in manifests.values() for lay in m["layers"]]
    assert len(set(digests)) < len(digests)


def test_a_repository_with_latest_and_other_tags_exports_all(root: Path, tmp_path: Path,
                                                             capsys: Capsys) -> None:
    """`foo` with foo:latest and foo:1: docker save exports both (a name without a tag is a
    repository to it), so ocilayers does too; `foo:latest` exports that tag alone."""
    out = tmp_path / "all.tar"
    ok(capsys, root, "export", "foo", "-o", str(out), "--format", "docker-archive")
    assert what_was_written(out, "docker-archive") == {COMMITTED: ["foo:latest"],
                                                       DEMO: ["foo:1"]}
    for name in ("foo:latest", "docker.io/library/foo:latest"):
        one = tmp_path / "one.tar"
        ok(capsys, root, "export", name, "-o", str(one), "--format", "docker-archive")
        assert what_was_written(one, "docker-archive") == {COMMITTED: ["foo:latest"]}
        one.unlink()
    full = tmp_path / "full.tar"
    ok(capsys, root, "export", "docker.io/library/foo", "-o", str(full),
       "--format", "docker-archive")
    assert what_was_written(full, "docker-archive") == what_was_written(out, "docker-archive")


def test_a_repository_name_beats_an_id_prefix(root: Path, tmp_path: Path,
                                              capsys: Capsys) -> None:
    # docker: a name-only reference is looked up as a repository first, as an ID prefix only
    # when the repository has no tag.
    prefix = DEMO[7:15]
    ok(capsys, root, "tag", COMMITTED, f"{prefix}:v1")
    out = tmp_path / "out.tar"
    ok(capsys, root, "export", prefix, "-o", str(out), "--format", "docker-archive")
    assert what_was_written(out, "docker-archive") == {COMMITTED: [f"{prefix}:v1"]}
    ok(capsys, root, "untag", f"{prefix}:v1")
    out.unlink()
    ok(capsys, root, "export", prefix, "-o", str(out), "--format", "docker-archive")
    assert what_was_written(out, "docker-archive") == {DEMO: []}


def test_unknown_names(root: Path, tmp_path: Path, capsys: Capsys) -> None:
    for name in ("nosuch", "base:9", "nosuch:1", "sha256:" + "0" * 64):
        code, _out, err = ol(capsys, root, "export", name, "-o", str(tmp_path / "out"))
        assert_one_line_error(code, err, name.split(":")[0])
    assert os.listdir(tmp_path) == ["store"]


def test_a_multi_image_export_is_readable(root: Path, tmp_path: Path, capsys: Capsys) -> None:
    """Every image of the output can be picked by its tag: by ocilayers and by skopeo."""
    out = tmp_path / "out.tar"
    result = json.loads(ok(capsys, root, "export", "base", "-o", str(out), "--json"))
    assert sorted((i["config_digest"], i["tags"]) for i in result["images"]) == \
        sorted([(COMMITTED, ["base:1", "base:2"]), (DEMO, ["base:3"])])
    for tag, image_id in (("base:1", COMMITTED), ("base:2", COMMITTED), ("base:3", DEMO)):
        got = json.loads(ok(capsys, root, "inspect", f"oci-archive:{out}", "--ref", tag,
                            "--json"))
        assert got["image_id"] == image_id
        config = skopeo("inspect", "--raw", "--config", f"oci-archive:{out}:{tag[5:]}").stdout
        assert "sha256:" + hashlib.sha256(config).hexdigest() == image_id
