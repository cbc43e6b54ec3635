"""A throwaway dockerd for the `docker load` and `docker commit` baselines: the tests' daemon
(`tests/throwaway_dockerd.py`: its own data root, exec root and socket, the flags that work on
this machine, stopped by its pid) plus what the harness measures of it."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from throwaway_dockerd import DOCKER, Daemon, unavailable


def available() -> str:
    """'' when a daemon can be tried, else why not."""
    return unavailable() or ""


class Dockerd(Daemon):
    def __init__(self, data_root: str) -> None:
        # The socket path must stay short (sun_path is 108 bytes): keep the rest in /tmp.
        super().__init__(Path(tempfile.mkdtemp(prefix="olb-dockerd.", dir="/tmp")),
                         Path(data_root))

    def start(self, log_path: str | None = None) -> None:  # type: ignore[override]
        if log_path is not None:
            self.log_path = Path(log_path)
        super().start()

    def load_argv(self, archive: str) -> list[str]:
        return [DOCKER, "-H", self.host, "load", "-q", "-i", archive]

    def commit_argv(self, container: str, tag: str) -> list[str]:
        return [DOCKER, "-H", self.host, "commit", container, tag]

    def client_env(self) -> dict[str, str]:
        """The environment of a timed client command: as `Daemon.docker` (its own client
        config, never ~/.docker; no DOCKER_HOST/CONTEXT from outside)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY")}
        env["DOCKER_CONFIG"] = str(self.config)
        return env

    def version(self) -> str:
        return self.docker("version", "--format", "{{.Server.Version}}").stdout.strip()

    def driver_status(self) -> dict[str, str]:
        """`docker info`'s storage driver status (e.g. "Native Overlay Diff": "true")."""
        out = self.docker("info", "--format", "{{json .DriverStatus}}").stdout
        return {str(k): str(v) for k, v in json.loads(out or "[]")}

    def create_container(self, image: str, name: str) -> str:
        """`docker create` (never started: its rw layer is not mounted); returns its upper
        dir (GraphDriver.Data.UpperDir)."""
        self.docker("create", "--network", "none", "--name", name, image, "true")
        return self.docker("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                           name).stdout.strip()

    def cpu_seconds(self) -> float:
        """utime+stime of the daemon and of the children it reaped (unpigz)."""
        return self.cpu_split()[0]

    def cpu_split(self) -> tuple[float, float]:
        """(user+sys, sys) of the daemon and of the children it reaped (unpigz)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14..17.
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        tck = os.sysconf("SC_CLK_TCK")
        return (utime + stime + cutime + cstime) / tck, (stime + cstime) / tck

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

    def stop(self) -> list[str]:
        """Stop it (see Daemon.stop); nothing is deleted here: the harness deletes its dirs
        after all timings."""
        problems = super().stop()
        if problems:
            print(f"docker load baseline: {'; '.join(problems)}", file=sys.stderr)
        return problems
