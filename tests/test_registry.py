"""The registry client against real registries (docker-registry 2.8 from registry_servers.py):
push/unpack round trips, skopeo and dockerd as the other end, multi-platform indexes, layer
dedup read off the registry's access log, token scopes, login/logout, TLS rules, re-pull and
`convert -o docker://`.

Every command runs as `python3 -m ocilayers --root TMP/...` with DOCKER_CONFIG, XDG_RUNTIME_DIR
and REGISTRY_AUTH_FILE pointed into the test's tmp dir (conftest already isolates $HOME)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, Layout, assert_one_line_error
from registry_servers import (
    OCI_CONFIG,
    OCI_MANIFEST,
    AccessLogEntry,
    RegistryServer,
    Scope,
    TokenRegistry,
    image_from_layout,
    run_skopeo,
    unique_repo,
)

DEMO = FIXTURES / "demo"
DEMO_IMG = image_from_layout(DEMO)
DEMO_ID = DEMO_IMG.config_digest
DEMO_DIFF_IDS = json.loads(DEMO_IMG.config)["rootfs"]["diff_ids"]
DEMO_LAYERS = DEMO_IMG.layer_digests
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


# --- running the CLI, isolated ---

def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of every ocilayers run: no credentials but the ones a test writes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR")}
    env["DOCKER_CONFIG"] = str(tmp / "docker-config")
    env["XDG_RUNTIME_DIR"] = str(tmp / "xdg-run")
    env.update(extra)
    return env


def ocl(tmp: Path, *argv: str, reg: RegistryServer | None = None, creds: bool | str = True,
        cert: bool = True, root: str = "store", stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ocilayers --root TMP/ROOT -q [--cert-dir] [--creds] ARGV` as a subprocess."""
    opts = ["--root", str(tmp / root), "-q"]
    if reg is not None and cert and reg.cert_dir is not None:
        opts += ["--cert-dir", str(reg.cert_dir)]
    if isinstance(creds, str):
        opts += ["--creds", creds]
    elif creds and reg is not None and reg.username:
        opts += ["--creds", reg.creds]
    return subprocess.run([sys.executable, "-m", "ocilayers", *opts, *argv], input=stdin,
                          capture_output=True, text=True, env=env or cli_env(tmp), timeout=120)


def ok(tmp: Path, *argv: str, **kw: Any) -> str:
    proc = ocl(tmp, *argv, **kw)
    assert proc.returncode == 0, f"ocilayers {' '.join(argv)}:\n{proc.stderr}"
    return proc.stdout


def ok_json(tmp: Path, *argv: str, **kw: Any) -> Any:
    return json.loads(ok(tmp, *argv, "--json", **kw))


def ref(reg: RegistryServer, repo: str, tag: str = "1") -> str:
    return f"docker://{reg.host}/{repo}:{tag}"


def store_demo(tmp: Path, root: str = "store") -> None:
    """fixtures/demo unpacked into a store, tagged demo:1."""
    ok(tmp, "unpack", str(DEMO), "--tag", "demo:1", root=root)


def store_diff_ids(tmp: Path, image: str, root: str = "store") -> list[str]:
    info = ok_json(tmp, "inspect", image, root=root)
    return [layer["diff_id"] for layer in info["layers"]]


def seed(tmp: Path, reg: RegistryServer, repo: str, tag: str = "1") -> None:
    """fixtures/demo copied as it is to the registry (by ocilayers)."""
    ok(tmp, "push", str(DEMO), ref(reg, repo, tag), reg=reg)


def entries(reg: RegistryServer, repo: str, since: int) -> list[AccessLogEntry]:
    return [e for e in reg.access_log(since) if e.route.startswith(f"/v2/{repo}/")]


def uploaded_digests(reg: RegistryServer, repo: str, since: int) -> list[str]:
    """The digests of the blobs whose upload was completed (PUT .../uploads/...?digest=)."""
    out = []
    for e in entries(reg, repo, since):
        if e.method == "PUT" and "/blobs/uploads/" in e.route:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(e.path).query)
            out += query.get("digest", [])
    return out


