"""Masks -> contours: pixel-edge tracing, holes and islands, point reduction, patient coordinates, DS strings."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import polygon as fill_polygon

from gateway.rt.contours import format_ds, mask_contours, plane_contours


def _rasterise(contours: list[tuple[np.ndarray, bool]], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of the contours at pixel centres, as a TPS does."""
    out = np.zeros(shape, dtype=bool)
    for points, _hole in contours:
        inside = np.zeros(shape, dtype=bool)
        rows, cols = fill_polygon(points[:, 0], points[:, 1], shape)
        inside[rows, cols] = True
        out ^= inside
    return out


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_ring_gives_an_outer_contour_and_a_hole() -> None:
    ring = _disc((64, 64), (32, 30), 20) & ~_disc((64, 64), (32, 30), 9)
    contours = plane_contours(ring, 0.5)
    assert sorted(hole for _, hole in contours) == [False, True]
    assert dice(_rasterise(contours, ring.shape), ring) >= 0.98


def test_islands_are_separate_contours() -> None:
    islands = _disc((64, 64), (15, 15), 8) | _disc((64, 64), (45, 40), 12)
    contours = plane_contours(islands, 0.5)
    assert [hole for _, hole in contours] == [False, False]
    assert dice(_rasterise(contours, islands.shape), islands) >= 0.98


def test_reduction_stays_within_tolerance_and_saves_points() -> None:
    disc = _disc((200, 200), (100, 100), 80)
    exact = plane_contours(disc, 0.0)[0][0]
    reduced = plane_contours(disc, 0.5)[0][0]
    assert 3 <= len(reduced) < len(exact) / 3
    closed = np.vstack([reduced, reduced[:1]])
    for point in exact:  # every traced boundary point lies within the tolerance of the reduced polygon
        starts, ends = closed[:-1], closed[1:]
        direction = ends - starts
        t = np.clip(((point - starts) * direction).sum(1) / (direction**2).sum(1), 0, 1)
        nearest = starts + t[:, None] * direction
        assert np.min(np.linalg.norm(nearest - point, axis=1)) <= 0.5 + 1e-9


def test_single_pixels_and_thin_lines_still_make_valid_contours() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[2, 2] = True
    mask[6, 1:9] = True
    for points, _hole in plane_contours(mask, 0.5):
        assert len(points) >= 3
        assert len({tuple(p) for p in points}) == len(points)


@pytest.mark.parametrize("direction", [1.0, -1.0])  # HFS-like and FFS-like slice order
def test_patient_coordinates_and_slice_positions(direction: float) -> None:
    mask = np.zeros((5, 32, 32), dtype=bool)
    mask[1:4] = _disc((32, 32), (16, 16), 10)
    affine = np.array([[0, 0, 0.7 * direction, -20], [0, 0.9, 0, 15], [2.5 * direction, 0, 0, 100], [0, 0, 0, 1]])
    contours = mask_contours(mask, affine)
    assert sorted({c.slice_index for c in contours}) == [1, 2, 3]
    for contour in contours:
        assert np.allclose(contour.points[:, 2], 100 + 2.5 * direction * contour.slice_index)
        assert len(contour.points) >= 3 and not contour.hole
        # back in pixel units, every point lies on the disc's edge (radius 10 around pixel (16, 16))
        columns = (contour.points[:, 0] + 20) / (0.7 * direction)
        rows = (contour.points[:, 1] - 15) / 0.9
        radius = np.hypot(rows - 16, columns - 16)
        assert radius.min() >= 9.4 and radius.max() <= 11.0


@pytest.mark.parametrize(("value", "text"), [(12.3456, "12.3456"), (-0.00001, "0"), (100.0, "100"),
                                              (-123456.78912, "-123456.7891"), (1 / 3, "0.3333")])
def test_decimal_strings(value: float, text: str) -> None:
    assert format_ds(value) == text
    assert len(format_ds(value)) <= 16


def test_decimal_string_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        format_ds(1e16)


def test_self_crossing_polygons_are_detected() -> None:
    from gateway.rt.contours import _is_simple

    assert _is_simple(np.array([[0, 0], [0, 2], [2, 2], [2, 0]], dtype=float))
    assert not _is_simple(np.array([[0, 0], [0, 2], [2, 0], [2, 2]], dtype=float))
