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


def _segments_cross(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> bool:
    def side(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> float:
        return float((q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0]))

    return side(a, b, c) * side(a, b, d) < 0 and side(c, d, a) * side(c, d, b) < 0


def _is_simple(points: np.ndarray) -> bool:
    count = len(points)
    for i in range(count):
        a, b = points[i], points[(i + 1) % count]
        for j in range(i + 2, count):
            if (j + 1) % count == i:
                continue
            if _segments_cross(a, b, points[j], points[(j + 1) % count]):
                return False
    return True


def plane_contours(mask: np.ndarray, tolerance_px: float) -> list[tuple[np.ndarray, bool]]:
    """Contours of a 2D mask as ``(points (N, 2) in (row, column) pixel units, is_hole)``."""
    padded = np.pad(mask.astype(np.uint8), 1)
    out = []
    for traced in measure.find_contours(padded, 0.5):  # type: ignore[no-untyped-call]
        points = traced[:-1] - 1.0  # closed: the last point repeats the first; undo the padding
        area = _signed_area(points)
        if abs(area) < 1e-9 or len(points) < 3:
            continue
        closed = np.vstack([points, points[:1]])
        reduced = measure.approximate_polygon(closed, tolerance_px)[:-1]  # type: ignore[no-untyped-call]
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
