"""Contour QA end to end on real chest CT (issue 19): the default model's contours pass every check in the four
patient positions, and faults injected into a model package (or into the scan) are flagged with the right reason
and nothing else.

The packages are the shipped default network with ONNX nodes appended (:mod:`tests.onnx_models`), loaded with
:func:`load_model_package` and run by the :class:`Predictor` on the CT as DICOM; every assertion is the exact set of
(structure, outcome, reason) of the findings that did not pass.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from gateway.inference.manifest import ModelPackage, load_model_package
from gateway.inference.orientation import orientation_code
from gateway.inference.predictor import Predictor
from gateway.inference.tiling import window_steps
from gateway.inference.volume import Volume, volume_from_datasets
from gateway.rt.plausibility import Finding, Outcome, check_structures
from gateway.rt.qa_picture import qa_picture
from tests import onnx_models
from tests.realct import PATIENT_POSITIONS, real_chest_ct, real_chest_ct_positioned

Flagged = set[tuple[str, str, str | None]]

TOUCHING: Flagged = {("Lung_L", "warn", "touches_scan_edge"), ("Lung_R", "warn", "touches_scan_edge")}
#: What the default model's clean contours are flagged with: lung1 ends in the lower lobes (both lungs reach its
#: first slice, which is worth a warning); lung2 covers both lungs whole.
CLEAN: dict[str, Flagged] = {"lung1": TOUCHING, "lung2": set()}
#: The axis directions (slice, row, column) of the volume read back, for each patient position.
AXES = {"HFS": "SPL", "FFS": "IPR", "HFP": "SAR", "FFP": "IAL"}
#: Checks measured along gravity, which Patient Position turns: their figures differ between positions by design.
ALONG_GRAVITY = ("below_table",)
#: Tile slices the hole-punching network zeroes: the middle of the default's 32-slice tile, which no
#: neighbouring tile shares at an overlap of 0.25 (checked in the test).
HOLE = [14, 15, 16]
#: Tile column from which the split network calls the lungs left: lung1's right lung ends at model column 45 and
#: its left lung starts at 53 (the scan sits at the tile's first column; 3 mm columns).
LEFT_FROM = 49
#: In-plane pixels of the chest CTs averaged into one (0.57 / 0.63 mm become 1.14 / 1.25 mm, still finer than the
#: model's 3 mm): a quarter of the DICOM to write and read, the same findings.
DOWNSAMPLE = 2


def _flagged(findings: list[Finding]) -> Flagged:
    return {(f.structure, f.outcome.value, f.reason) for f in findings if f.outcome is not Outcome.PASS}


def _read(files: list[Path]) -> Volume:
    return volume_from_datasets([pydicom.dcmread(path) for path in files])


def _contour(predictor: Predictor, volume: Volume) -> tuple[list[Finding], dict[str, np.ndarray]]:
    prediction = predictor.predict(volume)
    masks = {name: prediction.mask(name) for name in prediction.values}
    # As the structure stage does: with the model's confidence and the gaps to pieces post-processing discarded.
    return check_structures(volume, masks, predictor.manifest, prediction.confidence, prediction.split_mm), masks


@pytest.fixture(scope="module")
def default() -> Predictor:
    return Predictor(load_model_package(onnx_models.DEFAULT_PACKAGE))


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str | None], Volume]:
    """The chest CT *source* as plastimatch writes it (position ``None``: HFS) or in a patient position, read back
    from DICOM; each written once per module."""
    read: dict[tuple[str, str | None], Volume] = {}

    def scan(source: str, position: str | None = None) -> Volume:
        if (source, position) not in read:
            folder = tmp_path_factory.mktemp(f"{source}-{position or 'plastimatch'}")
            series = (real_chest_ct(folder, source=source, downsample=DOWNSAMPLE) if position is None
                      else real_chest_ct_positioned(folder, position, source=source, downsample=DOWNSAMPLE))
            read[source, position] = _read(series.files)
        return read[source, position]

    return scan


@pytest.fixture(scope="module")
def contoured(scans: Callable[[str, str | None], Volume],
              default: Predictor) -> Callable[[str, str | None], list[Finding]]:
    """The checks of the default model's contours on :func:`scans`' CT, each run once per module."""
    found: dict[tuple[str, str | None], list[Finding]] = {}

    def findings(source: str, position: str | None = None) -> list[Finding]:
        if (source, position) not in found:
            found[source, position] = _contour(default, scans(source, position))[0]
        return found[source, position]

    return findings


@pytest.fixture(scope="module")
def lung1(scans: Callable[[str, str | None], Volume]) -> Volume:
    return scans("lung1", None)


# --- four patient positions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", sorted(PATIENT_POSITIONS))
@pytest.mark.parametrize("source", ["lung1", "lung2"])
def test_each_position_puts_the_same_hu_at_every_patient_coordinate(
        scans: Callable[[str, str | None], Volume], source: str, position: str) -> None:
    """Headers and pixels rewritten for the position: every voxel read back lies on a voxel of the original,
    at the same patient (LPS) position, with the same HU."""
    original, turned = scans(source, None), scans(source, position)
    assert turned.patient_position == position
    assert orientation_code(turned.affine) == AXES[position]
    sample = np.random.default_rng(0).integers(0, turned.shape, size=(2000, 3))
    lps = turned.to_patient(sample)
    found = (np.linalg.inv(original.affine) @ np.column_stack([lps, np.ones(len(lps))]).T).T[:, :3]
    assert np.allclose(found, np.round(found), atol=1e-3)
    found = np.round(found).astype(int)
    assert (found >= 0).all() and (found < original.shape).all()
    assert np.array_equal(turned.hu[tuple(sample.T)], original.hu[tuple(found.T)])
    # all voxels: the map from voxel to voxel is a mirroring of axes, so whole arrays compare
    to_original = np.round(np.linalg.inv(original.affine) @ turned.affine)
    axes = [int(np.argmax(np.abs(to_original[axis, :3]))) for axis in range(3)]
    lookup = [(to_original[axis, 3] + to_original[axis, axes[axis]] * np.arange(turned.shape[axes[axis]]))
              .astype(int) for axis in range(3)]
    assert np.array_equal(np.transpose(turned.hu, axes), original.hu[np.ix_(*lookup)])


@pytest.mark.parametrize("position", sorted(PATIENT_POSITIONS))
def test_the_scanner_numbers_slices_in_acquisition_order(tmp_path: Path, position: str) -> None:
    """Head first from the head down, feet first from the feet up: Instance Number 1 is the first slice scanned."""
    series = real_chest_ct_positioned(tmp_path, position, slices=12, downsample=8)
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
    assert [int(ds.InstanceNumber) for ds in headers] == list(range(1, 13))
    heights = [float(ds.ImagePositionPatient[2]) for ds in headers]
    assert heights == sorted(heights, reverse=position.startswith("HF"))
    assert {(ds.PatientPosition, tuple(float(v) for v in ds.ImageOrientationPatient)) for ds in headers} == \
        {(position, (*PATIENT_POSITIONS[position][0], *PATIENT_POSITIONS[position][1]))}


@pytest.mark.parametrize("position", sorted(PATIENT_POSITIONS))
@pytest.mark.parametrize("source", ["lung1", "lung2"])
def test_the_default_contours_pass_every_check_in_every_position(
        contoured: Callable[[str, str | None], list[Finding]], source: str, position: str) -> None:
    """No false alarm whichever way the patient lay: only the scan range's warnings, the left lung on the
    patient's left (+x in LPS), and the same figures as the scan as plastimatch wrote it (head first supine)."""
    findings = contoured(source, position)
    assert _flagged(findings) == CLEAN[source]
    lateral = {f.structure: f.value for f in findings if f.check == "laterality"}
    assert lateral["Lung_L"] > 50 and lateral["Lung_R"] < -50  # mm from the body's midline, towards each side
    reference = contoured(source, None)
    assert [(f.structure, f.check, f.outcome) for f in findings] == \
        [(f.structure, f.check, f.outcome) for f in reference]
    same_anatomy = [index for index, f in enumerate(reference) if f.check not in ALONG_GRAVITY]
    assert [findings[index].value for index in same_anatomy] == \
        pytest.approx([reference[index].value for index in same_anatomy], abs=0.2)


