"""`unpack --jobs N` where there is no /dev/shm (issue 13): a minimal chroot or build sandbox.

multiprocessing's locks, queues and shared arrays need POSIX semaphores or a file in /dev/shm;
the layer workers must not. The real case runs the CLI in a private mount namespace whose /dev
is a fresh tmpfs without shm (root only); the in-process case fakes the same failures, so it
runs everywhere. Plus the worker plumbing that only shows on failure: a worker killed under
us, an error that does not survive pickling, and progress read from the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Layout, assert_one_line_error, requires_tool
from test_store import (
    DOCKER_SAVE,
    Capsys,
    assert_same_stores,
    check_store,
    image_ids,
    ol,
    read_layers,
    read_source,
    unpack,
    verify_ok,
)

import ocilayers.unpack as unpack_mod
from ocilayers import api

# Run "$@" with a fresh tmpfs (at $1, inside the namespace only) bound over /dev, holding only
# the few nodes and links a program expects: /dev/shm is then ENOENT, as in the bug report.
# `unshare --mount --propagation private` keeps every mount made here out of the host's view.
ENTER_NO_SHM = r"""
set -eu
new="$1"; shift
mount -t tmpfs -o mode=755 ocilayers-noshm "$new"
for n in null zero full random urandom tty; do
    [ -e "/dev/$n" ] || continue
    : > "$new/$n"
    mount --bind "/dev/$n" "$new/$n"
done
ln -s /proc/self/fd "$new/fd"
ln -s /proc/self/fd/0 "$new/stdin"
ln -s /proc/self/fd/1 "$new/stdout"
ln -s /proc/self/fd/2 "$new/stderr"
mount --bind "$new" /dev
if [ -e /dev/shm ]; then echo "noshm-setup: /dev/shm is still there" >&2; exit 97; fi
exec "$@"
"""

# What the namespace must show: no /dev/shm, and so no multiprocessing lock.
PROBE = r"""
import multiprocessing, os
assert not os.path.exists("/dev/shm"), "/dev/shm exists"
try:
    multiprocessing.get_context("fork").Lock()
except OSError as exc:
    print("no-semaphores", exc.errno)
else:
    print("semaphores-work")
"""


@pytest.fixture
def no_shm(tmp_path: Path) -> list[str]:
    """The argv prefix that runs a command where /dev/shm is absent (skips if that cannot be
    made here: not root, no unshare/mount, or mount namespaces refused)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a mount namespace with a tmpfs over /dev")
    unshare = requires_tool("unshare")
    requires_tool("mount")
    newdev = tmp_path / "newdev"
    newdev.mkdir()
    prefix = [unshare, "--mount", "--propagation", "private", "sh", "-c", ENTER_NO_SHM,
              "enter-no-shm", str(newdev)]
    probe = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True,
                           text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot hide /dev/shm in a mount namespace here "
                    f"(rc {probe.returncode}): {probe.stderr.strip()[-300:]}")
    # the bug's condition: multiprocessing cannot make a semaphore in there
    assert probe.stdout.startswith("no-semaphores"), probe.stdout
    return prefix


def staging_dirs(root: Path) -> list[str]:
    overlay = root / "overlay2"
    return sorted(n for n in os.listdir(overlay) if n.startswith(".staging-")) \
        if overlay.is_dir() else []


def run_no_shm(prefix: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "ocilayers", *argv],
                          capture_output=True, text=True, timeout=120)


