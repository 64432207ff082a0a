"""Sliding-window inference (gateway.inference.tiling) with stand-in networks whose answers are known in advance."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from gateway.inference.manifest import InputSpec
from gateway.inference.tiling import Tiler, gaussian_weights, window_steps


def spec(patch: list[int], **extra: Any) -> InputSpec:
    return InputSpec.model_validate({"orientation": "SPL", "spacing_mm": [1, 1, 1], "patch_size": patch,
                                     "normalisation": {"kind": "clip_scale", "hu_min": 0, "hu_max": 1}, **extra})


def cropping(crop: list[int]) -> Any:
    """A network returning its input less *crop* voxels at each side (so averages reproduce the image)."""
    def network(batch: np.ndarray) -> np.ndarray:
        inner = tuple(slice(c, batch.shape[2 + axis] - c) for axis, c in enumerate(crop))
        return np.ascontiguousarray(batch[(slice(None), slice(None), *inner)])
    return network


class TestWindowSteps:
    @pytest.mark.parametrize(("size", "patch", "overlap", "expected"), [
        (64, 64, 0.5, [0]), (30, 64, 0.5, [0]), (100, 64, 0.5, [0, 18, 36]), (128, 64, 0.5, [0, 32, 64]),
        (129, 64, 0.5, [0, 22, 43, 65]), (100, 64, 0.0, [0, 36]), (110, 64, 0.5, [0, 23, 46]),
        (20, 5, 0.5, [0, 2, 5, 8, 10, 12, 15]),  # an odd tile: stride 2.5 as nnU-Net, not 2
    ])
    def test_known_cases(self, size: int, patch: int, overlap: float, expected: list[int]) -> None:
        assert window_steps(size, patch, overlap) == expected

    def test_every_voxel_is_covered_and_strides_respect_the_overlap(self) -> None:
        for size, patch, overlap in itertools.product(range(1, 200, 7), (8, 32, 64), (0.0, 0.25, 0.5, 0.75)):
            steps = window_steps(size, patch, overlap)
            covered = np.zeros(max(size, patch), dtype=bool)
            for start in steps:
                covered[start:start + patch] = True
            assert covered[:size].all()
            assert steps[0] == 0 and steps[-1] == max(0, size - patch)
            assert all(b - a <= math.ceil(patch * (1 - overlap)) for a, b in itertools.pairwise(steps))


def test_gaussian_weights_are_nnunets() -> None:
    weights = gaussian_weights((9, 16, 16))
    assert weights.shape == (9, 16, 16) and weights.dtype == np.float32
    assert weights[4, 8, 8] == pytest.approx(1.0) and weights.max() == weights[4, 8, 8] and weights.min() > 0
    # Separable and centred at patch // 2: one axis of it is the sampled Gaussian with sigma patch / 8.
    profile = weights[4, 8, :]
    expected = np.exp(-0.5 * ((np.arange(16) - 8) / 2.0) ** 2)
    np.testing.assert_allclose(profile, expected / expected.max(), rtol=1e-3)
    np.testing.assert_allclose(weights[:, 8, 8], weights[::-1, 8, 8])  # odd axis: symmetric


class TestTiler:
    @pytest.mark.parametrize(("shape", "crop", "position", "weighting"), [
        ((20, 30, 27), [0, 0, 0], "end", "gaussian"),
        ((20, 30, 27), [2, 3, 1], "end", "constant"),
        ((5, 30, 7), [2, 0, 1], "centre", "gaussian"),  # smaller than a tile on two axes
        ((5, 6, 7), [1, 1, 1], "end", "gaussian"),
    ])
    def test_a_faithful_network_gives_the_image_back(self, shape: tuple[int, int, int], crop: list[int],
                                                      position: str, weighting: str) -> None:
        image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        tiler = Tiler(spec([12, 14, 16], output_crop=crop, pad_position=position, tile_weighting=weighting,
                           batch_size=3), 1, cropping(crop))
        scores = tiler.scores(image, padding=-5.0)
        assert scores.shape == (1, *shape)
        np.testing.assert_allclose(scores[0], image, rtol=1e-5, atol=1e-5)

    def test_the_margin_of_a_valid_network_is_padding(self) -> None:
        seen: list[np.ndarray] = []

        def network(batch: np.ndarray) -> np.ndarray:
            seen.append(batch.copy())
            return np.zeros((batch.shape[0], 1, 6, 6, 6), dtype=np.float32)
        Tiler(spec([10, 10, 10], output_crop=[2, 2, 2]), 1, network).scores(np.ones((6, 6, 6), np.float32), -7.0)
        (tile,) = seen
        assert tile.shape == (1, 1, 10, 10, 10)
        assert (tile[0, 0, 2:8, 2:8, 2:8] == 1).all() and (tile[0, 0, :2] == -7).all() and (tile[0, 0, 8:] == -7).all()

    def test_centre_padding_places_the_volume_in_the_middle_of_the_tile(self) -> None:
        def position(batch: np.ndarray) -> np.ndarray:  # each output voxel says its index along axis 0 of the tile
            return np.broadcast_to(np.arange(16, dtype=np.float32)[None, None, :, None, None],
                                   (batch.shape[0], 1, 16, 8, 8)).copy()
        image = np.zeros((5, 8, 8), np.float32)
        centred = Tiler(spec([16, 8, 8], pad_position="centre"), 1, position).scores(image, 0.0)
        at_end = Tiler(spec([16, 8, 8]), 1, position).scores(image, 0.0)
        assert centred[0, :, 0, 0].tolist() == [5, 6, 7, 8, 9]  # (16 - 5) // 2 = 5 voxels before, as nnU-Net
        assert at_end[0, :, 0, 0].tolist() == [0, 1, 2, 3, 4]

    def test_mirroring_averages_the_flipped_predictions(self) -> None:
        ramp = np.linspace(0, 1, 8, dtype=np.float32)[None, None, :, None, None]

        def skewed(batch: np.ndarray) -> np.ndarray:  # not mirror-symmetric: weights rise along axis 0
            return batch * ramp
        image = np.random.default_rng(2).normal(size=(8, 6, 6)).astype(np.float32)
        scores = Tiler(spec([8, 6, 6], mirror_axes=[0]), 1, skewed).scores(image, 0.0)
        ramp3 = ramp[0, 0]
        np.testing.assert_allclose(scores[0], image * (ramp3 + ramp3[::-1]) / 2, rtol=1e-6)
        both = Tiler(spec([8, 6, 6], mirror_axes=[0, 1, 2]), 1, skewed).scores(image, 0.0)
        np.testing.assert_allclose(both[0], scores[0], rtol=1e-6)  # flips of axes 1, 2 change nothing here

    def test_tile_count(self) -> None:
        tiler = Tiler(spec([10, 10, 10], output_crop=[2, 2, 2], overlap=0.0), 1, cropping([2, 2, 2]))
        assert tiler.tiles((12, 6, 13)) == 2 * 1 * 3
