"""The `registry` group's helpers: a plain-HTTP docker-registry (Debian's, distribution 2.8) on
127.0.0.1, started by the harness and stopped by its pid (the start logic of
`tests/registry_servers.py`, without pytest), skopeo's isolated environment, and what the
harness checks of a registry after a push (the blobs in its storage, the uploads in its access
log).

dockerd treats 127.0.0.0/8 as an insecure registry (plain HTTP allowed), ocilayers uses plain
HTTP for loopback hosts that do not speak TLS, skopeo is told `--src-tls-verify=false` /
`--dest-tls-verify=false`: no TLS anywhere, so every tool pays the same transport."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DOCKER_REGISTRY = "docker-registry"


def available() -> str:
    """'' when a registry can be started here, else why not."""
    if shutil.which(DOCKER_REGISTRY) is None:
        return "docker-registry is not installed (Debian package docker-registry)"
    return ""


def tool_env(base: str) -> dict[str, str]:
    """An environment whose $HOME and XDG dirs are under `base`, without REGISTRY_* (the
    registry reads those as config overrides)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    for name, sub in (("HOME", "home"), ("XDG_RUNTIME_DIR", "xdg-run"),
                      ("XDG_CONFIG_HOME", "xdg-config"), ("XDG_DATA_HOME", "xdg-data")):
        path = os.path.join(base, sub)
        os.makedirs(path, mode=0o700, exist_ok=True)
        env[name] = path
    return env


def skopeo_env(base: str) -> dict[str, str]:
    """skopeo touching nothing outside `base`: $HOME, XDG dirs, an empty auth file. As root,
    skopeo keeps its blob-info cache in /var/lib/containers/cache/blob-info-cache-v1.boltdb,
    shared by every run: it would remember where each blob was pushed and try cross-repository
    mounts instead of uploads. `_CONTAINERS_ROOTLESS_UID` makes it use $XDG_DATA_HOME instead,
    and the harness gives every run a new `base`."""
    env = tool_env(base)
    auth = os.path.join(base, "auth.json")
    if not os.path.exists(auth):
        with open(auth, "w") as f:
            f.write('{"auths":{}}')
    env["REGISTRY_AUTH_FILE"] = auth
    env["_CONTAINERS_ROOTLESS_UID"] = "65534"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _probe(host: str) -> int | None:
    """The status of GET /v2/, or None if nothing answers yet."""
    hostname, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(hostname, int(port), timeout=2)
    try:
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# An access-log line (Apache combined format, on the registry's stdout).
_ACCESS_RE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-) ')


@dataclass
class Registry:
    """A running docker-registry: plain HTTP on `host` ("127.0.0.1:PORT"), no auth, storage
    under `base/storage`, access log and logrus output in `base/registry.log`."""

    base: str
    host: str
    proc: subprocess.Popen[bytes]

    @property
    def storage(self) -> str:
        return os.path.join(self.base, "storage")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "registry.log")

    def cpu_seconds(self) -> float:
        """utime+stime of the registry process so far (0 once it has exited)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after STOP_TIMEOUT, reap. Deletes nothing."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)

    def blobs(self) -> dict[str, int]:
        """Every blob in the storage: digest -> size."""
        top = os.path.join(self.storage, "docker", "registry", "v2", "blobs")
        out: dict[str, int] = {}
        for algo in (os.listdir(top) if os.path.isdir(top) else []):
            for prefix in os.listdir(os.path.join(top, algo)):
                for hexpart in os.listdir(os.path.join(top, algo, prefix)):
                    data = os.path.join(top, algo, prefix, hexpart, "data")
                    if os.path.exists(data):
                        out[f"{algo}:{hexpart}"] = os.path.getsize(data)
        return out

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every access-log entry so far."""
        out = []
        with open(self.log_path, "rb") as f:
            for line in f.read().decode(errors="replace").splitlines():
                m = _ACCESS_RE.match(line)
                if m:
                    out.append((m.group(1), m.group(2), int(m.group(3))))
        return out

    def upload_summary(self) -> dict[str, Any]:
        """What the access log says the pushes did: blob uploads finished (PUT .../uploads/
        answered 201), cross-repository mounts (POST ?mount= answered 201), HEADs that found a
        blob not uploaded or mounted before them in this log (already there: with a fresh
        registry, never), manifest PUTs; and the blobs the storage holds (manifests too)."""
        reqs = self.requests()
        blobs = self.blobs()
        done: set[str] = set()
        out = {"uploads": 0, "mounts": 0, "heads_present": 0, "manifest_puts": 0}
        for method, path, status in reqs:
            route, _, query = path.partition("?")
            digest = next((v for k, _, v in (x.partition("=") for x in query.split("&"))
                           if k in ("digest", "mount")), "")
            if method == "PUT" and "/blobs/uploads/" in route and status == 201:
                out["uploads"] += 1
                done.add(digest.replace("%3A", ":").replace("%3a", ":"))
            elif method == "POST" and "mount=" in query and status == 201:
                out["mounts"] += 1
                done.add(digest.replace("%3A", ":").replace("%3a", ":"))
            elif (method == "HEAD" and "/blobs/" in route and status == 200
                  and route.rsplit("/", 1)[1] not in done):
                out["heads_present"] += 1
            elif method == "PUT" and "/manifests/" in route and status == 201:
                out["manifest_puts"] += 1
        return {**out, "blobs_stored": len(blobs), "blob_bytes": sum(blobs.values())}


def start_registry(base: str) -> Registry:
    """docker-registry on a free port of 127.0.0.1 with its config, storage and log under
    `base` (made here); returns once it answers GET /v2/. Stop it with `.stop()`."""
    exe = shutil.which(DOCKER_REGISTRY)
    if exe is None:
        raise RuntimeError(available())
    os.makedirs(os.path.join(base, "storage"), exist_ok=True)
    env = tool_env(os.path.join(base, "env"))
    log_path = os.path.join(base, "registry.log")
    last_error = ""
    for _attempt in range(5):
        host = f"127.0.0.1:{free_port()}"
        config: dict[str, Any] = {
            "version": "0.1",
            # the access log (stdout) is what upload_summary reads; logrus only for warnings
            "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": os.path.join(base, "storage")},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": host, "secret": secrets.token_hex(16),
                     "headers": {"X-Content-Type-Options": ["nosniff"]}},
        }
        config_path = os.path.join(base, "config.yml")
        with open(config_path, "w") as f:
            json.dump(config, f, indent=1)  # JSON is YAML
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([exe, "serve", config_path], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base)
        reg = Registry(base, host, proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _probe(host) is not None:
                return reg
            time.sleep(0.05)
        reg.stop()
        with open(log_path, errors="replace") as f:
            last_error = f.read()[-2000:]
        if "address already in use" not in last_error:
            break
    raise RuntimeError(f"docker-registry did not start; its log ends:\n{last_error}")
