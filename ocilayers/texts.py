"""Every text table ocilayers prints, and the human forms of sizes and times in them, as
`docker images` and `docker history` print theirs (go-units' HumanSize and HumanDuration)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ocilayers.spec import HistoryEntry

if TYPE_CHECKING:
    from ocilayers.growth import GateResult
    from ocilayers.history import HistoryReport
    from ocilayers.sources import Image
    from ocilayers.store import Store, StoreImage
    from ocilayers.store.containers import Container
    from ocilayers.store.mounts import MountRecord

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def human_size(size: float) -> str:
    """Decimal units, 3 significant digits: 1982817 -> `1.98MB`, 280e6 -> `280MB`."""
    i = 0
    while size >= 1000 and i < len(_UNITS) - 1:
        size /= 1000
        i += 1
    return f"{size:.3g}{_UNITS[i]}"


def human_duration(seconds: float) -> str:
    """`Less than a second`, `About a minute`, `3 hours`, `2 days`, `5 weeks`, ..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600 / 24 / 365)} years"


def parse_time(value: object) -> datetime.datetime | None:
    """An RFC 3339 time from a config (`2026-11-29T04:35:33.123456789Z`), or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    date, sep, rest = text.partition(".")
    if sep:  # fromisoformat takes at most 6 fraction digits before 3.11's wider forms
        frac = "".join(c for c in rest if c.isdigit())
        text = f"{date}.{frac[:6]}{rest[len(frac):]}"
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def since(value: object, now: datetime.datetime | None = None) -> str:
    """`2 days ago` for a config time; `N/A` when there is none."""
    t = parse_time(value)
    if t is None:
        return "N/A"
    now = now or datetime.datetime.now(datetime.UTC)
    return human_duration(max(0.0, (now - t).total_seconds())) + " ago"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], gap: int = 3) -> str:
    """Columns sized to their content (the last one not padded)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)] + [r[-1]]
        lines.append((" " * gap).join(cells).rstrip())
    return "\n".join(lines)


def short_id(digest: object, no_trunc: bool = False) -> str:
    text = str(digest)
    return text if no_trunc else text.removeprefix("sha256:")[:12]


def ellipsize(text: str, width: int, no_trunc: bool = False) -> str:
    text = " ".join(text.split())
    return text if no_trunc or len(text) <= width else text[:width - 1] + "…"


def layer_history(history: Sequence[HistoryEntry], layers: int) -> list[HistoryEntry | None]:
    """The history entry of each layer: entries that are not `empty_layer`, in order, as
    Docker counts them; all None when they do not match the layers one to one."""
    own = [h for h in history if not h.empty_layer]
    return list(own) if len(own) == layers else [None] * layers


def images_table(images: Sequence[StoreImage], no_trunc: bool = False) -> str:
    rows = []
    for img in images:
        size = human_size(sum(r.size for r in img.layers))
        created = since(img.config.data.get("created"))
        for t in img.tags or ("<none>",):
            rows.append([t, short_id(img.image_id, no_trunc), created, size])
    return table(["REPOSITORY:TAG", "IMAGE ID", "CREATED", "SIZE"], rows)


def _head(image_id: object, tags: Sequence[str], created: object, platform: str,
          layers: int, size: str) -> list[str]:
    out = [f"Image ID:  {image_id}"]
    if tags:
        out.append(f"Tags:      {', '.join(tags)}")
    t = parse_time(created)
    if t is not None:
        out.append(f"Created:   {created} ({since(created)})")
    if platform.strip("/"):
        out.append(f"Platform:  {platform}")
    out.append(f"Layers:    {layers}{f' ({size})' if size else ''}")
    return out


def store_image_text(img: StoreImage, no_trunc: bool = False) -> str:
    """`ocilayers inspect IMAGE`: the image, then one row per layer, base first."""
    hist = layer_history(img.config.history, len(img.layers))
    rows = []
    for i, (rec, h) in enumerate(zip(img.layers, hist, strict=True), 1):
        rows.append([str(i), ellipsize((h.created_by or "") if h else "", 45, no_trunc) or "-",
                     human_size(rec.size), "-", short_id(rec.diff_id, no_trunc),
                     short_id(rec.chain_id, no_trunc), rec.cache_id if no_trunc
                     else rec.cache_id[:12]])
    total = human_size(sum(r.size for r in img.layers))
    head = _head(img.image_id, img.tags, img.config.data.get("created"),
                 str(img.config.platform), len(img.layers), total)
    body = table(["#", "CREATED BY", "SIZE", "COMPRESSED", "DIFF ID", "CHAIN ID", "CACHE ID"],
                 rows)
    return "\n".join([*head, "", body]) if rows else "\n".join(head)


