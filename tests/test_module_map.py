"""The module map (README "Layout"): every import inside the package points down a level or
stays on its own, and no two modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ocilayers"

LEVELS: dict[str, int] = {
    "errors": 0, "spec": 0, "whiteout": 0,
    "changes": 0,
    "streams": 1, "tarstream": 1, "tarsplit": 1, "fsutil": 1, "forking": 1,
    "httpclient": 1, "credentials": 1, "userns": 1, "overrides": 1, "dirfds": 1,
    "extract": 2, "initlayer": 2, "differ": 2, "verify": 2, "cas": 2, "sources": 2, "mount": 2,
    "layerscan": 2, "scancache": 2, "growth": 2, "squashtar": 2, "registry": 2, "remote": 2,
    "filewriters": 2, "markers": 2,
    "transports": 3,
    "builder": 3, "writer": 3, "store": 3, "bundle": 3,
    "unpack": 4, "commit": 4, "run": 4, "append": 4, "lifecycle": 4, "export": 4,
    "flatten": 4, "pack": 4, "view": 4, "lookup": 4,
    "history": 4, "squash": 4, "push": 4,
    "api": 5, "shapes": 5, "texts": 5,
    "cli": 6, "__main__": 6, "__init__": 0,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _room(module: str) -> str:
    """The map's name for a module: `store.layers` belongs to `store`."""
    return module.split(".", 1)[0]


def _imports(path: Path) -> set[str]:
    """Every ocilayers module `path` imports (at any depth of the file), without the prefix."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "ocilayers" or node.module.startswith("ocilayers.")):
            base = node.module[len("ocilayers."):] if node.module != "ocilayers" else ""
            if base:
                out.add(base)
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ocilayers."):
                    out.add(a.name[len("ocilayers."):])
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_on_the_map() -> None:
    missing = sorted(m for m in MODULES if _room(m) not in LEVELS)
    assert not missing, f"add these modules to the map (README Layout and LEVELS): {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    if module == "__init__":
        return  # the package's own __init__ holds only the version
    level = LEVELS[_room(module)]
    upward = sorted(imp for imp in _imports(MODULES[module])
                    if _room(imp) in LEVELS and _room(imp) != _room(module)
                    and LEVELS[_room(imp)] > level)
    assert not upward, f"{module} (level {level}) imports upward: {upward}"


def test_no_import_cycles_between_rooms() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        graph.setdefault(_room(module), set()).update(
            _room(i) for i in _imports(path) if _room(i) != _room(module))
    seen: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in seen:
                visit(nxt, [*stack, node])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [])
