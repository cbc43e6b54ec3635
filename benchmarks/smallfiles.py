"""The `smallfiles` group: one layer of 100,000 small files, where the cost of an unpack is per
entry (a tar header, a file create, its metadata), not per byte.

Input (built once with Python, no network, cached under `CACHE/smallfiles-v1/`): one
uncompressed layer tar, `pkg/` and 1,000 dirs `pkg/dNNNN/` of 100 files `fNNN.js` each; every
file is 600 bytes of lowercase hex (`Random(1).randbytes(300).hex()`, one call per file, in
order), every entry has mtime 1700000000, mode 0644 (files) or 0755 (dirs), owner 0:0, written
by `tarfile` in PAX format (~154 MB) and ended right after its two zero blocks, as Docker's
layers are. That tar compressed by `gzip -6 -n` and by `zstd -3`, each the one layer of a
single-image OCI layout (`oci-gzip/`, `oci-zstd/`, tagged `latest`). The plain tar is not kept:
every row reads a compressed blob.

Rows: `ocilayers unpack` cold into a new store (gzip: default file writers, i.e. processes;
`OCILAYERS_FILE_WRITERS=threads`; `=off`, the single-process path; and zstd with the default),
`gzip -dc | tar -x`, `zstd -dc | tar -x` and `umoci raw unpack`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inputs import build_published, layout_blobs, log, ocilayers_argv

SMALL_RECIPE = "v1"  # bump when what the input holds changes (the cache dir name carries it)
DIRS = 1000
FILES_PER_DIR = 100
RANDOM_BYTES = 300  # per file, written as hex: 600 bytes
SEED = 1
MTIME = 1_700_000_000
TAG = "latest"
WRITERS_ENV = "OCILAYERS_FILE_WRITERS"
RSS_GOAL_BYTES = 150_000_000  # the goal: every ocilayers process under 150 MB
MIB = 1 << 20
MEDIA_TYPES = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
COMPRESS = {"gzip": ["gzip", "-6", "-n", "-c"], "zstd": ["zstd", "-3", "-q", "-c"]}


@dataclass(frozen=True)
class SmallFilesInput:
    """`<dir>/oci-gzip`, `<dir>/oci-zstd` (one image each, tagged TAG), `<dir>/meta.json`."""

    dir: str
    meta: dict[str, Any]

    def layout(self, compression: str) -> str:
        return os.path.join(self.dir, f"oci-{compression}")

    def blob(self, compression: str) -> str:
        return os.path.join(self.layout(compression), "blobs", "sha256",
                            str(self.meta["blobs"][compression]["digest"]).split(":", 1)[1])

    @property
    def files(self) -> int:
        return int(self.meta["files"])


# --- the input ---

def input_name(dirs: int = DIRS, files_per_dir: int = FILES_PER_DIR) -> str:
    """The cache dir's name: `smallfiles-v1`, or `smallfiles-v1-DxF` for another size."""
    name = f"smallfiles-{SMALL_RECIPE}"
    if (dirs, files_per_dir) != (DIRS, FILES_PER_DIR):
        name += f"-{dirs}x{files_per_dir}"
    return name


