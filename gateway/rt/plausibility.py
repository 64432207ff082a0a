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
    shapes = {name: _Shape.of(mask) for name, mask in masks.items()}
    external = _external(shapes, manifest)
    findings: list[Finding] = []
    for label in manifest.labels:
        shape = shapes.get(label.name)
        if shape is not None and shape.count:
            findings += _checks(volume, label, shape, shapes, external)
    return findings


@dataclass(frozen=True)
class _Shape:
    """A mask with what every check needs, computed once: its voxel count, its slices and its bounding box."""

    mask: np.ndarray
    count: int
    per_slice: np.ndarray  # voxels on each slice of the scan
    box: tuple[slice, slice, slice]
    centroid: tuple[float, float, float]  # voxel coordinates (k, i, j)

    @classmethod
    def of(cls, mask: np.ndarray) -> _Shape:
        per_slice = np.count_nonzero(mask, axis=(1, 2))
        count = int(per_slice.sum())
        if not count:
            return cls(mask, 0, per_slice, (slice(0, 0),) * 3, (0.0, 0.0, 0.0))
        slices = np.flatnonzero(per_slice)
        k = slice(int(slices[0]), int(slices[-1]) + 1)
        rows = np.count_nonzero(mask[k], axis=(0, 2))
        columns = np.count_nonzero(mask[k], axis=(0, 1))
        i, j = _span(rows), _span(columns)
        centroid = tuple(float((profile * np.arange(profile.size)).sum()) / count
                         for profile in (per_slice, rows, columns))
        return cls(mask, count, per_slice, (k, i, j), centroid)  # type: ignore[arg-type]

    def inside(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """The mask within *box*."""
        return self.mask[box]


def _span(profile: np.ndarray) -> slice:
    present = np.flatnonzero(profile)
    return slice(int(present[0]), int(present[-1]) + 1)


def _external(shapes: dict[str, _Shape], manifest: ModelManifest) -> _Shape | None:
    names = [label.name for label in manifest.labels if label.interpreted_type == "EXTERNAL"]
    shape = shapes.get(names[0]) if names else None
    return shape if shape is not None and shape.count else None


def _checks(volume: Volume, label: Label, shape: _Shape, shapes: dict[str, _Shape],
            external: _Shape | None) -> Iterator[Finding]:
    name = label.name
    if label.volume_ml is not None:
        yield _volume(volume, name, label.volume_ml, shape)
    if label.interpreted_type != "EXTERNAL":
        yield _truncation(name, shape)
        if external is not None:
            yield _inside(name, shape, external)
            side = expected_side(label)
            if side is not None:
                yield _laterality(volume, name, side, shape, external)
    if label.contiguous:
        yield _continuity(name, shape)
    for other in label.exclusive_with:
        if other in shapes and shapes[other].count:
            yield _overlap(volume, name, other, shape, shapes[other])


def _volume(volume: Volume, name: str, expected: tuple[float, float], shape: _Shape) -> Finding:
    ml = shape.count * _voxel_ml(volume)
    smallest, largest = expected
    if smallest <= ml <= largest:
        return Finding(name, "volume", Outcome.PASS, round(ml, 1))
    reason = "volume_too_small" if ml < smallest else "volume_too_large"
    return Finding(name, "volume", Outcome.FAIL, round(ml, 1), reason)


def _truncation(name: str, shape: _Shape) -> Finding:
    touching = int(shape.per_slice[0] > 0) + int(shape.per_slice[-1] > 0)
    if touching:
        return Finding(name, "truncation", Outcome.WARN, touching, "touches_scan_edge")
    return Finding(name, "truncation", Outcome.PASS, 0)


def _inside(name: str, shape: _Shape, external: _Shape) -> Finding:
    outside = np.count_nonzero(shape.inside(shape.box) & ~external.inside(shape.box)) / shape.count
    if outside >= _OUTSIDE_FAIL:
        return Finding(name, "inside_external", Outcome.FAIL, round(outside, 4), "outside_external")
    if outside >= _OUTSIDE_WARN:
        return Finding(name, "inside_external", Outcome.WARN, round(outside, 4), "partly_outside_external")
    return Finding(name, "inside_external", Outcome.PASS, round(outside, 4))


def _laterality(volume: Volume, name: str, side: str, shape: _Shape, external: _Shape) -> Finding:
    """LPS x grows towards the patient's left: the signed distance of the centroid from the body's midline."""
    centroids = volume.to_patient(np.array([shape.centroid, external.centroid]))
    offset = float(centroids[0, 0] - centroids[1, 0])
    towards_left = offset if side == "left" else -offset
    if towards_left >= _MIDLINE_TOLERANCE_MM:
        return Finding(name, "laterality", Outcome.PASS, round(offset, 1))
    if towards_left > -_MIDLINE_TOLERANCE_MM:
        return Finding(name, "laterality", Outcome.WARN, round(offset, 1), "laterality_on_midline")
    return Finding(name, "laterality", Outcome.FAIL, round(offset, 1), "laterality_swapped")


def _continuity(name: str, shape: _Shape) -> Finding:
    gaps = int(np.count_nonzero(shape.per_slice[shape.box[0]] == 0))
    if gaps:
        return Finding(name, "continuity", Outcome.FAIL, gaps, "empty_slices_inside")
    return Finding(name, "continuity", Outcome.PASS, 0)


def _overlap(volume: Volume, name: str, other: str, shape: _Shape, other_shape: _Shape) -> Finding:
    box = tuple(slice(max(a.start, b.start), max(max(a.start, b.start), min(a.stop, b.stop)))
                for a, b in zip(shape.box, other_shape.box, strict=True))
    shared = np.count_nonzero(shape.inside(box) & other_shape.inside(box)) * _voxel_ml(volume)  # type: ignore[arg-type]
    if shared > 0:
        return Finding(name, f"overlap:{other}", Outcome.FAIL, round(shared, 2), "overlaps_exclusive_structure")
    return Finding(name, f"overlap:{other}", Outcome.PASS, 0.0)


def _voxel_ml(volume: Volume) -> float:
    return float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
