"""`unpack docker://` against the hostile fake registry (registry_servers.HostileRegistry): a
bad registry ends the pull with one `ocilayers: error:` line (exit 1, no traceback) and leaves
the store as it was; errors name the registry, the repository, the HTTP status and the
registry's error code; auth never follows a redirect to another host; a broken or stalled
download is resumed with Range; a tag is known by the digest of its bytes.

Every failing pull goes into a store that already holds fixtures/tiny, so "nothing registered"
is checked as "`images --json` and the layer dirs, `l/` links and layerdb are unchanged"."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import registry_servers
from conftest import FIXTURES, assert_one_line_error, run_module
from registry_servers import HostileRegistry, HostileRequest, Mode, make_image, sha256_digest

MiB = 1 << 20
# Base layer: 300 kB that gzip cannot shrink (deterministic), so a stalled or broken download of
# it is really cut in the middle; the top layer is small.
NOISE = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(300_000 // 32))
IMG = make_image({"noise.bin": NOISE}, extra_layers=[{"top.txt": b"top layer\n"}])
BASE = IMG.layer_digests[0]  # the hostile modes below touch it (nothing can be registered)
CREDS = ("hostile-user", "s3cret")


@pytest.fixture(autouse=True)
def _short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hostile answer may hold a test for the default 60 s (hang tests lower it to 2 s)."""
    monkeypatch.setenv("OCILAYERS_HTTP_TIMEOUT", "10")


def ref(h: HostileRegistry, repo: str, tag: str = "latest") -> str:
    return f"docker://{h.host}/{repo}{tag if tag.startswith('@') else ':' + tag}"


def ol(root: Path, *args: str) -> Any:
    return run_module(["--root", str(root), *args])


def store_state(root: Path) -> tuple[Any, ...]:
    """`images --json`, the overlay2 entries (layer dirs, staging dirs, `l`), the `l/` links and
    the layerdb ChainIDs."""
    proc = ol(root, "images", "--json")
    assert proc.returncode == 0, proc.stderr

    def ls(p: Path) -> list[str]:
        return sorted(os.listdir(p)) if p.is_dir() else []

    return (json.loads(proc.stdout), ls(root / "overlay2"), ls(root / "overlay2" / "l"),
            ls(root / "image" / "overlay2" / "layerdb" / "sha256"))


def seeded_store(tmp_path: Path) -> tuple[Path, tuple[Any, ...]]:
    root = tmp_path / "store"
    proc = ol(root, "unpack", str(FIXTURES / "tiny"))
    assert proc.returncode == 0, proc.stderr
    state = store_state(root)
    assert len(state[0]) == 1 and "l" in state[1]
    return root, state


def unpack_fails(tmp_path: Path, source: str, *needles: str, args: tuple[str, ...] = ()) -> str:
    """Unpack `source` into a seeded store: one error line holding every needle, exit 1, no
    output, and the store unchanged. Returns the error line."""
    root, before = seeded_store(tmp_path)
    proc = ol(root, *args, "unpack", source)
    msg = assert_one_line_error(proc.returncode, proc.stderr, *needles)
    assert "internal error" not in msg
    assert proc.stdout == ""
    assert store_state(root) == before
    return msg


def unpack_ok(tmp_path: Path, source: str, *args: str) -> dict[str, Any]:
    root = tmp_path / "store"
    proc = ol(root, *args, "unpack", source, "--json")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    assert result["image_id"] == IMG.config_digest
    assert [x["diff_id"] for x in result["layers"]] == \
        json.loads(IMG.config)["rootfs"]["diff_ids"]
    state = store_state(root)
    assert [i["image_id"] for i in state[0]] == [IMG.config_digest]
    return result


def blob_gets(h: HostileRegistry, repo: str, digest: str,
              listener: str = "main") -> list[HostileRequest]:
    return [r for r in h.requests_for(repo, method="GET", kind="blob", listener=listener)
            if r.path.endswith(digest)]


# --- bad content ---

@pytest.mark.parametrize("which", ["config", "base-layer"])
def test_blob_with_wrong_digest(hostile_registry: HostileRegistry, tmp_path: Path,
                                which: str) -> None:
    h = hostile_registry
    digest = IMG.config_digest if which == "config" else BASE
    h.serve("wrong/digest", Mode.BLOB_WRONG_DIGEST, IMG, only_digests={digest})
    unpack_fails(tmp_path, ref(h, "wrong/digest"), digest[:19])
    assert blob_gets(h, "wrong/digest", digest), "the bad blob was never asked for"


