"""Plausibility checks of each structure, without ground truth: the systematic failures of AI contouring.

Judged on the masks on the CT grid in patient coordinates (LPS), after post-processing, against the model
manifest's expectations:

* ``laterality``: a left or right structure (manifest ``side``, else a TG-263 ``_L`` / ``_R`` suffix) has its
  centroid on that side of the External's midline, whatever the patient position (LPS is the patient's own frame);
* ``volume``: within the manifest's ``volume_ml`` range;
* ``inside_external``: the share of the structure outside the External (manifest ``outside_external``: the shares
  that warn and fail, 2 % and 10 % unless a label says otherwise);
* ``continuity``: no empty slice between the first and last slice of a structure marked ``contiguous``, nor
  between it and a piece of it that keeping the largest component discarded (``Prediction.split_mm``);
* ``truncation``: a structure touching the first or last slice of the scan may be cut off by the scan range;
* ``overlap``: structures a manifest marks ``exclusive_with`` each other share no voxel;
* ``below_table``: how far (mm) a structure reaches beyond the External along gravity, towards the couch (from
  ``PatientPosition``: posterior when supine or unknown, anterior when prone, the lower side when decubitus);
* ``confidence``: the model's own confidence (:mod:`gateway.inference.confidence`, when the caller has it): the mean
  probability inside the structure and the share of uncertain voxels, low when the model works far outside its
  training data (another normalisation, modality or body region).

Each check gives ``pass``, ``warn`` or ``fail`` with a reason code and the measured figure; no patient data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from gateway.inference.confidence import Confidence
from gateway.inference.manifest import Label, ModelManifest
from gateway.inference.volume import Volume

__all__ = ["Finding", "Outcome", "check_structures", "expected_side"]

#: A centroid closer to the midline than this (mm) is not judged for laterality (a structure on the midline).
_MIDLINE_TOLERANCE_MM = 5.0
#: A structure reaching further than this (mm) beyond the External towards the couch fails ``below_table``.
_BELOW_TABLE_MM = 5.0
#: Gravity in patient coordinates (LPS) by Patient Position: supine +y (posterior), prone -y, right side down -x,
#: left side down +x; an unknown position is taken as supine.
_GRAVITY = {"HFS": (0.0, 1.0, 0.0), "FFS": (0.0, 1.0, 0.0), "HFP": (0.0, -1.0, 0.0), "FFP": (0.0, -1.0, 0.0),
            "HFDR": (-1.0, 0.0, 0.0), "FFDR": (-1.0, 0.0, 0.0), "HFDL": (1.0, 0.0, 0.0), "FFDL": (1.0, 0.0, 0.0)}
#: Mean probability inside a structure (over the voxels the network claimed) below which the model's confidence
#: fails, and below which it warns; and the share of uncertain voxels above which it warns. Measured (issue 19):
#: the default model on the real chest CTs lung1 / lung2 and the InVesalius head CT: External 0.998 / 0.999 / 0.999,
#: lungs 0.957 to 0.996, uncertain shares 0.002 to 0.130; the liver U-Net on lung2 at least 0.83, its uncertain share
#: 0.50; a steep threshold network 0.996 / 0.997 and 0.010 / 0.008, fed a normalisation squeezed around its cut
#: 0.573 / 0.563 and 0.954 / 0.973.
_CONFIDENCE_FAIL, _CONFIDENCE_WARN, _UNCERTAIN_WARN = 0.60, 0.75, 0.80


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


def check_structures(volume: Volume, masks: Mapping[str, np.ndarray], manifest: ModelManifest,
                     confidence: Mapping[str, Confidence] | None = None,
                     split_mm: Mapping[str, float] | None = None) -> list[Finding]:
    """Every applicable check of every non-empty structure in *masks* (label name -> boolean mask on the CT grid);
    the ``confidence`` check for those with figures in *confidence* (``Prediction.confidence``); *split_mm*
    (``Prediction.split_mm``): gaps to pieces that keeping the largest component discarded, for ``continuity``."""
    shapes = {name: _Shape.of(mask) for name, mask in masks.items()}
    external = _external(shapes, manifest)
    findings: list[Finding] = []
    for label in manifest.labels:
        shape = shapes.get(label.name)
        if shape is not None and shape.count:
            findings += _checks(volume, label, shape, shapes, external, (split_mm or {}).get(label.name, 0.0))
            if confidence is not None and label.name in confidence:
                findings.append(_confidence(label.name, confidence[label.name]))
    return findings


@dataclass(frozen=True)
class _Shape:
    """A mask with what every check needs, computed once: its voxel count, its slices, its bounding box, and the
    mask within that box only (a structure set of a hundred organs holds a hundred small boxes, not whole CTs)."""

    mask: np.ndarray  # the mask within ``box``
    count: int
    per_slice: np.ndarray  # voxels on each slice of the scan
    box: tuple[slice, slice, slice]
    centroid: tuple[float, float, float]  # voxel coordinates (k, i, j)

    @classmethod
    def of(cls, mask: np.ndarray) -> _Shape:
        # bool as 0/1 bytes summed in uint16 (exact up to 65535 voxels per line): several times faster than
        # count_nonzero along axes
        voxels = np.asarray(mask, dtype=bool).view(np.uint8)
        by_row = voxels.sum(axis=2, dtype=np.uint16)
        per_slice = by_row.sum(axis=1, dtype=np.int64)
        count = int(per_slice.sum())
        if not count:
            return cls(np.zeros((0, 0, 0), dtype=bool), 0, per_slice, (slice(0, 0),) * 3, (0.0, 0.0, 0.0))
        slices = np.flatnonzero(per_slice)
        k = slice(int(slices[0]), int(slices[-1]) + 1)
        rows = by_row[k].sum(axis=0, dtype=np.int64)
        columns = voxels[k].sum(axis=0, dtype=np.uint16).sum(axis=0, dtype=np.int64)
        i, j = _span(rows), _span(columns)
        centroid = tuple(float((profile * np.arange(profile.size)).sum()) / count
                         for profile in (per_slice, rows, columns))
        box = (k, i, j)
        return cls(mask[box].copy(), count, per_slice, box, centroid)  # type: ignore[arg-type]

    def inside(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """The mask within *box* (scan coordinates), false outside its own box."""
        out = np.zeros(tuple(side.stop - side.start for side in box), dtype=bool)
        source, target = [], []
        for wanted, own in zip(box, self.box, strict=True):
            low, high = max(wanted.start, own.start), min(wanted.stop, own.stop)
            if low >= high:
                return out
            source.append(slice(low - own.start, high - own.start))
            target.append(slice(low - wanted.start, high - wanted.start))
        out[tuple(target)] = self.mask[tuple(source)]
        return out


def _span(profile: np.ndarray) -> slice:
    present = np.flatnonzero(profile)
    return slice(int(present[0]), int(present[-1]) + 1)


def _external(shapes: dict[str, _Shape], manifest: ModelManifest) -> _Shape | None:
    names = [label.name for label in manifest.labels if label.interpreted_type == "EXTERNAL"]
    shape = shapes.get(names[0]) if names else None
    return shape if shape is not None and shape.count else None


def _checks(volume: Volume, label: Label, shape: _Shape, shapes: dict[str, _Shape],
            external: _Shape | None, split_mm: float) -> Iterator[Finding]:
    name = label.name
    if label.volume_ml is not None:
        yield _volume(volume, name, label.volume_ml, shape)
    if label.interpreted_type != "EXTERNAL":
        yield _truncation(name, shape)
        if external is not None:
            yield _inside(name, shape, external, label.outside_external)
            yield _below_table(volume, name, shape, external)
            side = expected_side(label)
            if side is not None:
                yield _laterality(volume, name, side, shape, external)
    if label.contiguous:
        yield _continuity(name, shape, max(1, round(split_mm / volume.spacing[0])) if split_mm else 0)
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


def _inside(name: str, shape: _Shape, external: _Shape, limits: tuple[float, float]) -> Finding:
    outside = np.count_nonzero(shape.inside(shape.box) & ~external.inside(shape.box)) / shape.count
    warn, fail = limits
    if outside >= fail:
        return Finding(name, "inside_external", Outcome.FAIL, round(outside, 4), "outside_external")
    if outside >= warn:
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


def _below_table(volume: Volume, name: str, shape: _Shape, external: _Shape) -> Finding:
    """How far (mm) the structure reaches beyond the External along gravity, towards the couch."""
    gravity = np.array(_GRAVITY.get(volume.patient_position.strip().upper(), _GRAVITY["HFS"]))
    beyond = _furthest(volume, shape, gravity) - _furthest(volume, external, gravity)
    if beyond > _BELOW_TABLE_MM:
        return Finding(name, "below_table", Outcome.FAIL, round(beyond, 1), "below_table")
    return Finding(name, "below_table", Outcome.PASS, round(beyond, 1))


def _furthest(volume: Volume, shape: _Shape, direction: np.ndarray) -> float:
    """How far (mm) *shape* reaches along *direction*, from its box along the array axis closest to *direction*
    (exact for axial scans; for an oblique one the error is small, and no voxel list of a whole body is made)."""
    steps = volume.affine[:3, :3].T @ direction  # mm along direction per voxel step along (k, i, j)
    axis = int(np.argmax(np.abs(steps)))
    side = shape.box[axis]
    return float(steps[axis] * (side.stop - 1 if steps[axis] > 0 else side.start))


def _confidence(name: str, figures: Confidence) -> Finding:
    mean = round(figures.mean_probability, 3)
    if figures.mean_probability < _CONFIDENCE_FAIL:
        return Finding(name, "confidence", Outcome.FAIL, mean, "low_model_confidence")
    if figures.mean_probability < _CONFIDENCE_WARN or figures.uncertain_share > _UNCERTAIN_WARN:
        return Finding(name, "confidence", Outcome.WARN, mean, "uncertain_model")
    return Finding(name, "confidence", Outcome.PASS, mean)


def _continuity(name: str, shape: _Shape, discarded_gap: int) -> Finding:
    """Empty slices inside the structure, or between it and a piece of it that post-processing discarded."""
    gaps = max(int(np.count_nonzero(shape.per_slice[shape.box[0]] == 0)), discarded_gap)
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
