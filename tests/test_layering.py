"""The index package's layering: search happens behind one interface, in one file per engine."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "edgevpr"
INDEX = ROOT / "deploy" / "index"
BACKENDS = INDEX / "backends"
ENGINES = ("faiss", "qdrant_edge", "qdrant_client")


def _imports(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return out


def test_no_module_outside_the_index_package_imports_a_backend_or_an_engine():
    backend_imports, engine_imports = [], []
    for path in ROOT.rglob("*.py"):
        names = _imports(path)
        if INDEX not in path.parents:
            backend_imports += [f"{path.relative_to(ROOT)}: {n}" for n in names
                                if n.startswith("edgevpr.deploy.index.backends")]
        if (ROOT / "deploy") in path.parents and BACKENDS not in path.parents:
            engine_imports += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ENGINES]
    assert not backend_imports, backend_imports
    assert not engine_imports, engine_imports  # the deployment side reaches FAISS and Qdrant only through a backend


def test_the_layering_check_sees_relative_and_absolute_imports(tmp_path):
    """The check above would catch a violation written either way (checked on the parser it relies on)."""
    mod = ROOT / "deploy" / "localize.py"
    tree = _imports(mod)
    assert "edgevpr.deploy.index" in tree  # ``from .index import ...`` resolved to its absolute name
    fake = ROOT / "deploy" / "_layering_probe.py"
    try:
        fake.write_text("from .index.backends import faiss_kinds\nimport faiss\n")
        names = _imports(fake)
        assert "edgevpr.deploy.index.backends.faiss_kinds" in names and "faiss" in names
    finally:
        fake.unlink()


def _index_graph() -> dict[str, set[str]]:
    """Module -> the index-package modules it imports (module level and lazy; a name imported from a module counts
    as that module), e.g. 'store' -> {'backends', 'rows'}. The package's ``__init__`` (its front door, re-exporting
    everything) is left out."""
    prefix = "edgevpr.deploy.index."
    modules = {".".join(p.relative_to(INDEX).with_suffix("").parts).removesuffix(".__init__")
               for p in INDEX.rglob("*.py")} - {"__init__"}
    graph = {}
    for path in INDEX.rglob("*.py"):
        name = ".".join(path.relative_to(INDEX).with_suffix("").parts).removesuffix(".__init__")
        if name == "__init__":
            continue
        deps = set()
        for n in _imports(path):
            if n.startswith(prefix):
                parts = n[len(prefix):].split(".")
                deps |= {next((m for m in (".".join(parts[:2]), parts[0]) if m in modules), parts[0])}
        graph[name] = deps - {name}
    return graph


def test_the_index_package_has_no_import_circle_and_backends_never_import_back():
    """The engines (backends/) stand below the row store: they import ``rows`` only, never ``store``, ``ops`` or
    ``place_index``; and the package's module graph has no circle."""
    graph = _index_graph()
    back = [f"{m} -> {n}" for m, deps in graph.items() if m.startswith("backends")
            for n in deps if n in ("store", "ops", "place_index")]
    assert not back, back

    def reach(start: str, seen: set[str]) -> bool:  # True when ``start`` leads back to a module on the path
        return any(n in seen or reach(n, seen | {n}) for n in graph[start])

    circles = [m for m in graph if reach(m, {m})]
    assert not circles, {m: graph[m] for m in circles}
    # the graph sees real imports, lazy ones included
    assert graph["backends.faiss_kinds"] == {"rows", "backends.base"} and "backends" in graph["store"]
    assert {"backends.faiss_kinds", "backends.qdrant_edge", "backends.qdrant_server"} <= graph["backends"]
