"""Benchmark inputs, built once and cached: a realistic 5-layer Debian image ("full") and a small
busybox one ("quick"), each as an OCI layout with gzip layers and one with zstd layers, plus a
docker-archive of the gzip one for `docker load`.

The full image is made the way `docker build` makes layers: layer 1 is a `debootstrap
--variant=minbase bookworm` rootfs (or, when debootstrap cannot run, a copy of host files), and
every later layer is the upper dir of a kernel overlay mount over the layers below, after the
step ran in the merged view. So whiteouts and opaque dirs are the ones the kernel makes, and the
upper dir is turned into a tar the way Docker's overlay2 differ does (see write_layer). umoci
assembles the OCI image (it gzips the layers); `ocilayers convert` makes the zstd copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# Bump when a recipe changes: the cache dir names include it, so old inputs are not reused.
RECIPE = "v1"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APP_UID = 1000
MIB = 1 << 20


@dataclass(frozen=True)
class BenchImage:
    """One cached input: `<dir>/oci-gzip`, `<dir>/oci-zstd`, `<dir>/docker-gzip.tar`."""

    dir: str
    meta: dict[str, Any]

    @property
    def gzip_dir(self) -> str:
        return os.path.join(self.dir, "oci-gzip")

    @property
    def zstd_dir(self) -> str:
        return os.path.join(self.dir, "oci-zstd")

    @property
    def docker_archive(self) -> str:
        return os.path.join(self.dir, "docker-gzip.tar")

    @property
    def tag(self) -> str:
        return str(self.meta["tag"])

    def blobs(self, compression: str) -> list[str]:
        return layer_blobs(self.gzip_dir if compression == "gzip" else self.zstd_dir)


def layer_blobs(oci_dir: str) -> list[str]:
    """Paths of the layer blobs of the (single) image in an OCI layout, base first."""
    def blob(digest: str) -> str:
        algo, hexpart = digest.split(":", 1)
        return os.path.join(oci_dir, "blobs", algo, hexpart)

    with open(os.path.join(oci_dir, "index.json")) as f:
        index = json.load(f)
    with open(blob(index["manifests"][0]["digest"])) as f:
        manifest = json.load(f)
    return [blob(layer["digest"]) for layer in manifest["layers"]]


def layout_blobs(out: str) -> tuple[str, Callable[[bytes], tuple[str, int]]]:
    """Make `out/blobs/sha256/` of a new OCI layout; returns it and `put(data)`, which stores a
    blob there and gives its digest and size."""
    import hashlib

    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs)

    def put(data: bytes) -> tuple[str, int]:
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(data)
        return f"sha256:{d}", len(data)

    return blobs, put


def log(msg: str) -> None:
    print(f"[build] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], **kw: object) -> None:
    subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload]


def ocilayers_argv() -> list[str]:
    """The `ocilayers` console script pip installed beside this interpreter (the install the
    in-process wrappers import too), else the one on PATH unless it is a pyenv shim (a bash
    script that execs `pyenv exec`: ~0.1 s more per start, not part of ocilayers), else
    `python -m ocilayers`."""
    beside = os.path.join(os.path.dirname(sys.executable), "ocilayers")
    if os.access(beside, os.X_OK):
        return [beside]
    exe = shutil.which("ocilayers")
    if exe and "/shims/" not in exe:
        return [exe]
    return [sys.executable, "-m", "ocilayers"]


def ocilayers_python() -> str:
    """The interpreter that runs `ocilayers_argv()`: its script's #! line, else this one."""
    argv = ocilayers_argv()
    if argv[0] == sys.executable:
        return sys.executable
    with contextlib.suppress(OSError), open(argv[0], "rb") as f:
        first = f.readline().decode(errors="replace")
        if first.startswith("#!") and "python" in first:
            parts = first[2:].split()
            if os.path.basename(parts[0]) == "env" and len(parts) > 1:
                return shutil.which(parts[1]) or sys.executable
            return parts[0]
    return sys.executable


# --- cache entry points ---

def ensure_image(kind: str, cache: str, repo: str, base: str = "auto") -> tuple[BenchImage, bool]:
    """The cached input of `kind` ("full" or "quick"), built first if missing. The flag says
    whether a build ran (it deletes its scratch tree: the caller may want to let ext4 settle)."""
    final = os.path.join(cache, f"{kind}-{RECIPE}")
    meta_path = os.path.join(final, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return BenchImage(final, json.load(f)), False
    os.makedirs(cache, exist_ok=True)
    if os.path.exists(final):  # an interrupted build: no meta.json was written
        remove_tree(final)
    scratch = tempfile.mkdtemp(prefix=f".build-{kind}-", dir=cache)
    out = os.path.join(scratch, "image")
    os.mkdir(out)
    t0 = time.monotonic()
    try:
        if kind == "full":
            meta = _build_full(scratch, out, base)
        else:
            meta = _build_quick(scratch, out, repo)
        img = BenchImage(out, meta)
        _write_variants(img)
        meta["compressed_bytes"] = {c: sum(os.path.getsize(b) for b in img.blobs(c))
                                    for c in ("gzip", "zstd")}
        meta["build_seconds"] = round(time.monotonic() - t0, 1)
        publish(out, meta, final)
    finally:
        remove_tree(scratch)
    with open(meta_path) as f:
        return BenchImage(final, json.load(f)), True


def _write_variants(img: BenchImage) -> None:
    log("zstd copy (ocilayers convert --compression zstd)")
    run([*ocilayers_argv(), "-q", "convert", img.gzip_dir, "-o", img.zstd_dir,
         "--format", "oci", "--compression", "zstd"], stdout=subprocess.DEVNULL)
    log("docker-archive copy for docker load (ocilayers convert --format docker-archive)")
    run([*ocilayers_argv(), "-q", "convert", img.gzip_dir, "-o", img.docker_archive,
         "--format", "docker-archive", "--compression", "gzip", "--tag", "ocilayers-bench:latest"],
        stdout=subprocess.DEVNULL)


def _assemble(oci_dir: str, tag: str, layers: list[tuple[str, str]], *, new: bool) -> None:
    """Add each (tar, created_by) as a layer with umoci (which gzips it)."""
    if new:
        run(["umoci", "init", "--layout", oci_dir])
        run(["umoci", "new", "--image", f"{oci_dir}:{tag}"])
    for tar, created_by in layers:
        run(["umoci", "raw", "add-layer", "--image", f"{oci_dir}:{tag}",
             "--history.author", "ocilayers benchmarks", "--history.created_by", created_by, tar])
    if new:
        run(["umoci", "config", "--image", f"{oci_dir}:{tag}", "--no-history",
             "--config.cmd", "/bin/bash", "--config.env",
             "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    run(["umoci", "gc", "--layout", oci_dir])


# --- the quick image: fixtures/demo plus one generated ~30 MB layer ---

def _build_quick(scratch: str, out: str, repo: str) -> dict[str, Any]:
    log("quick image: fixtures/demo + a generated ~30 MB layer")
    oci = os.path.join(out, "oci-gzip")
    shutil.copytree(os.path.join(repo, "fixtures", "demo"), oci)
    tree = os.path.join(scratch, "tree")
    generate_tree(os.path.join(tree, "opt", "data"), 30 * MIB, seed=1)
    tar = os.path.join(scratch, "data.tar")
    stats = write_layer(tree, tar, overlay=False)
    _assemble(oci, "latest", [(tar, "COPY data /opt/data (generated)")], new=False)
    return {"kind": "quick", "tag": "latest", "base": "fixtures/demo (busybox)",
            "layers": [None, None, None, None, {**stats, "created_by": "COPY data /opt/data"}],
            "uncompressed_bytes": _uncompressed(oci)}


def _uncompressed(oci_dir: str) -> int:
    total = 0
    for blob in layer_blobs(oci_dir):
        with open(blob, "rb") as f, subprocess.Popen(["gzip", "-dc"], stdin=f,
                                                     stdout=subprocess.PIPE) as p:
            assert p.stdout is not None
            while chunk := p.stdout.read(MIB):
                total += len(chunk)
    return total


# --- the full image ---

@dataclass(frozen=True)
class Step:
    created_by: str
    apply: Callable[[str], None]  # gets the merged dir (an overlay mount)
    chroot: bool = False           # needs /proc, /dev and DNS inside the merged dir


def _build_full(scratch: str, out: str, base: str) -> dict[str, Any]:
    rootfs = os.path.join(scratch, "rootfs")
    method = ""
    if base in ("auto", "debootstrap"):
        try:
            _debootstrap(rootfs)
            method = "debootstrap"
        except (OSError, subprocess.CalledProcessError) as exc:
            if base == "debootstrap":
                raise
            log(f"debootstrap failed ({exc}); falling back to a copy of host files")
            if os.path.exists(rootfs):
                remove_tree(rootfs)
    if not method:
        _host_copy(rootfs, HOST_BASE)
        method = "host-copy"
    _docker_tweaks(rootfs)
    steps = [
        Step("RUN apt-get update && apt-get install -y --no-install-recommends python3 git "
             "vim-tiny curl ca-certificates && rm -rf /var/lib/apt/lists/*",
             _apt_install, chroot=True)
        if method == "debootstrap" else
        Step("COPY host files (python, perl, git, vim, i18n): debootstrap was unavailable",
             lambda m: _host_copy(m, HOST_EXTRA)),
        Step("RUN rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* && rm -rf "
             "/usr/share/locale/<all but en*, locale.alias>", _slim),
        Step("RUN (edits as useradd -m -u 1000 app makes them) && edit /etc/bash.bashrc, "
             "/etc/apt/sources.list && rm -rf /etc/apt/apt.conf.d && mkdir /etc/apt/apt.conf.d "
             "(new files)", _configure),
        Step("COPY --chown=1000:1000 app /opt/app (generated ~10 MB)",
             lambda m: generate_tree(os.path.join(m, "opt", "app"), 10 * MIB, seed=5,
                                     owner=(APP_UID, APP_UID))),
    ]
    tars: list[tuple[str, str]] = []
    layer_meta = []
    created_by = f"debootstrap --variant=minbase {SUITE} (+ docker-style apt config)" \
        if method == "debootstrap" else "host-files copy (debootstrap unavailable)"
    tar = os.path.join(scratch, "layer1.tar")
    log("layer 1: tar the base rootfs")
    layer_meta.append({**write_layer(rootfs, tar, overlay=False), "created_by": created_by})
    tars.append((tar, created_by))
    lowers = [rootfs]  # top-most first, as overlayfs wants
    for n, step in enumerate(steps, start=2):
        log(f"layer {n}: {step.created_by[:90]}")
        upper = os.path.join(scratch, f"upper{n}")
        with overlay(lowers, upper, os.path.join(scratch, f"work{n}"),
                     os.path.join(scratch, "merged"), chroot=step.chroot) as merged:
            step.apply(merged)
        tar = os.path.join(scratch, f"layer{n}.tar")
        layer_meta.append({**write_layer(upper, tar, overlay=True), "created_by": step.created_by})
        tars.append((tar, step.created_by))
        lowers.insert(0, upper)
    oci = os.path.join(out, "oci-gzip")
    log("assemble the OCI image with umoci (gzip)")
    _assemble(oci, "bench", tars, new=True)
    total = sum(m["bytes"] for m in layer_meta)
    return {"kind": "full", "tag": "bench", "base": method, "layers": layer_meta,
            "uncompressed_bytes": total}


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources), for debootstrap."""
    paths = ["/etc/apt/sources.list"]
    with contextlib.suppress(OSError):
        d = "/etc/apt/sources.list.d"
        paths += [os.path.join(d, n) for n in sorted(os.listdir(d))]
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for block in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suites = re.search(r"^Suites:(.*)$", block, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == SUITE:
                return m.group(1)
    return DEFAULT_MIRROR


def _debootstrap(rootfs: str) -> None:
    if not shutil.which("debootstrap"):
        raise OSError("debootstrap is not installed")
    mirror = debian_mirror()
    log(f"debootstrap --variant=minbase {SUITE} {mirror} (about a minute)")
    with open(rootfs + ".log", "wb") as logf:
        run(["debootstrap", "--variant=minbase", SUITE, rootfs, mirror],
            stdout=logf, stderr=subprocess.STDOUT)


def _docker_tweaks(rootfs: str) -> None:
    """What Debian's Docker images do: no package caches or lists, empty /dev, apt set to clean
    up after itself, services never started by maintainer scripts."""
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "dev"):
        d = os.path.join(rootfs, sub)
        if os.path.isdir(d):
            for name in os.listdir(d):
                p = os.path.join(d, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    if name != "partial":
                        shutil.rmtree(p)
                else:
                    os.unlink(p)
    for name in ("pkgcache.bin", "srcpkgcache.bin"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(rootfs, "var/cache/apt", name))
    _write(rootfs, "etc/hostname", "localhost\n")
    _write(rootfs, "etc/resolv.conf", "")
    _write(rootfs, "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
    clean = ('"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
             '/var/cache/apt/*.bin || true"')
    _write(rootfs, "etc/apt/apt.conf.d/docker-clean",
           f"DPkg::Post-Invoke {{ {clean}; }};\nAPT::Update::Post-Invoke {{ {clean}; }};\n"
           'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n')
    _write(rootfs, "etc/apt/apt.conf.d/docker-no-languages", 'Acquire::Languages "none";\n')


def _write(root: str, rel: str, text: str, mode: int = 0o644) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _apt_install(merged: str) -> None:
    script = ("apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 git "
              "vim-tiny curl ca-certificates && rm -rf /var/lib/apt/lists/*")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "HOME": "/root"}
    run(["chroot", merged, "/bin/sh", "-c", script], env=env, stdout=subprocess.DEVNULL)


def _rm(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _slim(merged: str) -> None:
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/info"):
        d = os.path.join(merged, sub)
        if os.path.isdir(d):
            for name in os.listdir(d):
                _rm(os.path.join(d, name))
    d = os.path.join(merged, "usr/share/locale")
    if os.path.isdir(d):
        for name in os.listdir(d):
            if not name.startswith("en") and name != "locale.alias":
                _rm(os.path.join(d, name))


def _configure(merged: str) -> None:
    """Config-file edits as a Dockerfile RUN makes them: useradd (passwd, group, shadow,
    gshadow, a home from /etc/skel), appended and edited files, and one directory replaced by
    a new one of the same name (rm -rf + mkdir: the kernel marks it opaque)."""
    def edit(rel: str, fn: Callable[[str], str]) -> None:
        path = os.path.join(merged, rel)
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
            st = os.stat(path)
            with open(path, "w") as f:
                f.write(fn(text))
            os.chmod(path, st.st_mode & 0o7777)

    edit("etc/passwd", lambda t: t + f"app:x:{APP_UID}:{APP_UID}::/home/app:/bin/bash\n")
    edit("etc/group", lambda t: t + f"app:x:{APP_UID}:\n")
    edit("etc/shadow", lambda t: t + "app:!:19700:0:99999:7:::\n")
    edit("etc/gshadow", lambda t: t + "app:!::\n")
    home = os.path.join(merged, "home", "app")
    skel = os.path.join(merged, "etc", "skel")
    if os.path.isdir(skel):
        shutil.copytree(skel, home, symlinks=True)
    else:
        os.makedirs(home)
    for dirpath, _dirs, files in os.walk(home):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in files)]:
            os.lchown(p, APP_UID, APP_UID)
    edit("etc/bash.bashrc", lambda t: t + "\nexport PS1='\\u@bench:\\w\\$ '\nalias ll='ls -l'\n")
    edit("etc/apt/sources.list", lambda t: t.replace(" main", " main contrib"))
    edit("etc/debian_version", lambda t: t.strip() + "+bench\n")
    conf = os.path.join(merged, "etc", "apt", "apt.conf.d")
    if os.path.isdir(conf):
        shutil.rmtree(conf)
    os.makedirs(conf)
    _write(merged, "etc/apt/apt.conf.d/90bench", 'APT::Install-Recommends "false";\n')
    _write(merged, "etc/apt/apt.conf.d/91bench", 'APT::Install-Suggests "false";\n')
    _write(merged, "etc/profile.d/bench.sh", "umask 022\n")


# What the fallback copies from the host (relative to /), with a byte budget (MiB) each: real
# binaries, libraries, docs and locales. The budget a missing dir leaves goes to the next one.
HOST_BASE = [("usr/lib/x86_64-linux-gnu", 40), ("usr/bin", 20), ("usr/sbin", 5),
             ("usr/share/locale", 10), ("usr/share/doc", 10), ("usr/share/man", 8),
             ("usr/share/zoneinfo", 5), ("usr/share/i18n", 8), ("usr/share/perl5", 2),
             ("etc/skel", 1)]
HOST_EXTRA = [("usr/lib/python3.11", 60), ("usr/share/perl", 20), ("usr/lib/git-core", 20),
              ("usr/share/vim", 20), ("usr/lib/python3/dist-packages", 20),
              ("usr/share/locale", 10)]
BIG_FILE = 8 * MIB  # skipped: a few huge libraries would eat a dir's whole budget


def _host_copy(dst_root: str, subdirs: list[tuple[str, int]]) -> None:
    """Copy real files from the host until each dir's budget is spent: the fallback when
    debootstrap cannot run. Paths that exist already are left alone. The host's /etc is not
    copied (it holds this machine's accounts and secrets): a minimal one is written."""
    os.makedirs(dst_root, exist_ok=True)
    for name, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):
        if not os.path.lexists(os.path.join(dst_root, name)):
            os.symlink(target, os.path.join(dst_root, name))
    for d in ("dev", "proc", "sys", "tmp", "run", "var/tmp", "var/log", "home", "root",
              "etc/apt/apt.conf.d"):
        os.makedirs(os.path.join(dst_root, d), exist_ok=True)
    etc = {"etc/passwd": "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:"
                         "/nonexistent:/usr/sbin/nologin\n",
           "etc/group": "root:x:0:\nshadow:x:42:\nnogroup:x:65534:\n",
           "etc/shadow": "root:*:19700:0:99999:7:::\nnobody:*:19700:0:99999:7:::\n",
           "etc/gshadow": "root:*::\nshadow:*::\nnogroup:*::\n",
           "etc/bash.bashrc": "[ -z \"$PS1\" ] && return\nshopt -s checkwinsize\n",
           "etc/debian_version": "12.0\n",
           "etc/apt/sources.list": f"deb {DEFAULT_MIRROR} {SUITE} main\n",
           "etc/apt/apt.conf.d/70debconf": 'DPkg::Pre-Install-Pkgs {"true";};\n'}
    for rel, text in etc.items():
        if not os.path.lexists(os.path.join(dst_root, rel)):
            _write(dst_root, rel, text, 0o640 if "shadow" in rel else 0o644)
    spare = 0
    for sub, mib in subdirs:
        left = spare + mib * MIB
        for dirpath, dirs, files in os.walk(os.path.join("/", sub)):
            dirs.sort()
            rel = os.path.relpath(dirpath, "/")
            os.makedirs(os.path.join(dst_root, rel), exist_ok=True)
            for name in sorted(files):
                src, dst = os.path.join(dirpath, name), os.path.join(dst_root, rel, name)
                try:
                    st = os.lstat(src)
                    if os.path.lexists(dst) or st.st_size > min(left, BIG_FILE):
                        continue
                    if stat.S_ISLNK(st.st_mode):
                        os.symlink(os.readlink(src), dst)
                    elif stat.S_ISREG(st.st_mode) and os.access(src, os.R_OK):
                        shutil.copy2(src, dst)
                        left -= st.st_size
                    else:
                        continue
                    os.lchown(dst, st.st_uid, st.st_gid)
                except OSError:
                    continue
        spare = max(0, left)


# --- generated content ---

def generate_tree(root: str, total: int, seed: int, owner: tuple[int, int] | None = None) -> None:
    """A deterministic tree of about `total` bytes that looks like an application: nested dirs,
    mostly small text files (compressible), some binary assets (not), a few symlinks."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
             for _ in range(800)]
    corpus = "\n".join(" ".join(rng.choices(words, k=rng.randint(3, 14)))
                       for _ in range(50_000)).encode()
    made = 0
    n = 0
    dirs = [root]
    os.makedirs(root, exist_ok=True)
    while made < total:
        if n % 25 == 0:
            parent = rng.choice(dirs[-20:])
            d = os.path.join(parent, f"{rng.choice(words)}{len(dirs)}")
            os.makedirs(d, exist_ok=True)
            dirs.append(d)
        d = rng.choice(dirs[-8:])
        size = min(int(rng.lognormvariate(8.3, 1.4)), 3 * MIB, total - made)
        binary = rng.random() < 0.08
        if binary:
            data = rng.randbytes(size)
            ext = rng.choice([".png", ".so", ".bin", ".woff2"])
        else:
            start = rng.randrange(0, len(corpus) - size) if size < len(corpus) else 0
            data = corpus[start:start + size]
            ext = rng.choice([".py", ".js", ".json", ".txt", ".html", ".css", ".md"])
        path = os.path.join(d, f"{rng.choice(words)}_{n}{ext}")
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o755 if ext == ".so" else 0o644)
        if n % 200 == 7:
            os.symlink(os.path.basename(path), path + ".link")
        made += len(data)
        n += 1
    if owner is not None:
        for dirpath, dnames, fnames in os.walk(root):
            for p in [dirpath, *(os.path.join(dirpath, x) for x in dnames + fnames)]:
                os.lchown(p, *owner)


# --- layer tar writing (Docker overlay2 differ conventions) ---

def _walk(top: str, rel: str = "") -> Iterator[tuple[str, str, os.stat_result]]:
    """Go filepath.WalkDir order: depth first, each dir's entries sorted by byte name."""
    with os.scandir(os.path.join(top, rel) if rel else top) as it:
        entries = sorted(it, key=lambda e: os.fsencode(e.name))
    for e in entries:
        arc = f"{rel}/{e.name}" if rel else e.name
        st = e.stat(follow_symlinks=False)
        yield arc, e.path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(top, arc)


def write_layer(top: str, out: str, *, overlay: bool) -> dict[str, Any]:
    """Tar the dir `top` as a layer. With `overlay`, `top` is an overlay upper dir: a whiteout
    (char 0/0) becomes `.wh.<name>` and an opaque dir gets `<dir>/.wh..wh..opq` after its
    entry, as Docker writes them. No root entry, no owner names, no xattrs, hardlinks kept;
    the tar ends with exactly two zero blocks. Returns counts for the image description."""
    stats = {"entries": 0, "files": 0, "dirs": 0, "whiteouts": 0, "opaque_dirs": 0, "bytes": 0}
    with open(out, "wb") as raw:
        tf = tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        for arc, path, st in _walk(top):
            stats["entries"] += 1
            if overlay and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                ti = tarfile.TarInfo(_wh(arc))
                ti.mode, ti.uid, ti.gid, ti.mtime = 0o600, st.st_uid, st.st_gid, int(st.st_mtime)
                tf.addfile(ti)
                stats["whiteouts"] += 1
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue
            ti = tf.gettarinfo(path, arc)
            ti.uname = ti.gname = ""
            ti.mtime = int(st.st_mtime)
            if ti.isdir():
                ti.name = arc + "/"
                stats["dirs"] += 1
            if ti.isreg():
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
                stats["files"] += 1
            else:
                tf.addfile(ti)
            if overlay and ti.isdir() and _is_opaque(path):
                oti = tarfile.TarInfo(arc + "/.wh..wh..opq")
                oti.mode, oti.uid, oti.gid, oti.mtime = st.st_mode & 0o7777, st.st_uid, st.st_gid, 0
                tf.addfile(oti)
                stats["opaque_dirs"] += 1
        tf.close()
    # tarfile pads to a 10240-byte record; Docker's layers end right after two zero blocks.
    os.truncate(out, tf.offset)
    stats["bytes"] = tf.offset
    return stats


def _wh(arc: str) -> str:
    head, _, name = arc.rpartition("/")
    return f"{head}/.wh.{name}" if head else f".wh.{name}"


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


# --- mounts and removal ---

def _mounts_under(path: str) -> list[str]:
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == path or mnt.startswith(path + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def umount_under(path: str) -> None:
    for mnt in _mounts_under(path):
        if subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL).returncode:
            subprocess.run(["umount", "-l", mnt], check=False)


def publish(build_dir: str, meta: dict[str, Any], final: str) -> None:
    """Write `meta.json` into a finished build dir and rename it into place: a cached input
    exists, complete, or not at all (the meta file is what says it is complete)."""
    with open(os.path.join(build_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.rename(build_dir, final)


def ensure_derived(name: str, cache: str, img: BenchImage,
                   build: Callable[[str], dict[str, Any]]) -> tuple[str, dict[str, Any], bool]:
    """A cached input derived from the benchmark image `img`: `CACHE/NAME`, built by
    `build(scratch_dir) -> meta` when missing or made from another build of the image
    (told apart by the image's index.json), and published whole. Returns (dir, meta,
    whether a build ran)."""
    import hashlib

    final = os.path.join(cache, name)
    meta_path = os.path.join(final, "meta.json")
    with open(os.path.join(img.gzip_dir, "index.json"), "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("image_index_sha256") == key:
            return final, meta, False
        log(f"{final} was made from another build of the image: rebuilding it")
    meta = build_published(cache, final, name, lambda d: {**build(d), "image_index_sha256": key})
    return final, meta, True


def build_published(cache: str, final: str, name: str,
                    build: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Build a cached input: `build(scratch) -> meta` in a scratch dir in `cache`, then
    `publish` it as `final` with its build time in the meta (whatever an interrupted build left
    at `final` is removed first; the scratch dir is removed on failure). Returns the meta as
    written."""
    if os.path.exists(final):  # an interrupted build: no meta.json was written
        remove_tree(final)
    scratch = tempfile.mkdtemp(prefix=f".build-{name}-", dir=cache)
    os.chmod(scratch, 0o755)
    t0 = time.monotonic()
    try:
        meta = build(scratch)
        meta["build_seconds"] = round(time.monotonic() - t0, 1)
        publish(scratch, meta, final)
    except BaseException:
        remove_tree(scratch)
        raise
    with open(os.path.join(final, "meta.json")) as f:
        return dict(json.load(f))


def remove_stale_builds(cache: str) -> list[str]:
    """Remove the scratch dirs (`.build-*`) an interrupted input build left in `cache`, the
    mounts left inside them first; call it holding the cache's lock. Returns what it removed."""
    stale = sorted(os.path.join(cache, n) for n in os.listdir(cache) if n.startswith(".build-"))
    for path in stale:
        remove_tree(path)
    return stale


def remove_tree(path: str) -> None:
    """rm -rf, but never through a mount point left inside (a bind of /dev, /proc...)."""
    if not os.path.lexists(path):
        return
    umount_under(path)
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path)


@contextlib.contextmanager
def overlay(lowers: list[str], upper: str, work: str, merged: str, *,
            chroot: bool) -> Iterator[str]:
    """Mount an overlay of `lowers` (top-most first) with a fresh upper dir at `merged`; with
    `chroot`, also /proc, a minimal /dev (a tmpfs and a new devpts instance, not the host's)
    and the host's resolv.conf."""
    for d in (upper, work, merged):
        os.makedirs(d, exist_ok=True)
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}", merged])
    try:
        if chroot:
            run(["mount", "-t", "proc", "proc", os.path.join(merged, "proc")])
            dev = os.path.join(merged, "dev")
            run(["mount", "-t", "tmpfs", "-o", "mode=755", "devtmp", dev])
            for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8),
                                ("urandom", 9)):
                os.mknod(os.path.join(dev, name), 0o666 | stat.S_IFCHR, os.makedev(1, minor))
                os.chmod(os.path.join(dev, name), 0o666)  # mknod applies the umask
            os.mkdir(os.path.join(dev, "pts"))
            run(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts",
                 os.path.join(dev, "pts")])
            os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
            resolv = os.path.join(merged, "etc", "resolv.conf")
            if os.path.exists("/etc/resolv.conf") and os.path.isfile(resolv):
                run(["mount", "--bind", "/etc/resolv.conf", resolv])
        yield merged
    finally:
        umount_under(merged)
