"""The package layering of docs/architecture.md holds: no import cycle between ptyl's packages, and each lower layer
never imports a higher one (every import counts, also those inside functions; ``TYPE_CHECKING`` blocks do not)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ptyl"

# bottom to top; a package may import only packages listed before it (or itself)
LAYERS = [
    # flat: issue 12; sharding: issue 16; config (reads config files, takes the parser it is given), version and
    # batches (to_device, recompute_batchnorm: posterior and inference both use them), named_enum (the registries'
    # base): issue 24
    {"errors", "params", "validation", "distributed", "flat", "sharding", "config", "version", "batches",
     "named_enum"},
    {"posterior"},
    {"priors"},
    {"io", "memory", "data", "models", "metrics", "autotune"},
    {"inference"},
    {"training"},
    {"tuning", "integrations"},
    {"pipeline"},
    {"cli"},
]
# modules that belong to a package they do not sit in (none since config.py stopped importing ptyl.cli)
PART_OF: dict[str, str] = {}


def _package(module: str) -> str | None:
    """The ptyl package (or top-level module) ``module`` belongs to; ``None`` outside ptyl or for a plain name."""
    parts = module.split(".")
    if parts[0] != "ptyl" or len(parts) < 2 or not ((SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").is_file()):
        return None
    return PART_OF.get(parts[1], parts[1])


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def import_graph() -> dict[str, set[str]]:
    """package -> the ptyl packages its modules import."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC)
        if relative == Path("__init__.py"):
            continue  # the top-level facade re-exports from every layer
        package = PART_OF.get(relative.parts[0].removesuffix(".py"), relative.parts[0].removesuffix(".py"))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "ptyl"
                                         else [])
            for name in names:
                target = _package(name)
                if target and target != package:
                    graph.setdefault(package, set()).add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycle_between_packages():
    assert _cycles(import_graph()) == []


def test_every_package_imports_only_lower_layers():
    rank = {package: i for i, layer in enumerate(LAYERS) for package in layer}
    graph = import_graph()
    assert set(graph) <= set(rank), f"packages missing from LAYERS: {set(graph) - set(rank)}"
    upward = [f"{src} -> {dst}" for src, targets in graph.items() for dst in targets if rank[dst] > rank[src]]
    assert upward == []


def test_modules_stay_small():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}
