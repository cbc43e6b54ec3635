"""Registries on loopback for the registry-client tests: three real ones (Debian's
docker-registry, distribution 2.8) and a hostile fake.

A test module gets the fixtures by having them in its namespace (pytest finds fixtures there):

    from registry_servers import tls_registry, token_registry, hostile_registry  # noqa: F401

works for pytest, but ruff then reports F811 at every test that takes one as a parameter; bind
them by assignment instead (what test_registry_servers.py does), or import them once in
conftest.py so that every module has them:

    import registry_servers
    tls_registry = registry_servers.tls_registry

- `tls_registry` (session): docker-registry over TLS (a throwaway CA made with openssl) with
  htpasswd auth, filesystem storage, deletes enabled, access log in `log_path`.
- `plain_registry` (session): docker-registry over plain HTTP, no auth.
- `token_registry` (session): docker-registry with `auth: token` over TLS, plus the token issuer
  (`.issuer`, a TokenIssuer: policy, users, every token request recorded).
- `hostile_registry` (function, reset before each test): a fake registry in this process whose
  behaviour a test sets per repository (`HostileRegistry.serve(repo, mode, ...)`).

Each server starts once per run, however many modules import the fixture (a module-level cache;
pytest would otherwise make one per importing module), and is stopped by its pid at the end of
the session. Every file is under a tmp_path_factory dir; nothing is written to /etc, $HOME or a
docker config. docker-registry gets an environment without REGISTRY_* variables (it reads them
as config overrides: with a REGISTRY_AUTH_FILE meant for skopeo it does not start at all,
"cannot unmarshal !!str into configuration.Parameters").
Missing docker-registry, openssl or htpasswd skips the tests that need them.

The registries are shared by the whole session: use a fresh repository name per test
(`unique_repo`).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
USERNAME = "user"
PASSWORD = "pass"
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "admin-pass"
TOKEN_SERVICE = "ocilayers-test-registry"
TOKEN_ISSUER = "ocilayers-test-issuer"
PRIVATE_SOURCE = "private-source"
PRIVATE_TARGET = "private-target"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def unique_repo(prefix: str = "test") -> str:
    """A repository name no other test uses (the real registries live for the whole session)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- one server per session, whichever modules import the fixture ---

_SHARED: dict[str, Any] = {}
_SHARED_LOCK = threading.RLock()
_LIVE_PROCS: list[subprocess.Popen[bytes]] = []


def _stop_proc(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process by its pid, SIGKILL after STOP_TIMEOUT, reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    with contextlib.suppress(ValueError):
        _LIVE_PROCS.remove(proc)


@atexit.register
def _stop_leftovers() -> None:
    """Last resort if the session teardown did not run (e.g. pytest interrupted hard)."""
    for proc in list(_LIVE_PROCS):
        with contextlib.suppress(Exception):
            _stop_proc(proc)


def _shared(request: pytest.FixtureRequest, key: str,
            start: Callable[[], tuple[Any, Callable[[], None]]]) -> Any:
    """The object `start()` made for `key` in this session; started on first use, its stop
    function registered on the session node (so it runs once, at the end of the session)."""
    with _SHARED_LOCK:
        if key in _SHARED:
            value = _SHARED[key]
            if isinstance(value, BaseException):
                raise RuntimeError(f"{key} failed to start earlier in this session: {value}")
            return value
        try:
            obj, stop = start()
        except pytest.skip.Exception:
            raise
        except Exception as exc:
            _SHARED[key] = exc
            raise

        def finish() -> None:
            with _SHARED_LOCK:
                _SHARED.pop(key, None)
            stop()

        _SHARED[key] = obj
        request.session.addfinalizer(finish)
        return obj


_PACKAGES = {"docker-registry": "docker-registry", "htpasswd": "apache2-utils",
             "openssl": "openssl", "skopeo": "skopeo"}


def _require_tools(*names: str) -> dict[str, str]:
    """The paths of the tools `names`; skips the calling test if one is not on PATH."""
    found = {}
    for name in names:
        path = shutil.which(name)
        if path is None:
            pytest.skip(f"{name} is not installed (Debian package {_PACKAGES.get(name, name)})")
        found[name] = path
    return found


def _tool_env(base: Path) -> dict[str, str]:
    """An environment for the tools run here: $HOME and XDG dirs under `base`, no REGISTRY_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    for name, sub in (("HOME", "home"), ("XDG_RUNTIME_DIR", "xdg-run"),
                      ("XDG_CONFIG_HOME", "xdg-config"), ("XDG_DATA_HOME", "xdg-data")):
        path = base / sub
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        env[name] = str(path)
    return env


def _run(argv: Sequence[str], env: Mapping[str, str], *, input: bytes | None = None,
         cwd: Path | None = None) -> bytes:
    proc = subprocess.run(list(argv), input=input, capture_output=True, env=dict(env), cwd=cwd,
                          timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           + proc.stderr.decode(errors="replace"))
    return proc.stdout


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def skopeo_env(base: Path) -> dict[str, str]:
    """An environment in which skopeo touches nothing outside `base`: $HOME, XDG dirs and the
    auth file (REGISTRY_AUTH_FILE, empty) under it. `_CONTAINERS_ROOTLESS_UID` makes it keep
    its blob-info cache under $XDG_DATA_HOME instead of root's /var/lib/containers/cache (a
    shared cache would also make it try cross-repo mounts from repos of other tests)."""
    env = _tool_env(base)
    auth = base / "auth.json"
    if not auth.exists():
        auth.write_text('{"auths":{}}')
    env["REGISTRY_AUTH_FILE"] = str(auth)
    env["_CONTAINERS_ROOTLESS_UID"] = "65534"
    return env


def run_skopeo(base: Path, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`skopeo --insecure-policy ARGS` in skopeo_env(base); with `check`, a failure raises
    AssertionError carrying skopeo's stderr."""
    exe = _require_tools("skopeo")["skopeo"]
    proc = subprocess.run([exe, "--insecure-policy", *args], capture_output=True, text=True,
                          env=skopeo_env(base), timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed ({proc.returncode}):\n"
                             + proc.stderr)
    return proc


# --- TLS material, made with the openssl CLI ---

