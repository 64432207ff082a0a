"""The embedded default model on CT it has never seen: a phantom with a couch, and plastimatch's lung phantom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from gateway.inference.manifest import load_model_package
from gateway.inference.predictor import Predictor
from gateway.inference.volume import volume_from_datasets
from tests.conftest import REPO, require_tool
from tests.synthetic import couch_phantom

DEFAULT = REPO / "models" / "default"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(load_model_package(DEFAULT))


def test_committed_network_is_what_the_script_builds() -> None:
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from build_default_model import build

    assert build().SerializeToString() == (DEFAULT / "model.onnx").read_bytes()
    package = load_model_package(DEFAULT)
    assert [label.name for label in package.manifest.labels] == ["External", "Lung_L", "Lung_R"]
    # What it covers, and what contour QA expects of it (the body regions are those tests/region_phantoms.py and
    # the real CTs of tests/pipeline/test_real_ct.py try it on).
    assert package.manifest.model.regions == ["head", "neck", "thorax", "abdomen", "pelvis", "limbs"]
    assert {label.name: label.volume_ml for label in package.manifest.labels} == {
        "External": (500, 150000), "Lung_L": (50, 4500), "Lung_R": (50, 5000)}


def test_phantom_with_couch(predictor: Predictor) -> None:
    volume, truth = couch_phantom()
    prediction = predictor.predict(volume)
    assert dice(prediction.mask("External"), truth["External"]) >= 0.95
    assert dice(prediction.mask("Lung_L"), truth["Lung_L"]) >= 0.90
    assert dice(prediction.mask("Lung_R"), truth["Lung_R"]) >= 0.90
    below_the_back = (np.arange(volume.shape[1]) - 128) * 1.5 >= 120  # couch foam and lower shell: y >= 120 mm
    assert not prediction.mask("External")[:, below_the_back, :].any(), "the couch was taken for the patient"


def _read_mha_bits(path: Path, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    raw = path.read_bytes()
    header_end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header = raw[:header_end].decode()
    channels = int(header.split("ElementNumberOfChannels = ")[1].split()[0]) if "ElementNumberOfChannels" in header \
        else 1
    data = np.frombuffer(raw[header_end:], dtype=np.uint8).reshape(*shape_zyx, channels)
    return data[..., 0]


def test_plastimatch_synthetic_lung(tmp_path: Path, predictor: Predictor) -> None:
    subprocess.run([require_tool("plastimatch"), "synth", "--pattern", "lung", "--output", str(tmp_path / "ct.mha"),
                    "--output-ss-img", str(tmp_path / "ss.mha"), "--output-ss-list", str(tmp_path / "ss.txt"),
                    "--output-dicom", str(tmp_path / "dicom"), "--dim", "170 170 70", "--spacing", "3 3 4",
                    "--output-type", "short"], check=True, capture_output=True, timeout=120)
    names = {line.split("|")[2]: int(line.split("|")[0]) for line in (tmp_path / "ss.txt").read_text().splitlines()}
    slices = [pydicom.dcmread(p) for p in sorted((tmp_path / "dicom").glob("image*.dcm"))]
    volume = volume_from_datasets(slices)
    bits = _read_mha_bits(tmp_path / "ss.mha", volume.shape)
    body, lungs = (bits >> names["Body"]) & 1 == 1, (bits >> names["Lung"]) & 1 == 1
    x = volume.affine[0, 2] * np.arange(volume.shape[2]) + volume.affine[0, 3]
    middle = x[lungs.any(axis=(0, 1))].mean()
    truth_left, truth_right = lungs & (x > middle), lungs & (x <= middle)
    prediction = predictor.predict(volume)
    scores = {"External": dice(prediction.mask("External"), body),
              "Lung_L": dice(prediction.mask("Lung_L"), truth_left),
              "Lung_R": dice(prediction.mask("Lung_R"), truth_right)}
    print(f"plastimatch lung phantom Dice: {scores}")
    assert scores["External"] >= 0.95
    assert scores["Lung_L"] >= 0.90 and scores["Lung_R"] >= 0.90
