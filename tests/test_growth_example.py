"""Why images only grow: the README's worked example, run for real.

A small base (`fixtures/demo`, busybox, about 2 MB) is unpacked. Container 1 adds a
50,000,000-byte file of random bytes (so no compression hides it), committed as `img:1`.
Container 2, made from `img:1`, deletes the file, committed as `img:2`. The delete is a
whiteout in a new layer: it hides the file from the merged view, but the layer below still
holds it, so `img:2` is no smaller than `img:1`, and its exported archive still carries the
50 MB layer.

Needs root (the containers are overlay mounts); skips otherwise. Run with `-s` to see the CLI
output the README quotes.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

from conftest import FIXTURES, run_module

BIG = 50_000_000


def oci(root: Path, *argv: str) -> str:
    proc = run_module(["--root", str(root), *argv])
    if proc.returncode != 0:
        raise AssertionError(f"ocilayers {' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc.stdout


def oci_json(root: Path, *argv: str) -> Any:
    return json.loads(oci(root, *argv, "--json"))


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)


def test_deleting_a_file_does_not_shrink_the_image(mounts: list[Path], tmp_path: Path
                                                   ) -> None:
    root = tmp_path / "store"
    shown: list[str] = []

    def show(*argv: str) -> str:
        out = oci(root, *argv)
        shown.append(f"$ ocilayers {' '.join(argv)}\n{out}")
        return out

    show("-q", "unpack", str(FIXTURES / "demo"), "--tag", "base:1")

    oci(root, "create", "base:1", "--name", "c1")
    m1 = Path(oci(root, "mount", "c1").strip())
    try:
        write_random(m1 / "big.bin", BIG)
    finally:
        oci(root, "umount", "c1")
    show("commit", "c1", "img:1", "--created-by", "add /big.bin (50 MB)")

    oci(root, "create", "img:1", "--name", "c2")
    m2 = Path(oci(root, "mount", "c2").strip())
    try:
        assert (m2 / "big.bin").stat().st_size == BIG
        (m2 / "big.bin").unlink()
    finally:
        oci(root, "umount", "c2")
    show("commit", "c2", "img:2", "--created-by", "rm /big.bin")

    show("images")
    show("inspect", "img:2")
    print("\n" + "\n".join(shown))  # for the README (pytest -s)

    sizes = {tag: row["size"] for row in oci_json(root, "images") for tag in row["tags"]}
    assert set(sizes) == {"base:1", "img:1", "img:2"}
    assert sizes["img:1"] >= sizes["base:1"] + BIG
    assert sizes["img:2"] >= sizes["img:1"]

    layers = {tag: oci_json(root, "inspect", tag)["layers"] for tag in sizes}
    assert len(layers["img:1"]) == len(layers["base:1"]) + 1
    assert len(layers["img:2"]) == len(layers["img:1"]) + 1
    assert layers["img:2"][:-1] == layers["img:1"], "img:2 is img:1 plus one layer"
    assert layers["img:1"][-1]["diff_size"] == BIG  # the file, and nothing else
    assert layers["img:2"][-1]["diff_size"] == 0  # a whiteout adds nothing ...
    assert sizes["img:2"] == sizes["img:1"]  # ... and takes nothing away

    # the file is gone from img:2's view, but its export still carries the 50 MB layer
    view = tmp_path / "view"
    view.mkdir()
    oci(root, "mount", "img:2", str(view))
    mounts.append(view)
    try:
        assert not (view / "big.bin").exists()
    finally:
        oci(root, "umount", str(view))
    out = tmp_path / "img2.tar"
    oci(root, "-q", "export", "img:2", "-o", str(out), "--format", "docker-archive")
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        blob_sizes = [t.getmember(name).size for name in manifest[0]["Layers"]]
    print(f"img:2 export: {len(blob_sizes)} layer blobs {blob_sizes}, {sum(blob_sizes):,} "
          f"bytes; the archive is {out.stat().st_size:,} bytes")
    assert sum(blob_sizes) >= BIG
    assert max(blob_sizes) >= BIG  # random bytes: gzip cannot shrink them
