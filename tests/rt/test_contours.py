"""Masks -> contours: pixel-edge tracing, holes and islands, point reduction, patient coordinates, DS strings."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import polygon as fill_polygon

from gateway.rt.contours import format_ds, format_ds_points, mask_contours, plane_contours


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


def _reference_douglas_peucker(points: np.ndarray, tolerance: float) -> list[int]:
    """Textbook recursive Douglas-Peucker on an open polyline: the indices it keeps."""
    if len(points) < 3:
        return list(range(len(points)))
    start, end = points[0], points[-1]
    span = end - start
    length = float(np.hypot(*span))
    middle = points[1:-1]
    if length == 0:
        distance = np.hypot(*(middle - start).T)
    else:
        distance = np.abs(span[0] * (middle[:, 1] - start[1]) - span[1] * (middle[:, 0] - start[0])) / length
    worst = int(np.argmax(distance))
    if distance[worst] <= tolerance:
        return [0, len(points) - 1]
    split = worst + 1
    first = _reference_douglas_peucker(points[: split + 1], tolerance)
    return first[:-1] + [split + i for i in _reference_douglas_peucker(points[split:], tolerance)]


def _reference_reduction(points: np.ndarray, tolerance: float) -> np.ndarray:
    """The closed polygon without straight-run points, split at the point farthest from its first, both halves
    reduced by the recursive algorithm."""
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    turn = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - \
        (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0])
    points = points[turn != 0]
    far = int(np.argmax(np.hypot(*(points - points[0]).T)))
    first = _reference_douglas_peucker(points[: far + 1], tolerance)
    second = [far + i for i in _reference_douglas_peucker(np.vstack([points[far:], points[:1]]), tolerance)[1:-1]]
    return points[first + second]


@pytest.mark.parametrize("tolerance", [0.3, 0.5, 1.5])
def test_reduction_of_many_contours_equals_the_recursive_algorithm(tolerance: float) -> None:
    # islands, holes and ragged edges on one plane: reduced together, each as if alone
    rng = np.random.default_rng(7)
    mask = _disc((160, 160), (60, 60), 45) & ~_disc((160, 160), (55, 65), 12) | _disc((160, 160), (125, 120), 25)
    mask &= rng.random(mask.shape) > 0.02  # pinholes: many tiny holes
    mask |= _disc((160, 160), (20, 140), 6)
    exact, reduced = plane_contours(mask, 0.0), plane_contours(mask, tolerance)
    assert len(exact) == len(reduced) > 20
    changed = 0
    for (points, hole), (fewer, fewer_hole) in zip(exact, reduced, strict=True):
        assert hole == fewer_hole
        expected = _reference_reduction(points, tolerance)
        if len(fewer) != len(points) or not np.array_equal(fewer, points):
            assert np.array_equal(fewer, expected)
            changed += 1
    assert changed >= 3


def test_decimal_strings_of_many_points() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 300, 3000), rng.integers(-500, 500, 300).astype(float),
                             rng.normal(0, 1e-4, 300), [0.0, -0.0, 5e-5, -5e-5, 1.5e-4, -123456.78912]])
    points = values[: len(values) // 3 * 3].reshape(-1, 3)
    one_by_one = [format_ds(value) for value in points.ravel()]
    assert format_ds_points(points) == "\\".join(one_by_one)
    one_by_one[2::3] = ["-102.5"] * len(points)
    assert format_ds_points(points, "-102.5") == "\\".join(one_by_one)
    with pytest.raises(ValueError, match="out of range"):
        format_ds_points(np.array([[1.0, 2.0, 3.0], [4.0, -1e16, 6.0]]))
