"""Plausibility checks on the default model's contours of real chest CTs: clean cases pass, injected faults are
flagged with the right reason and nothing else, whatever way the volume's axes run and the patient lies."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from gateway.inference.manifest import ModelManifest, load_model_package
from gateway.inference.predictor import Prediction, Predictor
from gateway.inference.volume import Volume, volume_from_datasets
from gateway.rt.plausibility import Finding, Outcome, check_structures, expected_side
from tests.conftest import REPO
from tests.realct import real_chest_ct
from tests.synthetic import stored_along

DEFAULT = REPO / "models" / "default"


@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    return load_model_package(DEFAULT).manifest


@pytest.fixture(scope="module", params=["lung1", "lung2"])
def predicted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, Prediction]:
    """A real chest CT (supine, head first) and the default model's prediction on it."""
    folder: Path = tmp_path_factory.mktemp(request.param)
    series = real_chest_ct(folder, source=request.param)
    volume = volume_from_datasets([pydicom.dcmread(path) for path in series.files])
    return volume, Predictor(load_model_package(DEFAULT)).predict(volume)


@pytest.fixture(scope="module")
def contoured(predicted: tuple[Volume, Prediction]) -> tuple[Volume, dict[str, np.ndarray]]:
    """A real chest CT and the default model's masks on it."""
    volume, prediction = predicted
    return volume, {name: prediction.mask(name) for name in prediction.values}


def _flagged(findings: list[Finding]) -> set[tuple[str, str, str | None]]:
    return {(f.structure, f.outcome.value, f.reason) for f in findings if f.outcome is not Outcome.PASS}


