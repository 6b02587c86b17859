"""The import graph of `composefs` has no cycles.

Dependencies point one way (formats <- repository <- oci/boot/... <- cli);
a cycle means two modules cannot be understood, tested or loaded apart.
Edges are read from the source with `ast`: module-level imports (the ones
that run at import time), and separately every import including those
inside functions and ``if TYPE_CHECKING:`` blocks, which must not form a
cycle either: a lazy import only defers the load, the two modules still
depend on each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "composefs"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, *, module_level_only: bool) -> list[ast.Import | ast.ImportFrom]:
    if not module_level_only:
        return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        # What runs at import time: the module body, its ifs and trys.
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                out.append(node)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return out


def import_graph(*, module_level_only: bool) -> dict[str, set[str]]:
    """module -> the `composefs` modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree, module_level_only=module_level_only):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # ``from . import x`` imports the submodule x when there is one.
                targets = [
                    f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
                    for a in node.names
                ]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.split(".")[0] == PACKAGE:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)) is not None:
            return found
    return None


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "all"])
def test_no_import_cycle(module_level_only: bool) -> None:
    graph = import_graph(module_level_only=module_level_only)
    assert len(graph) > 20, "the source tree was not found"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    # The check itself must be able to fail.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_relative_and_lazy_imports() -> None:
    eager = import_graph(module_level_only=True)
    everything = import_graph(module_level_only=False)
    assert "composefs.oci.image" in eager["composefs.oci.registry"]
    assert "composefs.oci.registry" not in eager["composefs.oci.transports"]
    # open_source loads the registry client lazily; the full graph sees it.
    assert "composefs.oci.registry" in everything["composefs.oci.transports"]
