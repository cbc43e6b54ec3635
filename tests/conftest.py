"""Shared test helpers: fixture paths, running the CLI, probing for tools, editing layouts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from registry_servers import (  # noqa: F401  (registry fixtures for every test module)
    hostile_registry,
    plain_registry,
    tls_registry,
    token_registry,
)

from ocilayers.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
"""The committed test images (see fixtures/README.md for how each was made)."""

ERROR_PREFIX = "ocilayers: error: "

# Every committed image, and how skopeo names it (its transports are the oracle's view).
FIXTURE_TRANSPORTS: dict[str, str] = {
    "demo": "oci:{path}:latest",
    "tiny": "oci:{path}:latest",
    "tiny-oci.tar": "oci-archive:{path}",
    "tiny-zstd": "oci:{path}:latest",
    "tiny-uncompressed": "oci:{path}:latest",
    "tiny-docker.tar": "docker-archive:{path}",
    "docker-save.tar": "docker-archive:{path}",
    "umoci-insert-opaque": "oci:{path}:latest",
}
"""fixture name -> skopeo transport template; `{path}` is filled with the fixture's path."""

FIXTURE_NON_IMAGES = frozenset({"README.md", "make-fixtures.sh"})

ENV_CLEARED = ("SOURCE_DATE_EPOCH",)
"""Variables the product reads that a test must not inherit from the machine (a test that needs
one sets it itself)."""


