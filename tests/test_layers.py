"""The package's layering: arrows point down only, and no two modules import each other.

    ground floor (errors, bugs, memory, geometry, findings, case, isolation, gpus)
    -> chain -> backends -> oracle / invariants / api -> corpus -> fuzz / sanitizer / demo
    -> gate (and the changed stages) -> report -> pytest plugin / CLI

Every import counts, those inside functions too: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "harness"
LAYERS = [
    {"harness.errors", "harness.bugs", "harness.memory", "harness.geometry",
     "harness.findings", "harness.case", "harness.isolation", "harness.gpus", "harness.paths"},
    {"harness.chain"},
    {"harness.backends"},
    {"harness.oracle", "harness.invariants", "harness.api"},
    {"harness.corpus"},
    {"harness.fuzz", "harness.sanitizer", "harness.demo"},
    {"harness.gate", "harness.changes"},
    {"harness.report"},
    {"harness.pytest_plugin", "harness.cli", "harness.cli_common", "harness.cli_ci",
     "harness.output"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` depends on the submodule (the package's __init__
            # runs as the parent of any submodule anyway); `from pkg import name` on pkg
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s if s in modules else node.module for s in subs]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != "harness"}
    return found


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"{module} is in no layer: place it in tests/test_layers.py")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items() if m != "harness"}


def test_every_import_points_down_or_sideways():
    upward = [f"{m} -> {d}" for m, deps in _graph().items() for d in deps
              if _layer(d) > _layer(m)]
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles
