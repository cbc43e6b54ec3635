"""The squash workflow: the layers above a point (the first N, the layers of a base image, or
none) merged into one, whose merged view is the image's exactly, with hidden content left
out; history as dockerd's squash writes it. From the store the data is read straight from
the diff dirs (no temp tar); from a source, the data that survives is spooled from a second
read of the squashed layers. Into the store (`--tag`) or an output (`-o`), through the one
image builder."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from ocilayers.builder import ImageBuilder, LayerInput, ProgressFn, WrittenImage
from ocilayers.errors import ImageError, OCILayersError
from ocilayers.export import source_blobs, store_layers
from ocilayers.growth import Merge
from ocilayers.history import ScannedImage, merge_layers, scanned
from ocilayers.layerscan import Entry, spool
from ocilayers.lookup import source_or_image
from ocilayers.spec import (
    Digest,
    HistoryEntry,
    ImageConfig,
    Platform,
    chain_ids,
    created_time,
    manifest_family,
    normalize_reference,
)
from ocilayers.squashtar import DataOpener, SquashStats, squashed_tar
from ocilayers.store import Store
from ocilayers.store.layers import fill_staging
from ocilayers.store.layout import held_interrupt
from ocilayers.streams import COMPRESSIONS, HashingReader, IterReader, Readable
from ocilayers.tarsplit import file_chunks
from ocilayers.transports import open_source
from ocilayers.writer import open_destination


@dataclass(frozen=True)
class SquashOptions:
    """Where to squash from (`keep` layers, the layers of `keep_image`, or `all`), and
    where the result goes: `out` (with `format`, `compression`) or the store (`tags`)."""

    keep: int | None = None
    keep_image: str | None = None
    all: bool = False
    out: str | None = None
    format: str = "oci-archive"
    compression: str = "gzip"
    tags: Sequence[str] = ()
    message: str | None = None
    source_date_epoch: int | None = None
    warn: Callable[[str], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SquashResult:
    image_id: Digest
    old_image_id: Digest
    diff_id: Digest
    kept: int  # layers kept as they were
    squashed: int  # layers merged into the new one
    tags: tuple[str, ...]
    stats: SquashStats
    written: WrittenImage | None  # -o: what was written
    note: str | None = None


def squashed_history(config: ImageConfig, keep: int, merge: HistoryEntry
                     ) -> tuple[list[HistoryEntry], str | None]:
    """dockerd's squash history: the entries of the squashed layers (counting entries with a
    layer, base first) and every entry after them become `empty_layer`, then `merge`. A
    history that is missing or does not match the layers: one bare entry per kept layer."""
    layers = len(config.diff_ids)
    non_empty = [i for i, h in enumerate(config.history) if not h.empty_layer]
    if not config.history or len(non_empty) != layers:
        note = ("the image has no history" if not config.history else
                f"the history has {len(non_empty)} entries with a layer for {layers} layers")
        kept = [HistoryEntry(created=config.data.get("created") if isinstance(
            config.data.get("created"), str) else None) for _ in range(keep)]
        return [*kept, merge], note + ": it is replaced by one entry per kept layer"
    cut = non_empty[keep] if keep < layers else len(config.history)
    out = list(config.history[:cut])
    for h in config.history[cut:]:
        out.append(HistoryEntry(h.created, h.created_by, h.comment, h.author, True))
    return [*out, merge], None


def _check(opts: SquashOptions) -> tuple[str, ...]:
    picked = sum([opts.keep is not None, opts.keep_image is not None, opts.all])
    if picked != 1:
        raise OCILayersError("give one of --keep N, --keep-image BASE and --all")
    if (opts.out is None) == (not opts.tags):
        raise OCILayersError("give either -o OUT or --tag REPO:TAG")
    if opts.keep is not None and opts.keep < 0:
        raise OCILayersError("--keep must be 0 or more")
    if opts.compression not in COMPRESSIONS:
        raise OCILayersError(f"unknown compression {opts.compression!r}")
    return tuple(dict.fromkeys(normalize_reference(t) for t in opts.tags))


def _keep_count(diff_ids: Sequence[Digest], name: str, opts: SquashOptions, store: Store,
                *, platform: Platform | str | None) -> tuple[int, Digest | None]:
    """How many layers stay, and the base image's ID (`--keep-image`)."""
    total = len(diff_ids)
    if opts.all:
        keep, base = 0, None
    elif opts.keep is not None:
        keep, base = opts.keep, None
    else:
        assert opts.keep_image is not None
        if source_or_image(store, opts.keep_image) == "image":
            bimg = store.find_image(opts.keep_image)
            base_ids, base = bimg.config.diff_ids, bimg.image_id
        else:
            with open_source(opts.keep_image) as bsrc:
                bimage = bsrc.resolve(None, platform)
                base_ids, base = bimage.config.diff_ids, bimage.image_id
        if tuple(diff_ids[:len(base_ids)]) != tuple(base_ids):
            raise ImageError(f"{opts.keep_image} is not a base of {name}: its layers are "
                             "not the image's first layers")
        keep = len(base_ids)
    if keep >= total:
        raise OCILayersError(f"nothing to squash: the image has {total} layers and "
                             f"{keep} are kept")
    return keep, base


