"""The package's import graph: loops, the longest chain, lazy imports and imports between regions.

``python scripts/import_graph.py`` prints a summary; ``--edges`` lists every edge; ``--json`` the whole graph.
Every ``import`` of a ``gateway`` module counts, wherever it stands (module level, inside a function, or under
``TYPE_CHECKING``): a dependency is a dependency, whether it runs at import time or not.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "gateway"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function body: the dependency does not show at the top of the module
    typing_only: bool  # under ``if TYPE_CHECKING:``


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: list[Edge] = field(default_factory=list)

    def targets(self, source: str) -> set[str]:
        return {edge.target for edge in self.edges if edge.source == source}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _candidates(source: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    module = _resolve(source, is_package, node)
    for alias in node.names:
        yield f"{module}.{alias.name}"  # ``from gateway.store import spool`` imports a module
        yield module


def _walk(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    def visit(node: ast.AST, lazy: bool, typing_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy, typing_only
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from visit(child, True, typing_only)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from visit(child, lazy, True)
            else:
                yield from visit(child, lazy, typing_only)
    yield from visit(tree, False, False)


def build(root: Path = ROOT) -> Graph:
    modules = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph = Graph(modules)
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        seen: set[tuple[str, int]] = set()
        for node, lazy, typing_only in _walk(ast.parse(path.read_text(), str(path))):
            for candidate in _candidates(source, is_package, node):
                if candidate in modules and candidate != source and (candidate, node.lineno) not in seen:
                    seen.add((candidate, node.lineno))
                    graph.edges.append(Edge(source, candidate, node.lineno, lazy, typing_only))
                    break
    return graph


def _strongly_connected(nodes: list[str], targets: Callable[[str], set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; every component of more than one node is a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(targets(node)):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(nodes):
        if node not in index:
            connect(node)
    return [component for component in components if len(component) > 1]


def loops(graph: Graph) -> list[list[str]]:
    """Import loops between modules."""
    return _strongly_connected(list(graph.modules), graph.targets)


def region_loops(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Loops between regions, given the region edges (e.g. of :func:`region_edges`)."""
    pairs = set(edges)
    nodes = sorted({node for pair in pairs for node in pair})
    return _strongly_connected(nodes, lambda node: {b for a, b in pairs if a == node})


def longest_chain(graph: Graph) -> list[str]:
    """The longest path of imports (the graph must have no loop)."""
    memo: dict[str, list[str]] = {}

    def longest(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node, *max((longest(t) for t in sorted(graph.targets(node))), key=len, default=[])]
        return memo[node]
    return max((longest(node) for node in sorted(graph.modules)), key=len, default=[])


#: Top-level modules that wire every region together (the node and its command line).
ENTRY = frozenset({f"{PACKAGE}.service", f"{PACKAGE}.__main__"})


def region(module: str) -> str:
    """The subpackage a module lives in; ``gateway`` for the shared top-level modules, ``entry`` for the wiring."""
    parts = module.split(".")
    if module in ENTRY:
        return "entry"
    return parts[1] if len(parts) > 2 else PACKAGE


def region_edges(graph: Graph) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for edge in graph.edges:
        pair = (region(edge.source), region(edge.target))
        if pair[0] != pair[1]:
            counts[pair] = counts.get(pair, 0) + 1
    return counts


def summary(graph: Graph) -> dict[str, object]:
    cycles = loops(graph)
    top_level = Graph(graph.modules, [e for e in graph.edges if not e.lazy])  # a loop may hide in a lazy import
    chain_graph = graph if not cycles else top_level if not loops(top_level) else None
    return {
        "modules": len(graph.modules),
        "edges": len({(e.source, e.target) for e in graph.edges}),
        "loops": cycles,
        "longest_chain": longest_chain(chain_graph) if chain_graph is not None else [],
        "longest_chain_of": "every import" if chain_graph is graph else "module-level imports" if chain_graph else "-",
        "lazy_imports": [f"{e.source}:{e.line} -> {e.target}" for e in graph.edges if e.lazy],
        "region_edges": {f"{a} -> {b}": n for (a, b), n in sorted(region_edges(graph).items())},
        "region_loops": region_loops(region_edges(graph)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="list every edge")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--root", type=Path, default=ROOT, help="the package folder to read (default: this tree's)")
    args = parser.parse_args(argv)
    graph = build(args.root.resolve())
    result = summary(graph)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        chain = result["longest_chain"]
        print(f"modules {result['modules']}, edges {result['edges']}, loops {len(result['loops'])}")  # type: ignore[arg-type]
        for cycle in result["loops"]:  # type: ignore[attr-defined]
            print("  loop:", " <-> ".join(cycle))
        print(f"longest chain ({len(chain)} modules, {result['longest_chain_of']}):",  # type: ignore[arg-type]
              " -> ".join(chain))  # type: ignore[arg-type]
        print("lazy imports:", len(result["lazy_imports"]))  # type: ignore[arg-type]
        for line in result["lazy_imports"]:  # type: ignore[attr-defined]
            print("  ", line)
        print("loops between regions:", result["region_loops"] or "none")
        print("imports between regions:")
        for pair, count in result["region_edges"].items():  # type: ignore[attr-defined]
            print(f"  {pair}: {count}")
    if args.edges:
        for edge in sorted(graph.edges, key=lambda e: (e.source, e.target)):
            flags = ",".join(f for f, on in (("lazy", edge.lazy), ("typing", edge.typing_only)) if on)
            print(f"{edge.source} -> {edge.target} {flags}".rstrip())
    return 1 if result["loops"] or result["region_loops"] else 0


if __name__ == "__main__":
    sys.exit(main())
