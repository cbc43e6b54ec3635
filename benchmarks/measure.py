"""Process measurement for the harness: wall time, CPU time and peak RSS of one command, and
a description of the machine the numbers come from."""

from __future__ import annotations

import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One timed run. `cpu` is user+sys of the whole process tree (every descendant the command
    waited for); `rss_kib` is the largest ru_maxrss of any single process in that tree."""

    wall: float
    cpu: float
    rss_kib: int
    ok: bool
    error: str = ""
    sys: float = 0.0    # the system part of `cpu`
    other: float = 0.0  # CPU the rest of the machine used meanwhile (noise indicator)
    touch_us: float = 0.0  # memory_probe() just before the run (noise indicator)


PROBE_MIB = 32
# What a first touch of a page costs when the guest's memory is resident: ~3-5 us here
# (the Python loop included). A page the host took back costs ~40 us.
PROBE_SLOW_US = 10.0


def memory_probe(mib: int = PROBE_MIB) -> float:
    """Microseconds per page to touch `mib` MiB of new anonymous memory, then free it.

    Why: on a VM whose freed guest pages are handed back to the host (virtio-balloon free page
    reporting; here /sys/module/page_reporting), the first write to such a page faults into
    the host and costs ~40 us instead of ~1. Every tool writing new files then pays it for
    each page of page cache it fills: for the commit benchmark's 152 MB that is seconds, the
    same for every tool, which pulls every ratio towards 1. The probe is not timed; it shows
    which runs ran in that state."""
    n = mib << 20
    m = mmap.mmap(-1, n)
    try:
        t0 = time.perf_counter()
        for off in range(0, n, mmap.PAGESIZE):
            m[off] = 1
        dt = time.perf_counter() - t0
    finally:
        m.close()
    return dt / (n // mmap.PAGESIZE) * 1e6


TIME = "/usr/bin/time"


def run_measured(argv: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
                 log_path: str | None = None) -> Sample:
    """Run `argv` to completion: wall time around it, CPU from os.wait4 (Linux's wait4 rusage
    covers the child and all of its reaped descendants), peak RSS from GNU time's %M.

    Why GNU time in between: this Python process starts children with vfork, and Linux puts the
    high-water RSS of the mm a process had before exec (here: the harness's) into its
    ru_maxrss. /usr/bin/time is a small process that fork()s, so the figure it reports starts
    from its ~2 MB, not from the harness's ~30 MB."""
    rss_file = None
    if os.access(TIME, os.X_OK):
        fd, rss_file = tempfile.mkstemp(prefix="olb-rss.")
        os.close(fd)
        argv = [TIME, "-f", "%M", "-o", rss_file, *argv]
    log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed below
    try:
        touch = memory_probe()
        busy0 = machine_busy()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy = machine_busy() - busy0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        log.close()
    rss = ru.ru_maxrss
    if rss_file:
        with open(rss_file) as f:
            lines = f.read().split()
        os.unlink(rss_file)
        if lines and lines[-1].isdigit():
            rss = int(lines[-1])
    ok = proc.returncode == 0
    error = ""
    if not ok:
        error = f"exit {proc.returncode}"
        if log_path:
            error += ": " + tail(log_path)
    cpu = ru.ru_utime + ru.ru_stime
    return Sample(wall, cpu, rss, ok, error, ru.ru_stime, max(0.0, busy - cpu), touch)


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat: user, nice, system, irq,
    softirq, steal). Kernel threads count: writeback of a run's own files shows up here."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))
    return ticks / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def tail(path: str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip().replace("\n", " | ")
    except OSError:
        return ""


def mount_of(path: str) -> tuple[str, str, str]:
    """(mount point, fs type, options) of the mount holding `path`."""
    path = os.path.realpath(path)
    best = ("/", "?", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype, opts, *_ = line.split()
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, opts)
    return best


def ext4_without_journal(path: str) -> bool:
    """Is `path` on an ext4 that has no journal? Such an ext4 does not reuse an inode freed in
    the last 60 s, or 360 s while its inode-table block is dirty (fs/ext4/ialloc.c,
    recently_deleted), and skipping each one costs a buffer lookup: after a big deletion,
    every file created in those block groups pays for the scan (perf of a commit run 2 min
    after the previous run's clean-up: most of its time in recently_deleted)."""
    st = os.stat(path)
    try:
        dev = os.path.basename(os.path.realpath(
            f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
        with open(f"/proc/fs/ext4/{dev}/options") as f:
            opts = f.read().split()
    except OSError:
        return False  # not ext4 (or not a block device we can name)
    return not any(o.startswith("data=") for o in opts)  # a journal has a data= mode


# fs/ext4/ialloc.c: RECENTCY_MIN + RECENTCY_DIRTY
EXT4_RECENTLY_DELETED_S = 360.0


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine_info(cache_dir: str) -> dict[str, object]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    mnt, fstype, opts = mount_of(cache_dir)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cache_dir": os.path.realpath(cache_dir),
        "cache_fs": f"{fstype} on {mnt} ({opts})",
        "tools": {
            "umoci": _first_line(["umoci", "--version"]),
            "gzip": _first_line(["gzip", "--version"]),
            "zstd": _first_line(["zstd", "--version"]),
            "tar": _first_line(["tar", "--version"]),
            "docker": _first_line(["/usr/bin/docker", "--version"])
            if os.path.exists("/usr/bin/docker") else "missing",
        },
    }


def git_describe(repo: str) -> str:
    """HEAD, plus a hash of the package sources when ocilayers/ has uncommitted changes (so a
    change made while the benchmark runs is noticed)."""
    if not shutil.which("git"):
        return "?"
    head = _first_line(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "ocilayers"],
                           capture_output=True, text=True).stdout.strip()
    if not dirty:
        return head
    h = hashlib.sha256()
    pkg = os.path.join(repo, "ocilayers")
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return f"{head}+dirty(ocilayers/ {h.hexdigest()[:8]})"
