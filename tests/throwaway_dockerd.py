"""A throwaway dockerd for the tests that use the real Docker as the oracle (test_docker.py,
test_docker_commit.py): its own data root, exec root, pidfile, socket and client config under a
scratch dir, started with the flags that work on this machine (FACTS.md), stopped by its pid.

Debian's docker.io puts the binaries at fixed paths; a newer client may come first in PATH, so
the paths are not looked up.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def unavailable() -> str | None:
    """Why no daemon can be started here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    for exe in (DOCKERD, DOCKER):
        if not os.access(exe, os.X_OK):
            return f"{exe} is not installed (Debian's docker.io)"
    return None


# --- mounts and processes under a scratch dir ---

def _unescape_mountinfo(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(*dirs: Path | str) -> list[str]:
    """Mount points at or below any of `dirs`, deepest first (from /proc/self/mountinfo)."""
    roots = [os.path.realpath(d) for d in dirs]
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if any(point == r or point.startswith(r + "/") for r in roots):
                out.append(point)
    return sorted(set(out), key=lambda p: (-p.count("/"), p))


def unmount_all(*dirs: Path | str) -> list[str]:
    """Unmount everything at or below `dirs` (lazily if a plain umount fails); returns what was
    still mounted afterwards (should be nothing)."""
    for _ in range(5):
        points = mounts_under(*dirs)
        if not points:
            return []
        for p in points:
            if subprocess.run(["umount", p], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", p], capture_output=True, check=False)
    return mounts_under(*dirs)


def pids_referencing(*dirs: Path | str) -> list[int]:
    """Live processes whose command line names one of `dirs` (leftover containerd/shims)."""
    needles = [os.fsencode(os.path.realpath(d)) for d in dirs]
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if any(n in cmdline for n in needles):
            out.append(int(name))
    return out


def wait_gone(*dirs: Path | str, timeout: float = 10.0) -> list[int]:
    """`pids_referencing(*dirs)` after waiting up to `timeout` for them to go (a zombie's
    cmdline is empty)."""
    deadline = time.monotonic() + timeout
    while (left := pids_referencing(*dirs)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def group_alive(pgid: int) -> list[int]:
    """Processes of process group `pgid` not yet dead. A zombie is dead: a killed process
    closes its files (and so drops its flocks) before it turns zombie, and its cmdline is
    empty a moment before that, so only the state tells when it is truly gone."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            out.append(int(name))
    return out


def wait_group_gone(pgid: int, timeout: float = 10.0) -> list[int]:
    """`group_alive(pgid)` after waiting up to `timeout` for it to empty: a killed process's
    forked children die a moment after it (PR_SET_PDEATHSIG)."""
    deadline = time.monotonic() + timeout
    while (left := group_alive(pgid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


# --- the daemon ---

class DaemonError(Exception):
    """dockerd exited or did not answer."""


@dataclass
class Daemon:
    """dockerd with everything under `base` (short paths: a unix socket path must stay under
    108 bytes); its data root is `data_root` (default `base/d`)."""

    base: Path
    data_root: Path = field(default=Path())
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if self.data_root == Path():
            self.data_root = self.base / "d"
        self.exec_root = self.base / "e"
        self.pidfile = self.base / "p"
        self.sock = self.base / "s"
        self.log_path = self.base / "log"
        self.config = self.base / "cfg"  # the client's DOCKER_CONFIG: never touch ~/.docker

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def log(self, tail: int = 40, *, interesting: bool = False) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        if interesting:
            lines = [ln for ln in lines
                     if "level=error" in ln or "level=fatal" in ln or "level=warning" in ln]
        return "\n".join(lines[-tail:])

    def start(self) -> None:
        for d in (self.base, self.exec_root, self.config):
            d.mkdir(parents=True, exist_ok=True)
        assert len(str(self.sock)) < 100, self.sock
        argv = [DOCKERD, "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "--pidfile", str(self.pidfile), "--host", self.host,
                "--storage-driver", "overlay2", "--iptables=false", "--ip6tables=false",
                "--bridge=none"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT  # a bounded wait for the daemon, no timing
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError(f"dockerd exited with {self.proc.returncode}:\n{self.log()}")
            if self.sock.exists():
                probe = self.docker("version", "--format", "{{.Server.Version}}", check=False,
                                    timeout=10)
                if probe.returncode == 0:
                    return
            time.sleep(0.2)
        raise DaemonError(f"dockerd did not answer within {START_TIMEOUT:.0f} s:\n{self.log()}")

    def docker(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY")}
        env["DOCKER_CONFIG"] = str(self.config)
        proc = subprocess.run([DOCKER, "-H", self.host, *args], capture_output=True, text=True,
                              timeout=timeout, check=False, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr.strip()}\n"
                                 f"--- dockerd log (warnings/errors) ---\n"
                                 f"{self.log(interesting=True)}")
        return proc

    def stop(self) -> list[str]:
        """Stop by pid (TERM, then KILL), kill leftovers naming our dirs by pid, unmount what is
        left. Deletes nothing. Returns problems (for the caller to report), never raises."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"dockerd {self.proc.pid} ignored SIGTERM; killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in pids_referencing(self.base, self.data_root):
            problems.append(f"leftover process {pid} killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        left = unmount_all(self.base, self.data_root)
        if left:
            problems.append(f"still mounted: {left}")
        return problems


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    try:
        daemon.start()
        yield daemon
    finally:
        problems = daemon.stop()
        assert not problems, problems
