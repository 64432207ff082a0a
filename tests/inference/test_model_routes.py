"""Routes that run several models on one series and merge their structures into one RT Structure Set."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from gateway.errors import ConfigError
from gateway.inference.manifest import load_model_package
from gateway.inference.model_cache import check_route_models, combine_manifests
from gateway.routes import Route
from tests.conftest import REPO, NodeProcess, dcmtk_env, require_tool
from tests.onnx_models import manifest, threshold_network
from tests.synthetic import CTSeries, abdomen_phantom, couch_phantom, write_volume_series


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """The default package and a second one finding bone (above about +300 HU)."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "default").symlink_to(REPO / "models" / "default")
    threshold_network(folder / "bone" / "model.onnx", cut=0.65)
    manifest(folder / "bone", spacing=(3.0, 3.0, 3.0), patch=(16, 64, 64), labels=[
        {"value": 1, "name": "Bones", "colour": [255, 255, 200], "interpreted_type": "ORGAN"}])
    return folder


def route(models: list[str], **extra: object) -> Route:
    return Route.model_validate({"name": "both", "model": models, "destinations": ["folder"], **extra})


class TestCombinedManifest:
    def test_labels_are_renumbered_in_order_with_their_origin(self, models_dir: Path) -> None:
        default, bone = (load_model_package(models_dir / name).manifest for name in ("default", "bone"))
        combined = combine_manifests([default, bone])
        assert [(label.value, label.name) for label in combined.labels] == [
            (1, "External"), (2, "Lung_L"), (3, "Lung_R"), (4, "Bones")]
        assert [label.origin for label in combined.labels] == ["default 2.0.0"] * 3 + ["test 0.1"]
        assert combined.model.name == "default+test"
        assert combine_manifests([default]) is default

    def test_a_label_found_by_two_models_is_refused_at_start_up(self, models_dir: Path) -> None:
        threshold_network(models_dir / "other" / "model.onnx")
        manifest(models_dir / "other", labels=[{"value": 1, "name": "Lung_L", "colour": [1, 2, 3]}])
        with pytest.raises(ConfigError) as info:
            check_route_models(models_dir, [route(["default", "other"]), route(["default", "missing"])])
        text = "\n".join(info.value.problems)
        assert "routes[0].model: label names found by more than one model: Lung_L" in text
        assert "routes[1]: model 'missing' has no package folder" in text

    def test_the_template_may_name_any_model_s_labels(self, models_dir: Path) -> None:
        check_route_models(models_dir, [route(["default", "bone"], structures={"Bones": {"name": "Skeleton"},
                                                                               "External": {"name": "BODY"}})])
        with pytest.raises(ConfigError, match="'Liver' is not a label of model 'default\\+bone'"):
            check_route_models(models_dir, [route(["default", "bone"], structures={"Liver": {"order": 1}})])

    def test_a_model_listed_twice_is_a_config_error(self) -> None:
        with pytest.raises(ValueError, match="listed twice"):
            route(["default", "default"])


def contour(node_factory: Callable[..., NodeProcess], models_dir: Path, ct: CTSeries,
            route: dict[str, object]) -> tuple[NodeProcess, Path]:
    """Send *ct* to a node with *route* into a folder; the node and the RTSTRUCT file it wrote."""
    node = node_factory(destinations=[{"name": "folder", "type": "folder"}], routes=[route], models_dir=models_dir)
    sent = subprocess.run([require_tool("storescu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                           str(node.port), *map(str, ct.files)], capture_output=True, env=dcmtk_env(), timeout=60)
    assert sent.returncode == 0
    assert node.wait_for("job_done", timeout=240)["state"] == "sent"
    [exported] = (node.data_dir / "export" / "folder").glob("*.dcm")
    return node, exported


def test_two_models_one_structure_set(node_factory: Callable[..., NodeProcess], models_dir: Path,
                                      tmp_path: Path) -> None:
    volume, _ = couch_phantom(shape=(30, 160, 160), spacing=(4.0, 2.6, 2.6))
    both = {"name": "both", "match": {"Modality": "CT"}, "model": ["default", "bone"], "destinations": ["folder"],
            "structures": {"Bones": {"name": "Skeleton", "order": 1}}}
    node, exported = contour(node_factory, models_dir, write_volume_series(tmp_path / "ct", volume), both)
    rtstruct = pydicom.dcmread(exported)
    rois = {roi.ROIName: roi for roi in rtstruct.StructureSetROISequence}
    assert list(rois) == ["Skeleton", "External", "Lung_L", "Lung_R"]
    assert rois["Skeleton"].ROIGenerationDescription == "test 0.1"
    assert rois["External"].ROIGenerationDescription == "default 2.0.0"
    assert rtstruct.StructureSetName == "default+test"
    contours = {int(item.ReferencedROINumber): len(item.ContourSequence) for item in rtstruct.ROIContourSequence}
    assert all(count > 0 for count in contours.values())
    verdict = subprocess.run([require_tool("dciodvfy"), str(exported)], capture_output=True, text=True, timeout=60,
                             check=False)
    assert [line for line in verdict.stderr.splitlines() if line.startswith("Error")] == [], verdict.stderr
    inferred = [e for e in node.events() if e["event"] == "inference_expected"]
    assert [e["model"] for e in inferred] == ["default+bone"]


def test_default_and_the_published_liver_network(node_factory: Callable[..., NodeProcess], models_dir: Path,
                                                  tmp_path: Path) -> None:
    """The imported pyliverlesionseg network runs in the pipeline next to the default model: one RTSTRUCT.

    (The phantom's liver is a plain 60 HU ellipsoid in 40 HU tissue without fat: the network is not expected to
    outline it, only to run as configured; its output is checked for form, not anatomy.)
    """
    imported = subprocess.run([sys.executable, str(REPO / "scripts" / "import_pyliverlesionseg.py"), "--out",
                               str(models_dir / "liver")], capture_output=True, text=True, timeout=300, check=False)
    assert imported.returncode == 0, imported.stderr
    volume, _ = abdomen_phantom(shape=(60, 256, 256), spacing=(3.0, 1.5, 1.5))
    ct = write_volume_series(tmp_path / "ct", volume)
    route = {"name": "abdomen", "match": {"Modality": "CT"}, "model": ["default", "liver"],
             "destinations": ["folder"]}
    _node, exported = contour(node_factory, models_dir, ct, route)
    rtstruct = pydicom.dcmread(exported)
    rois = {roi.ROIName: roi for roi in rtstruct.StructureSetROISequence}
    assert list(rois) == ["External", "Lung_L", "Lung_R", "Liver"]
    assert rois["Liver"].ROIGenerationDescription == "liver 0.3"
    liver = next(item for item in rtstruct.ROIContourSequence
                 if int(item.ReferencedROINumber) == int(rois["Liver"].ROINumber))
    assert list(liver.ROIDisplayColor) == [165, 42, 42] and len(liver.ContourSequence) > 0
    slices = {str(ds.SOPInstanceUID) for ds in map(pydicom.dcmread, ct.files)}
    assert {str(c.ContourImageSequence[0].ReferencedSOPInstanceUID) for c in liver.ContourSequence} <= slices