def _isolate_env(mp: pytest.MonkeyPatch, base: Path) -> None:
    """Point the store root, $HOME and $XDG_DATA_HOME into `base` (a fresh temp dir), so nothing
    the product or a tool run by a test does reaches /var/lib/ocilayers (the default root as
    root), the real home or the machine's data dir. The root itself is left absent: no store
    there, as on a fresh machine. Subprocesses (run_module) inherit all of it."""
    home = base / "home"
    data = base / "xdg-data"
    home.mkdir()
    data.mkdir()
    mp.setenv("OCILAYERS_ROOT", str(base / "ocilayers-root"))
    mp.setenv("HOME", str(home))
    mp.setenv("XDG_DATA_HOME", str(data))
    for name in ENV_CLEARED:
        mp.delenv(name, raising=False)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same isolation for the whole session, so module- and session-scoped fixtures (set
    up before any test's own fixtures) do not see the machine's state either."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate_env(mp, tmp_path_factory.mktemp("session-env"))
        yield


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with its own fresh store root, $HOME and $XDG_DATA_HOME (outside its
    tmp_path, which stays empty). A test that sets one of them itself wins: monkeypatch.setenv
    or delenv in its body or in its own function-scoped fixtures, or its own env= for a
    subprocess."""
    _isolate_env(monkeypatch, tmp_path_factory.mktemp("env"))


def fixture_params() -> list[Any]:
    """`pytest.param(name, id=name)` for every image in FIXTURE_TRANSPORTS."""
    return [pytest.param(name, id=name) for name in FIXTURE_TRANSPORTS]


def skopeo_transport(fixture: str, path: Path | str | None = None) -> str:
    """The skopeo transport for `fixture`, at its committed path or at `path` (a copy)."""
    return FIXTURE_TRANSPORTS[fixture].format(path=path or FIXTURES / fixture)


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `ocilayers ARGV` in-process; return (exit code, stdout, stderr).

    argparse exits (`--version`, `--help`, usage errors) are turned into their exit code.
    Any other exception propagates, so an uncaught product error fails the test with its traceback.
    """
    capsys.readouterr()  # drop anything captured before this call
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_module(argv: Sequence[str], *, stdin: Any = None,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `python -m ocilayers ARGV` as a subprocess (text output, never raises on exit code)."""
    return subprocess.run([sys.executable, "-m", "ocilayers", *argv], stdin=stdin,
                          capture_output=True, text=True, check=check, timeout=120)


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Check the CLI failed the plain way: exit 1, one `ocilayers: error: ` line, no traceback.

    Every `needle` must occur in the message. Returns the message line.
    """
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"want one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert code == 1, (code, err)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def requires_tool(name: str) -> str:
    """Skip the calling test unless the external tool `name` is on PATH; return its path.

    CI installs every tool the suite uses, so there these tests always run.
    """
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (not on PATH)")
    return path


def skopeo(*args: str) -> subprocess.CompletedProcess[bytes]:
    """`skopeo --insecure-policy ARGS` (needs no policy.json); raises with stderr on failure."""
    exe = requires_tool("skopeo")
    proc = subprocess.run([exe, "--insecure-policy", *args], capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed ({proc.returncode}):\n"
                             + proc.stderr.decode(errors="replace"))
    return proc


class ConfigIds:
    """What a test image's config bytes (`config`) name: its image ID, DiffIDs and ChainIDs
    (base first), worked out by the spec, not by the product."""

    config: bytes

    @property
    def image_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()

    @property
    def diff_ids(self) -> list[str]:
        return list(json.loads(self.config)["rootfs"]["diff_ids"])

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids_by_spec(self.diff_ids)


def chain_ids_by_spec(diff_ids: Sequence[str]) -> list[str]:
    """ChainIDs per image-spec config.md, written out independently of the product.

    ChainID(L0) = DiffID(L0);
    ChainID(Ln) = "sha256:" + sha256 of the ASCII string "ChainID(Ln-1) DiffID(Ln)".
    """
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def tree_files(root: Path) -> dict[str, bytes]:
    """Every regular file under `root`, keyed by its relative POSIX path (for byte comparisons)."""
    out: dict[str, bytes] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


class Layout:
    """A writable OCI image layout (usually a tmp copy of a fixture) with blob-level editing."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def copy_of(cls, fixture: str, dest: Path) -> Layout:
        """Copy `fixtures/<fixture>` to `dest` (made writable) and wrap it."""
        shutil.copytree(FIXTURES / fixture, dest)
        for dirpath, _dirnames, filenames in os.walk(dest):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        return cls(dest)

    def blob_path(self, digest: str) -> Path:
        algorithm, hex_ = digest.split(":", 1)
        return self.root / "blobs" / algorithm / hex_

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def read_json_blob(self, digest: str) -> Any:
        return json.loads(self.read_blob(digest))

    def put_blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        """Store `data` under its sha256 and return a descriptor for it."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob_path(digest).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def put_json_blob(self, obj: Any, media_type: str) -> dict[str, Any]:
        return self.put_blob(json.dumps(obj).encode(), media_type)

    @property
    def index(self) -> dict[str, Any]:
        index: dict[str, Any] = json.loads((self.root / "index.json").read_text())
        return index

    def write_index(self, index: dict[str, Any]) -> None:
        (self.root / "index.json").write_text(json.dumps(index))

    def manifest_descriptor(self) -> dict[str, Any]:
        """The first (for fixtures: only) entry of index.json."""
        return dict(self.index["manifests"][0])

    def manifest(self) -> dict[str, Any]:
        manifest: dict[str, Any] = self.read_json_blob(self.manifest_descriptor()["digest"])
        return manifest

    def replace_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Store an edited manifest and repoint index.json's first entry at it (digest, size)."""
        index = self.index
        old = index["manifests"][0]
        new = self.put_json_blob(manifest, old.get("mediaType")
                                 or "application/vnd.oci.image.manifest.v1+json")
        index["manifests"][0] = {**old, "digest": new["digest"], "size": new["size"]}
        self.write_index(index)
        entry: dict[str, Any] = index["manifests"][0]
        return entry


# --- overlay mounts ---

_MOUNT_PROBE: list[str | None] = []


def _probe_overlay(base: Path) -> str | None:
    """None if a read-only overlay mount works here, else why not."""
    if shutil.which("mount") is None:
        return "no mount(8)"
    for d in ("a", "b", "m"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "a" / "x").write_text("x")
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                           f"ro,lowerdir={base / 'a'}:{base / 'b'}", str(base / "m")],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"overlay mount not permitted here: {proc.stderr.strip()}"
    subprocess.run(["umount", str(base / "m")], check=False)
    return None


@pytest.fixture
def mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """Skip unless overlay mounts work; unmount every path the test appends, at teardown."""
    if not _MOUNT_PROBE:
        _MOUNT_PROBE.append(_probe_overlay(tmp_path_factory.mktemp("overlay-probe")))
    if _MOUNT_PROBE[0] is not None:
        pytest.skip(_MOUNT_PROBE[0])
    targets: list[Path] = []
    yield targets
    for t in reversed(targets):
        while os.path.ismount(t):
            if subprocess.run(["umount", str(t)], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", str(t)], capture_output=True, check=False)
                break


def mountinfo(target: Path) -> tuple[str, str, str] | None:
    """(fs type, mount options, super options) of the mount at `target`, or None."""
    want = os.path.realpath(target)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields = left.split()
            if fields[4] == want:
                fstype, _src, sopts = right.split(" ", 2)
                found = (fstype, fields[5], sopts.strip())
    return found
