"""The history workflow: an image's history with what every layer adds, changes, deletes
and wastes, from the store (layerdb and tar-split alone: no diff dir walked, nothing
decompressed but the records) or from a source (each layer streamed once, its digests
checked, nothing written)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ocilayers import scancache
from ocilayers.growth import DiveFigures, LayerFigures, Merge, dive_figures
from ocilayers.layerscan import (
    HARDLINK_KIND,
    Entry,
    ScanCounts,
    ignored,
    scan_tar,
    scan_tar_split,
)
from ocilayers.lookup import source_or_image
from ocilayers.sources import Image, ImageSource
from ocilayers.spec import Digest, HistoryEntry, ImageConfig, Platform
from ocilayers.store import Store
from ocilayers.transports import open_source


@dataclass
class ScannedLayer:
    diff_id: Digest
    chain_id: Digest
    compressed_size: int | None  # None: not known (a store keeps no compressed blob)
    size: int  # the uncompressed tar's bytes
    entries: list[Entry]


@dataclass
class ScannedImage:
    """An image's layers read as entries. `source`/`image`: where a source's layers can be
    read again (squash reads the data it keeps)."""

    name: str
    image_id: Digest
    config: ImageConfig
    layers: list[ScannedLayer]
    from_store: bool
    source: ImageSource | None = None
    image: Image | None = None


@contextlib.contextmanager
def scanned(arg: str, store: Store, *, ref: str | None = None,
            platform: Platform | str | None = None, keep_headers: bool = False,
            ignore: Sequence[str] = (),
            progress: Callable[[int, int], None] | None = None) -> Iterator[ScannedImage]:
    """Read every layer of `arg` (a store image or a source) as entries; the source stays
    open for the block. `progress(layer, n)` hears of the bytes read of a source's layer."""
    skip = ignored(ignore)

    def kept(entries: Iterator[Entry]) -> list[Entry]:
        return _without(entries, skip) if skip else list(entries)

    if source_or_image(store, arg) == "image":
        img = store.find_image(arg)
        paths = [store.layers.tar_split_path(rec.chain_id) for rec in img.layers]
        read = (_scan_tar_splits(paths, True) if keep_headers
                else _read_store_layers(store, paths))
        layers = [ScannedLayer(rec.diff_id, rec.chain_id, None, size, kept(iter(entries)))
                  for rec, (entries, size) in zip(img.layers, read, strict=True)]
        yield ScannedImage(arg, img.image_id, img.config, layers, True)
        return
    with open_source(arg) as src:
        image = src.resolve(ref, platform)
        layers = []
        for i, layer in enumerate(image.layers):
            counts = ScanCounts()
            cb = (lambda n, i=i: progress(i, n)) if progress else None
            with contextlib.closing(src.open_layer(layer, cb, readahead=True)) as reader:
                entries = kept(scan_tar(reader, keep_headers=keep_headers, counts=counts))
                reader.finish()  # digest, size and DiffID
            layers.append(ScannedLayer(layer.diff_id, layer.chain_id,
                                       layer.descriptor.size, counts.tar_size, entries))
        yield ScannedImage(arg, image.config_digest, image.config, layers, False, src, image)


def _without(entries: Iterator[Entry], skip: Callable[[bytes], bool]) -> list[Entry]:
    """The entries whose paths `skip` does not pick. The first hardlink kept whose target is
    left out stands for the target (its inode's name now, carrying its data); later links
    to that target link to it."""
    out: list[Entry] = []
    dropped: dict[bytes, Entry] = {}  # left-out non-dirs by path (a left-out link: its target)
    holder: dict[int, bytes] = {}  # id(left-out entry) -> the kept name that holds it now
    for e in entries:
        if skip(e.path):
            if e.kind != HARDLINK_KIND:
                dropped[e.path] = e
            elif e.link in dropped:
                dropped[e.path] = dropped[e.link]
            continue
        if e.kind == HARDLINK_KIND and e.link in dropped:
            held = dropped[e.link]
            name = holder.get(id(held))
            if name is None:
                holder[id(held)] = e.path
                e = Entry(e.path, held.kind, held.size, held.crc, held.link, e.header)
            else:
                e = Entry(e.path, HARDLINK_KIND, e.size, 0, name, e.header)
        out.append(e)
    return out