def test_unpack_jobs_without_dev_shm(tmp_path: Path, capsys: Capsys, no_shm: list[str]) -> None:
    """Issue 13: a multi-layer image with --jobs 2 failed with
    `ocilayers: error: /dev/shm: No such file or directory`."""
    root = tmp_path / "store"
    src = read_source(DOCKER_SAVE)
    assert len(src.diff_ids) >= 3
    proc = run_no_shm(no_shm, "--root", str(root), "unpack", str(DOCKER_SAVE), "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == src.image_id + "\n"
    assert "error" not in proc.stderr, proc.stderr
    verify = run_no_shm(no_shm, "--root", str(root), "verify")
    assert (verify.returncode, verify.stdout) == (0, "ok\n"), verify.stderr
    check_store(root, images={src.image_id: src.config},
                tags={"committed:latest": src.image_id})
    verify_ok(capsys, root)
    # the same store as the one-process build outside the sandbox
    ref = tmp_path / "ref"
    unpack(capsys, ref, DOCKER_SAVE, "--jobs", "1")
    assert_same_stores(root, ref)


def test_bad_blob_without_dev_shm_fails_in_one_line(tmp_path: Path, no_shm: list[str]) -> None:
    layout = Layout.copy_of("demo", tmp_path / "demo")
    desc = layout.manifest()["layers"][2]
    blob = bytearray(layout.read_blob(desc["digest"]))
    blob[len(blob) // 2] ^= 0xFF
    layout.blob_path(desc["digest"]).write_bytes(bytes(blob))
    root = tmp_path / "store"
    proc = run_no_shm(no_shm, "--root", str(root), "unpack", str(layout.root), "--jobs", "4")
    assert_one_line_error(proc.returncode, proc.stderr, "unpack layer " + desc["digest"][:19])
    assert "/dev/shm" not in proc.stderr
    assert staging_dirs(root) == [] and image_ids(root) == set()


# ============================================================================================
# In-process: the same failures faked (any user)
# ============================================================================================

@pytest.fixture
def fake_no_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    """What multiprocessing meets without /dev/shm: statvfs("/dev/shm") (its shared-memory
    arenas) and sem_open (every lock, queue and semaphore) fail with ENOENT."""
    import _multiprocessing
    import errno

    real_statvfs = os.statvfs

    def statvfs(path: Any) -> os.statvfs_result:
        if os.fsdecode(path).startswith("/dev/shm"):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return real_statvfs(path)

    def sem_open(*_args: Any, **_kw: Any) -> Any:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))

    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(_multiprocessing, "SemLock", sem_open)


@pytest.mark.usefixtures("fake_no_shm")
def test_workers_need_no_semaphores(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    src = read_source(DOCKER_SAVE)
    result = unpack(capsys, root, DOCKER_SAVE, "--jobs", "2")
    assert result["image_id"] == src.image_id
    assert [x["reused"] for x in result["layers"]] == [False] * len(src.diff_ids)
    check_store(root, images={src.image_id: src.config},
                tags={"committed:latest": src.image_id})
    verify_ok(capsys, root)


def test_progress_comes_from_the_workers(tmp_path: Path) -> None:
    """Every built layer's progress reaches its blob size, reported in the parent."""
    src = read_source(DOCKER_SAVE)
    seen: dict[int, tuple[int, int]] = {}
    pids: set[int] = set()

    def progress(i: int, done: int, total: int) -> None:
        pids.add(os.getpid())
        seen[i] = (done, total)

    api.unpack(str(DOCKER_SAVE), root=str(tmp_path / "store"), jobs=2, progress=progress)
    assert pids == {os.getpid()}
    assert sorted(seen) == list(range(len(src.diff_ids)))
    assert all(done == total > 0 for done, total in seen.values()), seen


def _patch_build(monkeypatch: pytest.MonkeyPatch, fail: Any) -> str:
    """Make the worker for DOCKER_SAVE's second layer call `fail()` instead of building;
    returns that layer's DiffID (for an uncompressed layer.tar, also its digest)."""
    real = unpack_mod.build_layer
    parent = os.getpid()
    src = read_source(DOCKER_SAVE)
    assert len(src.diff_ids) >= 3
    target = src.diff_ids[1]

    def build_layer(source: Any, layer: Any, staging: Any, progress: Any = None,
                    **kw: Any) -> Any:
        if os.getpid() != parent and str(layer.diff_id) == target:
            fail()
        return real(source, layer, staging, progress, **kw)

    monkeypatch.setattr(unpack_mod, "build_layer", build_layer)
    return target


def test_worker_killed_fails_in_one_line(tmp_path: Path, capsys: Capsys,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    diff_id = _patch_build(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGKILL))
    root = tmp_path / "store"
    code, out, err = ol(capsys, root, "unpack", str(DOCKER_SAVE), "--jobs", "2")
    line = assert_one_line_error(code, err, "worker process was killed by SIGKILL")
    assert f"unpack layer {diff_id[:19]}: " in line
    assert out == "" and staging_dirs(root) == [] and image_ids(root) == set()
    assert read_layers(root).keys() <= set(read_source(DOCKER_SAVE).chain_ids)


class _TwoArgError(Exception):
    """Pickles, but does not unpickle (its args are not its __init__'s)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}+{b}")


def test_unpicklable_worker_error_fails_in_one_line(tmp_path: Path, capsys: Capsys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        exc = _TwoArgError("odd", "error")
        exc.add_note("a note")
        raise exc

    _patch_build(monkeypatch, fail)
    root = tmp_path / "store"
    code, _out, err = ol(capsys, root, "unpack", str(DOCKER_SAVE), "--jobs", "2")
    assert_one_line_error(code, err, "a note: _TwoArgError: odd+error")
    assert "internal error" not in err
    assert staging_dirs(root) == [] and image_ids(root) == set()

