"""No import cycles in steps/, schemas/ or flows/: each module imports cleanly on its own, first.

A cycle makes import order matter (a module half-initialised when its partner reads from it)
and hides which module depends on which. The graph is read from the source, function-level
imports included, so a cycle cannot hide inside a function body either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "steps", "flows")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _main_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: runs only when the module is the program, never on import."""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _walk(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those inside a ``__main__`` block (it cannot take part in a cycle)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        todo.extend(child for child in ast.iter_child_nodes(node) if not _main_block(child))
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (``from a import b`` counts ``a.b`` if a module)."""
    out = set()
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return {name for name in out if name in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node] - {node}):
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


def test_no_import_cycles() -> None:
    known = modules()
    graph = {name: imports(path, known) for name, path in known.items()}
    # A package's __init__ may re-export its modules; only cycles through real modules count.
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.integration
@pytest.mark.parametrize("name", [n for n in modules() if n.startswith("steps.labelers")])
def test_each_labeler_module_imports_first(name: str) -> None:
    """Imported first in a fresh interpreter: no module relies on another having been imported before."""
    done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_reason_codes_are_spelled_once() -> None:
    """No reason code of schemas/reasons.py appears as a string literal in steps/ or flows/."""
    from schemas import reasons

    names = [name for name in vars(reasons) if name.isupper()]
    codes = {getattr(reasons, name) for name in names}
    assert len(codes) == len(names), "two constants share a code"
    found = []
    for package in ("steps", "flows"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in codes:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_stage_names_are_spelled_once() -> None:
    """A stage is named by ``schemas.stage_names``, never retyped: its name is in every shard key."""
    from schemas import stage_names

    calls = {"StageStats", "merge_stats", "key", "run", "lookup", "_log_progress", "_run_stage"}
    calls |= {"run_model_batches"}
    found = []
    for package in ("steps", "flows"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                literals: list[ast.expr] = []
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                    literals = list(node.args) if name in calls else []
                elif isinstance(node, ast.Compare):
                    literals = [node.left, *node.comparators]
                for arg in literals:
                    if isinstance(arg, ast.Constant) and arg.value in stage_names.ORDER:
                        found.append(f"{path.relative_to(ROOT)}:{arg.lineno}: {arg.value!r}")
    assert found == []


def test_architecture_page_names_every_module() -> None:
    """docs/architecture.md is how a reader finds a stage by file name: every module is on it."""
    layout = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for name, path in modules().items():
        rel = path.relative_to(ROOT)
        if rel.name == "__init__.py":
            continue
        folder = f"`{rel.parent.as_posix()}/`"
        listed = f"`{rel.as_posix()}`" in layout
        in_folder_row = folder in layout and (f"`{rel.name}`" in layout or f"`{rel.stem}`" in layout)
        if not (listed or in_folder_row):
            missing.append(name)
    assert missing == []
