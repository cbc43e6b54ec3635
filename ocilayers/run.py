"""The run workflow: one build step in a container through an OCI runtime (runc, crun):
mount the container, write the bundle, run it with stdio passed through, forward Ctrl-C and
SIGTERM (SIGKILL 10 s later, as `docker stop`), and hand back the step's exit code."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import replace

from ocilayers.bundle import RunOptions, rootless_spec, runtime_spec
from ocilayers.errors import RunError
from ocilayers.fsutil import rmtree, write_atomic
from ocilayers.lifecycle import mount_container, umount_container
from ocilayers.store import Store
from ocilayers.store.containers import Container, RunHold
from ocilayers.userns import is_rootless, read_map

GRACE_SECONDS = 10  # docker stop's default before SIGKILL


def find_runtime(name: str | None) -> str:
    """`name` (a name on PATH or a path), else $OCILAYERS_RUNTIME, else runc or crun."""
    for candidate in ([name] if name else
                      [os.environ.get("OCILAYERS_RUNTIME") or None, "runc", "crun"]):
        if not candidate:
            continue
        path = shutil.which(candidate)
        if path:
            return path
        if name or os.environ.get("OCILAYERS_RUNTIME"):
            raise RunError(f"OCI runtime {candidate!r} not found (not on PATH, not a program)")
    raise RunError("no OCI runtime: install runc (Debian: apt-get install runc) or crun, or "
                   "give --runtime")


def etc_files(store: Store, c: Container, network: str) -> dict[str, str]:
    """The container's own /etc/hosts, /etc/hostname and /etc/resolv.conf, kept beside its
    records and bind-mounted over the init layer's, as dockerd does: a step's writes to them
    never reach the rw layer, so never a commit."""
    base = os.path.dirname(store.containers.run_file(c))
    hostname = c.id[:12]
    hosts = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
             f"127.0.1.1\t{hostname}\n")
    resolv = ""
    if network == "host":
        with contextlib.suppress(OSError), open("/etc/resolv.conf") as f:
            resolv = f.read()
    out = {}
    for name, text in (("hosts", hosts), ("hostname", hostname + "\n"),
                       ("resolv.conf", resolv)):
        path = os.path.join(base, name)
        write_atomic(path, text.encode(), 0o644)
        out[f"/etc/{name}"] = path
    return out


def write_bundle(store: Store, c: Container, bundle: str, rootfs: str,
                 opts: RunOptions) -> dict[str, object]:
    """Write `bundle/config.json` for a step in `c`, whose rootfs is mounted at `rootfs`."""
    config = json.loads(store.containers.base_config(c))
    opts = replace(opts, etc_files={**etc_files(store, c, opts.network), **opts.etc_files})
    spec = runtime_spec(config, c.id, rootfs, opts)
    if store.layout.overlay_format().rootless and is_rootless():
        spec = rootless_spec(spec, *_own_ids(), network_namespace=opts.network == "none")
    os.makedirs(bundle, exist_ok=True)
    write_atomic(os.path.join(bundle, "config.json"),
                 json.dumps(spec, indent=2).encode(), 0o600)
    return spec


def _own_ids() -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """The IDs this user namespace has, each mapped to itself in the step's namespace."""
    return ([(m.inside, m.inside, m.count) for m in read_map("uid")],
            [(m.inside, m.inside, m.count) for m in read_map("gid")])


def find_init() -> str:
    """A static tini first: it runs as PID 1 in any image, as Docker's docker-init (Debian's
    /usr/bin/tini is linked against the host's libc, which an image may not have)."""
    path = (shutil.which("tini-static") or shutil.which("docker-init")
            or shutil.which("tini"))
    if path is None:
        raise RunError("--init needs tini (Debian: apt-get install tini)")
    return path


def run_step(store: Store, c: Container, opts: RunOptions, *, runtime: str | None = None,
             init: bool = False) -> int:
    """Run one step in the container; returns its exit code (128+N when killed by signal N)."""
    if os.geteuid() != 0:
        raise RunError("a rootless run needs the user namespace the CLI makes (run it with "
                       "`ocilayers run`, or call userns.enter first)")
    runtime_path = find_runtime(runtime)
    if init:
        opts = replace(opts, init=find_init())
    work = os.path.join(store.root, "ocilayers", "run")
    state = os.path.join(work, "state")
    run_id = f"ocilayers-{c.id[:12]}-{os.getpid()}"
    bundle = os.path.join(work, run_id)
    os.makedirs(state, mode=0o700, exist_ok=True)
    with RunHold(store.containers.run_file(c)):
        c = store.containers.get(c.id) or c  # as it is now: a run may have ended meanwhile
        rootfs = mount_container(store, c)
        try:
            spec = write_bundle(store, c, bundle, rootfs, opts)
            args = spec["process"]["args"]  # type: ignore[index]
            store.containers.add_run(c, list(opts.command) or list(args))
            return _run(runtime_path, state, bundle, run_id)
        finally:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([runtime_path, "--root", state, "delete", "--force", run_id],
                               capture_output=True, timeout=30, check=False)
            with contextlib.suppress(FileNotFoundError):
                rmtree(bundle)
            umount_container(store, c, held_by_us=True)  # this step's use of the mount


def _run(runtime: str, state: str, bundle: str, run_id: str) -> int:
    proc = subprocess.Popen([runtime, "--root", state, "run", "--bundle", bundle, run_id],
                            stdin=None, stdout=None, stderr=None)
    deadline: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        # runc run forwards what it receives to the step's PID 1
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
        if not deadline:
            import time

            deadline.append(time.monotonic() + GRACE_SECONDS)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return _exit_code(proc.wait(timeout=0.2))
            except subprocess.TimeoutExpired:
                import time

                if deadline and time.monotonic() > deadline[0]:
                    subprocess.run([runtime, "--root", state, "kill", run_id, "KILL"],
                                   capture_output=True, timeout=30, check=False)
                    deadline[0] = float("inf")
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def bundle_for(store: Store, c: Container, directory: str, opts: RunOptions) -> str:
    """`ocilayers bundle`: mount the container and write a bundle for any OCI runtime into
    `directory` (root.path: the mounted container). Returns the directory."""
    rootfs = mount_container(store, c)
    try:
        write_bundle(store, c, directory, rootfs, opts)
    except BaseException:
        umount_container(store, c, held_by_us=True)  # no bundle: drop this use of the mount
        raise
    return directory


def parse_env(items: Sequence[str]) -> list[str]:
    """`-e K=V` (or `-e K`: the caller's value of K, as docker run takes it)."""
    out = []
    for item in items:
        if "=" in item:
            out.append(item)
        elif item in os.environ:
            out.append(f"{item}={os.environ[item]}")
    return out
