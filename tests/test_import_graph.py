"""No import circle between the files of ``ptyl`` (issue 24, item 5).

The graph: one node per module file under ``src/ptyl``; an edge A -> B when A's module-level code imports B
(``import ptyl.x.b``, ``from ptyl.x import b`` where ``b`` is a module, ``from ptyl.x.b import name``; relative imports
resolved). Imports under ``if TYPE_CHECKING:`` never run and are left out; imports inside function bodies are left out
of the first test (they do not run at import time) and counted by the second, so that no circle hides behind an
import moved into a function. The implicit imports of parent packages are not edges (``ptyl.x.b`` runs
``ptyl/x/__init__.py`` first, which every package needs). ``tests/test_layering.py`` checks the layering between
packages; this file checks the circles inside and across them. ``python tests/test_import_graph.py`` prints the
circles and the number of imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ptyl"


def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in a function, not under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    block = getattr(node, field, None)
                    if isinstance(block, list):
                        visit([n for n in block if isinstance(n, ast.stmt)] +
                              [s for h in block if isinstance(h, ast.ExceptHandler) for s in h.body])

    visit(tree.body)
    return found


def function_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside function bodies (at any depth)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    found.append(inner)
    return list({id(n): n for n in found}.values())


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    out = {name} if name in known else set()
    out |= {f"{name}.{alias.name}" for alias in node.names if f"{name}.{alias.name}" in known}
    return out


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import but those under ``if TYPE_CHECKING:`` (inside functions too)."""
    hidden = {id(child) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
              for child in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in hidden]


def import_graph(inside_functions: bool = False) -> dict[str, set[str]]:
    """``module -> modules its module-level code imports`` (inside the package only); ``inside_functions``: also
    the imports inside function bodies."""
    files = module_files()
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        nodes = _all_imports(tree) if inside_functions else _module_level_imports(tree)
        graph[module] = {t for node in nodes for t in _targets(node, module, is_package, known) if t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, as the circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def _one_circle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete circle inside a component: a shortest path from its first module back to itself."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_graph_sees_the_package():
    graph = import_graph()
    assert "ptyl.priors.base" in graph and "ptyl.errors" in graph["ptyl.validation"]


def test_no_import_circle_between_files():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles between files:\n" + "\n".join(
        " -> ".join(_one_circle(graph, c)) + f"   (component: {', '.join(c)})" for c in found)


def test_no_circle_hidden_by_an_import_inside_a_function():
    """An import moved into a function to dodge a circle still closes it when the function runs: none left."""
    graph = import_graph(inside_functions=True)
    found = cycles(graph)
    assert not found, "import circles through imports inside functions:\n" + "\n".join(
        " -> ".join(_one_circle(graph, c)) for c in found)


def test_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]] and _one_circle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


if __name__ == "__main__":  # the current circles and the count of function-level imports
    g = import_graph()
    for c in cycles(g):
        print(" -> ".join(_one_circle(g, c)), f"   [{len(c)} modules: {', '.join(c)}]")
    total = sum(len(function_level_imports(ast.parse(p.read_text(encoding="utf-8")))) for p in module_files().values())
    print("function-level imports:", total)