@dataclass(frozen=True)
class LoopbackPKI:
    """A throwaway CA, a server cert for 127.0.0.1/localhost signed by it, and an RSA key with a
    self-signed cert for signing tokens. Every file is under `dir`."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    signing_cert: Path
    signing_key: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the CA."""
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        return ctx


def make_pki(base: Path) -> LoopbackPKI:
    exe = _require_tools("openssl")["openssl"]
    base.mkdir(parents=True, exist_ok=True)
    env = _tool_env(base / "env")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_cert, ca_key = base / "ca.crt", base / "ca.key"
    _run([exe, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "3",
          "-subj", "/CN=ocilayers test CA",
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"], env)
    server_cert, server_key = base / "server.crt", base / "server.key"
    csr, ext = base / "server.csr", base / "server.ext"
    _run([exe, "req", "-new", *ec, "-keyout", str(server_key), "-out", str(csr),
          "-subj", "/CN=127.0.0.1"], env)
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "subjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    _run([exe, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
          "-set_serial", "0x" + secrets.token_hex(8), "-days", "3", "-extfile", str(ext),
          "-out", str(server_cert)], env)
    signing_cert, signing_key = base / "token-signing.crt", base / "token-signing.key"
    _run([exe, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(signing_key),
          "-out", str(signing_cert), "-days", "3", "-subj", "/CN=ocilayers test token signer",
          "-addext", "keyUsage=critical,digitalSignature"], env)
    for key in (ca_key, server_key, signing_key):
        key.chmod(0o600)
    return LoopbackPKI(base, ca_cert, ca_key, server_cert, server_key, signing_cert, signing_key)


# --- docker-registry ---

@dataclass(frozen=True)
class AccessLogEntry:
    """One line of docker-registry's access log (Apache combined format, on its stdout)."""

    method: str
    path: str  # with the query string
    status: int
    size: int
    user_agent: str

    @property
    def route(self) -> str:
        """The path without the query string."""
        return self.path.split("?", 1)[0]


_ACCESS_RE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-) '
                        r'"[^"]*" "([^"]*)"')


@dataclass(frozen=True)
class RegistryServer:
    """A running docker-registry. `host` is "127.0.0.1:PORT"; `ca_cert`/`cert_dir` are None for
    plain HTTP. `cert_dir` holds ca.crt (skopeo's --cert-dir, or what
    /etc/docker/certs.d/HOST/ would hold); `certs_d` is a dir laid out like /etc/docker/certs.d
    (`certs_d/HOST/ca.crt`). `username`/`password` are None without auth. `log_path` gets the
    registry's stdout (access log) and stderr (logrus, level info)."""

    host: str
    scheme: str
    ca_cert: Path | None
    cert_dir: Path | None
    certs_d: Path | None
    username: str | None
    password: str | None
    log_path: Path
    root: Path
    config_path: Path
    pid: int

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def creds(self) -> str:
        """"user:pass", as skopeo's --creds wants it."""
        return f"{self.username}:{self.password}"

    def basic_auth(self, username: str | None = None, password: str | None = None) -> str:
        """An Authorization header value for Basic auth (these creds by default)."""
        raw = f"{username or self.username}:{password or self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting the test CA (the system's default one if plain HTTP)."""
        return ssl.create_default_context(cafile=str(self.ca_cert) if self.ca_cert else None)

    def log_offset(self) -> int:
        """The current size of the log: pass it as `since` to see only later requests."""
        return self.log_path.stat().st_size

    def access_log(self, since: int = 0) -> list[AccessLogEntry]:
        """The access-log entries written after byte offset `since`."""
        with self.log_path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            m = _ACCESS_RE.match(line)
            if m:
                size = 0 if m.group(4) == "-" else int(m.group(4))
                out.append(AccessLogEntry(m.group(1), m.group(2), int(m.group(3)), size,
                                          m.group(5)))
        return out

    def count_requests(self, method: str | None = None, path: str | None = None, *,
                       since: int = 0, status: int | None = None) -> int:
        """How many access-log entries match: `method` exactly, `path` a regex searched in the
        path without query (e.g. r"/blobs/uploads/"), `status` exactly."""
        pattern = re.compile(path) if path else None
        return sum(1 for e in self.access_log(since)
                   if (method is None or e.method == method)
                   and (pattern is None or pattern.search(e.route))
                   and (status is None or e.status == status))

    def wait_for_requests(self, count: int, method: str | None = None, path: str | None = None,
                          *, since: int = 0, timeout: float = 5.0) -> int:
        """Poll until at least `count` entries match (the registry writes an entry as it finishes
        the response, so a client may return a hair before it lands); returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.count_requests(method, path, since=since)
            if n >= count or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


def _probe(host: str, ctx: ssl.SSLContext | None) -> int | None:
    """The status of GET /v2/, or None if nothing answers yet."""
    hostname, port = host.rsplit(":", 1)
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection(hostname, int(port), timeout=2)
    else:
        conn = http.client.HTTPSConnection(hostname, int(port), timeout=2, context=ctx)
    try:
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def start_docker_registry(base: Path, *, pki: LoopbackPKI | None,
                          auth: dict[str, Any] | None) -> RegistryServer:
    """Start docker-registry with its config, storage and log under `base`; return once it
    answers GET /v2/ (any status). The caller stops it with stop_docker_registry."""
    exe = _require_tools("docker-registry")["docker-registry"]
    base.mkdir(parents=True, exist_ok=True)
    root = base / "storage"
    root.mkdir(exist_ok=True)
    env = _tool_env(base / "env")
    scheme = "https" if pki else "http"
    last_error = ""
    for attempt in range(5):
        port = free_port()
        host = f"127.0.0.1:{port}"
        http_conf: dict[str, Any] = {"addr": host, "secret": secrets.token_hex(16),
                                     "headers": {"X-Content-Type-Options": ["nosniff"]}}
        if pki:
            http_conf["tls"] = {"certificate": str(pki.server_cert), "key": str(pki.server_key)}
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(root)},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": http_conf,
        }
        if auth:
            config["auth"] = auth
        config_path = base / "config.yml"
        config_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        log_path = base / f"registry-{attempt}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([exe, "serve", str(config_path)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base)
        _LIVE_PROCS.append(proc)
        ctx = pki.ssl_context() if pki else None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _probe(host, ctx) is not None:
                cert_dir = certs_d = None
                if pki:
                    cert_dir = base / "cert-dir"
                    cert_dir.mkdir(exist_ok=True)
                    shutil.copy(pki.ca_cert, cert_dir / "ca.crt")
                    certs_d = base / "certs.d"
                    (certs_d / host).mkdir(parents=True, exist_ok=True)
                    shutil.copy(pki.ca_cert, certs_d / host / "ca.crt")
                return RegistryServer(host=host, scheme=scheme,
                                      ca_cert=pki.ca_cert if pki else None, cert_dir=cert_dir,
                                      certs_d=certs_d, username=None, password=None,
                                      log_path=log_path, root=root, config_path=config_path,
                                      pid=proc.pid)
            time.sleep(0.05)
        _stop_proc(proc)
        last_error = log_path.read_text(errors="replace")[-2000:]
        if "address already in use" not in last_error:
            break
    raise RuntimeError(f"docker-registry did not start; its log ends:\n{last_error}")


def stop_docker_registry(reg: RegistryServer) -> None:
    for proc in list(_LIVE_PROCS):
        if proc.pid == reg.pid:
            _stop_proc(proc)


def _htpasswd(base: Path, users: Mapping[str, str]) -> Path:
    exe = _require_tools("htpasswd")["htpasswd"]
    env = _tool_env(base / "env")
    lines = [_run([exe, "-Bbn", user, pw], env).decode().strip() for user, pw in users.items()]
    path = base / "htpasswd"
    path.write_text("".join(line + "\n" for line in lines if line))
    return path


def _with_creds(reg: RegistryServer, username: str, password: str) -> RegistryServer:
    return RegistryServer(**{**reg.__dict__, "username": username, "password": password})


def _pki(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoopbackPKI:
    result: LoopbackPKI = _shared(request, "pki",
                              lambda: (make_pki(tmp_path_factory.mktemp("registry-pki")),
                                       lambda: None))
    return result


@pytest.fixture(scope="session")
def tls_registry(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> RegistryServer:
    """docker-registry over TLS (test CA) with htpasswd auth (USERNAME/PASSWORD)."""
    _require_tools("docker-registry", "htpasswd", "openssl")
    pki = _pki(request, tmp_path_factory)

    def start() -> tuple[RegistryServer, Callable[[], None]]:
        base = tmp_path_factory.mktemp("tls-registry")
        htpasswd = _htpasswd(base, {USERNAME: PASSWORD})
        reg = start_docker_registry(base, pki=pki, auth={
            "htpasswd": {"realm": "ocilayers-test", "path": str(htpasswd)}})
        reg = _with_creds(reg, USERNAME, PASSWORD)
        return reg, lambda: stop_docker_registry(reg)

    result: RegistryServer = _shared(request, "tls_registry", start)
    return result


@pytest.fixture(scope="session")
def plain_registry(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> RegistryServer:
    """docker-registry over plain HTTP on 127.0.0.1, no auth."""
    _require_tools("docker-registry")

    def start() -> tuple[RegistryServer, Callable[[], None]]:
        reg = start_docker_registry(tmp_path_factory.mktemp("plain-registry"), pki=None,
                                    auth=None)
        return reg, lambda: stop_docker_registry(reg)

    result: RegistryServer = _shared(request, "plain_registry", start)
    return result


# --- token issuer (Docker token protocol) ---

def _first(query: Mapping[str, Sequence[str]], key: str) -> str | None:
    """The first value of a query parameter, or None."""
    values = query.get(key)
    return values[0] if values else None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        """"repository:NAME:pull,push" (NAME may hold a ':' only in a registry host part)."""
        type_, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        return cls(type_, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass
class TokenRequest:
    """One request to the token issuer, as a test sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None  # the raw header
    user: str | None  # who authenticated (None: anonymous or failed)
    service: str | None
    scopes: list[Scope]  # asked for
    granted: list[dict[str, Any]]  # the token's `access` claim
    status: int