def test_blob_truncated_once_is_resumed_with_range(hostile_registry: HostileRegistry,
                                                   tmp_path: Path) -> None:
    h = hostile_registry
    h.serve("cut/once", Mode.BLOB_TRUNCATED, IMG, truncate_at=100)
    unpack_ok(tmp_path, ref(h, "cut/once"))
    for digest in [IMG.config_digest, *IMG.layer_digests]:
        gets = blob_gets(h, "cut/once", digest)
        assert [(r.status, r.headers.get("range")) for r in gets] == \
            [(200, None), (206, "bytes=100-")], digest


def test_blob_truncated_every_time_fails_after_bounded_resumes(
        hostile_registry: HostileRegistry, tmp_path: Path) -> None:
    h = hostile_registry
    # truncate_at=0: every answer announces the whole blob and closes before its first byte
    h.serve("cut/always", Mode.BLOB_TRUNCATED, IMG, truncate_at=0, only_digests={BASE})
    unpack_fails(tmp_path, ref(h, "cut/always"), h.host, "cut/always", BASE[:19])
    assert 1 < len(blob_gets(h, "cut/always", BASE)) <= 6  # first try + 5 resumes at most


class _Cuts:
    """A `truncate_at` that changes per request: the given cuts in turn, then the last."""

    def __init__(self, *cuts: int) -> None:
        self.cuts = list(cuts)

    def __index__(self) -> int:
        return self.cuts.pop(0) if len(self.cuts) > 1 else self.cuts[0]


