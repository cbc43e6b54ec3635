"""A throwaway dockerd for the `docker load` baseline: the tests' daemon
(`tests/throwaway_dockerd.py`: its own data root, exec root and socket, the flags that work on
this machine, stopped by its pid) plus what the harness measures of it."""

from __future__ import annotations

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

    def stop(self) -> list[str]:
        """Stop it (see Daemon.stop); nothing is deleted here: the harness deletes its dirs
        after all timings."""
        problems = super().stop()
        if problems:
            print(f"docker load baseline: {'; '.join(problems)}", file=sys.stderr)
        return problems
