"""Run commands as an unprivileged user, for the rootless tests (issue 19).

Two kinds of user, both prepared by `.ci/run` (never by the tests):
- "subid":  `ocirootless`, with a subordinate range in /etc/subuid and /etc/subgid, so
            newuidmap/newgidmap can map a whole range (rootless Docker/podman's preferred mode);
- "single": `nobody` (65534), with no range: only a single-ID user namespace is possible.

The test process must be root (to switch user). `probe(kind)` says why a kind cannot be used
here (a skip reason) or None; results are cached for the session.

`UserDirs.create(kind)` makes a private tree the user owns, outside pytest's tmp dirs (their
parents are 0700 root):

    /tmp/ocilayers-rootless-XXXX/      base, 0711 root:root
        u/                             0711 user   (root)
            home/                      0700 user   HOME
            home/.local/share/         0700 user   XDG_DATA_HOME (default store: .../ocilayers)
            run/                       0700 user   XDG_RUNTIME_DIR
            tmp/                       0700 user   TMPDIR
            work/                      0755 user   cwd of every command (put inputs here)

`UserDirs.cleanup()` (as root) lazily unmounts whatever the root mount namespace still has
mounted below base (deepest first), then removes base.

`run_as(kind, argv, dirs=...)` runs argv through `setpriv --reuid --regid --clear-groups
--inh-caps=-all` with a clean environment (`user_env`). `ocilayers_as(kind, args, dirs=...)`
runs `sys.executable -m ocilayers ARGS` that way; PYTHONPATH points at the source tree the test
process imported ocilayers from, so the user runs the same code (an editable install of another
checkout does not leak in).

Fixtures: `unpriv` (parametrized over both kinds), `unpriv_subid`, `unpriv_single`: each yields
an `Unpriv` (.kind, .user, .uid, .gid, .dirs, .run(argv), .ocilayers(args), .give(path)) and
skips with the probe's reason. The fixture functions are named `*_fixture` (the fixture names are
set with `name=`), so a test's parameter does not shadow the import (ruff F811). Use them from a
test module with
    from unprivileged import (  # noqa: F401  (fixtures)
        unpriv_fixture, unpriv_single_fixture, unpriv_subid_fixture)
and take `unpriv`, `unpriv_subid` or `unpriv_single` as a test's parameter.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ocilayers

KINDS = ("subid", "single")
USERS = {"subid": "ocirootless", "single": "nobody"}
"""kind -> user name."""

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SOURCE_ROOT = Path(ocilayers.__file__).resolve().parent.parent
"""The directory holding the `ocilayers` package this test process runs (put on PYTHONPATH)."""

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Account:
    kind: str
    name: str
    uid: int
    gid: int


def account(kind: str) -> Account | None:
    """The user of `kind`, or None when it does not exist."""
    name = USERS[kind]
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(kind, name, pw.pw_uid, pw.pw_gid)


def subid_ranges(path: Path, name: str, uid: int) -> list[tuple[int, int]]:
    """(start, count) of every line of /etc/subuid-style `path` for user `name` or uid `uid`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (name, str(uid)):
            continue
        try:
            out.append((int(parts[1]), int(parts[2])))
        except ValueError:
            continue
    return out


def setpriv_argv(acct: Account) -> list[str]:
    """The argv prefix that drops to `acct`: real and effective ids, no supplementary groups,
    no inheritable capabilities. (No no_new_privs: newuidmap/newgidmap are setuid.)"""
    return ["setpriv", f"--reuid={acct.uid}", f"--regid={acct.gid}", "--clear-groups",
            "--inh-caps=-all"]


