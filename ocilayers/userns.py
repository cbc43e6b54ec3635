"""User namespaces for rootless mode: which IDs an unprivileged user may map, and entering a
user + mount namespace the way rootless Docker and podman do.

- **subid**: the user has ranges in `/etc/subuid` and `/etc/subgid`. Root in the namespace is
  the user, IDs 1..N are the range (mapped by Debian's setuid `newuidmap`/`newgidmap`), so an
  image's owners in that range are real and chown works.
- **single**: no range. Root in the namespace is the user, nothing else is mapped; owners are
  recorded instead (`overrides`).

The namespace is entered in this process (`enter`): unshare(2) of a user namespace needs a
process with one thread, so the CLI enters it first thing, before any thread or writer starts.
Inside, euid is 0 but the process is still rootless (`is_rootless`): no device nodes, no
`trusted.*` xattrs, overlay mounts only with `userxattr`."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ocilayers.errors import RootlessError
from ocilayers.whiteout import in_user_namespace

if TYPE_CHECKING:
    import ctypes

# ctypes, pwd, shutil, subprocess and threading are imported where they are used: every
# command imports this module (through the store), few enter a namespace.

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_DUMPABLE = 4
SUBUID = "/etc/subuid"
SUBGID = "/etc/subgid"


@dataclass(frozen=True)
class IdMap:
    """One line of uid_map/gid_map (user_namespaces(7)): `count` IDs from `inside` are
    `outside` ones in the parent namespace."""

    inside: int
    outside: int
    count: int

    def line(self) -> str:
        return f"{self.inside} {self.outside} {self.count}"


@dataclass(frozen=True)
class Plan:
    """How to map IDs: kind "subid" (the user's subordinate ranges) or "single"."""

    kind: str
    uid_map: tuple[IdMap, ...]
    gid_map: tuple[IdMap, ...]


def read_map(which: str = "uid", pid: str = "self") -> tuple[IdMap, ...]:
    """The ID map of the user namespace `pid` is in."""
    out = []
    with open(f"/proc/{pid}/{which}_map", encoding="ascii") as f:
        for line in f:
            a, b, c = (int(x) for x in line.split())
            out.append(IdMap(a, b, c))
    return tuple(out)


def is_rootless() -> bool:
    """Can this process not do what root in the initial namespace can? (Not euid 0, or euid 0
    of a user namespace: no device nodes, no trusted.* xattrs.)"""
    return os.geteuid() != 0 or in_user_namespace()


def current_kind() -> str | None:
    """Inside a namespace: "single" when only one uid is mapped, else "subid"."""
    if not in_user_namespace():
        return None
    return "single" if sum(m.count for m in read_map()) == 1 else "subid"


def subordinate(path: str, user: str | None, uid: int) -> IdMap | None:
    """The user's first subordinate range in `path` (subuid(5): `name-or-id:start:count`) as a
    map of inside IDs 1..count; None when there is none or the file is missing."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count > 0:
            return IdMap(1, start, count)
    return None


def plan(*, force: str | None = None) -> Plan:
    """The plan for this user: "subid" when it has both ranges, else "single". `force` (or
    $OCILAYERS_USERNS) picks one; asking for "subid" without ranges is an error."""
    import pwd

    force = force or os.environ.get("OCILAYERS_USERNS") or None
    if force not in (None, "subid", "single"):
        raise RootlessError(f"OCILAYERS_USERNS={force!r}: use subid or single")
    uid, gid = os.getuid(), os.getgid()
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    single = Plan("single", (IdMap(0, uid, 1),), (IdMap(0, gid, 1),))
    if force == "single":
        return single
    sub_u, sub_g = subordinate(SUBUID, user, uid), subordinate(SUBGID, user, uid)
    who = user or f"uid {uid}"
    if sub_u is None and sub_g is None:
        if force == "subid":
            raise RootlessError(f"{who} has no subordinate IDs in {SUBUID} and {SUBGID}: add a "
                                f"range (usermod --add-subuids 100000-165535 --add-subgids "
                                f"100000-165535 {user or uid})")
        return single
    if sub_u is None or sub_g is None:
        missing = SUBUID if sub_u is None else SUBGID
        raise RootlessError(f"{who} has subordinate IDs in only one of {SUBUID} and {SUBGID}: "
                            f"add a range to {missing}, or set OCILAYERS_USERNS=single")
    return Plan("subid", (IdMap(0, uid, 1), sub_u), (IdMap(0, gid, 1), sub_g))


def _libc() -> ctypes.CDLL:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _unshare_error(err: int) -> RootlessError:
    if err in (errno.EPERM, errno.ENOSPC, errno.EUSERS):
        try:
            with open("/proc/sys/user/max_user_namespaces", encoding="ascii") as f:
                limit = f.read().strip()
        except OSError:
            limit = "?"
        why = (f"user.max_user_namespaces is {limit}" if limit == "0"
               else "unprivileged user namespaces are disabled or used up")
        return RootlessError(f"cannot make a user namespace: {os.strerror(err)} ({why}; fix: "
                             "sysctl -w user.max_user_namespaces=15000 and, on kernels that "
                             "have it, kernel.unprivileged_userns_clone=1; or run as root)")
    return RootlessError(f"cannot make a user namespace: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _map_tools(p: Plan) -> tuple[str, str]:
    import shutil

    tools = shutil.which("newuidmap"), shutil.which("newgidmap")
    if tools[0] is None or tools[1] is None:
        raise RootlessError("newuidmap/newgidmap are missing, needed to map the subordinate "
                            "IDs of /etc/subuid (fix: apt-get install uidmap, or set "
                            "OCILAYERS_USERNS=single)")
    return tools[0], tools[1]


def enter(p: Plan) -> None:
    """Move this (single-threaded) process into a new user + mount namespace mapped as `p`,
    with private mount propagation. Afterwards the process is root of the namespace."""
    import ctypes
    import subprocess
    import threading

    if threading.active_count() > 1:
        raise RootlessError("a process with threads cannot enter a user namespace")
    tools = _map_tools(p) if p.kind == "subid" else None
    # A process that became this user by setuid() from root is not dumpable: its /proc/self
    # files stay root's, and it could not write its own maps.
    _libc().prctl(ctypes.c_int(PR_SET_DUMPABLE), ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0))
    parent = os.getpid()
    r, w = os.pipe()
    er, ew = os.pipe()
    helper = os.fork() if tools else 0
    if tools and helper == 0:  # pragma: no cover - the helper: map the parent once it unshared
        code = 1
        try:
            os.close(w)
            os.close(er)
            if os.read(r, 2) == b"go":
                for tool, maps in ((tools[0], p.uid_map), (tools[1], p.gid_map)):
                    args = [tool, str(parent)]
                    for m in maps:
                        args += [str(m.inside), str(m.outside), str(m.count)]
                    res = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True)
                    if res.returncode != 0:
                        msg = res.stderr.decode(errors="replace").strip().splitlines()
                        os.write(ew, f"{os.path.basename(tool)}: "
                                     f"{msg[-1] if msg else 'failed'}".encode()[:2000])
                        break
                else:
                    code = 0
        finally:
            os._exit(code)
    os.close(r)
    os.close(ew)
    try:
        libc = _libc()
        if libc.unshare(ctypes.c_int(CLONE_NEWUSER | CLONE_NEWNS)) != 0:
            raise _unshare_error(ctypes.get_errno())
        if tools:
            os.write(w, b"go")
            os.close(w)
            w = -1
            _, status = os.waitpid(helper, 0)
            helper = 0
            why = os.read(er, 4000).decode(errors="replace")
            if os.waitstatus_to_exitcode(status) != 0:
                raise RootlessError(f"cannot map the subordinate IDs: {why or 'failed'} (check "
                                    f"{SUBUID} and {SUBGID}, or set OCILAYERS_USERNS=single)")
        else:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", p.uid_map[0].line())
            _write("/proc/self/gid_map", p.gid_map[0].line())
        if libc.mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) != 0:
            raise RootlessError("cannot make the new mount namespace private: "
                                f"{os.strerror(ctypes.get_errno())}")
    finally:
        if w >= 0:
            os.close(w)
        os.close(er)
        if helper:
            os.waitpid(helper, 0)


def rootless_mode() -> bool:
    """Rootless mode: not euid 0, in a user namespace, or asked for ($OCILAYERS_ROOTLESS=1,
    which `--rootless` sets)."""
    return os.environ.get("OCILAYERS_ROOTLESS") == "1" or is_rootless()


def record_of_process() -> dict[str, object]:
    """What a rootless store records about the IDs its owners were made under."""
    kind = current_kind()
    doc: dict[str, object] = {"xattr_namespace": "user",
                              "ids": kind or ("host" if os.geteuid() else "root")}
    if kind:
        doc["uid_map"] = [[m.inside, m.outside, m.count] for m in read_map("uid")]
        doc["gid_map"] = [[m.inside, m.outside, m.count] for m in read_map("gid")]
    return doc


def check_record(doc: dict[str, object], here: dict[str, object], where: str) -> None:
    """A store whose owners were made with subordinate IDs is only usable under the same
    mapping (any other would show them as other users, or as nobody)."""
    if doc.get("ids") != "subid":
        return
    if here.get("ids") != "subid" or (doc.get("uid_map"), doc.get("gid_map")) != (
            here.get("uid_map"), here.get("gid_map")):
        raise RootlessError(
            f"{where}: this rootless store was made with the subordinate IDs "
            f"{doc.get('uid_map')} and this process maps {here.get('uid_map') or 'none'}: its "
            "owners would not match (use the same user and /etc/subuid range, or another "
            "--root)")
