"""The default store root as root (/var/lib/ocilayers), used for real but never on the machine.

The README's set-up command 1 unpacks the demo image into the default store (no --root, no
$OCILAYERS_ROOT). This runs it as written, as root, inside a private mount namespace
(`unshare --mount --propagation private`) with a fresh tmpfs mounted over /var/lib, and then the
CLI cases whose output depends on a store being there. Nothing reaches the real /var/lib: the
driver checks that /var/lib is the new, empty tmpfs before it runs anything, and the tmpfs goes
away with the namespace.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ERROR_PREFIX, FIXTURES, assert_one_line_error

REPO = FIXTURES.parent
DEFAULT_ROOT = Path("/var/lib/ocilayers")
MISSING = "nope"
STORE_MISS = f"{MISSING}: no such file, directory or image in the store"

# Run inside the namespace as `python -c DRIVER REPO SCRATCH ARGV_JSON`: mounts the tmpfs,
# refuses to go on unless /var/lib is now that new empty tmpfs, runs the commands and prints
# one JSON object with every result.
DRIVER = r"""
import json, os, subprocess, sys

repo, scratch, unpack_argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
dev_before = os.stat("/var/lib").st_dev
mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "ocilayers-test", "/var/lib"],
                       capture_output=True, text=True)
result = {"mount_rc": mount.returncode, "mount_stderr": mount.stderr,
          "fresh_tmpfs": (mount.returncode == 0 and os.stat("/var/lib").st_dev != dev_before
                          and os.listdir("/var/lib") == []),
          "env_root": os.environ.get("OCILAYERS_ROOT"), "steps": {}}
if not result["fresh_tmpfs"] or result["env_root"] is not None:
    print(json.dumps(result))
    sys.exit(3)  # never run anything that could write to the real /var/lib

def run(name, argv, cwd):
    proc = subprocess.run([sys.executable, "-m", "ocilayers", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=240)
    result["steps"][name] = {"argv": argv, "rc": proc.returncode, "stdout": proc.stdout,
                             "stderr": proc.stderr}

run("unpack", unpack_argv, repo)
result["default_store"] = os.path.isdir("/var/lib/ocilayers/image/overlay2/layerdb")
result["var_lib"] = sorted(os.listdir("/var/lib"))
# From an empty dir, so `nope` is neither a file nor a directory: only the store can match.
run("inspect", ["inspect", "nope"], scratch)
run("inspect-debug", ["--debug", "inspect", "nope"], scratch)
run("images", ["images"], scratch)
print(json.dumps(result))
"""


def readme_unpack_argv() -> list[str]:
    """The `ocilayers ...` arguments of the README's set-up command 1 (`pip install . && ...`)."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^# 1\..*\n(.*)$", text, re.MULTILINE)
    assert match, "README: no set-up command 1"
    command = match.group(1).split("&&")[-1]
    argv = shlex.split(command)
    assert argv[:2] == ["ocilayers", "unpack"], command
    return argv[1:]


def private_tmpfs_unavailable(unshare: str) -> str | None:
    """Why a tmpfs cannot be mounted on /var/lib in a private mount namespace (tried for real,
    in a namespace that ends with the probe), or None when it can."""
    try:
        proc = subprocess.run([unshare, "--mount", "--propagation", "private",
                               "mount", "-t", "tmpfs", "ocilayers-probe", "/var/lib"],
                              capture_output=True, text=True, timeout=60)
    except OSError as exc:
        return f"cannot run unshare: {exc}"
    if proc.returncode != 0:
        return ("cannot mount a tmpfs on /var/lib in a private mount namespace "
                f"(unshare --mount failed with {proc.returncode}: {proc.stderr.strip()})")
    return None


def store_fingerprint(root: Path) -> Any:
    """What a run that touched the store at `root` would change (None: nothing there)."""
    if not os.path.lexists(root):
        return None
    out: list[Any] = []
    for rel in ("", "overlay2", "image/overlay2/layerdb/sha256",
                "image/overlay2/imagedb/content/sha256"):
        try:
            out.append((rel, sorted(os.listdir(root / rel))))
        except OSError as exc:
            out.append((rel, type(exc).__name__))
    repositories = root / "image/overlay2/repositories.json"
    out.append(repositories.read_bytes() if repositories.is_file() else None)
    return out


def test_readme_unpack_into_the_default_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the default root is /var/lib/ocilayers only as root (run the tests as root)")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed (not on PATH)")
    reason = private_tmpfs_unavailable(unshare)
    if reason is not None:
        pytest.skip(reason)
    unpack_argv = readme_unpack_argv()
    assert unpack_argv == ["unpack", "fixtures/demo", "--tag", "demo:latest"]
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    assert not str(scratch.resolve()).startswith("/var/lib/"), "tmp_path is hidden by the tmpfs"
    env = {k: v for k, v in os.environ.items() if k != "OCILAYERS_ROOT"}  # the default root
    before = store_fingerprint(DEFAULT_ROOT)

    proc = subprocess.run([unshare, "--mount", "--propagation", "private", sys.executable, "-c",
                           DRIVER, str(REPO), str(scratch), json.dumps(unpack_argv)],
                          capture_output=True, text=True, env=env, timeout=900)

    assert store_fingerprint(DEFAULT_ROOT) == before, "the real /var/lib/ocilayers was touched"
    if before is None:
        assert not os.path.lexists(DEFAULT_ROOT), "the test created the real /var/lib/ocilayers"
    assert proc.returncode == 0, f"driver exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    result = json.loads(proc.stdout)
    assert result["fresh_tmpfs"] and result["env_root"] is None, result
    steps = result["steps"]

    unpack = steps["unpack"]
    assert unpack["rc"] == 0, unpack["stderr"]
    assert result["default_store"], result["var_lib"]
    assert result["var_lib"] == ["ocilayers"]
    image_id = unpack["stdout"].split()[-1]
    assert image_id.startswith("sha256:"), unpack["stdout"]

    plain = steps["inspect"]
    assert_one_line_error(plain["rc"], plain["stderr"], STORE_MISS)
    assert plain["stderr"] == f"{ERROR_PREFIX}{STORE_MISS}\n"
    assert plain["stdout"] == ""

    debug = steps["inspect-debug"]
    assert debug["rc"] == 1, debug["stderr"]
    assert debug["stdout"] == ""
    assert debug["stderr"].startswith("Traceback (most recent call last):"), debug["stderr"]
    assert debug["stderr"].splitlines()[-1] == f"{ERROR_PREFIX}{STORE_MISS}"

    images = steps["images"]
    assert images["rc"] == 0, images["stderr"]
    rows = [line.split() for line in images["stdout"].splitlines()[1:]]
    assert [row[:2] for row in rows] == [["demo:latest", image_id.removeprefix("sha256:")[:12]]], \
        images["stdout"]