Policy = Callable[[str | None, Scope], Sequence[str]]
"""(authenticated user or None, a requested scope) -> the actions granted on it."""


class TokenIssuer:
    """A Docker token server (https://docs.docker.com/registry/spec/auth/token/), in a thread of
    this process: GET /token?service=S&scope=repository:NAME:ACTIONS (scope repeatable, or
    space-separated), Basic auth optional; POST /token (OAuth2 form: grant_type=password with
    username/password, or refresh_token) also works. Bad credentials get 401. Tokens are
    RS256 JWTs signed with `openssl dgst -sha256 -sign` and carry the signing cert in `x5c`.

    Default policy (`default_policy`): anonymous gets pull on every repository except
    PRIVATE_SOURCE and PRIVATE_TARGET (nothing there); USERNAME gets pull,push everywhere except
    PRIVATE_SOURCE (nothing: so mounting a blob from it is 401 insufficient_scope);
    ADMIN_USERNAME gets pull,push,delete everywhere (use it to seed PRIVATE_SOURCE).
    Replace `policy`, `users` or `expires_in` in a test and call `reset()` after."""

    def __init__(self, pki: LoopbackPKI, env: Mapping[str, str], *, service: str = TOKEN_SERVICE,
                 issuer: str = TOKEN_ISSUER) -> None:
        self.pki = pki
        self.service = service
        self.issuer = issuer
        self._env = dict(env)
        self._openssl = _require_tools("openssl")["openssl"]
        self._x5c = base64.b64encode(
            ssl.PEM_cert_to_DER_cert(pki.signing_cert.read_text())).decode()
        self._lock = threading.Lock()
        self.requests: list[TokenRequest] = []
        self.private_source = PRIVATE_SOURCE
        self.private_target = PRIVATE_TARGET
        self.reset()
        issuer_self = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                issuer_self._handle(self, "GET")

            def do_POST(self) -> None:
                issuer_self._handle(self, "POST")

        self._server = _TLSThreadingServer(("127.0.0.1", 0), Handler, pki.server_context())
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="token-issuer", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def reset(self) -> None:
        """Forget recorded requests; back to the default users, policy and expiry."""
        with self._lock:
            self.requests.clear()
        self.users: dict[str, str] = {USERNAME: PASSWORD, ADMIN_USERNAME: ADMIN_PASSWORD}
        self.policy: Policy = self.default_policy
        self.expires_in = 300

    def default_policy(self, user: str | None, scope: Scope) -> Sequence[str]:
        if scope.type != "repository":
            return list(scope.actions) if user == ADMIN_USERNAME else []
        private = {self.private_source, self.private_target}
        if user == ADMIN_USERNAME:
            allowed = {"pull", "push", "delete", "*"}
        elif user is None:
            allowed = set() if scope.name in private else {"pull"}
        elif scope.name == self.private_source:
            allowed = set()
        else:
            allowed = {"pull", "push"}
        return [a for a in scope.actions if a in allowed]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT)

    def make_token(self, subject: str, access: list[dict[str, Any]],
                   expires_in: int | None = None) -> str:
        """A JWT the registry accepts (sign your own to test odd claims)."""
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service,
                  "exp": now + (self.expires_in if expires_in is None else expires_in),
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(12), "access": access}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = _run([self._openssl, "dgst", "-sha256", "-sign", str(self.pki.signing_key)],
                   self._env, input=signing_input.encode())
        return signing_input + "." + _b64url(sig)

    def _handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        if method == "POST":
            length = int(h.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(h.rfile.read(length).decode(), keep_blank_values=True)
            for k, v in form.items():
                query.setdefault(k, []).extend(v)
        authorization = h.headers.get("Authorization")
        record = TokenRequest(method, h.path, query, authorization, None,
                              _first(query, "service"), [], [], 0)
        with self._lock:
            self.requests.append(record)
        if url.path != "/token":
            record.status = 404
            _send(h, 404, b'{"error":"not found"}', {"Content-Type": "application/json"})
            return
        for value in query.get("scope", []):
            record.scopes.extend(Scope.parse(s) for s in value.split() if s)
        user, password = None, None
        if authorization and authorization.lower().startswith("basic "):
            with contextlib.suppress(ValueError):
                user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        elif method == "POST" and query.get("grant_type") == ["password"]:
            user = _first(query, "username")
            password = _first(query, "password")
        elif method == "POST" and query.get("grant_type") == ["refresh_token"]:
            user, password = _parse_refresh((query.get("refresh_token") or [""])[0], self.users)
        if user is not None and self.users.get(user) != password:
            record.status = 401
            _send(h, 401, json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                                  "message": "bad credentials"}]}).encode(),
                  {"Content-Type": "application/json",
                   "WWW-Authenticate": 'Basic realm="ocilayers-test-issuer"'})
            return
        record.user = user
        access = []
        for scope in record.scopes:
            actions = list(self.policy(user, scope))
            if actions:
                access.append({"type": scope.type, "name": scope.name, "actions": actions})
        record.granted = access
        token = self.make_token(user or "", access)
        body: dict[str, Any] = {
            "token": token, "access_token": token, "expires_in": self.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if user is not None and (query.get("offline_token") == ["true"] or method == "POST"):
            body["refresh_token"] = "refresh-" + base64.urlsafe_b64encode(
                f"{user}:{password}".encode()).decode()
        record.status = 200
        _send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})


