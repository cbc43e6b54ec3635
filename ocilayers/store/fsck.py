"""Checking a store: every file against the overlay2 format (docs/store-format.md), and every
layer against its tar-split records (`verify`)."""

from __future__ import annotations

import contextlib
import os
import stat

from ocilayers.errors import OCILayersError, StoreError
from ocilayers.spec import Digest, chain_ids
from ocilayers.store import Store
from ocilayers.store.layers import CACHE_ID_RE, LINK_ID_RE, LayerRecord, diff_size
from ocilayers.streams import HashingReader


def check_format(store: Store) -> list[str]:
    """Every store file against the overlay2 format; problems as text."""
    problems: list[str] = []
    layout, layers = store.layout, store.layers

    def mode_is(path: str, want: int) -> None:
        have = stat.S_IMODE(os.lstat(path).st_mode)
        if have != want:
            problems.append(f"{os.path.relpath(path, layout.root)}: mode {oct(have)}, "
                            f"want {oct(want)}")

    for rec in layers.all():
        d = layout.layer_meta(rec.chain_id)
        where = f"layer {rec.chain_id.short}"
        mode_is(d, 0o700)
        for f in ("diff", "size", "cache-id", "tar-split.json.gz"):
            if not os.path.exists(os.path.join(d, f)):
                problems.append(f"{where}: layerdb {f} is missing")
            else:
                mode_is(os.path.join(d, f), 0o644)
        want = chain_ids([rec.parent, rec.diff_id])[1] if rec.parent else rec.diff_id
        if want != rec.chain_id:
            problems.append(f"{where}: ChainID does not match its parent and diff")
        if rec.parent is not None and layers.get(rec.parent) is None:
            problems.append(f"{where}: parent {rec.parent} is missing")
        ld = layout.layer_path(rec.cache_id)
        if not CACHE_ID_RE.fullmatch(rec.cache_id):
            problems.append(f"{where}: cache-id {rec.cache_id!r} is not 64 hex digits")
        if not os.path.isdir(os.path.join(ld, "diff")):
            problems.append(f"{where}: overlay2/{rec.cache_id}/diff is missing")
            continue
        mode_is(ld, 0o710)
        try:
            link = layers.link_of(rec.cache_id)
        except FileNotFoundError:
            problems.append(f"{where}: link file is missing")
            continue
        mode_is(os.path.join(ld, "link"), 0o644)
        if not LINK_ID_RE.fullmatch(link):
            problems.append(f"{where}: link {link!r} is not 26 base32 characters")
        lpath = os.path.join(layout.links, link)
        if not os.path.islink(lpath) or os.readlink(lpath) != f"../{rec.cache_id}/diff":
            problems.append(f"{where}: l/{link} does not point to ../{rec.cache_id}/diff")
        lower = layers.lower_of(rec.cache_id)
        if rec.parent is None:
            if lower:
                problems.append(f"{where}: a base layer must have no lower file")
        else:
            prec = layers.get(rec.parent)
            if prec is not None:
                with contextlib.suppress(FileNotFoundError):
                    want_lower = ":".join(layers.lowers_of(prec.cache_id))
                    if lower != want_lower:
                        problems.append(f"{where}: lower is {lower!r}, want {want_lower!r}")
            if not os.path.isdir(os.path.join(ld, "work")):
                problems.append(f"{where}: work/ is missing")
    for image_id in store.images.ids():
        content = layout.image_content(image_id)
        with open(content, "rb") as cf:
            if Digest.of_bytes(cf.read()) != image_id:
                problems.append(f"image {image_id.short}: config does not match its ID")
        mode_is(content, 0o600)
    known = set(store.images.ids())
    try:
        tags = store.images.tags()
    except (StoreError, ValueError) as exc:
        problems.append(str(exc))
        tags = {}
    for t, image_id in tags.items():
        if image_id not in known:
            problems.append(f"tag {t} names missing image {image_id}")
    return problems


def verify(store: Store, name: str | None = None) -> list[str]:
    """Check layers against their tar-split records (content and metadata) and every store
    file against the overlay2 format. Returns the problems found (empty: all good)."""
    problems = check_format(store)
    if name is not None:
        recs = list(store.find_image(name).layers)
    else:
        recs = store.layers.all()
        for image_id in store.images.ids():  # every image's chain of layers is still there
            try:
                store.load_image(image_id)
            except OCILayersError as exc:
                problems.append(f"image {image_id.short}: {exc}")
    for rec in recs:
        try:
            problems += verify_layer(store, rec)
        except OCILayersError as exc:
            problems.append(f"layer {rec.chain_id.short}: {exc}")
    return problems


def verify_layer(store: Store, rec: LayerRecord) -> list[str]:
    """One layer: the rebuilt tar's entries against the diff dir, its DiffID, its size."""
    from ocilayers.overrides import SideRecord
    from ocilayers.verify import compare_tree

    diff = store.layers.diff_dir(rec)
    hasher = HashingReader(store.layers.open_tar(rec))
    records = store.layout.overlay_format().xattr_namespace == "user"
    side = SideRecord.load(os.path.dirname(diff)) if records else None
    problems = [f"layer {rec.chain_id.short}: {p}"
                for p in compare_tree(hasher, diff, records=records, side=side)]
    hasher.drain()
    if hasher.hash.hexdigest() != rec.diff_id.hex:
        problems.append(f"layer {rec.chain_id.short}: rebuilt tar has DiffID "
                        f"sha256:{hasher.hash.hexdigest()}, layerdb says {rec.diff_id}")
    size = diff_size(diff)
    if size != rec.size:
        problems.append(f"layer {rec.chain_id.short}: size file says {rec.size}, "
                        f"diff dir holds {size}")
    return problems
