"""A registry as one more digest-keyed content store (distribution-spec v1.1): manifests by
tag or digest, blobs read with `Range` resume, HEAD, cross-repository mount, and uploads
streamed (one PUT when the digest is known, else PATCHes in bounded chunks, resumed from the
registry's own `Range` after a failure). Auth: Basic, and the Bearer challenge flow with a
token per repository scope (anonymous too); a 401 is retried once with new credentials.

Every error names the registry, the repository, the HTTP status and the registry's own error
code (`MANIFEST_UNKNOWN`, `DENIED`, ...)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import urljoin, urlsplit

from ocilayers.cas import BlobWriter
from ocilayers.credentials import Credentials, lookup
from ocilayers.errors import BlobNotFoundError, DigestMismatchError, ImageError, OCILayersError
from ocilayers.httpclient import (
    HttpClient,
    HTTPError,
    Response,
    TLSOptions,
    is_loopback,
    join_query,
)
from ocilayers.spec import (
    DOCKER_TRANSPORT,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Digest,
)

TRANSPORT = DOCKER_TRANSPORT
ACCEPT = ", ".join([MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST,
                    MEDIA_TYPE_DOCKER_MANIFEST_LIST])
MAX_MANIFEST = 4 << 20  # distribution's own limit on a manifest PUT
CHUNK = 16 << 20  # a PATCH of a chunked upload (held in memory to resend it)
_RESUMES = 5  # broken blob downloads resumed with Range, at most

_REPO = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                   r"[a-z0-9]+)*)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


class RegistryError(OCILayersError):
    """A registry answered with an error (or not as the spec says)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class RemoteRef:
    """`docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`."""

    host: str
    repo: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, spec: str) -> RemoteRef:
        rest = spec[len(TRANSPORT):] if spec.startswith(TRANSPORT) else spec
        host, sep, path = rest.partition("/")
        if not sep or not host or not path:
            raise ImageError(f"{spec!r}: want docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")
        if "." not in host and ":" not in host and host != "localhost":
            raise ImageError(f"{spec!r}: {host!r} is not a registry host (a host has a dot "
                             "or a port, or is localhost)")
        digest = None
        if "@" in path:
            path, _, d = path.partition("@")
            digest = Digest.parse(d)
        tag = None
        slash = path.rfind("/")
        colon = path.rfind(":")
        if colon > slash:
            path, tag = path[:colon], path[colon + 1:]
            if not _TAG.fullmatch(tag):
                raise ImageError(f"{spec!r}: invalid tag {tag!r}")
        if not _REPO.fullmatch(path):
            raise ImageError(f"{spec!r}: invalid repository name {path!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(host, path, tag, digest)

    @property
    def reference(self) -> str:
        """What the manifest is fetched by: the digest when given, else the tag."""
        return str(self.digest) if self.digest is not None else (self.tag or "latest")

    @property
    def name(self) -> str:
        """`HOST/REPO:TAG` (`@DIGEST`), as a store tag names it."""
        out = f"{self.host}/{self.repo}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    def __str__(self) -> str:
        return TRANSPORT + self.name


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries: TLS (`--tls-verify`, `--cert-dir`, `--insecure HOST`),
    credentials (`creds` "USER:PASS" overrides the stored ones), the request timeout."""

    tls: TLSOptions = field(default_factory=TLSOptions)
    creds: str | None = None
    timeout: float | None = None
    chunk_size: int = CHUNK
    monolithic: bool = True  # one PUT for a blob whose digest and size are known


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in re.finditer(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))', rest)}
    return scheme.lower(), params


def _error_detail(resp: Response) -> tuple[str | None, str]:
    try:
        body = resp.read(64 << 10)
    except (HTTPError, OSError):
        return None, ""
    try:
        obj = json.loads(body)
        err = obj["errors"][0]
        return str(err.get("code") or "") or None, str(err.get("message") or "")
    except (ValueError, KeyError, IndexError, TypeError):
        return None, body[:200].decode("utf-8", "replace").strip()


class Registry:
    """One registry host: requests with auth, per repository."""

    def __init__(self, host: str, opts: RegistryOptions | None = None,
                 http: HttpClient | None = None) -> None:
        self.host = host
        self.opts = opts or RegistryOptions()
        self.http = http or HttpClient(self.opts.tls, timeout=self.opts.timeout)
        self._creds: Credentials | None = None
        self._creds_known = False
        self._auth: dict[str, str] = {}  # scope key -> Authorization header value
        self._scheme: tuple[str, dict[str, str]] | None = None  # from the /v2/ challenge
        self._base: str | None = None
        self.requests = 0  # for tests and benchmarks: requests made

    # -- connection and auth --

    def credentials(self) -> Credentials | None:
        if not self._creds_known:
            if self.opts.creds is not None:
                user, _, pw = self.opts.creds.partition(":")
                self._creds = Credentials(user, pw, "--creds")
            else:
                self._creds = lookup(self.host)
            self._creds_known = True
        return self._creds

    def base(self) -> str:
        """https://HOST (or http:// for a loopback or --insecure host that speaks no TLS),
        found with one `GET /v2/`, whose challenge says how to authenticate."""
        if self._base is not None:
            return self._base
        resp: Response | None = None
        base = f"https://{self.host}"
        if is_loopback(self.host):
            # Loopback may speak plain HTTP: asked first, it costs no TLS set-up (the CA
            # bundle) when it does; a TLS server answers 400 or drops it, then TLS is used.
            try:
                probe = self.http.request("GET", f"http://{self.host}/v2/", idempotent=False)
            except HTTPError:
                probe = None
            if probe is not None and probe.status in (200, 401):
                resp, base = probe, f"http://{self.host}"
            elif probe is not None:
                probe.close()
        if resp is None:
            try:
                resp = self.http.request("GET", f"https://{self.host}/v2/", idempotent=False)
            except HTTPError as exc:
                cause = str(exc)
                if not self.http.may_be_plain(self.host) or _is_cert_error(cause):
                    raise RegistryError(f"registry {self.host}: {cause}") from None
                try:
                    resp = self.http.request("GET", f"http://{self.host}/v2/")
                except HTTPError as exc2:
                    raise RegistryError(f"registry {self.host}: {exc2}") from None
                base = f"http://{self.host}"
        self.requests += 1
        if resp.status == 401:
            self._scheme = _challenge(resp.header("WWW-Authenticate") or "")
        resp.read(1 << 20)
        self._base = base
        return base

    def _authorize(self, scheme: str, params: dict[str, str], scopes: Sequence[str],
                   repo: str | None = None) -> str:
        creds = self.credentials()
        where = f"registry {self.host}" + (f": repository {repo}" if repo else "")
        if scheme == "basic":
            if creds is None:
                raise RegistryError(f"{where}: HTTP 401 UNAUTHORIZED: needs credentials (Basic "
                                    "auth); run `ocilayers login` or pass --creds", 401,
                                    "UNAUTHORIZED")
            return "Basic " + base64.b64encode(
                f"{creds.username}:{creds.password}".encode()).decode()
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"registry {self.host}: unsupported auth challenge {scheme!r}")
        query = [("service", params["service"])] if "service" in params else []
        query += [("scope", s) for s in scopes]
        headers = {}
        if creds is not None and not creds.identity_token:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{creds.username}:{creds.password}".encode()).decode()
        if creds is not None and creds.identity_token:  # an OAuth2 refresh token
            from urllib.parse import urlencode

            body = urlencode({"grant_type": "refresh_token", "refresh_token": creds.password,
                              "service": params.get("service", ""), "scope": " ".join(scopes),
                              "client_id": "ocilayers"})
            resp = self.http.request("POST", params["realm"], body=body, idempotent=True,
                                     headers={"Content-Type":
                                              "application/x-www-form-urlencoded"})
        else:
            resp = self.http.request("GET", join_query(params["realm"], query), headers=headers)
        self.requests += 1
        if resp.status != 200:
            code, msg = _error_detail(resp)
            raise RegistryError(f"{where}: token server {params['realm']}: HTTP "
                                f"{resp.status}{' ' + code if code else ''}"
                                f"{': ' + msg if msg else ''}", resp.status, code)
        try:
            obj = json.loads(resp.read(1 << 20))
            token = obj.get("token") or obj.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise RegistryError(f"registry {self.host}: the token server gave no token")
        return "Bearer " + token

    def request(self, method: str, repo: str, path: str, *, actions: str = "pull",
                headers: dict[str, str] | None = None, body: Any = None,
                idempotent: bool | None = None, ok: Sequence[int] = (200,),
                extra_scopes: Sequence[str] = (), absolute: str | None = None,
                quiet: Sequence[int] = ()) -> Response:
        """A request under `/v2/<repo>/`; a 401 is answered once with credentials for the
        scope `repository:<repo>:<actions>` (and `extra_scopes`). Statuses in `ok` and
        `quiet` are returned; anything else raises RegistryError."""
        base = self.base()
        scopes = [f"repository:{repo}:{actions}", *extra_scopes]
        key = " ".join(scopes)
        url = absolute or f"{base}/v2/{repo}/{path}"
        # A Location (an upload's) on another host gets no credentials of this registry.
        foreign = absolute is not None and urlsplit(absolute).netloc != self.host
        for attempt in range(2):
            hdrs = dict(headers or {})
            if foreign:
                resp = self.http.request(method, url, headers=hdrs, body=body,
                                         idempotent=idempotent)
                self.requests += 1
                if resp.status in ok or resp.status in quiet:
                    return resp
                code, msg = _error_detail(resp)
                self._fail(method, repo, url, resp.status, code, msg)
            if key not in self._auth and attempt == 0 and self._scheme is not None and (
                    self._scheme[0] == "bearer" or self.credentials() is not None):
                # The /v2/ challenge says how: no need to be refused first.
                self._auth[key] = self._authorize(*self._scheme, scopes, repo)
            if key in self._auth:
                hdrs["Authorization"] = self._auth[key]
            resp = self.http.request(method, url, headers=hdrs, body=body,
                                     idempotent=idempotent)
            self.requests += 1
            if resp.status == 401 and attempt == 0 and (body is None or isinstance(
                    body, (bytes, str))):
                scheme, params = _challenge(resp.header("WWW-Authenticate") or "")
                resp.read(1 << 20)
                if params.get("error") == "insufficient_scope" and key in self._auth:
                    self._fail(method, repo, url, 401, "INSUFFICIENT_SCOPE",
                               "insufficient scope")
                self._auth[key] = self._authorize(scheme, params, scopes, repo)
                continue
            if resp.status in ok or resp.status in quiet:
                return resp
            code, msg = _error_detail(resp)
            self._fail(method, repo, url, resp.status, code, msg)
        raise RegistryError(f"registry {self.host}: repository {repo}: {method} {path}: "
                            "still unauthorized with new credentials", 401, "UNAUTHORIZED")

    def _fail(self, method: str, repo: str, url: str, status: int, code: str | None,
              msg: str) -> NoReturn:
        raise RegistryError(f"registry {self.host}: repository {repo}: {method} "
                            f"{url.split('?', 1)[0].split('/v2/', 1)[-1]}: HTTP {status}"
                            f"{' ' + code if code else ''}{': ' + msg if msg else ''}",
                            status, code)

    def check_login(self) -> None:
        """Try the credentials: `GET /v2/` with them (a token for no scope first, under
        Bearer); RegistryError when refused."""
        self.base()
        if self._scheme is None:
            return
        auth = self._authorize(*self._scheme, [])
        resp = self.http.request("GET", f"{self.base()}/v2/", headers={"Authorization": auth})
        self.requests += 1
        if resp.status != 200:
            code, msg = _error_detail(resp)
            raise RegistryError(f"registry {self.host}: login refused: HTTP {resp.status}"
                                f"{' ' + code if code else ''}{': ' + msg if msg else ''}",
                                resp.status, code)
        resp.read(1 << 20)

    # -- manifests --

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, Digest]:
        """(bytes, media type, digest). A manifest fetched by digest must match it; one
        fetched by tag is recorded by the digest of its bytes (Docker-Content-Digest is not
        trusted: registries get it wrong)."""
        resp = self.request("GET", repo, f"manifests/{reference}", headers={"Accept": ACCEPT})
        length = resp.header("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_MANIFEST:
            resp.close()
            raise RegistryError(f"registry {self.host}: repository {repo}: manifest "
                                f"{reference} is {int(length)} bytes (more than "
                                f"{MAX_MANIFEST >> 20} MiB)")
        try:
            data = resp.read(MAX_MANIFEST)
        except HTTPError:
            raise RegistryError(f"registry {self.host}: repository {repo}: manifest "
                                f"{reference} is larger than {MAX_MANIFEST >> 20} MiB") from None
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        if reference.startswith("sha256:") and Digest.parse(reference) != digest:
            raise DigestMismatchError(f"registry {self.host}: repository {repo}: manifest "
                                      f"{reference} does not match its digest (got {digest})")
        media = (resp.header("Content-Type") or "").split(";")[0].strip()
        try:
            obj = json.loads(data)
            media = obj.get("mediaType") or media
        except (ValueError, AttributeError):
            raise ImageError(f"registry {self.host}: repository {repo}: manifest "
                             f"{reference} is not JSON") from None
        return data, str(media), digest

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> None:
        resp = self.request("PUT", repo, f"manifests/{reference}", actions="pull,push",
                            headers={"Content-Type": media_type}, body=data, ok=(200, 201, 202,
                                                                               204))
        resp.read(1 << 20)

    # -- blobs --

    def blob_size(self, repo: str, digest: Digest) -> int | None:
        """HEAD: the blob's size, or None when the repository has no such blob."""
        resp = self.request("HEAD", repo, f"blobs/{digest}", quiet=(404,))
        resp.close()
        if resp.status == 404:
            return None
        length = resp.header("Content-Length")
        return int(length) if length and length.isdigit() else -1

    def open_blob(self, repo: str, digest: Digest, size: int | None = None) -> RemoteBlob:
        return RemoteBlob(self, repo, digest, size)

    def mount_blob(self, repo: str, digest: Digest, from_repo: str) -> bool:
        """A cross-repository mount; False (and the upload it opened cancelled) when the
        registry would not (a 202, or 401 insufficient_scope)."""
        try:
            resp = self.request("POST", repo, "blobs/uploads/?" + join_query(
                "", [("mount", str(digest)), ("from", from_repo)])[1:], actions="pull,push",
                extra_scopes=[f"repository:{from_repo}:pull"], body=b"",
                ok=(201,), quiet=(202,), idempotent=False)
        except RegistryError as exc:
            if exc.status == 401:
                return False
            raise
        location = resp.header("Location")
        resp.read(1 << 20)
        if resp.status == 201:
            return True
        if location:  # a 202 opened an upload: cancel it
            self.cancel_upload(repo, urljoin(self.base() + "/", location))
        return False

    def cancel_upload(self, repo: str, url: str) -> None:
        """DELETE an upload that will not be finished (best effort: it expires anyway)."""
        with contextlib.suppress(RegistryError, HTTPError):
            self.request("DELETE", repo, "", absolute=url, actions="pull,push", ok=(204,),
                         quiet=(200, 202, 404, 405), idempotent=True).close()

    def start_upload(self, repo: str) -> tuple[str, int]:
        """POST an upload: (its Location, the chunk size to PATCH in: ours, or the
        registry's `OCI-Chunk-Min-Length` when larger)."""
        resp = self.request("POST", repo, "blobs/uploads/", actions="pull,push", body=b"",
                            ok=(202,), idempotent=False)
        location = resp.header("Location")
        min_chunk = resp.header("OCI-Chunk-Min-Length")
        resp.read(1 << 20)
        if not location:
            raise RegistryError(f"registry {self.host}: repository {repo}: upload started "
                                "without a Location")
        return (urljoin(self.base() + "/", location),
                max(self.opts.chunk_size, int(min_chunk) if min_chunk and min_chunk.isdigit()
                    else 0))

    def upload_blob(self, repo: str, data: Any, digest: Digest | None = None,
                    size: int | None = None) -> tuple[Digest, int]:
        """Upload the bytes `data` (a readable) gives. With `digest` and `size` known and
        `monolithic`: POST, then one PUT streaming the body. Else: through an UploadWriter
        (PATCHes, then the PUT with the digest). Returns (digest, size) of what was sent."""
        if digest is not None and size is not None and self.opts.monolithic:
            url, _chunk = self.start_upload(repo)
            hashed = _Hashing(data, size)
            put = self.request("PUT", repo, "", absolute=join_query(url, [("digest",
                                                                          str(digest))]),
                               actions="pull,push", headers={"Content-Length": str(size),
                               "Content-Type": "application/octet-stream"}, body=hashed,
                               ok=(201, 204), idempotent=False)
            put.read(1 << 20)
            hashed.check(digest)
            return digest, size
        w = UploadWriter(self, repo)
        try:
            while part := _read_full(data, w.chunk):
                w.write(part)
            w.digest = digest
            return w.finish()
        except BaseException:
            w.cancel()
            raise

    def _patch(self, repo: str, url: str, part: bytes, offset: int) -> str:
        """Send `part` (bytes `offset`...) of an upload; after a failure, ask the upload's
        status and send what the registry does not have. Returns the next Location."""
        start = 0
        for attempt in range(4):
            body = part[start:]
            end = offset + len(part) - 1
            try:
                resp = self.request("PATCH", repo, "", absolute=url, actions="pull,push",
                                    headers={"Content-Type": "application/octet-stream",
                                             "Content-Range": f"{offset + start}-{end}",
                                             "Content-Length": str(len(body))},
                                    body=body, ok=(202, 204), idempotent=False)
            except (RegistryError, HTTPError) as exc:
                status = getattr(exc, "status", None)
                if attempt == 3 or (status is not None and status < 500 and status != 416):
                    raise
                have = self._upload_status(repo, url)
                if have < offset or have > end + 1:
                    raise RegistryError(f"registry {self.host}: repository {repo}: the "
                                        f"upload holds {have} bytes, expected {offset} to "
                                        f"{end + 1}") from None
                start = have - offset
                if start == len(part):
                    return url
                continue
            nxt = resp.header("Location")
            resp.read(1 << 20)
            return urljoin(self.base() + "/", nxt) if nxt else url
        return url

    def _upload_status(self, repo: str, url: str) -> int:
        resp = self.request("GET", repo, "", absolute=url, actions="pull,push",
                            ok=(204,), quiet=(200,))
        rng = resp.header("Range") or ""
        resp.read(1 << 20)
        m = re.fullmatch(r"(?:bytes=)?0-(\d+)", rng.strip())
        return int(m.group(1)) + 1 if m else 0


def _is_cert_error(text: str) -> bool:
    return "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text or \
        "Hostname mismatch" in text or "doesn't match" in text


def _read_full(data: Any, n: int) -> bytes:
    parts = []
    got = 0
    while got < n:
        b = data.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


class _Hashing:
    """A request body that hashes and counts what urllib3 reads of it."""

    def __init__(self, raw: Any, size: int) -> None:
        self._raw = raw
        self._h = hashlib.sha256()
        self.n = 0
        self.size = size

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n if n >= 0 else 1 << 20)
        self._h.update(data)
        self.n += len(data)
        return bytes(data)

    def check(self, digest: Digest) -> None:
        if self.n != self.size or self._h.hexdigest() != digest.hex:
            raise DigestMismatchError(f"blob {digest}: the bytes sent do not match it")


