"""The house's shape (docs/layout.md): imports point down the floors (lvmae_cli -> evals -> train -> ingest ->
lvmae) and never in a circle, imports inside functions included; one module imports deepspeed; no module of
the product packages is past 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = ["lvmae", "ingest", "train", "evals", "lvmae_cli"]  # bottom to top
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for floor in FLOORS:
        for path in sorted((REPO / floor).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module this one imports (top level or inside functions), as full dotted names."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name like pkg.mod.func counts as pkg.mod)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imported in imports(name, path):
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def floor(module: str) -> int:
    return FLOORS.index(module.split(".")[0])


def test_imports_point_down_the_floors():
    upward = sorted(f"{a} -> {b}" for a, targets in edges().items() for b in targets if floor(b) > floor(a))
    assert not upward, upward


def test_no_import_circle():
    graph, state, stack = edges(), {}, []

    def visit(node: str) -> None:  # depth-first; a node met again while on the stack closes a circle
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_one_module_imports_deepspeed():
    importers = sorted(
        name
        for name, path in modules().items()
        if any(i.split(".")[0] == "deepspeed" for i in imports(name, path))
    )
    assert importers == ["train.engine"]


def test_no_module_is_past_the_line_limit():
    long = {name: n for name, path in modules().items() if (n := path.read_text().count("\n")) > MAX_LINES}
    assert not long, long