def _parse_refresh(token: str, users: Mapping[str, str]) -> tuple[str | None, str | None]:
    if not token.startswith("refresh-"):
        return "", None  # a user that cannot match: 401
    try:
        user, _, password = base64.urlsafe_b64decode(token[8:]).decode().partition(":")
    except ValueError:
        return "", None
    return user, password


@dataclass(frozen=True)
class TokenRegistry(RegistryServer):
    """tls_registry's shape plus the token issuer. `username`/`password` get pull,push
    everywhere but `private_source`; `admin_username`/`admin_password` get everything."""

    issuer: TokenIssuer | None = None
    service: str = TOKEN_SERVICE
    issuer_name: str = TOKEN_ISSUER
    private_source: str = PRIVATE_SOURCE
    private_target: str = PRIVATE_TARGET
    admin_username: str = ADMIN_USERNAME
    admin_password: str = ADMIN_PASSWORD

    @property
    def token_issuer(self) -> TokenIssuer:
        assert self.issuer is not None
        return self.issuer

    @property
    def admin_creds(self) -> str:
        return f"{self.admin_username}:{self.admin_password}"


@pytest.fixture(scope="session")
def token_registry(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> TokenRegistry:
    """docker-registry over TLS with `auth: token`, and its token issuer (HTTPS, same CA).
    The issuer is shared by the session: call `token_registry.issuer.reset()` in a test that
    looks at `issuer.requests` or changes the policy."""
    _require_tools("docker-registry", "openssl")
    pki = _pki(request, tmp_path_factory)

    def start() -> tuple[TokenRegistry, Callable[[], None]]:
        base = tmp_path_factory.mktemp("token-registry")
        issuer = TokenIssuer(pki, _tool_env(base / "env"))
        try:
            reg = start_docker_registry(base, pki=pki, auth={"token": {
                "realm": issuer.realm, "service": issuer.service, "issuer": issuer.issuer,
                "rootcertbundle": str(pki.signing_cert)}})
        except BaseException:
            issuer.stop()
            raise
        treg = TokenRegistry(**{**reg.__dict__, "username": USERNAME, "password": PASSWORD},
                             issuer=issuer)

        def stop() -> None:
            stop_docker_registry(treg)
            issuer.stop()

        return treg, stop

    result: TokenRegistry = _shared(request, "token_registry", start)
    return result


# --- small images ---

@dataclass(frozen=True)
class RegistryImage:
    """An image as a registry serves it: manifest bytes, config bytes, layer blobs."""

    manifest: bytes
    media_type: str
    config: bytes
    layers: tuple[bytes, ...]

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def layer_digests(self) -> list[str]:
        return [sha256_digest(b) for b in self.layers]

    @property
    def blobs(self) -> dict[str, bytes]:
        out = {self.config_digest: self.config}
        out.update((sha256_digest(b), b) for b in self.layers)
        return out


def make_image(files: Mapping[str, bytes] | None = None, *, docker: bool = False,
               extra_layers: Sequence[Mapping[str, bytes]] = ()) -> RegistryImage:
    """A small deterministic image: one gzip layer holding `files` (default: hello.txt), plus
    one per `extra_layers`. OCI media types, or Docker schema 2 with `docker=True`."""
    layer_sets = [files if files is not None else {"hello.txt": b"hello from the test\n"},
                  *extra_layers]
    layers, diff_ids = [], []
    for contents in layer_sets:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in sorted(contents.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
                tar.addfile(info, io.BytesIO(data))
        diff_ids.append(sha256_digest(raw.getvalue()))
        layers.append(gzip.compress(raw.getvalue(), mtime=0))
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "test"}
                    for _ in layers]}, separators=(",", ":")).encode()
    mt, ct, lt = ((DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP) if docker
                  else (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt,
        "config": {"mediaType": ct, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": lt, "digest": sha256_digest(b), "size": len(b)}
                   for b in layers]}, separators=(",", ":")).encode()
    return RegistryImage(manifest, mt, config, tuple(layers))