def squash(arg: str, opts: SquashOptions, *, root: str | None = None,
           ref: str | None = None, platform: Platform | str | None = None,
           progress: ProgressFn | None = None) -> SquashResult:
    """Squash the image `arg` (a store image or a source) as `opts` say."""
    tags = _check(opts)
    store = Store(root)
    if opts.out is None and source_or_image(store, arg) == "source":
        return _source_into_store(arg, opts, store, ref=ref, platform=platform)
    with contextlib.ExitStack() as held:
        if source_or_image(store, arg) == "image":
            with store.lock():  # (the claim keeps rmi/prune off the layers read)
                img = store.find_image(arg)
                held.enter_context(store.layers.claim([r.chain_id for r in img.layers]))
            arg = str(img.image_id)
        scan = held.enter_context(scanned(arg, store, ref=ref, platform=platform,
                                          keep_headers=True))
        keep, base = _keep_count(scan.config.diff_ids, scan.name, opts, store,
                                 platform=platform)
        full = merge_layers([layer.entries for layer in scan.layers])
        kept = merge_layers([layer.entries for layer in scan.layers[:keep]])
        created = created_time(opts.source_date_epoch)
        if keep == 0:
            comment = f"create new from {scan.image_id}"
        else:
            on = base if base is not None else chain_ids(scan.config.diff_ids[:keep])[-1]
            comment = f"merge {scan.image_id} to {on}"
        entries, note = squashed_history(scan.config, keep, HistoryEntry(
            created=created, comment=opts.message if opts.message is not None else comment))
        builder = ImageBuilder.from_config(scan.config.raw)
        builder.rebase(keep, entries[:-1])
        builder.created = created
        stats = SquashStats()
        data = held.enter_context(_data(scan, full, keep, store, opts.out))

        def open_tar() -> AbstractContextManager[Readable]:
            return contextlib.nullcontext(IterReader(squashed_tar(full, kept, keep, data,
                                                                  stats)))

        if opts.out is not None:
            written = _write_out(scan, builder, keep, LayerInput(None, open_tar), entries[-1],
                                 store, opts, progress)
            diff_id = ImageConfig.parse(written.config_raw).diff_ids[-1]
            return SquashResult(written.config.digest, scan.image_id, diff_id, keep,
                                len(scan.layers) - keep, written.tags, stats, written, note)
        builder.add_history(entries[-1])
        image_id, diff_id = _into_store(store, scan, keep, base, builder, open_tar, tags)
        return SquashResult(image_id, scan.image_id, diff_id, keep, len(scan.layers) - keep,
                            tags, stats, None, note)