def ensure_input(cache: str, dirs: int = DIRS, files_per_dir: int = FILES_PER_DIR
                 ) -> tuple[SmallFilesInput, bool]:
    """The cached input, built first if missing (in a scratch dir next to it, renamed into
    place when complete). The flag says whether a build ran."""
    final = os.path.join(cache, input_name(dirs, files_per_dir))
    meta_path = os.path.join(final, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return SmallFilesInput(final, json.load(f)), False
    os.makedirs(cache, exist_ok=True)
    meta = build_published(cache, final, "smallfiles",
                           lambda scratch: build(scratch, dirs, files_per_dir))
    return SmallFilesInput(final, meta), True


def build(out: str, dirs: int = DIRS, files_per_dir: int = FILES_PER_DIR) -> dict[str, Any]:
    """Write the tar, its two compressed blobs and the two OCI layouts into the dir `out`;
    the plain tar is deleted at the end. Returns the meta (no timing in it: deterministic)."""
    tar = os.path.join(out, "layer.tar")
    n = dirs * files_per_dir
    log(f"smallfiles input: a layer tar of {n} files of {2 * RANDOM_BYTES} bytes "
        f"({dirs} dirs)")
    counts = write_tar(tar, dirs, files_per_dir)
    diff_id = sha256_file(tar)
    blobs: dict[str, dict[str, Any]] = {}
    for comp, argv in COMPRESS.items():
        log(f"smallfiles input: {' '.join(argv[:-1])} of the tar, an OCI layout around it")
        blob = os.path.join(out, f"layer.tar.{comp}")
        with open(blob, "wb") as f:
            subprocess.run([*argv, tar], stdout=f, check=True)
        digest = sha256_file(blob)
        size = os.path.getsize(blob)
        write_layout(os.path.join(out, f"oci-{comp}"), blob, digest, size, MEDIA_TYPES[comp],
                     diff_id)
        blobs[comp] = {"digest": digest, "size": size, "media_type": MEDIA_TYPES[comp],
                       "layout": f"oci-{comp}"}
    tar_bytes = os.path.getsize(tar)
    os.unlink(tar)  # no row reads it: the baselines decompress the blobs
    return {"recipe": SMALL_RECIPE, "tag": TAG, "dirs": dirs, "files_per_dir": files_per_dir,
            **counts, "tar_bytes": tar_bytes, "diff_id": diff_id, "blobs": blobs,
            "tools": {c: _version(argv[0]) for c, argv in COMPRESS.items()}}


def write_tar(path: str, dirs: int = DIRS, files_per_dir: int = FILES_PER_DIR) -> dict[str, int]:
    """The layer tar: `pkg/`, then per dir its entry and its files. Returns counts."""
    rng = random.Random(SEED)
    file_bytes = 0

    def entry(name: str, is_dir: bool, size: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        ti.mode = 0o755 if is_dir else 0o644
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = MTIME
        ti.size = size
        return ti

    with open(path, "wb") as raw:
        tf = tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        tf.addfile(entry("pkg/", True))
        for d in range(dirs):
            tf.addfile(entry(f"pkg/d{d:04d}/", True))
            for i in range(files_per_dir):
                data = rng.randbytes(RANDOM_BYTES).hex().encode()
                tf.addfile(entry(f"pkg/d{d:04d}/f{i:03d}.js", False, len(data)),
                           io.BytesIO(data))
                file_bytes += len(data)
        tf.close()
    # tarfile pads to a 10240-byte record; Docker's layers end right after two zero blocks.
    os.truncate(path, tf.offset)
    return {"files": dirs * files_per_dir, "dir_entries": dirs + 1,
            "entries": dirs * (files_per_dir + 1) + 1, "file_bytes": file_bytes}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_layout(out: str, blob: str, digest: str, size: int, media_type: str,
                 diff_id: str) -> None:
    """An OCI layout at `out` holding one single-layer image tagged TAG; the file `blob` is
    moved into it. Deterministic: the same layer gives the same bytes."""
    blobs, put = layout_blobs(out)

    os.rename(blob, os.path.join(blobs, digest.split(":", 1)[1]))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MTIME))
    config = {"architecture": "amd64", "os": "linux", "created": created, "config": {},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]},
              "history": [{"created": created,
                           "created_by": "generated: small files (ocilayers benchmarks)"}]}
    cdig, csize = put(_json(config))
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdig, "size": csize},
                "layers": [{"mediaType": media_type, "digest": digest, "size": size}]}
    mdig, msize = put(_json(manifest))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": mdig, "size": msize,
                            "annotations": {"org.opencontainers.image.ref.name": TAG}}]}
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(_json(index))
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(_json({"imageLayoutVersion": "1.0.0"}))


def _version(tool: str) -> str:
    try:
        p = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0] if text else "?"


# --- the rows ---

@dataclass(frozen=True)
class Row:
    """One row, for run.py to time: `argv(run_dir)` is the command, `mkdirs(run_dir)` the dirs
    made before it (not timed), `env` its environment (None: the harness's)."""

    key: str
    label: str
    compression: str
    ocilayers: bool
    short: str
    argv: Callable[[str], list[str]]
    mkdirs: Callable[[str], list[str]] | None = None
    env: dict[str, str] | None = None


def writers_env(value: str | None) -> dict[str, str]:
    """A copy of this environment with OCILAYERS_FILE_WRITERS set to `value` (None: unset, so
    that the default row is ocilayers' default whatever the caller's environment says)."""
    env = dict(os.environ)
    env.pop(WRITERS_ENV, None)
    if value is not None:
        env[WRITERS_ENV] = value
    return env


# pipeline(blobs, dirs, decompress, parallel) -> argv: run.py's tar_script
Pipeline = Callable[[list[str], list[str], str, bool], list[str]]