class RemoteBlob:
    """A blob read from a registry; a broken or stalled download is resumed with `Range`
    (a bounded number of times). Never reads more than the expected size (plus one byte,
    to notice a longer blob); digests are checked by the reader's caller."""

    def __init__(self, reg: Registry, repo: str, digest: Digest, size: int | None) -> None:
        self._reg = reg
        self._repo = repo
        self._digest = digest
        self._size = size
        self._pos = 0
        self._resp: Response | None = None
        self._resumes = 0
        self._open()

    def _open(self) -> None:
        headers = {"Range": f"bytes={self._pos}-"} if self._pos else {}
        resp = self._reg.request("GET", self._repo, f"blobs/{self._digest}", headers=headers,
                                 ok=(200, 206), quiet=(404,))
        if resp.status == 404:
            code, msg = _error_detail(resp)
            raise BlobNotFoundError(f"registry {self._reg.host}: repository {self._repo}: "
                                    f"blob {self._digest} is missing: HTTP 404"
                                    f"{' ' + code if code else ''}{': ' + msg if msg else ''}")
        if self._pos and resp.status == 200:  # no Range support: skip what we have
            left = self._pos
            try:
                while left:
                    b = resp.raw.read(min(left, 1 << 20))
                    if not b:
                        raise ConnectionError("the blob ended early on a second read")
                    left -= len(b)
            except BaseException:
                resp.close()
                raise
        self._resp = resp

    def read(self, n: int = -1, /) -> bytes:
        import ssl

        import urllib3

        if n < 0:
            n = 1 << 20
        if self._size is not None:
            n = min(n, self._size + 1 - self._pos)
            if n <= 0:
                return b""
        while True:
            try:
                if self._resp is None:
                    self._open()  # (a resume: skipping what we have may break too)
                assert self._resp is not None
                data = self._resp.raw.read(n)
                if not data and self._size is not None and self._pos < self._size:
                    raise urllib3.exceptions.ProtocolError("the connection closed early")
                self._pos += len(data)
                return bytes(data)
            except (urllib3.exceptions.HTTPError, OSError, ssl.SSLError) as exc:
                if isinstance(exc, (HTTPError, BlobNotFoundError)):
                    raise
                if self._resp is not None:
                    self._resp.close()
                    self._resp = None
                self._resumes += 1
                if self._resumes > _RESUMES:
                    raise HTTPError(f"registry {self._reg.host}: repository {self._repo}: "
                                    f"blob {self._digest}: download failed at byte "
                                    f"{self._pos}: {exc}") from None

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None


