"""The pyliverlesionseg importer: the ONNX graph it writes equals the reference export, and the package is sound.

The reference is a tf2onnx export of the same Keras weights (``shared/models/liver-unet-3mm``, not
committed); the importer downloads the wheel from PyPI, so this module needs the network. One tile of
each model takes about 15-30 s on two CPUs, so each runs once per module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gateway.inference.manifest import ModelPackage, load_model_package
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import import_pyliverlesionseg as importer

REFERENCE = REPO.parent / "shared" / "models" / "liver-unet-3mm" / "liver_unet_3mm.onnx"

pytestmark = pytest.mark.skipif(not REFERENCE.is_file(),
                                reason=f"reference export {REFERENCE} absent (CI provides it)")


def _run(model: Path, tile: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (output,) = session.run(["main"], {"ct_norm": tile})
    return np.asarray(output)


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package the importer writes, downloading the wheel itself (the default path)."""
    out = tmp_path_factory.mktemp("models") / "liver"
    assert importer.main(["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return importer.download_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def outputs(package_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Ours and the reference's output on one seeded tile of plausible normalised CT (-0.5 ... 0.5)."""
    rng = np.random.default_rng(20201011)
    tile = np.clip(rng.normal(0.0, 0.25, (1, *importer.PATCH_SIZE, 1)), -0.5, 0.5).astype(np.float32)
    return _run(package_dir / "model.onnx", tile), _run(REFERENCE, tile)


def test_output_equals_the_reference_export(outputs: tuple[np.ndarray, np.ndarray]) -> None:
    ours, reference = outputs
    assert ours.shape == reference.shape == (1, *importer.OUTPUT_SIZE, 1)
    assert float(np.abs(ours - reference).max()) <= 1e-4
    assert 0.0 < float(ours.mean()) < 1.0, "a constant output would hide a broken graph"


def test_package_loads_with_the_manifest_as_written(package_dir: Path) -> None:
    package: ModelPackage = load_model_package(package_dir)
    manifest = package.manifest
    assert (manifest.model.name, manifest.model.version, manifest.model.modality) == ("liver", "0.3", "CT")
    assert (manifest.input.orientation, manifest.input.spacing_mm) == ("RAS", [3.0, 3.0, 3.0])
    assert (manifest.input.patch_size, manifest.input.output_crop) == ([189, 162, 162], [13, 13, 13])
    assert manifest.input.output_size == list(importer.OUTPUT_SIZE)
    assert (manifest.input.layout, manifest.input.overlap, manifest.input.tile_weighting) == \
        ("channels_last", 0.0, "constant")
    assert (manifest.input.batch_size, manifest.input.padding_hu) == (1, -1024)
    assert manifest.input.prefilter is not None
    assert (manifest.input.prefilter.size, manifest.input.prefilter.spacing_mm) == (3, [1.5, 1.5, 1.5])
    assert manifest.input.normalisation.model_dump() == {"kind": "clip_scale", "hu_min": -200, "hu_max": 200,
                                                         "out_min": -0.5, "out_max": 0.5}
    assert (manifest.output.kind, manifest.output.threshold) == ("sigmoid", 0.5)
    (label,) = manifest.labels
    assert (label.value, label.name, label.colour, label.interpreted_type) == (1, "Liver", [165, 42, 42], "ORGAN")
    assert (label.keep_largest_component, label.fill_holes, label.min_volume_ml) == (True, True, 100)


def test_notice_and_licence_give_provenance(package_dir: Path) -> None:
    notice = (package_dir / "NOTICE").read_text(encoding="utf-8")
    for fact in ("Apache-2.0", importer.WHEEL_SHA256, importer.WHEEL_NAME, importer.MEMBER, "KU Leuven",
                 "Tang", "2020", "converted by scripts/import_pyliverlesionseg.py"):
        assert fact in notice.replace("\n", " "), fact
    assert "Apache License" in (package_dir / "LICENSE").read_text(encoding="utf-8")


def test_network_has_the_published_parameter_count(package_dir: Path) -> None:
    model = onnx.load(str(package_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    weights = [t for t in model.graph.initializer if t.name.startswith("conv3d_")]
    assert sum(int(np.prod(t.dims)) for t in weights) == 3_874_961
    assert sum(node.op_type == "Conv" for node in model.graph.node) == 15
    assert model.opset_import[0].version == 17
    (tensor_in,), (tensor_out,) = model.graph.input, model.graph.output
    shape_in = [d.dim_param or d.dim_value for d in tensor_in.type.tensor_type.shape.dim]
    shape_out = [d.dim_param or d.dim_value for d in tensor_out.type.tensor_type.shape.dim]
    assert (tensor_in.name, shape_in) == ("ct_norm", ["batch", 189, 162, 162, 1])
    assert (tensor_out.name, shape_out) == ("main", ["batch", 163, 136, 136, 1])


def test_tampered_wheel_is_refused_and_nothing_is_written(wheel: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    tampered = tmp_path / wheel.name
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    out = tmp_path / "models" / "liver"
    assert importer.main(["--out", str(out), "--wheel", str(tampered)]) == 1
    assert importer.WHEEL_SHA256 in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.glob("models/*")) == [], "a staging folder was left behind"


def test_reimport_replaces_the_package_whole(wheel: Path, tmp_path: Path) -> None:
    out = tmp_path / "liver"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier import", encoding="utf-8")
    assert importer.main(["--out", str(out), "--wheel", str(wheel)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["LICENSE", "NOTICE", "manifest.toml", "model.onnx"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["liver"], "a staging folder was left behind"
