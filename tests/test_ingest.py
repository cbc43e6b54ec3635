"""store/layers.py `ingest`: one tar stream in, one registered layer out (the path commit
takes), in one pass: the store then passes `verify`, and the layer's tar comes back byte for
byte. A failure registers nothing."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import tarbuilder as tb

from ocilayers.errors import ImageError
from ocilayers.spec import chain_ids
from ocilayers.store import Store
from ocilayers.store.fsck import verify
from ocilayers.streams import HashingReader


def test_ingest_two_layers_then_verify_and_rebuild(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    store.init()
    base = tb.build([tb.dir("etc"), tb.file("etc/a", b"one"), tb.file("etc/b", b"two")])
    top = tb.build([tb.whiteout("etc/a"), tb.file("etc/c", b"three")])
    rec1, reused1 = store.layers.ingest(HashingReader(io.BytesIO(base)), None)
    rec2, reused2 = store.layers.ingest(HashingReader(io.BytesIO(top)), rec1.chain_id)
    assert (reused1, reused2) == (False, False)
    assert [rec1.chain_id, rec2.chain_id] == chain_ids([rec1.diff_id, rec2.diff_id])
    assert store.layers.open_tar(rec1).read() == base
    assert store.layers.open_tar(rec2).read() == top
    diff2 = Path(store.layers.diff_dir(rec2))
    assert os.stat(diff2 / "etc" / "a").st_rdev == 0  # the whiteout is a char 0/0
    config = {"rootfs": {"type": "layers", "diff_ids": [str(rec1.diff_id), str(rec2.diff_id)]}}
    store.images.set_tag("ingested:1", store.images.put(json.dumps(config).encode()))
    assert verify(store) == []
    # The same stream again is the same ChainID: reused, never written twice.
    again, reused = store.layers.ingest(HashingReader(io.BytesIO(top)), rec1.chain_id)
    assert reused and again == rec2


def test_failed_ingest_registers_nothing(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    store.init()
    with pytest.raises(ImageError):
        store.layers.ingest(HashingReader(io.BytesIO(tb.build([tb.file("../x", b"")]))), None)
    assert store.layers.all() == []
    assert sorted(os.listdir(store.layout.overlay)) == ["l"]
