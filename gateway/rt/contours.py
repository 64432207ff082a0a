"""Masks -> planar contours in patient coordinates, as an RT Structure Set carries them (PS3.3 C.8.8.6).

Boundaries are traced at pixel edges (marching squares at 0.5 on the mask), so a contour
rasterised back by a TPS covers the same pixels. Outer boundaries and holes are told apart
by orientation; islands come out as separate contours. Points are reduced with
Douglas-Peucker within a tolerance in mm, never below 3 points, and a reduction that would
make the polygon cross itself is not used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from gateway.rt.tracing import boundaries

__all__ = ["Contour", "format_ds", "format_ds_points", "keyholed", "mask_contours", "plane_contours"]


@dataclass(frozen=True)
class Contour:
    """One closed planar contour of one slice; ``points`` (N, 3) in patient LPS mm, not repeating the first."""

    slice_index: int
    points: np.ndarray
    hole: bool


def format_ds(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2), to 0.1 micrometre."""
    return format_ds_points(np.array([[value]]))


#: Zeros ending a value's fraction (with its point when nothing is left of it), and a ``-0`` left by them.
_TRAILING_ZEROS = re.compile(r"\.?0+(?=\\|$)")
_NEGATIVE_ZERO = re.compile(r"(?<![^\\])-0(?![^\\])")
_Z = "\x00"  # stands for the slice's z while the coordinates are formatted


def format_ds_points(points: np.ndarray, z_text: str | None = None) -> str:
    """Coordinates as one multi-valued Decimal String, each value as :func:`format_ds` writes it, in row order;
    with *z_text*, the last column of every row is written as that text instead.

    Raises
    ------
    ValueError
        If a value does not fit in 16 characters.
    """
    values = points if z_text is None else points[:, :-1]
    row = "\\".join(["%.4f"] * values.shape[1] + ([] if z_text is None else [_Z]))
    text = "\\".join([row] * len(points)) % tuple(values.ravel().tolist())
    text = _NEGATIVE_ZERO.sub("0", _TRAILING_ZEROS.sub("", text))
    if z_text is not None:
        text = text.replace(_Z, z_text)
    if max(map(len, text.split("\\"))) > 16:
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


def _douglas_peucker(points: np.ndarray, firsts: np.ndarray, lasts: np.ndarray, tolerance: float) -> np.ndarray:
    """Which of *points* Douglas-Peucker keeps on the open polylines ``points[firsts[i]:lasts[i] + 1]``.

    Every polyline's ends are kept. All polylines are reduced together, one level of the recursion at a time: the
    point farthest from each pending segment's chord (the first of equals) is kept and splits it while it lies
    beyond *tolerance*, exactly as the recursive algorithm does one segment after another.
    """
    keep = np.zeros(len(points), dtype=bool)
    keep[firsts] = keep[lasts] = True
    while True:
        wide = lasts - firsts >= 2
        firsts, lasts = firsts[wide], lasts[wide]
        if not len(firsts):
            return keep
        counts = lasts - firsts - 1
        owner = np.repeat(np.arange(len(firsts)), counts)
        offsets = np.cumsum(counts) - counts
        middle = np.arange(int(counts.sum())) - offsets[owner] + firsts[owner] + 1
        start, span = points[firsts][owner], (points[lasts] - points[firsts])[owner]
        length = np.hypot(span[:, 0], span[:, 1])
        offset = points[middle] - start
        cross = np.abs(span[:, 0] * offset[:, 1] - span[:, 1] * offset[:, 0])
        distance = np.where(length > 0, cross / np.where(length > 0, length, 1.0), np.hypot(offset[:, 0], offset[:, 1]))
        worst = np.maximum.reduceat(distance, offsets)
        hits = np.flatnonzero(distance == worst[owner])
        split = middle[hits[np.unique(owner[hits], return_index=True)[1]]]
        far = worst > tolerance
        keep[split[far]] = True
        firsts, lasts = np.concatenate([firsts[far], split[far]]), np.concatenate([split[far], lasts[far]])


def _without_straight_runs(points: np.ndarray) -> np.ndarray:
    """The polygon without the points in the middle of straight runs (most of what marching squares emits): that
    changes nothing in the shape and leaves Douglas-Peucker far less to do."""
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    turn = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - \
        (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0])
    return points[turn != 0] if np.count_nonzero(turn) >= 3 else points


def _simplify(polygons: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
    """Douglas-Peucker on closed polygons, all at once: each split at its point farthest from its first, both
    halves reduced."""
    polygons = [_without_straight_runs(points) for points in polygons]
    closed, firsts, lasts, at = [], [], [], 0
    for points in polygons:
        far = int(np.argmax(np.hypot(*(points - points[0]).T)))
        closed.append(np.vstack([points, points[:1]]))
        firsts += [at, at + far]
        lasts += [at + far, at + len(points)]
        at += len(points) + 1
    if not closed:
        return []
    keep = _douglas_peucker(np.concatenate(closed), np.array(firsts), np.array(lasts), tolerance)
    bounds = np.cumsum([0] + [len(points) + 1 for points in polygons])
    return [points[keep[bounds[i]:bounds[i + 1] - 1]] for i, points in enumerate(polygons)]


def _traced(mask: np.ndarray) -> list[np.ndarray]:
    """The boundaries of a 2D mask at pixel edges, ``(N, 2)`` in (row, column) pixel units, without degenerate ones
    (:func:`~gateway.rt.tracing.boundaries`)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    top, left = int(rows[0]), int(cols[0])
    out = []
    for points in boundaries(mask[top:int(rows[-1]) + 1, left:int(cols[-1]) + 1]):
        points += (top, left)
        if len(points) >= 3 and abs(_signed_area(points)) >= 1e-9:
            out.append(points)
    return out


def _reduced(traced: list[np.ndarray], tolerance_px: float) -> list[tuple[np.ndarray, bool]]:
    """Each traced boundary reduced where the reduction keeps a simple polygon, and whether it is a hole."""
    reduced = _simplify(traced, tolerance_px) if tolerance_px > 0 else traced
    out = []
    for points, fewer in zip(traced, reduced, strict=True):
        if len(fewer) >= 3 and abs(_signed_area(fewer)) > 1e-9 and _is_simple(fewer):
            out.append((fewer, _signed_area(points) < 0))  # holes run the other way round
        else:
            out.append((points, _signed_area(points) < 0))
    return out


def plane_contours(mask: np.ndarray, tolerance_px: float) -> list[tuple[np.ndarray, bool]]:
    """Contours of a 2D mask as ``(points (N, 2) in (row, column) pixel units, is_hole)``."""
    return _reduced(_traced(mask), tolerance_px)


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
    slices = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    traced = [_traced(mask[index]) for index in slices]
    reduced = iter(_reduced([points for plane in traced for points in plane], tolerance_mm / pixel_mm))
    contours = []
    for index, plane in zip(slices, traced, strict=True):
        planar = [next(reduced) for _ in plane]
        for points, hole in keyholed(planar) if keyhole else planar:
            voxels = np.column_stack([np.full(len(points), float(index)), points, np.ones(len(points))])
            contours.append(Contour(int(index), (affine @ voxels.T).T[:, :3], hole))
    return contours
