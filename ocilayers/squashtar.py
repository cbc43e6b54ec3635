"""The one layer that replaces the layers above a squash point: the merged view of the whole
image, written as a diff against the merged view of the kept layers below it.

- Every path whose top-most entry comes from a squashed layer is written, in byte order, with
  its own header; hidden content is left out.
- A whiteout is written only for a path the kept layers show and the image does not, and only
  the top-most one of a deleted tree.
- An opaque marker is written only for a dir the kept layers have whose content a squashed
  layer cut off (an opaque marker, or the dir made anew); nothing under it needs a whiteout.
- An inode keeps its hardlinks: its first name in the output's order carries the data (the
  original name when it survives and sorts first), every later name is a link to it. A name
  that was a hardlink to a hidden file is now the file.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator

from ocilayers.errors import OCILayersError
from ocilayers.growth import Group, Merge, Node
from ocilayers.layerscan import FILE_KIND, Entry
from ocilayers.tarstream import (
    BLOCK,
    DIR,
    END_OF_ARCHIVE,
    LNK,
    REG,
    TarEntry,
    TarReader,
    encode_header,
)
from ocilayers.whiteout import OPAQUE_MARKER, WHITEOUT_PREFIX

# The data of `entry` of layer `layer` (0-based, in the image), as chunks.
DataOpener = Callable[[int, Entry], Iterator[bytes]]


@dataclasses.dataclass(slots=True)
class SquashStats:
    entries: int = 0
    whiteouts: int = 0
    opaques: int = 0
    hardlinks: int = 0
    bytes: int = 0


_Item = tuple[bytes, "Node | None", "Node | None", Node]  # (path, node or None: a marker,
# the kept layers' node at the path, the dir it is in)


def _items(m: Node, k: Node | None, keep: int, root: Node, st: SquashStats) -> Iterator[_Item]:
    """What dir `m` holds in the output, in byte order: its children and the markers."""
    assert m.children is not None
    below = k if k is not None and k.children is not None else None
    path = m.path
    prefix = path + b"/" if path else b""
    items: list[tuple[bytes, Node | None]] = []
    if below is not None and m.cut >= keep and m is not root:
        items.append((OPAQUE_MARKER, None))
        st.opaques += 1
        below = None  # what the kept layers have below it is cut off: no whiteouts
    if below is not None:
        assert below.children is not None
        for name in below.children:
            if name not in m.children:
                items.append((WHITEOUT_PREFIX + name, None))
                st.whiteouts += 1
    items.extend(m.children.items())
    items.sort(key=lambda it: it[0])
    for name, node in items:
        kid = below.children.get(name) if below is not None and below.children else None
        yield prefix + name, node, kid, m


def squashed_tar(full: Merge, kept: Merge, keep: int, data: DataOpener,
                 stats: SquashStats | None = None) -> Iterator[bytes]:
    """The squashed layer as tar bytes, depth first in byte order. `full` merged every
    layer, `kept` the first `keep`; the entries must have been read with their headers."""
    st = stats if stats is not None else SquashStats()
    carriers: dict[int, bytes] = {}  # id(group) -> the output name holding its data
    stack = [_items(full.root, kept.root, keep, full.root, st)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        path, node, kid, parent = item
        if node is None:
            yield _marker(path, parent)
            continue
        if node.layer >= keep:
            if node.children is not None:
                # A dir a squashed layer made implicitly (for a path below it) is written
                # as its applier made it, 0755 and root's: it shadows what is below it,
                # and it must exist even when nothing is left in it.
                yield (_renamed(_header(node.entry), path + b"/") if node.entry is not None
                       else encode_header(TarEntry(name=path + b"/", type=DIR, mode=0o755)))
                st.entries += 1
            else:
                yield from _non_dir(node, path, carriers, data, st)
        # (a non-dir or a dir from the kept layers: nothing to write)
        if node.children is not None:
            stack.append(_items(node, kid, keep, full.root, st))
    yield END_OF_ARCHIVE


def _header(e: Entry) -> TarEntry:
    """The entry's header, parsed from its header bytes when it was read from tar-split."""
    if e.header is None:
        if not e.raw:
            raise ValueError("squash needs the entries read with their headers")
        t = next(iter(TarReader(io.BytesIO(e.raw))), None)
        if t is None:
            raise ValueError(f"'{e.shown}': its header bytes hold no entry")
        e.header = t
    return e.header


def _renamed(t: TarEntry, name: bytes, **changes: object) -> bytes:
    """`t`'s own header bytes when its name is `name` already (sub-second times, PAX
    records and all), else the header written anew under the new name."""
    if not changes and _same_name(t.name, name):
        return t.raw
    return encode_header(dataclasses.replace(t, name=name, raw=b"", **changes),  # type: ignore[arg-type]
                         exact_mtime=True)


def _same_name(raw_name: bytes, name: bytes) -> bool:
    strip = [p for p in raw_name.split(b"/") if p not in (b"", b".")]
    return b"/".join(strip) == name.rstrip(b"/")


def _marker(name: bytes, parent: Node) -> bytes:
    """A whiteout or opaque marker owned like its dir (moby: mode 0600, or the dir's
    permission bits for an opaque marker)."""
    uid = gid = 0
    mode = 0o600
    if parent.entry is not None:
        t = _header(parent.entry)
        uid, gid = t.uid, t.gid
        if name.endswith(OPAQUE_MARKER):
            mode = t.mode & 0o777
    return encode_header(TarEntry(name=name, type=REG, mode=mode, uid=uid, gid=gid))


def _non_dir(node: Node, name: bytes, carriers: dict[int, bytes], data: DataOpener,
             st: SquashStats) -> Iterator[bytes]:
    g: Group | None = node.group
    assert g is not None and node.entry is not None
    first = carriers.get(id(g))
    if first is not None:  # a later name of an inode already written: a link to it
        t = _header(node.entry)
        st.hardlinks += 1
        yield _renamed(t, name, type=LNK, linkname=first, size=0) if (
            t.type != LNK or t.linkname != first) else _renamed(t, name)
        return
    carriers[id(g)] = name
    holder = _header(g.entry)
    st.entries += 1
    if node.entry is g.entry:
        yield _renamed(holder, name)
    else:  # the name that held the data is hidden (or sorts later): this one holds it
        yield encode_header(dataclasses.replace(holder, name=name, raw=b""), exact_mtime=True)
    if g.entry.kind != FILE_KIND or not holder.size:
        return
    left = holder.size
    for chunk in data(g.layer, g.entry):
        left -= len(chunk)
        if left < 0:
            break
        yield chunk
    if left:
        raise OCILayersError(f"'{g.entry.shown}' of layer {g.layer + 1}: its data is "
                             f"{'longer' if left < 0 else 'shorter'} than its header says")
    st.bytes += holder.size
    if holder.size % BLOCK:
        yield b"\0" * (BLOCK - holder.size % BLOCK)