def image_from_layout(layout: Path, index: int = 0) -> RegistryImage:
    """The image of entry `index` of an OCI layout's index.json (e.g. fixtures/tiny)."""
    desc = json.loads((layout / "index.json").read_text())["manifests"][index]

    def blob(digest: str) -> bytes:
        algo, hex_ = digest.split(":", 1)
        return (layout / "blobs" / algo / hex_).read_bytes()

    manifest = blob(desc["digest"])
    m = json.loads(manifest)
    return RegistryImage(manifest, m.get("mediaType") or desc["mediaType"],
                         blob(m["config"]["digest"]),
                         tuple(blob(layer["digest"]) for layer in m["layers"]))


# --- HTTP plumbing shared by the Python servers ---

class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # per socket operation: an idle keep-alive connection ends after this

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (OSError, ssl.SSLError):
                self.close_connection = True
                raise


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # server_close must not wait for idle keep-alive or hung handlers
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients hanging up mid-response is what the hostile tests are about: stay quiet
        # about that, but show a bug in a handler
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _TLSThreadingServer(_ThreadingServer):
    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # the handshake happens in the handler's thread (setup), not in the accept loop
        return self._context.wrap_socket(sock, server_side=True,
                                         do_handshake_on_connect=False), addr


def _send(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: Mapping[str, str] | None = None, *, head: bool = False) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if body and not head:
        h.wfile.write(body)


# --- the hostile registry ---

class Mode:
    """What a hostile repository does (HostileRegistry.serve's `mode`)."""

    OK = "ok"
    """Serve the image (manifest by tag or digest, blobs with Range support), accept pushes."""
    BLOB_WRONG_DIGEST = "blob-wrong-digest"
    """Blob GET: same length, last byte flipped, Docker-Content-Digest claims the asked one."""
    BLOB_TRUNCATED = "blob-truncated"
    """Blob GET: full Content-Length, `truncate_at` bytes sent (default half), then close."""
    MANIFEST_MISMATCH = "manifest-mismatch"
    """Manifest GET/HEAD by digest: a different (valid JSON) manifest, header claims the asked
    digest. By tag: served normally."""
    MANIFEST_HUGE = "manifest-huge"
    """Manifest GET: Content-Length `huge_size` (default 100 MB; None: no length, close-
    delimited, endless) and bytes streamed until sent or the client hangs up."""
    BLOB_REDIRECT_LOOP = "blob-redirect-loop"
    """Blob GET: 307 to the same blob with ?hop=N+1, forever."""
    BLOB_REDIRECT_OTHER_HOST = "blob-redirect-other-host"
    """Blob GET: 307 to the second listener (`other_host`), which serves the blob and records
    the headers it got (listener == "other")."""
    BLOB_HANG = "blob-hang"
    """Blob GET without Range: full length announced, `hang_after` bytes sent (default half),
    then nothing for `hang_seconds` (default 30) and close. GET with `Range: bytes=N-`: 206."""
    ERROR = "error"
    """Every request for the repo: `error_status` (default 500) with an errors JSON body."""
    TAG_WRONG_DIGEST = "tag-wrong-digest"
    """Manifest GET/HEAD by tag: right body, wrong Docker-Content-Digest."""


@dataclass
class HostileRepo:
    """One repository of the hostile registry; change fields in a test as needed."""

    name: str
    mode: str = Mode.OK
    image: RegistryImage | None = None
    tag: str = "latest"
    auth: str | None = None  # None | "basic" | "bearer"
    username: str | None = None  # basic: required creds; bearer: creds the token endpoint wants
    password: str | None = None
    only_digests: set[str] | None = None  # blob modes touch only these blobs (None: all)
    truncate_at: int | None = None
    hang_after: int | None = None
    hang_seconds: float = 30.0
    huge_size: int | None = 100 * 1024 * 1024
    error_status: int = 500
    error_headers: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # digest -> (b, type)
    tags: dict[str, str] = field(default_factory=dict)  # tag -> digest
    uploads: dict[str, bytearray] = field(default_factory=dict)

    @property
    def manifest_digest(self) -> str:
        assert self.image is not None
        return self.image.manifest_digest


@dataclass
class HostileRequest:
    """One request either hostile listener got. `headers` has lower-case names."""

    listener: str  # "main" | "other"
    method: str
    path: str  # without the query
    query: dict[str, list[str]]
    headers: dict[str, str]
    repo: str | None
    kind: str  # ping | manifest | blob | upload | tags | token | other
    status: int = 0
    bytes_sent: int = 0  # body bytes the server managed to write
    time: float = 0.0

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


_ROUTE = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs/uploads|blobs|tags)"
                    r"(?:/(?P<rest>.*))?$")


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single `bytes=` range, None if absent or unusable."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


