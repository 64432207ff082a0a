"""The conformance statement lists exactly the SOP classes and transfer syntaxes the code accepts and sends."""

from __future__ import annotations

import re

from gateway.config import parse_config
from gateway.receiving.storage_scp import build_ae
from gateway.rt.rtstruct import StructureSetInput
from gateway.rt.seg import build_segmentation
from gateway.sending.scu import Sender
from tests.conftest import REPO
from tests.rt.test_rtstruct import MANIFEST, _build

STATEMENT = (REPO / "docs" / "conformance-statement.md").read_text()
_UID = re.compile(r"\b1\.2\.840\.10008(?:\.\d+)+\b")


def _section(number: str) -> str:
    """The text of section *number* (e.g. ``3.2.1``), up to the next heading."""
    match = re.search(rf"^#+ {re.escape(number)} .*?$(.*?)(?=^#)", STATEMENT, re.MULTILINE | re.DOTALL)
    assert match, f"section {number} missing"
    return match.group(1)


def _uids(text: str) -> set[str]:
    return set(_UID.findall(text))


def test_accepted_sop_classes_and_transfer_syntaxes() -> None:
    ae = build_ae(parse_config({}))
    contexts = {str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax} for cx in ae.supported_contexts}
    assert _uids(_section("3.2.1")) == set(contexts)
    storage_syntaxes = _uids(_section("3.2.2"))
    verification = "1.2.840.10008.1.1"
    assert all(syntaxes == storage_syntaxes for sop, syntaxes in contexts.items() if sop != verification)
    assert contexts[verification] == {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
    assert "1.2.840.10008.1.2.1.99" not in storage_syntaxes  # no Deflate


def test_proposed_sop_classes_and_transfer_syntaxes() -> None:
    slices, volume, masks, rtstruct = _build("HFS")
    segmentation = build_segmentation(StructureSetInput(volume, slices, masks, MANIFEST))  # type: ignore[arg-type]
    config = parse_config({"destinations": [{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 104}]})
    echo_ae = Sender(config)._ae(config.destination("tps"), None, None)  # type: ignore[arg-type]
    [echo] = echo_ae.requested_contexts
    proposed = {
        str(rtstruct.SOPClassUID): {str(rtstruct.file_meta.TransferSyntaxUID)},
        str(segmentation.SOPClassUID): {str(segmentation.file_meta.TransferSyntaxUID)},
        str(echo.abstract_syntax): {str(ts) for ts in echo.transfer_syntax},
    }
    rows = [line for line in _section("3.2.3").splitlines() if line.startswith("| ") and _UID.search(line)]
    documented = {}
    for row in rows:
        sop, *syntaxes = _UID.findall(row)
        documented[sop] = set(syntaxes)
    assert documented == proposed
