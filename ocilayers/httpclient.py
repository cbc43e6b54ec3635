"""HTTP for registries, on urllib3: TLS as dockerd and skopeo set it up, plain HTTP only where
it is allowed, redirects followed without ever taking Authorization to another host, and
idempotent requests retried with backoff. Every request has a timeout.

urllib3 is the one HTTP dependency: it streams request and response bodies (nothing held in
memory), pools connections, and exposes the TLS context; requests and httpx add layers (and
dependencies) this needs none of."""

from __future__ import annotations

import glob
import ipaddress
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from ocilayers.errors import OCILayersError

if TYPE_CHECKING:
    import ssl

CERTS_D = "/etc/docker/certs.d"
MAX_REDIRECTS = 10


class HTTPError(OCILayersError):
    """A request that could not be made or answered (after its retries)."""


@dataclass(frozen=True)
class TLSOptions:
    """`verify`: check certificates (`--tls-verify=false` turns it off). `cert_dir`: a dir
    of `*.crt` CAs and `*.cert`/`*.key` client pairs used instead of
    `/etc/docker/certs.d/HOST[:PORT]/` (skopeo's `--cert-dir`). `insecure`: hosts that may
    be spoken to in plain HTTP (loopback always may)."""

    verify: bool = True
    cert_dir: str | None = None
    insecure: tuple[str, ...] = ()
    certs_d: str = CERTS_D


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def tls_context(host: str, opts: TLSOptions) -> ssl.SSLContext:
    """The system CAs plus the host's own CA files and client certificate, as dockerd reads
    `/etc/docker/certs.d/HOST/` (or `--cert-dir`)."""
    import ssl

    ctx = ssl.create_default_context()
    if not opts.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    where = opts.cert_dir if opts.cert_dir is not None else os.path.join(opts.certs_d, host)
    if os.path.isdir(where):
        for ca in sorted(glob.glob(os.path.join(where, "*.crt"))):
            try:
                ctx.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError) as exc:
                raise HTTPError(f"{ca}: not a CA certificate: {exc}") from None
        for cert in sorted(glob.glob(os.path.join(where, "*.cert"))):
            key = cert[:-len(".cert")] + ".key"
            if not os.path.exists(key):
                raise HTTPError(f"{cert}: no matching {os.path.basename(key)}")
            ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class Response:
    """An answered request; `read()`/`stream()` the body (the connection is released when
    it is read or closed)."""

    status: int
    headers: Mapping[str, str]
    url: str
    raw: Any = field(repr=False)
    method: str = "GET"

    def read(self, limit: int | None = None) -> bytes:
        """The whole body; with `limit`, HTTPError if it is longer."""
        try:
            if limit is None:
                return bytes(self.raw.read())
            parts = []
            got = 0
            while data := self.raw.read(min(1 << 20, limit + 1 - got)):
                parts.append(data)
                got += len(data)
                if got > limit:
                    raise HTTPError(f"{self.url}: response larger than {limit} bytes")
            return b"".join(parts)
        finally:
            self.close()

    def close(self) -> None:
        """Done with the response: a connection whose body is read (or short) goes back to
        the pool; one left in the middle of a long body is closed instead."""
        raw = self.raw
        remaining = getattr(raw, "length_remaining", None)
        try:
            if self.method == "HEAD" or (remaining is not None and remaining <= 1 << 16):
                raw.drain_conn()
            elif not raw.isclosed():
                raw.close()
        except Exception:  # (a broken connection is simply not reused)
            raw.close()
        finally:
            raw.release_conn()

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value if value is None else str(value)


