"""The default model's External and lungs on what the real data here lacks (issue 17).

Each scene of :mod:`tests.region_phantoms` (curved PET/CT couch with pad, air pockets and blanket; flat RT couch
with indexing bar and mattress; vacuum bag; thermoplastic mask and head rest; bowel and stomach gas; pelvis with
the legs apart; trachea above the carina) knows its skin outline and its lungs. The model runs in-process, as
:mod:`tests.inference.test_default_model` runs it, once per scene; ``pytest -s`` prints the figures. The thresholds are
the issue's: External Dice >= 0.97, no lung voxel outside the known lungs (within one model voxel), lungs Dice
>= 0.95 where present and none elsewhere; one more holds the External off what the patient lies on. One scan
without lung also goes through a real node, to show that it delivers the External alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from gateway.inference.manifest import load_model_package
from gateway.inference.predictor import Prediction, Predictor
from gateway.inference.volume import Volume
from tests.conftest import REPO, NodeProcess
from tests.pipeline.test_e2e import send
from tests.region_phantoms import SCENES, curved_couch_abdomen
from tests.synthetic import write_volume_series

DEFAULT = REPO / "models" / "default"
LUNGS = ("Lung_L", "Lung_R")
#: The issue's thresholds.
EXTERNAL_DICE, LUNG_DICE = 0.97, 0.95
#: How far (mm) a predicted lung voxel may lie outside the known lungs in-plane; and one slice along z.
LUNG_TOLERANCE_MM = 3.0
#: How much External (ml) may lie how far (mm: two model voxels) outside the skin.
ASTRAY_ML, ASTRAY_MM = 1.0, 6.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def lung_tolerance(truth: dict[str, np.ndarray], spacing: tuple[float, float, float]) -> np.ndarray:
    """Where a lung voxel may be: the known lungs dilated by 3 mm in-plane and one slice, and the "don't care"
    bronchi below the carina. The model decides on a 3 mm grid, so one of its voxels may straddle a lung's edge."""
    reach = [int(LUNG_TOLERANCE_MM // s) for s in spacing[1:]]
    rows, columns = np.mgrid[-reach[0]:reach[0] + 1, -reach[1]:reach[1] + 1]
    disc = (rows * spacing[1]) ** 2 + (columns * spacing[2]) ** 2 <= LUNG_TOLERANCE_MM ** 2 + 1e-6
    lungs = truth["Lung_L"] | truth["Lung_R"]
    allowed: np.ndarray = ndimage.binary_dilation(lungs, np.stack([disc] * 3)) | truth["Lung_ignore"]
    return allowed


@dataclass(frozen=True)
class Outcome:
    """One scene, its truth and what the default model made of it."""

    name: str
    volume: Volume
    truth: dict[str, np.ndarray]
    prediction: Prediction

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.volume.spacing)) / 1000

    @property
    def has_lungs(self) -> bool:
        return bool(self.truth["Lung_L"].any() or self.truth["Lung_R"].any())

    def external_dice(self) -> float:
        return dice(self.prediction.mask("External"), self.truth["External"])

    def lung_dice(self, name: str) -> float:
        """Dice of one lung, the "don't care" bronchi left out of both sides."""
        counted = ~self.truth["Lung_ignore"]
        return dice(self.prediction.mask(name) & counted, self.truth[name] & counted)

    def external_astray_ml(self) -> float:
        """The External's volume more than ``ASTRAY_MM`` outside the skin (in-plane)."""
        sampling = self.volume.spacing[1:]
        beyond = np.stack([ndimage.distance_transform_edt(~plane, sampling=sampling) > ASTRAY_MM
                           for plane in self.truth["External"]])
        return float((self.prediction.mask("External") & beyond).sum() * self.voxel_ml)

    def lung_outside(self) -> np.ndarray:
        """Predicted lung voxels (either side) beyond the tolerance around the known lungs."""
        predicted = self.prediction.mask("Lung_L") | self.prediction.mask("Lung_R")
        outside: np.ndarray = predicted & ~lung_tolerance(self.truth, self.volume.spacing)
        return outside

    def summary(self) -> str:
        external, truth = self.prediction.mask("External"), self.truth["External"]
        extra, missing = (external & ~truth).sum() * self.voxel_ml, (truth & ~external).sum() * self.voxel_ml
        lungs = ", ".join(f"{name} Dice {self.lung_dice(name):.4f}" if self.has_lungs
                          else f"{name} {self.prediction.voxels[name] * self.voxel_ml:.0f} ml" for name in LUNGS)
        return (f"{self.name}: External Dice {self.external_dice():.4f} (+{extra:.0f} ml outside the skin, "
                f"{self.external_astray_ml():.1f} ml of it beyond {ASTRAY_MM:.0f} mm; -{missing:.0f} ml of the "
                f"patient), {lungs}, lung outside the known lungs {self.lung_outside().sum() * self.voxel_ml:.1f} ml")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(load_model_package(DEFAULT))