class HostileRegistry:
    """A fake registry on plain HTTP on 127.0.0.1 (ThreadingHTTPServer in a thread), plus a
    second listener (`other_host`) used as a redirect target. Configure with `serve()`; read
    `requests` / `count()`; `reset()` clears everything (the fixture does it before each test).

    Bearer auth: the challenge's realm is `{url}/token` on the main listener; it grants any
    asked-for scope on a bearer repo (if the repo has username set, only with those Basic
    creds) and records the request (kind "token")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.repos: dict[str, HostileRepo] = {}
        self.requests: list[HostileRequest] = []
        self.tokens: dict[str, set[tuple[str, str]]] = {}
        self.ping_status = 200
        self.ping_headers: dict[str, str] = {}
        self._release = threading.Event()
        hostile = self

        class Main(_QuietHandler):
            listener = "main"

            def __getattr__(self, name: str) -> Any:
                if name.startswith("do_"):
                    return lambda: hostile._dispatch(self, name[3:])
                raise AttributeError(name)

        class Other(_QuietHandler):
            listener = "other"

            def __getattr__(self, name: str) -> Any:
                if name.startswith("do_"):
                    return lambda: hostile._dispatch_other(self, name[3:])
                raise AttributeError(name)

        self._servers = [_ThreadingServer(("127.0.0.1", 0), Main),
                         _ThreadingServer(("127.0.0.1", 0), Other)]
        self.host = f"127.0.0.1:{self._servers[0].server_address[1]}"
        self.other_host = f"127.0.0.1:{self._servers[1].server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True,
                                          name=f"hostile-{i}")
                         for i, s in enumerate(self._servers)]
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def other_url(self) -> str:
        return f"http://{self.other_host}"

    # -- for tests --

    def serve(self, repo: str, mode: str = Mode.OK, image: RegistryImage | None = None,
              **options: Any) -> HostileRepo:
        """Set `repo`'s behaviour; it serves `image` (default: make_image()) under its tag
        ("latest" unless tag= is given). Other keywords set HostileRepo fields."""
        image = image or make_image()
        cfg = HostileRepo(name=repo, mode=mode, image=image, **options)
        cfg.blobs.update(image.blobs)
        cfg.manifests[image.manifest_digest] = (image.manifest, image.media_type)
        cfg.tags[cfg.tag] = image.manifest_digest
        with self._lock:
            self.repos[repo] = cfg
        return cfg

    def reset(self) -> None:
        """Forget repos, requests and tokens; release hung responses; ping back to 200."""
        with self._lock:
            self.repos.clear()
            self.requests.clear()
            self.tokens.clear()
            self.ping_status, self.ping_headers = 200, {}
        self.release_hangs()

    def release_hangs(self) -> None:
        """End every BLOB_HANG response that is hanging now (they close the connection)."""
        old, self._release = self._release, threading.Event()
        old.set()

    def requests_for(self, repo: str | None = None, *, method: str | None = None,
                     kind: str | None = None, listener: str | None = None) -> list[HostileRequest]:
        with self._lock:
            reqs = list(self.requests)
        return [r for r in reqs
                if (repo is None or r.repo == repo) and (method is None or r.method == method)
                and (kind is None or r.kind == kind)
                and (listener is None or r.listener == listener)]

    def count(self, repo: str | None = None, *, method: str | None = None,
              kind: str | None = None, listener: str | None = None) -> int:
        return len(self.requests_for(repo, method=method, kind=kind, listener=listener))

    def stop(self) -> None:
        self._release.set()
        for s in self._servers:
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(STOP_TIMEOUT)

    # -- plumbing --

    def _record(self, h: _QuietHandler, listener: str) -> HostileRequest:
        url = urllib.parse.urlsplit(h.path)
        rec = HostileRequest(listener, h.command, url.path,
                             urllib.parse.parse_qs(url.query, keep_blank_values=True),
                             {k.lower(): v for k, v in h.headers.items()}, None, "other",
                             time=time.time())
        with self._lock:
            self.requests.append(rec)
        return rec

    @staticmethod
    def _read_body(h: _QuietHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    def _respond(self, h: _QuietHandler, rec: HostileRequest, status: int, body: bytes = b"",
                 headers: Mapping[str, str] | None = None) -> None:
        rec.status = status
        head = h.command == "HEAD"
        _send(h, status, body, headers, head=head)
        if not head:
            rec.bytes_sent = len(body)

    def _error(self, h: _QuietHandler, rec: HostileRequest, status: int, code: str,
               message: str, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._respond(h, rec, status, body, {"Content-Type": "application/json",
                                             **(headers or {})})

    def _stream(self, h: _QuietHandler, rec: HostileRequest, status: int,
                headers: Mapping[str, str], chunks: Iterator[bytes]) -> None:
        """Send headers as given (Content-Length is the caller's), then the chunks, counting
        what was written; the connection is closed afterwards."""
        rec.status = status
        h.close_connection = True
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "HEAD":
            return
        try:
            for chunk in chunks:
                h.wfile.write(chunk)
                rec.bytes_sent += len(chunk)
        except OSError:
            pass

    def _dispatch(self, h: _QuietHandler, method: str) -> None:
        rec = self._record(h, "main")
        try:
            self._route(h, rec, method)
        except OSError:
            h.close_connection = True

    def _route(self, h: _QuietHandler, rec: HostileRequest, method: str) -> None:
        if rec.path in ("/v2", "/v2/"):
            rec.kind = "ping"
            body = b"{}" if self.ping_status == 200 else json.dumps({"errors": [{
                "code": "UNAUTHORIZED" if self.ping_status == 401 else "UNKNOWN",
                "message": "ping"}]}).encode()
            self._respond(h, rec, self.ping_status, body,
                          {"Content-Type": "application/json",
                           "Docker-Distribution-API-Version": "registry/2.0",
                           **self.ping_headers})
            return
        if rec.path == "/token":
            rec.kind = "token"
            self._token(h, rec)
            return
        m = _ROUTE.match(rec.path)
        if not m:
            self._error(h, rec, 404, "NOT_FOUND", "no such route")
            return
        name, kind, rest = m.group("name"), m.group("kind"), m.group("rest") or ""
        rec.repo = name
        rec.kind = {"blobs/uploads": "upload", "blobs": "blob", "manifests": "manifest",
                    "tags": "tags"}[kind]
        with self._lock:
            repo = self.repos.get(name)
            if repo is None and rec.kind == "upload" and method == "POST":
                repo = self.repos[name] = HostileRepo(name=name)
        if repo is None:
            self._error(h, rec, 404, "NAME_UNKNOWN", f"repository {name} not known")
            return
        if not self._authorized(h, rec, repo, method):
            return
        if repo.mode == Mode.ERROR:
            self._error(h, rec, repo.error_status, "UNKNOWN", "hostile: error mode",
                        repo.error_headers)
            self._drain(h)
            return
        if rec.kind == "manifest":
            self._manifest(h, rec, repo, method, rest)
        elif rec.kind == "blob":
            self._blob(h, rec, repo, method, rest)
        elif rec.kind == "upload":
            self._upload(h, rec, repo, method, rest)
        elif method in ("GET", "HEAD") and rest == "list":
            self._respond(h, rec, 200, json.dumps({"name": name, "tags": sorted(repo.tags)})
                          .encode(), {"Content-Type": "application/json"})
        else:
            self._error(h, rec, 404, "NOT_FOUND", "no such route")

    def _drain(self, h: _QuietHandler) -> None:
        """A request body we are not going to read: close instead of keeping the connection."""
        if h.headers.get("Content-Length", "0") != "0" or h.headers.get("Transfer-Encoding"):
            h.close_connection = True

    def _authorized(self, h: _QuietHandler, rec: HostileRequest, repo: HostileRepo,
                    method: str) -> bool:
        if repo.auth is None:
            return True
        auth = h.headers.get("Authorization") or ""
        if repo.auth == "basic":
            want = "Basic " + base64.b64encode(
                f"{repo.username}:{repo.password}".encode()).decode()
            if auth == want:
                return True
            self._error(h, rec, 401, "UNAUTHORIZED", "authentication required",
                        {"WWW-Authenticate": 'Basic realm="hostile-registry"'})
            self._drain(h)
            return False
        action = "pull" if method in ("GET", "HEAD") else "push"
        actions = "pull" if action == "pull" else "pull,push"
        token = auth[7:] if auth.startswith("Bearer ") else None
        with self._lock:
            granted = self.tokens.get(token or "", set())
        if (repo.name, action) in granted:
            return True
        challenge = (f'Bearer realm="{self.url}/token",service="hostile-registry",'
                     f'scope="repository:{repo.name}:{actions}"')
        if token is not None:
            challenge += ',error="insufficient_scope"' if token in self.tokens \
                else ',error="invalid_token"'
        self._error(h, rec, 401, "UNAUTHORIZED", "authentication required",
                    {"WWW-Authenticate": challenge})
        self._drain(h)
        return False

    def _token(self, h: _QuietHandler, rec: HostileRequest) -> None:
        scopes = [Scope.parse(s) for v in rec.query.get("scope", []) for s in v.split()]
        auth = h.headers.get("Authorization") or ""
        granted: set[tuple[str, str]] = set()
        for scope in scopes:
            with self._lock:
                repo = self.repos.get(scope.name)
            if repo is None or repo.auth != "bearer":
                continue
            if repo.username is not None:
                want = "Basic " + base64.b64encode(
                    f"{repo.username}:{repo.password}".encode()).decode()
                if auth != want:
                    self._error(h, rec, 401, "UNAUTHORIZED", "bad credentials",
                                {"WWW-Authenticate": 'Basic realm="hostile-token"'})
                    return
            granted.update((scope.name, a) for a in scope.actions)
        token = "hostile-" + secrets.token_hex(8)
        with self._lock:
            self.tokens[token] = granted
        self._respond(h, rec, 200, json.dumps({"token": token, "access_token": token,
                                               "expires_in": 300}).encode(),
                      {"Content-Type": "application/json"})

    def _manifest(self, h: _QuietHandler, rec: HostileRequest, repo: HostileRepo, method: str,
                  ref: str) -> None:
        by_digest = ref.startswith("sha256:")
        if method == "PUT":
            body = self._read_body(h)
            digest = sha256_digest(body)
            repo.manifests[digest] = (body, h.headers.get("Content-Type") or OCI_MANIFEST)
            if not by_digest:
                repo.tags[ref] = digest
            elif ref != digest:
                self._error(h, rec, 400, "DIGEST_INVALID", "manifest digest mismatch")
                return
            self._respond(h, rec, 201, b"", {"Location": f"/v2/{repo.name}/manifests/{digest}",
                                             "Docker-Content-Digest": digest})
            return
        if method == "DELETE":
            if by_digest and repo.manifests.pop(ref, None) is not None:
                for tag in [t for t, d in repo.tags.items() if d == ref]:
                    del repo.tags[tag]
                self._respond(h, rec, 202)
            else:
                self._error(h, rec, 404, "MANIFEST_UNKNOWN", "no such manifest")
            return
        if method not in ("GET", "HEAD"):
            self._error(h, rec, 405, "UNSUPPORTED", "method not allowed")
            return
        found = ref if by_digest else repo.tags.get(ref)
        if found is None or found not in repo.manifests:
            self._error(h, rec, 404, "MANIFEST_UNKNOWN", f"manifest {ref} not known")
            return
        body, media_type = repo.manifests[found]
        header_digest = found
        if repo.mode == Mode.MANIFEST_HUGE:
            self._huge(h, rec, repo, media_type)
            return
        if repo.mode == Mode.MANIFEST_MISMATCH and by_digest:
            doc = json.loads(body)
            doc.setdefault("annotations", {})["hostile"] = "not the manifest you asked for"
            body = json.dumps(doc, separators=(",", ":")).encode()
        if repo.mode == Mode.TAG_WRONG_DIGEST and not by_digest:
            header_digest = sha256_digest(b"not this manifest " + body)
        self._respond(h, rec, 200, body, {"Content-Type": media_type,
                                          "Docker-Content-Digest": header_digest})

    def _huge(self, h: _QuietHandler, rec: HostileRequest, repo: HostileRepo,
              media_type: str) -> None:
        size = repo.huge_size
        release = self._release

        def chunks() -> Iterator[bytes]:
            yield b'{"schemaVersion":2,"padding":"'
            sent = 30
            block = b"a" * 65536
            while (size is None or sent < size) and not release.is_set():
                n = len(block) if size is None else min(len(block), size - sent)
                yield block[:n]
                sent += n

        headers = {"Content-Type": media_type,
                   "Docker-Content-Digest": sha256_digest(b"huge")}
        if size is not None:
            headers["Content-Length"] = str(size)
        else:
            headers["Connection"] = "close"
        self._stream(h, rec, 200, headers, chunks())

    def _touches(self, repo: HostileRepo, digest: str) -> bool:
        return repo.only_digests is None or digest in repo.only_digests

    def _blob(self, h: _QuietHandler, rec: HostileRequest, repo: HostileRepo, method: str,
              digest: str) -> None:
        if method == "DELETE":
            if repo.blobs.pop(digest, None) is None:
                self._error(h, rec, 404, "BLOB_UNKNOWN", "no such blob")
            else:
                self._respond(h, rec, 202)
            return
        if method not in ("GET", "HEAD"):
            self._error(h, rec, 405, "UNSUPPORTED", "method not allowed")
            return
        data = repo.blobs.get(digest)
        if data is None:
            self._error(h, rec, 404, "BLOB_UNKNOWN", f"blob {digest} not known")
            return
        mode = repo.mode if self._touches(repo, digest) else Mode.OK
        if method == "GET" and mode == Mode.BLOB_REDIRECT_LOOP:
            hop = int((rec.query.get("hop") or ["0"])[0]) + 1
            self._respond(h, rec, 307, b"", {
                "Location": f"{self.url}/v2/{repo.name}/blobs/{digest}?hop={hop}"})
            return
        if method == "GET" and mode == Mode.BLOB_REDIRECT_OTHER_HOST:
            q = urllib.parse.urlencode({"repo": repo.name, "sig": "x"})
            self._respond(h, rec, 307, b"", {"Location": f"{self.other_url}/blob/{digest}?{q}"})
            return
        size = len(data)
        base_headers = {"Content-Type": "application/octet-stream",
                        "Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
        rng = _parse_range(h.headers.get("Range"), size) if method == "GET" else None
        if mode == Mode.BLOB_WRONG_DIGEST:
            data = data[:-1] + bytes([data[-1] ^ 0xFF]) if data else b"x"
        if rng is not None:
            start, end = rng
            self._respond(h, rec, 206, data[start:end + 1], {
                **base_headers, "Content-Range": f"bytes {start}-{end}/{size}"})
            return
        if method == "GET" and mode == Mode.BLOB_TRUNCATED:
            cut = size // 2 if repo.truncate_at is None else repo.truncate_at
            self._stream(h, rec, 200, {**base_headers, "Content-Length": str(size)},
                         iter([data[:cut]]))
            return
        if method == "GET" and mode == Mode.BLOB_HANG:
            cut = size // 2 if repo.hang_after is None else repo.hang_after
            release = self._release

            def hang() -> Iterator[bytes]:
                yield data[:cut]
                h.wfile.flush()
                release.wait(repo.hang_seconds)

            self._stream(h, rec, 200, {**base_headers, "Content-Length": str(size)}, hang())
            return
        self._respond(h, rec, 200, data, base_headers)

    def _upload(self, h: _QuietHandler, rec: HostileRequest, repo: HostileRepo, method: str,
                upload_id: str) -> None:
        loc = f"/v2/{repo.name}/blobs/uploads/"
        if method == "POST":
            mount, source = _first(rec.query, "mount"), _first(rec.query, "from")
            if mount and source:
                with self._lock:
                    src = self.repos.get(source)
                if src is not None and mount in src.blobs:
                    repo.blobs[mount] = src.blobs[mount]
                    self._respond(h, rec, 201, b"", {"Location": f"/v2/{repo.name}/blobs/{mount}",
                                                     "Docker-Content-Digest": mount})
                    return
            digest = _first(rec.query, "digest")
            if digest:
                body = self._read_body(h)
                self._finish_upload(h, rec, repo, digest, body)
                return
            self._read_body(h)
            uid = secrets.token_hex(8)
            repo.uploads[uid] = bytearray()
            self._respond(h, rec, 202, b"", {"Location": loc + uid, "Range": "0-0",
                                             "Docker-Upload-UUID": uid})
            return
        buf = repo.uploads.get(upload_id)
        if buf is None:
            self._drain(h)
            self._error(h, rec, 404, "BLOB_UPLOAD_UNKNOWN", "no such upload")
            return
        if method == "PATCH":
            buf += self._read_body(h)
            self._respond(h, rec, 202, b"", {"Location": loc + upload_id,
                                             "Range": f"0-{max(len(buf) - 1, 0)}",
                                             "Docker-Upload-UUID": upload_id})
        elif method == "PUT":
            buf += self._read_body(h)
            del repo.uploads[upload_id]
            self._finish_upload(h, rec, repo, rec.query.get("digest", [""])[0], bytes(buf))
        elif method == "GET":
            self._respond(h, rec, 204, b"", {"Location": loc + upload_id,
                                             "Range": f"0-{max(len(buf) - 1, 0)}"})
        elif method == "DELETE":
            del repo.uploads[upload_id]
            self._respond(h, rec, 204)
        else:
            self._error(h, rec, 405, "UNSUPPORTED", "method not allowed")

    def _finish_upload(self, h: _QuietHandler, rec: HostileRequest, repo: HostileRepo,
                       digest: str, data: bytes) -> None:
        if sha256_digest(data) != digest:
            self._error(h, rec, 400, "DIGEST_INVALID", "digest did not match content")
            return
        repo.blobs[digest] = data
        self._respond(h, rec, 201, b"", {"Location": f"/v2/{repo.name}/blobs/{digest}",
                                         "Docker-Content-Digest": digest})

    def _dispatch_other(self, h: _QuietHandler, method: str) -> None:
        rec = self._record(h, "other")
        try:
            m = re.fullmatch(r"/blob/(sha256:[0-9a-f]{64})", rec.path)
            repo_name = _first(rec.query, "repo")
            rec.repo, rec.kind = repo_name, "blob"
            with self._lock:
                repo = self.repos.get(repo_name or "")
            data = repo.blobs.get(m.group(1)) if (m and repo) else None
            if data is None or method not in ("GET", "HEAD"):
                self._error(h, rec, 404, "BLOB_UNKNOWN", "no such blob here")
                return
            rng = _parse_range(h.headers.get("Range"), len(data)) if method == "GET" else None
            if rng is not None:
                self._respond(h, rec, 206, data[rng[0]:rng[1] + 1], {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {rng[0]}-{rng[1]}/{len(data)}"})
            else:
                self._respond(h, rec, 200, data, {"Content-Type": "application/octet-stream"})
        except OSError:
            h.close_connection = True


@pytest.fixture
def hostile_registry(request: pytest.FixtureRequest) -> Iterator[HostileRegistry]:
    """The hostile fake registry, reset for this test (the server itself lives for the
    session; hung responses are released when the test ends)."""

    def start() -> tuple[HostileRegistry, Callable[[], None]]:
        reg = HostileRegistry()
        return reg, reg.stop

    reg: HostileRegistry = _shared(request, "hostile_registry", start)
    reg.reset()
    yield reg
    reg.release_hangs()