class HttpClient:
    """Connection pools per scheme and host, the TLS of each host, retries and redirects."""

    def __init__(self, tls: TLSOptions | None = None, *, timeout: float | None = None,
                 retries: int = 4, backoff: float = 0.25) -> None:
        self.tls = tls or TLSOptions()
        env = os.environ.get("OCILAYERS_HTTP_TIMEOUT")
        self.timeout = timeout if timeout is not None else float(env) if env else 60.0
        self.retries = retries
        self.backoff = backoff
        self._pools: dict[tuple[str, str], Any] = {}
        self._pid = os.getpid()

    # -- pools --

    def _pool(self, scheme: str, host: str) -> Any:
        import urllib3

        if os.getpid() != self._pid:  # a forked child: never share the parent's sockets
            self._pools = {}
            self._pid = os.getpid()
        key = (scheme, host)
        pool = self._pools.get(key)
        if pool is None:
            timeout = urllib3.Timeout(connect=min(self.timeout, 30.0), read=self.timeout)
            # (blocksize: request bodies go out in 1 MiB writes, not urllib3's 16 KiB)
            kw: dict[str, Any] = {"timeout": timeout, "retries": False, "maxsize": 4,
                                  "block": False, "blocksize": 1 << 20}
            if scheme == "https":
                kw["ssl_context"] = tls_context(host, self.tls)
                if not self.tls.verify:
                    kw["cert_reqs"] = "CERT_NONE"
                    kw["assert_hostname"] = False
            pool = self._pools[key] = urllib3.PoolManager(**kw)
        return pool

    def may_be_plain(self, host: str) -> bool:
        return is_loopback(host) or host in self.tls.insecure

    # -- requests --

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                body: Any = None, idempotent: bool | None = None,
                follow: bool = True, preload: bool = False) -> Response:
        """One request, redirects followed (Authorization dropped on a change of host), an
        idempotent one retried on connection errors, timeouts and 5xx answers."""
        import urllib3

        idem = method in ("GET", "HEAD") if idempotent is None else idempotent
        attempts = self.retries + 1 if idem else 1
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                resp = self._follow(method, url, headers or {}, body, follow, preload)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if isinstance(exc, HTTPError):
                    raise
                last = exc
                continue
            if idem and resp.status >= 500 and attempt + 1 < attempts:
                resp.close()
                last = HTTPError(f"HTTP {resp.status}")
                continue
            return resp
        raise HTTPError(f"{method} {_shown(url)}: {_reason(last)} (after {attempts} "
                        f"tr{'y' if attempts == 1 else 'ies'})")

    def _follow(self, method: str, url: str, headers: Mapping[str, str], body: Any,
                follow: bool, preload: bool) -> Response:
        hdrs = dict(headers)
        seen: list[str] = []
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            raw = self._pool(parts.scheme, parts.netloc).request(
                method, url, headers=hdrs, body=body, redirect=False,
                preload_content=preload, decode_content=False)
            status = raw.status
            if not follow or status not in (301, 302, 303, 307, 308):
                return Response(status, raw.headers, url, raw, method)
            location = raw.headers.get("Location")
            raw.drain_conn()
            raw.release_conn()
            if not location:
                raise HTTPError(f"{_shown(url)}: redirect without a Location")
            nxt = urljoin(url, location)
            if urlsplit(nxt).scheme not in ("http", "https"):
                raise HTTPError(f"{_shown(url)}: redirect to a {urlsplit(nxt).scheme or 'bare'} "
                                "URL refused")
            if nxt in seen:
                raise HTTPError(f"{_shown(url)}: redirect loop")
            seen.append(nxt)
            if urlsplit(nxt).netloc != parts.netloc or urlsplit(nxt).scheme != parts.scheme:
                # (object storage: a signed URL carries its own authorization)
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            if status == 303:
                method, body = "GET", None
            url = nxt
        raise HTTPError(f"{_shown(url)}: more than {MAX_REDIRECTS} redirects (a redirect loop)")

    def close(self) -> None:
        for pool in self._pools.values():
            pool.clear()
        self._pools = {}


def _shown(url: str) -> str:
    """A URL without its query (signed URLs carry credentials there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "failed"
    inner = getattr(exc, "reason", None)
    text = str(inner or exc)
    return text.split(": ", 1)[-1] if "Max retries" in text else text


def join_query(url: str, params: Iterable[tuple[str, str]]) -> str:
    from urllib.parse import urlencode

    q = urlencode(list(params))
    if not q:
        return url
    return url + ("&" if "?" in url else "?") + q
