"""Vectorised marching squares on binary planes, against scikit-image's ``find_contours`` as the reference."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import measure

from gateway.rt.tracing import _jump, _walk, boundaries


def _signed_area(points: np.ndarray) -> float:
    rows, cols = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(cols, np.roll(rows, -1)) - np.dot(np.roll(cols, -1), rows))


def _cyclic_start(points: np.ndarray) -> np.ndarray:
    """The loop rotated to start at its smallest point: two traces of one loop compare equal."""
    first = min(range(len(points)), key=lambda i: tuple(points[i]))
    return np.roll(points, -first, axis=0)


def _canonical(loops: list[np.ndarray]) -> list[tuple[tuple[float, ...], ...]]:
    return sorted(tuple(map(tuple, _cyclic_start(points).tolist())) for points in loops)


def _reference(plane: np.ndarray) -> list[np.ndarray]:
    padded = np.pad(plane.astype(np.uint8), 1)
    return [traced[:-1] - 1.0 for traced in measure.find_contours(padded, 0.5)]


@pytest.mark.parametrize("seed", range(6))
def test_same_loops_in_the_same_direction_as_scikit_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):  # noise of every density: saddles, holes, islands, loops touching the edges
        plane = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.uniform(0.05, 0.95)
        ours = boundaries(plane)
        assert _canonical(ours) == _canonical(_reference(plane))
        for points in ours:
            assert len({tuple(p) for p in points.tolist()}) == len(points)  # simple: no point twice


def test_orientation_tells_holes_from_outer_boundaries() -> None:
    plane = np.zeros((9, 9), dtype=bool)
    plane[1:8, 1:8] = True
    plane[3:6, 3:6] = False  # a hole
    plane[4, 4] = True  # an island inside it
    areas = sorted(_signed_area(points) for points in boundaries(plane))
    assert areas == [-8.5, 0.5, 48.5]  # hole negative, outer and island positive; corners cut by 1/8 pixel
    single = boundaries(np.ones((1, 1), dtype=bool))
    assert len(single) == 1 and _signed_area(single[0]) == 0.5


def test_diagonal_pixels_stay_apart_and_an_empty_plane_has_none() -> None:
    diagonal = np.eye(4, dtype=bool)
    assert len(boundaries(diagonal)) == 4
    assert boundaries(np.zeros((5, 5), dtype=bool)) == []
    assert len(boundaries(np.ones((5, 7), dtype=bool))) == 1


@pytest.mark.parametrize("seed", range(3))
def test_loops_followed_one_by_one_and_by_pointer_jumping_agree(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for count in (1, 2, 3, 17, 255, 256, 1000, 4099):
        following = rng.permutation(count)  # any permutation: loops of every length, fixed points too
        walked, jumped = _walk(following), _jump(following)
        assert [members.tolist() for members in walked] == [members.tolist() for members in jumped]
        assert sorted(np.concatenate(walked).tolist()) == list(range(count))
        for members in walked:
            assert members[0] == members.min()
            assert following[members].tolist() == np.roll(members, -1).tolist()  # in order of travel


def test_every_corner_pattern_of_a_cell_against_scikit_image() -> None:
    for code in range(16):
        plane = np.array([[code & 8, code & 4], [code & 2, code & 1]], dtype=bool)
        assert _canonical(boundaries(plane)) == _canonical(_reference(plane)), code