class RegistryBlobs:
    """A repository's blobs as a ContentReader (what a source reads layers through)."""

    def __init__(self, reg: Registry, repo: str, sizes: Callable[[Digest], int | None]
                 | None = None) -> None:
        self.reg = reg
        self.repo = repo
        self.name = f"{TRANSPORT}{reg.host}/{repo}"
        self._sizes = sizes

    def blob_size(self, digest: Digest) -> int | None:
        known = self._sizes(digest) if self._sizes is not None else None
        return known if known is not None else self.reg.blob_size(self.repo, digest)

    def open_blob(self, digest: Digest) -> RemoteBlob:
        return self.reg.open_blob(self.repo, digest,
                                  self._sizes(digest) if self._sizes is not None else None)

    def close(self) -> None:
        self.reg.http.close()
class UploadWriter(BlobWriter):
    """A blob uploaded as it is written (the builder's BlobWriter for a registry): PATCHes of
    `chunk_size` bytes, then the PUT with the digest the writer sets at the end."""

    def __init__(self, reg: Registry, repo: str) -> None:  # (no local file: no super())
        self._reg = reg
        self._repo = repo
        self.digest: Digest | None = None
        self._h = hashlib.sha256()
        self._buf = bytearray()
        self._offset = 0
        self._url, self.chunk = reg.start_upload(repo)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._h.update(data)
        self._buf += data
        while len(self._buf) >= self.chunk:
            part = bytes(self._buf[:self.chunk])
            del self._buf[:self.chunk]
            self._url = self._reg._patch(self._repo, self._url, part, self._offset)
            self._offset += len(part)
        return len(data)

    def flush(self) -> None:
        pass

    def finish(self) -> tuple[Digest, int]:
        if self._buf:
            part = bytes(self._buf)
            self._buf.clear()
            self._url = self._reg._patch(self._repo, self._url, part, self._offset)
            self._offset += len(part)
        got = Digest("sha256", self._h.hexdigest())
        if self.digest is not None and self.digest != got:
            raise DigestMismatchError(f"blob {self.digest}: the bytes sent hash to {got}")
        put = self._reg.request("PUT", self._repo, "", absolute=join_query(
            self._url, [("digest", str(got))]), actions="pull,push",
            headers={"Content-Length": "0"}, body=b"", ok=(201, 204), idempotent=False)
        put.read(1 << 20)
        return got, self._offset

    def cancel(self) -> None:
        self._reg.cancel_upload(self._repo, self._url)


