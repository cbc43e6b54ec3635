"""An OCI runtime bundle's `config.json` for a container (runtime-spec config.md), made from
its image config and the run options, the way umoci's and buildah's converters and Docker's
defaults make it. Pure, but for reading the container's own /etc/passwd and /etc/group,
which goes through `fsutil.open_in_root` (a symlinked /etc/passwd resolves inside the
rootfs, never on the host)."""

from __future__ import annotations

import os
import posixpath
import resource
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ocilayers.errors import RunError
from ocilayers.fsutil import open_in_root

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker's default capability set (oci/caps/defaults.go): what a root step may do.
DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
# Docker's (and `runc spec`'s) lists: without them a step could write the host's /proc/sys.
MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
NETWORKS = ("none", "host")
# --init's binary is bind-mounted into the container's /dev tmpfs: the mount point the runtime
# makes for it never lands in the rw layer (so never in a commit), as /sbin/docker-init would.
INIT_DEST = "/dev/init"


@dataclass(frozen=True)
class RunOptions:
    command: Sequence[str] = ()
    env: Sequence[str] = ()  # K=V, applied last
    workdir: str | None = None
    user: str | None = None  # USER[:GROUP], names or numbers
    network: str = "none"
    seccomp: dict[str, Any] | None = None  # a runtime-spec `linux.seccomp` object
    init: str | None = None  # path of an init to run as PID 1 (tini), bind-mounted in
    etc_files: dict[str, str] = field(default_factory=dict)  # /etc/hosts etc. -> host file


def merge_env(*layers: Sequence[str]) -> list[str]:
    """Env lists merged by key, later ones winning, in first-seen order."""
    out: dict[str, str] = {}
    for env in layers:
        for item in env:
            key = item.split("=", 1)[0]
            out.pop(key, None)
            out[key] = item
    return list(out.values())


