#!/usr/bin/env python3
"""ocilayers benchmark harness.

    python benchmarks/run.py [--quick] [--only unpack] [--runs N] [--cache DIR] [--no-docker]
                             [--profile] [--json PATH] [--keep]

Builds (once, cached) a realistic 5-layer Debian image in gzip and zstd, then times
`ocilayers unpack` against umoci, gzip|tar, zstd|tar and (when a daemon can start) docker load,
alternating the tools run by run, and prints a table of medians. See benchmarks/README.md.
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
from inputs import BenchImage, ensure_image, ocilayers_argv, remove_tree  # noqa: E402
from measure import Sample, git_describe, loadavg, machine_info, run_measured  # noqa: E402

GROUPS = ("unpack",)
DEFAULT_CACHE = "/var/tmp/ocilayers-bench"
SETTLE_NOTE = ("ext4 here (no journal) creates files several times slower for ~60 s after "
               "many deletions")
MIB = 1 << 20
exec_roots: list[str] = []  # throwaway dockerd exec roots, deleted after all timings


@dataclass
class Case:
    """One row of the table. `measure(run_dir, round)` makes one timed run."""

    key: str
    label: str
    compression: str
    ocilayers: bool
    measure: Callable[[str, int], Sample]
    samples: list[Sample] = field(default_factory=list)
    skipped: str = ""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepared(argv_for: Callable[[str], list[str]], mkdirs: Callable[[str], list[str]] | None = None
             ) -> Callable[[str, int], Sample]:
    """A measure function: make the run dir (and `mkdirs`), flush dirty pages, time argv."""
    def measure(run_dir: str, _round: int) -> Sample:
        os.makedirs(run_dir)
        for d in mkdirs(run_dir) if mkdirs else []:
            os.makedirs(d)
        argv = argv_for(run_dir)
        os.sync()  # the previous run's writeback must not land in this run's time
        return run_measured(argv, log_path=run_dir + ".log")
    return measure


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


def unpack_cases(img: BenchImage, use_docker: bool) -> tuple[list[Case], list[str]]:
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


def docker_load(img: BenchImage, rd: str) -> Sample:
    """Start a fresh daemon (not timed), time `docker load`, stop it (not timed). CPU adds the
    daemon's own CPU delta (incl. the unpigz it runs) to the client's; peak RSS is the daemon's
    VmHWM over the load (reset just before)."""
    os.makedirs(rd)
    d = dockerd.Dockerd(os.path.join(rd, "data"))
    exec_roots.append(d.exec_root)
    try:
        d.start(rd + ".dockerd.log")
        os.sync()
        cpu0 = d.cpu_seconds()
        d.reset_peak_rss()
        s = run_measured(d.load_argv(img.docker_archive), log_path=rd + ".log")
        cpu = d.cpu_seconds() - cpu0
        return Sample(s.wall, s.cpu + cpu, max(s.rss_kib, d.peak_rss_kib()), s.ok, s.error,
                      s.sys, max(0.0, s.other - cpu))
    finally:
        d.stop()


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


def profile(img: BenchImage, work: str, cache: str, top: int = 25) -> str:
    """cProfile of `python -m ocilayers unpack --jobs 1` (gzip): the top functions by own time."""
    prof = os.path.join(cache, "unpack-jobs1.prof")
    root = os.path.join(work, "profile", "store")
    os.makedirs(os.path.dirname(root))
    os.sync()
    subprocess.run([sys.executable, "-m", "cProfile", "-o", prof, "-m", "ocilayers", "-q",
                    "--root", root, "unpack", img.gzip_dir, "--jobs", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    buf.write("own time by area (cProfile inflates the Python parts):\n")
    for area, secs, share in profile_areas(st):
        buf.write(f"  {secs:6.2f} s {share:6.1%}  {area}\n")
    table = io.StringIO()
    pstats.Stats(prof, stream=table).strip_dirs().sort_stats("tottime").print_stats(top)
    text = table.getvalue()
    buf.write("\n" + text[text.find("   ncalls"):].rstrip() + "\n")
    return buf.getvalue()


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
     lambda f, n: f in ("streams.py", "sources.py", "store.py", "unpack.py", "api.py")),
]


def profile_areas(st: pstats.Stats) -> list[tuple[str, float, float]]:
    sums: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        f = os.path.basename(path)
        area = next((a for a, match in AREAS if match(f, name)),
                    "other (interpreter start-up, imports, builtins)")
        sums[area] = sums.get(area, 0.0) + tt
    total = sum(sums.values()) or 1.0
    return [(a, t, t / total) for a, t in sorted(sums.items(), key=lambda x: -x[1])]


# --- reporting ---

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
        "peak_rss_mib": round(max(s.rss_kib for s in ok) / 1024, 1),
        "mb_per_s": round(data_bytes / 1e6 / med, 1) if med else None,
    })
    return row


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, object]]:
    by = {r["key"]: r for r in rows if "median_wall_s" in r}
    pairs = [("ocilayers-cold-gzip", k) for k in
             ("umoci-gzip", "gzip-tar-seq", "gzip-tar-par", "docker-load-gzip")]
    pairs += [("ocilayers-cold-zstd", k) for k in ("zstd-tar-seq", "zstd-tar-par")]
    pairs += [("ocilayers-cold-gzip", "ocilayers-cold-gzip-j1")]
    out = []
    for a, b in pairs:
        if a in by and b in by:
            ra, rb = by[a], by[b]
            out.append({"a": ra["tool"], "b": rb["tool"],
                        "wall": round(float(ra["median_wall_s"]) / float(rb["median_wall_s"]), 2),
                        "cpu": round(float(ra["median_cpu_s"]) / max(float(rb["median_cpu_s"]),
                                                                     1e-9), 2)})
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


def print_table(header: list[str], rows: list[dict[str, Any]],
                rats: list[dict[str, object]], notes: list[str]) -> None:
    print()
    for line in header:
        print(line)
    print()
    w = max(len(str(r["tool"])) for r in rows) + 2
    print(f"{'tool':<{w}}{'wall s':>8}{'min-max':>13}{'CPU s':>8}{'(sys)':>7}"
          f"{'peak RSS MiB':>14}{'MB/s':>7}{'other CPU s':>13}{'runs':>6}")
    print("-" * (w + 76))
    for r in rows:
        if "median_wall_s" not in r:
            print(f"{r['tool']:<{w}}  n/a: {str(r.get('error', ''))[:100]}")
            continue
        mm = f"{r['min_wall_s']:.2f}-{r['max_wall_s']:.2f}"
        print(f"{r['tool']:<{w}}{r['median_wall_s']:>8.2f}{mm:>13}{r['median_cpu_s']:>8.2f}"
              f"{r['median_sys_s']:>7.2f}{r['peak_rss_mib']:>14.1f}{r['mb_per_s']:>7.1f}"
              f"{r['median_other_cpu_s']:>13.2f}{r['runs']:>6}")
    if rats:
        print()
        print("ratios of medians (wall; CPU in brackets), below 1 = ocilayers faster:")
        for x in rats:
            print(f"  {x['a']} / {x['b']} = {x['wall']:.2f}x  (CPU {x['cpu']:.2f}x)")
    if notes:
        print()
        for n in notes:
            print(f"note: {n}")


# --- main ---

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="small busybox image, 2 runs, no settling pauses (under a minute)")
    p.add_argument("--only", choices=GROUPS, action="append",
                   help="benchmark group(s) to run (default: all)")
    p.add_argument("--runs", type=int, help="timed runs per tool (default 5; 2 with --quick)")
    p.add_argument("--cache", default=os.environ.get("OCILAYERS_BENCH_CACHE", DEFAULT_CACHE),
                   help="input cache and scratch dir (default $OCILAYERS_BENCH_CACHE or "
                        f"{DEFAULT_CACHE})")
    p.add_argument("--json", help="results file (default benchmarks/results/latest.json; "
                                  "with --quick CACHE/results-quick.json)")
    p.add_argument("--no-docker", action="store_true", help="skip the docker load baseline")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile one `unpack --jobs 1` and print the top functions")
    p.add_argument("--keep", action="store_true", help="keep the unpacked trees")
    p.add_argument("--settle", type=float,
                   help=f"seconds to pause after deletions (default 60; 0 with --quick): "
                        f"{SETTLE_NOTE}")
    p.add_argument("--base", choices=("auto", "debootstrap", "host-copy"), default="auto",
                   help="how layer 1 of the full image is made (default: debootstrap, else a "
                        "copy of host files)")
    args = p.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    settle = args.settle if args.settle is not None else (0.0 if args.quick else 60.0)
    cache = os.path.abspath(args.cache)
    json_path = args.json or (os.path.join(cache, "results-quick.json") if args.quick
                              else os.path.join(HERE, "results", "latest.json"))
    groups = args.only or list(GROUPS)
    if os.geteuid() != 0:
        log("run.py needs root (owners, mounts, umoci and dockerd as root)")
        return 2
    t_start = time.monotonic()
    os.makedirs(cache, exist_ok=True)
    lock = open(os.path.join(cache, ".lock"), "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another run.py is using {cache}; use --cache for a second one")
        return 2

    kind = "quick" if args.quick else "full"
    img, built = ensure_image(kind, cache, REPO, base=args.base)
    work_root = os.path.join(cache, "runs")
    deleted = built
    if os.path.exists(work_root):  # left by an interrupted run
        log(f"removing leftovers in {work_root}")
        remove_tree(work_root)
        deleted = True
    notes = [f"each run unpacks into a fresh dir; nothing is deleted between timed runs; "
             f"the unpacked trees are deleted after all timings ({SETTLE_NOTE})"]
    if deleted and settle:
        log(f"pausing {settle:.0f} s before timing: {SETTLE_NOTE}")
        time.sleep(settle)
        notes.append(f"paused {settle:.0f} s after the input build / clean-up before timing")
    elif deleted:
        notes.append("no settling pause after the input build / clean-up (--quick or "
                     "--settle 0): the first runs may be slower")
    work = os.path.join(work_root, datetime.datetime.now().strftime("%Y%m%dT%H%M%S"))
    os.makedirs(work)

    load_before = loadavg()
    git_before = git_describe(REPO)
    cases: list[Case] = []
    if "unpack" in groups:
        c, n = unpack_cases(img, use_docker=not args.no_docker)
        cases += c
        notes += n
    data_bytes = int(img.meta["uncompressed_bytes"])
    extra: dict[str, object] = {}
    try:
        for rnd in range(runs):
            for case in cases:
                if case.skipped:
                    continue
                rd = os.path.join(work, case.key, f"r{rnd}")
                try:
                    s = case.measure(rd, rnd)
                except Exception as exc:  # a baseline that cannot run is skipped, not fatal
                    if case.ocilayers:
                        raise
                    case.skipped = f"{type(exc).__name__}: {exc}"
                    notes.append(f"{case.label} skipped: {case.skipped}")
                    continue
                case.samples.append(s)
                log(f"round {rnd + 1}/{runs}  {case.label:<45} {s.wall:7.2f} s"
                    + ("" if s.ok else f"  FAILED {s.error[:200]}"))
        load_after = loadavg()
        if git_describe(REPO) != git_before:
            notes.append(f"the ocilayers source changed during the timed runs (it was "
                         f"{git_before} at the start): the rows may mix versions")
        samples = [x for c in cases for x in c.samples]
        busy = sum(x.other for x in samples) / max(sum(x.wall for x in samples), 1e-9)
        if busy > 0.15:
            notes.append(f"the machine was not idle: the rest of it used {busy:.2f} CPUs on "
                         f"average during the timed runs (see the other-CPU column and the "
                         f"min-max spread)")
        if "unpack" in groups:
            extra["rss_split"] = rss_split(img, work)
            if args.profile:
                extra["profile_top"] = profile(img, work, cache)
    finally:
        if args.keep:
            notes.append(f"unpacked trees kept in {work}")
        else:
            log(f"cleaning up {work}")
            remove_tree(work)
        for d in exec_roots:
            remove_tree(d)
        if not args.keep and not os.listdir(work_root):
            os.rmdir(work_root)

    rows = [summarize(c, data_bytes) for c in cases]
    rats = ratios(rows)
    mach = machine_info(cache)
    version = subprocess.run([*ocilayers_argv(), "--version"], capture_output=True,
                             text=True).stdout.strip()
    header = [
        f"ocilayers benchmarks: {', '.join(groups)}   ({version}, git {git_before})",
        f"machine: {mach['nproc']} CPUs, {mach['cpu_model']}, {mach['mem_gib']} GiB RAM, "
        f"Linux {mach['kernel']}, Python {mach['python']}",
        f"cache dir: {mach['cache_dir']} on {mach['cache_fs']}",
        describe_image(img),
        f"{runs} timed runs per tool, tools alternating run by run (ABAB...), median shown; "
        f"inputs warm in the page cache, `sync` before each run (not timed)",
        "CPU = user+sys of the whole process tree; peak RSS = largest single process "
        "(ru_maxrss via wait4); MB/s = uncompressed layer bytes / median wall; other CPU = "
        "what the rest of the machine (other processes, kernel threads) used during the run",
        f"load average: {load_before} before the timed runs, {load_after} after",
    ]
    print_table(header, rows, rats, notes)
    split = extra.get("rss_split")
    if isinstance(split, dict):
        print()
        print("ocilayers peak RSS, parent vs workers (one extra run each, gzip, default --jobs):")
        for what, r in split.items():
            print(f"  {what}: {r}")
    if "profile_top" in extra:
        print()
        print("cProfile, ocilayers unpack --jobs 1 (gzip), top functions by own time:")
        print(extra["profile_top"])
    result = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "ocilayers": {"version": version, "git": git_before},
        "machine": mach, "image": {k: v for k, v in img.meta.items()},
        "runs_per_tool": runs, "results": rows, "ratios": rats, "notes": notes,
        "rss_split": extra.get("rss_split"), "load_average": [load_before, load_after],
        "harness_seconds": round(time.monotonic() - t_start, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print()
    print(f"results written to {json_path} ({time.monotonic() - t_start:.0f} s in all)")
    failed = any(not s.ok for c in cases if c.ocilayers for s in c.samples)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
