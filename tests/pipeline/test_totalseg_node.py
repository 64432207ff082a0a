"""TotalSegmentator through a real node: its five-part `total` task imported as one bundle (random weights in
TotalSegmentator's own folder layout), a route with the shipped thorax template, dcmtk storescu as the PACS and a
folder as the TPS: one RT Structure Set whose structures are the template's, in its order, that dciodvfy accepts."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from gateway.rt.templates import load_template
from tests.conftest import REPO, NodeProcess, require_tool, write_config
from tests.nnunet_folder import load_totalseg_importer, write_totalsegmentator_weights
from tests.pipeline.test_e2e import send
from tests.synthetic import couch_phantom, write_volume_series


@pytest.mark.timeout(300)
def test_a_bundle_and_the_thorax_template_through_the_node(node_factory: Callable[..., NodeProcess],
                                                           tmp_path: Path) -> None:
    weights = write_totalsegmentator_weights(tmp_path / "weights")
    models = tmp_path / "models"
    assert load_totalseg_importer().main(["--task", "total", "--weights", str(weights), "--out",
                                          str(models / "totalseg-total")]) == 0
    route = {"name": "thorax", "match": {"Modality": "CT"}, "model": "totalseg-total", "destinations": ["folder"],
             "template": "thorax"}
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var", models_dir=models, routes=[route],
                          destinations=[{"name": "folder", "type": "folder"}])
    config.write_text(config.read_text().replace(
        "[inference]\n", f'[inference]\ntemplates_dir = "{REPO / "config" / "templates"}"\n', 1))
    node = node_factory(config_path=config, data_dir=tmp_path / "var")
    volume, _ = couch_phantom(shape=(12, 64, 64), spacing=(5.0, 3.0, 3.0))  # 60 x 192 x 192 mm: few tiles
    ct = write_volume_series(tmp_path / "ct", volume)
    send(node, ct.files)
    assert node.wait_for("job_done", timeout=240)["state"] == "sent"
    [exported] = (node.data_dir / "export" / "folder").glob("*.dcm")
    rtstruct = pydicom.dcmread(exported)
    written = [str(roi.ROIName) for roi in rtstruct.StructureSetROISequence]
    template = [s.name for s in load_template(REPO / "config" / "templates", "thorax").structures]
    assert written and written == [name for name in template if name in written]  # the template's, in its order
    assert node.wait_for("stage_done", stage="structure")["structures"] == len(written)
    report = subprocess.run([require_tool("dciodvfy"), str(exported)], capture_output=True, text=True, timeout=60)
    assert "Error" not in report.stdout + report.stderr, report.stdout + report.stderr
