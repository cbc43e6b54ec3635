#!/usr/bin/env python3
"""A fresh, journaled ext4 for the harness's cache dir: a sparse file on the disk, a loop device
with direct I/O (no second page cache for the file behind it), mounted at DIR, with the inputs of
an existing cache dir copied in.

    sudo python3 benchmarks/scratch_fs.py make /mnt/olb [--gib 16] [--from /var/tmp/ocilayers-bench]
    (--gib 48 for the smallfiles group: ~14 GB and 3.5M inodes; with --keep, `remove` is also the
    fastest clean-up there is)
    sudo python3 benchmarks/run.py --cache /mnt/olb --only commit
    sudo python3 benchmarks/scratch_fs.py remove /mnt/olb

Why: the VM's disk here is an ext4 without a journal. Such an ext4 skips every inode freed in the
last 60-360 s when it looks for a free one, and each skip costs a buffer lookup: for minutes
after a big deletion (another run's clean-up), every tool creating files in those block groups
runs several times slower (see measure.ext4_without_journal). A host running dockerd normally
has a journal. Every tool of a run writes to the same fs, so the comparison stays side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

IMAGE = "/var/tmp/ocilayers-bench-scratch.img"
# What a run reads from the cache dir: inputs, not results or leftovers.
SKIP = {"runs", ".lock", ".cleaned", "results-quick.json", "lost+found"}


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def make(target: str, gib: int, source: str, image: str) -> None:
    if os.path.ismount(target):
        sys.exit(f"scratch_fs: {target} is already a mount point")
    if os.path.exists(image):
        sys.exit(f"scratch_fs: {image} exists (remove it, or `remove` the last scratch fs)")
    os.makedirs(target, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(gib << 30)
    # (a journal: mke2fs' default.) An inode per 8 KiB, not 16: the smallfiles group makes
    # 3.5M files of 600 bytes, each in a 4 KiB block.
    run("mkfs.ext4", "-q", "-F", "-i", "8192", image)
    loop = run("losetup", "--direct-io=on", "-f", "--show", image)
    try:
        run("mount", loop, target)
    except subprocess.CalledProcessError:
        run("losetup", "-d", loop)  # leave nothing attached to a file about to be removed
        os.unlink(image)
        raise
    names = sorted(n for n in os.listdir(source) if n not in SKIP) if os.path.isdir(source) \
        else []
    if names:
        run("cp", "-a", "--", *(os.path.join(source, n) for n in names), target + "/")
    os.sync()
    print(f"{target}: ext4 with a journal on {loop} ({image}, {gib} GiB sparse, direct I/O); "
          f"copied from {source}: {', '.join(names) or 'nothing'}")


def remove(target: str, image: str) -> None:
    loop = run("findmnt", "-n", "-o", "SOURCE", "--target", target) \
        if os.path.ismount(target) else ""
    if loop:
        run("umount", target)
        if loop.startswith("/dev/loop"):
            run("losetup", "-d", loop)
    if os.path.exists(image):
        os.unlink(image)
    print(f"{target}: unmounted; {image} removed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("make", "remove"))
    p.add_argument("target", help="the mount point (the harness's --cache)")
    p.add_argument("--gib", type=int, default=16, help="size of the sparse file (default 16)")
    p.add_argument("--from", dest="source", default=os.environ.get(
        "OCILAYERS_BENCH_CACHE", "/var/tmp/ocilayers-bench"),
        help="the cache dir whose inputs are copied in (default: the harness's)")
    p.add_argument("--image", default=IMAGE, help=f"the file behind it (default {IMAGE})")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("scratch_fs: needs root (losetup, mount)")
    if args.action == "make":
        make(os.path.abspath(args.target), args.gib, args.source, args.image)
    else:
        remove(os.path.abspath(args.target), args.image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