def _scan_one(path: str, keep_raw: bool) -> tuple[list[Entry], int]:
    counts = ScanCounts()
    return scan_tar_split(path, counts, keep_raw=keep_raw), counts.tar_size


def _scan_packed(paths: Sequence[str], keep_raw: bool
                 ) -> list[tuple[list[tuple[Any, ...]], int]]:
    out = []
    for path in paths:
        entries, size = _scan_one(path, keep_raw)
        out.append(([(e.path, e.kind, e.size, e.crc, e.link, None, e.raw) for e in entries],
                    size))
    return out


def _scan_tar_splits(paths: Sequence[str], keep_raw: bool = False
                     ) -> list[tuple[list[Entry], int]]:
    """Every layer's entries and tar size from its tar-split (`keep_raw`: with their header
    bytes); with a second core, a forked child reads about half of the records (by file
    size) while this process reads the rest."""
    from ocilayers.forking import Forked, can_fork  # (lazy: pickle, for a cache miss only)

    if len(paths) < 2 or not can_fork():
        return [_scan_one(p, keep_raw) for p in paths]
    sizes = [os.path.getsize(p) for p in paths]
    theirs: list[int] = []
    mine: list[int] = []
    load = [0, 0]
    for i in sorted(range(len(paths)), key=lambda i: -sizes[i]):
        side = 0 if load[0] <= load[1] else 1
        (theirs if side == 0 else mine).append(i)
        load[side] += sizes[i]
    out: dict[int, tuple[list[Entry], int]] = {}
    with Forked(lambda: _scan_packed([paths[i] for i in theirs], keep_raw)) as child:
        for i in mine:
            out[i] = _scan_one(paths[i], keep_raw)
        for i, (packed, size) in zip(theirs, child.result(), strict=True):
            out[i] = ([Entry(*t) for t in packed], size)
    return [out[i] for i in range(len(paths))]


def _read_store_layers(store: Store, paths: Sequence[str]) -> list[tuple[list[Entry], int]]:
    """Every layer's entries and tar size: from its scan cache where it has a good one, else
    from its tar-split records, and then cached. (Writing the caches from a forked child,
    beside the merge, measured no faster: three processes on two cores.)"""
    got = [scancache.load(p) for p in paths]
    missing = [i for i, g in enumerate(got) if g is None]
    if not missing:
        return [g for g in got if g is not None]
    fresh = _scan_tar_splits([paths[i] for i in missing])
    for i, read in zip(missing, fresh, strict=True):
        got[i] = read
    _save_scans(store, [(paths[i], entries, size)
                        for i, (entries, size) in zip(missing, fresh, strict=True)])
    return [g for g in got if g is not None]


def _save_scans(store: Store, items: Sequence[tuple[str, list[Entry], int]]) -> None:
    """Write the scan caches, when the store lock is free and this process may write the
    store: a read never waits for a writer, and no cache goes into a layer being removed."""
    with store.layout.lock_if_free() as locked:
        if locked:
            for path, entries, size in items:
                with contextlib.suppress(OSError):  # gone since, or a read-only dir
                    if os.path.exists(path):
                        scancache.save(path, entries, size)


def merge_layers(layers: Sequence[Sequence[Entry]]) -> Merge:
    m = Merge()
    for entries in layers:
        m.apply(entries)
    m.finish()
    return m


# --- the report ---

@dataclass(frozen=True)
class LayerReport:
    diff_id: Digest
    chain_id: Digest
    compressed_size: int | None
    size: int
    figures: LayerFigures


@dataclass(frozen=True)
class HistoryRow:
    """One history entry; `layer`: the index of its layer in `HistoryReport.layers`, None
    for an `empty_layer` entry."""

    entry: HistoryEntry | None
    layer: int | None