# A resumed download whose server ignores Range (200, the whole blob again) and breaks
# before the offset already read is resumed again, not an error: GET 1 sends 200000 of
# ~300 kB, GET 2 (Range ignored) 100000, GET 3 everything.
def test_resume_survives_server_ignoring_range_and_breaking_again(
        hostile_registry: HostileRegistry, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = hostile_registry
    monkeypatch.setattr(registry_servers, "_parse_range", lambda value, size: None)
    size = len(IMG.blobs[BASE])
    h.serve("cut/norange", Mode.BLOB_TRUNCATED, IMG, only_digests={BASE},
            truncate_at=_Cuts(200_000, 100_000, size))
    proc = ol(tmp_path / "store", "unpack", ref(h, "cut/norange"))
    assert "internal error" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert [r.bytes_sent for r in blob_gets(h, "cut/norange", BASE)] == \
        [200_000, 100_000, size]


@pytest.mark.parametrize("command", ["unpack", "inspect"])
def test_manifest_not_matching_its_digest(hostile_registry: HostileRegistry, tmp_path: Path,
                                          command: str) -> None:
    h = hostile_registry
    repo = h.serve("mismatch", Mode.MANIFEST_MISMATCH, IMG)
    source = ref(h, "mismatch", "@" + repo.manifest_digest)
    needles = (h.host, "repository mismatch", repo.manifest_digest)
    if command == "unpack":
        unpack_fails(tmp_path, source, *needles)
    else:
        proc = run_module(["inspect", source])
        assert_one_line_error(proc.returncode, proc.stderr, *needles)
    assert h.count("mismatch", kind="blob") == 0  # nothing read on the strength of it


@pytest.mark.parametrize(("size", "limit"), [(100 * MiB, 8 * MiB), (None, 32 * MiB)],
                         ids=["100MB", "endless"])
def test_huge_manifest_refused_without_reading_it(hostile_registry: HostileRegistry,
                                                  tmp_path: Path, size: int | None,
                                                  limit: int) -> None:
    """What the server wrote includes the kernel's socket buffers: the 4 MiB the client may read
    of a manifest with no length, plus up to ~10 MB of buffers, is far from 100 MB (or endless:
    finishing at all shows the client hung up)."""
    h = hostile_registry
    h.serve("huge", Mode.MANIFEST_HUGE, IMG, huge_size=size)
    unpack_fails(tmp_path, ref(h, "huge"), h.host, "repository huge", "4 MiB")
    (get,) = h.requests_for("huge", kind="manifest")
    assert get.bytes_sent < limit


# --- bad transport ---

def test_redirect_loop(hostile_registry: HostileRegistry, tmp_path: Path) -> None:
    h = hostile_registry
    h.serve("loop", Mode.BLOB_REDIRECT_LOOP, IMG)
    unpack_fails(tmp_path, ref(h, "loop"), h.host, "/loop/", "redirect")
    hops = h.count("loop", kind="blob")
    assert 1 < hops <= 5 * 11  # (5 tries of 10 redirects at the very most)


def test_500_on_every_try_is_retried_a_bounded_number_of_times(
        hostile_registry: HostileRegistry, tmp_path: Path) -> None:
    h = hostile_registry
    h.serve("always/500", Mode.ERROR, IMG)
    unpack_fails(tmp_path, ref(h, "always/500"), h.host, "always/500", "HTTP 500", "UNKNOWN")
    tries = h.requests_for("always/500")
    assert 1 < len(tries) <= 5, [(r.method, r.path) for r in tries]
    assert {(r.method, r.kind, r.status) for r in tries} == {("GET", "manifest", 500)}


def test_stalled_blob_times_out_and_resumes_with_range(hostile_registry: HostileRegistry,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    h = hostile_registry
    monkeypatch.setenv("OCILAYERS_HTTP_TIMEOUT", "2")
    h.serve("stall/once", Mode.BLOB_HANG, IMG, only_digests={BASE})
    unpack_ok(tmp_path, ref(h, "stall/once"))
    gets = blob_gets(h, "stall/once", BASE)
    assert gets[0].headers.get("range") is None and gets[0].bytes_sent < len(IMG.blobs[BASE])
    assert gets[-1].status == 206 and (gets[-1].headers.get("range") or "").startswith("bytes=")


def test_stalled_blob_forever_fails(hostile_registry: HostileRegistry, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    h = hostile_registry
    monkeypatch.setenv("OCILAYERS_HTTP_TIMEOUT", "2")
    # hang_after=0: headers, then silence, on every try (no byte read: nothing to resume from)
    h.serve("stall/always", Mode.BLOB_HANG, IMG, only_digests={BASE}, hang_after=0)
    msg = unpack_fails(tmp_path, ref(h, "stall/always"), h.host, "stall/always", BASE[:19])
    assert "timed out" in msg.lower()
    assert 1 < len(blob_gets(h, "stall/always", BASE)) <= 6


# --- error messages: registry, repository, HTTP status, the registry's code ---

def _missing_tag(h: HostileRegistry) -> tuple[str, tuple[str, ...]]:
    h.serve("team/app", Mode.OK, IMG)
    return ref(h, "team/app", "no-such-tag"), ()


def _unknown_repo(h: HostileRegistry) -> tuple[str, tuple[str, ...]]:
    return ref(h, "team/app"), ()


def _missing_blob(h: HostileRegistry) -> tuple[str, tuple[str, ...]]:
    del h.serve("team/app", Mode.OK, IMG).blobs[BASE]
    return ref(h, "team/app"), ()


def _wrong_basic(h: HostileRegistry) -> tuple[str, tuple[str, ...]]:
    h.serve("team/app", Mode.OK, IMG, auth="basic", username=CREDS[0], password=CREDS[1])
    return ref(h, "team/app"), ("--creds", f"{CREDS[0]}:wrong")


def _wrong_bearer(h: HostileRegistry) -> tuple[str, tuple[str, ...]]:
    h.serve("team/app", Mode.OK, IMG, auth="bearer", username=CREDS[0], password=CREDS[1])
    return ref(h, "team/app"), ("--creds", f"{CREDS[0]}:wrong")


def _no_creds(h: HostileRegistry) -> tuple[str, tuple[str, ...]]:
    h.serve("team/app", Mode.OK, IMG, auth="basic", username=CREDS[0], password=CREDS[1])
    return ref(h, "team/app"), ()


@pytest.mark.parametrize(("setup", "status", "code"), [
    pytest.param(_missing_tag, 404, "MANIFEST_UNKNOWN", id="missing-tag"),
    pytest.param(_unknown_repo, 404, "NAME_UNKNOWN", id="unknown-repo"),
    # (the registry's own code from the error body, not just "missing")
    pytest.param(_missing_blob, 404, "BLOB_UNKNOWN", id="missing-blob"),
    pytest.param(_wrong_basic, 401, "UNAUTHORIZED", id="wrong-basic-creds"),
    # (a token server refusing the creds: the repository is named too)
    pytest.param(_wrong_bearer, 401, "UNAUTHORIZED", id="wrong-bearer-creds"),
    # (Basic auth and no creds: the repository and the 401 are named)
    pytest.param(_no_creds, 401, "UNAUTHORIZED", id="no-creds"),
])
def test_error_names_registry_repository_status_and_code(
        hostile_registry: HostileRegistry, tmp_path: Path, setup: Any, status: int,
        code: str) -> None:
    h = hostile_registry
    source, args = setup(h)
    unpack_fails(tmp_path, source, h.host, "team/app", f"HTTP {status}", code, args=args)
    # a 4xx is an answer, not a failure to retry: each request is made at most twice (the
    # second time with credentials after a 401)
    paths = [r.path for r in h.requests_for("team/app")]
    assert all(paths.count(p) <= 2 for p in paths), paths


# --- auth ---

@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_redirect_to_other_host_drops_authorization(hostile_registry: HostileRegistry,
                                                    tmp_path: Path, auth: str) -> None:
    h = hostile_registry
    h.serve("redir", Mode.BLOB_REDIRECT_OTHER_HOST, IMG, auth=auth, username=CREDS[0],
            password=CREDS[1])
    unpack_ok(tmp_path, ref(h, "redir"), "--creds", ":".join(CREDS))
    main = h.requests_for("redir", kind="blob", listener="main")
    other = h.requests_for("redir", kind="blob", listener="other")
    assert {r.status for r in main} == {307} and len(main) == 3
    assert all(r.authorization for r in main)  # it was sent to the registry...
    assert [r.authorization for r in other] == [None] * 3  # ...and not to the other host
    assert {r.path.rsplit("/", 1)[-1] for r in other} == set(IMG.blobs)


def test_basic_auth_with_creds(hostile_registry: HostileRegistry, tmp_path: Path) -> None:
    h = hostile_registry
    h.serve("basic", Mode.OK, IMG, auth="basic", username=CREDS[0], password=CREDS[1])
    unpack_ok(tmp_path, ref(h, "basic"), "--creds", ":".join(CREDS))
    reqs = h.requests_for("basic")
    assert (reqs[0].status, reqs[0].authorization) == (401, None)
    want = "Basic " + base64.b64encode(":".join(CREDS).encode()).decode()
    assert all(r.status == 200 and r.authorization == want for r in reqs[1:]), \
        [(r.path, r.status, r.authorization) for r in reqs]
    assert len(reqs) == 1 + 1 + len(IMG.blobs)


@pytest.mark.parametrize("challenge", ["on-request", "on-ping"])
def test_bearer_challenge_flow(hostile_registry: HostileRegistry, tmp_path: Path,
                               challenge: str) -> None:
    h = hostile_registry
    h.serve("bearer", Mode.OK, IMG, auth="bearer", username=CREDS[0], password=CREDS[1])
    if challenge == "on-ping":
        h.ping_status = 401
        h.ping_headers = {"WWW-Authenticate":
                          f'Bearer realm="{h.url}/token",service="hostile-registry"'}
    unpack_ok(tmp_path, ref(h, "bearer"), "--creds", ":".join(CREDS))
    (token_req,) = h.requests_for(kind="token")
    assert token_req.status == 200
    assert token_req.query.get("scope") == ["repository:bearer:pull"]
    assert token_req.query.get("service") == ["hostile-registry"]
    reqs = h.requests_for("bearer")
    order = h.requests_for().index  # (the log is in arrival order)
    if challenge == "on-request":  # refused without a token, asked again with it
        assert (reqs[0].kind, reqs[0].status, reqs[0].authorization) == ("manifest", 401, None)
        assert order(reqs[0]) < order(token_req)
        reqs = reqs[1:]
    assert reqs[0].kind == "manifest" and order(token_req) < order(reqs[0])
    tokens = {r.authorization for r in reqs}
    assert len(tokens) == 1 and (tokens.pop() or "")[7:] in h.tokens
    assert {r.status for r in reqs} == {200} and (reqs[0].authorization or "").startswith(
        "Bearer ")


# --- a tag's Docker-Content-Digest is not trusted ---

def test_tag_with_wrong_docker_content_digest(hostile_registry: HostileRegistry,
                                              tmp_path: Path) -> None:
    h = hostile_registry
    h.serve("lying/tag", Mode.TAG_WRONG_DIGEST, IMG)
    lie = sha256_digest(b"not this manifest " + IMG.manifest)
    unpack_ok(tmp_path, ref(h, "lying/tag"))
    (get,) = h.requests_for("lying/tag", kind="manifest")
    assert get.status == 200
    repos = json.loads((tmp_path / "store/image/overlay2/repositories.json").read_text())
    names = repos["Repositories"][f"{h.host}/lying/tag"]
    assert names == {f"{h.host}/lying/tag:latest": IMG.config_digest,
                     f"{h.host}/lying/tag@{IMG.manifest_digest}": IMG.config_digest}
    proc = run_module(["inspect", ref(h, "lying/tag"), "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["manifest_digest"] == IMG.manifest_digest
    assert lie not in proc.stdout