def _inner(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The masks without the slices at either end of the scan (lungs in these CTs reach the scan range)."""
    return {name: np.concatenate([np.zeros_like(mask[:1]), mask[1:-1], np.zeros_like(mask[:1])])
            for name, mask in masks.items()}


def test_the_clean_contours_pass_every_check(contoured: tuple[Volume, dict[str, np.ndarray]],
                                             predicted: tuple[Volume, Prediction], manifest: ModelManifest) -> None:
    volume, masks = contoured
    confidence = predicted[1].confidence
    as_scanned = _flagged(check_structures(volume, masks, manifest, confidence))
    # These scans cover part of the chest: each lung reaches one end of the scan range, which is worth a warning.
    assert as_scanned <= {("Lung_L", "warn", "touches_scan_edge"), ("Lung_R", "warn", "touches_scan_edge")}
    findings = check_structures(volume, _inner(masks), manifest, confidence)
    assert _flagged(findings) == set()
    checks = {(f.structure, f.check) for f in findings}
    assert {("Lung_L", "laterality"), ("Lung_R", "laterality"), ("Lung_L", "volume"), ("External", "volume"),
            ("Lung_L", "inside_external"), ("Lung_R", "continuity"), ("Lung_L", "overlap:Lung_R"),
            ("Lung_L", "below_table"), ("Lung_R", "below_table"), ("External", "confidence"),
            ("Lung_L", "confidence"), ("Lung_R", "confidence")} <= checks
    lateral = {f.structure: f.value for f in findings if f.check == "laterality"}
    assert lateral["Lung_L"] > 50 and lateral["Lung_R"] < -50  # mm from the body's midline, towards each side
    below = {f.structure: f.value for f in findings if f.check == "below_table"}
    assert below["Lung_L"] < -15 and below["Lung_R"] < -15  # mm: the lungs end well inside the back
    sure = {f.structure: f.value for f in findings if f.check == "confidence"}
    assert sure["External"] > 0.7 and sure["Lung_L"] > 0.9 and sure["Lung_R"] > 0.9  # the mean probabilities
    assert "below_table" not in {f.check for f in findings if f.structure == "External"}
    assert "confidence" not in {f.check for f in check_structures(volume, masks, manifest)}  # no figures, no check


def test_lungs_reaching_the_scan_range_may_be_cut_off(contoured: tuple[Volume, dict[str, np.ndarray]],
                                                      manifest: ModelManifest) -> None:
    volume, masks = contoured
    cut = {name: mask.copy() for name, mask in _inner(masks).items()}
    top = int(np.flatnonzero(cut["Lung_R"].any(axis=(1, 2)))[len(np.flatnonzero(cut["Lung_R"].any(axis=(1, 2)))) // 2])
    cut = {name: mask[top:] for name, mask in cut.items()}  # the scan starts in the middle of the lungs
    cropped = replace(volume, hu=volume.hu[top:], affine=_shifted(volume.affine, top),
                      sop_instance_uids=volume.sop_instance_uids[top:])
    flagged = _flagged(check_structures(cropped, cut, manifest))
    assert flagged == {("Lung_L", "warn", "touches_scan_edge"), ("Lung_R", "warn", "touches_scan_edge")}


def test_left_and_right_swapped_fail_laterality_and_nothing_else(
        contoured: tuple[Volume, dict[str, np.ndarray]], manifest: ModelManifest) -> None:
    volume, masks = contoured
    swapped = _inner(masks)
    swapped["Lung_L"], swapped["Lung_R"] = swapped["Lung_R"], swapped["Lung_L"]
    flagged = _flagged(check_structures(volume, swapped, manifest))
    assert flagged == {("Lung_L", "fail", "laterality_swapped"), ("Lung_R", "fail", "laterality_swapped")}


def test_a_lung_moved_out_of_the_body_is_flagged(contoured: tuple[Volume, dict[str, np.ndarray]],
                                                 manifest: ModelManifest) -> None:
    volume, masks = contoured
    moved = _inner(masks)
    first_row = int(np.flatnonzero(moved["Lung_L"].any(axis=(0, 2)))[0])
    moved["Lung_L"] = np.roll(moved["Lung_L"], -first_row, axis=1)  # anterior, through the chest wall
    lung = moved["Lung_L"]
    assert (lung & ~moved["External"]).sum() > 0.15 * lung.sum()  # the fault is real: a sixth or more in the air
    flagged = _flagged(check_structures(volume, moved, manifest))
    assert ("Lung_L", "fail", "outside_external") in flagged
    assert {item for item in flagged if item[0] != "Lung_L"} == set()


def test_a_hole_of_empty_slices_a_tiny_lung_and_an_overlap_are_flagged(
        contoured: tuple[Volume, dict[str, np.ndarray]], manifest: ModelManifest) -> None:
    volume, masks = contoured
    faulty = _inner(masks)
    slices = np.flatnonzero(faulty["Lung_R"].any(axis=(1, 2)))
    faulty["Lung_R"][slices[len(slices) // 2]:slices[len(slices) // 2] + 2] = False
    left = np.flatnonzero(faulty["Lung_L"].any(axis=(1, 2)))
    tiny = np.zeros_like(faulty["Lung_L"])
    middle = left[len(left) // 2]
    row, column = np.argwhere(faulty["Lung_L"][middle])[0]
    tiny[middle, row:row + 20, column:column + 20] = faulty["Lung_L"][middle, row:row + 20, column:column + 20]
    faulty["Lung_L"] = tiny  # a patch of one slice: far below any lung's volume
    faulty["Lung_R"][middle] |= tiny[middle]  # and the right lung claims it too
    flagged = _flagged(check_structures(volume, faulty, manifest))
    assert flagged == {("Lung_R", "fail", "empty_slices_inside"), ("Lung_L", "fail", "volume_too_small"),
                       ("Lung_L", "fail", "overlaps_exclusive_structure"),
                       ("Lung_R", "fail", "overlaps_exclusive_structure")}


@pytest.mark.parametrize("flip", [(0,), (2,), (1, 2), (0, 1, 2)], ids=["feet_first", "mirrored", "prone", "all"])
def test_the_same_anatomy_stored_along_other_axes_gives_the_same_findings(
        contoured: tuple[Volume, dict[str, np.ndarray]], manifest: ModelManifest, flip: tuple[int, ...]) -> None:
    """Arrays running the other way (feet first, prone, mirrored columns) with a matching affine: LPS is unchanged,
    so laterality and every other figure are too; swapping the lungs still fails."""
    volume, masks = contoured
    clean = _inner(masks)
    turned, flipped = stored_along(volume, clean, flip)
    expected = check_structures(volume, clean, manifest)
    found = check_structures(turned, flipped, manifest)
    assert [(f.structure, f.check, f.outcome) for f in found] == [(f.structure, f.check, f.outcome) for f in expected]
    assert [f.value for f in found] == pytest.approx([f.value for f in expected], abs=0.2)
    flipped["Lung_L"], flipped["Lung_R"] = flipped["Lung_R"], flipped["Lung_L"]
    assert ("Lung_L", "fail", "laterality_swapped") in _flagged(check_structures(turned, flipped, manifest))


@pytest.mark.parametrize("position", ["HFDL", "FFDR"])
def test_on_its_side_with_rows_and_columns_swapped_laterality_is_unchanged(
        contoured: tuple[Volume, dict[str, np.ndarray]], manifest: ModelManifest, position: str) -> None:
    """A decubitus scan: the image rows run along the patient's left-right axis and the columns front to back (the
    in-plane axes swapped, the affine to match). In LPS nothing moved: the same laterality figures, and swapped
    lungs still fail."""
    volume, masks = contoured
    clean = _inner(masks)
    affine = volume.affine.copy()
    affine[:, [1, 2]] = affine[:, [2, 1]]
    turned = replace(volume, hu=np.ascontiguousarray(volume.hu.transpose(0, 2, 1)), affine=affine,
                     patient_position=position)
    swapped = {name: np.ascontiguousarray(mask.transpose(0, 2, 1)) for name, mask in clean.items()}

    def laterality(findings: list[Finding]) -> list[tuple[str, Outcome, float]]:
        return [(f.structure, f.outcome, f.value) for f in findings if f.check == "laterality"]

    expected = laterality(check_structures(volume, clean, manifest))
    assert [(name, outcome) for name, outcome, _ in expected] == [("Lung_L", Outcome.PASS), ("Lung_R", Outcome.PASS)]
    found = laterality(check_structures(turned, swapped, manifest))
    assert [(n, o) for n, o, _ in found] == [(n, o) for n, o, _ in expected]
    assert [v for _, _, v in found] == pytest.approx([v for _, _, v in expected], abs=0.2)
    swapped["Lung_L"], swapped["Lung_R"] = swapped["Lung_R"], swapped["Lung_L"]
    assert ("Lung_L", "fail", "laterality_swapped") in _flagged(check_structures(turned, swapped, manifest))


def _padded(volume: Volume, masks: dict[str, np.ndarray], axis: int, mm: float) -> tuple[Volume, dict[str, np.ndarray]]:
    """The volume with *mm* more air on both sides along array *axis* (a larger field of view, so that a fault may
    reach beyond the body), the affine moved to match."""
    voxels = int(np.ceil(mm / volume.spacing[axis]))
    padding = [(0, 0)] * 3
    padding[axis] = (voxels, voxels)
    affine = volume.affine.copy()
    affine[:3, 3] -= affine[:3, axis] * voxels
    hu = np.pad(volume.hu, padding, constant_values=-1024)
    return replace(volume, hu=hu, affine=affine), {name: np.pad(mask, padding) for name, mask in masks.items()}


def _extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """The first and last index along array *axis* where *mask* is set."""
    present = np.flatnonzero(mask.any(axis=tuple(other for other in range(3) if other != axis)))
    return int(present[0]), int(present[-1])


def _dropped_to_the_couch(volume: Volume, masks: dict[str, np.ndarray],
                          beyond_mm: float) -> tuple[Volume, dict[str, np.ndarray]]:
    """Lung_L moved posteriorly until it reaches *beyond_mm* past the back of the External."""
    assert volume.affine[1, 1] > 0  # rows run towards posterior (LPS +y) in these scans
    roomy, moved = _padded(volume, _inner(masks), 1, beyond_mm + 10)
    shift = _extent(moved["External"], 1)[1] - _extent(moved["Lung_L"], 1)[1] + round(beyond_mm / volume.spacing[1])
    moved["Lung_L"] = np.roll(moved["Lung_L"], shift, axis=1)
    return roomy, moved


def test_a_lung_dropped_below_the_body_is_below_the_table(contoured: tuple[Volume, dict[str, np.ndarray]],
                                                          manifest: ModelManifest) -> None:
    """Supine: reaching 60 mm beyond the back of the body is reaching into the couch; the lung is then also partly
    outside the External, which the inside check reports as well."""
    volume, masks = contoured
    roomy, moved = _dropped_to_the_couch(volume, masks, 60.0)
    findings = check_structures(roomy, moved, manifest)
    assert _flagged(findings) == {("Lung_L", "fail", "below_table"), ("Lung_L", "fail", "outside_external")}
    [below] = [f for f in findings if f.structure == "Lung_L" and f.check == "below_table"]
    assert below.value == pytest.approx(60.0, abs=volume.spacing[1])


@pytest.mark.parametrize("flip", [(0,), (1,), (2,), (0, 1, 2)], ids=["feet_first", "prone", "mirrored", "all"])
def test_below_the_table_whatever_way_the_axes_run(contoured: tuple[Volume, dict[str, np.ndarray]],
                                                   manifest: ModelManifest, flip: tuple[int, ...]) -> None:
    volume, masks = contoured
    roomy, moved = _dropped_to_the_couch(volume, masks, 60.0)
    expected = check_structures(roomy, moved, manifest)
    found = check_structures(*stored_along(roomy, moved, flip), manifest)
    assert [(f.structure, f.check, f.outcome) for f in found] == [(f.structure, f.check, f.outcome) for f in expected]
    assert [f.value for f in found] == pytest.approx([f.value for f in expected], abs=0.2)


def test_prone_the_couch_is_in_front(contoured: tuple[Volume, dict[str, np.ndarray]],
                                     manifest: ModelManifest) -> None:
    """Head first prone (HFP): gravity runs anterior. A lung pushed out through the chest wall is now towards the
    couch; one dropped behind the back is not (but is still outside the body)."""
    volume, masks = contoured
    prone = replace(volume, patient_position="HFP")
    forward = _inner(masks)
    forward["Lung_L"] = np.roll(forward["Lung_L"], -_extent(forward["Lung_L"], 1)[0], axis=1)
    findings = check_structures(prone, forward, manifest)
    assert _flagged(findings) == {("Lung_L", "fail", "below_table"), ("Lung_L", "fail", "outside_external")}
    assert _flagged(check_structures(volume, forward, manifest)) == {("Lung_L", "fail", "outside_external")}
    roomy, behind = _dropped_to_the_couch(volume, masks, 60.0)
    assert _flagged(check_structures(replace(roomy, patient_position="HFP"), behind, manifest)) == {
        ("Lung_L", "fail", "outside_external")}
    clean = check_structures(prone, _inner(masks), manifest)
    assert _flagged(clean) == set()


@pytest.mark.parametrize(("position", "expected"), [("HFDR", "Lung_R"), ("FFDL", "Lung_L"), ("", None)])
def test_on_its_side_the_couch_is_under_the_lower_side(contoured: tuple[Volume, dict[str, np.ndarray]],
                                                       manifest: ModelManifest, position: str,
                                                       expected: str | None) -> None:
    """Decubitus: right side down, gravity runs to the patient's right (LPS -x); left side down, to the left. Both
    lungs pushed 30 mm out sideways: only the one on the lower side is towards the couch. No position: supine."""
    assert contoured[0].affine[0, 2] > 0  # columns run towards the patient's left (LPS +x) in these scans
    volume, pushed = _padded(*contoured, 2, 40.0)
    pushed = _inner(pushed)
    body = _extent(pushed["External"], 2)
    steps = round(30.0 / volume.spacing[2])
    pushed["Lung_R"] = np.roll(pushed["Lung_R"], body[0] - _extent(pushed["Lung_R"], 2)[0] - steps, axis=2)
    pushed["Lung_L"] = np.roll(pushed["Lung_L"], body[1] - _extent(pushed["Lung_L"], 2)[1] + steps, axis=2)
    flagged = _flagged(check_structures(replace(volume, patient_position=position), pushed, manifest))
    below = {structure for structure, _outcome, reason in flagged if reason == "below_table"}
    assert below == ({expected} if expected else set())


def test_side_comes_from_the_manifest_or_the_tg263_suffix(manifest: ModelManifest) -> None:
    labels = {label.name: label for label in manifest.labels}
    assert [expected_side(labels[name]) for name in ("External", "Lung_L", "Lung_R")] == [None, "left", "right"]
    assert expected_side(labels["External"].model_copy(update={"name": "Parotid_R"})) == "right"
    assert expected_side(labels["External"].model_copy(update={"name": "Kidney_L"})) == "left"


def _shifted(affine: np.ndarray, slices: int) -> np.ndarray:
    moved = affine.copy()
    moved[:3, 3] += affine[:3, 0] * slices
    return moved


def test_how_much_may_lie_outside_the_external_is_set_per_label(contoured: tuple[Volume, dict[str, np.ndarray]],
                                                                manifest: ModelManifest) -> None:
    volume, masks = contoured
    moved = _inner(masks)
    first_row = int(np.flatnonzero(moved["Lung_L"].any(axis=(0, 2)))[0])
    moved["Lung_L"] = np.roll(moved["Lung_L"], -first_row, axis=1)
    [share] = [f.value for f in check_structures(volume, moved, manifest)
               if (f.structure, f.check) == ("Lung_L", "inside_external")]
    outcomes = []
    for limits in [(share + 0.01, share + 0.02), (share - 0.01, share + 0.01), (0.0, share - 0.001)]:
        labels = [label.model_copy(update={"outside_external": limits}) if label.name == "Lung_L" else label
                  for label in manifest.labels]
        findings = check_structures(volume, moved, manifest.model_copy(update={"labels": labels}))
        [found] = [f for f in findings if (f.structure, f.check) == ("Lung_L", "inside_external")]
        outcomes.append((found.outcome, found.reason))
    assert outcomes == [(Outcome.PASS, None), (Outcome.WARN, "partly_outside_external"),
                        (Outcome.FAIL, "outside_external")]


def test_outside_external_limits_are_warn_then_fail() -> None:
    text = (REPO / "models" / "default" / "manifest.toml").read_text()
    bad = text.replace('name = "Lung_L"', 'name = "Lung_L"\noutside_external = [0.3, 0.1]', 1)
    with pytest.raises(ValueError, match="outside_external must be"):
        ModelManifest.model_validate(tomllib.loads(bad))
