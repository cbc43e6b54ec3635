"""Run the ocilayers CLI in this process, optionally with the tar-split writer and the layerdb
`size` walk replaced by no-ops, to estimate their share of `unpack` time without a profiler:
    python benchmarks/ocilayers_ablate.py normal|ablated OUT.json -- [ocilayers arguments...]
`normal` runs the CLI unchanged through the same wrapper (same start-up). `ablated` replaces
TarSplitWriter and diff_size in ocilayers.tarsplit / ocilayers.store.layers (where the layer
ingest imports them); forked workers inherit that, but use `unpack --jobs 1` to match the profile.
The store it writes has no tar-split records and size 0: throw it away.
OUT.json says how often the stand-ins were called (0 would mean the patch missed)."""

from __future__ import annotations

import json
import sys
from typing import Any

import ocilayers.store.layers
import ocilayers.tarsplit

mode, out, sep, *args = sys.argv[1:]
assert sep == "--" and mode in ("normal", "ablated"), __doc__
calls = {"tarsplit_writers": 0, "diff_size": 0}
patched: list[str] = []


def _ignore(*_a: Any, **_k: Any) -> None:
    return None


class NoTarSplit:
    """Takes every hook TarSplitWriter takes and writes nothing."""

    def __init__(self, _out: Any) -> None:
        calls["tarsplit_writers"] += 1

    def on_entry(self, _entry: Any) -> Any:
        return _ignore

    def __getattr__(self, _name: str) -> Any:  # on_raw, end_of_archive, trailing, close, ...
        return _ignore


def no_size(_diff_dir: str) -> int:
    calls["diff_size"] += 1
    return 0


if mode == "ablated":
    for module, name, stand_in in ((ocilayers.tarsplit, "TarSplitWriter", NoTarSplit),
                                   (ocilayers.store.layers, "diff_size", no_size)):
        if hasattr(module, name):
            setattr(module, name, stand_in)
            patched.append(f"{module.__name__}.{name}")

from ocilayers.cli import main  # noqa: E402

rc = main(args)
with open(out, "w") as f:
    json.dump({"exit": rc, "mode": mode, "patched": patched, "calls": calls}, f)
sys.exit(rc)
