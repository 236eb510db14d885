"""The house keeps its order: each package imports only the layers below it, and no module
imports itself back round a circle.

The imports are read from the source (every ``import``, at module level, in functions and under
``TYPE_CHECKING`` alike), so a function-level import cannot hide a back-edge.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hoverdask"

# The layers in data-flow order and what each may import (besides itself). ``top`` is the
# package root, the CLI, the Python API and the bench: it may import everything.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "slide": {"core"},
    "model": {"core"},
    "nuclei": {"core"},
    "export": {"core", "slide", "nuclei"},
    "deploy": {"core"},
    "pipeline": {"core", "slide", "model", "nuclei", "export", "deploy"},
    "train": {"core", "slide", "model", "nuclei"},
    "evaluate": {"core", "slide", "model", "nuclei", "train"},
}
TOP = "top"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else TOP


def imported(module: str, path: Path) -> list[tuple[str, int]]:
    """``(hoverdask module, line)`` of every import in ``path``, resolved to modules."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("hoverdask")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if not source.startswith("hoverdask"):
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.append((child if child in MODULES else source, node.lineno))
    return found


EDGES = {name: imported(name, path) for name, path in MODULES.items()}


def test_every_layer_is_known() -> None:
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages <= set(ALLOWED), f"add {packages - set(ALLOWED)} to ALLOWED in data-flow order"


def test_no_import_runs_back_up_the_layers() -> None:
    wrong = []
    for source, targets in EDGES.items():
        own = layer(source)
        for target, line in targets:
            theirs = layer(target)
            if own == TOP or theirs == own:
                continue
            if theirs == TOP or theirs not in ALLOWED[own]:
                wrong.append(f"{MODULES[source].relative_to(ROOT)}:{line} imports {target} "
                             f"({own} may import {sorted(ALLOWED[own]) or 'nothing'})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    """No circle of modules, counting every import (a package's ``__init__`` re-exporting its
    children is the one edge left out: importing a child always runs its parent first)."""
    graph = {
        source: {t for t, _ in targets
                 if t in MODULES and t != source and not source.startswith(t + ".")}
        for source, targets in EDGES.items()
    }
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", ["hoverdask", "hoverdask.core", "hoverdask.slide",
                                     "hoverdask.nuclei", "hoverdask.export"])
def test_lower_layers_import_without_torch_or_distributed(package: str) -> None:
    code = (f"import sys, {package}; heavy = {{'torch', 'distributed'}} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
