"""The package's layers point one way and nothing imports in a circle.

errors <- kernels <- ir <- pipeline <- passes <- training <- cli <- the ``chop`` facade: a module
may import from its own layer and the layers before it, never after. Every import statement
counts, including those inside functions (a lazy import against the direction is still a design
bug); only ``if TYPE_CHECKING:`` blocks are exempt. The pass library lives in the repository's
``passes/`` folder and is the package ``chop.passes``; nothing named ``passes`` is installed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["chop.errors", "chop.kernels", "chop.ir", "chop.pipeline", "chop.passes",
          "chop.training", "chop.cli", "chop"]


def module_name(path: Path) -> str:
    """The dotted name a source file is imported as."""
    if path.is_relative_to(ROOT / "passes"):
        parts = ["chop", "passes", *path.relative_to(ROOT / "passes").with_suffix("").parts]
    else:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """Index in LAYERS of the longest layer prefix of ``module``."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS.index(best)


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(path: Path, name: str) -> set[str]:
    """The chop modules ``path`` imports (``from chop.x import y`` counts as chop.x.y when that
    is a module, else chop.x)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "chop")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] == "chop":
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


FILES = sorted([*(ROOT / "chop").rglob("*.py"), *(ROOT / "passes").rglob("*.py")])
MODULES = {module_name(p): p for p in FILES}
GRAPH = nx.DiGraph()
for _name, _path in MODULES.items():
    GRAPH.add_node(_name)
    for _target in imports(_path, _name):
        if _target in MODULES and _target != _name:
            GRAPH.add_edge(_name, _target)


def test_every_module_belongs_to_a_layer():
    assert {layer(m) for m in MODULES} == set(range(len(LAYERS)))


def test_imports_point_down_the_layers():
    upward = [f"{a} (layer {LAYERS[layer(a)]}) imports {b} (layer {LAYERS[layer(b)]})"
              for a, b in GRAPH.edges if layer(b) > layer(a)]
    assert upward == []


def test_no_import_cycles():
    cycles = sorted(sorted(c) for c in nx.simple_cycles(GRAPH))
    assert cycles == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The scanner itself: a planted upward import and a planted cycle are both found."""
    graph = GRAPH.copy()
    graph.add_edge("chop.ir.graph", "chop.cli.main")
    assert any(layer(b) > layer(a) for a, b in graph.edges)
    graph.add_edge("chop.ir.meta", "chop.ir.graph")  # graph already imports meta
    assert list(nx.simple_cycles(graph))


@pytest.mark.parametrize("source,expected", [
    ("from chop.cli.main import main\n", {"chop.cli.main"}),
    ("def f():\n    from chop.pipeline import registry\n", {"chop.pipeline.registry"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from chop.cli import main\n", set()),
    ("from ...ir import meta\n", {"chop.ir.meta"}),
])
def test_import_scanner(tmp_path: Path, source: str, expected: set[str]):
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert imports(path, "chop.passes.analysis.mod") == expected


def test_nothing_named_passes_is_installed(tmp_path: Path):
    code = ("import importlib.util, chop.passes.analysis.snip as s\n"
            "print(importlib.util.find_spec('passes'), s.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "chop.passes.analysis.snip"]


def test_tests_never_import_another_test_module():
    """Shared helpers live in conftest.py fixtures and tests/helpers/zoo.py; a test module imported by
    another runs its module-level code twice and couples unrelated tests."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                last = name.split(".")[-1]
                if name.split(".")[0] == "tests" or last.startswith("test_") or last == "conftest":
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []
