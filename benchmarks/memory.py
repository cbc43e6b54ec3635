"""The `memory` group: peak RSS of every ocilayers process unpacking and packing ~2 GiB layers.

Inputs (built once, cached under `CACHE/memory-v1/`): two single-layer OCI images, one layer of
compressible data (pseudo-text, gzip ~2.7:1) and one of random data, each one 1.875 GiB file plus
16k small files in 128 dirs (~2 GiB in all), and a two-layer image of both (so that two worker
processes run). The layer tars are generated as a stream (headers written here, file data made in
1 MiB chunks) into `gzip -6`; nothing is held in memory or written uncompressed.

Each operation runs once under `ocilayers_rusage.py` (the CLI in-process): the parent's peak RSS
is RUSAGE_SELF, the largest worker's RUSAGE_CHILDREN. A one-layer unpack and `pack` run in the
parent alone (no workers); the two-layer unpack forks one worker per layer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from inputs import build_published, layout_blobs, log, remove_tree
from measure import run_measured

MEM_RECIPE = "v1"
MIB = 1 << 20
BIG_FILE = 1920 * MIB
SMALL_FILES = 16384
SMALL_DIRS = 128
LIMIT_BYTES = 150_000_000  # the goal: under 150 MB for any layer size
HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("compressible", "random")


@dataclass(frozen=True)
class MemoryInputs:
    dir: str
    meta: dict[str, Any]

    def layout(self, name: str) -> str:
        """`compressible`, `random` or `both`."""
        return os.path.join(self.dir, name)


class _Sink:
    """Hashes what goes into the tar stream (the DiffID) and passes it on to gzip."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes | memoryview) -> None:
        self.sha.update(data)
        self.out.write(data)
        self.count += len(data)


def _chunks(kind: str, rng: random.Random, corpus: bytes, size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        n = min(MIB, left)
        if kind == "random":
            yield rng.randbytes(n)
        else:
            off = rng.randrange(0, len(corpus) - n)
            yield corpus[off:off + n]
        left -= n


def _corpus(rng: random.Random) -> bytes:
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
             for _ in range(2000)]
    lines, n = [], 0
    while n < 8 * MIB:
        line = " ".join(rng.choices(words, k=rng.randint(3, 14)))
        lines.append(line)
        n += len(line) + 1
    return "\n".join(lines).encode()


