"""The package's shape, read from its source: no import circle, no import from a lower layer up, no
private name imported from another module, and no module left at the top level that belongs in a
package. Every import counts: the ones inside functions, ``importlib.import_module("dptune...")``
with a literal name, and the package ``__init__`` files an import runs on its way to a module."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
# lowest first; a module may import its own layer and the ones below, never one above. An entry
# covers a module and everything under it; the longest entry that covers a module decides.
LAYERS = [
    {"dptune", "dptune.errors", "dptune.cores", "dptune.labels", "dptune.preprocessing"},  # "dptune": its __init__ only
    {"dptune.models", "dptune.data", "dptune.losses", "dptune.metrics"},
    {"dptune.tasks", "dptune.inference", "dptune.inference.windows"},  # inference/__init__ imports nothing
    {"dptune.training"},
    {"dptune.inference.loading", "dptune.inference.predictor", "dptune.inference.depth_predictor", "dptune.export"},
    {"dptune.cli"},
    {"dptune.tools"},  # nothing below imports a tool
    {"dptune.command"},
]
TOP_LEVEL = {"__init__", "errors", "cores", "preprocessing", "cli", "command"}  # the rest sits in packages


def modules(root: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _private(dotted: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in dotted.split("."))


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the modules of ``mods`` it imports (with the packages that import runs through);
    and every private name or private module imported, or read off an imported module, across modules."""
    edges: dict[str, set[str]] = defaultdict(set)
    private = []

    def add(name: str, target: str) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            hit = ".".join(parts[:i])
            if hit in mods and hit != name and not name.startswith(hit + "."):
                edges[name].add(hit)

    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        aliases: dict[str, str] = {}  # local name -> the module it is bound to
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if _private(base):
                    private.append(f"{name}: from {base} import ...")
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and base != name:
                        private.append(f"{name}: from {base} import {alias.name}")
                    target = f"{base}.{alias.name}"
                    add(name, target if target in mods else base)
                    if target in mods:
                        aliases[alias.asname or alias.name] = target
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _private(alias.name):
                        private.append(f"{name}: import {alias.name}")
                    add(name, alias.name)
                    if alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if (called == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                        and isinstance(node.args[0].value, str)):
                    add(name, node.args[0].value)
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != name):
                private.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return edges, private


def layer(name: str) -> int:
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            covers = name == prefix or (prefix != "dptune" and name.startswith(prefix + "."))
            if covers and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer of tests/test_layout.py: give it one"
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


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a in sorted(edges) for b in sorted(edges[a]) if layer(b) > layer(a)]


def test_no_import_circle():
    mods = modules()
    edges, _ = imports(mods)
    assert cycles(edges, sorted(mods)) == []


def test_no_import_from_a_lower_layer_up():
    mods = modules()
    assert [m for m in mods if layer(m) is None] == []
    edges, _ = imports(mods)
    assert upward(edges) == []


def test_no_private_name_imported_from_another_module():
    _, private = imports(modules())
    assert private == []


def test_top_level_modules_are_entry_points_and_foundations_only():
    top = {p.stem for p in (SRC / "dptune").glob("*.py")}
    assert top <= TOP_LEVEL, f"belong in a package: {sorted(top - TOP_LEVEL)}"


def test_the_checker_finds_what_is_planted(tmp_path):
    """The checks above are only as good as the import reading: planted faults are found."""
    pkg = tmp_path / "dptune"
    files = {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/build.py": "def f():\n    from dptune.tasks.base import X\n",  # upward, inside a function
        "tasks/__init__.py": "from dptune.tasks.lazy import Y\n",
        "tasks/lazy.py": "import importlib\nm = importlib.import_module('dptune.tools.predict')\n",  # by string
        "tasks/base.py": "from dptune.models import build\nfrom jsonargparse._typehints import A\n",
        "tools/__init__.py": "",
        "tools/predict.py": "import dptune.models.build as b\nb._hidden()\n",
        "cli.py": "from dptune.inference.windows import w\n",  # runs inference/__init__
        "inference/__init__.py": "def __getattr__(n):\n    from dptune.inference.predictor import P\n",
        "inference/windows.py": "",
        "inference/predictor.py": "from dptune.cli import main\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    edges, private = imports(modules(tmp_path))
    assert "dptune.models.build -> dptune.tasks" in upward(edges)  # via the package __init__ it runs
    assert "dptune.models.build -> dptune.tasks.base" in upward(edges)
    assert "dptune.tasks.lazy -> dptune.tools.predict" in upward(edges)
    assert "dptune.inference.predictor -> dptune.cli" in upward(edges)
    assert ["dptune.cli", "dptune.inference", "dptune.inference.predictor"] in cycles(edges, sorted(edges))
    assert "dptune.tasks.base: from jsonargparse._typehints import ..." in private
    assert "dptune.tools.predict: dptune.models.build._hidden" in private