@dataclass(frozen=True)
class WastedPath:
    path: str
    size: int
    layer: int  # the layer that added it (index)
    hidden_by: int  # the layer that hid it (that rewrote it, for an unchanged rewrite)
    unchanged: bool  # hidden by a rewrite with the same content


@dataclass(frozen=True)
class HistoryReport:
    name: str
    image_id: Digest
    rows: tuple[HistoryRow, ...]
    layers: tuple[LayerReport, ...]
    stored_bytes: int
    merged_bytes: int
    wasted_bytes: int
    unchanged_rewrite_bytes: int
    top: tuple[WastedPath, ...]
    dive: DiveFigures
    note: str | None = None

    @property
    def efficiency(self) -> float:
        """merged ÷ stored; 1.0 for an image with no file bytes."""
        return self.merged_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def user_wasted_percent(self) -> float:
        """Wasted bytes ÷ the stored bytes of every layer but the first (dive's rule on
        ocilayers' figures); 0 for a one-layer image."""
        user = sum(layer.figures.stored_bytes for layer in self.layers[1:])
        if len(self.layers) <= 1 or self.wasted_bytes == 0:
            return 0.0
        return self.wasted_bytes / user if user else float("inf")


def history_rows(config: ImageConfig, layers: int) -> tuple[list[HistoryRow], str | None]:
    """History entries matched to layers (the non-empty ones, in order); a history that is
    missing or does not match gets one bare row per layer and a note saying so."""
    non_empty = sum(1 for h in config.history if not h.empty_layer)
    if config.history and non_empty == layers:
        rows = []
        n = 0
        for h in config.history:
            if h.empty_layer:
                rows.append(HistoryRow(h, None))
            else:
                rows.append(HistoryRow(h, n))
                n += 1
        return rows, None
    note = ("the image has no history" if not config.history else
            f"the history has {non_empty} entries with a layer for {layers} layers")
    return [HistoryRow(None, i) for i in range(layers)], note + ": one row per layer"


# Below this many entries dive's figures are computed in this process: a fork costs a few ms.
DIVE_FORK_MIN_ENTRIES = 2000


def merge_and_dive(layers: Sequence[Sequence[Entry]]) -> tuple[Merge, DiveFigures]:
    """The merge of `layers` and dive's figures of them. The two are independent: with a
    second core (and enough entries) a forked child computes dive's while this process
    merges (on the 5-layer benchmark image, 14k entries, each takes 60-100 ms)."""
    from ocilayers.forking import Forked, can_fork

    if sum(len(x) for x in layers) < DIVE_FORK_MIN_ENTRIES or not can_fork():
        return merge_layers(layers), dive_figures(layers)
    with Forked(lambda: dive_figures(layers)) as child:
        merge = merge_layers(layers)
        return merge, child.result()


def report(scan: ScannedImage, top: int = 10) -> HistoryReport:
    """The figures of a scanned image."""
    merge, dive = merge_and_dive([layer.entries for layer in scan.layers])
    rows, note = history_rows(scan.config, len(scan.layers))
    layers = tuple(LayerReport(s.diff_id, s.chain_id, s.compressed_size, s.size, f)
                   for s, f in zip(scan.layers, merge.layers, strict=True))
    wasted = merge.wasted()
    top_paths = tuple(WastedPath(g.entry.shown, g.size, g.layer,
                                 g.rewritten_by if g.unchanged else g.hidden_by, g.unchanged)
                      for g in wasted[:max(top, 0)])
    return HistoryReport(
        scan.name, scan.image_id, tuple(rows), layers, merge.stored_bytes,
        merge.merged_bytes, sum(g.size for g in wasted),
        sum(g.size for g in wasted if g.unchanged), top_paths, dive, note)


def image_history(arg: str, *, root: str | None = None, ref: str | None = None,
                  platform: Platform | str | None = None, top: int = 10,
                  ignore: Sequence[str] = (),
                  progress: Callable[[int, int], None] | None = None) -> HistoryReport:
    """The history of a store image or a source, with the growth figures of every layer."""
    store = Store(root)
    with scanned(arg, store, ref=ref, platform=platform, ignore=ignore,
                 progress=progress) as scan:
        return report(scan, top)
