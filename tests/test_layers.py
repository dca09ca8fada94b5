"""The package's floor plan holds: no module imports from a layer above its own, no import cycle, no private name
imported from another module. Every ``import`` statement is read, those inside functions included."""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent

# Floors from the bottom: each may import its own floor and the ones below it. The engine (every floor but the
# last) never imports the long-tailed application; ``iaerf.__main__`` is the command's entry point above them all.
FLOORS = ("iaerf.core", "iaerf.ops", "iaerf.hessian", "iaerf.influence", "iaerf.groundtruth", "iaerf.longtail")
ENTRY_POINTS = {"iaerf", "iaerf.__main__"}


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file of the ``iaerf`` package under ``root``."""
    out = {}
    for path in sorted((root / "iaerf").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(root: pathlib.Path) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the iaerf modules it imports, ["module imports name from other"] for private names)."""
    mods = modules(root)
    native = {"iaerf._C"}  # the compiled extension setup.py builds: a module, not a private name
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(head + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in mods:          # a submodule
                        edges[mod].add(f"{base}.{alias.name}")
                    elif f"{base}.{alias.name}" in native:
                        continue
                    elif base in mods:
                        edges[mod].add(base)
                        if alias.name.startswith("_") and base != mod:
                            private.append(f"{mod} imports {alias.name} from {base}")
    for mod in edges:
        edges[mod].discard(mod)
    return edges, private


def floor(mod: str) -> int | None:
    for i, prefix in enumerate(FLOORS):
        if mod == prefix or mod.startswith(prefix + "."):
            return i
    return None


def upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in edges.items():
        if mod in ENTRY_POINTS:
            continue
        own = floor(mod)
        if own is None:
            bad.append(f"{mod} sits on no floor (add its package to FLOORS)")
            continue
        bad += [f"{mod} (floor {FLOORS[own]}) imports {t} (floor {FLOORS[floor(t)]})" for t in sorted(targets)
                if t not in ENTRY_POINTS and floor(t) is not None and floor(t) > own]
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def repo_imports() -> tuple[dict[str, set[str]], list[str]]:
    edges, private = imports(REPO)
    assert {"iaerf.core.io", "iaerf.hessian.inverse", "iaerf.longtail.pipeline.run"} <= set(edges), \
        "the package was not found where the test looks for it"
    return edges, private


def test_no_import_runs_up_a_floor():
    assert upward(repo_imports()[0]) == []


def test_no_import_cycle():
    assert cycles(repo_imports()[0]) == []


def test_no_private_name_is_imported_from_another_module():
    assert repo_imports()[1] == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """A tree with an engine module importing the application (inside a function), a cycle through a relative
    import and a private name: each check reports it."""
    files = {
        "iaerf/__init__.py": "",
        "iaerf/core/__init__.py": "",
        "iaerf/core/io.py": "def f():\n    from iaerf.longtail.data import load\n",
        "iaerf/hessian/__init__.py": "",
        "iaerf/hessian/a.py": "from .b import _helper\n",
        "iaerf/hessian/b.py": "import iaerf.hessian.a\n",
        "iaerf/longtail/__init__.py": "",
        "iaerf/longtail/data.py": "def load():\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges, private = imports(tmp_path)
    assert upward(edges) == ["iaerf.core.io (floor iaerf.core) imports iaerf.longtail.data (floor iaerf.longtail)"]
    assert cycles(edges) == [["iaerf.hessian.a", "iaerf.hessian.b"]]
    assert private == ["iaerf.hessian.a imports _helper from iaerf.hessian.b"]
