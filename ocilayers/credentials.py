"""Registry credentials where docker and podman keep them: `$DOCKER_CONFIG/config.json` (or
`~/.docker/config.json`: `auths` with base64 `auth`, `credsStore`, `credHelpers`) and
containers' `auth.json` (`$REGISTRY_AUTH_FILE`, or `$XDG_RUNTIME_DIR/containers/auth.json`).
A credential helper is run as `docker-credential-NAME get|store|erase`, the standard protocol.
`login` and `logout` write the docker file as `docker login` does (mode 0600)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any

from ocilayers.errors import OCILayersError
from ocilayers.fsutil import write_atomic

DOCKER_HUB_KEY = "https://index.docker.io/v1/"


class CredentialError(OCILayersError):
    """A credentials file or helper that cannot be read or written."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    where: str = ""  # the file or helper they came from

    @property
    def identity_token(self) -> bool:
        """docker's `<token>` username: the secret is an OAuth2 refresh token."""
        return self.username == "<token>"


def docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def auth_json_paths() -> list[str]:
    out = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(os.environ["REGISTRY_AUTH_FILE"])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(os.path.join(runtime, "containers", "auth.json"))
    return out


def _key_host(key: str) -> str:
    """`https://host:5000/v1/` -> `host:5000`; Docker Hub's key -> docker.io."""
    if key.rstrip("/") in (DOCKER_HUB_KEY.rstrip("/"), "index.docker.io", "docker.io"):
        return "docker.io"
    host = key.split("://", 1)[-1]
    return host.split("/", 1)[0]


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(16 << 20)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialError(f"{path}: {exc.strerror}") from None
    try:
        obj = json.loads(data or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CredentialError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CredentialError(f"{path}: not a JSON object")
    return obj


def _from_auths(obj: dict[str, Any], host: str, path: str) -> Credentials | None:
    auths = obj.get("auths") or {}
    if not isinstance(auths, dict):
        raise CredentialError(f"{path}: `auths` is not an object")
    for key, entry in auths.items():
        if _key_host(str(key)) != host or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):
            return Credentials("<token>", str(entry["identitytoken"]), path)
        if entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(str(entry["auth"])).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise CredentialError(f"{path}: the `auth` of {key} is not base64 of "
                                      "user:password") from None
            return Credentials(user, pw, path)
        if entry.get("username"):
            return Credentials(str(entry["username"]), str(entry.get("password", "")), path)
    return None


def _helper(name: str, action: str, payload: str) -> str:
    import subprocess

    prog = f"docker-credential-{name}"
    try:
        proc = subprocess.run([prog, action], input=payload.encode(), capture_output=True,
                              timeout=60, check=False)
    except FileNotFoundError:
        raise CredentialError(f"credential helper {prog} is not installed") from None
    except subprocess.TimeoutExpired:
        raise CredentialError(f"credential helper {prog} {action}: timed out") from None
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        msg = (out.strip() or proc.stderr.decode("utf-8", "replace").strip())
        if action == "get" and "credentials not found" in msg.lower():
            return ""
        raise CredentialError(f"credential helper {prog} {action}: {msg or 'failed'}")
    return out


def _server_url(host: str) -> str:
    return DOCKER_HUB_KEY if host == "docker.io" else host


def lookup(host: str) -> Credentials | None:
    """The credentials stored for `host` (`host:port`), or None. docker's config first
    (a credHelpers entry, then credsStore, then auths), then containers' auth.json files."""
    path = docker_config_path()
    obj = _load(path)
    if obj is not None:
        helpers = obj.get("credHelpers") or {}
        name = helpers.get(host) if isinstance(helpers, dict) else None
        name = name or obj.get("credsStore")
        if name:
            out = _helper(str(name), "get", _server_url(host))
            if out:
                try:
                    got = json.loads(out)
                    return Credentials(str(got["Username"]), str(got["Secret"]),
                                       f"docker-credential-{name}")
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CredentialError(f"docker-credential-{name} get: not the helper "
                                          "protocol's JSON") from None
        found = _from_auths(obj, host, path)
        if found is not None:
            return found
    for p in auth_json_paths():
        obj = _load(p)
        if obj is not None:
            found = _from_auths(obj, host, p)
            if found is not None:
                return found
    return None


def login(host: str, username: str, password: str) -> str:
    """Store credentials for `host` as `docker login` does (the credsStore or credHelper
    when one is set, else base64 in `auths`); returns where they went."""
    path = docker_config_path()
    obj = _load(path) or {}
    helpers = obj.get("credHelpers") or {}
    name = (helpers.get(host) if isinstance(helpers, dict) else None) or obj.get("credsStore")
    if name:
        _helper(str(name), "store", json.dumps({"ServerURL": _server_url(host),
                                                "Username": username, "Secret": password}))
        return f"docker-credential-{name}"
    auths = obj.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise CredentialError(f"{path}: `auths` is not an object")
    for key in [k for k in auths if _key_host(str(k)) == host]:
        del auths[key]
    auths[_server_url(host)] = {
        "auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_atomic(path, (json.dumps(obj, indent="\t") + "\n").encode(), 0o600)
    return path


def logout(host: str) -> bool:
    """Remove the credentials of `host`; False when there were none."""
    path = docker_config_path()
    obj = _load(path)
    if obj is None:
        return False
    helpers = obj.get("credHelpers") or {}
    name = (helpers.get(host) if isinstance(helpers, dict) else None) or obj.get("credsStore")
    removed = False
    if name:
        _helper(str(name), "erase", _server_url(host))
        removed = True
    auths = obj.get("auths")
    if isinstance(auths, dict):
        for key in [k for k in auths if _key_host(str(k)) == host]:
            del auths[key]
            removed = True
        if removed:
            write_atomic(path, (json.dumps(obj, indent="\t") + "\n").encode(), 0o600)
    return removed
