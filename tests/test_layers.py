"""The import direction of DESIGN.md: jobs -> stages -> shared layers. A shared layer imports no
stage, and no stage reaches into another stage (a piece two stages need lives below both)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pipeline"
SHARED = {"config", "runtime", "progress", "stages", "data", "models", "objectives", "tasks", "engines", "decoding"}
STAGES = {"rollout", "labeling", "train", "eval", "serve"}


def _imports(path: Path) -> set[str]:
    """Every pipeline package a module imports (top-level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for n in names:
            parts = n.split(".")
            if parts[0] == "pipeline" and len(parts) > 1:
                out.add(parts[1])
    return out


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_package_is_classified():
    found = {_layer(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert found <= SHARED | STAGES, f"unclassified: {found - SHARED - STAGES}"


def test_imports_run_one_way():
    bad = []
    for path in ROOT.rglob("*.py"):
        src = _layer(path)
        for dst in _imports(path) - {src}:
            if dst in STAGES:  # a shared layer importing a stage, or a stage reaching into another one
                bad.append(f"{path.relative_to(ROOT.parent)} imports pipeline.{dst}")
    assert not bad, "\n".join(sorted(bad))


def test_shared_layers_have_no_cycle_through_train_modules():
    """The PRM trainer and its probe were a cycle (prm <-> prm_probe); modules inside a stage form no cycle."""
    import re

    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        mod = "pipeline." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                deps.add(node.module)
        graph[re.sub(r"\.__init__$", "", mod)] = deps
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen or m not in graph:
            return
        stack.append(m)
        for d in graph[m]:
            if d != m and not m.startswith(d + "."):  # a package importing its own submodule is fine
                visit(d)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)
