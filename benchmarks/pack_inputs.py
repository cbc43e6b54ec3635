"""Input of the `pack` group, built once and cached: a real overlay upper dir, the lower layers
it was made over, and a umoci bundle whose rootfs is the merged view after the same change.

How it is made (the way `docker build` / `docker commit` make a layer):
1. the cached benchmark image is unpacked with `ocilayers unpack` into a store of its own under
   the cache dir; its layers' diff dirs are the lowers (top-most first, as overlayfs wants);
2. a kernel overlay mount of those lowers with a fresh upper and work dir; in the merged view the
   change script below runs (what a build step does: copies of real trees from the image into new
   paths as an installer would, config edits, files and whole trees deleted, dirs replaced, a dir
   moved); unmounted, the upper dir is what `ocilayers pack` and `tar` read;
3. `umoci unpack` of the same image makes a bundle (rootfs + go-mtree manifest), and the same change
   script runs in its rootfs. `umoci repack` then diffs rootfs against the mtree: it is timed
   alone, into a fresh copy of the image layout each run (blobs hardlinked, the bundle untouched:
   no --refresh-bundle, so every run sees the same change).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from dataclasses import dataclass
from typing import Any

from inputs import BenchImage, ensure_derived, log, ocilayers_argv, overlay, remove_tree, run

PACK_RECIPE = "v1"  # bump when a change script changes

# Run with cwd = the root to change (the overlay's merged view, or the umoci bundle's rootfs).
# Missing sources are skipped (the host-copy variant of the image lacks some paths); what the
# upper dir really holds is counted into meta.json.
_PRELUDE = r"""
set -eu
cpa() { if [ -e "$1" ]; then mkdir -p "$(dirname "$2")"; cp -a "$1" "$2"; fi; }
replace_dir() { rm -rf "$1"; mkdir -p "$1"; }  # rm -rf + mkdir: the kernel marks it opaque
"""

FULL_SCRIPT = _PRELUDE + r"""
# install-like: a vendored runtime and libraries copied from the image's own files (~160 MB)
cpa usr/lib/python3.11 usr/local/lib/python3.11/dist-packages/vendored
cpa usr/lib/x86_64-linux-gnu opt/runtime/lib
cpa usr/share opt/runtime/share
cpa usr/lib/git-core opt/runtime/libexec/git-core
if [ -e opt/runtime/lib/libc.so.6 ]; then
    ln opt/runtime/lib/libc.so.6 opt/runtime/lib/libc-hardlink.so.6
    ln opt/runtime/lib/libc.so.6 opt/runtime/libc.so.6
