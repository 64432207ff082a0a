"""The re-identification vault is segregated by module boundary: checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"
#: Modules that handle pseudonymised data; they must never reach the vault.
PSEUDONYMISED_SIDE = {"pseudonymise", "volume", "infer", "rtstruct", "seg", "processing", "postprocess", "contours",
                      "qa"}
#: The only modules that may import the vault.
VAULT_USERS = {"pipeline", "reidentify"}


def _imports(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _modules() -> dict[str, Path]:
    return {path.stem: path for path in GATEWAY.glob("*.py")}


def test_only_the_pipeline_and_reidentification_import_the_vault() -> None:
    importers = {name for name, path in _modules().items()
                 if any(i == "gateway.vault" or i.startswith("gateway.vault.") for i in _imports(path))}
    assert importers <= VAULT_USERS
    assert "pipeline" in importers  # the rule is not vacuous


def test_pseudonymised_side_reaches_neither_vault_nor_reidentification() -> None:
    present = PSEUDONYMISED_SIDE & set(_modules())
    assert "pseudonymise" in present
    for name in present:
        imports = _imports(_modules()[name])
        assert not {i for i in imports if i.startswith(("gateway.vault", "gateway.reidentify"))}, name


def test_only_the_vault_seals_with_the_vault_key() -> None:
    users = {name for name, path in _modules().items() if "Purpose.VAULT" in path.read_text()}
    assert users == {"vault"}
