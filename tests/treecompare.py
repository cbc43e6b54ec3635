"""Snapshot a directory tree with full metadata and diff two snapshots (the oracle tests' eyes).

A snapshot maps each relative path (bytes, never decoded: names need not be UTF-8) to an `Entry`,
a NamedTuple of everything an image layer can carry: type, permission bits (setuid/setgid/sticky
included), owner, size + sha256, symlink target, device numbers, xattrs, mtime and hardlink group.

xattrs of overlay dirs need a decision (overlayfs.rst "Nesting overlayfs mounts", Linux 6.7+):
a lower dir stores an image's own `trusted.overlay.X` escaped as `trusted.overlay.overlay.X`, and
the merged mount shows it as `trusted.overlay.X` again; every other `<ns>.overlay.*` on a lower is
kernel bookkeeping (opaque, origin, impure, redirect, ...) that the merged view hides. So:
- `overlay_xattrs="keep"` (default) takes every name verbatim: a merged mount, or a plain rootfs
  made by tar/bsdtar/umoci, where there is no bookkeeping to hide;
- `overlay_xattrs="unescape"` reads a dir as overlayfs would read a lower: escaped names are
  unescaped, other `<ns>.overlay.*` names (for each ns in `overlay_namespaces`) are dropped.
  Whiteouts (char 0/0) stay visible as entries; compare diff dirs with that in mind.

Run as a script (`python treecompare.py ROOT [--seconds] [--no-mtimes] [--root-entry]
[--no-trusted]`) it prints the snapshot as JSON (`dumps`/`loads`), so a tree seen from inside
another namespace can be compared with one seen from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, NamedTuple

OVERLAY_NAMESPACES = ("trusted", "user")
FIELDS = ("kind", "mode", "uid", "gid", "size", "sha256", "target", "rdev", "xattrs", "mtime",
          "links")

_KINDS = (
    (stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"), (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)


class Entry(NamedTuple):
    kind: str  # file | dir | symlink | chr | blk | fifo | socket
    mode: int  # stat.S_IMODE: permission bits with setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None  # regular files only
    sha256: str | None  # regular files only
    target: bytes | None  # symlinks only
    rdev: tuple[int, int] | None  # (major, minor), devices only
    xattrs: tuple[tuple[str, bytes], ...]  # sorted (name, value)
    mtime: int | None  # ns, or whole seconds with `seconds=True`; None with `mtimes=False`
    links: frozenset[bytes] | None  # every path sharing this inode, when more than one does


Snapshot = dict[bytes, Entry]
DirMtimeFilter = Collection[bytes] | Callable[[bytes], bool] | bool | None


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"type {stat.S_IFMT(mode):o}"


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_xattrs(path: bytes, overlay_xattrs: str, overlay_namespaces: Iterable[str],
                 xattr_filter: Callable[[str], bool] | None) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # a filesystem without xattr support has none to compare
        return ()
    out: dict[str, bytes] = {}
    for name in names:
        shown: str | None = name
        if overlay_xattrs == "unescape":
            for ns in overlay_namespaces:
                prefix = f"{ns}.overlay."
                if name.startswith(prefix):
                    rest = name[len(prefix):]
                    shown = prefix + rest[len("overlay."):] if rest.startswith("overlay.") else None
                    break
        if shown is None or (xattr_filter is not None and not xattr_filter(shown)):
            continue
        out[shown] = os.getxattr(path, name, follow_symlinks=False)
    return tuple(sorted(out.items()))


def snapshot(root: str | bytes | os.PathLike[Any], *, mtimes: bool = True,
             root_entry: bool = False, seconds: bool = False, overlay_xattrs: str = "keep",
             overlay_namespaces: Iterable[str] = OVERLAY_NAMESPACES,
             xattr_filter: Callable[[str], bool] | None = None) -> Snapshot:
    """Every entry under `root` (not following symlinks), keyed by relative path bytes.

    `root_entry` adds the root dir itself as b".". `seconds` truncates mtimes to whole
    seconds (for formats that keep no more). `xattr_filter(name)` keeps only the xattrs it
    accepts (after unescaping). See the module docstring for `overlay_xattrs`.
    """
    if overlay_xattrs not in ("keep", "unescape"):
        raise ValueError("overlay_xattrs must be 'keep' or 'unescape'")
    namespaces = tuple(overlay_namespaces)
    base = os.fsencode(root)
    raw: dict[bytes, tuple[os.stat_result, bytes]] = {}

    def walk(rel: bytes) -> None:
        full = os.path.join(base, rel) if rel else base
        with os.scandir(full) as it:
            names = sorted(e.name for e in it)
        for name in names:
            child = rel + b"/" + name if rel else name
            path = os.path.join(base, child)
            st = os.lstat(path)
            raw[child] = (st, path)
            if stat.S_ISDIR(st.st_mode):
                walk(child)

    if root_entry:
        raw[b"."] = (os.lstat(base), base)
    walk(b"")

    inodes: dict[tuple[int, int], set[bytes]] = {}
    for rel, (st, _path) in raw.items():
        if not stat.S_ISDIR(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)

    snap: Snapshot = {}
    for rel, (st, path) in raw.items():
        kind = _kind(st.st_mode)
        is_file = kind == "file"
        group = inodes.get((st.st_dev, st.st_ino))
        if mtimes:
            mtime: int | None = st.st_mtime_ns // 1_000_000_000 if seconds else st.st_mtime_ns
        else:
            mtime = None
        snap[rel] = Entry(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if is_file else None,
            sha256=_sha256(path) if is_file else None,
            target=os.readlink(path) if kind == "symlink" else None,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None,
            xattrs=_read_xattrs(path, overlay_xattrs, namespaces, xattr_filter),
            mtime=mtime,
            links=frozenset(group) if group is not None and len(group) > 1 else None,
        )
    return snap


# -- transforming snapshots --

def without(snap: Mapping[bytes, Entry], *fields: str,
            paths: Callable[[bytes], bool] | None = None) -> Snapshot:
    """A copy with `fields` blanked (None / () ), for every path or those `paths` accepts.

    Use it to drop what a tool demonstrably does not preserve, and say why at the call site.
    """
    for f in fields:
        if f not in FIELDS:
            raise ValueError(f"unknown field {f!r}")
    blank = {f: (() if f == "xattrs" else None) for f in fields}
    return {p: (e._replace(**blank) if paths is None or paths(p) else e)
            for p, e in snap.items()}


def map_xattrs(snap: Mapping[bytes, Entry],
               keep: Callable[[bytes, str], bool]) -> Snapshot:
    """A copy keeping only the xattrs for which `keep(path, name)` is true."""
    return {p: e._replace(xattrs=tuple((n, v) for n, v in e.xattrs if keep(p, n)))
            for p, e in snap.items()}


# -- comparing --

def show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "."


def _fmt(field: str, value: Any) -> str:
    if value is None:
        return "-"
    if field == "mode":
        return f"{value:04o}"
    if field == "links":
        return "{" + ", ".join(sorted(show(p) for p in value)) + "}"
    if field == "xattrs":
        return "{" + ", ".join(f"{n}={v!r}" for n, v in value) + "}"
    if field == "mtime":
        return str(value)
    return repr(value)


def _ignores_dir_mtime(flt: DirMtimeFilter, path: bytes) -> bool:
    if flt is None or flt is False:
        return False
    if flt is True:
        return True
    if callable(flt):
        return bool(flt(path))
    return path in flt


def diff(a: Mapping[bytes, Entry], b: Mapping[bytes, Entry], *,
         ignore_dir_mtime: DirMtimeFilter = None, ignore: Collection[str] = (),
         names: tuple[str, str] = ("a", "b")) -> list[str]:
    """Human-readable differences between two snapshots, in path order.

    `ignore_dir_mtime`: dirs whose mtime is not compared — a set of paths, a predicate, or
    True for every dir. Use it for implicit parents no layer sets (every tool stamps those with
    the current time). `ignore`: fields not compared at all (see FIELDS).
    """
    na, nb = names
    out: list[str] = []
    for path in sorted(set(a) | set(b)):
        ea, eb = a.get(path), b.get(path)
        if ea is None or eb is None:
            have, e = (nb, eb) if ea is None else (na, ea)
            assert e is not None
            out.append(f"{show(path)}: only in {have} ({e.kind})")
            continue
        if ea.kind != eb.kind:
            out.append(f"{show(path)}: kind {ea.kind} ({na}) != {eb.kind} ({nb})")
            continue
        for field in FIELDS[1:]:
            if field in ignore:
                continue
            if (field == "mtime" and ea.kind == "dir"
                    and _ignores_dir_mtime(ignore_dir_mtime, path)):
                continue
            va, vb = getattr(ea, field), getattr(eb, field)
            if va != vb:
                out.append(f"{show(path)}: {field} {_fmt(field, va)} ({na}) != "
                           f"{_fmt(field, vb)} ({nb})")
    return out


def assert_same(a: Mapping[bytes, Entry], b: Mapping[bytes, Entry], *, limit: int = 30,
                msg: str = "", **kwargs: Any) -> None:
    """Fail with the first `limit` differences (kwargs as for `diff`); `msg` is added."""
    __tracebackhide__ = True
    diffs = diff(a, b, **kwargs)
    if diffs:
        more = f"\n  ... and {len(diffs) - limit} more" if len(diffs) > limit else ""
        note = f"\n(note: {msg})" if msg else ""
        raise AssertionError(f"{len(diffs)} difference(s):\n  " + "\n  ".join(diffs[:limit])
                             + more + note)


# -- JSON, to carry a snapshot out of another namespace --

def dumps(snap: Mapping[bytes, Entry]) -> str:
    def enc(e: Entry) -> list[Any]:
        return [e.kind, e.mode, e.uid, e.gid, e.size, e.sha256,
                None if e.target is None else e.target.hex(),
                None if e.rdev is None else list(e.rdev),
                [[n, v.hex()] for n, v in e.xattrs], e.mtime,
                None if e.links is None else sorted(p.hex() for p in e.links)]
    return json.dumps({p.hex(): enc(e) for p, e in snap.items()})


def loads(text: str) -> Snapshot:
    out: Snapshot = {}
    for p, v in json.loads(text).items():
        kind, mode, uid, gid, size, sha, target, rdev, xattrs, mtime, links = v
        out[bytes.fromhex(p)] = Entry(
            kind, mode, uid, gid, size, sha,
            None if target is None else bytes.fromhex(target),
            None if rdev is None else (rdev[0], rdev[1]),
            tuple((n, bytes.fromhex(x)) for n, x in xattrs), mtime,
            None if links is None else frozenset(bytes.fromhex(x) for x in links))
    return out


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    flags = set(argv) - set(args)
    if len(args) != 1:
        print("usage: treecompare.py ROOT [--seconds] [--no-mtimes] [--root-entry] "
              "[--no-trusted]", file=sys.stderr)
        return 2
    snap = snapshot(args[0], mtimes="--no-mtimes" not in flags, seconds="--seconds" in flags,
                    root_entry="--root-entry" in flags,
                    xattr_filter=(lambda n: not n.startswith("trusted."))
                    if "--no-trusted" in flags else None)
    sys.stdout.write(dumps(snap))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
