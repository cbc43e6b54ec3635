"""The part of a cold gzip unpack that no implementation can skip, alone: each layer blob read
in 1 MiB chunks, its sha256 (the blob digest), ISA-L inflate, the sha256 of the output (the
DiffID), the output thrown away. No tar parsing, no files. One layer after the other.

    python benchmarks/floor_inflate.py BLOB...

The harness times it (CPU) as the first half of the unpack floor; `tar -x` of the decompressed
layers is the other half (the kernel's file creates and writes)."""

from __future__ import annotations

import hashlib
import sys

from isal import isal_zlib

CHUNK = 1 << 20


def inflate_and_hash(path: str) -> tuple[str, str, int]:
    blob_hash, diff_hash = hashlib.sha256(), hashlib.sha256()
    out = 0
    d = isal_zlib.decompressobj(31)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            blob_hash.update(chunk)
            while chunk:
                data = d.decompress(chunk, CHUNK)
                diff_hash.update(data)
                out += len(data)
                if d.eof:  # the rest is another gzip member
                    chunk = d.unused_data
                    if chunk:
                        d = isal_zlib.decompressobj(31)
                else:
                    chunk = d.unconsumed_tail
    if not d.eof:
        raise SystemExit(f"{path}: truncated gzip stream")
    return blob_hash.hexdigest(), diff_hash.hexdigest(), out


def main(paths: list[str]) -> int:
    for p in paths:
        inflate_and_hash(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
