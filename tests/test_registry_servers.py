"""Self-tests of the registry fixtures in registry_servers.py: skopeo (a real client) pushes to
and pulls from each real registry, auth is really on, and the hostile fake answers as set."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import registry_servers
import urllib3
from conftest import FIXTURES
from registry_servers import (
    HostileRegistry,
    Mode,
    RegistryServer,
    TokenRegistry,
    image_from_layout,
    make_image,
    run_skopeo,
    sha256_digest,
    unique_repo,
)

# The fixtures, bound by assignment: pytest finds them by name, and ruff (F811) does not take
# a test's parameter of the same name for a redefinition of an import.
tls_registry = registry_servers.tls_registry
plain_registry = registry_servers.plain_registry
token_registry = registry_servers.token_registry
hostile_registry = registry_servers.hostile_registry

DEMO = FIXTURES / "demo"
TINY = FIXTURES / "tiny"


def layout_digest(layout: Path) -> str:
    digest: str = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    return digest


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    """A plain urllib3 client: no retries, no redirects followed unless a test asks."""
    pm = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=10))
    yield pm
    pm.clear()


# --- real registries ---

def test_tls_registry_push_pull_and_access_log(tls_registry: RegistryServer,
                                               tmp_path: Path) -> None:
    reg = tls_registry
    assert reg.url == f"https://{reg.host}" and reg.host.startswith("127.0.0.1:")
    assert reg.cert_dir is not None and (reg.cert_dir / "ca.crt").is_file()
    assert reg.certs_d is not None and (reg.certs_d / reg.host / "ca.crt").is_file()
    repo = unique_repo("demo")
    mark = reg.log_offset()
    run_skopeo(tmp_path, "copy", f"oci:{DEMO}:latest", f"docker://{reg.host}/{repo}:v1",
               "--dest-cert-dir", str(reg.cert_dir), "--dest-creds", reg.creds)
    run_skopeo(tmp_path, "copy", f"docker://{reg.host}/{repo}:v1", f"oci:{tmp_path}/out:latest",
               "--src-cert-dir", str(reg.cert_dir), "--src-creds", reg.creds)
    assert layout_digest(tmp_path / "out") == layout_digest(DEMO)
    # the access log counts what the client did: 5 blobs (config + 4 layers), 1 manifest
    blobs = len(image_from_layout(DEMO).blobs)
    assert reg.wait_for_requests(1, "PUT", rf"^/v2/{repo}/manifests/", since=mark) == 1
    assert reg.count_requests("PUT", rf"^/v2/{repo}/blobs/uploads/", since=mark) == blobs
    assert reg.count_requests("POST", rf"^/v2/{repo}/blobs/uploads/$", since=mark) == blobs
    assert reg.count_requests("GET", rf"^/v2/{repo}/blobs/sha256:", since=mark,
                              status=200) == blobs


def test_tls_registry_auth_and_tls_are_real(tls_registry: RegistryServer, tmp_path: Path,
                                            http: urllib3.PoolManager) -> None:
    reg = tls_registry
    repo = unique_repo("noauth")
    proc = run_skopeo(tmp_path, "copy", f"oci:{TINY}:latest", f"docker://{reg.host}/{repo}:v1",
                      "--dest-cert-dir", str(reg.cert_dir), check=False)
    assert proc.returncode != 0
    assert "authentication required" in proc.stderr or "unauthorized" in proc.stderr, proc.stderr
    with urllib3.PoolManager(retries=False, ca_certs=str(reg.ca_cert)) as pm:
        resp = pm.request("GET", f"{reg.url}/v2/")
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic ")
        resp = pm.request("GET", f"{reg.url}/v2/", headers={"Authorization": reg.basic_auth()})
        assert resp.status == 200
    # the system trust store does not know the test CA
    with pytest.raises(urllib3.exceptions.SSLError):
        http.request("GET", f"{reg.url}/v2/")


def test_plain_registry(plain_registry: RegistryServer, tmp_path: Path) -> None:
    reg = plain_registry
    assert reg.url.startswith("http://127.0.0.1:") and reg.ca_cert is None
    repo = unique_repo("plain")
    run_skopeo(tmp_path, "copy", f"oci:{TINY}:latest", f"docker://{reg.host}/{repo}:v1",
               "--dest-tls-verify=false")
    run_skopeo(tmp_path, "copy", f"docker://{reg.host}/{repo}:v1", f"oci:{tmp_path}/out:latest",
               "--src-tls-verify=false")
    assert layout_digest(tmp_path / "out") == layout_digest(TINY)


def test_token_registry(token_registry: TokenRegistry, tmp_path: Path) -> None:
    reg, issuer = token_registry, token_registry.token_issuer
    issuer.reset()
    repo = unique_repo("tok")
    cert = ("--dest-cert-dir", str(reg.cert_dir))
    run_skopeo(tmp_path, "copy", f"oci:{TINY}:latest", f"docker://{reg.host}/{repo}:v1", *cert,
               "--dest-creds", reg.creds)
    asked = [r for r in issuer.requests if r.user == reg.username]
    assert asked and all(r.status == 200 and r.service == reg.service for r in asked)
    assert {"type": "repository", "name": repo, "actions": ["pull", "push"]} in asked[0].granted

    # anonymous: pull is granted (skopeo pulls), push is not
    run_skopeo(tmp_path, "inspect", "--raw", "--cert-dir", str(reg.cert_dir),
               f"docker://{reg.host}/{repo}:v1")
    issuer.reset()
    proc = run_skopeo(tmp_path, "copy", f"oci:{TINY}:latest",
                      f"docker://{reg.host}/{unique_repo('anon')}:v1", *cert, check=False)
    assert proc.returncode != 0 and "denied" in proc.stderr, proc.stderr
    assert issuer.requests and all(r.user is None for r in issuer.requests)
    assert all(a["actions"] == ["pull"] for r in issuer.requests for a in r.granted)

    # bad credentials: the issuer answers 401
    proc = run_skopeo(tmp_path, "copy", f"oci:{TINY}:latest", f"docker://{reg.host}/{repo}:v2",
                      *cert, "--dest-creds", f"{reg.username}:wrong", check=False)
    assert proc.returncode != 0 and issuer.requests[-1].status == 401


def test_token_registry_private_source_mount(token_registry: TokenRegistry,
                                             tmp_path: Path) -> None:
    """The user may push to private-target but not pull from private-source: a cross-repo
    mount from there is 401 insufficient_scope (the admin seeds private-source)."""
    reg, issuer = token_registry, token_registry.token_issuer
    issuer.reset()
    run_skopeo(tmp_path, "copy", f"oci:{TINY}:latest",
               f"docker://{reg.host}/{reg.private_source}:seed",
               "--dest-cert-dir", str(reg.cert_dir), "--dest-creds", reg.admin_creds)
    layer = image_from_layout(TINY).layer_digests[0]
    auth = "Basic " + base64.b64encode(reg.creds.encode()).decode()
    with urllib3.PoolManager(retries=False, ca_certs=str(reg.ca_cert)) as pm:
        resp = pm.request("GET", issuer.realm, headers={"Authorization": auth}, fields=[
            ("service", reg.service),
            ("scope", f"repository:{reg.private_target}:pull,push"),
            ("scope", f"repository:{reg.private_source}:pull")])
        assert resp.status == 200
        body = resp.json()
        assert body["expires_in"] == 300 and body["token"] == body["access_token"]
        assert issuer.requests[-1].granted == [
            {"type": "repository", "name": reg.private_target, "actions": ["pull", "push"]}]
        bearer = {"Authorization": "Bearer " + body["token"]}
        resp = pm.request("POST", f"{reg.url}/v2/{reg.private_target}/blobs/uploads/"
                          f"?mount={layer}&from={reg.private_source}", headers=bearer)
        assert resp.status == 401
        assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
        # a plain upload to private-target is allowed with the same token
        resp = pm.request("POST", f"{reg.url}/v2/{reg.private_target}/blobs/uploads/",
                          headers=bearer)
        assert resp.status == 202
        # docker-registry 2.8 answers with an absolute Location
        location = resp.headers["Location"]
        assert location.startswith(f"{reg.url}/v2/{reg.private_target}/blobs/uploads/")
        pm.request("DELETE", urllib.parse.urljoin(reg.url, location), headers=bearer)


# --- the hostile registry ---

def test_hostile_ok_and_skopeo_round_trip(hostile_registry: HostileRegistry,
                                          http: urllib3.PoolManager, tmp_path: Path) -> None:
    h = hostile_registry
    img = make_image()
    h.serve("good/img", image=img)
    resp = http.request("GET", f"{h.url}/v2/good/img/manifests/latest")
    assert resp.status == 200 and resp.data == img.manifest
    assert resp.headers["Docker-Content-Digest"] == img.manifest_digest
    layer = img.layer_digests[0]
    resp = http.request("GET", f"{h.url}/v2/good/img/blobs/{layer}")
    assert sha256_digest(resp.data) == layer
    resp = http.request("GET", f"{h.url}/v2/good/img/blobs/{layer}",
                        headers={"Range": "bytes=10-"})
    assert resp.status == 206 and resp.data == img.blobs[layer][10:]
    assert h.count("good/img", method="GET", kind="blob") == 2
    # a real client can push to it and pull back
    run_skopeo(tmp_path, "copy", f"oci:{TINY}:latest", f"docker://{h.host}/pushed:v1",
               "--dest-tls-verify=false")
    run_skopeo(tmp_path, "copy", f"docker://{h.host}/pushed:v1", f"oci:{tmp_path}/out:latest",
               "--src-tls-verify=false")
    assert layout_digest(tmp_path / "out") == layout_digest(TINY)
    h.reset()
    assert h.requests == [] and h.repos == {}


def test_hostile_bad_content(hostile_registry: HostileRegistry, http: urllib3.PoolManager) -> None:
    h = hostile_registry
    img = make_image({"a.txt": b"x" * 5000})
    layer = img.layer_digests[0]

    h.serve("wrong", Mode.BLOB_WRONG_DIGEST, img)
    resp = http.request("GET", f"{h.url}/v2/wrong/blobs/{layer}")
    assert resp.status == 200 and len(resp.data) == len(img.blobs[layer])
    assert sha256_digest(resp.data) != layer and resp.headers["Docker-Content-Digest"] == layer

    h.serve("trunc", Mode.BLOB_TRUNCATED, img, truncate_at=100)
    resp = http.request("GET", f"{h.url}/v2/trunc/blobs/{layer}", preload_content=False)
    assert int(resp.headers["Content-Length"]) == len(img.blobs[layer])
    with pytest.raises(urllib3.exceptions.ProtocolError):
        resp.read()
    resp.release_conn()

    h.serve("mismatch", Mode.MANIFEST_MISMATCH, img)
    resp = http.request("GET", f"{h.url}/v2/mismatch/manifests/{img.manifest_digest}")
    assert resp.headers["Docker-Content-Digest"] == img.manifest_digest
    assert sha256_digest(resp.data) != img.manifest_digest
    resp = http.request("GET", f"{h.url}/v2/mismatch/manifests/latest")
    assert resp.data == img.manifest

    h.serve("tagdigest", Mode.TAG_WRONG_DIGEST, img)
    resp = http.request("GET", f"{h.url}/v2/tagdigest/manifests/latest")
    assert resp.data == img.manifest
    assert resp.headers["Docker-Content-Digest"] != img.manifest_digest

    h.serve("huge", Mode.MANIFEST_HUGE, img)
    resp = http.request("GET", f"{h.url}/v2/huge/manifests/latest", preload_content=False)
    assert int(resp.headers["Content-Length"]) == 100 * 1024 * 1024
    assert len(resp.read(1 << 20)) == 1 << 20
    resp.close()  # hangs up (close() does not drain)
    http.clear()


def test_hostile_redirects_hang_errors(hostile_registry: HostileRegistry,
                                       http: urllib3.PoolManager) -> None:
    h = hostile_registry
    img = make_image({"b.bin": secrets.token_bytes(20000)})  # gzip cannot shrink it
    layer = img.layer_digests[0]
    data = img.blobs[layer]

    h.serve("loop", Mode.BLOB_REDIRECT_LOOP, img)
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        http.request("GET", f"{h.url}/v2/loop/blobs/{layer}", retries=urllib3.Retry(redirect=5))
    assert h.count("loop", kind="blob") == 6

    h.serve("away", Mode.BLOB_REDIRECT_OTHER_HOST, img)
    resp = http.request("GET", f"{h.url}/v2/away/blobs/{layer}", retries=urllib3.Retry(3),
                        headers={"Authorization": "Bearer secret"})
    assert resp.status == 200 and resp.data == data
    (there,) = h.requests_for(listener="other")
    assert there.repo == "away" and there.authorization is None  # urllib3 dropped it
    assert h.requests_for("away", listener="main")[0].authorization == "Bearer secret"

    h.serve("hang", Mode.BLOB_HANG, img, hang_after=1000, hang_seconds=10)
    resp = http.request("GET", f"{h.url}/v2/hang/blobs/{layer}", preload_content=False,
                        timeout=urllib3.Timeout(connect=5, read=0.5))
    got = resp.read(1000)
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        resp.read(1)
    resp.close()
    h.release_hangs()
    resp = http.request("GET", f"{h.url}/v2/hang/blobs/{layer}",
                        headers={"Range": f"bytes={len(got)}-"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert hashlib.sha256(got + resp.data).hexdigest() == layer.split(":")[1]

    h.serve("broken", Mode.ERROR, img)
    for _ in range(3):
        assert http.request("GET", f"{h.url}/v2/broken/manifests/latest").status == 500
    assert h.count("broken") == 3
    http.clear()


def test_hostile_auth(hostile_registry: HostileRegistry, http: urllib3.PoolManager) -> None:
    h = hostile_registry
    img = make_image()
    h.serve("basic", image=img, auth="basic", username="u", password="p")
    url = f"{h.url}/v2/basic/manifests/latest"
    resp = http.request("GET", url)
    assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic ")
    good = "Basic " + base64.b64encode(b"u:p").decode()
    assert http.request("GET", url, headers={"Authorization": good}).data == img.manifest

    h.serve("bearer", auth="bearer", username="u", password="p")
    url = f"{h.url}/v2/bearer/manifests/latest"
    resp = http.request("GET", url)
    challenge = resp.headers["WWW-Authenticate"]
    assert resp.status == 401 and challenge.startswith("Bearer ")
    assert f'realm="{h.url}/token"' in challenge and 'scope="repository:bearer:pull"' in challenge
    token_url = f"{h.url}/token?service=hostile-registry&scope=repository:bearer:pull"
    assert http.request("GET", token_url).status == 401  # creds required
    token = http.request("GET", token_url, headers={"Authorization": good}).json()["token"]
    resp = http.request("GET", url, headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    assert h.count(kind="token") == 2
