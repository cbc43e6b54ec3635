"""Why images grow: the layers' entries merged base first, as overlayfs stacks them, with the
bytes of every file that a later layer hides counted against the layer that added it.

A file in layer i is hidden when a later layer has an entry at its path, whiteouts it or a
dir above it, marks a dir above it opaque, or puts a non-dir where a dir above it was. Bytes
are regular-file sizes; a hardlink carries none unless the name that held the data is hidden
and the link survives (the bytes belong to the inode, which is wasted only when every name
of it is hidden). "Unchanged" rewrites are files a later layer wrote again with the same
size and content (CRC-64): a `chmod -R` layer.

`Merge` is also the model `squash` writes its merged layer from. `dive_figures` computes
dive's own efficiency figures (filetree/efficiency.go, image/analysis.go), quirks and all,
so that CI thresholds carry over."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ocilayers.errors import TarError
from ocilayers.layerscan import (
    DIR_KIND,
    FILE_KIND,
    HARDLINK_KIND,
    OPAQUE_KIND,
    WHITEOUT_KIND,
    Entry,
)


@dataclass(slots=True, eq=False)
class Group:
    """One inode of a layer: the entry that holds it (a file, a symlink, a device) and the
    names it has there (its own and its hardlinks', in tar order)."""

    layer: int
    entry: Entry
    size: int  # data bytes (regular files; 0 for the rest)
    names: list[Node] = field(default_factory=list)
    alive: int = 0
    hidden_by: int = -1  # the layer that hid its last name
    rewritten_by: int = -1  # a later layer that wrote it again with the same content

    @property
    def unchanged(self) -> bool:
        """Wasted by a rewrite with the same content (a `chmod -R`)."""
        return self.rewritten_by >= 0


@dataclass(slots=True, eq=False)
class Node:
    """A path of the merged view. `entry` None: a dir made implicitly for a path below it.
    `children` None: not a dir. `cut`: the layer from which a dir's content starts (an
    opaque marker, or the dir made anew over a whiteout or a non-dir)."""

    name: bytes
    parent: Node | None
    entry: Entry | None
    layer: int
    group: Group | None = None
    children: dict[bytes, Node] | None = None
    cut: int = 0

    @property
    def path(self) -> bytes:
        parts = []
        n: Node | None = self
        while n is not None and n.parent is not None:
            parts.append(n.name)
            n = n.parent
        return b"/".join(reversed(parts))


@dataclass
class LayerFigures:
    """One layer's figures. Bytes are regular-file data bytes."""

    entries: int = 0  # content entries (not whiteouts or opaque markers)
    added: int = 0  # new to the image
    changed: int = 0  # shadowing a lower entry
    whiteouts: int = 0
    opaques: int = 0
    stored_bytes: int = 0
    wasted_bytes: int = 0  # of this layer's files, hidden by later layers
    unchanged_rewrite_bytes: int = 0  # of those, hidden by an identical rewrite
    rewrote_unchanged_bytes: int = 0  # lower files this layer wrote again, unchanged


class Merge:
    """The merged view of layers applied base first with `apply`; the figures of every
    layer so far in `layers`."""

    def __init__(self) -> None:
        self.root = Node(b"", None, None, -1, None, {}, 0)
        self.layers: list[LayerFigures] = []
        self.groups: list[Group] = []

    # -- paths --

    def find(self, path: bytes) -> Node | None:
        node = self.root
        for part in path.split(b"/"):
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _parent_dir(self, path: bytes, layer: int) -> tuple[Node, bytes]:
        """The dir node `path` goes in (made implicitly where missing, or where a lower
        non-dir is in the way), and its last component."""
        node = self.root
        *dirs, name = path.split(b"/")
        for part in dirs:
            assert node.children is not None
            child = node.children.get(part)
            if child is None or child.children is None:
                if child is not None:
                    self._hide(child, layer)
                child = Node(part, node, None, layer, None, {}, layer)
                node.children[part] = child
            elif child.layer != layer:
                # The layer makes the dir implicitly (its applier does: mode 0755, root),
                # and a top-most dir shows its own owner and mode: the lower entry is
                # shadowed, the contents merge.
                child.entry, child.layer = None, layer
            node = child
        return node, name

    # -- hiding --

    def _hide(self, node: Node, layer: int, unchanged: bool = False,
              gone: set[bytes] | None = None, path: bytes = b"") -> None:
        """`node` and everything below it are hidden by `layer`; `gone` collects their
        paths (`path` is the node's)."""
        if unchanged and node.group is not None and node.group.rewritten_by < 0:
            node.group.rewritten_by = layer
        todo = [(node, path)]
        while todo:
            n, p = todo.pop()
            if gone is not None:
                gone.add(p)
            g = n.group
            if g is not None:
                g.alive -= 1
                if g.alive == 0:
                    g.hidden_by = layer
            if n.children:
                todo.extend((c, p + b"/" + name) for name, c in n.children.items())

    def _cut(self, node: Node, layer: int, gone: set[bytes], path: bytes) -> None:
        """An opaque dir: what lower layers have in it is hidden."""
        assert node.children is not None
        for name, child in node.children.items():
            self._hide(child, layer, gone=gone, path=path + b"/" + name)
        node.children = {}
        node.cut = layer

    # -- layers --

    def apply(self, entries: Sequence[Entry]) -> LayerFigures:
        """Stack one more layer. Its whiteouts and opaque markers act on the layers below
        only, whatever their place in the tar, so they go first."""
        i = len(self.layers)
        fig = LayerFigures()
        self.layers.append(fig)
        gone: set[bytes] = set()  # lower paths this layer deleted: re-made, they are "changed"
        for e in entries:
            if e.kind == WHITEOUT_KIND:
                fig.whiteouts += 1
                node = self.find(e.path)
                if node is not None:
                    self._hide(node, i, gone=gone, path=e.path)
                    assert node.parent is not None and node.parent.children is not None
                    del node.parent.children[node.name]
            elif e.kind == OPAQUE_KIND:
                fig.opaques += 1
                if not e.path:
                    continue  # overlayfs ignores an opaque layer root
                node = self.find(e.path)
                if node is not None and node.children is not None:
                    self._cut(node, i, gone, e.path)
        links: dict[bytes, Group] = {}
        # The dir the last entry went in: a tar lists a dir's entries together, so most
        # entries need no walk from the root. Forgotten whenever something is hidden.
        last_dir: bytes | None = None
        last: Node = self.root
        for e in entries:
            kind = e.kind
            if kind in (WHITEOUT_KIND, OPAQUE_KIND):
                continue
            fig.entries += 1
            up, _, name = e.path.rpartition(b"/")
            if up == last_dir:
                parent = last
            else:
                parent, name = self._parent_dir(e.path, i)
                last_dir, last = up, parent
            children = parent.children
            assert children is not None
            old = children.get(name)
            if old is None and (not gone or e.path not in gone):
                fig.added += 1
            else:
                fig.changed += 1
            if kind == DIR_KIND:
                if old is not None and old.children is not None:
                    old.entry, old.layer = e, i  # a dir over a dir: their contents merge
                    continue
                if old is not None:
                    self._hide(old, i)
                    last_dir = None
                children[name] = Node(name, parent, e, i, None, {}, i)
                continue
            if e.kind == HARDLINK_KIND:
                g = links.get(e.link)
                if g is None:
                    raise TarError(f"layer {i + 1}: hardlink '{e.shown}' to '/"
                                   f"{e.link.decode('utf-8', 'backslashreplace')}', which is "
                                   "not earlier in the layer")
            else:
                g = Group(i, e, e.size if e.kind == FILE_KIND else 0)
                self.groups.append(g)
                fig.stored_bytes += g.size
            links[e.path] = g
            if old is not None:
                og = old.group
                same = (og is not None and og.entry.kind == FILE_KIND
                        and g.entry.kind == FILE_KIND and og.size == g.size
                        and og.entry.crc == g.entry.crc)
                self._hide(old, i, unchanged=same)
                last_dir = None
            node = Node(name, parent, e, i, g)
            g.names.append(node)
            g.alive += 1
            children[name] = node
        return fig

    def finish(self) -> None:
        """Count every hidden inode against the layer that added it."""
        for fig in self.layers:
            fig.wasted_bytes = fig.unchanged_rewrite_bytes = fig.rewrote_unchanged_bytes = 0
        for g in self.groups:
            if g.alive == 0 and g.size:
                fig = self.layers[g.layer]
                fig.wasted_bytes += g.size
                if g.rewritten_by >= 0:
                    fig.unchanged_rewrite_bytes += g.size
                    self.layers[g.rewritten_by].rewrote_unchanged_bytes += g.size

    # -- results --

    def walk(self) -> Iterator[Node]:
        """Every node of the merged view, parents first, names in byte order."""
        todo = [self.root]
        while todo:
            n = todo.pop()
            if n is not self.root:
                yield n
            if n.children:
                todo.extend(n.children[k] for k in sorted(n.children, reverse=True))

    def wasted(self) -> list[Group]:
        """The hidden inodes, largest first."""
        out = [g for g in self.groups if g.alive == 0 and g.size]
        out.sort(key=lambda g: (-g.size, g.layer, g.entry.path))
        return out

    @property
    def stored_bytes(self) -> int:
        return sum(f.stored_bytes for f in self.layers)

    @property
    def merged_bytes(self) -> int:
        return sum(g.size for g in self.groups if g.alive)


# --- dive's figures ---

@dataclass(frozen=True)
class DiveFigures:
    efficiency: float
    wasted_bytes: int
    user_wasted_percent: float  # inf when every layer but the first is empty but bytes waste


class _DiveDir:
    __slots__ = ("children", "is_dir", "path", "size")

    def __init__(self, path: bytes, size: int, is_dir: bool) -> None:
        self.path = path
        self.size = size
        self.is_dir = is_dir
        self.children: dict[bytes, _DiveDir] = {}


class _DiveStack:
    """dive's stacked tree of the layers so far, with an index by path."""

    def __init__(self) -> None:
        self.root = _DiveDir(b"", 0, True)
        self.index: dict[bytes, _DiveDir] = {b"": self.root}

    def subtree_size(self, path: bytes) -> int:
        """The summed sizes of a dir and everything below it; 0 for a non-dir or nothing."""
        node = self.index.get(path)
        if node is None or not node.is_dir:
            return 0
        total = 0
        todo = [node]
        while todo:
            n = todo.pop()
            total += n.size
            todo.extend(n.children.values())
        return total

    def remove(self, path: bytes) -> None:
        node = self.index.get(path)
        if node is None or not path:
            return
        parent = self.index[path.rpartition(b"/")[0]]
        del parent.children[path.rpartition(b"/")[2]]
        todo = [node]
        while todo:
            n = todo.pop()
            del self.index[n.path]
            todo.extend(n.children.values())

    def add(self, path: bytes, size: int, is_dir: bool) -> None:
        have = self.index.get(path)
        if have is not None:  # dive's AddPath: the node's data changes, its children stay
            have.size, have.is_dir = size, is_dir
            return
        up, _, name = path.rpartition(b"/")
        parent = self.index.get(up)
        if parent is None:
            self.add(up, 0, True)
            parent = self.index[up]
        node = parent.children[name] = _DiveDir(path, size, is_dir)
        self.index[path] = node


def dive_figures(layers: Sequence[Sequence[Entry]]) -> DiveFigures:
    """dive's image efficiency, wasted bytes and user wasted percent, by its own rules:
    only leaf nodes of each layer's tree count (files, symlinks, empty dirs, whiteouts); an
    entry's size is its header's; a whiteout of a file counts 0 at its path, one of a dir
    the size of that dir's subtree in the stacked layers below; opaque markers are dropped;
    efficiency = sum of each path's smallest size / sum of its sizes (1.0 with no bytes);
    wasted = the summed sizes of every path met in two layers or more (the survivor too);
    user wasted percent = wasted / the size of every layer but the first."""
    stack = _DiveStack()
    eff: dict[bytes, list[int]] = {}  # path -> [cumulative size, smallest size, count]
    layer_sizes: list[int] = []
    for entries in layers:
        nodes: dict[bytes, tuple[int, bool, bool]] = {}  # path -> (size, whiteout, is_dir)
        parents: set[bytes] = set()
        total = 0
        for e in entries:
            total += e.size
            if e.kind == OPAQUE_KIND:
                path = e.path  # dropped, but the dirs above the marker are made
                if not path:
                    continue
                nodes.setdefault(path, (0, False, True))
            else:
                path = e.path
                if e.kind == WHITEOUT_KIND:
                    old = nodes.get(path)
                    if old is None or old[1]:
                        nodes[path] = (0, True, False)
                else:
                    nodes[path] = (e.size, False, e.kind == DIR_KIND)
            up = path.rpartition(b"/")[0]
            while up and up not in parents:
                parents.add(up)
                nodes.setdefault(up, (0, False, True))
                up = up.rpartition(b"/")[0]
        layer_sizes.append(total)
        for path, (size, whiteout, _is_dir) in nodes.items():
            if path in parents:
                continue  # not a leaf
            if whiteout:
                size = stack.subtree_size(path)
            rec = eff.get(path)
            if rec is None:
                eff[path] = [size, size, 1]
            else:
                rec[0] += size
                if size < rec[1]:
                    rec[1] = size
                rec[2] += 1
        for path in sorted(nodes):  # the layer onto the stack: whiteouts remove, others add
            size, whiteout, is_dir = nodes[path]
            if whiteout:
                stack.remove(path)
            else:
                stack.add(path, size, is_dir)
    cumulative = sum(r[0] for r in eff.values())
    smallest = sum(r[1] for r in eff.values())
    efficiency = 1.0 if cumulative == 0 else smallest / cumulative
    wasted = sum(r[0] for r in eff.values() if r[2] >= 2)
    user = sum(layer_sizes[1:])
    if len(layer_sizes) <= 1:
        percent = 0.0
    elif user == 0:
        percent = 0.0 if wasted == 0 else float("inf")
    else:
        percent = wasted / user
    return DiveFigures(efficiency, wasted, percent)


# --- the CI gate ---

@dataclass(frozen=True)
class GateResult:
    rule: str
    figure: float
    threshold: float
    passed: bool


def check_gate(*, efficiency: float, wasted_bytes: int, user_wasted_percent: float,
               lowest_efficiency: float | None = 0.9,
               highest_wasted_bytes: int | None = None,
               highest_user_wasted_percent: float | None = 0.1) -> list[GateResult]:
    """dive's CI rules (`.dive-ci`), with its names and defaults; None disables a rule."""
    out = []
    if lowest_efficiency is not None:
        out.append(GateResult("lowestEfficiency", efficiency, lowest_efficiency,
                              efficiency >= lowest_efficiency))
    if highest_wasted_bytes is not None:
        out.append(GateResult("highestWastedBytes", wasted_bytes, highest_wasted_bytes,
                              wasted_bytes <= highest_wasted_bytes))
    if highest_user_wasted_percent is not None:
        out.append(GateResult("highestUserWastedPercent", user_wasted_percent,
                              highest_user_wasted_percent,
                              user_wasted_percent <= highest_user_wasted_percent))
    return out