fi
# edits: copy-ups of existing files and dirs
printf 'svc:x:1001:1001::/srv:/usr/sbin/nologin\n' >> etc/passwd
printf 'svc:x:1001:\n' >> etc/group
if [ -f usr/lib/python3.11/os.py ]; then printf '\n# edited\n' >> usr/lib/python3.11/os.py; fi
if [ -f usr/bin/bash ]; then touch -d @1700000000 usr/bin/bash; fi
chmod 0700 root
mkdir -p srv && chown 1001:1001 srv
# deletions: single files and whole trees (whiteouts)
rm -f var/lib/dpkg/info/*.md5sums
rm -rf usr/share/zoneinfo/Asia usr/share/zoneinfo/Europe usr/lib/python3.11/pydoc_data \
       usr/lib/python3.11/unittest usr/bin/perlbug usr/bin/perlthanks
# dirs replaced by new ones of the same name (opaque dirs)
replace_dir etc/apt/sources.list.d
printf 'deb http://deb.debian.org/debian bookworm-backports main\n' \
    > etc/apt/sources.list.d/backports.list
replace_dir var/cache/debconf
printf 'Name: debconf/frontend\nValue: Noninteractive\n' > var/cache/debconf/config.dat
replace_dir usr/share/zoneinfo/America
if [ -f usr/share/zoneinfo/Etc/UTC ]; then
    cp -a usr/share/zoneinfo/Etc/UTC usr/share/zoneinfo/America/New_York
fi
# a dir moved (without redirect_dir, mv copies it and deletes the old one: whiteout + new tree)
if [ -d usr/share/perl5/Debconf ]; then
    mv usr/share/perl5/Debconf usr/share/perl5/Debconf.moved
fi
"""

QUICK_SCRIPT = _PRELUDE + r"""
cpa opt/data opt/data-copy
cpa bin usr/local/bin-copy
printf 'svc:x:1001:1001::/srv:/bin/sh\n' >> etc/passwd
rm -f etc/motd
for d in opt/data/*/; do rm -rf "$d"; break; done
replace_dir var/cache
printf 'x\n' > var/cache/new
"""


@dataclass(frozen=True)
class PackInput:
    """`<dir>/upper`, `<dir>/store` (lowers), `<dir>/bundle` (umoci)."""

    dir: str
    meta: dict[str, Any]
    image: BenchImage

    @property
    def upper(self) -> str:
        return os.path.join(self.dir, "upper")

    @property
    def bundle(self) -> str:
        return os.path.join(self.dir, "bundle")

    @property
    def lowers(self) -> list[str]:
        """The lower diff dirs, top-most first."""
        return [os.path.join(self.dir, "store", "overlay2", c, "diff")
                for c in reversed(self.meta["lower_cache_ids"])]


def ensure_pack_input(kind: str, cache: str, img: BenchImage) -> tuple[PackInput, bool]:
    """The cached pack input for image `img` (built first if missing or made from another
    build of the image). The flag says whether a build ran."""
    final, meta, built = ensure_derived(f"pack-{kind}-{PACK_RECIPE}", cache, img,
                                        lambda scratch: _build(kind, scratch, img))
    return PackInput(final, meta, img), built


def _build(kind: str, scratch: str, img: BenchImage) -> dict[str, Any]:
    script = FULL_SCRIPT if kind == "full" else QUICK_SCRIPT
    log(f"pack input: unpack the {kind} image with ocilayers (the lower layers)")
    out = subprocess.run([*ocilayers_argv(), "-q", "--root", os.path.join(scratch, "store"),
                          "unpack", img.gzip_dir, "--json"], check=True, capture_output=True,
                         text=True).stdout
    cache_ids = [layer["cache_id"] for layer in json.loads(out)["layers"]]  # base first
    lowers = [os.path.join(scratch, "store", "overlay2", c, "diff") for c in reversed(cache_ids)]
    upper = os.path.join(scratch, "upper")
    log("pack input: run the change in an overlay mount over those layers")
    with overlay(lowers, upper, os.path.join(scratch, "work"), os.path.join(scratch, "merged"),
                 chroot=False) as merged:
        run(["bash", "-c", script], cwd=merged)
    remove_tree(os.path.join(scratch, "work"))
    os.rmdir(os.path.join(scratch, "merged"))
    log("pack input: umoci unpack the same image into a bundle and run the same change there")
    bundle = os.path.join(scratch, "bundle")
    run(["umoci", "unpack", "--image", f"{img.gzip_dir}:{img.tag}", bundle],
        stdout=subprocess.DEVNULL)
    run(["bash", "-c", script], cwd=os.path.join(bundle, "rootfs"))
    return {"kind": kind, "recipe": PACK_RECIPE, "lower_cache_ids": cache_ids,
            "change_script": script.strip(), "upper": upper_stats(upper)}


def upper_stats(top: str) -> dict[str, int]:
    """What the upper dir holds: entries, file bytes, whiteouts, opaque dirs, hardlinks."""
    s = {"entries": 0, "files": 0, "dirs": 0, "symlinks": 0, "whiteouts": 0, "opaque_dirs": 0,
         "hardlinked_files": 0, "file_bytes": 0}
    seen: set[tuple[int, int]] = set()
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            s["entries"] += 1
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                s["whiteouts"] += 1
            elif stat.S_ISDIR(st.st_mode):
                s["dirs"] += 1
                try:
                    if os.getxattr(p, "trusted.overlay.opaque", follow_symlinks=False) == b"y":
                        s["opaque_dirs"] += 1
                except OSError:
                    pass
            elif stat.S_ISLNK(st.st_mode):
                s["symlinks"] += 1
            elif stat.S_ISREG(st.st_mode):
                s["files"] += 1
                if st.st_nlink > 1:
                    s["hardlinked_files"] += 1
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                s["file_bytes"] += st.st_size
    return s


def fresh_layout(src: str, dst: str) -> None:
    """A copy of the OCI layout `src` for umoci repack to write into: blobs hardlinked (they are
    immutable, umoci writes new ones beside them), index.json and oci-layout copied."""
    os.makedirs(dst)
    for dirpath, _dirs, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            s, d = os.path.join(dirpath, name), os.path.join(dst, rel, name)
            if rel.startswith("blobs"):
                os.link(s, d)
            else:
                with open(s, "rb") as fi, open(d, "wb") as fo:
                    fo.write(fi.read())


def top_layer_size(layout: str, tag: str | None) -> int:
    """Size of the top layer blob of the image tagged `tag` in `layout` (what repack or
    append wrote); `tag` None: the layout's only image."""
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    if tag is None:
        (desc,) = index["manifests"]
    else:
        desc = next(m for m in index["manifests"]
                    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)

    def blob(digest: str) -> str:
        algo, h = digest.split(":", 1)
        return os.path.join(layout, "blobs", algo, h)

    with open(blob(desc["digest"])) as f:
        manifest = json.load(f)
    return int(manifest["layers"][-1]["size"])