@contextlib.contextmanager
def _data(scan: ScannedImage, full: Merge, keep: int, store: Store,
          out: str | None) -> Iterator[DataOpener]:
    """Where the squashed layer's file data comes from: the diff dirs, or for a source, a
    spool of the data that survives, read from the squashed layers once more."""
    if scan.from_store:
        img = store.load_image(scan.image_id)
        roots = [os.fsencode(store.layers.diff_dir(r)) for r in img.layers]

        def from_diff(layer: int, e: Entry) -> Iterator[bytes]:
            return file_chunks(roots[layer], e.path, e.size, e.crc.to_bytes(8, "big"))

        yield from_diff
        return
    assert scan.source is not None and scan.image is not None
    wanted: dict[int, set[int]] = {}
    number = [{id(e): n for n, e in enumerate(layer.entries)} for layer in scan.layers]
    for n in full.walk():
        g = n.group
        if g is not None and g.layer >= keep and g.size:
            wanted.setdefault(g.layer, set()).add(number[g.layer][id(g.entry)])
    where = (os.path.dirname(os.path.abspath(out))
             if out is not None and not out.startswith("docker://") else None)
    spool_dir = tempfile.mkdtemp(prefix=".ocilayers-squash-", dir=where)
    try:
        for i, want in sorted(wanted.items()):
            layer = scan.image.layers[i]
            with contextlib.closing(scan.source.open_layer(layer, readahead=True)) as reader:
                spool(reader, want, functools.partial(_spool_path, spool_dir, i))
                reader.finish()

        def from_spool(layer: int, e: Entry) -> Iterator[bytes]:
            n = number[layer][id(e)]
            path = os.fsencode(os.path.join(spool_dir, f"{layer}-{n}"))
            return file_chunks(b"", path, e.size, e.crc.to_bytes(8, "big"))

        yield from_spool
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)


def _source_into_store(arg: str, opts: SquashOptions, store: Store, *, ref: str | None,
                       platform: Platform | str | None) -> SquashResult:
    """A source squashed into the store: unpacked first (its layers are the kept layers'
    too), then squashed there. The squash point is checked before anything is written, and
    an image the unpack added is removed again when the squash fails."""
    from ocilayers.store.gc import remove_image
    from ocilayers.unpack import unpack_image

    with open_source(arg) as src:
        image = src.resolve(ref, platform)
        _keep_count(image.config.diff_ids, arg, opts, store, platform=platform)
        had = store.exists() and image.image_id in store.images.ids()
        image_id = unpack_image(store, src, image).image_id
    try:
        return squash(str(image_id), opts, root=store.root)
    except BaseException:
        if not had:
            with contextlib.suppress(OCILayersError):
                remove_image(store, str(image_id))
        raise


def _spool_path(spool_dir: str, layer: int, n: int) -> str:
    return os.path.join(spool_dir, f"{layer}-{n}")


def _write_out(scan: ScannedImage, builder: ImageBuilder, keep: int, new: LayerInput,
               merge: HistoryEntry, store: Store, opts: SquashOptions,
               progress: ProgressFn | None) -> WrittenImage:
    assert opts.out is not None
    family = "oci"
    if scan.from_store:
        for rebuilt in store_layers(store, store.load_image(scan.image_id))[:keep]:
            builder.keep_layer(rebuilt)
    else:
        src, image = scan.source, scan.image
        assert src is not None and image is not None
        family = manifest_family(image.manifest.media_type)
        for kept in source_blobs(src, image)[:keep]:
            builder.keep_layer(kept)
    builder.add_layer(new, merge)
    with open_destination(opts.out, opts.format) as dest:
        return builder.write(dest, compression=opts.compression, tags=opts.tags,
                             progress=progress, family=family)


def _into_store(store: Store, scan: ScannedImage, keep: int, base: Digest | None,
                builder: ImageBuilder, open_tar: Callable[[], AbstractContextManager[Readable]],
                tags: tuple[str, ...]) -> tuple[Digest, Digest]:
    img = store.load_image(scan.image_id)
    for layer in store_layers(store, img)[:keep]:
        builder.keep_layer(layer)
    parent = img.layers[keep - 1].chain_id if keep else None
    staging = store.layers.begin()
    try:
        with open_tar() as tar:
            built = fill_staging(staging, HashingReader(tar))
        config = builder.config_bytes([built.diff_id])
        with held_interrupt(), store.lock():
            store.layers.register_built(staging, built, parent)
            image_id = store.images.add(config, base, tags)
    finally:
        if os.path.exists(staging.path):
            store.layers.discard(staging)
    return image_id, built.diff_id
