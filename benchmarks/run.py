#!/usr/bin/env python3
"""ocilayers benchmark harness.

    python benchmarks/run.py [--quick] [--runs N] [--cache DIR] [--no-docker] [--profile]
                             [--json PATH] [--keep]
                             [--only unpack|pack|tarsplit|commit|growth|registry|smallfiles|
                                     memory]...

Builds (once, cached) a realistic 5-layer Debian image in gzip and zstd, an overlay upper dir
made over it, and ~2 GiB layers, then times `ocilayers unpack` and `ocilayers pack` against
umoci, tar with gzip/zstd and (when a daemon can start) docker load, and `ocilayers commit` of
the upper dir against `docker commit` of a container holding it, `ocilayers history` from the
store against history from the archive and `gzip -dc | tar -t`, and `ocilayers squash --all`
against `ocilayers pack` of the flattened image, `ocilayers unpack docker://` and `ocilayers
push` against docker pull/push and skopeo (+ umoci) through a loopback docker-registry,
alternating the tools run by run, measures how much of an unpack goes to tar-split and `size`,
times `ocilayers unpack` of one layer of 100,000 small files (file writer processes, threads,
none) against gzip/zstd | tar and umoci, and the peak RSS of every ocilayers process on big
layers. Prints a table per group. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import io
import json
import os
import pstats
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import dockerd  # noqa: E402
import growth  # noqa: E402
import memory  # noqa: E402
import registry  # noqa: E402
import smallfiles  # noqa: E402
from inputs import (  # noqa: E402
    BenchImage,
    ensure_image,
    ocilayers_argv,
    ocilayers_python,
    remove_stale_builds,
    remove_tree,
)
from measure import (  # noqa: E402
    EXT4_RECENTLY_DELETED_S,
    PROBE_SLOW_US,
    Sample,
    ext4_without_journal,
    git_describe,
    loadavg,
    machine_info,
    run_measured,
)
from pack_inputs import (  # noqa: E402
    PackInput,
    ensure_pack_input,
    fresh_layout,
    top_layer_size,
    upper_stats,
)

GROUPS = ("unpack", "pack", "tarsplit", "commit", "growth", "registry", "smallfiles", "memory")
# What --quick runs without --only: memory is for full runs only; commit's and growth's quick
# variants run when asked (`--quick --only commit`), so that a plain --quick stays under a
# minute. smallfiles has no quick variant: with --quick it runs its one input when named.
QUICK_GROUPS = ("unpack", "pack", "tarsplit")
DEFAULT_CACHE = "/var/tmp/ocilayers-bench"
SETTLE_NOTE = ("an ext4 without a journal (the VM's disk here) creates files several times "
               "slower for up to 6 min after many deletions, in the block groups they freed "
               "(measure.ext4_without_journal)")
CLEANED = ".cleaned"  # in the cache dir: when a run last deleted its outputs


def mark_cleanup(cache: str) -> None:
    with open(os.path.join(cache, CLEANED), "w") as f:
        f.write(f"{time.time():.0f}\n")


def last_cleanup(cache: str) -> float:
    """When a run last deleted its outputs in `cache` (0 if none is on record)."""
    try:
        with open(os.path.join(cache, CLEANED)) as f:
            return float(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


MIB = 1 << 20
RESULTS_FORMAT = 2
exec_roots: list[str] = []  # throwaway dockerds' scratch dirs in /tmp, deleted after all timings


@dataclass
class Case:
    """One row of a table. `measure(run_dir, round)` makes one timed run; `output(run_dir)`, if
    given, is the size in bytes of what the run wrote (a layer blob), read after the run."""

    key: str
    label: str
    compression: str
    ocilayers: bool
    measure: Callable[[str, int], Sample]
    short: str = ""
    output: Callable[[str], int] | None = None
    samples: list[Sample] = field(default_factory=list)
    out_bytes: list[int] = field(default_factory=list)
    skipped: str = ""


@dataclass
class Ctx:
    """What every group gets."""

    args: argparse.Namespace
    kind: str
    runs: int
    cache: str
    work: str
    img: BenchImage | None
    pack_input: PackInput | None
    mem_input: memory.MemoryInputs | None
    growth_input: growth.GrowthInput | None = None
    small_input: smallfiles.SmallFilesInput | None = None
    # Delete each round's outputs once the round is done (where deleting costs the next round
    # nothing: see main), so the page cache stays the size of one round instead of growing
    # by every run's output.
    delete_rounds: bool = False


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compile_ocilayers() -> str:
    """`python -m compileall -q` the ocilayers package, as `pip install` does for a normal
    install: this environment sets PYTHONDONTWRITEBYTECODE=1, and with an editable install each
    `ocilayers` start would otherwise compile every module again (~0.1 s). Returns the package
    dir. Only changed modules are recompiled; run before each group."""
    py = ocilayers_python()
    pkg = subprocess.run([py, "-c", "import os, ocilayers; print(os.path.dirname("
                                    "ocilayers.__file__))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([py, "-m", "compileall", "-q", pkg], check=True, stdout=subprocess.DEVNULL)
    return pkg


def prepared(argv_for: Callable[[str], list[str]], mkdirs: Callable[[str], list[str]] | None = None,
             env: dict[str, str] | None = None) -> Callable[[str, int], Sample]:
    """A measure function: make the run dir (and `mkdirs`), flush dirty pages, time argv (in
    `env`, else the harness's environment)."""
    def measure(run_dir: str, _round: int) -> Sample:
        os.makedirs(run_dir)
        for d in mkdirs(run_dir) if mkdirs else []:
            os.makedirs(d)
        argv = argv_for(run_dir)
        os.sync()  # the previous run's writeback must not land in this run's time
        return run_measured(argv, env=env, log_path=run_dir + ".log")
    return measure


def shell(script: str) -> list[str]:
    return ["bash", "-c", "set -eu -o pipefail\n" + script]


# --- group: unpack ---

def tar_script(blobs: list[str], dirs: list[str], decompress: str, parallel: bool) -> list[str]:
    """`gzip -dc blob | tar -x` per layer, one dir per layer, one after the other or all at
    once as background jobs."""
    lines = ["set -eu -o pipefail"]
    for b, d in zip(blobs, dirs, strict=True):
        pipe = f"{decompress} {shlex.quote(b)} | tar -xf - -C {shlex.quote(d)}"
        lines.append(f"( {pipe} ) & pids=\"${{pids:-}} $!\"" if parallel else pipe)
    if parallel:
        lines.append("for p in $pids; do wait $p; done")
    return ["bash", "-c", "\n".join(lines)]


def plain_tars(img: BenchImage, out_dir: str) -> list[str]:
    """The gzip image's layers decompressed to `out_dir/layerN.tar` (not timed)."""
    os.makedirs(out_dir)
    paths = []
    for i, blob in enumerate(img.blobs("gzip")):
        path = os.path.join(out_dir, f"layer{i + 1}.tar")
        with open(path, "wb") as f:
            subprocess.run(["gzip", "-dc", blob], stdout=f, check=True)
        paths.append(path)
    return paths


def unpack_cases(img: BenchImage, use_docker: bool, work: str) -> tuple[list[Case], list[str]]:
    notes: list[str] = []
    oci = ocilayers_argv()
    gz, zs, n = img.gzip_dir, img.zstd_dir, len(img.blobs("gzip"))

    def layer_dirs(rd: str) -> list[str]:
        return [os.path.join(rd, f"layer{i + 1}") for i in range(n)]

    def tar_argv(blobs: list[str], decompress: str, parallel: bool) -> Callable[[str], list[str]]:
        return lambda rd: tar_script(blobs, layer_dirs(rd), decompress, parallel)

    cold_roots: dict[int, str] = {}

    def ocilayers_cold(src: str, extra: list[str], remember: bool) -> Callable[[str, int], Sample]:
        def argv(rd: str) -> list[str]:
            return [*oci, "-q", "--root", os.path.join(rd, "store"), "unpack", src, *extra]
        inner = prepared(argv)

        def measure(rd: str, rnd: int) -> Sample:
            if remember:
                cold_roots[rnd] = os.path.join(rd, "store")
            return inner(rd, rnd)
        return measure

    def ocilayers_dedup(rd: str, rnd: int) -> Sample:
        os.makedirs(rd)
        os.sync()
        return run_measured([*oci, "-q", "--root", cold_roots[rnd], "unpack", gz],
                            log_path=rd + ".log")

    cases = [
        Case("ocilayers-cold-gzip", "ocilayers unpack, cold (gzip)", "gzip", True,
             ocilayers_cold(gz, [], remember=True)),
        Case("ocilayers-dedup-gzip", "ocilayers unpack, dedup re-unpack (gzip)", "gzip", True,
             ocilayers_dedup),
        Case("ocilayers-cold-gzip-j1", "ocilayers unpack --jobs 1, cold (gzip)", "gzip", True,
             ocilayers_cold(gz, ["--jobs", "1"], remember=False)),
        Case("ocilayers-cold-zstd", "ocilayers unpack, cold (zstd)", "zstd", True,
             ocilayers_cold(zs, [], remember=False)),
    ]
    if shutil.which("umoci"):
        cases.append(Case("umoci-gzip", "umoci raw unpack (gzip; merged rootfs)", "gzip", False,
                          prepared(lambda rd: ["umoci", "raw", "unpack", "--image",
                                               f"{gz}:{img.tag}", os.path.join(rd, "rootfs")])))
    else:
        notes.append("umoci not found: its row is skipped")
    for comp, tool in (("gzip", "gzip -dc"), ("zstd", "zstd -dc -q")):
        if not shutil.which(tool.split()[0]):
            notes.append(f"{tool.split()[0]} not found: its rows are skipped")
            continue
        blobs = img.blobs(comp)
        for parallel in (False, True):
            mode = "parallel" if parallel else "sequential"
            cases.append(Case(
                f"{comp}-tar-{mode[:3]}", f"{tool.split()[0]} -dc | tar -x, {mode}", comp, False,
                prepared(tar_argv(blobs, tool, parallel), layer_dirs)))
    if shutil.which("gzip"):
        # The unpack floor: the work any tool that verifies what it unpacks has to do, in two
        # parts timed apart (their CPU is what counts; see unpack_floor).
        blobs = img.blobs("gzip")
        plain = plain_tars(img, os.path.join(work, "unpack-plain"))
        cases.append(Case(
            "floor-inflate", "floor 1/2: inflate + both sha256 only, no files (gzip)", "gzip",
            False, prepared(lambda rd: [ocilayers_python(), os.path.join(HERE, "floor_inflate.py"),
                                        *blobs])))
        cases.append(Case(
            "floor-tar-x", "floor 2/2: tar -x of the decompressed layers", "gzip", False,
            prepared(lambda rd: shell("\n".join(
                f"tar -xf {shlex.quote(t)} -C {shlex.quote(d)}"
                for t, d in zip(plain, layer_dirs(rd), strict=True))), layer_dirs)))
    if use_docker:
        why = dockerd.available()
        if why:
            notes.append(f"docker load skipped: {why}")
        else:
            cases.append(Case("docker-load-gzip", "docker load (gzip docker-archive)", "gzip",
                              False, lambda rd, rnd: docker_load(img, rd)))
    else:
        notes.append("docker load skipped (--no-docker)")
    return cases, notes


UNPACK_RATIOS: list[tuple[str, str, float | None]] = [
    *[("ocilayers-cold-gzip", k, None) for k in
      ("umoci-gzip", "gzip-tar-seq", "gzip-tar-par", "docker-load-gzip")],
    *[("ocilayers-cold-zstd", k, None) for k in ("zstd-tar-seq", "zstd-tar-par")],
    ("ocilayers-cold-gzip", "ocilayers-cold-gzip-j1", None),
]


def unpack_floor(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a cold gzip unpack cannot go below on this machine, whatever it is written in: the
    CPU of inflate + both hashes plus the CPU of `tar -x` of the same layers (the kernel's file
    creates and writes; GNU tar also reads the tar and sets every owner and mode, so this part
    is an upper estimate), spread perfectly over all CPUs."""
    by = {r["key"]: r for r in rows if "median_wall_s" in r}
    if not {"floor-inflate", "floor-tar-x", "ocilayers-cold-gzip"} <= set(by):
        return {}
    ncpu = os.cpu_count() or 1
    inflate = float(by["floor-inflate"]["median_cpu_s"])
    kernel = float(by["floor-tar-x"]["median_cpu_s"])
    floor_wall = (inflate + kernel) / ncpu
    ours = by["ocilayers-cold-gzip"]
    out: dict[str, Any] = {
        "inflate_and_hash_cpu_s": inflate, "tar_x_cpu_s": kernel,
        "floor_cpu_s": round(inflate + kernel, 3), "cpus": ncpu,
        "floor_wall_s": round(floor_wall, 3),
        "ocilayers_cpu_above_floor_s": round(float(ours["median_cpu_s"]) - inflate - kernel, 3),
    }
    text = (f"unpack floor (gzip): inflate + hashes {inflate:.2f} + tar -x {kernel:.2f} = "
            f"{inflate + kernel:.2f} CPU-s that any verifying unpack does; spread perfectly "
            f"over {ncpu} CPUs: {floor_wall:.2f} s wall")
    if "gzip-tar-seq" in by:
        seq = float(by["gzip-tar-seq"]["median_wall_s"])
        out["floor_vs_gzip_tar_seq"] = round(floor_wall / seq, 2)
        text += f" = {floor_wall / seq:.2f}x the sequential gzip|tar"
    text += (f"\n  ocilayers unpack, cold (gzip): {float(ours['median_wall_s']):.2f} s at "
             f"{float(ours['median_cpu_s']):.2f} CPU-s, "
             f"{out['ocilayers_cpu_above_floor_s']:.2f} CPU-s above the floor (tar headers, "
             f"apply, tar-split records: the per-entry Python)")
    out["text"] = text
    return out


def docker_load(img: BenchImage, rd: str) -> Sample:
    """Start a fresh daemon (not timed), time `docker load`, stop it (not timed). CPU adds the
    daemon's own CPU delta (incl. the unpigz it runs) to the client's; peak RSS is the daemon's
    VmHWM over the load (reset just before)."""
    os.makedirs(rd)
    d = dockerd.Dockerd(os.path.join(rd, "data"))
    exec_roots.append(str(d.base))
    try:
        d.start(rd + ".dockerd.log")
        os.sync()
        return daemon_measured(d, d.load_argv(img.docker_archive), rd + ".log")
    finally:
        d.stop()


def daemon_measured(d: dockerd.Dockerd, argv: list[str], log_path: str) -> Sample:
    """Time a docker client command: CPU (and its sys part) = the client's + the daemon's CPU
    delta (with the children it reaped), peak RSS = the larger of the client's and the
    daemon's VmHWM over the command (reset just before), other CPU less the daemon's."""
    cpu0, sys0 = d.cpu_split()
    d.reset_peak_rss()
    s = run_measured(argv, env=d.client_env(), log_path=log_path)
    cpu1, sys1 = d.cpu_split()
    cpu = cpu1 - cpu0
    return Sample(s.wall, s.cpu + cpu, max(s.rss_kib, d.peak_rss_kib()), s.ok, s.error,
                  s.sys + sys1 - sys0, max(0.0, s.other - cpu), s.touch_us)


def rss_split(img: BenchImage, work: str) -> dict[str, object]:
    """One more cold and dedup unpack (gzip), under the rusage wrapper: parent vs workers."""
    out: dict[str, object] = {}
    root = os.path.join(work, "rss-split", "store")
    os.makedirs(os.path.dirname(root))
    for what in ("cold", "dedup"):
        path = os.path.join(work, "rss-split", f"{what}.json")
        os.sync()
        s = run_measured([sys.executable, os.path.join(HERE, "ocilayers_rusage.py"), path, "--",
                          "-q", "--root", root, "unpack", img.gzip_dir],
                         log_path=os.path.join(work, "rss-split", f"{what}.log"))
        if s.ok:
            with open(path) as f:
                r = json.load(f)
            out[what] = {"wall_s": round(s.wall, 3),
                         "parent_peak_rss_mib": round(r["parent_maxrss_kib"] / 1024, 1),
                         "workers_peak_rss_mib": round(r["workers_maxrss_kib"] / 1024, 1),
                         "parent_cpu_s": round(r["parent_cpu_s"], 2),
                         "workers_cpu_s": round(r["workers_cpu_s"], 2)}
        else:
            out[what] = {"error": s.error}
    return out


def group_unpack(ctx: Ctx) -> dict[str, Any]:
    assert ctx.img is not None
    cases, notes = unpack_cases(ctx.img, use_docker=not ctx.args.no_docker,
                                work=os.path.join(ctx.work, "unpack"))
    res = timed_group(ctx, "unpack", cases, notes, int(ctx.img.meta["uncompressed_bytes"]),
                      UNPACK_RATIOS)
    res["floor"] = unpack_floor(res["results"])
    res["image"] = dict(ctx.img.meta)
    res["rss_split"] = rss_split(ctx.img, os.path.join(ctx.work, "unpack"))
    res["header"].insert(3, describe_image(ctx.img))
    print_group(res)
    if res["floor"]:
        print()
        print(res["floor"]["text"])
    split = res["rss_split"]
    print()
    print("ocilayers peak RSS, parent vs workers (one extra run each, gzip, default --jobs):")
    for what, r in split.items():
        print(f"  {what}: {r}")
    return res


# --- group: pack ---

def pack_cases(pin: PackInput) -> tuple[list[Case], list[str]]:
    notes: list[str] = []
    oci = ocilayers_argv()
    lowers = [a for d in pin.lowers for a in ("--lower", d)]
    up = shlex.quote(pin.upper)

    def out_size(name: str) -> Callable[[str], int]:
        return lambda rd: os.path.getsize(os.path.join(rd, name))

    def ocil(comp: str, name: str) -> Case:
        return Case(f"ocilayers-pack-{comp}",
                    f"ocilayers pack --compression {comp} (--lower x{len(pin.lowers)})", comp,
                    True, prepared(lambda rd: [*oci, "-q", "pack", pin.upper, "-o",
                                               os.path.join(rd, name), "--compression", comp,
                                               *lowers]),
                    short=f"ocilayers pack ({comp})", output=out_size(name))

    def tarpipe(key: str, label: str, comp: str, filt: str, name: str) -> Case:
        pipe = f" | {filt}" if filt else ""
        return Case(key, label, comp, False,
                    prepared(lambda rd: shell(f"tar -C {up} -c .{pipe} > "
                                              f"{shlex.quote(os.path.join(rd, name))}")),
                    short=label, output=out_size(name))

    def appended(rd: str) -> int:
        """The new (top) layer blob of the one image `append` wrote into rd/out."""
        return top_layer_size(os.path.join(rd, "out"), None)

    cases = [ocil("gzip", "layer.tar.gz"),
             tarpipe("tar-gzip", "tar|gzip -6", "gzip", "gzip -6", "layer.tar.gz"),
             # issue 15: the image plumbing around the same pack (read the base image, link
             # its blobs, config, manifest, index) must cost almost nothing
             Case("ocilayers-append-gzip", "ocilayers append IMAGE --dir UPPER (--lower x"
                  f"{len(pin.lowers)}) -o OCI-LAYOUT-DIR", "gzip", True,
                  prepared(lambda rd: [*oci, "-q", "append", pin.image.gzip_dir, "-o",
                                       os.path.join(rd, "out"), "--format", "oci", "--dir",
                                       pin.upper, *lowers, "--compression", "gzip"]),
                  short="ocilayers append --dir (gzip)", output=appended)]
    if shutil.which("zstd"):
        cases += [ocil("zstd", "layer.tar.zst"),
                  tarpipe("tar-zstd", "tar|zstd -3", "zstd", "zstd -q -3", "layer.tar.zst"),
                  tarpipe("tar-zstd-T0", "tar|zstd -3 -T0 (all cores)", "zstd",
                          "zstd -q -3 -T0", "layer.tar.zst")]
    else:
        notes.append("zstd not found: the zstd rows are skipped")
    cases += [ocil("none", "layer.tar"),
              tarpipe("tar-none", "tar (no compression)", "none", "", "layer.tar")]
    if shutil.which("umoci"):
        tag = "packed"

        def repack(rd: str, _rnd: int) -> Sample:
            os.makedirs(rd)
            layout = os.path.join(rd, "layout")
            fresh_layout(pin.image.gzip_dir, layout)  # not timed
            os.sync()
            return run_measured(["umoci", "repack", "--image", f"{layout}:{tag}", pin.bundle],
                                log_path=rd + ".log")

        cases.append(Case("umoci-repack", "umoci repack (gzip; mtree diff of the bundle)",
                          "gzip", False, repack, short="umoci repack",
                          output=lambda rd: top_layer_size(os.path.join(rd, "layout"), tag)))
    else:
        notes.append("umoci not found: the umoci repack row is skipped")
    return cases, notes


PACK_RATIOS: list[tuple[str, str, float | None]] = [
    ("ocilayers-pack-gzip", "tar-gzip", 0.6),
    ("ocilayers-append-gzip", "ocilayers-pack-gzip", 1.15),
    ("ocilayers-pack-zstd", "tar-zstd", 1.3),
    ("ocilayers-pack-zstd", "tar-zstd-T0", None),
    ("ocilayers-pack-gzip", "umoci-repack", None),
    ("ocilayers-pack-none", "tar-none", None),
]


def describe_pack_input(pin: PackInput) -> str:
    u = pin.meta["upper"]
    return (f"input: overlay upper dir over the {len(pin.lowers)} layers of the {pin.meta['kind']}"
            f" image ({pin.image.meta['base']}): {u['file_bytes'] / 1e6:.0f} MB of file data, "
            f"{u['entries']} entries ({u['files']} files, {u['dirs']} dirs, {u['symlinks']} "
            f"symlinks, {u['hardlinked_files']} hardlinked), {u['whiteouts']} whiteouts, "
            f"{u['opaque_dirs']} opaque dirs; the umoci bundle's rootfs has the same change")


def group_pack(ctx: Ctx) -> dict[str, Any]:
    assert ctx.pack_input is not None
    pin = ctx.pack_input
    cases, notes = pack_cases(pin)
    notes.append("MB/s = upper dir file bytes / median wall; out MiB = median size of the "
                 "layer blob written (compression levels differ: ocilayers gzip is ISA-L "
                 "level 2, zstd level 3 multi-threaded; gzip -6; umoci's Go gzip)")
    notes.append("tar archives whiteouts as char devices and opaque dirs not at all (it does "
                 "not convert them); ocilayers writes .wh. entries, opaque markers, xattrs and "
                 "computes the DiffID and digest; umoci repack hashes the whole rootfs to diff "
                 "it against its mtree, then writes the layer, config, manifest and index")
    res = timed_group(ctx, "pack", cases, notes, int(pin.meta["upper"]["file_bytes"]),
                      PACK_RATIOS)
    res["input"] = {k: v for k, v in pin.meta.items() if k != "change_script"}
    res["input"]["change_script"] = pin.meta["change_script"].splitlines()
    res["header"].insert(3, describe_pack_input(pin))
    print_group(res)
    if ctx.args.profile:
        res["profile_top"] = {}
        for comp in ("gzip", "zstd"):
            prof = os.path.join(ctx.cache, f"pack-{comp}.prof")
            log(f"pack: cProfile of one `ocilayers pack --compression {comp}`")
            profile_pack(pin, os.path.join(ctx.work, "pack", f"profile-{comp}"), comp, prof)
            res["profile_top"][comp] = profile_top(prof, 20, PACK_AREAS)
            print()
            print(f"cProfile, ocilayers pack --compression {comp}, top functions by own time:")
            print(res["profile_top"][comp])
    return res


def profile_pack(pin: PackInput, rd: str, comp: str, prof: str) -> None:
    os.makedirs(rd)
    os.sync()
    subprocess.run([ocilayers_python(), "-m", "cProfile", "-o", prof, "-m", "ocilayers", "-q",
                    "pack", pin.upper, "-o", os.path.join(rd, "layer"), "--compression", comp,
                    *[a for d in pin.lowers for a in ("--lower", d)]], check=True,
                   stdout=subprocess.DEVNULL)


# --- group: tarsplit (share of unpack time spent on tar-split.json.gz and `size`) ---

def profile_unpack(img: BenchImage, work: str, prof: str) -> None:
    """cProfile of `python -m ocilayers unpack --jobs 1` (gzip) into `prof`."""
    root = os.path.join(work, "profile", "store")
    os.makedirs(os.path.dirname(root))
    os.sync()
    subprocess.run([ocilayers_python(), "-m", "cProfile", "-o", prof, "-m", "ocilayers", "-q",
                    "--root", root, "unpack", img.gzip_dir, "--jobs", "1"], check=True,
                   stdout=subprocess.DEVNULL)


def profile_top(prof: str, top: int = 25, areas: list[tuple[str, Callable[[str, str], bool]]]
                | None = None) -> str:
    """The top functions by own time, and own time summed by area."""
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    buf.write("own time by area (cProfile inflates the Python parts):\n")
    for area, secs, share in profile_areas(st, areas or AREAS):
        buf.write(f"  {secs:6.2f} s {share:6.1%}  {area}\n")
    table = io.StringIO()
    pstats.Stats(prof, stream=table).strip_dirs().sort_stats("tottime").print_stats(top)
    text = table.getvalue()
    buf.write("\n" + text[text.find("   ncalls"):].rstrip() + "\n")
    return buf.getvalue()


def _func_name(key: tuple[str, int, str]) -> str:
    path, line, name = key
    return f"{os.path.basename(path)}:{line}({name})"


def tarsplit_share(prof: str) -> dict[str, Any]:
    """From a cProfile of `unpack --jobs 1`: time under the tar-split writer (every function
    of ocilayers/tarsplit.py: TarSplitWriter's methods, crc64, the JSON escaping, and the
    igzip writes they make) and under store.layers.diff_size (layerdb `size`), over the total.

    Each function's cumulative time is counted only for the calls that come from outside that
    set, so nested calls (on_entry -> _flush_file -> _emit -> igzip write) count once."""
    st = pstats.Stats(prof)
    stats: dict[tuple[str, int, str], Any] = st.stats  # type: ignore[attr-defined]

    def tarsplit(key: tuple[str, int, str]) -> bool:
        path, _line, name = key
        # module and class bodies (import time) are not tar-split work
        return (path.endswith(os.path.join("ocilayers", "tarsplit.py")) and
                not name.startswith("<") and not name[:1].isupper())

    def size_walk(key: tuple[str, int, str]) -> bool:
        return (key[0].endswith(os.path.join("ocilayers", "store", "layers.py"))
                and key[2] == "diff_size")

    def in_scope(key: tuple[str, int, str]) -> bool:
        return tarsplit(key) or size_walk(key)

    parts: dict[str, float] = {}
    for key, (_cc, _nc, _tt, _ct, callers) in stats.items():
        if not in_scope(key):
            continue
        # calls from module bodies (import time, e.g. building the CRC table) are not counted
        outside = sum(v[3] for caller, v in callers.items()
                      if not in_scope(caller) and caller[2] != "<module>")
        if outside:
            parts[_func_name(key)] = outside
    ts = sum(v for k, v in parts.items() if "store.py" not in k)
    size = sum(v for k, v in parts.items() if "store.py" in k)
    total = st.total_tt  # type: ignore[attr-defined]
    build = sum(v[3] for k, v in stats.items() if k[2] == "build_layer"
                and k[0].endswith(os.path.join("ocilayers", "unpack.py")))
    own = {"crc64": sum(v[2] for k, v in stats.items() if tarsplit(k) and k[2] == "crc64")}
    return {"profiled_total_s": round(total, 3), "build_layer_s": round(build, 3),
            "tarsplit_s": round(ts, 3), "diff_size_s": round(size, 3),
            "crc64_own_s": round(own["crc64"], 3),
            "share_of_total": round((ts + size) / total, 4) if total else None,
            "share_of_build_layer": round((ts + size) / build, 4) if build else None,
            "entry_points_s": {k: round(v, 3) for k, v in sorted(parts.items(),
                                                                 key=lambda x: -x[1])}}


def tarsplit_cases(img: BenchImage) -> list[Case]:
    """`unpack --jobs 1` in-process through ocilayers_ablate.py: unchanged, and with the
    tar-split writer and the size walk replaced by no-ops."""
    wrapper = os.path.join(HERE, "ocilayers_ablate.py")

    def case(mode: str, label: str) -> Case:
        return Case(f"unpack-j1-{mode}", label, "gzip", True, prepared(
            lambda rd: [ocilayers_python(), wrapper, mode, rd + ".json", "--", "-q", "--root",
                        os.path.join(rd, "store"), "unpack", img.gzip_dir, "--jobs", "1"]))

    return [case("normal", "ocilayers unpack --jobs 1 (in-process wrapper)"),
            case("ablated", "the same, tar-split writer and size walk no-ops")]


def group_tarsplit(ctx: Ctx) -> dict[str, Any]:
    assert ctx.img is not None
    img = ctx.img
    base = os.path.join(ctx.work, "tarsplit")
    os.makedirs(base)
    prof = os.path.join(ctx.cache, "unpack-jobs1.prof")
    log("tarsplit: cProfile of one `unpack --jobs 1` (gzip)")
    profile_unpack(img, base, prof)
    share = tarsplit_share(prof)
    cases = tarsplit_cases(img)
    notes = ["the no-op run writes no tar-split.json.gz and size 0: its store is invalid; it "
             "only says how much time those two parts take without a profiler's overhead",
             "the layerdb size is counted while applying (LayerStats.size); the size walk "
             "(store.diff_size) only runs for a layer that removes something it made, so on "
             "this image the share is the tar-split writer's alone"]
    res = timed_group(ctx, "tarsplit", cases, notes, int(img.meta["uncompressed_bytes"]), [])
    res["profile"] = share
    by = {r["key"]: r for r in res["results"] if "median_wall_s" in r}
    calls_ok = True
    for c in cases:
        if c.key.endswith("ablated"):
            for rnd in range(len(c.samples)):
                path = os.path.join(ctx.work, "tarsplit", c.key, f"r{rnd}.json")
                with open(path) as f:
                    info = json.load(f)
                # diff_size runs only when apply could not count the size (a layer that
                # removes what it made): the benchmark image has none, so 0 calls is fine.
                calls_ok &= info["calls"]["tarsplit_writers"] > 0
                res["ablation_calls"] = info
    if "unpack-j1-normal" in by and "unpack-j1-ablated" in by and calls_ok:
        a, b = by["unpack-j1-normal"]["median_wall_s"], by["unpack-j1-ablated"]["median_wall_s"]
        res["ablation"] = {"normal_s": a, "without_s": b,
                           "share": round((a - b) / a, 4) if a else None,
                           "cpu_share": round(1 - by["unpack-j1-ablated"]["median_cpu_s"]
                                              / by["unpack-j1-normal"]["median_cpu_s"], 4)}
    elif not calls_ok:
        res["notes"].append("the no-op TarSplitWriter was never called (ocilayers no longer "
                            "reaches it by that name): no estimate")
    res["header"].insert(3, describe_image(img))
    print_group(res)
    print()
    p = share
    goal = 0.15
    pct = p["share_of_total"]
    print(f"tar-split + size share of `ocilayers unpack --jobs 1` (gzip), cProfile: "
          f"{pct:.1%} of {p['profiled_total_s']:.2f} s profiled "
          f"(tar-split {p['tarsplit_s']:.2f} s, size walk {p['diff_size_s']:.2f} s; "
          f"{p['share_of_build_layer']:.1%} of build_layer)   goal <= 15%: "
          f"{'met' if pct <= goal else 'MISSED'}")
    print("  entry points (cumulative s, calls from outside the tar-split code): "
          + ", ".join(f"{k} {v:.3f}" for k, v in p["entry_points_s"].items()))
    if "ablation" in res:
        ab = res["ablation"]
        print(f"tar-split + size share without a profiler (medians, no-op stand-ins): "
              f"{ab['share']:.1%} of wall ({ab['normal_s']:.2f} s -> {ab['without_s']:.2f} s), "
              f"{ab['cpu_share']:.1%} of CPU   goal <= 15%: "
              f"{'met' if ab['share'] <= goal else 'MISSED'}")
    if ctx.args.profile:
        res["profile_top"] = profile_top(prof)
        print()
        print("cProfile, ocilayers unpack --jobs 1 (gzip), top functions by own time:")
        print(res["profile_top"])
    return res


# Where a function's own time goes, by the file (or C function) it belongs to.
AREAS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("decompression (isal gzip, zstandard)",
     lambda f, n: f in ("gzip.py", "_compression.py") or "BufferedReader" in n
     or "Decompression" in n or "decompress" in n),
    ("sha256 (blob digest, DiffID)", lambda f, n: "HASH" in n),
    ("filesystem syscalls", lambda f, n: n.startswith("<built-in method posix.")
     or "DirEntry" in n),
    ("tar header parsing (tarstream.py)", lambda f, n: f == "tarstream.py"),
    ("tar-split records (tarsplit.py, json, crc64, igzip)",
     lambda f, n: f in ("tarsplit.py", "igzip.py", "encoder.py") or "isal_zlib" in n
     or "crc" in n or "b2a_base64" in n),
    ("apply logic (extract.py, whiteout.py)", lambda f, n: f in ("extract.py", "whiteout.py")),
    ("streams, sources, store, orchestration",
     lambda f, n: f in ("streams.py", "sources.py", "cas.py", "layers.py", "layout.py",
                        "images.py", "unpack.py", "api.py")),
]


# The same for `ocilayers pack`.
PACK_AREAS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("compression (zstandard writer, isal gzip; zstd's worker threads are not profiled)",
     lambda f, n: "Zstd" in n or f in ("igzip.py", "gzip.py") or "isal_zlib" in n
     or "compress" in n),
    ("sha256 (DiffID, blob digest)", lambda f, n: "HASH" in n),
    ("filesystem syscalls", lambda f, n: n.startswith("<built-in method posix.")
     or "DirEntry" in n),
    ("tar header encoding (tarstream.py)", lambda f, n: f == "tarstream.py"),
    ("walk and entries (differ.py, whiteout.py)", lambda f, n: f in ("differ.py", "whiteout.py")),
    ("streams, api, cli (streams.py, pack.py, api.py, cli/)",
     lambda f, n: f in ("streams.py", "pack.py", "api.py", "common.py", "__init__.py")),
]


# The same for `ocilayers history` and `ocilayers squash`.
GROWTH_AREAS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("waits for the readahead thread (inflate + blob digest there: not profiled)",
     lambda f, n: "acquire" in n and "lock" in n),
    ("compression, decompression (isal gzip)",
     lambda f, n: f in ("gzip.py", "igzip.py", "_compression.py") or "isal_zlib" in n
     or "compress" in n or "BufferedReader" in n),
    ("sha256 (DiffID, blob digest)", lambda f, n: "HASH" in n),
    ("filesystem syscalls", lambda f, n: n.startswith("<built-in method posix.")
     or "DirEntry" in n),
    ("tar-split records (tarsplit.py: json, base64, crc64)",
     lambda f, n: f in ("tarsplit.py", "decoder.py", "base64.py") or n in ("loads",
                                                                          "detect_encoding")
     or "a2b_base64" in n or "JSONDecoder" in n),
    ("tar headers (tarstream.py: parse, encode)", lambda f, n: f == "tarstream.py"),
    ("entries, fast tar-split reader (layerscan.py)", lambda f, n: f == "layerscan.py"),
    ("growth figures (growth.py, history.py: merge, dive's figures)",
     lambda f, n: f in ("growth.py", "history.py")),
    ("squash tar and image (squashtar.py, builder.py, writer.py)",
     lambda f, n: f in ("squashtar.py", "builder.py", "writer.py", "squash.py")),
    ("streams, sources, store, cli",
     lambda f, n: f in ("streams.py", "sources.py", "cas.py", "layers.py", "layout.py",
                        "images.py", "api.py", "pack.py", "common.py", "shapes.py")),
]


def profile_areas(st: pstats.Stats, areas: list[tuple[str, Callable[[str, str], bool]]]
                  ) -> list[tuple[str, float, float]]:
    sums: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        f = os.path.basename(path)
        area = next((a for a, match in areas if match(f, name)),
                    "other (interpreter start-up, imports, builtins)")
        sums[area] = sums.get(area, 0.0) + tt
    total = sum(sums.values()) or 1.0
    return [(a, t, t / total) for a, t in sorted(sums.items(), key=lambda x: -x[1])]


# --- group: commit (ocilayers commit vs docker commit of the same upper dir) ---

BASE_TAG = "ocilayers-bench:latest"  # the base image's name in every store (as in the archive)
MARKER = "bench-round"  # a file added to each run's copy of the upper dir
MARKER_MTIME = 1700000000


def layerdb_entries(root: str) -> set[str]:
    """The chain IDs (hex) in a Docker-format store's layerdb (ocilayers' or dockerd's)."""
    d = os.path.join(root, "image", "overlay2", "layerdb", "sha256")
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def new_layer(root: str, before: set[str]) -> dict[str, Any]:
    """The one layer a commit added to the store `root`: its DiffID, layerdb size and the size
    of its tar-split file."""
    new = sorted(layerdb_entries(root) - before)
    if len(new) != 1:
        return {"error": f"{len(new)} new layers in the layerdb"}
    d = os.path.join(root, "image", "overlay2", "layerdb", "sha256", new[0])

    def read(name: str) -> str:
        with open(os.path.join(d, name)) as f:
            return f.read().strip()

    return {"chain_id": f"sha256:{new[0]}", "diff_id": read("diff"), "size": int(read("size")),
            "tar_split_bytes": os.path.getsize(os.path.join(d, "tar-split.json.gz"))}


def copy_upper(src: str, dst: str, rnd: int, expect: dict[str, int]) -> None:
    """`cp -a` of the upper dir's content into `dst` (an empty dir: whiteouts, opaque xattrs,
    owners, modes, mtimes and hardlinks kept), plus a marker file naming the round, so that
    each round's layer is new to its store. Checked against the input's counts."""
    subprocess.run(["cp", "-a", "--", os.path.join(src, "."), dst + "/"], check=True)
    marker = os.path.join(dst, MARKER)
    text = f"commit benchmark round {rnd}\n"
    with open(marker, "w") as f:
        f.write(text)
    os.chmod(marker, 0o644)
    os.utime(marker, (MARKER_MTIME, MARKER_MTIME))
    want = dict(expect)
    want["entries"] += 1
    want["files"] += 1
    want["file_bytes"] += len(text)
    got = upper_stats(dst)
    if got != want:
        raise RuntimeError(f"the copy of the upper dir in {dst} differs from it: {got} != {want}")


@dataclass
class CommitSetup:
    """What the commit group made before its timed runs (not timed)."""

    stores: dict[str, str] = field(default_factory=dict)  # case key -> ocilayers store
    daemon: dockerd.Dockerd | None = None
    docker: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # key -> rnd
    seconds: float = 0.0


def commit_cases(ctx: Ctx, setup: CommitSetup, base: str) -> tuple[list[Case], list[str]]:
    """Each ocilayers row gets a store of its own with the image unpacked (tagged BASE_TAG),
    the docker row a throwaway dockerd with the docker-archive loaded; the daemon stays up for
    the whole group. A run copies the upper dir into a new dir (`--upper`) or into a new
    container's rw diff dir (`ocilayers create`, `docker create`), then `sync`, then only the
    commit is timed."""
    assert ctx.img is not None and ctx.pack_input is not None
    img, pin = ctx.img, ctx.pack_input
    notes: list[str] = []
    oci = ocilayers_argv()
    expect = {k: int(v) for k, v in pin.meta["upper"].items()}
    t0 = time.monotonic()

    def record(key: str, rnd: int, root: str, before: set[str]) -> None:
        setup.layers.setdefault(key, {})[rnd] = new_layer(root, before)

    def store_for(key: str) -> str:
        root = os.path.join(base, key, "store")
        log(f"commit: unpack the image into the store of `{key}` (not timed)")
        subprocess.run([*oci, "-q", "--root", root, "unpack", img.gzip_dir, "--tag", BASE_TAG],
                       check=True, stdout=subprocess.DEVNULL)
        setup.stores[key] = root
        return root

    def ocilayers_upper(key: str, extra: list[str]) -> Callable[[str, int], Sample]:
        root = store_for(key)

        def measure(rd: str, rnd: int) -> Sample:
            upper = os.path.join(rd, "upper")
            os.makedirs(upper)
            copy_upper(pin.upper, upper, rnd, expect)
            before = layerdb_entries(root)
            os.sync()
            s = run_measured([*oci, "-q", "--root", root, "commit", "--upper", upper, "--from",
                              BASE_TAG, f"bench:commit-r{rnd}", *extra], log_path=rd + ".log")
            record(key, rnd, root, before)
            return s
        return measure

    def ocilayers_container(key: str) -> Callable[[str, int], Sample]:
        root = store_for(key)

        def measure(rd: str, rnd: int) -> Sample:
            os.makedirs(rd)
            out = subprocess.run([*oci, "-q", "--root", root, "create", BASE_TAG, "--name",
                                  f"bench-r{rnd}", "--json", "--", "true"],
                                 check=True, capture_output=True, text=True).stdout
            diff = os.path.join(root, "overlay2", json.loads(out)["mount_id"], "diff")
            copy_upper(pin.upper, diff, rnd, expect)
            before = layerdb_entries(root)
            os.sync()
            s = run_measured([*oci, "-q", "--root", root, "commit", f"bench-r{rnd}",
                              f"bench:commit-r{rnd}"], log_path=rd + ".log")
            record(key, rnd, root, before)
            return s
        return measure

    def layer_size(key: str) -> Callable[[str], int]:
        def size(rd: str) -> int:
            rnd = int(os.path.basename(rd)[1:])
            return int(setup.layers.get(key, {}).get(rnd, {}).get("size", 0))
        return size

    cases = [
        Case("ocilayers-commit-upper", "ocilayers commit --upper DIR --from IMAGE", "none", True,
             ocilayers_upper("ocilayers-commit-upper", []), short="ocilayers commit --upper",
             output=layer_size("ocilayers-commit-upper")),
    ]
    if ctx.kind == "full":  # reference rows; the quick run keeps to the goal's pair
        cases += [
            Case("ocilayers-commit-container", "ocilayers commit CONTAINER (ocilayers create)",
                 "none", True, ocilayers_container("ocilayers-commit-container"),
                 short="ocilayers commit CONTAINER",
                 output=layer_size("ocilayers-commit-container")),
            Case("ocilayers-commit-upper-docker",
                 "ocilayers commit --upper, --xattrs docker --opaque docker", "none", True,
                 ocilayers_upper("ocilayers-commit-upper-docker",
                                 ["--xattrs", "docker", "--opaque", "docker"]),
                 short="ocilayers commit --upper --xattrs docker --opaque docker",
                 output=layer_size("ocilayers-commit-upper-docker")),
        ]

    def docker_commit(rd: str, rnd: int) -> Sample:
        d = setup.daemon
        assert d is not None
        os.makedirs(rd)
        upper = d.create_container(BASE_TAG, f"bench-r{rnd}")
        if not upper.startswith(str(d.data_root) + "/") or os.listdir(upper):
            raise RuntimeError(f"unexpected upper dir of a created container: {upper}")
        copy_upper(pin.upper, upper, rnd, expect)
        before = layerdb_entries(str(d.data_root))
        os.sync()
        s = daemon_measured(d, d.commit_argv(f"bench-r{rnd}", f"bench:commit-r{rnd}"),
                            rd + ".log")
        record("docker-commit", rnd, str(d.data_root), before)
        return s

    docker_case = Case("docker-commit", "docker commit (docker create, upper dir filled)",
                       "none", False, docker_commit,
                       short="docker commit", output=layer_size("docker-commit"))
    why = "--no-docker" if ctx.args.no_docker else dockerd.available()
    if why:
        notes.append(f"docker commit skipped: {why}")
    else:
        d = dockerd.Dockerd(os.path.join(base, "docker-commit", "data"))
        exec_roots.append(str(d.base))
        setup.daemon = d
        try:
            os.makedirs(os.path.join(base, "docker-commit"), exist_ok=True)
            log("commit: start a throwaway dockerd and `docker load` the image (not timed)")
            d.start(os.path.join(base, "docker-commit", "dockerd.log"))
            d.docker("load", "-q", "-i", img.docker_archive, timeout=600)
            setup.docker = {"version": d.version(), "driver_status": d.driver_status()}
            if setup.docker["driver_status"].get("Native Overlay Diff") != "true":
                notes.append("dockerd does not use overlay2's native diff here (it diffs the "
                             "merged view against the lowers: slower): "
                             f"{setup.docker['driver_status']}")
            cases.append(docker_case)
        except Exception as exc:  # a baseline that cannot run is skipped, not fatal
            notes.append(f"docker commit skipped: {type(exc).__name__}: {str(exc)[:300]}")

    setup.seconds = round(time.monotonic() - t0, 1)
    return cases, notes


COMMIT_RATIOS: list[tuple[str, str, float | None]] = [
    ("ocilayers-commit-upper", "docker-commit", 0.5),
    ("ocilayers-commit-container", "docker-commit", None),
    ("ocilayers-commit-upper-docker", "docker-commit", None),
]


def commit_layers_summary(setup: CommitSetup, cases: list[Case]) -> tuple[dict[str, Any],
                                                                          list[str]]:
    """The layers each row made, per round, and what they say: an ocilayers row's DiffID is
    the same for the same content (--upper and CONTAINER must agree round by round); dockerd
    fills uname/gname, so its DiffID differs, but its layerdb size must be the same."""
    out: dict[str, Any] = {}
    lines: list[str] = []
    for c in cases:
        per = setup.layers.get(c.key, {})
        out[c.key] = [per[r] for r in sorted(per)]
    rounds = sorted(set().union(*(set(v) for v in setup.layers.values())) if setup.layers
                    else set())
    for a, b in (("ocilayers-commit-upper", "ocilayers-commit-container"),):
        pa, pb = setup.layers.get(a, {}), setup.layers.get(b, {})
        both = [r for r in rounds if r in pa and r in pb]
        if both:
            same = all(pa[r].get("diff_id") == pb[r].get("diff_id") for r in both)
            lines.append(f"`commit --upper` and `commit CONTAINER` made the same layer (DiffID) "
                         f"in {'every' if same else 'NOT every'} round ({len(both)})")
    sizes = {k: sorted({int(x.get("size", -1)) for x in v.values()})
             for k, v in setup.layers.items()}
    if sizes:
        lines.append("layerdb size of the new layer: " + ", ".join(
            f"{k} {'/'.join(str(x) for x in v)}" for k, v in sizes.items()))
        ts = {k: statistics.median(x.get("tar_split_bytes", 0) for x in v.values())
              for k, v in setup.layers.items()}
        lines.append("tar-split.json.gz bytes (median): " + ", ".join(
            f"{k} {int(v)}" for k, v in ts.items()))
    errors = [f"{k} round {r}: {x['error']}" for k, v in setup.layers.items()
              for r, x in v.items() if "error" in x]
    lines += [f"PROBLEM: {e}" for e in errors]
    return out, lines


def group_commit(ctx: Ctx) -> dict[str, Any]:
    assert ctx.img is not None and ctx.pack_input is not None
    pin = ctx.pack_input
    base = os.path.join(ctx.work, "commit")
    os.makedirs(base)
    setup = CommitSetup()
    try:
        cases, notes = commit_cases(ctx, setup, base)
        notes.append(
            "set-up, not timed: each ocilayers row has a store of its own with the image "
            "unpacked; the docker row a throwaway dockerd (own data root, overlay2) with the "
            "docker-archive loaded, up for the whole group; before each run the upper dir is "
            "copied with `cp -a` (whiteouts, opaque xattrs, hardlinks; counts checked) into a "
            "new dir (--upper) or into a new container's rw diff dir (`ocilayers create`, "
            f"`docker create`, never started), plus a file /{MARKER} naming the round (so each "
            "run's layer is new to its store; an existing one would be found by ChainID and "
            "the new copy deleted), then `sync`; only the commit is timed")
        notes.append("both sides do the same job: diff the upper dir into an uncompressed "
                     "layer tar, apply it into a new layer dir, tar-split records, DiffID, "
                     "layerdb entry, image config; out MiB = the new layer's layerdb size")
        notes.append("docker commit: CPU = the client's + dockerd's CPU delta; peak RSS = "
                     "dockerd's VmHWM over the commit (reset before)")
        res = timed_group(ctx, "commit", cases, notes, int(pin.meta["upper"]["file_bytes"]),
                          COMMIT_RATIOS)
    finally:
        if setup.daemon is not None:
            setup.daemon.stop()
    res["input"] = {k: v for k, v in pin.meta.items() if k != "change_script"}
    res["setup_seconds"] = setup.seconds
    res["docker"] = setup.docker
    res["layers"], layer_lines = commit_layers_summary(setup, cases)
    res["layer_checks"] = layer_lines
    res["header"].insert(3, describe_pack_input(pin).replace(
        "; the umoci bundle's rootfs has the same change", ""))
    print_group(res)
    print()
    for line in layer_lines:
        print(line)
    return res


# --- group: growth (ocilayers history and squash) ---

def growth_cases(gin: growth.GrowthInput) -> list[Case]:
    """history from the store, from the gzip layout, and `gzip -dc | tar -t` of its blobs;
    squash --all from the store, and `pack` of the image flattened once (not timed)."""
    img = gin.image
    oci = ocilayers_argv()
    root = ["--root", gin.store]

    def squash_out(rd: str) -> str:
        return os.path.join(rd, "squashed")

    def history_store(caches: bool) -> Callable[[str, int], Sample]:
        timed = prepared(lambda rd: [*oci, "-q", *root, "history", growth.TAG, "--json"])

        def measure(rd: str, rnd: int) -> Sample:
            growth.set_scan_caches(gin.store, caches)  # not timed
            return timed(rd, rnd)
        return measure

    return [
        Case("ocilayers-history-store", "ocilayers history IMAGE --json (store, scan cache)",
             "none", True, history_store(True), short="history IMAGE (store)"),
        Case("ocilayers-history-store-first", "ocilayers history IMAGE --json (store, first "
             "read: tar-split records)", "none", True, history_store(False),
             short="history IMAGE (store, first read)"),
        Case("ocilayers-history-source", "ocilayers history LAYOUT --json (gzip OCI layout)",
             "gzip", True, prepared(lambda rd: [*oci, "-q", *root, "history", img.gzip_dir,
                                                "--json"]),
             short="history LAYOUT (gzip)"),
        Case("gzip-tar-t", "gzip -dc | tar -t > /dev/null, every layer in turn", "gzip",
             False, prepared(lambda rd: growth.tar_list_script(img)),
             short="gzip -dc | tar -t"),
        Case("ocilayers-squash-all", "ocilayers squash IMAGE --all -o OUT --format oci (store)",
             "gzip", True, prepared(lambda rd: [*oci, "-q", *root, "squash", growth.TAG,
                                                "--all", "-o", squash_out(rd), "--format",
                                                "oci", "--compression", "gzip"]),
             short="squash --all (store)",
             output=lambda rd: growth.squashed_layer_size(squash_out(rd))),
        Case("ocilayers-pack-flat", "ocilayers pack FLATDIR -o OUT --compression gzip", "gzip",
             True, prepared(lambda rd: [*oci, "-q", "pack", gin.flat, "-o",
                                        os.path.join(rd, "layer.tar.gz"), "--compression",
                                        "gzip"]),
             short="pack of the flattened image",
             output=lambda rd: os.path.getsize(os.path.join(rd, "layer.tar.gz"))),
    ]


GROWTH_RATIOS: list[tuple[str, str, float | None]] = [
    ("ocilayers-history-store", "ocilayers-history-source", 0.25),
    ("ocilayers-history-store-first", "ocilayers-history-source", None),
    ("ocilayers-history-source", "gzip-tar-t", 1.2),
    ("ocilayers-squash-all", "ocilayers-pack-flat", 1.2),
    ("ocilayers-history-store", "gzip-tar-t", None),
]


def describe_growth_input(gin: growth.GrowthInput) -> str:
    f = gin.meta["flat"]
    return (f"inputs: the image unpacked once into a store of its own (tagged {growth.TAG}), "
            f"and flattened once with `ocilayers flatten` into a plain dir: "
            f"{f['file_bytes'] / 1e6:.0f} MB of file data, {f['entries']} entries "
            f"({f['files']} files, {f['dirs']} dirs, {f['symlinks']} symlinks)")


def profile_growth(gin: growth.GrowthInput, rd: str, what: str, prof: str) -> None:
    """cProfile of one `history` from the store or the gzip layout, or one `squash --all`."""
    os.makedirs(rd)
    root = ["--root", gin.store]
    cmd = {"history-store": ["history", growth.TAG, "--json"],
           "history-source": ["history", gin.image.gzip_dir, "--json"],
           "squash": ["squash", growth.TAG, "--all", "-o", os.path.join(rd, "squashed"),
                      "--format", "oci"]}[what]
    os.sync()
    subprocess.run([ocilayers_python(), "-m", "cProfile", "-o", prof, "-m", "ocilayers", "-q",
                    *root, *cmd], check=True, stdout=subprocess.DEVNULL)


def group_growth(ctx: Ctx) -> dict[str, Any]:
    assert ctx.img is not None and ctx.growth_input is not None
    gin = ctx.growth_input
    cases = growth_cases(gin)
    notes = [
        "history from the store reads the layerdb and each layer's tar-split records only (no "
        "diff dir walked, no blob), and keeps the entries it read in each layerdb dir "
        "(ocilayers-scan.json): the `scan cache` row has them (made before the run, not "
        "timed), the `first read` row has them deleted before each run; from the layout it "
        "streams every gzip blob once (inflate, blob digest and DiffID checked, tar headers "
        "parsed, nothing written); both print "
        "--json (into the run's log); `gzip -dc | tar -t` lists the same blobs, one after the "
        "other, into /dev/null (no digests)",
        "squash --all reads the store's diff dirs and writes an OCI layout with one gzip "
        "layer; the baseline packs the image's merged rootfs (`ocilayers flatten`, once, not "
        "timed) as a gzip layer (pack writes the blob only: no config, manifest or index)",
        "MB/s = the image's uncompressed layer bytes / median wall, for every row (a scale: "
        "squash and pack write the merged rootfs, smaller); out MiB = the gzip layer blob "
        "written",
    ]
    res = timed_group(ctx, "growth", cases, notes, int(ctx.img.meta["uncompressed_bytes"]),
                      GROWTH_RATIOS)
    check = growth.compare_histories(
        os.path.join(ctx.work, "growth", "ocilayers-history-store", "r0.log"),
        os.path.join(ctx.work, "growth", "ocilayers-history-source", "r0.log"))
    res["history_check"] = check
    res["input"] = dict(gin.meta)
    res["header"].insert(3, describe_image(ctx.img))
    res["header"].insert(4, describe_growth_input(gin))
    print_group(res)
    print()
    print(check)
    if ctx.args.profile:
        res["profile_top"] = {}
        for what in ("history-store", "history-source", "squash"):
            prof = os.path.join(ctx.cache, f"growth-{what}.prof")
            log(f"growth: cProfile of one `ocilayers {what.replace('-', ' from the ')}`")
            profile_growth(gin, os.path.join(ctx.work, "growth", f"profile-{what}"), what, prof)
            res["profile_top"][what] = profile_top(prof, 20, GROWTH_AREAS)
            print()
            print(f"cProfile, ocilayers {what.replace('-', ' from the ')}, top functions by own "
                  "time:")
            print(res["profile_top"][what])
    return res


# --- group: registry (pull from and push to a docker-registry on loopback) ---

PULL_REF = "bench:1"  # the image in the source registry the pull rows read
PUSH_REPO = "bench-push"  # the repository every push writes (in a fresh registry per run)
REPULL_GOAL_S = 0.3  # `unpack docker://` of an image the store has: median wall below this


@dataclass
class RegistrySetup:
    """What the registry group starts and records (set-up not timed)."""

    base: str
    source: registry.Registry | None = None  # the registry the pull rows read, up all group
    registries: list[registry.Registry] = field(default_factory=list)  # all, stopped after
    daemon: dockerd.Dockerd | None = None  # the docker push row's, with the image loaded
    store: str = ""  # the push-from-store row's store (the image unpacked from the layout)
    registry_cpu: dict[str, list[float]] = field(default_factory=dict)  # key -> per run
    pushes: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # key -> rnd
    docker: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def start_registry(self, base: str) -> registry.Registry:
        reg = registry.start_registry(base)
        self.registries.append(reg)
        return reg

    def stop_all(self) -> None:
        for reg in self.registries:
            reg.stop()
        if self.daemon is not None:
            self.daemon.stop()


def with_registry(setup: RegistrySetup, key: str, reg: registry.Registry,
                  timed: Callable[[], Sample]) -> Sample:
    """Run `timed()`; the registry's CPU over it is recorded apart (the server both sides talk
    to) and taken out of the run's other CPU."""
    c0 = reg.cpu_seconds()
    s = timed()
    cpu = reg.cpu_seconds() - c0
    setup.registry_cpu.setdefault(key, []).append(cpu)
    return Sample(s.wall, s.cpu, s.rss_kib, s.ok, s.error, s.sys, max(0.0, s.other - cpu),
                  s.touch_us)


def registry_cases(ctx: Ctx, setup: RegistrySetup) -> tuple[list[Case], list[str]]:
    """The pull rows read `bench:1` from one registry (started here, the image pushed into it
    from the gzip layout, not timed); every push run gets a registry of its own with empty
    storage (started before and stopped after the timed push, not timed), so nothing is ever
    there already and nothing can be mounted: every blob is uploaded."""
    assert ctx.img is not None
    img = ctx.img
    base = setup.base
    notes: list[str] = []
    oci = ocilayers_argv()
    t0 = time.monotonic()
    why_docker = "--no-docker" if ctx.args.no_docker else dockerd.available()
    skopeo, umoci = shutil.which("skopeo"), shutil.which("umoci")

    log("registry: start the source registry and push the image into it (not timed)")
    src = setup.source = setup.start_registry(os.path.join(base, "source-registry"))
    pull_ref = f"{src.host}/{PULL_REF}"
    subprocess.run([*oci, "-q", "push", img.gzip_dir, f"docker://{pull_ref}"], check=True,
                   stdout=subprocess.DEVNULL)

    # --- pulls ---
    cold_roots: dict[int, str] = {}

    def ocilayers_pull(rd: str, rnd: int) -> Sample:
        os.makedirs(rd)
        cold_roots[rnd] = os.path.join(rd, "store")
        os.sync()
        return with_registry(setup, "ocilayers-pull", src, lambda: run_measured(
            [*oci, "-q", "--root", cold_roots[rnd], "unpack", f"docker://{pull_ref}"],
            log_path=rd + ".log"))

    def ocilayers_repull(rd: str, rnd: int) -> Sample:
        os.makedirs(rd)
        os.sync()
        return with_registry(setup, "ocilayers-repull", src, lambda: run_measured(
            [*oci, "-q", "--root", cold_roots[rnd], "unpack", f"docker://{pull_ref}"],
            log_path=rd + ".log"))

    def docker_pull(rd: str, _rnd: int) -> Sample:
        """A fresh daemon per run (its own empty data root: no layer of the image there),
        started before and stopped after the timed pull."""
        os.makedirs(rd)
        d = dockerd.Dockerd(os.path.join(rd, "data"))
        exec_roots.append(str(d.base))
        try:
            d.start(rd + ".dockerd.log")
            if layerdb_entries(str(d.data_root)):
                raise RuntimeError("the fresh daemon's layerdb is not empty")
            os.sync()
            s = with_registry(setup, "docker-pull", src, lambda: daemon_measured(
                d, [dockerd.DOCKER, "-H", d.host, "pull", "-q", pull_ref], rd + ".log"))
            if s.ok:
                got = d.docker("image", "inspect", "--format", "{{.Id}}", pull_ref)
                want = img_id(img)
                if got.stdout.strip() != want:
                    raise RuntimeError(f"docker pulled image {got.stdout.strip()}, not {want}")
            return s
        finally:
            d.stop()

    def skopeo_umoci_pull(rd: str, _rnd: int) -> Sample:
        os.makedirs(rd)
        env = registry.skopeo_env(os.path.join(rd, "skopeo-home"))
        layout, rootfs = os.path.join(rd, "layout"), os.path.join(rd, "rootfs")
        script = (f"skopeo --insecure-policy copy -q --src-tls-verify=false "
                  f"docker://{pull_ref} oci:{shlex.quote(layout)}:bench\n"
                  f"umoci raw unpack --image {shlex.quote(layout)}:bench "
                  f"{shlex.quote(rootfs)}")
        os.sync()
        return with_registry(setup, "skopeo-umoci-pull", src, lambda: run_measured(
            shell(script), env=env, log_path=rd + ".log"))

    cases = [
        Case("ocilayers-pull", "ocilayers unpack docker://, empty store", "gzip", True,
             ocilayers_pull, short="ocilayers unpack docker://"),
        Case("ocilayers-repull", "ocilayers unpack docker://, image present (re-pull)", "gzip",
             True, ocilayers_repull, short="ocilayers re-pull"),
    ]
    if why_docker:
        notes.append(f"docker pull and docker push skipped: {why_docker}")
    else:
        cases.append(Case("docker-pull", "docker pull (fresh dockerd)", "gzip", False,
                          docker_pull, short="docker pull"))
    if skopeo and umoci:
        cases.append(Case("skopeo-umoci-pull", "skopeo copy docker:// oci: + umoci raw unpack",
                          "gzip", False, skopeo_umoci_pull,
                          short="skopeo copy + umoci raw unpack"))
    else:
        notes.append("skopeo or umoci not found: the skopeo copy + umoci raw unpack row is "
                     "skipped")

    # --- pushes, each into a registry of its own ---
    def push_run(key: str, rd: str, rnd: int,
                 argv_for: Callable[[str], tuple[list[str], dict[str, str] | None]],
                 daemon: dockerd.Dockerd | None = None,
                 before: Callable[[registry.Registry], None] | None = None) -> Sample:
        os.makedirs(rd)
        reg = setup.start_registry(os.path.join(rd, "registry"))
        try:
            argv, env = argv_for(f"{reg.host}/{PUSH_REPO}:r{rnd}")
            if before is not None:
                before(reg)
            os.sync()
            if daemon is not None:
                s = with_registry(setup, key, reg,
                                  lambda: daemon_measured(daemon, argv, rd + ".log"))
            else:
                s = with_registry(setup, key, reg,
                                  lambda: run_measured(argv, env=env, log_path=rd + ".log"))
        finally:
            reg.stop()
        setup.pushes.setdefault(key, {})[rnd] = reg.upload_summary()
        return s

    def pushed_bytes(key: str) -> Callable[[str], int]:
        def size(rd: str) -> int:
            rnd = int(os.path.basename(rd)[1:])
            return int(setup.pushes[key][rnd]["blob_bytes"])
        return size

    def ocilayers_push(key: str, source: list[str]) -> Callable[[str, int], Sample]:
        return lambda rd, rnd: push_run(key, rd, rnd, lambda ref: (
            [*oci, "-q", *source[:-1], "push", source[-1], f"docker://{ref}"], None))

    def skopeo_push(rd: str, rnd: int) -> Sample:
        return push_run("skopeo-push-layout", rd, rnd, lambda ref: (
            ["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false",
             f"oci:{img.gzip_dir}:{img.tag}", f"docker://{ref}"],
            registry.skopeo_env(os.path.join(rd, "skopeo-home"))))

    def docker_push(rd: str, rnd: int) -> Sample:
        d = setup.daemon
        assert d is not None

        def tag(reg: registry.Registry) -> None:
            d.docker("tag", BASE_TAG, f"{reg.host}/{PUSH_REPO}:r{rnd}")

        return push_run("docker-push", rd, rnd, lambda ref: (
            [dockerd.DOCKER, "-H", d.host, "push", "-q", ref], None), daemon=d, before=tag)

    cases.append(Case("ocilayers-push-layout", "ocilayers push LAYOUT docker:// (gzip layout)",
                      "gzip", True, ocilayers_push("ocilayers-push-layout", [img.gzip_dir]),
                      short="ocilayers push LAYOUT",
                      output=pushed_bytes("ocilayers-push-layout")))
    if skopeo:
        cases.append(Case("skopeo-push-layout", "skopeo copy oci:LAYOUT docker://", "gzip",
                          False, skopeo_push, short="skopeo copy oci: docker://",
                          output=pushed_bytes("skopeo-push-layout")))
    else:
        notes.append("skopeo not found: the skopeo copy oci: docker:// row is skipped")

    log("registry: unpack the image from the gzip layout into a store (not timed)")
    setup.store = os.path.join(base, "ocilayers-push-store", "store")
    subprocess.run([*oci, "-q", "--root", setup.store, "unpack", img.gzip_dir, "--tag",
                    BASE_TAG], check=True, stdout=subprocess.DEVNULL)
    cases.append(Case("ocilayers-push-store", "ocilayers push IMAGE docker:// (store, gzip)",
                      "gzip", True,
                      ocilayers_push("ocilayers-push-store", ["--root", setup.store, BASE_TAG]),
                      short="ocilayers push IMAGE (store)",
                      output=pushed_bytes("ocilayers-push-store")))
    if not why_docker:
        d = dockerd.Dockerd(os.path.join(base, "docker-push", "data"))
        exec_roots.append(str(d.base))
        setup.daemon = d
        try:
            os.makedirs(os.path.join(base, "docker-push"), exist_ok=True)
            log("registry: start a throwaway dockerd and `docker load` the image (not timed)")
            d.start(os.path.join(base, "docker-push", "dockerd.log"))
            d.docker("load", "-q", "-i", img.docker_archive, timeout=600)
            setup.docker = {"version": d.version()}
            cases.append(Case("docker-push", "docker push (docker load-ed image)", "gzip",
                              False, docker_push, short="docker push",
                              output=pushed_bytes("docker-push")))
        except Exception as exc:  # a baseline that cannot run is skipped, not fatal
            notes.append(f"docker push skipped: {type(exc).__name__}: {str(exc)[:300]}")
    setup.seconds = round(time.monotonic() - t0, 1)
    return cases, notes


def img_id(img: BenchImage) -> str:
    """The image ID (config digest) of the benchmark image."""
    with open(os.path.join(img.gzip_dir, "index.json")) as f:
        index = json.load(f)
    algo, hexpart = index["manifests"][0]["digest"].split(":", 1)
    with open(os.path.join(img.gzip_dir, "blobs", algo, hexpart)) as f:
        return str(json.load(f)["config"]["digest"])


REGISTRY_RATIOS: list[tuple[str, str, float | None]] = [
    ("ocilayers-pull", "docker-pull", 0.5),
    ("ocilayers-pull", "skopeo-umoci-pull", 0.5),
    ("ocilayers-push-layout", "skopeo-push-layout", 1.0),
    ("ocilayers-push-store", "docker-push", 1.0),
]


def push_checks(setup: RegistrySetup, nblobs: int) -> list[str]:
    """What each push row did to its fresh registry, from the registry's access log and
    storage: every blob must have been uploaded (none found there, none mounted)."""
    lines = []
    for key, per in setup.pushes.items():
        runs = [per[r] for r in sorted(per)]
        ups = sorted({x["uploads"] for x in runs})
        mib = statistics.median(x["blob_bytes"] for x in runs) / MIB
        line = (f"{key}: blob uploads per run {'/'.join(map(str, ups))} (image: {nblobs} "
                f"blobs), cross-repo mounts {sum(x['mounts'] for x in runs)}, blobs found "
                f"already there {sum(x['heads_present'] for x in runs)} (in all runs); "
                f"registry storage after the push: {mib:.1f} MiB (median, manifest included)")
        if any(x["uploads"] < nblobs or x["mounts"] or x["heads_present"] for x in runs):
            line = "PROBLEM: not every blob was uploaded: " + line
        lines.append(line)
    return lines


def group_registry(ctx: Ctx) -> dict[str, Any]:
    assert ctx.img is not None
    img = ctx.img
    why = registry.available()
    base = os.path.join(ctx.work, "registry")
    os.makedirs(base)
    setup = RegistrySetup(base)
    if why:
        print()
        print(f"ocilayers benchmarks: registry   skipped: {why}")
        return {"group": "registry", "kind": ctx.kind, "skipped": why, "results": [],
                "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "ocilayers": {"git": git_describe(REPO)}}
    try:
        cases, notes = registry_cases(ctx, setup)
        notes += [
            "plain HTTP on 127.0.0.1 for every tool (dockerd treats loopback registries as "
            "insecure; ocilayers uses HTTP for a loopback host that does not speak TLS; "
            "skopeo --src/--dest-tls-verify=false); docker-registry (distribution 2.8), "
            "filesystem storage on the same disk",
            f"pulls read {PULL_REF} from one registry (the gzip layout pushed into it, not "
            "timed); ocilayers unpacks into a new empty store per run, the re-pull runs the "
            "same command again into the store that round's cold pull filled; docker pull "
            "runs in a fresh dockerd per run (own empty data root, started before and stopped "
            "after the timed pull: no layer of the image there, and nothing deleted between "
            "runs, see the ext4 caveat); skopeo copy (to a new OCI layout) and umoci raw "
            "unpack (merged rootfs) run one after the other in one timed bash",
            "every push run gets a registry of its own with empty storage (started before, "
            "stopped after, not timed): nothing can be found there or mounted, every blob is "
            "uploaded (checked below from its access log and storage); the layout rows copy "
            "the gzip blobs as they are; the store rows compress every layer (ocilayers: "
            "ISA-L gzip; dockerd: Go's gzip) from an image that was unpacked from / loaded "
            "as a file (no distribution records); skopeo runs with its own $HOME/XDG dirs and "
            "_CONTAINERS_ROOTLESS_UID, so no root-wide blob-info cache",
            "CPU: the client's (docker: + dockerd's CPU delta); the registry's own CPU is not "
            "in it and not in other CPU (median per row below); MB/s = the image's "
            "uncompressed layer bytes / median wall (a common scale); out MiB = the blobs "
            "the registry stored (layers, config, manifest)",
        ]
        res = timed_group(ctx, "registry", cases, notes, int(img.meta["uncompressed_bytes"]),
                          REGISTRY_RATIOS)
    finally:
        setup.stop_all()
    by = {r["key"]: r for r in res["results"]}
    for key, cpus in setup.registry_cpu.items():
        if key in by and cpus:
            by[key]["median_registry_cpu_s"] = round(statistics.median(cpus), 3)
    goals = []
    rep = by.get("ocilayers-repull", {})
    if "median_wall_s" in rep:
        goals.append({"key": "ocilayers-repull", "tool": rep["tool"],
                      "median_wall_s": rep["median_wall_s"], "goal_below_s": REPULL_GOAL_S,
                      "goal_met": rep["median_wall_s"] < REPULL_GOAL_S})
    res["absolute_goals"] = goals
    res["pushes"] = {k: [v[r] for r in sorted(v)] for k, v in setup.pushes.items()}
    res["push_checks"] = push_checks(setup, len(img.blobs("gzip")) + 1)
    res["setup_seconds"] = setup.seconds
    res["docker"] = setup.docker
    res["image"] = dict(img.meta)
    res["header"].insert(3, describe_image(img))
    print_group(res)
    print()
    for g in goals:
        print(f"{g['tool']}: median {g['median_wall_s']:.2f} s   goal < {g['goal_below_s']} s: "
              f"{'met' if g['goal_met'] else 'MISSED'}")
    short = {c: x for c, x in ((r["key"], r["tool"].split(" (")[0].split(",")[0])
                               for r in res["results"])}
    cpus = [f"{short[r['key']]}{' (re-pull)' if r['key'] == 'ocilayers-repull' else ''} "
            f"{r['median_registry_cpu_s']:.2f}" for r in res["results"]
            if "median_registry_cpu_s" in r]
    if cpus:
        print("registry CPU s per run (median, not in the CPU column): " + ", ".join(cpus))
    for line in res["push_checks"]:
        print(line)
    return res


# --- group: memory ---

def group_memory(ctx: Ctx) -> dict[str, Any]:
    assert ctx.mem_input is not None
    t0 = time.monotonic()
    load_before = loadavg()
    git_before = git_describe(REPO)
    rows = memory.run_memory(ctx.mem_input, ctx.work, log)
    notes = ["one run per operation (memory, not speed); outputs are deleted right after each "
             "operation",
             "parent = RUSAGE_SELF of the ocilayers process (the CLI run in-process by "
             "ocilayers_rusage.py); workers = RUSAGE_CHILDREN, the largest forked child (it "
             "starts with the parent's pages, so it includes what it shares with the parent): "
             "a layer's build worker, or in a one-layer unpack a file writer process; pack "
             "forks none",
             f"limit: {memory.LIMIT_BYTES / 1e6:.0f} MB = {memory.LIMIT_BYTES / MIB:.1f} MiB "
             "for any single process (information, not a test)"]
    git_after = git_describe(REPO)
    if git_after != git_before:
        notes.append(f"the ocilayers source changed during the runs (it was {git_before} at the "
                     f"start, {git_after} at the end)")
    res = {"group": "memory", "kind": ctx.kind,
           "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "ocilayers": {"git": git_before},
           "inputs": ctx.mem_input.meta, "operations": rows, "notes": notes,
           "seconds": round(time.monotonic() - t0, 1)}
    layers = ctx.mem_input.meta["layers"]
    print()
    print(f"ocilayers benchmarks: memory   (git {git_before})")
    print("inputs: " + "; ".join(
        f"{x['kind']}: {x['uncompressed_bytes'] / 2**30:.2f} GiB uncompressed "
        f"({x['files']} files, one of {memory.BIG_FILE / 2**30:.3f} GiB), gzip "
        f"{x['size'] / 2**30:.2f} GiB" for x in layers))
    load_after = loadavg()
    res["load_average"] = [load_before, load_after]
    print(f"load average: {load_before} before, {load_after} after")
    print()
    w = max(len(r["operation"]) for r in rows) + 2
    print(f"{'operation':<{w}}{'wall s':>8}{'MB/s':>7}{'CPU s':>8}{'parent MiB':>12}"
          f"{'workers MiB':>13}{'other CPU s':>13}  < 150 MB")
    print("-" * (w + 72))
    for r in rows:
        if "error" in r:
            print(f"{r['operation']:<{w}}  FAILED: {r['error'][:120]}")
            continue
        wk = r["workers_peak_rss_mib"]
        print(f"{r['operation']:<{w}}{r['wall_s']:>8.1f}{r['mb_per_s']:>7.1f}{r['cpu_s']:>8.1f}"
              f"{r['parent_peak_rss_mib']:>12.1f}{'-' if wk is None else f'{wk:.1f}':>13}"
              f"{r['other_cpu_s']:>13.1f}  {'PASS' if r['pass'] else 'FAIL'}")
    print()
    for n in notes:
        print(f"note: {n}")
    return res


# --- group: smallfiles (one layer of 100,000 small files; see smallfiles.py) ---

def group_smallfiles(ctx: Ctx) -> dict[str, Any]:
    assert ctx.small_input is not None
    inp = ctx.small_input
    rows, notes = smallfiles.rows(inp, tar_script)
    cases = [Case(r.key, r.label, r.compression, r.ocilayers, prepared(r.argv, r.mkdirs, r.env),
                  short=r.short) for r in rows]
    res = timed_group(ctx, "smallfiles", cases, [*smallfiles.NOTES, *notes],
                      int(inp.meta["tar_bytes"]), smallfiles.RATIOS)
    res["input"] = dict(inp.meta)
    res["per_row"] = smallfiles.per_row(res["results"], inp.files)
    res["header"].insert(3, smallfiles.describe(inp))
    print_group(res)
    print()
    print(res["per_row"]["text"])
    return res


# --- the timed loop and reporting ---

def timed_group(ctx: Ctx, group: str, cases: list[Case], notes: list[str], data_bytes: int,
                ratio_pairs: list[tuple[str, str, float | None]]) -> dict[str, Any]:
    """Run every case `ctx.runs` times, alternating (A B C ... A B C ...), each run into a new
    dir under `work/group/`; a round's dirs are deleted after it with `ctx.delete_rounds`
    (not timed), else nothing is deleted in between. Returns the group's results."""
    t0 = time.monotonic()
    load_before = loadavg()
    git_before = git_describe(REPO)
    runs = ctx.runs
    for rnd in range(runs):
        for case in cases:
            if case.skipped:
                continue
            rd = os.path.join(ctx.work, group, case.key, f"r{rnd}")
            try:
                s = case.measure(rd, rnd)
            except Exception as exc:  # a baseline that cannot run is skipped, not fatal
                if case.ocilayers:
                    raise
                case.skipped = f"{type(exc).__name__}: {exc}"
                notes.append(f"{case.label} skipped: {case.skipped}")
                continue
            case.samples.append(s)
            if case.output is not None and s.ok:
                case.out_bytes.append(case.output(rd))
            log(f"{group} round {rnd + 1}/{runs}  {case.label:<52} {s.wall:7.2f} s"
                f"  (memory probe {s.touch_us:.1f} us/page)"
                + ("" if s.ok else f"  FAILED {s.error[:200]}"))
        if ctx.delete_rounds:
            for case in cases:
                remove_tree(os.path.join(ctx.work, group, case.key, f"r{rnd}"))
            log(f"{group} round {rnd + 1}/{runs}: its outputs deleted (not timed)")
    load_after = loadavg()
    git_after = git_describe(REPO)
    if git_after != git_before:
        notes.append(f"the ocilayers source changed during the timed runs (it was "
                     f"{git_before} at the start, {git_after} at the end): the rows may mix "
                     "versions")
    samples = [x for c in cases for x in c.samples]
    busy = sum(x.other for x in samples) / max(sum(x.wall for x in samples), 1e-9)
    if busy > 0.15:
        notes.append(f"the machine was not idle: the rest of it used {busy:.2f} CPUs on "
                     f"average during the timed runs (see the other-CPU column and the "
                     f"min-max spread)")
    if slow := [x for x in samples if x.touch_us >= PROBE_SLOW_US]:
        notes.append(f"{len(slow)} of {len(samples)} runs started while new memory was slow to "
                     f"touch (memory probe >= {PROBE_SLOW_US:.0f} us/page; resident memory "
                     f"takes ~3-5): the host was handing the guest's pages back in, which every "
                     f"tool pays per page of page cache it fills (see measure.memory_probe)")
    rows = [summarize(c, data_bytes) for c in cases]
    version = subprocess.run([*ocilayers_argv(), "--version"], capture_output=True,
                             text=True).stdout.strip()
    header = [
        f"ocilayers benchmarks: {group}   ({version}, git {git_before})",
        f"machine: {os.cpu_count()} CPUs, load average {load_before} before the timed runs, "
        f"{load_after} after; other CPU used by the rest of the machine: {busy:.2f} CPUs "
        f"on average",
        f"{runs} timed runs per tool, tools alternating run by run (ABAB...), median shown; "
        f"inputs warm in the page cache, `sync` before each run (not timed)",
        "CPU = user+sys of the whole process tree; peak RSS = largest single process "
        "(ru_maxrss via wait4); other CPU = what the rest of the machine (other processes, "
        "kernel threads) used during the run",
    ]
    return {"group": group, "kind": ctx.kind,
            "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "ocilayers": {"version": version, "git": git_before},
            "runs_per_tool": runs, "results": rows,
            "ratios": ratios(rows, ratio_pairs, {c.key: c.short or c.label for c in cases}),
            "notes": notes, "load_average": [load_before, load_after],
            "other_cpus": round(busy, 3), "header": header,
            "seconds": round(time.monotonic() - t0, 1)}


def summarize(case: Case, data_bytes: int) -> dict[str, Any]:
    ok = [s for s in case.samples if s.ok]
    row: dict[str, Any] = {"key": case.key, "tool": case.label,
                           "compression": case.compression}
    if case.skipped or not ok:
        row["error"] = case.skipped or next((s.error for s in case.samples if not s.ok), "?")
        return row
    walls = [s.wall for s in ok]
    med = statistics.median(walls)
    row.update({
        "runs": len(ok), "failed_runs": len(case.samples) - len(ok),
        "wall_s": [round(w, 3) for w in walls],
        "median_wall_s": round(med, 3), "min_wall_s": round(min(walls), 3),
        "max_wall_s": round(max(walls), 3),
        "median_cpu_s": round(statistics.median(s.cpu for s in ok), 3),
        "median_sys_s": round(statistics.median(s.sys for s in ok), 3),
        "median_other_cpu_s": round(statistics.median(s.other for s in ok), 3),
        "memory_probe_us": [round(s.touch_us, 1) for s in ok],
        "peak_rss_mib": round(max(s.rss_kib for s in ok) / 1024, 1),
        "mb_per_s": round(data_bytes / 1e6 / med, 1) if med else None,
    })
    if case.out_bytes:
        row["output_bytes"] = int(statistics.median(case.out_bytes))
    return row


def ratios(rows: list[dict[str, Any]], pairs: list[tuple[str, str, float | None]],
           short: dict[str, str]) -> list[dict[str, object]]:
    by = {r["key"]: r for r in rows if "median_wall_s" in r}
    out: list[dict[str, object]] = []
    for a, b, goal in pairs:
        if a in by and b in by:
            ra, rb = by[a], by[b]
            wall = round(float(ra["median_wall_s"]) / float(rb["median_wall_s"]), 2)
            x: dict[str, object] = {
                "a": ra["tool"], "b": rb["tool"], "a_short": short[a], "b_short": short[b],
                "wall": wall,
                "cpu": round(float(ra["median_cpu_s"]) / max(float(rb["median_cpu_s"]), 1e-9),
                             2)}
            if goal is not None:
                x["goal_at_most"] = goal
                x["goal_met"] = wall <= goal
            out.append(x)
    return out


def describe_image(img: BenchImage) -> str:
    m = img.meta
    layers = m["layers"]
    sizes = [x["bytes"] for x in layers if x]
    big = max(sizes) / m["uncompressed_bytes"] if sizes else 0
    wh = sum(x["whiteouts"] for x in layers if x)
    opq = sum(x["opaque_dirs"] for x in layers if x)
    ent = sum(x["entries"] for x in layers if x)
    cb = m["compressed_bytes"]
    return (f"{m['kind']} image: {len(img.blobs('gzip'))} layers ({m['base']}), "
            f"{m['uncompressed_bytes'] / MIB:.0f} MiB uncompressed, gzip {cb['gzip'] / MIB:.0f} "
            f"MiB, zstd {cb['zstd'] / MIB:.0f} MiB; "
            + (f"biggest layer {big:.0%}, {ent} entries, {wh} whiteouts, {opq} opaque dirs"
               if m["kind"] == "full" else "fixtures/demo layers + a generated layer"))


def print_group(res: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = res["results"]
    print()
    for line in res["header"]:
        print(line)
    print()
    out_col = any("output_bytes" in r for r in rows)
    w = max(len(str(r["tool"])) for r in rows) + 2
    print(f"{'tool':<{w}}{'wall s':>8}{'min-max':>13}{'CPU s':>8}{'(sys)':>7}"
          f"{'peak RSS MiB':>14}{'MB/s':>7}" + (f"{'out MiB':>9}" if out_col else "")
          + f"{'other CPU s':>13}{'runs':>6}")
    print("-" * (w + 76 + (9 if out_col else 0)))
    for r in rows:
        if "median_wall_s" not in r:
            print(f"{r['tool']:<{w}}  n/a: {str(r.get('error', ''))[:100]}")
            continue
        mm = f"{r['min_wall_s']:.2f}-{r['max_wall_s']:.2f}"
        out = ""
        if out_col:
            out = f"{r['output_bytes'] / MIB:>9.1f}" if "output_bytes" in r else f"{'':>9}"
        print(f"{r['tool']:<{w}}{r['median_wall_s']:>8.2f}{mm:>13}{r['median_cpu_s']:>8.2f}"
              f"{r['median_sys_s']:>7.2f}{r['peak_rss_mib']:>14.1f}{r['mb_per_s']:>7.1f}{out}"
              f"{r['median_other_cpu_s']:>13.2f}{r['runs']:>6}")
    if res["ratios"]:
        print()
        print("ratios of medians (wall; CPU in brackets), below 1 = ocilayers faster:")
        for x in res["ratios"]:
            goal = ""
            if "goal_at_most" in x:
                goal = (f"   goal <= {x['goal_at_most']}: "
                        f"{'met' if x['goal_met'] else 'MISSED'}")
            if res["group"] == "unpack":
                name = f"{x['a']} / {x['b']}"
            else:
                name = f"{x['a_short']} / {x['b_short']}"
            print(f"  {name} = {x['wall']:.2f}x  (CPU {x['cpu']:.2f}x){goal}")
    if res["notes"]:
        print()
        for n in res["notes"]:
            print(f"note: {n}")


def merge_results(path: str, new: dict[str, Any], groups: dict[str, Any]) -> dict[str, Any]:
    """The results file: common fields, and one entry per group. Groups not run this time are
    kept from the file as they were (each says when and on which git version it ran)."""
    old: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
    kept = dict(old.get("groups") or {})
    if not kept and "results" in old:  # the first format: the unpack group only, flat
        kept["unpack"] = {"group": "unpack", **{k: v for k, v in old.items() if k != "machine"}}
    for name, res in groups.items():
        kept[name] = {k: v for k, v in res.items() if k != "header"}
    ordered = {g: kept[g] for g in GROUPS if g in kept}
    ordered.update({g: v for g, v in kept.items() if g not in ordered})
    return {"format": RESULTS_FORMAT, **new, "groups": ordered}


# --- main ---

def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, `pkill`) end the run as Ctrl-C does: by an exception, so that
    every `finally` runs (a build's overlay mounts are unmounted, its scratch dir removed)."""
    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)


GROUP_RUNNERS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "unpack": group_unpack, "pack": group_pack, "tarsplit": group_tarsplit,
    "commit": group_commit, "growth": group_growth, "registry": group_registry,
    "smallfiles": group_smallfiles, "memory": group_memory,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="small busybox image, 2 runs, no settling pauses, no memory group, "
                        "commit, growth, registry and smallfiles groups only with --only "
                        "(about a minute)")
    p.add_argument("--only", choices=GROUPS, action="append",
                   help="benchmark group(s) to run (default: all; with --quick unpack, pack "
                        "and tarsplit)")
    p.add_argument("--runs", type=int, help="timed runs per tool (default 5; 2 with --quick)")
    p.add_argument("--cache", default=os.environ.get("OCILAYERS_BENCH_CACHE", DEFAULT_CACHE),
                   help="input cache and scratch dir (default $OCILAYERS_BENCH_CACHE or "
                        f"{DEFAULT_CACHE})")
    p.add_argument("--json", help="results file (default benchmarks/results/latest.json; "
                                  "with --quick CACHE/results-quick.json); groups not run are "
                                  "kept from it")
    p.add_argument("--no-docker", action="store_true",
                   help="skip the docker baselines (docker load, commit, pull, push)")
    p.add_argument("--profile", action="store_true",
                   help="also print the top functions of the tarsplit group's cProfile of "
                        "`unpack --jobs 1`, and (pack group) cProfile one `pack` per "
                        "compression, (growth group) one `history` from the store, one from "
                        "the gzip layout and one `squash --all`")
    p.add_argument("--keep", action="store_true", help="keep the unpacked trees and outputs")
    p.add_argument("--settle", type=float,
                   help=f"seconds to pause after deletions, this run's or the previous "
                        f"run's clean-up (default: 360 on an ext4 without a journal, else 60; "
                        f"0 with --quick): {SETTLE_NOTE}")
    p.add_argument("--base", choices=("auto", "debootstrap", "host-copy"), default="auto",
                   help="how layer 1 of the full image is made (default: debootstrap, else a "
                        "copy of host files)")
    args = p.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    cache = os.path.abspath(args.cache)
    json_path = args.json or (os.path.join(cache, "results-quick.json") if args.quick
                              else os.path.join(HERE, "results", "latest.json"))
    if args.only:
        groups = [g for g in GROUPS if g in args.only]
    else:
        groups = list(QUICK_GROUPS if args.quick else GROUPS)
    if args.quick and "memory" in groups:
        log("the memory group uses ~2 GiB layers: it runs in full runs only (no --quick)")
        return 2
    if os.geteuid() != 0:
        log("run.py needs root (owners, mounts, umoci and dockerd as root)")
        return 2
    t_start = time.monotonic()
    os.makedirs(cache, exist_ok=True)
    settle = args.settle if args.settle is not None else (
        0.0 if args.quick else EXT4_RECENTLY_DELETED_S if ext4_without_journal(cache) else 60.0)
    lock = open(os.path.join(cache, ".lock"), "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another run.py is using {cache}; use --cache for a second one")
        return 2
    exit_on_sigterm()
    for path in remove_stale_builds(cache):
        log(f"removed {path}, left by an interrupted input build")
    pkg = compile_ocilayers()
    common_notes = [f"ocilayers' modules were compiled to .pyc first (`python -m compileall -q "
                    f"{pkg}`), as `pip install` does: PYTHONDONTWRITEBYTECODE=1 here would "
                    f"otherwise make every start of an editable install compile them again"]

    kind = "quick" if args.quick else "full"
    img = pin = mem = gin = sfi = None
    deleted = False
    if any(g in groups for g in ("unpack", "pack", "tarsplit", "commit", "growth",
                                 "registry")):
        img, built = ensure_image(kind, cache, REPO, base=args.base)
        deleted |= built
    if "pack" in groups or "commit" in groups:
        assert img is not None
        pin, built = ensure_pack_input(kind, cache, img)
        deleted |= built
    if "growth" in groups:
        assert img is not None
        gin, built = growth.ensure_growth_input(kind, cache, img)
        deleted |= built
    if "smallfiles" in groups:  # its own input only, not the benchmark image
        sfi, built = smallfiles.ensure_input(cache)
        deleted |= built  # the pause after an input build, as for the others
    if "memory" in groups:
        mem, _ = memory.ensure_memory_inputs(cache)
    work_root = os.path.join(cache, "runs")
    if os.path.exists(work_root):  # left by an interrupted run
        log(f"removing leftovers in {work_root}")
        remove_tree(work_root)
        deleted = True
    timed = [g for g in groups if g != "memory"]
    # A previous run's clean-up counts too: it deleted as many files as this run will make.
    since = time.time() - last_cleanup(cache)
    pause = settle if deleted else max(0.0, min(settle, settle - since))
    if pause and timed:
        why = "the input build / clean-up" if deleted else f"the previous run's clean-up " \
            f"{since:.0f} s ago"
        log(f"pausing {pause:.0f} s after {why} before timing: {SETTLE_NOTE}")
        time.sleep(pause)
        common_notes.append(f"paused {pause:.0f} s after {why} before timing")
    elif deleted and timed:
        common_notes.append("no settling pause after the input build / clean-up (--quick or "
                            "--settle 0): the first runs may be slower")
    # On an ext4 without a journal a deletion slows the file creation after it (SETTLE_NOTE):
    # there the outputs stay until the end. Elsewhere each round's go after it, so the page
    # cache does not grow run by run into memory this VM has handed back to its host (every
    # tool slowed alike from the third round on in runs that kept everything; see
    # measure.memory_probe).
    delete_rounds = not args.keep and not ext4_without_journal(cache)
    common_notes.append("each run writes into a fresh dir; " + (
        "the outputs are kept (--keep)" if args.keep else
        "each round's outputs are deleted after the round (not timed; the cache dir's file "
        "system is not an ext4 without a journal, so a deletion does not slow the next "
        "round)" if delete_rounds else
        f"nothing is deleted between timed runs; the outputs are deleted after all groups "
        f"({SETTLE_NOTE})"))
    work = os.path.join(work_root, datetime.datetime.now().strftime("%Y%m%dT%H%M%S"))
    os.makedirs(work)
    ctx = Ctx(args, kind, runs, cache, work, img, pin, mem, gin, sfi, delete_rounds)

    mach = machine_info(cache)
    print(f"ocilayers benchmarks ({kind}): {', '.join(groups)}")
    print(f"machine: {mach['nproc']} CPUs, {mach['cpu_model']}, {mach['mem_gib']} GiB RAM, "
          f"Linux {mach['kernel']}, Python {mach['python']}; cache dir {mach['cache_dir']} on "
          f"{mach['cache_fs']}")
    print(f"ocilayers: {' '.join(ocilayers_argv())}")
    for n in common_notes:
        print(f"note: {n}")
    done: dict[str, Any] = {}
    failed = False

    def write_json() -> None:
        result = merge_results(json_path, {
            "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
            "machine": mach, "notes": common_notes,
            "harness_seconds": round(time.monotonic() - t_start, 1),
        }, done)
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, json_path)

    try:
        for g in groups:
            compile_ocilayers()  # the other modules may have changed since the last group
            res = GROUP_RUNNERS[g](ctx)
            res["command"] = " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])])
            done[g] = res
            failed |= any(not ok for ok in _ocilayers_ok(res))
            write_json()
    finally:
        if args.keep:
            log(f"outputs kept in {work}")
        else:
            log(f"cleaning up {work}")
            remove_tree(work)
            mark_cleanup(cache)
        for d in exec_roots:
            remove_tree(d)
        if not args.keep and os.path.isdir(work_root) and not os.listdir(work_root):
            os.rmdir(work_root)
    print()
    print(f"results written to {json_path} ({time.monotonic() - t_start:.0f} s in all)")
    return 1 if failed else 0


def _ocilayers_ok(res: dict[str, Any]) -> list[bool]:
    if res["group"] == "memory":
        return ["error" not in r for r in res["operations"]]
    return [r.get("failed_runs", 0) == 0 and "error" not in r for r in res["results"]
            if r["key"].startswith(("ocilayers", "unpack-j1"))]


if __name__ == "__main__":
    sys.exit(main())
