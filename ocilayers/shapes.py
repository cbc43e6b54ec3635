"""Every JSON shape ocilayers prints (`--json`) or returns as a dict, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ocilayers.builder import WrittenImage
    from ocilayers.commit import CommitResult
    from ocilayers.growth import GateResult
    from ocilayers.history import HistoryReport
    from ocilayers.pack import PackResult
    from ocilayers.sources import Image
    from ocilayers.squash import SquashResult
    from ocilayers.store import StoreImage
    from ocilayers.store.containers import Container
    from ocilayers.store.mounts import MountRecord
    from ocilayers.unpack import UnpackResult


def source_image(image: Image) -> dict[str, Any]:
    """`ocilayers inspect SOURCE --json`."""
    return {
        "image_id": str(image.image_id),
        "config_digest": str(image.config_digest),
        "manifest_digest": str(image.manifest_digest) if image.manifest_digest else None,
        "tags": list(image.names),
        "platform": str(image.config.platform),
        "layers": [
            {"digest": str(layer.descriptor.digest), "media_type": layer.descriptor.media_type,
             "size": layer.descriptor.size, "diff_id": str(layer.diff_id),
             "chain_id": str(layer.chain_id)}
            for layer in image.layers
        ],
        "history": [h.to_json() for h in image.config.history],
    }


def store_image(img: StoreImage) -> dict[str, Any]:
    """`ocilayers inspect IMAGE --json`."""
    return {
        "image_id": str(img.image_id),
        "tags": list(img.tags),
        "config": img.config.data,
        "history": [h.to_json() for h in img.config.history],
        "layers": [{"diff_id": str(r.diff_id), "chain_id": str(r.chain_id),
                    "cache_id": r.cache_id, "diff_size": r.size} for r in img.layers],
    }


def image_row(img: StoreImage) -> dict[str, Any]:
    """One entry of `ocilayers images --json`."""
    return {"image_id": str(img.image_id), "tags": list(img.tags),
            "created": img.config.data.get("created"),
            "size": sum(r.size for r in img.layers)}


def unpack_result(result: UnpackResult) -> dict[str, Any]:
    """`ocilayers unpack --json`."""
    return {"image_id": str(result.image_id), "tags": list(result.tags),
            "layers": [{"diff_id": str(x.diff_id), "chain_id": str(x.chain_id),
                        "cache_id": x.cache_id, "diff_size": x.diff_size,
                        "reused": x.reused} for x in result.layers]}


def pack_result(result: PackResult) -> dict[str, Any]:
    """`ocilayers pack --json`."""
    return {"diff_id": str(result.diff_id), "digest": str(result.digest), "size": result.size,
            "media_type": result.media_type, "entries": result.stats.entries,
            "whiteouts": result.stats.whiteouts, "opaques": result.stats.opaques}


def _one_written(written: WrittenImage) -> dict[str, Any]:
    return {"manifest_digest": str(written.manifest.digest),
            "config_digest": str(written.config.digest),
            "layers": [{"digest": str(d.digest), "size": d.size, "media_type": d.media_type}
                       for d in written.layers],
            "tags": list(written.tags)}


def written_image(written: WrittenImage) -> dict[str, Any]:
    """`ocilayers convert|export --json`: the first image's digests and tags, and under
    `images` every image the output holds (an export of a repository may write several)."""
    return {**_one_written(written), "images": [_one_written(w) for w in written.images]}


def container(c: Container, mounted: Sequence[MountRecord]) -> dict[str, Any]:
    """One entry of `ocilayers ps --json` (and `create --json`)."""
    return {"id": c.id, "name": c.name, "image_id": c.image_id, "created": c.created,
            "command": list(c.command), "mount_id": c.mount_id,
            "mounted": [{"target": r.target, "users": r.refs, "mnt_ns": r.mnt_ns}
                        for r in mounted]}


def commit_result(result: CommitResult) -> dict[str, Any]:
    """`ocilayers commit --json`."""
    return {"image_id": str(result.image_id),
            "diff_id": str(result.diff_id) if result.diff_id else None,
            "chain_id": str(result.chain_id) if result.chain_id else None,
            "empty_layer": result.empty_layer, "size": result.size, "tags": list(result.tags)}


def _ratio(x: float) -> float | None:
    return None if x == float("inf") else x


def history_report(r: HistoryReport, gate: Sequence[GateResult] | None = None,
                   gate_figures: str = "ocilayers") -> dict[str, Any]:
    """`ocilayers history --json`: every history entry (base first, `layer` the index into
    `layers` or null), every layer's figures, the totals with dive's own, the top wasted
    paths; with --ci, the rules checked."""
    out: dict[str, Any] = {
        "image_id": str(r.image_id),
        "history": [{**(row.entry.to_json() if row.entry else {}),
                     "empty_layer": row.layer is None, "layer": row.layer} for row in r.rows],
        "layers": [{"index": i, "diff_id": str(x.diff_id), "chain_id": str(x.chain_id),
                    "compressed_size": x.compressed_size, "size": x.size,
                    "entries": x.figures.entries, "added": x.figures.added,
                    "changed": x.figures.changed, "whiteouts": x.figures.whiteouts,
                    "opaques": x.figures.opaques, "stored_bytes": x.figures.stored_bytes,
                    "wasted_bytes": x.figures.wasted_bytes,
                    "unchanged_rewrite_bytes": x.figures.unchanged_rewrite_bytes,
                    "rewrote_unchanged_bytes": x.figures.rewrote_unchanged_bytes}
                   for i, x in enumerate(r.layers)],
        "totals": {"stored_bytes": r.stored_bytes, "merged_bytes": r.merged_bytes,
                   "wasted_bytes": r.wasted_bytes,
                   "unchanged_rewrite_bytes": r.unchanged_rewrite_bytes,
                   "efficiency": r.efficiency,
                   "user_wasted_percent": _ratio(r.user_wasted_percent),
                   "dive_efficiency": r.dive.efficiency,
                   "dive_wasted_bytes": r.dive.wasted_bytes,
                   "dive_user_wasted_percent": _ratio(r.dive.user_wasted_percent)},
        "top": [{"path": t.path, "size": t.size, "layer": t.layer, "hidden_by": t.hidden_by,
                 "unchanged": t.unchanged} for t in r.top],
        "note": r.note,
    }
    if gate is not None:
        out["ci"] = {"figures": gate_figures, "passed": all(g.passed for g in gate),
                     "rules": [{"rule": g.rule, "figure": _ratio(g.figure),
                                "threshold": g.threshold, "passed": g.passed} for g in gate]}
    return out


def squash_result(r: SquashResult) -> dict[str, Any]:
    """`ocilayers squash --json`."""
    out: dict[str, Any] = {
        "image_id": str(r.image_id), "old_image_id": str(r.old_image_id),
        "diff_id": str(r.diff_id), "kept_layers": r.kept, "squashed_layers": r.squashed,
        "tags": list(r.tags), "entries": r.stats.entries, "whiteouts": r.stats.whiteouts,
        "opaques": r.stats.opaques, "hardlinks": r.stats.hardlinks, "bytes": r.stats.bytes,
        "note": r.note}
    if r.written is not None:
        out["manifest_digest"] = str(r.written.manifest.digest)
    return out
