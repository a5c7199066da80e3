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
