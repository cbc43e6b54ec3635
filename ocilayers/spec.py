"""Pure data of the OCI image spec and Docker schema 2: digests, descriptors, manifests, configs."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ocilayers.errors import ImageError

# --- media types (image-spec media-types.md; Docker registry manifest-v2-2.md) ---

MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Deprecated since image-spec 1.1, still found in the wild.
MEDIA_TYPE_OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

MEDIA_TYPE_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

DOCKER_TRANSPORT = "docker://"  # a registry repository, as skopeo and podman write it

INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
CONFIG_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_DOCKER_CONFIG})
LAYER_MEDIA_TYPES = frozenset({
    MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_ZSTD,
    MEDIA_TYPE_OCI_LAYER_ND, MEDIA_TYPE_OCI_LAYER_ND_GZIP, MEDIA_TYPE_OCI_LAYER_ND_ZSTD,
    MEDIA_TYPE_DOCKER_LAYER, MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_DOCKER_LAYER_FOREIGN,
})

# What `convert`/`export` write (defined here, not in writer.py: the CLI lists them without
# importing the writer).
IMAGE_FORMATS = ("oci-archive", "oci", "docker-archive")

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

# DiffID of an empty layer: a tar of just the two 512-byte end-of-archive blocks.
EMPTY_LAYER_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"


# --- digests (image-spec descriptor.md "Digests") ---

_HEX_LEN = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated `algorithm:hex` content digest."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, value: object) -> Digest:
        if not isinstance(value, str):
            raise ImageError(f"digest must be a string, got {type(value).__name__}")
        m = _DIGEST_RE.fullmatch(value)
        if m is None or len(m.group(2)) != _HEX_LEN[m.group(1)]:
            raise ImageError(f"invalid digest {value!r}")
        return cls(m.group(1), m.group(2))

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"


def sha256_digest(data: bytes) -> Digest:
    return Digest.of_bytes(data, "sha256")


def chain_ids(diff_ids: Iterable[Digest | str]) -> list[Digest]:
    """ChainIDs (image-spec config.md): C(L0) = D(L0); C(Ln) = sha256("C(Ln-1) D(Ln)")."""
    out: list[Digest] = []
    for d in diff_ids:
        diff = d if isinstance(d, Digest) else Digest.parse(d)
        if not out:
            out.append(diff)
        else:
            out.append(sha256_digest(f"{out[-1]} {diff}".encode()))
    return out


# --- descriptors, manifests, indexes ---

@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"invalid platform {text!r} (want os/arch[/variant])")
        return cls(*parts)

    @classmethod
    def from_json(cls, obj: object) -> Platform | None:
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise ImageError("platform must be an object")
        return cls(str(obj.get("os", "")), str(obj.get("architecture", "")),
                   str(obj.get("variant", "") or ""))

    def matches(self, other: Platform) -> bool:
        """Does `other` (what an image declares) satisfy this wanted platform?"""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or normalize_variant(self) == normalize_variant(other)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def normalize_variant(p: Platform) -> str:
    # containerd's platforms.Normalize: arm64 without a variant means v8.
    if p.architecture == "arm64" and not p.variant:
        return "v8"
    return p.variant


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: object, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageError(f"{what} must be an object")
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}: invalid size {size!r}")
        media_type = obj.get("mediaType", "")
        if not isinstance(media_type, str):
            raise ImageError(f"{what}: invalid mediaType")
        ann = _annotations(obj, what)
        urls = obj.get("urls") or []
        return cls(media_type, Digest.parse(obj.get("digest")), size, ann,
                   Platform.from_json(obj.get("platform")), tuple(str(u) for u in urls))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest),
                               "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            p: dict[str, str] = {"architecture": self.platform.architecture,
                                 "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            out["platform"] = p
        return out


def _annotations(obj: Mapping[str, Any], what: str) -> dict[str, str]:
    ann = obj.get("annotations") or {}
    if not isinstance(ann, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
    ):
        raise ImageError(f"{what}: annotations must map strings to strings")
    return dict(ann)


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{what} must be a JSON object")
    return obj


def dump_json(obj: object) -> bytes:
    """Canonical-ish JSON for files we write: sorted keys, no spaces (deterministic)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _document(data: bytes, what: str, default_type: str,
              allowed: frozenset[str]) -> tuple[dict[str, Any], str]:
    """A schema 2 manifest or index: its JSON object and media type (OCI's may be unset)."""
    obj = load_json(data, what)
    if obj.get("schemaVersion") != 2:
        raise ImageError(f"{what}: unsupported schemaVersion {obj.get('schemaVersion')!r}")
    media_type = obj.get("mediaType") or default_type
    if media_type not in allowed:
        raise ImageError(f"{what}: unexpected mediaType {media_type!r}")
    return obj, media_type


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, what: str = "index") -> Index:
        obj, media_type = _document(data, what, MEDIA_TYPE_OCI_INDEX, INDEX_MEDIA_TYPES)
        items = obj.get("manifests")
        if not isinstance(items, list):
            raise ImageError(f"{what}: 'manifests' must be a list")
        return cls(media_type, tuple(Descriptor.from_json(d, f"{what} entry") for d in items),
                   _annotations(obj, what))


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, what: str = "manifest") -> Manifest:
        obj, media_type = _document(data, what, MEDIA_TYPE_OCI_MANIFEST, MANIFEST_MEDIA_TYPES)
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{what}: 'layers' must be a list")
        config = Descriptor.from_json(obj.get("config"), f"{what} config")
        parsed = tuple(Descriptor.from_json(d, f"{what} layer") for d in layers)
        for d in parsed:
            if d.media_type not in LAYER_MEDIA_TYPES:
                raise ImageError(f"{what}: unsupported layer mediaType {d.media_type!r}")
        return cls(media_type, config, parsed, _annotations(obj, what))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type,
                               "config": self.config.to_json(),
                               "layers": [d.to_json() for d in self.layers]}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class HistoryEntry:
    created: str | None = None
    created_by: str | None = None
    comment: str | None = None
    author: str | None = None
    empty_layer: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("created", "created_by", "author", "comment"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.empty_layer:
            out["empty_layer"] = True
        return out


@dataclass(frozen=True)
class ImageConfig:
    """An image config; `raw` keeps the exact bytes, since the image ID is their digest."""

    raw: bytes
    data: Mapping[str, Any]
    diff_ids: tuple[Digest, ...]
    history: tuple[HistoryEntry, ...]

    @classmethod
    def parse(cls, raw: bytes, what: str = "image config") -> ImageConfig:
        obj = load_json(raw, what)
        rootfs = obj.get("rootfs")
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
            raise ImageError(f"{what}: rootfs.type must be 'layers'")
        ids = rootfs.get("diff_ids")
        if not isinstance(ids, list):
            raise ImageError(f"{what}: rootfs.diff_ids must be a list")
        history_raw = obj.get("history") or []
        if not isinstance(history_raw, list):
            raise ImageError(f"{what}: history must be a list")
        history = []
        for h in history_raw:
            if not isinstance(h, dict):
                raise ImageError(f"{what}: history entries must be objects")
            history.append(HistoryEntry(
                created=h.get("created"), created_by=h.get("created_by"),
                comment=h.get("comment"), author=h.get("author"),
                empty_layer=bool(h.get("empty_layer", False))))
        return cls(raw, obj, tuple(Digest.parse(d) for d in ids), tuple(history))

    @property
    def image_id(self) -> Digest:
        return sha256_digest(self.raw)

    @property
    def platform(self) -> Platform:
        return Platform(str(self.data.get("os", "")), str(self.data.get("architecture", "")),
                        str(self.data.get("variant", "") or ""))


def layer_compression(media_type: str) -> str:
    """What a layer media type claims; the bytes are sniffed anyway (streams.sniff)."""
    if media_type.endswith("+gzip") or media_type.endswith(".gzip"):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "none"


MANIFEST_FAMILIES = ("oci", "docker")


def family_media_types(family: str) -> tuple[str, str]:
    """(manifest, config) media types of a manifest family."""
    if family == "docker":
        return MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_CONFIG
    return MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_CONFIG


def manifest_family(media_type: str) -> str:
    return "docker" if media_type == MEDIA_TYPE_DOCKER_MANIFEST else "oci"


def layer_media_type(compression: str, family: str = "oci") -> str:
    """A new layer's media type in a manifest family. Docker schema 2 has no zstd type."""
    if family == "docker":
        if compression == "zstd":
            raise ImageError("a Docker schema 2 manifest has no zstd layer type: compress "
                             "with gzip, or write an OCI manifest")
        return MEDIA_TYPE_DOCKER_LAYER_GZIP if compression == "gzip" else MEDIA_TYPE_DOCKER_LAYER
    return oci_layer_media_type(compression)


def oci_layer_media_type(compression: str) -> str:
    return {"gzip": MEDIA_TYPE_OCI_LAYER_GZIP, "zstd": MEDIA_TYPE_OCI_LAYER_ZSTD,
            "none": MEDIA_TYPE_OCI_LAYER}[compression]


# --- image references (Docker's reference normalisation, distribution/reference) ---

# distribution/reference's grammar (reference.go), ASCII only.
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_REF_RE = re.compile(r"@[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}\Z")
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?")


def is_bare_tag(name: str) -> bool:
    """An OCI ref.name like `latest` or `l5`: a tag that names no repository."""
    return bool(_TAG_RE.fullmatch(name))


def normalize_reference(name: str) -> str:
    """`docker.io/library/foo:latest` -> `foo:latest`; a missing tag means `:latest`.

    Returns the familiar form Docker prints and stores in repositories.json.
    """
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise ImageError(f"invalid image reference {name!r}")
    digest = ""
    m = _DIGEST_REF_RE.search(name)
    if m:
        digest, name = m.group(0), name[: m.start()]
    repo, tag = name, ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        repo, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise ImageError(f"invalid tag in reference {name!r}")
    if not repo:
        raise ImageError(f"invalid repository name in reference {name!r}")
    first, _, rest = repo.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = "docker.io", repo
    if domain in ("docker.io", "index.docker.io"):
        domain = "docker.io"
        if path.startswith("library/") and path.count("/") == 1:
            path = path[len("library/"):]
        familiar = path
    else:
        familiar = f"{domain}/{path}"
    if not _DOMAIN_RE.fullmatch(domain) or not all(
        _COMPONENT_RE.fullmatch(c) for c in path.split("/")
    ):
        raise ImageError(f"invalid repository name in reference {name!r} (must be lowercase "
                         "letters, digits and separators)")
    if not tag and not digest:
        tag = "latest"
    return familiar + (f":{tag}" if tag else "") + digest


def split_reference(ref: str) -> tuple[str, str]:
    """Normalised `repo:tag` -> (`repo`, `repo:tag`), as repositories.json keys them."""
    norm = normalize_reference(ref)
    repo = norm.split("@", 1)[0]
    slash = repo.rfind("/")
    colon = repo.rfind(":")
    if colon > slash:
        repo = repo[:colon]
    return repo, norm



# --- editing a config (the image builder's one place for it) ---

def config_with(data: Mapping[str, Any], *, diff_ids: Iterable[Digest] = (),
                history: Iterable[HistoryEntry] = (), created: str | None = None,
                author: str | None = None) -> dict[str, Any]:
    """A copy of config `data` with `diff_ids` appended to `rootfs.diff_ids` and `history`
    to `history`; `created` and `author` set the top-level fields when given. Nothing else
    of the base (Docker's own fields included) changes."""
    out: dict[str, Any] = json.loads(json.dumps(data))  # a deep copy that stays plain JSON
    rootfs = out.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [str(d) for d in diff_ids]
    added = [h.to_json() for h in history]
    if added or "history" in out:
        out["history"] = list(out.get("history") or []) + added
    if created is not None:
        out["created"] = created
    if author is not None:
        out["author"] = author
    return out


# --- the image-spec's config schema: null where it wants a value ---

# Members schema/config-schema.json (image-spec v1.0.0 to v1.1.1 and main) types without
# allowing null. It allows null for `config.Entrypoint`, `Cmd`, `Volumes` and `Labels`, and
# does not know `OnBuild` or Docker's other fields (any value passes). dockerd writes
# `"Env":null` for an image with no environment (`docker import`). config.md: "Any OPTIONAL
# field MAY also be set to null, which is equivalent to being absent", so leaving such a member
# out means the same config. `architecture`, `os` and `rootfs` are REQUIRED: a null there
# cannot be dropped and is left as it is.
OCI_CONFIG_NOT_NULL = ("created", "author", "variant", "os.version", "os.features", "config",
                       "history")
OCI_CONFIG_CONFIG_NOT_NULL = ("User", "ExposedPorts", "Env", "WorkingDir", "StopSignal",
                              "ArgsEscaped")
OCI_CONFIG_HISTORY_NOT_NULL = ("created", "author", "created_by", "comment", "empty_layer")

_JSON_WS = b" \t\n\r"
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_SCALAR = re.compile(rb"[^\s,\]}]+")
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def _json_ws(b: bytes, i: int) -> int:
    while i < len(b) and b[i] in _JSON_WS:
        i += 1
    return i


def _json_value_end(b: bytes, i: int) -> int:
    """Where the JSON value starting at `b[i]` ends (`b` is known to be valid JSON)."""
    if b[i:i + 1] in (b"{", b"["):
        depth = 0
        for m in _JSON_TOKEN.finditer(b, i):  # strings whole, so brackets in them are skipped
            if m.group() in (b"{", b"["):
                depth += 1
            elif m.group() in (b"}", b"]"):
                depth -= 1
                if depth == 0:
                    return m.end()
        raise ImageError("image config: unbalanced JSON")
    value = (_JSON_STRING if b[i:i + 1] == b'"' else _JSON_SCALAR).match(b, i)
    if value is None:
        raise ImageError(f"image config: no JSON value at byte {i}")
    return value.end()


def _json_members(b: bytes, i: int) -> list[tuple[str, int, int, int]]:
    """The members of the object at `b[i]` (`{`): (key, key start, value start, value end)."""
    out: list[tuple[str, int, int, int]] = []
    i = _json_ws(b, i + 1)
    while b[i:i + 1] != b"}":
        m = _JSON_STRING.match(b, i)
        colon = _json_ws(b, m.end()) if m else -1
        if m is None or b[colon:colon + 1] != b":":
            raise ImageError(f"image config: no object member at byte {i}")
        start = _json_ws(b, colon + 1)
        end = _json_value_end(b, start)
        out.append((json.loads(m.group()), i, start, end))
        i = _json_ws(b, end)
        if b[i:i + 1] == b",":
            i = _json_ws(b, i + 1)
    return out


def _json_elements(b: bytes, i: int) -> list[int]:
    """Where each element of the array at `b[i]` (`[`) starts."""
    out: list[int] = []
    i = _json_ws(b, i + 1)
    while b[i:i + 1] != b"]":
        out.append(i)
        i = _json_ws(b, _json_value_end(b, i))
        if b[i:i + 1] == b",":
            i = _json_ws(b, i + 1)
    return out


def _null_member_cuts(b: bytes, members: list[tuple[str, int, int, int]],
                      names: Iterable[str]) -> tuple[list[tuple[int, int]], list[str]]:
    """Byte ranges that remove the members named in `names` whose value is null, with their
    separating comma, from one object; and the keys removed."""
    drop = [b[s:e] == b"null" and k in set(names) for k, _, s, e in members]
    kept = [m for m, d in zip(members, drop, strict=True) if not d]
    cuts: list[tuple[int, int]] = []
    if not kept:
        if any(drop):
            cuts.append((members[0][1], members[-1][3]))
    else:
        prev_end: int | None = None  # the end of the last kept member before this one
        for (_, key_start, _, end), d in zip(members, drop, strict=True):
            if not d:
                prev_end = end
            elif prev_end is None:  # before the first kept member: up to its key
                cuts.append((key_start, kept[0][1]))
            else:  # after a kept member: from its end, comma included
                cuts.append((prev_end, end))
    return cuts, [k for (k, *_), d in zip(members, drop, strict=True) if d]


def oci_config_nulls(raw: bytes) -> tuple[bytes, tuple[str, ...]]:
    """`raw` with every member the OCI config schema types but that holds null left out
    (`OCI_CONFIG_NOT_NULL`...), cut out of the bytes: everything else (key order, spacing,
    escapes, numbers) stays byte for byte. Returns `raw` itself and `()` when there is none,
    else the new bytes and the members dropped (`config.Env`, `history[2].comment`)."""
    data = load_json(raw, "image config")
    cuts, dropped = _null_member_cuts(raw, top := _json_members(raw, _json_ws(raw, 0)),
                                      OCI_CONFIG_NOT_NULL)
    for key, _, start, _ in top:
        if key == "config" and isinstance(data.get("config"), dict):
            c, d = _null_member_cuts(raw, _json_members(raw, start), OCI_CONFIG_CONFIG_NOT_NULL)
            cuts += c
            dropped += [f"config.{k}" for k in d]
        elif key == "history" and isinstance(data.get("history"), list):
            for n, at in enumerate(_json_elements(raw, start)):
                if raw[at:at + 1] == b"{":
                    c, d = _null_member_cuts(raw, _json_members(raw, at),
                                             OCI_CONFIG_HISTORY_NOT_NULL)
                    cuts += c
                    dropped += [f"history[{n}].{k}" for k in d]
    if not cuts:
        return raw, ()
    merged: list[list[int]] = []  # the cuts of one object overlap when drops are adjacent
    for start, end in sorted(cuts):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out = raw
    for start, end in reversed(merged):
        out = out[:start] + out[end:]
    if load_json(out, "image config") != _without(data, dropped):  # (duplicate keys, say)
        raise ImageError(f"image config: cannot leave out its null {', '.join(dropped)}")
    return out, tuple(dropped)


def _without(data: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """A deep copy of config `data` without the members `oci_config_nulls` names."""
    out: dict[str, Any] = json.loads(json.dumps(data))
    for path in paths:  # `os.version`, `config.Env`, `history[2].comment`
        obj, key = out, path
        if path.startswith("config."):
            obj, key = out["config"], path[len("config."):]
        elif path.startswith("history["):
            n, _, key = path[len("history["):].partition("].")
            obj = out["history"][int(n)]
        obj.pop(key, None)
    return out


# --- times as configs carry them ---

def now_rfc3339() -> str:
    """The time now, UTC, RFC 3339 with nanoseconds (Go's RFC3339Nano trims trailing 0s)."""
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    digits = f"{frac:09d}".rstrip("0")
    return f"{text}.{digits}Z" if digits else f"{text}Z"


def created_time(source_date_epoch: int | None) -> str:
    """A history entry's or config's `created`: SOURCE_DATE_EPOCH in whole seconds when set
    (reproducible builds), else now."""
    if source_date_epoch is None:
        return now_rfc3339()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(source_date_epoch))