def wait_tag_put(reg: RegistryServer, repo: str, tag: str, since: int) -> None:
    """The tag is the last thing a push sends; wait until its log line has landed."""
    assert reg.wait_for_requests(1, "PUT", rf"^/v2/{repo}/manifests/{tag}$", since=since) >= 1


@pytest.fixture(params=["tls_registry", "token_registry"])
def auth_registry(request: pytest.FixtureRequest) -> RegistryServer:
    reg: RegistryServer = request.getfixturevalue(request.param)
    return reg


# === 1. round trip ===

def test_push_store_image_and_unpack_it_back(auth_registry: RegistryServer,
                                             tmp_path: Path) -> None:
    reg = auth_registry
    repo = unique_repo("round")
    store_demo(tmp_path)
    mark = reg.log_offset()
    pushed = ok_json(tmp_path, "push", "demo:1", ref(reg, repo), reg=reg)
    assert pushed["image_id"] == DEMO_ID
    assert pushed["media_type"] == OCI_MANIFEST
    assert pushed["uploaded"] == 5 and pushed["mounted"] == 0
    wait_tag_put(reg, repo, "1", mark)
    # layers go up in PATCHes as they are compressed, the config in one PUT; the manifest
    # after every blob, the tag last
    log = entries(reg, repo, mark)
    assert len([e for e in log if e.method == "PATCH" and e.status == 202]) == 4
    puts = [e.route for e in log if e.method == "PUT"]
    assert len(puts) == 7 and all("/blobs/uploads/" in p for p in puts[:5])
    assert puts[5:] == [f"/v2/{repo}/manifests/{pushed['manifest_digest']}",
                        f"/v2/{repo}/manifests/1"]

    got = ok_json(tmp_path, "unpack", ref(reg, repo), reg=reg, root="fresh")
    assert got["image_id"] == DEMO_ID
    assert [la["diff_id"] for la in got["layers"]] == DEMO_DIFF_IDS
    assert store_diff_ids(tmp_path, f"{reg.host}/{repo}:1", root="fresh") == DEMO_DIFF_IDS
    ok(tmp_path, "verify", root="fresh")
    # what was pulled is recorded: the tag and REPO@<manifest digest>
    repos = json.loads((tmp_path / "fresh/image/overlay2/repositories.json").read_text())
    names = repos["Repositories"][f"{reg.host}/{repo}"]
    assert names == {f"{reg.host}/{repo}:1": DEMO_ID,
                     f"{reg.host}/{repo}@{pushed['manifest_digest']}": DEMO_ID}


# === 2. skopeo interop ===

