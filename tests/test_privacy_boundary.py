"""The package's layout is its privacy boundary: checked on the import graph of every module, not on a list."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
GATEWAY = REPO / "gateway"
#: The code that may see patient identity; everything else sees pseudonymised data, counts and codes only.
IDENTITY = "gateway.identity"
#: Regions that work on pseudonymised volumes and masks (and will run on machines without any key).
PSEUDONYMISED = ("gateway.inference", "gateway.rt")
#: Where the flow is wired together: the only code allowed to import the identity side from outside it.
WIRING = ("gateway.pipeline", "gateway.service", "gateway.__main__")
_SQL = re.compile(r"\b(SELECT\b.*\bFROM|INSERT (OR \w+ )?INTO|UPDATE \w+ SET|DELETE FROM|(CREATE|ALTER|DROP) "
                  r"(TABLE|INDEX)|PRAGMA \w+)\b", re.IGNORECASE | re.DOTALL)


def _load_graph_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_graph", module)
    spec.loader.exec_module(module)
    return module


import_graph = _load_graph_script()


@pytest.fixture(scope="module")
def graph() -> object:
    return import_graph.build(GATEWAY)


def _under(module: str, *prefixes: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _reachable(graph: object, start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.targets(todo.pop()):  # type: ignore[attr-defined]
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_graph_covers_every_module_of_the_package(graph: object) -> None:
    files = sorted(GATEWAY.rglob("*.py"))
    assert len(graph.modules) == len(files) > 50  # type: ignore[attr-defined]
    assert {"gateway.identity.vault", "gateway.inference.predictor", "gateway.rt.rtstruct"} <= set(
        graph.modules)  # type: ignore[attr-defined]


def test_no_import_loop_and_no_hidden_import(graph: object) -> None:
    assert import_graph.loops(graph) == []
    assert [f"{e.source}:{e.line}" for e in graph.edges if e.lazy] == []  # type: ignore[attr-defined]


def test_the_pseudonymised_side_reaches_neither_identity_nor_keys_nor_storage(graph: object) -> None:
    checked = [m for m in graph.modules if _under(m, *PSEUDONYMISED)]  # type: ignore[attr-defined]
    assert len(checked) >= 12
    for module in checked:
        reached = _reachable(graph, module)
        assert not {m for m in reached if _under(m, IDENTITY, "gateway.store", "gateway.pipeline",
                                                  "gateway.receiving", "gateway.sending")}, module


def test_only_the_wiring_imports_the_identity_side(graph: object) -> None:
    importers = {e.source for e in graph.edges  # type: ignore[attr-defined]
                 if _under(e.target, IDENTITY) and not _under(e.source, IDENTITY)}
    assert importers and all(_under(m, *WIRING) for m in importers), importers
    vault_users = {e.source for e in graph.edges if e.target == "gateway.identity.vault"}  # type: ignore[attr-defined]
    assert vault_users and all(_under(m, IDENTITY) for m in vault_users), vault_users


def test_only_the_vault_seals_with_the_vault_key() -> None:
    users = {path.relative_to(GATEWAY).as_posix() for path in GATEWAY.rglob("*.py")
             if "Purpose.VAULT" in path.read_text()}
    assert users == {"identity/vault.py"}


def test_regions_depend_on_each_other_one_way(graph: object) -> None:
    """Between subpackages the imports form no loop, and the shared top-level modules import no region."""
    edges = set(import_graph.region_edges(graph))
    regions = {region for pair in edges for region in pair}
    assert {"receiving", "store", "identity", "inference", "rt", "sending", "pipeline", "ops", "entry"} <= regions
    assert import_graph.region_loops(edges) == []
    assert {target for source, target in edges if source == "gateway"} == set()
    assert {source for source, target in edges if target == "entry"} == set()


def _sql_sites(path: Path) -> list[str]:
    return [f"{path.relative_to(GATEWAY)}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.search(node.value)]


def test_sql_lives_only_in_the_store() -> None:
    outside = [site for path in GATEWAY.rglob("*.py") if path.parent.name != "store" for site in _sql_sites(path)]
    assert outside == []
    assert len([site for path in (GATEWAY / "store").glob("*.py") for site in _sql_sites(path)]) > 20