def _quick(argv: Sequence[str], env: Mapping[str, str], cwd: str = "/"
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def _why(p: subprocess.CompletedProcess[str]) -> str:
    return (p.stderr.strip() or p.stdout.strip() or f"exit {p.returncode}").splitlines()[-1]


@functools.cache
def probe(kind: str) -> str | None:
    """Why commands cannot be run as the `kind` user here (a skip reason), or None."""
    if kind not in USERS:
        raise ValueError(f"unknown kind {kind!r}; want one of {KINDS}")
    if os.geteuid() != 0:
        return "running commands as an unprivileged user needs root (to switch user)"
    acct = account(kind)
    if acct is None:
        return f"user {USERS[kind]!r} does not exist (.ci/run creates it)"
    if acct.uid == 0:
        return f"user {acct.name!r} is root"
    uids = subid_ranges(SUBUID, acct.name, acct.uid)
    gids = subid_ranges(SUBGID, acct.name, acct.gid) + subid_ranges(SUBGID, acct.name, acct.uid)
    if kind == "subid":
        if not uids or not gids:
            return (f"user {acct.name!r} has no subordinate range in "
                    f"{SUBUID if not uids else SUBGID} (.ci/run adds one)")
        for tool in ("newuidmap", "newgidmap"):
            if shutil.which(tool, path=PATH) is None:
                return f"{tool} is not installed (Debian package uidmap)"
    elif uids or gids:
        return (f"user {acct.name!r} has a subordinate range in /etc/subuid or /etc/subgid; "
                "the 'single' kind needs a user without one")
    for tool in ("setpriv", "unshare"):
        if shutil.which(tool, path=PATH) is None:
            return f"{tool} is not installed (util-linux)"
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent",
           "PYTHONPATH": str(SOURCE_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    pre = setpriv_argv(acct)
    p = _quick([*pre, "id", "-u"], env)
    if p.returncode != 0 or p.stdout.strip() != str(acct.uid):
        return f"setpriv cannot switch to {acct.name!r}: {_why(p)}"
    p = _quick([*pre, sys.executable, "-c", "import ocilayers; print(ocilayers.__file__)"], env)
    if p.returncode != 0:
        return (f"user {acct.name!r} cannot run {sys.executable} with ocilayers from "
                f"{SOURCE_ROOT} (every parent dir needs o+x, the tree o+r): {_why(p)}")
    if Path(p.stdout.strip()).resolve() != Path(ocilayers.__file__).resolve():
        return (f"user {acct.name!r} imports ocilayers from {p.stdout.strip()}, not from "
                f"{ocilayers.__file__}")
    p = _quick([*pre, "unshare", "-Ur", "true"], env)
    if p.returncode != 0:
        return f"unprivileged user namespaces are not possible here: {_why(p)}"
    if kind == "subid":
        p = _quick([*pre, "unshare", "--map-auto", "--map-root-user", "true"], env)
        if p.returncode != 0:
            return (f"user {acct.name!r} cannot map its subordinate range "
                    f"(unshare --map-auto, newuidmap): {_why(p)}")
    return None


def require(kind: str) -> Account:
    """Skip the calling test unless `kind` is usable; return its account."""
    reason = probe(kind)
    if reason:
        pytest.skip(reason)
    acct = account(kind)
    assert acct is not None
    return acct


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path field: octal escapes (\\040 for a space) decoded."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path` in this process's mount namespace, deepest first."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


@dataclass
class UserDirs:
    """A private tree owned by the `kind` user (see the module docstring)."""

    kind: str
    uid: int
    gid: int
    base: Path
    root: Path
    home: Path
    data: Path
    runtime: Path
    tmp: Path
    work: Path

    @classmethod
    def create(cls, kind: str) -> UserDirs:
        """Make the tree (as root) for the `kind` user, which must exist."""
        acct = account(kind)
        if acct is None:
            raise LookupError(f"user {USERS[kind]!r} does not exist")
        base = Path(tempfile.mkdtemp(prefix="ocilayers-rootless-"))
        os.chmod(base, 0o711)
        root = base / "u"
        home = root / "home"
        data = home / ".local" / "share"
        dirs = cls(kind, acct.uid, acct.gid, base, root, home, data, root / "run",
                   root / "tmp", root / "work")
        for path, mode in ((root, 0o711), (home, 0o700), (home / ".local", 0o700),
                           (data, 0o700), (dirs.runtime, 0o700), (dirs.tmp, 0o700),
                           (dirs.work, 0o755)):
            path.mkdir(mode=mode)
            os.chown(path, acct.uid, acct.gid)
            os.chmod(path, mode)
        return dirs

    @property
    def store(self) -> Path:
        """The user's default store root: $XDG_DATA_HOME/ocilayers."""
        return self.data / "ocilayers"

    def env(self) -> dict[str, str]:
        """HOME, XDG_DATA_HOME, XDG_RUNTIME_DIR and TMPDIR of this tree."""
        return {"HOME": str(self.home), "XDG_DATA_HOME": str(self.data),
                "XDG_RUNTIME_DIR": str(self.runtime), "TMPDIR": str(self.tmp)}

    def give(self, src: Path, name: str | None = None) -> Path:
        """Copy file or dir `src` into work/ (as `name`), owned by the user; return the copy."""
        dest = self.work / (name or Path(src).name)
        if Path(src).is_dir():
            shutil.copytree(src, dest, symlinks=True)
        else:
            shutil.copy2(src, dest)
        for dirpath, dirnames, filenames in os.walk(dest):
            os.lchown(dirpath, self.uid, self.gid)
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), self.uid, self.gid)
        return dest

    def cleanup(self) -> None:
        """Unmount (lazily) what is still mounted below base, then remove base. Raises
        RuntimeError naming what could not be unmounted or removed."""
        if not self.base.exists():
            return
        errors = []
        for point in mounts_below(self.base):
            p = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
            if p.returncode != 0:
                errors.append(f"umount -l {point}: {p.stderr.strip()}")
        failed: list[str] = []

        def record(_func: Any, path: str, exc: Any) -> None:
            failed.append(f"{path}: {exc[1] if isinstance(exc, tuple) else exc}")

        if sys.version_info >= (3, 12):
            shutil.rmtree(self.base, onexc=record)
        else:
            shutil.rmtree(self.base, onerror=record)
        if self.base.exists() or errors or failed:
            raise RuntimeError(f"cleanup of {self.base} failed: "
                               + "; ".join(errors + failed[:5]))

    def __enter__(self) -> UserDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def user_env(dirs: UserDirs, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a command run as the user: PATH, LANG=C.UTF-8, the dirs'
    HOME/XDG_DATA_HOME/XDG_RUNTIME_DIR/TMPDIR, PYTHONPATH (this source tree),
    PYTHONDONTWRITEBYTECODE, then `env` (which wins)."""
    out = {"PATH": PATH, "LANG": "C.UTF-8", **dirs.env(),
           "PYTHONPATH": str(SOURCE_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    out.update(env or {})
    return out


def run_as(kind: str, argv: Sequence[str | os.PathLike[str]], *, dirs: UserDirs,
           env: Mapping[str, str] | None = None, input: str | bytes | None = None,
           check: bool = False, timeout: float = DEFAULT_TIMEOUT, cwd: Path | None = None,
           text: bool = True) -> subprocess.CompletedProcess[Any]:
    """Run `argv` as the `kind` user (see `setpriv_argv`), in `cwd` (default dirs.work), with
    `user_env(dirs, env)` only; capture stdout and stderr (str, or bytes with text=False).
    stdin is `input`, else /dev/null. Skips if `probe(kind)` fails."""
    acct = require(kind)
    if dirs.uid != acct.uid:
        raise ValueError(f"dirs belong to uid {dirs.uid}, not to {acct.name} ({acct.uid})")
    return subprocess.run([*setpriv_argv(acct), *map(os.fspath, argv)],
                          env=user_env(dirs, env), cwd=cwd or dirs.work, input=input,
                          stdin=subprocess.DEVNULL if input is None else None,
                          capture_output=True, text=text, check=check, timeout=timeout)


def ocilayers_as(kind: str, args: Sequence[str | os.PathLike[str]], *, dirs: UserDirs,
                 **kw: Any) -> subprocess.CompletedProcess[Any]:
    """`run_as(kind, [sys.executable, "-m", "ocilayers", *args], dirs=dirs, **kw)`."""
    return run_as(kind, [sys.executable, "-m", "ocilayers", *args], dirs=dirs, **kw)


@dataclass
class Unpriv:
    """What the `unpriv` fixtures yield: one user of `kind` with its own `dirs`."""

    kind: str
    user: str
    uid: int
    gid: int
    dirs: UserDirs

    def run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any
            ) -> subprocess.CompletedProcess[Any]:
        """`run_as(self.kind, argv, dirs=self.dirs, **kw)`."""
        return run_as(self.kind, argv, dirs=self.dirs, **kw)

    def ocilayers(self, args: Sequence[str | os.PathLike[str]], **kw: Any
                  ) -> subprocess.CompletedProcess[Any]:
        """`ocilayers_as(self.kind, args, dirs=self.dirs, **kw)`."""
        return ocilayers_as(self.kind, args, dirs=self.dirs, **kw)

    def give(self, src: Path, name: str | None = None) -> Path:
        """`self.dirs.give(src, name)`."""
        return self.dirs.give(src, name)


@contextlib.contextmanager
def unprivileged(kind: str) -> Iterator[Unpriv]:
    """An `Unpriv` of `kind` with fresh dirs, cleaned up on exit. Skips if `probe(kind)` fails."""
    acct = require(kind)
    dirs = UserDirs.create(kind)
    try:
        yield Unpriv(kind, acct.name, acct.uid, acct.gid, dirs)
    finally:
        dirs.cleanup()


@pytest.fixture(params=KINDS, name="unpriv")
def unpriv_fixture(request: pytest.FixtureRequest) -> Iterator[Unpriv]:
    """Each kind in turn ("subid", "single"; the test ids say which), with fresh dirs."""
    with unprivileged(request.param) as u:
        yield u


@pytest.fixture(name="unpriv_subid")
def unpriv_subid_fixture() -> Iterator[Unpriv]:
    """The user with a subordinate range, with fresh dirs."""
    with unprivileged("subid") as u:
        yield u


@pytest.fixture(name="unpriv_single")
def unpriv_single_fixture() -> Iterator[Unpriv]:
    """The user without a subordinate range, with fresh dirs."""
    with unprivileged("single") as u:
        yield u