@pytest.fixture(scope="module", params=list(SCENES))
def scene(request: pytest.FixtureRequest, predictor: Predictor) -> Outcome:
    """Each scene built and segmented once for all the tests on it."""
    volume, truth = SCENES[request.param]()
    outcome = Outcome(request.param, volume, truth, predictor.predict(volume))
    print(f"\n{outcome.summary()}")
    return outcome


def test_external_is_the_skin_outline(scene: Outcome) -> None:
    """Dice >= 0.97 against the skin: arms and legs in, couch, pads, bags, blankets, masks and air gaps out."""
    assert scene.external_dice() >= EXTERNAL_DICE, scene.summary()


def test_external_keeps_off_what_the_patient_lies_on(scene: Outcome) -> None:
    """Under 1 ml of the External lies more than 6 mm (two model voxels) outside the skin. A Dice of 0.97 alone
    would pass an External that keeps an indexing bar (300 ml beside some 10 l of patient) or a head rest's
    edge; the issue wants couch tops, pads, bags, blankets, masks and head rests left out, whole."""
    assert scene.external_astray_ml() < ASTRAY_ML, scene.summary()


def test_no_lung_outside_the_known_lungs(scene: Outcome) -> None:
    """Not one predicted lung voxel (either side) beyond 3 mm in-plane and one slice of the known lungs (the
    model works on a 3 mm grid, so one of its voxels may straddle the lung's edge): none in pads, bags, bowel
    gas, stomach, sinuses, the trachea above the carina, or outside the External."""
    outside = scene.lung_outside()
    where = np.argwhere(outside)
    assert not outside.any(), (f"{scene.summary()}; {len(where)} voxels, first (z, y, x) indices "
                               f"{where[:5].tolist()}")


def test_lungs_only_where_there_is_lung(scene: Outcome) -> None:
    """Lungs: Dice >= 0.95 each where the scan has them; otherwise no voxel of either, and the prediction says
    both are empty (so no empty ROI is written)."""
    if scene.has_lungs:
        for name in LUNGS:
            assert scene.lung_dice(name) >= LUNG_DICE, scene.summary()
    else:
        assert [scene.prediction.voxels[name] for name in LUNGS] == [0, 0], scene.summary()
        assert set(LUNGS) <= set(scene.prediction.empty), scene.summary()


@pytest.mark.timeout(240)
def test_scan_without_lung_delivers_the_external_alone(node_factory: Callable[..., NodeProcess],
                                                       tmp_path: Path) -> None:
    """The issue's scan (an upper abdomen on a curved PET/CT couch, no lungs) through a real node: sent, with
    one ROI, External, in the RTSTRUCT; the lungs are left out, each with a ``structure_empty`` warning."""
    volume, _ = curved_couch_abdomen()
    ct = write_volume_series(tmp_path / "ct", volume, series_description="PET/CT abdomen 3mm")
    node = node_factory(destinations=[{"name": "folder", "type": "folder"}],
                        routes=[{"name": "abdomen", "match": {"Modality": "CT"}, "model": "default",
                                 "destinations": ["folder"]}])
    send(node, ct.files)
    done = node.wait_for("job_done", timeout=180)
    assert done["state"] == "sent", node.log_text()[-3000:]
    [exported] = (node.data_dir / "export" / "folder").glob("*.dcm")
    rtstruct = pydicom.dcmread(exported)
    assert [str(roi.ROIName) for roi in rtstruct.StructureSetROISequence] == ["External"]
    [external] = rtstruct.ROIContourSequence
    assert len(external.ContourSequence) >= len(ct.files) - 2  # the body is in (almost) every slice
    empty = sorted((e["structure"], e["level"]) for e in node.events() if e["event"] == "structure_empty")
    assert empty == [("Lung_L", "warning"), ("Lung_R", "warning")], empty
