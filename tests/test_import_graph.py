"""No module under cxr/ imports a module that imports it back (lazily inside a function or not): each pair of
modules depends one way, so a stage can be read, tested and moved without dragging its neighbour along."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "cxr").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of cxr that `name` imports anywhere in its source (`from pkg import mod` counts as mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            out.update(submodules or {base})
    return {m for m in out if m in known and m != name}


def test_no_module_imports_a_module_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # a package's __init__ importing its own submodule is how a package offers its names, not a circle
    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                      if a in graph.get(b, ()) and not (b.startswith(a + ".") or a.startswith(b + "."))})
    assert circles == []


def test_the_check_sees_a_circle(tmp_path):
    """The import reader on two modules that import each other lazily: the check above can fail."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from cxr.x import b\n")
    b.write_text("from cxr.x.a import f\n")
    known = {"cxr.x.a", "cxr.x.b", "cxr.x"}
    assert _imports("cxr.x.a", a, known) == {"cxr.x.b"} and _imports("cxr.x.b", b, known) == {"cxr.x.a"}
