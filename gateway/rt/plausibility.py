"""Plausibility checks of each structure, without ground truth: the systematic failures of AI contouring.

Judged on the masks on the CT grid in patient coordinates (LPS), after post-processing, against the model
manifest's expectations:

* ``laterality``: a left or right structure (manifest ``side``, else a TG-263 ``_L`` / ``_R`` suffix) has its
  centroid on that side of the External's midline, whatever the patient position (LPS is the patient's own frame);
* ``volume``: within the manifest's ``volume_ml`` range;
* ``inside_external``: the share of the structure outside the External;
* ``continuity``: no empty slice between the first and last slice of a structure marked ``contiguous``;
* ``truncation``: a structure touching the first or last slice of the scan may be cut off by the scan range;
* ``overlap``: structures a manifest marks ``exclusive_with`` each other share no voxel.

Each check gives ``pass``, ``warn`` or ``fail`` with a reason code and the measured figure; no patient data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from gateway.inference.manifest import Label, ModelManifest
from gateway.inference.volume import Volume

__all__ = ["Finding", "Outcome", "check_structures", "expected_side"]

#: Share of a structure outside the External from which it is flagged (warn) and failed.
_OUTSIDE_WARN, _OUTSIDE_FAIL = 0.02, 0.10
#: A centroid closer to the midline than this (mm) is not judged for laterality (a structure on the midline).
_MIDLINE_TOLERANCE_MM = 5.0


class Outcome(StrEnum):
    """What one check found."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """One check of one structure: its outcome, a reason code when not passed, and the figure measured."""

    structure: str
    check: str
    outcome: Outcome
    value: float
    reason: str | None = None


def expected_side(label: Label) -> str | None:
    """``left``, ``right`` or ``None``: the manifest's ``side``, else the TG-263 laterality suffix of the name."""
    if label.side is not None:
        return label.side
    if label.name.endswith("_L"):
        return "left"
    if label.name.endswith("_R"):
        return "right"
    return None


def check_structures(volume: Volume, masks: dict[str, np.ndarray], manifest: ModelManifest) -> list[Finding]:
    """Every applicable check of every non-empty structure in *masks* (label name -> boolean mask on the CT grid)."""
    labels = {label.name: label for label in manifest.labels}
    external = _external(masks, manifest)
    findings: list[Finding] = []
    for name, mask in masks.items():
        label = labels.get(name)
        if label is None or not mask.any():
            continue
        findings += _checks(volume, label, mask, masks, external)
    return findings


def _external(masks: dict[str, np.ndarray], manifest: ModelManifest) -> np.ndarray | None:
    names = [label.name for label in manifest.labels if label.interpreted_type == "EXTERNAL"]
    mask = masks.get(names[0]) if names else None
    return mask if mask is not None and mask.any() else None


def _checks(volume: Volume, label: Label, mask: np.ndarray, masks: dict[str, np.ndarray],
            external: np.ndarray | None) -> Iterator[Finding]:
    name = label.name
    if label.volume_ml is not None:
        yield _volume(volume, name, label.volume_ml, mask)
    if label.interpreted_type != "EXTERNAL":
        yield _truncation(name, mask)
        if external is not None:
            yield _inside(name, mask, external)
            side = expected_side(label)
            if side is not None:
                yield _laterality(volume, name, side, mask, external)
    if label.contiguous:
        yield _continuity(name, mask)
    for other in label.exclusive_with:
        if other in masks and masks[other].any():
            yield _overlap(volume, name, other, mask, masks[other])


def _volume(volume: Volume, name: str, expected: tuple[float, float], mask: np.ndarray) -> Finding:
    ml = float(mask.sum()) * _voxel_ml(volume)
    smallest, largest = expected
    if smallest <= ml <= largest:
        return Finding(name, "volume", Outcome.PASS, round(ml, 1))
    reason = "volume_too_small" if ml < smallest else "volume_too_large"
    return Finding(name, "volume", Outcome.FAIL, round(ml, 1), reason)


def _truncation(name: str, mask: np.ndarray) -> Finding:
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    touching = int(slices[0] == 0) + int(slices[-1] == mask.shape[0] - 1)
    if touching:
        return Finding(name, "truncation", Outcome.WARN, touching, "touches_scan_edge")
    return Finding(name, "truncation", Outcome.PASS, 0)


def _inside(name: str, mask: np.ndarray, external: np.ndarray) -> Finding:
    outside = float((mask & ~external).sum()) / float(mask.sum())
    if outside >= _OUTSIDE_FAIL:
        return Finding(name, "inside_external", Outcome.FAIL, round(outside, 4), "outside_external")
    if outside >= _OUTSIDE_WARN:
        return Finding(name, "inside_external", Outcome.WARN, round(outside, 4), "partly_outside_external")
    return Finding(name, "inside_external", Outcome.PASS, round(outside, 4))


def _laterality(volume: Volume, name: str, side: str, mask: np.ndarray, external: np.ndarray) -> Finding:
    """LPS x grows towards the patient's left: the signed distance of the centroid from the body's midline."""
    offset = _centroid_x(volume, mask) - _centroid_x(volume, external)
    towards_left = offset if side == "left" else -offset
    if towards_left >= _MIDLINE_TOLERANCE_MM:
        return Finding(name, "laterality", Outcome.PASS, round(offset, 1))
    if towards_left > -_MIDLINE_TOLERANCE_MM:
        return Finding(name, "laterality", Outcome.WARN, round(offset, 1), "laterality_on_midline")
    return Finding(name, "laterality", Outcome.FAIL, round(offset, 1), "laterality_swapped")


def _continuity(name: str, mask: np.ndarray) -> Finding:
    present: np.ndarray = np.asarray(mask.any(axis=(1, 2)))
    slices = np.flatnonzero(present)
    gaps = int((~present[slices[0]:slices[-1] + 1]).sum())
    if gaps:
        return Finding(name, "continuity", Outcome.FAIL, gaps, "empty_slices_inside")
    return Finding(name, "continuity", Outcome.PASS, 0)


def _overlap(volume: Volume, name: str, other: str, mask: np.ndarray, other_mask: np.ndarray) -> Finding:
    shared = float((mask & other_mask).sum()) * _voxel_ml(volume)
    if shared > 0:
        return Finding(name, f"overlap:{other}", Outcome.FAIL, round(shared, 2), "overlaps_exclusive_structure")
    return Finding(name, f"overlap:{other}", Outcome.PASS, 0.0)


def _voxel_ml(volume: Volume) -> float:
    return float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0


def _centroid_x(volume: Volume, mask: np.ndarray) -> float:
    """The LPS x of the mask's centroid, from its per-axis profiles (no list of voxels: masks are large)."""
    count = float(mask.sum())
    centroid = [float((mask.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(mask.shape[axis])).sum())
                / count for axis in range(3)]
    return float(volume.to_patient(np.array([centroid]))[0, 0])
