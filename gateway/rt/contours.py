"""Masks -> planar contours in patient coordinates, as an RT Structure Set carries them (PS3.3 C.8.8.6).

Boundaries are traced at pixel edges (marching squares at 0.5 on the mask), so a contour
rasterised back by a TPS covers the same pixels. Outer boundaries and holes are told apart
by orientation; islands come out as separate contours. Points are reduced with
Douglas-Peucker within a tolerance in mm, never below 3 points, and a reduction that would
make the polygon cross itself is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import measure

__all__ = ["Contour", "format_ds", "keyholed", "mask_contours", "plane_contours"]


@dataclass(frozen=True)
class Contour:
    """One closed planar contour of one slice; ``points`` (N, 3) in patient LPS mm, not repeating the first."""

    slice_index: int
    points: np.ndarray
    hole: bool


def format_ds(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2), to 0.1 micrometre."""
    text = f"{round(float(value), 4):.4f}".rstrip("0").rstrip(".")
    text = "0" if text in ("-0", "") else text
    if len(text) > 16:
        raise ValueError("coordinate out of range for a Decimal String")
    return text


def _signed_area(points: np.ndarray) -> float:
    rows, cols = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(cols, np.roll(rows, -1)) - np.dot(np.roll(cols, -1), rows))


def _is_simple(points: np.ndarray) -> bool:
    """Whether no two non-adjacent edges of the closed polygon cross (all pairs at once)."""
    starts, ends = points, np.roll(points, -1, axis=0)
    count = len(points)

    def side(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        side_value: np.ndarray = (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - \
            (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        return side_value

    a, b = starts[:, None, :], ends[:, None, :]
    c, d = starts[None, :, :], ends[None, :, :]
    crossing = (side(a, b, c) * side(a, b, d) < 0) & (side(c, d, a) * side(c, d, b) < 0)
    index = np.arange(count)
    adjacent = (np.abs(index[:, None] - index[None, :]) <= 1) | (np.abs(index[:, None] - index[None, :]) == count - 1)
    return not bool((crossing & ~adjacent).any())


def _douglas_peucker(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Indices kept by Douglas-Peucker on an open polyline (first and last always kept)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        first, last = stack.pop()
        if last - first < 2:
            continue
        start, end = points[first], points[last]
        span = end - start
        length = float(np.hypot(*span))
        middle = points[first + 1:last]
        if length == 0:
            distance = np.hypot(*(middle - start).T)
        else:
            distance = np.abs(span[0] * (middle[:, 1] - start[1]) - span[1] * (middle[:, 0] - start[0])) / length
        worst = int(np.argmax(distance))
        if distance[worst] > tolerance:
            split = first + 1 + worst
            keep[split] = True
            stack += [(first, split), (split, last)]
    return np.flatnonzero(keep)


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed polygon: split at the point farthest from the first, reduce both halves.

    Points on straight runs (most of what marching squares emits) are dropped first; that
    changes nothing in the shape and makes the reduction several times faster.
    """
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    turn = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - \
        (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0])
    if np.count_nonzero(turn) >= 3:
        points = points[turn != 0]
    far = int(np.argmax(np.hypot(*(points - points[0]).T)))
    first = _douglas_peucker(points[: far + 1], tolerance)
    second = _douglas_peucker(np.vstack([points[far:], points[:1]]), tolerance)[1:-1] + far
    reduced: np.ndarray = points[np.concatenate([first, second])]
    return reduced


def plane_contours(mask: np.ndarray, tolerance_px: float) -> list[tuple[np.ndarray, bool]]:
    """Contours of a 2D mask as ``(points (N, 2) in (row, column) pixel units, is_hole)``."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    top, left = int(rows[0]), int(cols[0])
    padded = np.pad(mask[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1].astype(np.uint8), 1)
    out = []
    for traced in measure.find_contours(padded, 0.5):  # type: ignore[no-untyped-call]
        points = traced[:-1] - 1.0 + (top, left)  # the last point repeats the first; undo crop and padding
        area = _signed_area(points)
        if abs(area) < 1e-9 or len(points) < 3:
            continue
        reduced = _simplify(points, tolerance_px) if tolerance_px > 0 else points
        if len(reduced) >= 3 and abs(_signed_area(reduced)) > 1e-9 and _is_simple(reduced):
            points = reduced
        out.append((points, area < 0))  # skimage traces holes the other way round
    return out


def _inside(point: np.ndarray, polygon: np.ndarray) -> bool:
    """Even-odd ray casting along +column."""
    rows, cols = polygon[:, 0], polygon[:, 1]
    next_rows, next_cols = np.roll(rows, -1), np.roll(cols, -1)
    crosses = (rows > point[0]) != (next_rows > point[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        at = cols + (point[0] - rows) * (next_cols - cols) / (next_rows - rows)
    return bool(np.count_nonzero(crosses & (point[1] < at)) % 2)


def keyholed(contours: list[tuple[np.ndarray, bool]]) -> list[tuple[np.ndarray, bool]]:
    """Join every hole to the outer contour around it by a zero-width cut (the "keyhole" convention).

    For readers that fill each contour on its own instead of combining inner contours by XOR.
    """
    outers = [points for points, hole in contours if not hole]
    for hole_points in (points for points, hole in contours if hole):
        owner = next((i for i, outer in enumerate(outers) if _inside(hole_points[0], outer)), None)
        if owner is None:
            continue
        outer = outers[owner]
        distances = np.linalg.norm(outer[:, None, :] - hole_points[None, :, :], axis=2)
        a, b = np.unravel_index(int(np.argmin(distances)), distances.shape)
        loop = np.roll(hole_points, -b, axis=0)
        outers[owner] = np.vstack([outer[: a + 1], loop, loop[:1], outer[a:]])
    return [(points, False) for points in outers]


def mask_contours(mask: np.ndarray, affine: np.ndarray, tolerance_mm: float = 0.5, *,
                  keyhole: bool = False) -> list[Contour]:
    """Every contour of a 3D mask ``(slices, rows, columns)`` with the volume *affine* (voxel -> LPS mm).

    Holes are separate inner contours, or with *keyhole* cut into their outer contour.
    """
    pixel_mm = min(float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2])))
    contours = []
    for index in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        planar = plane_contours(mask[index], tolerance_mm / pixel_mm)
        for points, hole in keyholed(planar) if keyhole else planar:
            voxels = np.column_stack([np.full(len(points), float(index)), points, np.ones(len(points))])
            contours.append(Contour(int(index), (affine @ voxels.T).T[:, :3], hole))
    return contours