def source_image_text(image: Image, no_trunc: bool = False) -> str:
    """`ocilayers inspect SOURCE`: the image, then one row per layer, base first. The size of
    a compressed layer's tar needs the layer read, which inspect does not do: `-`."""
    hist = layer_history(image.config.history, len(image.layers))
    rows = []
    for i, (layer, h) in enumerate(zip(image.layers, hist, strict=True), 1):
        mt = layer.descriptor.media_type
        plain = mt.endswith((".tar", ".v1.tar"))  # an uncompressed blob is the tar itself
        rows.append([str(i), ellipsize((h.created_by or "") if h else "", 45, no_trunc) or "-",
                     human_size(layer.descriptor.size) if plain else "-",
                     human_size(layer.descriptor.size),
                     short_id(layer.diff_id, no_trunc), short_id(layer.chain_id, no_trunc),
                     short_id(layer.descriptor.digest, no_trunc),
                     mt[mt.rfind(".") + 1:] if mt else "-"])
    total = human_size(sum(x.descriptor.size for x in image.layers))
    head = _head(image.image_id, image.names, image.config.data.get("created"),
                 str(image.config.platform), len(image.layers),
                 f"{total} compressed" if image.layers else "")
    body = table(["#", "CREATED BY", "SIZE", "COMPRESSED", "DIFF ID", "CHAIN ID", "DIGEST",
                  "TYPE"], rows)
    return "\n".join([*head, "", body]) if rows else "\n".join(head)


def containers_table(store: Store, rows: Sequence[tuple[Container, Sequence[MountRecord]]],
                     no_trunc: bool = False) -> str:
    """`ocilayers ps`: one row per container, oldest first."""
    tags = store.images.tags()
    out = []
    for c, mounted in rows:
        image = next((t for t, i in sorted(tags.items()) if str(i) == c.image_id),
                     short_id(c.image_id, no_trunc))
        where = ", ".join(r.target for r in mounted) if mounted else "-"
        out.append([c.id if no_trunc else c.short_id, c.name or "-", image,
                    ellipsize(" ".join(c.command), 30, no_trunc) or "-", since(c.created),
                    where])
    return table(["CONTAINER ID", "NAME", "IMAGE", "COMMAND", "CREATED", "MOUNTED"], out)


def _pct(x: float) -> str:
    return "inf" if x == float("inf") else f"{x * 100:.1f}%"


def history_text(r: HistoryReport, no_trunc: bool = False) -> str:
    """`ocilayers history`: one row per history entry, base first, with each layer's
    growth figures; then the totals, dive's figures and the largest wasted paths."""
    rows = []
    for row in r.rows:
        h = row.entry
        created = since(h.created) if h is not None and h.created else "-"
        what = (h.created_by or (f"({h.comment})" if h.comment else "")) if h else ""
        by = ellipsize(what.replace("\n", " "), 40, no_trunc)
        if row.layer is None:
            rows.append(["-", created, by or "-", "0B", "-", "", "", "", "", "", ""])
            continue
        x = r.layers[row.layer]
        f = x.figures
        rows.append([str(row.layer + 1), created, by or "-", human_size(x.size),
                     human_size(x.compressed_size) if x.compressed_size is not None else "-",
                     str(f.added), str(f.changed), str(f.whiteouts), str(f.opaques),
                     human_size(f.wasted_bytes), human_size(f.unchanged_rewrite_bytes)])
    out = [f"Image ID:  {r.image_id}", "",
           table(["#", "CREATED", "CREATED BY", "SIZE", "COMPRESSED", "ADDED", "CHANGED",
                  "WHITEOUTS", "OPAQUE", "WASTED", "UNCHANGED"], rows), "",
           f"Stored:       {human_size(r.stored_bytes)} ({r.stored_bytes} bytes of files in "
           f"{len(r.layers)} layers)",
           f"Merged view:  {human_size(r.merged_bytes)} ({r.merged_bytes} bytes)",
           f"Wasted:       {human_size(r.wasted_bytes)} ({r.wasted_bytes} bytes; "
           f"{r.unchanged_rewrite_bytes} of them unchanged rewrites)",
           f"Efficiency:   {_pct(r.efficiency)}",
           f"dive figures: efficiency {_pct(r.dive.efficiency)}, wasted "
           f"{human_size(r.dive.wasted_bytes)} ({r.dive.wasted_bytes} bytes), user wasted "
           f"{_pct(r.dive.user_wasted_percent)}"]
    if r.note:
        out.append(f"Note:         {r.note}")
    if r.top:
        out += ["", table(["WASTED", "PATH", "ADDED BY", "HIDDEN BY"], [
            [human_size(t.size), t.path, f"layer {t.layer + 1}",
             f"layer {t.hidden_by + 1}" + (" (unchanged rewrite)" if t.unchanged else "")]
            for t in r.top])]
    return "\n".join(out)


def gate_lines(results: Sequence[GateResult]) -> list[str]:
    """One line per rule of the CI gate: PASS or FAIL, the figure and the threshold."""
    out = []
    for g in results:
        if g.rule == "highestWastedBytes":
            fig, thr = f"{int(g.figure)} bytes", f"{int(g.threshold)} bytes"
        else:
            fig, thr = (f"{g.figure:.4f}" if g.figure != float("inf") else "inf"), f"{g.threshold}"
        cmp = {"lowestEfficiency": ">="}.get(g.rule, "<=")
        out.append(f"{'PASS' if g.passed else 'FAIL'}: {g.rule}: {fig} "
                   f"(must be {cmp} {thr})")
    return out