def _header(name: str, size: int, mode: int, dir_: bool = False) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = 0 if dir_ else size
    ti.mode = mode
    ti.type = tarfile.DIRTYPE if dir_ else tarfile.REGTYPE
    ti.mtime = 1_700_000_000
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _write_tar(kind: str, sink: _Sink, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    corpus = _corpus(rng)
    files = 0
    sink.write(_header("data/", 0, 0o755, dir_=True))
    sink.write(_header("data/big.bin", BIG_FILE, 0o644))
    for chunk in _chunks(kind, rng, corpus, BIG_FILE):
        sink.write(chunk)
    files += 1
    per_dir = SMALL_FILES // SMALL_DIRS
    for d in range(SMALL_DIRS):
        sink.write(_header(f"data/d{d:03d}/", 0, 0o755, dir_=True))
        for i in range(per_dir):
            size = min(int(rng.lognormvariate(8.6, 0.9)), 128 * 1024)
            sink.write(_header(f"data/d{d:03d}/f{i:04d}.dat", size, 0o644))
            for chunk in _chunks(kind, rng, corpus, size):
                sink.write(chunk)
            if size % 512:
                sink.write(b"\0" * (512 - size % 512))
            files += 1
    sink.write(b"\0" * 1024)
    return {"files": files, "dirs": SMALL_DIRS + 1}


def _make_blob(kind: str, out_dir: str, seed: int) -> dict[str, Any]:
    tmp = os.path.join(out_dir, f"{kind}.tar.gz")
    with open(tmp, "wb") as f, subprocess.Popen(["gzip", "-6", "-n"], stdin=subprocess.PIPE,
                                                 stdout=f) as gz:
        assert gz.stdin is not None
        sink = _Sink(gz.stdin)
        counts = _write_tar(kind, sink, seed)
        gz.stdin.close()
    if gz.returncode:
        raise RuntimeError(f"gzip exited {gz.returncode}")
    h = hashlib.sha256()
    with open(tmp, "rb") as fr:
        while chunk := fr.read(4 * MIB):
            h.update(chunk)
    return {"kind": kind, "path": tmp, "digest": f"sha256:{h.hexdigest()}",
            "size": os.path.getsize(tmp), "diff_id": f"sha256:{sink.sha.hexdigest()}",
            "uncompressed_bytes": sink.count, **counts}


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _write_layout(out: str, layers: list[dict[str, Any]], name: str) -> None:
    blobs, put = layout_blobs(out)

    for layer in layers:
        os.link(layer["path"], os.path.join(blobs, layer["digest"].split(":", 1)[1]))
    config = {"architecture": _arch(), "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [x["diff_id"] for x in layers]},
              "history": [{"created_by": f"generated {x['kind']} layer (ocilayers benchmarks)"}
                          for x in layers]}
    cdig, csize = put(json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdig, "size": csize},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": x["digest"], "size": x["size"]} for x in layers]}
    mdig, msize = put(json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig,
         "size": msize, "annotations": {"org.opencontainers.image.ref.name": name}}]}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def ensure_memory_inputs(cache: str) -> tuple[MemoryInputs, bool]:
    final = os.path.join(cache, f"memory-{MEM_RECIPE}")
    meta_path = os.path.join(final, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return MemoryInputs(final, json.load(f)), False

    def build(scratch: str) -> dict[str, Any]:
        blobs = []
        for seed, kind in enumerate(KINDS, start=1):
            log(f"memory input: a ~2 GiB layer of {kind} data, streamed into gzip -6 "
                "(a minute or two)")
            blobs.append(_make_blob(kind, scratch, seed))
        for b in blobs:
            _write_layout(os.path.join(scratch, b["kind"]), [b], b["kind"])
        _write_layout(os.path.join(scratch, "both"), blobs, "both")
        for b in blobs:
            os.unlink(b["path"])  # the layouts hold hardlinks
            b["path"] = os.path.basename(b["path"])
        return {"recipe": MEM_RECIPE, "layers": blobs, "big_file_bytes": BIG_FILE,
                "small_files": SMALL_FILES}

    return MemoryInputs(final, build_published(cache, final, "memory", build)), True


def run_memory(inp: MemoryInputs, work: str,
               progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each operation once, under the rusage wrapper. Outputs are deleted as soon as they are
    measured (this group is about memory; its wall times are for information)."""
    base = os.path.join(work, "memory")
    os.makedirs(base)
    rows: list[dict[str, Any]] = []
    by_kind = {x["kind"]: x for x in inp.meta["layers"]}

    def op(label: str, args: list[str], data_bytes: int) -> None:
        n = len(rows)
        out = os.path.join(base, f"op{n}.json")
        os.sync()
        s = run_measured([sys.executable, os.path.join(HERE, "ocilayers_rusage.py"), out, "--",
                          *args], log_path=os.path.join(base, f"op{n}.log"))
        row: dict[str, Any] = {"operation": label, "args": args, "data_bytes": data_bytes}
        if not s.ok:
            row["error"] = s.error
        else:
            with open(out) as f:
                r = json.load(f)
            parent = r["parent_maxrss_kib"] * 1024
            # RUSAGE_CHILDREN: the largest reaped child (worker); 0 when none was forked.
            wk = r["workers_maxrss_kib"] * 1024 or None
            worst = max(parent, wk or 0)
            row.update({
                "wall_s": round(s.wall, 2), "cpu_s": round(s.cpu, 2),
                "mb_per_s": round(data_bytes / 1e6 / s.wall, 1),
                "parent_peak_rss_mib": round(parent / MIB, 1),
                "workers_peak_rss_mib": round(wk / MIB, 1) if wk is not None else None,
                "tree_max_rss_mib": round(s.rss_kib / 1024, 1),
                "other_cpu_s": round(s.other, 2),
                "pass": worst < LIMIT_BYTES,
            })
        rows.append(row)
        progress(f"memory: {label:<52} {row.get('wall_s', 0):7.2f} s  "
                 + (f"parent {row['parent_peak_rss_mib']} MiB"
                    + (f", workers {row['workers_peak_rss_mib']} MiB"
                       if row.get("workers_peak_rss_mib") is not None else "")
                    if "error" not in row else f"FAILED {row['error'][:200]}"))

    for kind in KINDS:
        meta = by_kind[kind]
        root = os.path.join(base, f"{kind}-store")
        op(f"unpack, 1 layer of {kind} data (gzip)",
           ["-q", "--root", root, "unpack", inp.layout(kind)], meta["uncompressed_bytes"])
        diffs = glob.glob(os.path.join(root, "overlay2", "*", "diff"))
        if len(diffs) == 1:
            for comp in ("gzip", "zstd"):
                out = os.path.join(base, f"{kind}.{comp}")
                op(f"pack, that layer's diff dir ({kind}, --compression {comp})",
                   ["-q", "pack", diffs[0], "-o", out, "--compression", comp],
                   meta["uncompressed_bytes"])
                if os.path.exists(out):
                    rows[-1]["output_bytes"] = os.path.getsize(out)
                    os.unlink(out)
        remove_tree(root)
    root = os.path.join(base, "both-store")
    op("unpack, 2 layers (compressible + random), default --jobs",
       ["-q", "--root", root, "unpack", inp.layout("both")],
       sum(x["uncompressed_bytes"] for x in inp.meta["layers"]))
    remove_tree(root)
    return rows