def rows(inp: SmallFilesInput, pipeline: Pipeline) -> tuple[list[Row], list[str]]:
    notes: list[str] = []
    oci = ocilayers_argv()

    def unpack(comp: str) -> Callable[[str], list[str]]:
        return lambda rd: [*oci, "-q", "--root", os.path.join(rd, "store"), "unpack",
                           inp.layout(comp)]

    def rootfs(rd: str) -> list[str]:
        return [os.path.join(rd, "rootfs")]

    def tar_x(blob: str, decompress: str) -> Callable[[str], list[str]]:
        return lambda rd: pipeline([blob], rootfs(rd), decompress, False)

    out = [
        Row("ocilayers-cold-gzip", "ocilayers unpack, cold (gzip), default: writer processes",
            "gzip", True, "ocilayers unpack (gzip)", unpack("gzip"), env=writers_env(None)),
        Row("ocilayers-cold-gzip-threads",
            f"ocilayers unpack, cold (gzip), {WRITERS_ENV}=threads", "gzip", True,
            "ocilayers unpack (gzip, writer threads)", unpack("gzip"),
            env=writers_env("threads")),
        Row("ocilayers-cold-gzip-off", f"ocilayers unpack, cold (gzip), {WRITERS_ENV}=off",
            "gzip", True, "ocilayers unpack (gzip, no file writers)", unpack("gzip"),
            env=writers_env("off")),
        Row("ocilayers-cold-zstd", "ocilayers unpack, cold (zstd), default: writer processes",
            "zstd", True, "ocilayers unpack (zstd)", unpack("zstd"), env=writers_env(None)),
    ]
    for comp, tool in (("gzip", "gzip -dc"), ("zstd", "zstd -dc -q")):
        name = tool.split()[0]
        if not shutil.which(name):
            notes.append(f"{name} not found: its row is skipped")
            continue
        out.append(Row(f"{comp}-tar", f"{name} -dc | tar -x", comp, False, f"{name} -dc | tar -x",
                       tar_x(inp.blob(comp), tool), mkdirs=rootfs))
    if shutil.which("umoci"):
        out.append(Row("umoci-gzip", "umoci raw unpack (gzip)", "gzip", False, "umoci raw unpack",
                       lambda rd: ["umoci", "raw", "unpack", "--image",
                                   f"{inp.layout('gzip')}:{TAG}", *rootfs(rd)]))
    else:
        notes.append("umoci not found: its row is skipped")
    return out, notes


RATIOS: list[tuple[str, str, float | None]] = [
    ("ocilayers-cold-gzip", "gzip-tar", 1.0),
    ("ocilayers-cold-zstd", "zstd-tar", 1.0),
    ("ocilayers-cold-gzip", "umoci-gzip", None),
    ("ocilayers-cold-gzip-threads", "ocilayers-cold-gzip", None),
    ("ocilayers-cold-gzip-off", "ocilayers-cold-gzip", None),
]

NOTES = [
    "one layer: `gzip -dc | tar -x` is both the sequential and the parallel baseline of the "
    "unpack group (one pipeline, two processes); umoci unpacks the same gzip layout",
    f"the ocilayers rows differ only in {WRITERS_ENV}: unset (the default: one writer process "
    "per core, forked before any thread), `threads` (writer threads in the unpacking "
    "process) and `off` (the unpacking process makes every file itself); the last two ratios "
    "are those rows over the default row (below 1 = faster than the default)",
    "MB/s = the layer tar's bytes / median wall; files/s below the table = the layer's files "
    "/ median wall",
    "ocilayers verifies the blob digest and the DiffID and writes a tar-split file and the "
    "store's metadata; tar verifies nothing; umoci verifies the blob digest",
]


def describe(inp: SmallFilesInput) -> str:
    m = inp.meta
    b = m["blobs"]
    return (f"input: one layer, {m['files']:,} files of {m['file_bytes'] // m['files']} bytes "
            f"in {m['dirs']:,} dirs ({m['entries']:,} entries), tar {m['tar_bytes'] / 1e6:.0f} "
            f"MB, gzip -6 {b['gzip']['size'] / 1e6:.1f} MB, zstd -3 "
            f"{b['zstd']['size'] / 1e6:.1f} MB")


def per_row(rows_: list[dict[str, Any]], files: int) -> dict[str, Any]:
    """Files per second for every row, and the peak RSS goal for the ocilayers rows: the
    largest single process of each run under 150 MB."""
    goal_mib = RSS_GOAL_BYTES / MIB
    out: list[dict[str, Any]] = []
    lines = [f"files/s (median) and peak RSS of the largest single process (ocilayers goal "
             f"< 150 MB = {goal_mib:.1f} MiB):"]
    w = max((len(str(r["tool"])) for r in rows_), default=0) + 2
    for r in rows_:
        if "median_wall_s" not in r:
            continue
        fps = files / float(r["median_wall_s"]) if r["median_wall_s"] else 0.0
        x: dict[str, Any] = {"key": r["key"], "tool": r["tool"], "files_per_s": round(fps),
                             "peak_rss_mib": r["peak_rss_mib"]}
        line = f"  {r['tool']:<{w}}{fps / 1000:7.1f}k files/s  {r['peak_rss_mib']:7.1f} MiB"
        if str(r["key"]).startswith("ocilayers"):
            x["rss_goal_met"] = float(r["peak_rss_mib"]) < goal_mib
            line += f"   {'met' if x['rss_goal_met'] else 'MISSED'}"
        out.append(x)
        lines.append(line)
    return {"rss_goal_below_mib": round(goal_mib, 1), "rows": out, "text": "\n".join(lines)}
