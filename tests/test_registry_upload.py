"""Chunked blob uploads: PATCHes of a bounded size to a real registry, the registry's
`OCI-Chunk-Min-Length` honoured, and a PATCH that fails half-way resumed from the `Range` the
registry reports. docker-registry 2.8 sends no chunk minimum and never fails a PATCH on
demand (FACTS.md), so those two run against the hostile registry, taught to do it here."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import pytest
from registry_servers import HostileRegistry, Mode, RegistryServer, unique_repo

from ocilayers.errors import OCILayersError
from ocilayers.registry import Registry, RegistryOptions
from ocilayers.spec import Digest

DATA = os.urandom(300_000)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())


def _registry(host: str, chunk: int) -> Registry:
    return Registry(host, RegistryOptions(chunk_size=chunk, monolithic=False))


def _read_back(reg: Registry, repo: str) -> bytes:
    blob = reg.open_blob(repo, DIGEST, len(DATA))
    try:
        return b"".join(iter(lambda: blob.read(1 << 16), b""))
    finally:
        blob.close()


def test_chunked_upload_to_docker_registry(plain_registry: RegistryServer) -> None:
    repo = unique_repo("chunked")
    reg = _registry(plain_registry.host, 64 << 10)
    mark = plain_registry.log_offset()
    assert reg.upload_blob(repo, io.BytesIO(DATA), DIGEST) == (DIGEST, len(DATA))
    # 300000 bytes in 64 KiB chunks: 5 PATCHes, each to the Location the last one gave
    assert plain_registry.wait_for_requests(5, "PATCH", rf"/v2/{repo}/blobs/uploads/",
                                            since=mark) == 5
    assert _read_back(reg, repo) == DATA
    # An unknown digest is what the bytes hash to (a layer compressed as it goes up).
    repo2 = unique_repo("chunked")
    assert reg.upload_blob(repo2, io.BytesIO(DATA)) == (DIGEST, len(DATA))


def _patch_sizes(h: HostileRegistry, repo: str) -> list[int]:
    return [int(r.headers.get("content-length", "0"))
            for r in h.requests_for(repo, method="PATCH")]


def test_chunk_min_length_is_honoured(hostile_registry: HostileRegistry,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    h = hostile_registry
    repo = h.serve("team/min", Mode.OK)
    real = h._respond

    def respond(hh: Any, rec: Any, status: int, body: bytes = b"",
                headers: Any = None) -> None:
        if rec.kind == "upload" and hh.command == "POST" and status == 202:
            headers = {**(headers or {}), "OCI-Chunk-Min-Length": "120000"}
        real(hh, rec, status, body, headers)

    monkeypatch.setattr(h, "_respond", respond)
    reg = _registry(h.host, 64 << 10)
    assert reg.upload_blob(repo.name, io.BytesIO(DATA), DIGEST) == (DIGEST, len(DATA))
    assert _patch_sizes(h, repo.name) == [120000, 120000, 60000]
    assert repo.blobs[str(DIGEST)] == DATA


def test_failed_patch_resumes_from_the_registrys_range(hostile_registry: HostileRegistry,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    h = hostile_registry
    repo = h.serve("team/resume", Mode.OK)
    real = h._upload
    failed: list[int] = []

    def upload(hh: Any, rec: Any, r: Any, method: str, upload_id: str) -> None:
        if method == "PATCH" and len(h.requests_for(r.name, method="PATCH")) == 2 \
                and not failed:
            body = h._read_body(hh)  # keep half of this chunk, then fail the request
            r.uploads[upload_id] += body[:len(body) // 2]
            failed.append(len(body) // 2)
            h._error(hh, rec, 500, "UNKNOWN", "disk hiccup")
            return
        real(hh, rec, r, method, upload_id)

    monkeypatch.setattr(h, "_upload", upload)
    reg = _registry(h.host, 100_000)
    assert reg.upload_blob(repo.name, io.BytesIO(DATA), DIGEST) == (DIGEST, len(DATA))
    assert failed == [50_000]
    # the status GET, then only what the registry lacked: the second half of chunk 2
    assert len(h.requests_for(repo.name, method="GET", kind="upload")) == 1
    assert _patch_sizes(h, repo.name) == [100_000, 100_000, 50_000, 100_000]
    assert repo.blobs[str(DIGEST)] == DATA


def test_upload_location_on_another_host_gets_no_credentials(
        hostile_registry: HostileRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    # A registry may point an upload anywhere; its credentials stay with it.
    h = hostile_registry
    repo = h.serve("team/elsewhere", Mode.OK, auth="basic", username="u", password="p")
    real = h._respond

    def respond(hh: Any, rec: Any, status: int, body: bytes = b"",
                headers: Any = None) -> None:
        if rec.kind == "upload" and hh.command == "POST" and status == 202:
            headers = {**(headers or {}), "Location": f"{h.other_url}/upload/1"}
        real(hh, rec, status, body, headers)

    monkeypatch.setattr(h, "_respond", respond)
    reg = Registry(h.host, RegistryOptions(creds="u:p"))
    with pytest.raises(OCILayersError):  # (the other host holds no upload: 404)
        reg.upload_blob(repo.name, io.BytesIO(DATA), DIGEST, len(DATA))
    there = h.requests_for(listener="other")
    assert there, "the upload went to the Location"
    assert all(r.authorization is None for r in there)
    assert any(r.authorization for r in h.requests_for(repo.name, kind="upload"))  # (here: yes)


def test_redirect_to_a_file_url_is_refused(hostile_registry: HostileRegistry,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    h = hostile_registry
    repo = h.serve("team/file", Mode.OK)
    real = h._respond

    def respond(hh: Any, rec: Any, status: int, body: bytes = b"",
                headers: Any = None) -> None:
        if rec.kind == "blob" and hh.command == "GET":
            real(hh, rec, 302, b"", {"Location": "file:///etc/passwd"})
            return
        real(hh, rec, status, body, headers)

    monkeypatch.setattr(h, "_respond", respond)
    reg = Registry(h.host)
    digest = Digest.parse(next(iter(repo.blobs)))
    with pytest.raises(OCILayersError, match="redirect to a file URL refused"):
        reg.open_blob(repo.name, digest, len(repo.blobs[str(digest)])).read()