# --- faults in a model package --------------------------------------------------------------------------------


def _package(folder: Path, network: Callable[[Path], None], labels: list[dict[str, Any]]) -> ModelPackage:
    network(folder / "model.onnx")
    return load_model_package(onnx_models.default_manifest(folder, labels))


def _labels(drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The default manifest's labels without the keys *drop*."""
    return [{key: value for key, value in label.items() if key not in drop} for label in onnx_models.default_labels()]


@pytest.mark.parametrize("swapped", [False, True], ids=["clean", "swapped"])
def test_left_and_right_channels_swapped_fail_laterality_and_nothing_else(
        tmp_path: Path, lung1: Volume, swapped: bool) -> None:
    """A network with a channel per lung, named Lung_L and Lung_R (side from the TG-263 suffix, no ``side``)."""
    package = _package(tmp_path, lambda path: onnx_models.split_lungs_network(path, LEFT_FROM, swapped=swapped),
                       _labels(drop=("channel", "side")))
    assert package.manifest.channels == 3
    findings, _masks = _contour(Predictor(package), lung1)
    swapped_flags = {("Lung_L", "fail", "laterality_swapped"), ("Lung_R", "fail", "laterality_swapped")}
    assert _flagged(findings) == CLEAN["lung1"] | (swapped_flags if swapped else set())
    lateral = {f.structure: f.value for f in findings if f.check == "laterality"}
    assert (lateral["Lung_L"] < -50 and lateral["Lung_R"] > 50) if swapped else \
        (lateral["Lung_L"] > 50 and lateral["Lung_R"] < -50)


@pytest.mark.parametrize("voxels", [0, 30], ids=["in_place", "90mm_anterior"])
def test_lungs_shifted_out_of_the_body_fail_inside_external(tmp_path: Path, lung1: Volume, voxels: int) -> None:
    """The lung channel moved anteriorly, through the chest wall, by a manifest without ``within = "External"``
    (which would have cut away what left the body); in place, that manifest passes as the default does."""
    package = _package(tmp_path, lambda path: onnx_models.shifted_lungs_network(path, voxels),
                       _labels(drop=("within",)))
    findings, _masks = _contour(Predictor(package), lung1)
    outside = {("Lung_L", "fail", "outside_external"), ("Lung_R", "fail", "outside_external")}
    assert _flagged(findings) == CLEAN["lung1"] | (outside if voxels else set())


@pytest.mark.parametrize("source", ["lung1", "lung2"])
def test_a_scan_cut_through_the_lungs_warns_of_truncation_only(
        tmp_path: Path, default: Predictor, source: str) -> None:
    """A data fault: the clean default model on the scan less its upper slices (lung1: 20 of 48, lung2: 26 of 61),
    so that it ends in the middle of the lungs."""
    series = real_chest_ct(tmp_path, source=source, downsample=DOWNSAMPLE)
    datasets = sorted((pydicom.dcmread(path) for path in series.files),
                      key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = volume_from_datasets(datasets[:{"lung1": 28, "lung2": 35}[source]])
    findings, masks = _contour(default, volume)
    assert _flagged(findings) == TOUCHING
    assert masks["Lung_L"][-1].any() and masks["Lung_R"][-1].any()  # both lungs reach the scan's new top


@pytest.mark.parametrize("labels", [(), ("keep_largest_component",)], ids=["as_shipped", "every_component_kept"])
def test_a_hole_of_empty_slices_fails_continuity(tmp_path: Path, lung1: Volume, labels: tuple[str, ...]) -> None:
    """A network that returns no lung on three slices in the middle of each tile: the lungs have holes of empty
    slices, whatever the manifest's post-processing does with the pieces."""
    package = _package(tmp_path, lambda path: onnx_models.gapped_lungs_network(path, HOLE), _labels(drop=labels))
    predictor = Predictor(package)
    spec = package.manifest.input
    depth = predictor.grid_shapes(lung1.shape, lung1.spacing)[-1][0]  # model slices (S is the model's first axis)
    starts = window_steps(depth, spec.patch_size[0], spec.overlap)
    shared = {k for a, b in itertools.pairwise(starts) for k in range(b, a + spec.patch_size[0])}
    holes = [start + k for start in starts for k in HOLE]
    assert len(starts) > 1 and not shared & set(holes)  # no other tile fills them in
    lungs = predictor.probabilities(lung1)[1]
    assert lungs[holes].max() == 0 and lungs[holes[0] - 1].max() > 0.5  # the fault is real
    findings, _masks = _contour(predictor, lung1)
    # As shipped, keeping the largest component leaves the middle piece of each lung, which no longer reaches the
    # end of the scan; the gap to the pieces it discarded is what flags it.
    edges = CLEAN["lung1"] if labels else set()
    assert _flagged(findings) == edges | {("Lung_L", "fail", "empty_slices_inside"),
                                          ("Lung_R", "fail", "empty_slices_inside")}
    gaps = {f.structure: f.value for f in findings if f.check == "continuity" and f.structure != "External"}
    assert min(gaps.values()) >= 1, gaps  # empty CT slices


# --- the QA picture on real CT --------------------------------------------------------------------------------


def _patient_coordinates(volume: Volume) -> list[np.ndarray]:
    """Each voxel's LPS x, y and z, as arrays that broadcast over the volume (its axes run along LPS axes)."""
    coordinates: list[np.ndarray] = [np.empty(0)] * 3
    for axis in range(3):
        component = int(np.argmax(np.abs(volume.affine[:3, axis])))
        shape = [1, 1, 1]
        shape[axis] = volume.shape[axis]
        steps = np.arange(volume.shape[axis]) * volume.affine[component, axis]
        coordinates[component] = (volume.affine[component, 3] + steps).reshape(shape)
    return coordinates


@pytest.mark.parametrize("position", ["FFS", "HFP", "FFP"])
def test_the_qa_picture_of_a_real_ct_is_the_same_in_every_patient_position(
        scans: Callable[[str, str | None], Volume], position: str) -> None:
    """The chest CT on which the coronal and sagittal panels came out upside down: a marker in the patient's upper
    left (placed in patient coordinates) and the body, drawn from the scan in *position*, give the picture of the
    scan head first supine pixel for pixel, the marker at the top right of its coronal panel (whose drawing
    tests/rt/test_qa_picture.py checks on every axis order)."""
    reference = scans("lung1", "HFS")
    x, _, z = _patient_coordinates(reference)
    body = reference.hu > -500
    middle = float(np.mean(np.broadcast_to(x, reference.shape)[body]))
    top = float(np.broadcast_to(z, reference.shape)[body].max())

    def picture(volume: Volume) -> np.ndarray:
        px, _, pz = _patient_coordinates(volume)
        inside = volume.hu > -500
        marker = inside & (px > middle + 40) & (pz > top - 60)  # crosses the coronal panel, at its top right
        drawn = qa_picture(volume, {"Body": inside, "Marker": marker}, {"Body": (0, 0, 255), "Marker": (255, 0, 0)})
        return np.asarray(Image.open(io.BytesIO(drawn)))

    expected = picture(reference)
    rows, columns = np.nonzero(np.all(expected == (255, 0, 0), axis=2))
    width = expected.shape[1] // 3  # axial, coronal, sagittal
    assert len(rows) > 100  # drawn in the coronal panel only, in its upper right: head up, the left on the right
    assert rows.max() < expected.shape[0] // 2 and (columns >= width + width // 2).all() and (columns < 2 * width).all()
    assert np.array_equal(picture(scans("lung1", position)), expected)
