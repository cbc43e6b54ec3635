"""spec.py: digests, ChainIDs, reference normalisation, platforms and document parsing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import pytest

from ocilayers.errors import ImageError
from ocilayers.spec import (
    Digest,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    chain_ids,
    is_bare_tag,
    normalize_reference,
)

HEX64 = "0123456789abcdef" * 4
HEX128 = HEX64 * 2


# --- Digest.parse ---

@pytest.mark.parametrize(("text", "algorithm", "hex_"), [
    pytest.param(f"sha256:{HEX64}", "sha256", HEX64, id="sha256"),
    pytest.param(f"sha512:{HEX128}", "sha512", HEX128, id="sha512"),
])
def test_digest_parse_valid(text: str, algorithm: str, hex_: str) -> None:
    d = Digest.parse(text)
    assert (d.algorithm, d.hex) == (algorithm, hex_)
    assert str(d) == text


@pytest.mark.parametrize("value", [
    pytest.param(f"sha256:{HEX64.upper()}", id="uppercase-hex"),
    pytest.param(f"SHA256:{HEX64}", id="uppercase-algorithm"),
    pytest.param(f"sha256:{HEX64[:-1]}", id="sha256-too-short"),
    pytest.param(f"sha256:{HEX64}0", id="sha256-too-long"),
    pytest.param(f"sha512:{HEX64}", id="sha512-with-sha256-length"),
    pytest.param(HEX64, id="missing-algorithm"),
    pytest.param(f":{HEX64}", id="empty-algorithm"),
    pytest.param("sha256:", id="empty-hex"),
    pytest.param(f"sha256:{HEX64[:-1]}g", id="non-hex-char"),
    pytest.param(f" sha256:{HEX64}", id="leading-space"),
    pytest.param(f"sha256:{HEX64}\n", id="trailing-newline"),
    pytest.param("", id="empty"),
    pytest.param(None, id="none"),
    pytest.param(256, id="int"),
    pytest.param(f"sha256:{HEX64}".encode(), id="bytes"),
])
def test_digest_parse_invalid(value: object) -> None:
    with pytest.raises(ImageError):
        Digest.parse(value)


# --- chain_ids ---

DIFF_IDS = [
    "sha256:" + hashlib.sha256(b"layer 0").hexdigest(),
    "sha256:" + hashlib.sha256(b"layer 1").hexdigest(),
    "sha256:" + hashlib.sha256(b"layer 2").hexdigest(),
]


def _spec_chain(diff_ids: list[str]) -> list[str]:
    # image-spec config.md: ChainID(L0) = DiffID(L0),
    # ChainID(Ln) = Digest(ChainID(Ln-1) + " " + DiffID(Ln))
    c0 = diff_ids[0]
    c1 = "sha256:" + hashlib.sha256(f"{c0} {diff_ids[1]}".encode("ascii")).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {diff_ids[2]}".encode("ascii")).hexdigest()
    return [c0, c1, c2]


@pytest.mark.parametrize("as_digest", [
    pytest.param(False, id="strings"),
    pytest.param(True, id="digests"),
])
def test_chain_ids_follow_the_spec_formula(as_digest: bool) -> None:
    inputs = [Digest.parse(d) for d in DIFF_IDS] if as_digest else DIFF_IDS
    assert [str(c) for c in chain_ids(inputs)] == _spec_chain(DIFF_IDS)


@pytest.mark.parametrize(("diff_ids", "want"), [
    pytest.param([], [], id="no-layers"),
    pytest.param(DIFF_IDS[:1], DIFF_IDS[:1], id="one-layer-is-its-diff-id"),
])
def test_chain_ids_short_stacks(diff_ids: list[str], want: list[str]) -> None:
    assert [str(c) for c in chain_ids(diff_ids)] == want


def test_chain_ids_rejects_invalid_diff_id() -> None:
    with pytest.raises(ImageError):
        chain_ids([DIFF_IDS[0], "sha256:nothex"])


# --- references ---

@pytest.mark.parametrize(("ref", "want"), [
    pytest.param("docker.io/library/foo:latest", "foo:latest", id="docker-hub-official-full"),
    pytest.param("foo", "foo:latest", id="bare-name-gets-latest"),
    pytest.param("library/foo", "foo:latest", id="library-prefix"),
    pytest.param("index.docker.io/library/foo:1", "foo:1", id="index-docker-io"),
    pytest.param("docker.io/foo/bar", "foo/bar:latest", id="docker-hub-user-repo"),
    pytest.param("docker.io/library/a/b", "library/a/b:latest", id="library-with-subpath-kept"),
    pytest.param("quay.io/a/b", "quay.io/a/b:latest", id="other-registry"),
    pytest.param("localhost:5000/x", "localhost:5000/x:latest", id="registry-with-port"),
    pytest.param("localhost/x", "localhost/x:latest", id="localhost-domain"),
    pytest.param("user/repo:tag", "user/repo:tag", id="user-repo-tag"),
    pytest.param(f"foo@sha256:{HEX64}", f"foo@sha256:{HEX64}", id="digest-only-no-latest"),
    pytest.param(f"foo:1@sha256:{HEX64}", f"foo:1@sha256:{HEX64}", id="tag-and-digest"),
    pytest.param(f"docker.io/library/foo@sha256:{HEX64}", f"foo@sha256:{HEX64}",
                 id="full-digest-ref"),
])
def test_normalize_reference(ref: str, want: str) -> None:
    assert normalize_reference(ref) == want


@pytest.mark.parametrize("ref", [
    pytest.param("Foo", id="uppercase-repo"),
    pytest.param("quay.io/a/B", id="uppercase-path-component"),
    pytest.param("", id="empty"),
    pytest.param("foo bar", id="inner-space"),
    pytest.param(" foo", id="leading-space"),
    pytest.param("foo:latest\n", id="trailing-newline"),
    pytest.param("foo:-bad", id="tag-starts-with-dash"),
    pytest.param("foo:", id="empty-tag"),
    pytest.param("foo:" + "a" * 129, id="tag-too-long"),
    pytest.param("foo:t\u00e1g", id="non-ascii-tag"),
    pytest.param(":tag", id="empty-repo"),
    pytest.param("foo//bar", id="empty-path-component"),
    pytest.param("-foo", id="component-starts-with-dash"),
    pytest.param("foo@sha256:abc", id="short-digest"),
])
def test_normalize_reference_invalid(ref: str) -> None:
    with pytest.raises(ImageError):
        normalize_reference(ref)


@pytest.mark.parametrize(("name", "want"), [
    pytest.param("latest", True, id="latest"),
    pytest.param("l5", True, id="short"),
    pytest.param("v1.0_rc-2", True, id="dots-dashes-underscores"),
    pytest.param("a" * 128, True, id="128-chars"),
    pytest.param("a" * 129, False, id="129-chars"),
    pytest.param("foo:latest", False, id="repo-and-tag"),
    pytest.param("library/foo", False, id="repo-path"),
    pytest.param(f"foo@sha256:{HEX64}", False, id="digest-ref"),
    pytest.param("-x", False, id="starts-with-dash"),
    pytest.param(".x", False, id="starts-with-dot"),
    pytest.param("", False, id="empty"),
    pytest.param("latest\n", False, id="trailing-newline"),
])
def test_is_bare_tag(name: str, want: bool) -> None:
    assert is_bare_tag(name) is want


# --- platforms ---

@pytest.mark.parametrize(("text", "want"), [
    pytest.param("linux/amd64", Platform("linux", "amd64"), id="os-arch"),
    pytest.param("linux/arm64/v8", Platform("linux", "arm64", "v8"), id="os-arch-variant"),
    pytest.param("windows/amd64", Platform("windows", "amd64"), id="windows"),
])
def test_platform_parse(text: str, want: Platform) -> None:
    assert Platform.parse(text) == want
    assert str(Platform.parse(text)) == text


@pytest.mark.parametrize("text", [
    pytest.param("linux", id="no-arch"),
    pytest.param("linux/", id="empty-arch"),
    pytest.param("/amd64", id="empty-os"),
    pytest.param("linux//v8", id="empty-arch-with-variant"),
    pytest.param("linux/arm/v7/x", id="four-parts"),
    pytest.param("", id="empty"),
])
def test_platform_parse_invalid(text: str) -> None:
    with pytest.raises(ImageError):
        Platform.parse(text)


@pytest.mark.parametrize(("want", "have", "ok"), [
    pytest.param("linux/amd64", Platform("linux", "amd64"), True, id="same"),
    pytest.param("linux/amd64", Platform("linux", "arm64"), False, id="other-arch"),
    pytest.param("linux/amd64", Platform("windows", "amd64"), False, id="other-os"),
    pytest.param("linux/arm64", Platform("linux", "arm64", "v8"), True,
                 id="arm64-matches-arm64-v8"),
    pytest.param("linux/arm64/v8", Platform("linux", "arm64"), True,
                 id="arm64-v8-matches-bare-arm64"),
    pytest.param("linux/arm64/v8", Platform("linux", "arm64", "v8"), True, id="arm64-v8-exact"),
    pytest.param("linux/arm64/v9", Platform("linux", "arm64"), False,
                 id="arm64-v9-not-bare-arm64"),
    pytest.param("linux/arm/v7", Platform("linux", "arm", "v6"), False, id="arm-v7-not-v6"),
    pytest.param("linux/arm", Platform("linux", "arm", "v7"), True, id="no-variant-wanted"),
])
def test_platform_matches(want: str, have: Platform, ok: bool) -> None:
    assert Platform.parse(want).matches(have) is ok


# --- documents ---

LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
         "digest": f"sha256:{HEX64}", "size": 10}
CONFIG_DESC = {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": f"sha256:{HEX64}", "size": 2}
GOOD_MANIFEST = {"schemaVersion": 2, "config": CONFIG_DESC, "layers": [LAYER]}
GOOD_INDEX = {"schemaVersion": 2, "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{HEX64}",
     "size": 3}]}
GOOD_CONFIG = {"architecture": "amd64", "os": "linux",
               "rootfs": {"type": "layers", "diff_ids": [f"sha256:{HEX64}"]}}


def _doc(base: Mapping[str, object], **changes: object) -> bytes:
    return json.dumps({**base, **changes}).encode()


def test_good_documents_parse() -> None:
    m = Manifest.parse(_doc(GOOD_MANIFEST))
    assert [str(d.digest) for d in m.layers] == [f"sha256:{HEX64}"]
    assert len(Index.parse(_doc(GOOD_INDEX)).manifests) == 1
    c = ImageConfig.parse(_doc(GOOD_CONFIG))
    assert [str(d) for d in c.diff_ids] == [f"sha256:{HEX64}"]
    assert str(c.platform) == "linux/amd64"


@pytest.mark.parametrize(("parse", "data"), [
    pytest.param(Manifest.parse, b"{not json", id="manifest-not-json"),
    pytest.param(Manifest.parse, b"\xff\xfe", id="manifest-not-utf8"),
    pytest.param(Manifest.parse, b"[]", id="manifest-not-object"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, schemaVersion=1), id="manifest-schema-1"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, schemaVersion="2"),
                 id="manifest-schema-string"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, layers={"0": LAYER}),
                 id="manifest-layers-not-list"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, layers=[{**LAYER, "mediaType": "text/plain"}]),
                 id="manifest-bad-layer-media-type"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, layers=[{**LAYER, "size": -1}]),
                 id="manifest-negative-layer-size"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, layers=[{**LAYER, "digest": "sha256:x"}]),
                 id="manifest-bad-layer-digest"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, config=None), id="manifest-no-config"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, mediaType="application/json"),
                 id="manifest-wrong-media-type"),
    pytest.param(Index.parse, b"not json", id="index-not-json"),
    pytest.param(Index.parse, b"[" * 100_000 + b"]" * 100_000, id="index-nested-100k-deep"),
    pytest.param(Index.parse, _doc(GOOD_INDEX, schemaVersion=3), id="index-schema-3"),
    # found by fuzzing: these ended in ValueError/TypeError from dict()
    pytest.param(Index.parse, _doc(GOOD_INDEX, annotations="x"), id="index-annotations-str"),
    pytest.param(Index.parse, _doc(GOOD_INDEX, annotations=[1, 2]),
                 id="index-annotations-list"),
    pytest.param(Manifest.parse, _doc(GOOD_MANIFEST, annotations={"k": 5}),
                 id="manifest-annotation-value-int"),
    pytest.param(Index.parse, _doc(GOOD_INDEX, manifests="x"), id="index-manifests-not-list"),
    pytest.param(Index.parse, _doc(GOOD_INDEX,
                                      mediaType="application/vnd.oci.image.manifest.v1+json"),
                 id="index-with-manifest-media-type"),
    pytest.param(ImageConfig.parse, b"", id="config-empty"),
    pytest.param(ImageConfig.parse, _doc(GOOD_CONFIG, rootfs={"type": "layers",
                                                              "diff_ids": "sha256:x"}),
                 id="config-diff-ids-not-list"),
    pytest.param(ImageConfig.parse, _doc(GOOD_CONFIG, rootfs={"type": "tarball",
                                                              "diff_ids": []}),
                 id="config-rootfs-type-wrong"),
    pytest.param(ImageConfig.parse, _doc(GOOD_CONFIG, rootfs={"type": "layers",
                                                              "diff_ids": ["nope"]}),
                 id="config-diff-id-invalid"),
    pytest.param(ImageConfig.parse, _doc(GOOD_CONFIG, history={"created": "x"}),
                 id="config-history-not-list"),
])
def test_document_parse_errors(parse: object, data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        parse(data)  # type: ignore[operator]
    # Validation errors double as ValueError (pypa/installer's convention, DESIGN.md).
    assert isinstance(info.value, ValueError)


def test_image_error_is_value_error() -> None:
    assert issubclass(ImageError, ValueError)


def test_image_id_is_digest_of_raw_bytes() -> None:
    raw = _doc(GOOD_CONFIG) + b"\n"  # a trailing newline is part of the ID (umoci writes one)
    assert str(ImageConfig.parse(raw).image_id) == "sha256:" + hashlib.sha256(raw).hexdigest()
