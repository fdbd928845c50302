"""The shape docs/architecture.md promises: short functions, no import cycles, and code that
runs in the children importing nothing of the daemon's side."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "photoscand"
LONGEST_FUNCTION = 70
# Declaring every metric is one long list of statements, read as a table.
LONG_BY_NATURE = {("photoscand/metrics.py", "__init__")}
# What runs in the metadata process and the workers (see docs/architecture.md).
CHILD_SIDE = {"photoscand.worker", "photoscand.metadata", "photoscand.converters"}
# What the children may import of photoscand.
CHILD_MAY_IMPORT = {
    "photoscand",
    "photoscand.formats",
    "photoscand.outcomes",
    "photoscand.protocol",
    "photoscand.metadata",
    "photoscand.converters",
}


def modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def imports_of(tree: ast.Module) -> set[str]:
    """photoscand modules a module imports (``from photoscand.x import y`` names x, and
    x.y when y is a module itself)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("photoscand"):
                found.add(node.module)
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    as_path = REPO / candidate.replace(".", "/")
                    if as_path.with_suffix(".py").exists() or as_path.is_dir():
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("photoscand")}
    return found


def test_no_function_is_longer_than_70_lines() -> None:
    long = []
    for _name, path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                where = (str(path.relative_to(REPO)), node.name)
                if lines > LONGEST_FUNCTION and where not in LONG_BY_NATURE:
                    long.append(f"{where[0]}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_package_has_no_import_cycles() -> None:
    graph = {}
    for name, _path, tree in modules():
        # A module's own package is not a dependency (its __init__ runs first anyway).
        graph[name] = {m for m in imports_of(tree) if m != name and not name.startswith(m + ".")}
    cycles = []
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*trail[trail.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_code_that_runs_in_the_children_imports_nothing_of_the_daemons_side() -> None:
    wrong = []
    for name, _path, tree in modules():
        if not any(name == side or name.startswith(side + ".") for side in CHILD_SIDE):
            continue
        for imported in imports_of(tree):
            inside = any(imported == ok or imported.startswith(ok + ".") for ok in CHILD_SIDE)
            if imported not in CHILD_MAY_IMPORT and not inside:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_the_converters_never_import_the_config() -> None:
    for name, _path, tree in modules():
        if name.startswith("photoscand.converters"):
            assert "photoscand.config" not in imports_of(tree), name
