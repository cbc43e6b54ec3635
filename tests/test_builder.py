"""builder.py (with cas.py and writer.py): the one image builder. Kept layers keep the image
byte for byte; new layers and history go on top; existing blobs are copied as they are; a
layer that does not hash to its DiffID is refused and leaves nothing behind."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
from conftest import FIXTURES, requires_tool, skopeo

from ocilayers.builder import BlobInput, ImageBuilder, LayerInput
from ocilayers.cas import LayoutWriter
from ocilayers.errors import DigestMismatchError
from ocilayers.export import source_layers
from ocilayers.sources import open_source
from ocilayers.spec import MEDIA_TYPE_OCI_LAYER_GZIP, Descriptor, Digest, HistoryEntry
from ocilayers.writer import open_destination

TINY = str(FIXTURES / "tiny")


def opener(data: bytes) -> Callable[[], contextlib.AbstractContextManager[io.BytesIO]]:
    return lambda: contextlib.nullcontext(io.BytesIO(data))


def read_image(path: Path) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(manifest, config, config bytes) of the one image in an OCI layout dir."""
    index = json.loads((path / "index.json").read_text())
    mdigest = Digest.parse(index["manifests"][0]["digest"])
    manifest = json.loads((path / "blobs" / "sha256" / mdigest.hex).read_bytes())
    raw = (path / "blobs" / "sha256" / Digest.parse(manifest["config"]["digest"]).hex).read_bytes()
    return manifest, json.loads(raw), raw


def test_kept_layers_keep_the_config_bytes(tmp_path: Path) -> None:
    with open_source(TINY) as src:
        image = src.resolve()
        builder = ImageBuilder.from_config(image.config.raw)
        for layer in source_layers(src, image):
            builder.keep_layer(layer)
        assert not builder.changed
        with open_destination(str(tmp_path / "out"), "oci") as dest:
            written = builder.write(dest, compression="gzip")
    manifest, _config, raw = read_image(tmp_path / "out")
    assert raw == image.config.raw
    assert written.config.digest == image.image_id
    assert len(manifest["layers"]) == len(image.layers)


def test_new_layer_and_history_on_top(tmp_path: Path) -> None:
    layer = tb.build([tb.dir("new"), tb.file("new/f", b"added")])
    with open_source(TINY) as src:
        image = src.resolve()
        builder = ImageBuilder.from_config(image.config.raw)
        for li in source_layers(src, image):
            builder.keep_layer(li)
        builder.add_layer(LayerInput(None, opener(layer)),
                          HistoryEntry(created="2026-01-01T00:00:00Z", created_by="test"))
        builder.add_history(HistoryEntry(created_by="config only", empty_layer=True))
        builder.edit_config(lambda c: c.setdefault("config", {}).update(WorkingDir="/new"))
        builder.created = "2026-01-01T00:00:00Z"
        with open_destination(str(tmp_path / "out"), "oci") as dest:
            builder.write(dest, compression="gzip", tags=["built:1"])
    manifest, config, _raw = read_image(tmp_path / "out")
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    assert config["rootfs"]["diff_ids"] == [*map(str, image.config.diff_ids), diff_id]
    assert config["history"][-2:] == [
        {"created": "2026-01-01T00:00:00Z", "created_by": "test"},
        {"created_by": "config only", "empty_layer": True}]
    assert config["config"]["WorkingDir"] == "/new"
    assert config["created"] == "2026-01-01T00:00:00Z"
    top = Digest.parse(manifest["layers"][-1]["digest"])
    blob = (tmp_path / "out" / "blobs" / "sha256" / top.hex).read_bytes()
    assert gzip.decompress(blob) == layer
    # Our own reader takes it, with every digest and DiffID checked.
    with open_source(str(tmp_path / "out")) as src:
        again = src.resolve()
        for li in again.layers:
            with src.open_layer(li) as reader:
                while reader.read(1 << 20):
                    pass
                reader.finish()
    # And so does skopeo.
    requires_tool("skopeo")
    skopeo("copy", f"oci:{tmp_path / 'out'}:1", f"oci:{tmp_path / 'copy'}:x")


def test_blob_input_is_copied_as_it_is(tmp_path: Path) -> None:
    with open_source(TINY) as src:
        image = src.resolve()
        builder = ImageBuilder.from_config(image.config.raw)
        for layer in image.layers:
            builder.keep_layer(BlobInput(
                layer.descriptor, layer.diff_id,
                lambda layer=layer: contextlib.closing(src.blobs.open_blob(
                    layer.descriptor.digest))))
        with open_destination(str(tmp_path / "out"), "oci") as dest:
            written = builder.write(dest, compression="zstd")
    assert [d.digest for d in written.layers] == [x.descriptor.digest for x in image.layers]
    assert written.config.digest == image.image_id
    for layer in image.layers:  # the very bytes: no recompression, though zstd was asked
        name = layer.descriptor.digest.hex
        assert (tmp_path / "out" / "blobs" / "sha256" / name).read_bytes() == \
            (FIXTURES / "tiny" / "blobs" / "sha256" / name).read_bytes()


def test_wrong_diff_id_refused_and_nothing_left(tmp_path: Path) -> None:
    with open_source(TINY) as src:
        image = src.resolve()
    builder = ImageBuilder.from_config(image.config.raw)
    with pytest.raises(DigestMismatchError, match="the base config says"):
        builder.keep_layer(LayerInput(Digest.of_bytes(b"x"), opener(b"")))
    for d in image.config.diff_ids:
        builder.keep_layer(LayerInput(d, opener(tb.END)))  # right label, wrong bytes
    out = tmp_path / "out.tar"
    with pytest.raises(DigestMismatchError, match="diff_id mismatch"), \
            open_destination(str(out), "oci-archive") as dest:
        builder.write(dest)
    assert os.listdir(tmp_path) == []


def test_blob_input_that_lies_is_refused(tmp_path: Path) -> None:
    data = gzip.compress(tb.END)
    diff_id = Digest.of_bytes(tb.END)
    desc = Descriptor(MEDIA_TYPE_OCI_LAYER_GZIP, Digest.of_bytes(b"other"), len(data))
    builder = ImageBuilder.from_config(json.dumps(
        {"rootfs": {"type": "layers", "diff_ids": [str(diff_id)]}}).encode())
    builder.keep_layer(BlobInput(desc, diff_id, opener(data)))
    with pytest.raises(DigestMismatchError, match="does not match"), \
            open_destination(str(tmp_path / "out"), "oci") as dest:
        builder.write(dest)
    assert os.listdir(tmp_path) == []


def test_blob_writer_needs_a_digest(tmp_path: Path) -> None:
    blobs = LayoutWriter(str(tmp_path))
    with pytest.raises(ValueError, match="did not set"), blobs.blob_writer() as w:
        w.write(b"x")
    assert [n for n in os.listdir(tmp_path / "blobs") if n != "sha256"] == []
    assert blobs.put_blob(b"data") == Digest.of_bytes(b"data")
    assert blobs.has_blob(Digest.of_bytes(b"data"))