@dataclass
class PushStats:
    uploaded: int = 0  # blobs sent
    uploaded_bytes: int = 0
    present: int = 0  # blobs the repository had (HEAD)
    mounted: int = 0  # blobs mounted from another repository


class RepoWriter:
    """A repository's blobs, written (the builder's ContentWriter): HEAD first; a
    cross-repository mount from the repositories `mount_from(digest)` names (same registry);
    else an upload."""

    def __init__(self, reg: Registry, repo: str,
                 mount_from: Callable[[Digest], Sequence[str]] | None = None,
                 stats: PushStats | None = None) -> None:
        self.reg = reg
        self.repo = repo
        self._mount_from = mount_from
        self.stats = stats or PushStats()
        self._have: set[Digest] = set()
        self._sizes: dict[Digest, int] = {}  # what the HEADs said
        self._lock = threading.Lock()  # (stats: blobs may go up from two threads)

    def has_blob(self, digest: Digest) -> bool:
        if digest in self._have:
            return True
        size = self.reg.blob_size(self.repo, digest)
        if size is not None:
            with self._lock:
                self._have.add(digest)
                self._sizes[digest] = size
                self.stats.present += 1
            return True
        for other in (self._mount_from(digest) if self._mount_from else ()):
            if other != self.repo and self.reg.mount_blob(self.repo, digest, other):
                with self._lock:
                    self._have.add(digest)
                    self.stats.mounted += 1
                return True
        return False

    def size_of(self, digest: Digest) -> int | None:
        """The size of a blob the repository has (a HEAD only when none was made yet)."""
        if digest in self._sizes:
            return self._sizes[digest]
        return self.reg.blob_size(self.repo, digest)

    def put_blob(self, data: bytes) -> Digest:
        import io

        digest = Digest.of_bytes(data)
        if not self.has_blob(digest):
            self.upload(io.BytesIO(data), digest, len(data))
        return digest

    def upload(self, data: Any, digest: Digest, size: int) -> None:
        self.reg.upload_blob(self.repo, data, digest, size)
        with self._lock:
            self._have.add(digest)
            self.stats.uploaded += 1
            self.stats.uploaded_bytes += size

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[UploadWriter]:
        w = UploadWriter(self.reg, self.repo)
        try:
            yield w
            digest, size = w.finish()
        except BaseException:
            w.cancel()
            raise
        with self._lock:
            self._have.add(digest)
            self.stats.uploaded += 1
            self.stats.uploaded_bytes += size
