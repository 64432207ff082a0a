"""Label post-processing: each label cleaned on the model grid as its manifest entry says.

Left/right split of a shared channel at the mask's own midline, largest component or minimum
component size, holes filled per axial plane (as contours are drawn), minimum volume. Labels
may overlap (an External encloses the lungs); masks are kept as :class:`~gateway.inference.labels.LabelMasks`.

Keeping the largest component can hide a fault: a network that left empty slices in the middle of an
organ found it in pieces, and only the largest piece would be kept, unflagged. So the gap between the
kept component and a discarded piece that continues it along the patient is measured (mm) and handed
to contour QA (:mod:`gateway.rt.plausibility`, ``continuity``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from gateway.inference.labels import Box, LabelMasks
from gateway.inference.manifest import Label

__all__ = ["ModelGrid", "model_affine", "postprocess"]

#: A discarded piece at least this share of the kept component's size counts as part of the structure.
_PIECE_SHARE = 0.25


@dataclass(frozen=True)
class ModelGrid:
    """The model's voxel grid: its affine to patient LPS, and which axis runs along the CT's slices."""

    affine: np.ndarray
    slice_axis: int


def model_affine(affine: np.ndarray, order: tuple[int, int, int], flips: tuple[bool, bool, bool],
                  factors: Sequence[float], oriented_shape: Sequence[int]) -> np.ndarray:
    """Affine from model-grid indices to patient LPS: model index m is oriented scan index m / factor."""
    to_scan = np.zeros((4, 4))
    to_scan[3, 3] = 1.0
    for axis, (source, flip, factor) in enumerate(zip(order, flips, factors, strict=True)):
        to_scan[source, axis] = (-1.0 if flip else 1.0) / factor
        to_scan[source, 3] = oriented_shape[axis] - 1 if flip else 0.0
    model: np.ndarray = affine @ to_scan
    return model


def postprocess(decided: LabelMasks, specs: Sequence[Label], grid: ModelGrid,
                kind: str) -> tuple[LabelMasks, dict[str, float]]:
    """Per label, in manifest order: its raw mask, inside another label, the side of the midline, components
    (largest, minimum size, length along the patient), holes, minimum volume. Also, per label whose largest
    component was kept, the widest gap (mm along the slices) to a discarded piece continuing it (none: absent).

    *decided* holds the network's decision by class (softmax) or by output channel + 1 (sigmoid). Each label is
    worked on within the bounding box of its raw mask only: every step is local to the mask (a hole is enclosed
    by it, the midline is its own), so the result is the same as on the whole grid at a fraction of the cost.
    """
    out = LabelMasks.empty(decided.shape, max(spec.value for spec in specs))
    voxel_ml = abs(float(np.linalg.det(grid.affine[:3, :3]))) / 1000.0
    slice_mm = float(np.linalg.norm(grid.affine[:3, grid.slice_axis]))
    gaps: dict[str, float] = {}
    values = {spec.name: spec.value for spec in specs}
    keys = {spec.name: spec.value if kind == "softmax" else spec.output_channel + 1 for spec in specs}
    boxes = decided.boxes(keys.values())
    for spec in specs:
        box = boxes.get(keys[spec.name])
        if box is None:
            continue
        mask = decided.region(keys[spec.name], box)
        if spec.within is not None:
            mask &= out.region(values[spec.within], box)
        if spec.side is not None and mask.any():
            mask = _one_side(mask, _shifted(grid.affine, box), spec.side)
        if (spec.keep_largest_component or spec.min_component_ml) and mask.any():
            mask, gap = _components(mask, spec.keep_largest_component, spec.min_component_ml / voxel_ml,
                                    grid.slice_axis)
            if gap:
                gaps[spec.name] = gap * slice_mm
        if spec.min_component_extent and mask.any():
            mask = _long_components(mask, grid.slice_axis, spec.min_component_extent)
        if spec.fill_holes:  # per axial slice, as contours are drawn: a hole open at the scan's end still fills
            planes = np.moveaxis(mask, grid.slice_axis, 0)
            mask = np.moveaxis(np.stack([ndimage.binary_fill_holes(plane) for plane in planes]), 0, grid.slice_axis)
        if spec.min_volume_ml and mask.sum() * voxel_ml < spec.min_volume_ml:
            continue
        out.add(spec.value, mask, box)
    return out, gaps


def _shifted(affine: np.ndarray, box: Box) -> np.ndarray:
    """The affine of the sub-grid starting at *box*'s corner."""
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, :3] @ np.array([part.start for part in box], dtype=np.float64)
    return shifted


def _components(mask: np.ndarray, largest_only: bool, min_voxels: float,
                slice_axis: int) -> tuple[np.ndarray, int]:
    """The components kept, and (largest only) the empty slices between the kept one and a discarded piece."""
    components, _count = ndimage.label(mask)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    gap = 0
    if largest_only:
        keep = np.zeros_like(sizes, dtype=bool)
        largest = int(np.argmax(sizes))
        keep[largest] = True
        gap = _gap_to_pieces(components, sizes, largest, slice_axis)
    else:
        keep = sizes >= min_voxels
        keep[0] = False
    kept: np.ndarray = keep[components]
    return kept, gap


def _gap_to_pieces(components: np.ndarray, sizes: np.ndarray, largest: int, slice_axis: int) -> int:
    """Slices between the largest component and the farthest discarded piece that continues it along the patient:
    one at least ``_PIECE_SHARE`` of its size, overlapping it in-plane, wholly beyond its first or last slice."""
    boxes = ndimage.find_objects(components)
    kept = boxes[largest - 1]
    gap = 0
    for index, box in enumerate(boxes, start=1):
        if box is None or index == largest or sizes[index] < _PIECE_SHARE * sizes[largest]:
            continue
        if all(box[a].start < kept[a].stop and kept[a].start < box[a].stop for a in range(3) if a != slice_axis):
            along, core = box[slice_axis], kept[slice_axis]
            gap = max(gap, along.start - core.stop, core.start - along.stop)
    return gap


def _long_components(mask: np.ndarray, axis: int, fraction: float) -> np.ndarray:
    """The components of *mask* at least *fraction* as long along *axis* as the largest component."""
    components, count = ndimage.label(mask)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    spans = [(s[axis].stop - s[axis].start) if s is not None else 0 for s in ndimage.find_objects(components)]
    longest = spans[int(np.argmax(sizes)) - 1]
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = np.array(spans) >= fraction * longest
    kept: np.ndarray = keep[components]
    return kept


def _one_side(mask: np.ndarray, affine: np.ndarray, side: str) -> np.ndarray:
    """The part of *mask* on the patient's left (+x in LPS) or right of the mask's own centre.

    x is affine-linear in the voxel indices, so its mean over the mask comes from per-axis
    counts, and only the axes x actually varies along are broadcast (no full-size float array).
    """
    total = int(mask.sum())
    middle = float(affine[0, 3])
    x: np.ndarray = np.full((1, 1, 1), affine[0, 3], dtype=np.float32)
    for axis in range(3):
        coefficient = float(affine[0, axis])
        if abs(coefficient) < 1e-9:
            continue
        others = tuple(a for a in range(3) if a != axis)
        counts = mask.sum(axis=others)
        middle += coefficient * float(np.dot(np.arange(mask.shape[axis]), counts)) / total
        shape = [1, 1, 1]
        shape[axis] = mask.shape[axis]
        x = x + np.float32(coefficient) * np.arange(mask.shape[axis], dtype=np.float32).reshape(shape)
    half: np.ndarray = mask & (x > middle if side == "left" else x <= middle)
    return half