def test_skopeo_pulls_what_ocilayers_pushed(tls_registry: RegistryServer,
                                            tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("to-skopeo")
    store_demo(tmp_path)
    pushed = ok_json(tmp_path, "push", "demo:1", ref(reg, repo), reg=reg)
    out = tmp_path / "out"
    run_skopeo(tmp_path / "sk", "copy", "--src-cert-dir", str(reg.cert_dir), "--src-creds",
               reg.creds, ref(reg, repo), f"oci:{out}:latest")
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed["manifest_digest"]
    got = image_from_layout(out)
    assert got.config_digest == DEMO_ID
    assert json.loads(got.config)["rootfs"]["diff_ids"] == DEMO_DIFF_IDS


def test_ocilayers_pulls_what_skopeo_pushed(tls_registry: RegistryServer,
                                            tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("from-skopeo")
    run_skopeo(tmp_path / "sk", "copy", "--dest-cert-dir", str(reg.cert_dir), "--dest-creds",
               reg.creds, f"oci:{DEMO}:latest", ref(reg, repo))
    direct = ok_json(tmp_path, "unpack", str(DEMO), root="direct")
    pulled = ok_json(tmp_path, "unpack", ref(reg, repo), reg=reg)
    assert pulled["image_id"] == direct["image_id"] == DEMO_ID
    assert [la["chain_id"] for la in pulled["layers"]] == \
        [la["chain_id"] for la in direct["layers"]]
    ok(tmp_path, "verify")


# === 3. dockerd pulls what ocilayers pushed ===

def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dockerd_pulls_and_runs_what_ocilayers_pushed(plain_registry: RegistryServer,
                                                      tmp_path: Path) -> None:
    from throwaway_dockerd import Daemon, DaemonError, mounts_under, unavailable, unmount_all

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    reg = plain_registry
    repo = unique_repo("dockerd")
    store_demo(tmp_path)
    pushed = ok_json(tmp_path, "push", "demo:1", ref(reg, repo), reg=reg)
    base = Path(tempfile.mkdtemp(prefix="ocr-", dir="/tmp"))  # a short unix socket path
    daemon = Daemon(base)
    try:
        try:
            daemon.start()
        except DaemonError as exc:
            pytest.skip(f"cannot start a throwaway dockerd here: {exc}")
        name = f"{reg.host}/{repo}:1"
        daemon.docker("pull", name)
        info = json.loads(daemon.docker("inspect", name).stdout)[0]
        assert info["Id"] == DEMO_ID
        assert info["RootFS"]["Layers"] == DEMO_DIFF_IDS
        assert info["RepoDigests"] == [f"{reg.host}/{repo}@{pushed['manifest_digest']}"]
        run = daemon.docker("run", "--rm", "--network", "none", name, "cat", "/etc/motd")
        assert run.stdout == "welcome to the demo image\n"

        # dockerd's pull records against ours, for the same image from the same registry
        ok(tmp_path, "unpack", ref(reg, repo), reg=reg, root="pulled")
        theirs = _tree(daemon.data_root / "image/overlay2/distribution")
        ours = _tree(tmp_path / "pulled/image/overlay2/distribution")
        assert len([p for p in theirs if p.startswith("diffid-by-digest/")]) == 4, theirs
        assert len([p for p in theirs if p.startswith("v2metadata-by-diffid/")]) == 4, theirs
        assert sorted(ours) == sorted(theirs)
        for path, data in theirs.items():
            if path.startswith("diffid-by-digest/"):
                assert ours[path] == data, path
            else:
                assert json.loads(ours[path]) == json.loads(data), path
                assert ours[path] == data, (path, ours[path], data)  # byte for byte too
        theirs_repos = json.loads((daemon.data_root / "image/overlay2/repositories.json")
                                  .read_text())["Repositories"]
        ours_repos = json.loads((tmp_path / "pulled/image/overlay2/repositories.json")
                                .read_text())["Repositories"]
        assert ours_repos == theirs_repos
    finally:
        problems = daemon.stop()
        problems += [f"still mounted: {p}" for p in unmount_all(base)]
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)
        assert not problems, problems


# === 4. multi-platform ===

def two_platform_layout(dest: Path) -> tuple[dict[str, Any], str]:
    """fixtures/demo plus an arm64 twin (same layers, another config) under one OCI index,
    which index.json names `latest`. Returns (the index descriptor, the arm64 config digest)."""
    lay = Layout.copy_of("demo", dest)
    amd = lay.manifest_descriptor()
    manifest = lay.manifest()
    config = json.loads(DEMO_IMG.config)
    config["architecture"] = "arm64"
    arm_config = lay.put_json_blob(config, OCI_CONFIG)
    arm = lay.put_json_blob({**manifest, "config": arm_config}, OCI_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": amd["digest"], "size": amd["size"],
         "platform": {"architecture": "amd64", "os": "linux"}},
        {**arm, "platform": {"architecture": "arm64", "os": "linux"}}]}
    idx = lay.put_json_blob(index, OCI_INDEX)
    lay.write_index({"schemaVersion": 2, "manifests": [
        {**idx, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]})
    return idx, arm_config["digest"]


def test_push_multi_platform_index(tls_registry: RegistryServer, tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("multi")
    idx, arm_id = two_platform_layout(tmp_path / "layout")
    pushed = ok_json(tmp_path, "push", str(tmp_path / "layout"), ref(reg, repo, "multi"),
                     reg=reg)
    assert pushed["manifest_digest"] == idx["digest"]
    assert pushed["image_id"] is None and pushed["media_type"] == OCI_INDEX
    assert pushed["uploaded"] == 6  # 4 shared layers once, 2 configs

    arm = ok_json(tmp_path, "inspect", ref(reg, repo, "multi"), "--platform", "linux/arm64",
                  reg=reg)
    amd = ok_json(tmp_path, "inspect", ref(reg, repo, "multi"), "--platform", "linux/amd64",
                  reg=reg)
    assert (arm["image_id"], arm["platform"]) == (arm_id, "linux/arm64")
    assert (amd["image_id"], amd["platform"]) == (DEMO_ID, "linux/amd64")
    assert amd["manifest_digest"] == DEMO_IMG.manifest_digest
    assert [la["diff_id"] for la in arm["layers"]] == DEMO_DIFF_IDS

    raw = run_skopeo(tmp_path / "sk", "inspect", "--raw", "--cert-dir", str(reg.cert_dir),
                     "--creds", reg.creds, ref(reg, repo, "multi")).stdout
    blob = (tmp_path / "layout/blobs" / idx["digest"].replace(":", "/")).read_text()
    assert raw == blob  # the index's own bytes
    assert [m["platform"]["architecture"] for m in json.loads(raw)["manifests"]] == \
        ["amd64", "arm64"]
    got = ok_json(tmp_path, "unpack", ref(reg, repo, "multi"), "--platform", "linux/arm64",
                  reg=reg)
    assert got["image_id"] == arm_id

    # registry to registry: the index and both manifests, every blob mounted from the source
    copy = unique_repo("multi-copy")
    out = ok_json(tmp_path, "push", ref(reg, repo, "multi"), ref(reg, copy, "multi"), reg=reg)
    assert (out["manifest_digest"], out["media_type"]) == (idx["digest"], OCI_INDEX)
    assert (out["mounted"], out["uploaded"]) == (6, 0), out
    again = ok_json(tmp_path, "inspect", ref(reg, copy, "multi"), "--platform", "linux/arm64",
                    reg=reg)
    assert again["image_id"] == arm_id


# === 5. dedup, read off the access log ===

def pushed_layers(tmp: Path, reg: RegistryServer, repo: str) -> list[str]:
    """The layer digests of what the registry holds at REPO:1 (a store image's push makes its
    own blobs)."""
    return [la["digest"] for la in ok_json(tmp, "inspect", ref(reg, repo), reg=reg)["layers"]]


def test_push_to_second_repo_mounts_every_layer(tls_registry: RegistryServer,
                                                tmp_path: Path) -> None:
    reg = tls_registry
    first, second = unique_repo("dedup-a"), unique_repo("dedup-b")
    store_demo(tmp_path)
    ok(tmp_path, "push", "demo:1", ref(reg, first), reg=reg)
    layers = pushed_layers(tmp_path, reg, first)
    mark = reg.log_offset()
    out = ok_json(tmp_path, "push", "demo:1", ref(reg, second), reg=reg)
    wait_tag_put(reg, second, "1", mark)
    assert (out["mounted"], out["uploaded"]) == (4, 1), out  # the config is no layer
    log = entries(reg, second, mark)
    mounts = [e for e in log if e.method == "POST" and "mount=" in e.path]
    assert sorted(urllib.parse.parse_qs(urllib.parse.urlsplit(e.path).query)["mount"][0]
                  for e in mounts) == sorted(layers)
    assert all(e.status == 201 and f"from={first}" in e.path for e in mounts)
    assert not [e for e in log if e.method == "PATCH"]
    assert not set(uploaded_digests(reg, second, mark)) & set(layers)
    assert pushed_layers(tmp_path, reg, second) == layers


def test_repush_to_same_repo_makes_only_heads_and_manifest_puts(tls_registry: RegistryServer,
                                                                 tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("repush")
    store_demo(tmp_path)
    first = ok_json(tmp_path, "push", "demo:1", ref(reg, repo), reg=reg)
    mark = reg.log_offset()
    out = ok_json(tmp_path, "push", "demo:1", ref(reg, repo), reg=reg)
    wait_tag_put(reg, repo, "1", mark)
    assert out["manifest_digest"] == first["manifest_digest"]
    assert (out["uploaded"], out["mounted"], out["present"]) == (0, 0, 5), out
    log = entries(reg, repo, mark)
    assert {e.status for e in log if e.method == "HEAD"} == {200}
    assert [e.route for e in log if e.method == "PUT"] == \
        [f"/v2/{repo}/manifests/{out['manifest_digest']}", f"/v2/{repo}/manifests/1"]
    # Nothing but HEADs and the manifest PUTs: a blob the repository has is not read again
    # (its media type is in the store's records), nor after a mount.
    assert [(e.method, e.route) for e in log if e.method not in ("HEAD", "PUT")] == []


def test_pulled_image_pushed_back_uploads_no_layer(tls_registry: RegistryServer,
                                                   tmp_path: Path) -> None:
    reg = tls_registry
    src, dst, copy = unique_repo("pulled"), unique_repo("pushed-back"), unique_repo("copy")
    seed(tmp_path, reg, src)
    ok(tmp_path, "unpack", ref(reg, src), reg=reg)  # the store holds no compressed blob
    mark = reg.log_offset()
    out = ok_json(tmp_path, "push", f"{reg.host}/{src}:1", ref(reg, dst), reg=reg)
    wait_tag_put(reg, dst, "1", mark)
    assert out["image_id"] == DEMO_ID and out["mounted"] == 4, out
    assert not [e for e in entries(reg, dst, mark) if e.method == "PATCH"]
    assert not set(uploaded_digests(reg, dst, mark)) & set(DEMO_LAYERS)
    # the layers keep their blob digests: the manifest names the source's blobs
    raw = run_skopeo(tmp_path / "sk", "inspect", "--raw", "--cert-dir", str(reg.cert_dir),
                     "--creds", reg.creds, ref(reg, dst)).stdout
    theirs = json.loads(DEMO_IMG.manifest)
    assert {k: json.loads(raw)[k] for k in ("config", "layers")} == \
        {k: theirs[k] for k in ("config", "layers")}

    # a docker:// source on the same registry: mounted from it, config too
    mark = reg.log_offset()
    out = ok_json(tmp_path, "push", ref(reg, src), ref(reg, copy), reg=reg)
    wait_tag_put(reg, copy, "1", mark)
    assert (out["mounted"], out["uploaded"]) == (5, 0), out
    assert uploaded_digests(reg, copy, mark) == []


# === 6. token auth: scopes for a mount, and a mount refused ===

def test_token_scopes_for_cross_repo_mount(token_registry: TokenRegistry,
                                           tmp_path: Path) -> None:
    reg, issuer = token_registry, token_registry.token_issuer
    src, dst = unique_repo("tok-src"), unique_repo("tok-dst")
    store_demo(tmp_path)
    ok(tmp_path, "push", "demo:1", ref(reg, src), reg=reg)
    issuer.reset()
    mark = reg.log_offset()
    out = ok_json(tmp_path, "push", "demo:1", ref(reg, dst), reg=reg)
    wait_tag_put(reg, dst, "1", mark)
    assert out["mounted"] == 4, out
    want = {Scope("repository", dst, ("pull", "push")), Scope("repository", src, ("pull",))}
    asked = [r for r in issuer.requests if want <= set(r.scopes)]
    assert asked, [r.scopes for r in issuer.requests]
    assert all(r.user == reg.username and r.status == 200 for r in asked)
    assert {"type": "repository", "name": src, "actions": ["pull"]} in asked[0].granted


def test_token_mount_refused_falls_back_to_upload(token_registry: TokenRegistry,
                                                  tmp_path: Path) -> None:
    reg = token_registry
    dst = unique_repo("tok-private")
    store_demo(tmp_path)
    # the admin pushes to private-source: the store records the layers there
    ok(tmp_path, "push", "demo:1", ref(reg, reg.private_source, "seed"), reg=reg,
       creds=reg.admin_creds)
    mark = reg.log_offset()
    out = ok_json(tmp_path, "push", "demo:1", ref(reg, dst), reg=reg)  # as user
    wait_tag_put(reg, dst, "1", mark)
    assert (out["mounted"], out["uploaded"]) == (0, 5), out
    refused = [e for e in entries(reg, dst, mark) if e.method == "POST" and "mount=" in e.path]
    assert len(refused) == 4 and {e.status for e in refused} == {401}
    got = ok_json(tmp_path, "inspect", ref(reg, dst), reg=reg)
    assert got["image_id"] == DEMO_ID
    assert sorted(uploaded_digests(reg, dst, mark)) == \
        sorted([*(la["digest"] for la in got["layers"]), DEMO_ID])
    assert ok_json(tmp_path, "unpack", ref(reg, dst), reg=reg, root="back")["image_id"] == DEMO_ID


# === 7. login / logout ===

def test_login_push_logout(tls_registry: RegistryServer, tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("login")
    config = tmp_path / "docker-config/config.json"
    ok(tmp_path, "login", reg.host, "-u", reg.username or "", "--password-stdin", reg=reg,
       creds=False, stdin=f"{reg.password}\n")
    assert config.stat().st_mode & 0o777 == 0o600
    auths = json.loads(config.read_text())["auths"]
    assert auths == {reg.host: {"auth": base64.b64encode(reg.creds.encode()).decode()}}
    ok(tmp_path, "push", str(DEMO), ref(reg, repo), reg=reg, creds=False)

    before = config.read_bytes()
    proc = ocl(tmp_path, "login", reg.host, "-u", reg.username or "", "--password-stdin",
               reg=reg, creds=False, stdin="wrong\n")
    assert_one_line_error(proc.returncode, proc.stderr, reg.host)
    assert config.read_bytes() == before  # the good login is kept

    ok(tmp_path, "logout", reg.host, creds=False)
    assert reg.host not in json.loads(config.read_text()).get("auths", {})
    proc = ocl(tmp_path, "inspect", ref(reg, repo), reg=reg, creds=False)
    assert_one_line_error(proc.returncode, proc.stderr, reg.host, "login")
    proc = ocl(tmp_path, "logout", reg.host, creds=False)
    assert_one_line_error(proc.returncode, proc.stderr, "not logged in")


def test_login_checks_a_token_registry(token_registry: TokenRegistry, tmp_path: Path) -> None:
    reg, issuer = token_registry, token_registry.token_issuer
    issuer.reset()
    proc = ocl(tmp_path, "login", reg.host, "-u", reg.username or "", "--password-stdin",
               reg=reg, creds=False, stdin="wrong\n")
    assert_one_line_error(proc.returncode, proc.stderr, reg.host, "401")
    assert not (tmp_path / "docker-config/config.json").exists()
    ok(tmp_path, "login", reg.host, "-u", reg.username or "", "--password-stdin", reg=reg,
       creds=False, stdin=f"{reg.password}\n")
    assert [(r.user, r.status) for r in issuer.requests] == [(None, 401), (reg.username, 200)]
    out = ok_json(tmp_path, "push", str(DEMO), ref(reg, unique_repo("tok-login")), reg=reg,
                  creds=False)
    assert out["image_id"] == DEMO_ID


def test_credentials_from_registry_auth_file(tls_registry: RegistryServer,
                                             tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("authfile")
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {reg.host: {
        "auth": base64.b64encode(reg.creds.encode()).decode()}}}))
    env = cli_env(tmp_path, REGISTRY_AUTH_FILE=str(auth))
    ok(tmp_path, "push", str(DEMO), ref(reg, repo), reg=reg, creds=False, env=env)
    info = ok_json(tmp_path, "inspect", ref(reg, repo), reg=reg, creds=False, env=env)
    assert info["image_id"] == DEMO_ID
    # the file really is what was used: a wrong password in it is refused
    auth.write_text(json.dumps({"auths": {reg.host: {
        "auth": base64.b64encode(b"user:wrong").decode()}}}))
    proc = ocl(tmp_path, "inspect", ref(reg, repo), reg=reg, creds=False, env=env)
    assert_one_line_error(proc.returncode, proc.stderr, reg.host, "401")


def test_push_docker_format(tls_registry: RegistryServer, tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("docker-format")
    store_demo(tmp_path)
    out = ok_json(tmp_path, "push", "demo:1", ref(reg, repo), "--format", "docker", reg=reg)
    assert out["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
    info = ok_json(tmp_path, "inspect", ref(reg, repo), reg=reg)
    assert {la["media_type"] for la in info["layers"]} == \
        {"application/vnd.docker.image.rootfs.diff.tar.gzip"}
    assert info["image_id"] == DEMO_ID
    proc = ocl(tmp_path, "push", "demo:1", ref(reg, repo, "z"), "--format", "docker",
               "--compression", "zstd", reg=reg)
    # The hint names push's own option (--format), not append's (--manifest).
    assert_one_line_error(proc.returncode, proc.stderr, "zstd", "--format oci")


# === 8. TLS rules ===

def test_tls_verification(tls_registry: RegistryServer, plain_registry: RegistryServer,
                          tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("tls")
    seed(tmp_path, reg, repo)
    # loopback is verified too (unlike dockerd), and never retried in plain HTTP
    proc = ocl(tmp_path, "inspect", ref(reg, repo), reg=reg, cert=False)
    assert_one_line_error(proc.returncode, proc.stderr, reg.host, "certificate verify failed")
    info = ok_json(tmp_path, "--tls-verify=false", "inspect", ref(reg, repo), reg=reg,
                   cert=False)
    assert info["image_id"] == DEMO_ID

    plain = plain_registry
    prepo = unique_repo("plain")
    out = ok_json(tmp_path, "push", str(DEMO), ref(plain, prepo), reg=plain)
    assert out["manifest_digest"] == DEMO_IMG.manifest_digest
    got = ok_json(tmp_path, "unpack", ref(plain, prepo), reg=plain, root="plain")
    assert got["image_id"] == DEMO_ID


def test_registry_errors_are_one_line(tls_registry: RegistryServer, tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("missing")
    proc = ocl(tmp_path, "unpack", ref(reg, repo), reg=reg)
    line = assert_one_line_error(proc.returncode, proc.stderr, reg.host, repo, "HTTP 404")
    assert "UNKNOWN" in line, line  # the registry's own code (NAME_ or MANIFEST_UNKNOWN)
    repos = tmp_path / "store/image/overlay2/repositories.json"
    assert not repos.exists() or repo not in repos.read_text()


# === 9. re-pull of an image the store has ===

def test_repull_fetches_only_the_manifest(tls_registry: RegistryServer, tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("repull")
    seed(tmp_path, reg, repo)
    first = ok_json(tmp_path, "unpack", ref(reg, repo), reg=reg)
    mark = reg.log_offset()
    again = ok_json(tmp_path, "unpack", ref(reg, repo), reg=reg)
    assert again["image_id"] == first["image_id"] == DEMO_ID
    assert all(la["reused"] for la in again["layers"])
    assert reg.wait_for_requests(1, "GET", rf"^/v2/{repo}/manifests/", since=mark) == 1
    assert [(e.method, e.route) for e in entries(reg, repo, mark)] == \
        [("GET", f"/v2/{repo}/manifests/1")]


# === 10. convert -o docker:// ===

def test_convert_to_registry_with_zstd(tls_registry: RegistryServer, tmp_path: Path) -> None:
    reg = tls_registry
    repo = unique_repo("zstd")
    ok(tmp_path, "convert", str(DEMO), "-o", ref(reg, repo, "zstd"), "--compression", "zstd",
       reg=reg)
    info = ok_json(tmp_path, "inspect", ref(reg, repo, "zstd"), reg=reg)
    assert {la["media_type"] for la in info["layers"]} == \
        {"application/vnd.oci.image.layer.v1.tar+zstd"}
    assert [la["diff_id"] for la in info["layers"]] == DEMO_DIFF_IDS
    assert not set(la["digest"] for la in info["layers"]) & set(DEMO_LAYERS)
    got = ok_json(tmp_path, "unpack", ref(reg, repo, "zstd"), reg=reg)
    assert got["image_id"] == DEMO_ID
    assert [la["diff_id"] for la in got["layers"]] == DEMO_DIFF_IDS
    ok(tmp_path, "verify")