def _read_db(rootfs: str, path: str) -> list[list[str]]:
    """The colon-separated lines of a passwd/group file inside the rootfs ([] if none)."""
    try:
        fd = open_in_root(rootfs, path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:  # a symlink loop; a FIFO or device node, never opened
        raise RunError(f"cannot read the container's {path}: {exc.strerror}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunError(f"cannot read the container's {path}: it is a directory")
    with os.fdopen(fd, "rb") as f:
        data = f.read(16 << 20)
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            out.append(line.split(":"))
    return out


def resolve_user(rootfs: str, spec: str) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary gids) for `USER[:GROUP]`, as Docker resolves it in the
    container's own /etc/passwd and /etc/group. Numbers are taken as they are."""
    user, _, group = spec.partition(":")
    passwd = _read_db(rootfs, "/etc/passwd")
    groups = _read_db(rootfs, "/etc/group")
    name: str | None = None
    if user.isdigit():
        uid, gid = int(user), 0
        for row in passwd:
            if len(row) >= 4 and row[2] == user and row[3].isdigit():
                name, gid = row[0], int(row[3])
                break
    else:
        rows = [r for r in passwd if r and r[0] == user and len(r) >= 4
                and r[2].isdigit() and r[3].isdigit()]
        if not rows:
            raise RunError(f"unable to find user {user}: no matching entries in passwd file")
        name, uid, gid = user, int(rows[0][2]), int(rows[0][3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = [r for r in groups if r and r[0] == group and len(r) >= 3
                     and r[2].isdigit()]
            if not found:
                raise RunError(f"unable to find group {group}: no matching entries in group "
                               "file")
            gid = int(found[0][2])
    extra: list[int] = []
    if name is not None and not group:
        for g in groups:
            if len(g) >= 4 and g[2].isdigit() and name in g[3].split(",") \
                    and int(g[2]) != gid and int(g[2]) not in extra:
                extra.append(int(g[2]))
    return uid, gid, extra


def _mounts(network: str) -> list[dict[str, Any]]:
    sys_mount: dict[str, Any] = (
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]} if network == "none" else
        # a host network namespace is not ours to mount sysfs for: bind it, read-only
        {"destination": "/sys", "type": "bind", "source": "/sys",
         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                     "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        sys_mount,
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]


def runtime_spec(image_config: dict[str, Any], container_id: str, rootfs: str,
                 opts: RunOptions) -> dict[str, Any]:
    """The runtime-spec config.json object for one step in the container."""
    if opts.network not in NETWORKS:
        raise RunError(f"unknown network {opts.network!r} (want one of {', '.join(NETWORKS)})")
    cfg = image_config.get("config") or {}
    args = list(opts.command)
    if not args:
        args = [str(x) for x in (cfg.get("Entrypoint") or [])] + \
               [str(x) for x in (cfg.get("Cmd") or [])]
    if not args:
        raise RunError("no command: give one, or commit the image with -c 'CMD [...]'")
    if opts.init is not None:
        args = [INIT_DEST, "--", *args]
    env = merge_env([DEFAULT_PATH], [str(e) for e in (cfg.get("Env") or [])], opts.env)
    cwd = opts.workdir or str(cfg.get("WorkingDir") or "") or "/"
    if not cwd.startswith("/"):
        cwd = posixpath.join("/", cwd)
    user = opts.user if opts.user is not None else str(cfg.get("User") or "")
    uid, gid, extra = resolve_user(rootfs, user) if user else (0, 0, [])
    caps = list(DEFAULT_CAPS)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if opts.network == "none":
        namespaces.append({"type": "network"})
    mounts = _mounts(opts.network)
    for dest, source in sorted(opts.etc_files.items()):
        mounts.append({"destination": dest, "type": "bind", "source": source,
                       "options": ["rbind", "rprivate"]})
    if opts.init is not None:
        mounts.append({"destination": INIT_DEST, "type": "bind",
                       "source": opts.init, "options": ["rbind", "ro", "rprivate"]})
    linux: dict[str, Any] = {"namespaces": namespaces, "maskedPaths": list(MASKED_PATHS),
                             "readonlyPaths": list(READONLY_PATHS)}
    if opts.seccomp is not None:
        linux["seccomp"] = opts.seccomp
    process: dict[str, Any] = {
        "terminal": False,
        "user": {"uid": uid, "gid": gid, **({"additionalGids": extra} if extra else {})},
        "args": args, "env": env, "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": caps if uid == 0 else [],
                         "permitted": caps if uid == 0 else []},
        # at the caller's own limits: root here lacks CAP_SYS_RESOURCE to go above them
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": soft}],
        "noNewPrivileges": False,
    }
    return {"ociVersion": "1.0.2", "process": process,
            "root": {"path": rootfs, "readonly": False},
            "hostname": container_id[:12], "mounts": mounts, "linux": linux}


def rootless_spec(spec: dict[str, Any], uid_map: Sequence[tuple[int, int, int]],
                  gid_map: Sequence[tuple[int, int, int]], *,
                  network_namespace: bool = False) -> dict[str, Any]:
    """`spec` for a rootless runtime, as umoci's `--rootless` changes it: a user namespace
    mapping the IDs the caller has (`(container id, host id, count)`, host ids as the caller's
    namespace sees them); no network namespace unless asked; /sys bind-mounted read-only (no
    sysfs of its own without a network namespace); no `uid=`/`gid=` mount options (those ids
    may be unmapped); no resource limits (no cgroup is ours to write)."""
    out = dict(spec)
    linux = dict(out.get("linux") or {})
    namespaces = [n for n in linux.get("namespaces", []) if n.get("type") not in
                  ("user", "network", "cgroup")]
    namespaces.append({"type": "user"})
    if network_namespace:
        namespaces.append({"type": "network"})
    linux["namespaces"] = namespaces
    linux["uidMappings"] = [{"containerID": c, "hostID": h, "size": n} for c, h, n in uid_map]
    linux["gidMappings"] = [{"containerID": c, "hostID": h, "size": n} for c, h, n in gid_map]
    linux.pop("resources", None)
    linux.pop("cgroupsPath", None)
    out["linux"] = linux
    mounts = []
    for m in out.get("mounts", []):
        m = dict(m)
        if m.get("destination") == "/sys" and not network_namespace:
            m = {"destination": "/sys", "type": "none", "source": "/sys",
                 "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
        opts = [o for o in m.get("options", []) if not o.startswith(("uid=", "gid="))]
        if "options" in m:
            m["options"] = opts
        mounts.append(m)
    out["mounts"] = mounts
    return out
