"""Input of the `growth` group (`ocilayers history` and `ocilayers squash`), built once and
cached: the benchmark image unpacked into a store of its own (tagged), and the image's merged
rootfs written by `ocilayers flatten` into a plain dir (what `ocilayers pack` reads for the
squash baseline). Rebuilt when the image it was made from is rebuilt."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

from inputs import BenchImage, ensure_derived, layer_blobs, log, ocilayers_argv
from pack_inputs import upper_stats

from ocilayers import scancache

GROWTH_RECIPE = "v1"  # bump when what the input holds changes
TAG = "ocilayers-bench:latest"


@dataclass(frozen=True)
class GrowthInput:
    """`<dir>/store` (the image unpacked, tagged TAG), `<dir>/flat` (its merged rootfs)."""

    dir: str
    meta: dict[str, Any]
    image: BenchImage

    @property
    def store(self) -> str:
        return os.path.join(self.dir, "store")

    @property
    def flat(self) -> str:
        return os.path.join(self.dir, "flat")


def ensure_growth_input(kind: str, cache: str, img: BenchImage) -> tuple[GrowthInput, bool]:
    """The cached growth input for image `img` (built first if missing or made from another
    build of the image). The flag says whether a build ran."""
    final, meta, built = ensure_derived(f"growth-{kind}-{GROWTH_RECIPE}", cache, img,
                                        lambda scratch: _build(kind, scratch, img))
    return GrowthInput(final, meta, img), built


def _build(kind: str, scratch: str, img: BenchImage) -> dict[str, Any]:
    oci = ocilayers_argv()
    store = os.path.join(scratch, "store")
    log(f"growth input: unpack the {kind} image into a store of its own, tagged {TAG}")
    out = subprocess.run([*oci, "-q", "--root", store, "unpack", img.gzip_dir, "--tag", TAG,
                          "--json"], check=True, capture_output=True, text=True).stdout
    layers = len(json.loads(out)["layers"])
    log("growth input: flatten it into a plain dir (ocilayers flatten)")
    flat = os.path.join(scratch, "flat")
    subprocess.run([*oci, "-q", "--root", store, "flatten", TAG, flat], check=True,
                   stdout=subprocess.DEVNULL)
    return {"kind": kind, "recipe": GROWTH_RECIPE, "tag": TAG, "layers": layers,
            "flat": upper_stats(flat)}


SCAN_CACHE = scancache.NAME  # history's copy of a layer's tar-split entries, written after
# the first read of the records


def scan_caches(store: str) -> list[str]:
    d = os.path.join(store, "image", "overlay2", "layerdb", "sha256")
    return [p for p in (os.path.join(d, n, SCAN_CACHE) for n in sorted(os.listdir(d)))
            if os.path.exists(p)]


def set_scan_caches(store: str, present: bool) -> None:
    """Before a timed `history` from the store (not timed): every layer's scan cache made (one
    `history` run), or every one deleted (the first read after an unpack)."""
    if present:
        subprocess.run([*ocilayers_argv(), "-q", "--root", store, "history", TAG, "--json"],
                       check=True, stdout=subprocess.DEVNULL)
        if not scan_caches(store):
            raise RuntimeError(f"history wrote no {SCAN_CACHE} in {store}")
    else:
        for p in scan_caches(store):
            os.unlink(p)


def tar_list_script(img: BenchImage) -> list[str]:
    """`gzip -dc blob | tar -tf - > /dev/null` for every layer blob of the gzip image, one
    after the other (the baseline of `history SOURCE`: read every layer's tar headers)."""
    lines = ["set -eu -o pipefail"]
    lines += [f"gzip -dc {shlex.quote(b)} | tar -tf - > /dev/null" for b in img.blobs("gzip")]
    return ["bash", "-c", "\n".join(lines)]


def squashed_layer_size(layout: str) -> int:
    """Size of the one layer blob of the image `squash -o LAYOUT --format oci` wrote."""
    blobs = layer_blobs(layout)
    if len(blobs) != 1:
        raise RuntimeError(f"{layout}: {len(blobs)} layers, not 1")
    return os.path.getsize(blobs[0])


def history_json(log_path: str) -> dict[str, Any]:
    """The JSON `history --json` printed into a run's log (stdout and stderr; -q: no
    progress)."""
    with open(log_path) as f:
        return json.loads(f.read())


def compare_histories(store_log: str, source_log: str) -> str:
    """Whether the history from the store and from the source say the same (every figure
    but the compressed sizes, which a store does not keep)."""
    try:
        a, b = history_json(store_log), history_json(source_log)
    except (OSError, ValueError) as exc:
        return f"PROBLEM: could not read the history JSON: {type(exc).__name__}: {exc}"

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d["layers"] = [{k: v for k, v in x.items() if k != "compressed_size"}
                       for x in d["layers"]]
        return d

    if strip(a) != strip(b):
        diff = [k for k in sorted(set(a) | set(b)) if strip(a).get(k) != strip(b).get(k)]
        return f"PROBLEM: history from the store and from the source differ in {diff}"
    t = a.get("totals") or {}
    figs = ""
    if {"efficiency", "wasted_bytes", "stored_bytes"} <= set(t):
        figs = (f": efficiency {float(t['efficiency']):.3f}, wasted {int(t['wasted_bytes'])}"
                f" of {int(t['stored_bytes'])} stored bytes")
    return (f"history from the store and from the gzip layout agree (round 1; every figure "
            f"but compressed_size){figs}")
