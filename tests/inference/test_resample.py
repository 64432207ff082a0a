"""Resampling helpers: the fused median + resampling equals filtering everything first, edges included."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import median_filter

from gateway.inference.resample import (
    back_to_grid,
    nnunet_resize,
    nnunet_shape,
    resample_linear,
    resample_median_linear,
)


@pytest.mark.parametrize(("shape", "factors", "size"), [
    ((20, 17, 12), (0.5, 0.5, 0.5), 3),  # pyliverlesionseg: 1.5 mm -> 3 mm reads every other voxel
    ((20, 17, 12), (0.37, 0.8, 1.0), 3),  # fractional positions read both neighbours
    ((9, 11, 7), (1.6, 0.5, 0.9), 5),  # upsampling along one axis, a wider median
])
def test_fused_median_equals_filtering_everything(shape: tuple[int, int, int], factors: tuple[float, float, float],
                                                  size: int) -> None:
    array = np.random.default_rng(3).normal(0, 300, shape).astype(np.float32)
    expected = resample_linear(median_filter(array, size=size), factors)
    np.testing.assert_array_equal(resample_median_linear(array, size, factors), expected)


def test_fused_median_in_small_slabs() -> None:
    from gateway.inference.resample import _median_at

    array = np.random.default_rng(4).normal(0, 1, (15, 9, 8)).astype(np.float32)
    needed = [np.arange(0, 15, 2), np.arange(9), np.arange(0, 8, 3)]
    np.testing.assert_array_equal(_median_at(array, 3, needed, budget=1), median_filter(array, size=3)[np.ix_(*needed)])


def test_linear_resampling_reads_no_neighbour_on_a_voxel() -> None:
    array = np.arange(12, dtype=np.int16).reshape(1, 1, 12)
    np.testing.assert_array_equal(resample_linear(array, (1, 1, 0.5))[0, 0], [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(resample_linear(array, (1, 1, 2.0))[0, 0, :3], [0, 0.5, 1])


def test_back_to_grid_takes_the_nearest_model_voxel() -> None:
    classes = np.arange(4, dtype=np.uint8).reshape(1, 1, 4)
    assert back_to_grid(classes, (1, 1, 8), (1, 1, 0.5))[0, 0].tolist() == [0, 0, 1, 2, 2, 2, 3, 3]


class TestAsNnunet:
    """Against nnU-Net's own ``resample_data_or_seg_to_shape`` (the [nnunet] extra is installed by make test)."""

    @pytest.mark.parametrize(("shape", "current", "new", "order"), [
        ((20, 30, 26), (2.0, 1.0, 1.2), (2.5, 1.5, 1.5), 3),  # isotropic enough: one 3D spline
        ((12, 40, 40), (5.0, 1.0, 1.0), (2.5, 1.5, 1.5), 3),  # 5:1 slices: in-plane splines, nearest along z
        ((24, 27, 27), (2.5, 1.5, 1.5), (5.0, 1.0, 1.0), 1),  # logits back to a 5:1 CT
        ((10, 12, 12), (1.0, 4.0, 4.0), (3.5, 1.0, 1.0), 3),  # two coarse axes: no slice-wise resampling
    ])
    def test_equals_nnunet(self, shape: tuple[int, int, int], current: tuple[float, float, float],
                           new: tuple[float, float, float], order: int) -> None:
        from nnunetv2.preprocessing.resampling.default_resampling import (
            compute_new_shape,
            resample_data_or_seg_to_shape,
        )

        array = np.random.default_rng(5).normal(0, 1, shape).astype(np.float32)
        target = nnunet_shape(shape, current, new)
        assert list(target) == [int(n) for n in compute_new_shape(shape, current, new)]
        expected = resample_data_or_seg_to_shape(array[None], target, current, new, is_seg=False, order=order,
                                                 order_z=0, force_separate_z=None)[0]
        if order == 1:  # separable (scipy sums the four corners' products): the same to 1 ulp in float32
            np.testing.assert_array_max_ulp(nnunet_resize(array, target, current, new, order), expected, maxulp=1)
        else:
            np.testing.assert_array_equal(nnunet_resize(array, target, current, new, order), expected)

    def test_same_shape_is_untouched(self) -> None:
        array = np.zeros((4, 5, 6), np.float32)
        assert nnunet_resize(array, (4, 5, 6), (1, 1, 1), (1.01, 1, 1), 3) is array
