"""A throwaway dockerd for the `docker load` baseline: its own data root, exec root and socket,
started with the flags that work on this machine (see FACTS.md), stopped by its pid."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

from inputs import umount_under

DOCKER = "/usr/bin/docker"  # not a newer client that may come first in PATH
DOCKERD = "/usr/sbin/dockerd"


def available() -> str:
    """'' when a daemon can be tried, else why not."""
    for exe in (DOCKER, DOCKERD):
        if not os.access(exe, os.X_OK):
            return f"{exe} is missing"
    if os.geteuid() != 0:
        return "dockerd needs root"
    return ""


class Dockerd:
    def __init__(self, data_root: str) -> None:
        self.data_root = data_root
        # The socket path must stay short (sun_path is 108 bytes): keep the exec root in /tmp.
        self.exec_root = tempfile.mkdtemp(prefix="olb-dockerd.", dir="/tmp")
        self.sock = os.path.join(self.exec_root, "d.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def start(self, log_path: str, timeout: float = 60) -> None:
        os.makedirs(self.data_root, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - the daemon keeps it
        self.proc = subprocess.Popen(
            [DOCKERD, "--data-root", self.data_root, "--exec-root", self.exec_root,
             "--pidfile", os.path.join(self.exec_root, "d.pid"), "--host", self.host,
             "--storage-driver", "overlay2", "--iptables=false", "--ip6tables=false",
             "--bridge=none"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode} (log: {log_path})")
            if subprocess.run([DOCKER, "-H", self.host, "version"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0:
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"dockerd did not answer within {timeout:.0f} s (log: {log_path})")

    def load_argv(self, archive: str) -> list[str]:
        return [DOCKER, "-H", self.host, "load", "-q", "-i", archive]

    def cpu_seconds(self) -> float:
        """utime+stime of the daemon and of the children it reaped (unpigz)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime..cstime are fields 14..17.
        ticks = sum(int(x) for x in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")

    def reset_peak_rss(self) -> None:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (proc(5))

    def peak_rss_kib(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after 30 s; then unmount what it leaves (netns/default).
        Nothing is deleted here: the harness deletes after all timings."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        umount_under(self.exec_root)
        umount_under(self.data_root)
