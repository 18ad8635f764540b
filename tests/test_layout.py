"""The package's shape, read from its source: no import circle, no import from a lower layer up, no
private name imported from another module, and no module left at the top level that belongs in a
package. Every import counts, the ones inside functions too: a circle hidden in a function still
ties the modules together."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
# lowest first; a module may import its own layer and the ones below, never one above
LAYERS = [
    {"dptune.errors", "dptune.labels", "dptune.preprocessing"},
    {"dptune.models", "dptune.data", "dptune.losses", "dptune.metrics"},
    {"dptune.tasks", "dptune.inference.windows"},
    {"dptune.training"},
    {"dptune.inference", "dptune.export"},
    {"dptune.tools", "dptune.cli"},  # a tool may read the training CLI (the configuration reference)
    {"dptune.command", "dptune"},
]
TOP_LEVEL = {"__init__", "errors", "preprocessing", "cli", "command"}  # the rest sits in packages


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "dptune").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the dptune modules it imports; and every private name imported across modules."""
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and base != name:
                        private.append(f"{name}: from {base} import {alias.name}")
                    target = f"{base}.{alias.name}"
                    hit = target if target in mods else base
                    if hit in mods and hit != name:
                        edges[name].add(hit)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.name != name:
                        edges[name].add(alias.name)
    return edges, private


def layer(name: str) -> int:
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer of tests/test_layout.py"
    return best[0]


def cycles(edges: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    mods = modules()
    edges, _ = imports(mods)
    assert cycles(edges, sorted(mods)) == []


def test_no_import_from_a_lower_layer_up():
    mods = modules()
    edges, _ = imports(mods)
    upward = [f"{a} -> {b}" for a in sorted(edges) for b in sorted(edges[a])
              if layer(b) > layer(a) and not b.startswith(a + ".")]  # a package may re-export its modules
    assert upward == []


def test_no_private_name_imported_from_another_module():
    _, private = imports(modules())
    assert private == []


def test_top_level_modules_are_entry_points_and_foundations_only():
    top = {p.stem for p in (SRC / "dptune").glob("*.py")}
    assert top <= TOP_LEVEL, f"belong in a package: {sorted(top - TOP_LEVEL)}"


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The checks above are only as good as the import reading: a planted circle is found."""
    edges = {"dptune.a": {"dptune.b"}, "dptune.b": {"dptune.c"}, "dptune.c": {"dptune.a"}, "dptune.d": {"dptune.a"}}
    assert cycles(edges, sorted(set(edges))) == [["dptune.a", "dptune.b", "dptune.c"]]
    assert layer("dptune.models.build") < layer("dptune.tasks.base") < layer("dptune.tools.predict")
    assert layer("dptune.inference.windows") < layer("dptune.inference.predictor")
