"""Resampling between the CT grid and a model's grid (corner-aligned: model index m samples scan position m / f).

Separable linear interpolation straight from the (int16) CT, so no full-resolution float copy is
made; a median filter fused into a resampling step, evaluated only at the voxels that step reads
(pyliverlesionseg filters at 1.5 mm and keeps every other voxel for 3 mm: an eighth of the work);
and the nearest-neighbour map of model labels back to the CT grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["CANONICAL", "back_to_grid", "linear_shape", "resample_linear", "resample_median_linear", "zoom_factors",
           "zoom_indices", "zoom_shape", "zoom_to_int32"]


def _count(size: int, factor: float) -> int:
    """Output extent along an axis of *size* input voxels: every position m / factor within the input."""
    return max(1, math.floor((size - 1) * factor + 1e-6) + 1)


def linear_shape(shape: Sequence[int], factors: Sequence[float]) -> tuple[int, ...]:
    """The shape :func:`resample_linear` (or :func:`resample_median_linear`) returns, computed without resampling."""
    return tuple(_count(n, f) for n, f in zip(shape, factors, strict=True))


def _taps(size: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the input indices below and above its position, and the fraction between.

    Where the position falls on an input voxel, both indices are that voxel (nothing else is read).
    """
    count = _count(size, factor)
    position = np.minimum(np.arange(count) / factor, size - 1)
    low = np.floor(position).astype(np.int64)
    fraction = (position - low).astype(np.float32)
    high = np.where(fraction > 0, np.minimum(low + 1, size - 1), low)
    return low, high, fraction


def _interpolate(array: np.ndarray, axis: int, low: np.ndarray, high: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    shape = [1] * array.ndim
    shape[axis] = len(fraction)
    weight = fraction.reshape(shape)
    result: np.ndarray = np.take(array, low, axis=axis) * (1 - weight) + np.take(array, high, axis=axis) * weight
    return result


def resample_linear(array: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Separable linear resampling; output index m samples input position m / factor.

    Axes are taken in order of decreasing reduction, so the largest intermediate is small.
    """
    for axis in sorted(range(array.ndim), key=lambda a: factors[a]):
        if abs(factors[axis] - 1) < 1e-9:
            continue
        array = _interpolate(array, axis, *_taps(array.shape[axis], factors[axis]))
    return array.astype(np.float32, copy=False)


def resample_median_linear(array: np.ndarray, size: int, factors: Sequence[float]) -> np.ndarray:
    """``resample_linear(scipy.ndimage.median_filter(array, size), factors)``, exactly, without filtering the
    voxels the resampling never reads (edges reflected as scipy's default ``mode="reflect"``)."""
    taps = [_taps(n, f) for n, f in zip(array.shape, factors, strict=True)]
    needed = [np.unique(np.concatenate([low, high])) for low, high, _ in taps]
    medians = _median_at(array, size, needed)
    for axis in sorted(range(array.ndim), key=lambda a: factors[a]):  # resample_linear's order of operations
        (low, high, fraction), used = taps[axis], needed[axis]
        medians = _interpolate(medians, axis, np.searchsorted(used, low), np.searchsorted(used, high), fraction)
    return medians.astype(np.float32, copy=False)


def _median_at(array: np.ndarray, size: int, needed: Sequence[np.ndarray], budget: int = 64 << 20) -> np.ndarray:
    """The ``size``-cube median filter of *array* at the grid ``np.ix_(*needed)`` only, in slabs of at most
    *budget* bytes of neighbourhood values."""
    taps = size ** array.ndim
    plane = math.prod(len(n) for n in needed[1:]) * taps * array.dtype.itemsize
    step = max(1, budget // max(1, plane))
    result = np.empty(tuple(len(n) for n in needed), dtype=array.dtype)
    for first in range(0, len(needed[0]), step):
        slab = [needed[0][first:first + step], *needed[1:]]
        result[first:first + step] = _slab_median(array, size, slab)
    return result


def _slab_median(array: np.ndarray, size: int, needed: Sequence[np.ndarray]) -> np.ndarray:
    radius = size // 2
    window = np.empty((*(len(n) for n in needed), size ** array.ndim), dtype=array.dtype)
    for index, offsets in enumerate(itertools.product(range(-radius, radius + 1), repeat=array.ndim)):
        window[..., index] = array[np.ix_(*[_reflect(n + o, extent) for n, o, extent in
                                            zip(needed, offsets, array.shape, strict=True)])]
    middle = window.shape[-1] // 2
    window.partition(middle, axis=-1)
    result: np.ndarray = window[..., middle]
    return result


def _reflect(indices: np.ndarray, extent: int) -> np.ndarray:
    """scipy's "reflect" edge (d c b a | a b c d | d c b a) for offsets within one extent."""
    reflected = np.where(indices < 0, -indices - 1, indices)
    reflected = np.where(reflected >= extent, 2 * extent - reflected - 1, reflected)
    return np.clip(reflected, 0, extent - 1)


def back_to_grid(classes: np.ndarray, shape: Sequence[int], factors: Sequence[float]) -> np.ndarray:
    """Nearest class for every original voxel (scan index c sits at model position c * factor); *classes*
    itself where the grids are the same."""
    if tuple(classes.shape) == tuple(shape) and all(factor == 1 for factor in factors):
        return classes
    indices = [np.minimum(np.round(np.arange(n) * factor).astype(np.int64), m - 1)
               for n, factor, m in zip(shape, factors, classes.shape, strict=True)]
    grid: np.ndarray = classes[np.ix_(*indices)]
    return grid


#: nnU-Net resamples slice by slice, nearest along the remaining axis, when one spacing is over 3x another.
ANISOTROPY = 3.0


def nnunet_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: each extent scaled by the spacing ratio, rounded."""
    return tuple(round(s / t * n) for n, s, t in zip(shape, spacing, target, strict=True))


def _separate_axis(current: Sequence[float], new: Sequence[float]) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis`` (``force_separate_z=None``): the one coarse axis of the first
    anisotropic spacing, the current one first; none if that spacing has two or three coarsest axes."""
    for spacing in (current, new):
        if max(spacing) / min(spacing) > ANISOTROPY:
            coarse = [axis for axis, s in enumerate(spacing) if max(spacing) / s == 1]
            return coarse[0] if len(coarse) == 1 else None
    return None


def nnunet_resize(array: np.ndarray, shape: Sequence[int], current: Sequence[float], new: Sequence[float],
                  order: int) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg`` for one channel of image data or logits (``order_z = 0``).

    A spline of *order* (skimage ``resize``, edge mode, no anti-aliasing, in float64; order 1 separably, a few
    planes at a time, to 1e-14 and some 3 times faster); slice by slice
    with the nearest slice along a coarse axis (pixel centres aligned, as nnU-Net's ``map_coordinates``).
    The result has *array*'s dtype; an array already of *shape* is returned as it is.
    """
    from skimage.transform import resize

    if tuple(array.shape) == tuple(shape):
        return array
    axis = _separate_axis(current, new)
    if axis is None:
        if order == 1:
            return _zoom_linear(array.astype(np.float64), shape).astype(array.dtype)
        result: np.ndarray = resize(array.astype(np.float64), tuple(shape), order=order,  # type: ignore[no-untyped-call]
                                    mode="edge", anti_aliasing=False)
        return result.astype(array.dtype)
    in_plane = tuple(n for a, n in enumerate(shape) if a != axis)
    planes = np.empty(tuple(shape[a] if a != axis else array.shape[axis] for a in range(array.ndim)),
                      dtype=array.dtype)
    step = 1 if order != 1 else max(1, _SLAB // max(1, math.prod(in_plane) * 8))
    for k in range(0, array.shape[axis], step):  # a few planes at a time, kept in *array*'s dtype
        index = tuple(slice(k, k + step) if a == axis else slice(None) for a in range(array.ndim))
        slab = np.moveaxis(array[index].astype(np.float64), axis, 0)
        if order == 1:
            resized = _zoom_linear(slab, (len(slab), *in_plane))
        else:
            resized = np.stack([resize(plane, in_plane, order=order, mode="edge",  # type: ignore[no-untyped-call]
                                       anti_aliasing=False) for plane in slab])
        planes[index] = np.moveaxis(resized, 0, axis)
    if planes.shape[axis] != shape[axis]:
        scale = planes.shape[axis] / shape[axis]
        nearest = np.floor(scale * (np.arange(shape[axis]) + 0.5) - 0.5 + 0.5).astype(np.int64)
        planes = np.take(planes, np.clip(nearest, 0, planes.shape[axis] - 1), axis=axis)
    return planes


#: Bytes of float64 planes :func:`nnunet_resize` resamples at once.
_SLAB = 64 << 20


def _zoom_linear(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """skimage's ``resize(array, shape, order=1, mode="edge", anti_aliasing=False)`` (``scipy.ndimage.zoom`` with
    ``grid_mode=True``, edge values beyond the border), separably, axis by axis, some 3 times faster (to 1e-14).
    The last axis goes first, while the array is small, swapped with the one before it: gathering rows is faster."""
    for axis in reversed(range(array.ndim)):
        size = shape[axis]
        extent = array.shape[axis]
        if extent == size:
            continue
        position = np.clip((np.arange(size) + 0.5) * (extent / size) - 0.5, 0, extent - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, extent - 1)
        swap = axis == array.ndim - 1 and axis > 0
        along = axis - 1 if swap else axis
        work = np.ascontiguousarray(np.swapaxes(array, axis, along)) if swap else array
        weight = (position - low).reshape([size if a == along else 1 for a in range(array.ndim)])
        result = np.take(work, low, axis=along)
        step = np.take(work, high, axis=along)
        step -= result
        step *= weight
        result += step
        array = np.ascontiguousarray(np.swapaxes(result, axis, along)) if swap else result
    return array


#: The axes TotalSegmentator resamples in: nibabel's ``as_closest_canonical`` (RAS). ``scipy.ndimage.zoom``'s sums
#: depend on the array's axis order and direction (float64 rounding, then a cast to int32 that truncates), so
#: ``resampling = "totalsegmentator"`` resamples there too, then turns the result to the model's axes.
CANONICAL = "RAS"


def zoom_shape(shape: Sequence[int], factors: Sequence[float]) -> tuple[int, ...]:
    """``scipy.ndimage.zoom``'s output shape: each extent times its factor, rounded."""
    return tuple(round(n * f) for n, f in zip(shape, factors, strict=True))


def zoom_factors(spacing: Sequence[float], target: Sequence[float]) -> list[float]:
    """TotalSegmentator's ``change_spacing`` zoom: the NIfTI header's (float32) voxel size over the target's."""
    return [float(np.float32(s)) / t for s, t in zip(spacing, target, strict=True)]


def zoom_to_int32(array: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """TotalSegmentator's ``change_spacing(img, spacing, order=1, dtype=np.int32)``: ``scipy.ndimage.zoom`` of the
    image in float64 (linear, ``mode="nearest"``, corners aligned), cast to int32 (truncated toward zero); the image
    itself (as float64) where every factor is 1, as ``change_spacing`` returns it unresampled."""
    from scipy import ndimage

    data = array.astype(np.float64)
    if all(f == 1 for f in factors):
        return data
    zoomed: np.ndarray = ndimage.zoom(data, list(factors), order=1, mode="nearest")
    return zoomed.astype(np.int32)


def zoom_indices(size: int, count: int, reverse: bool = False) -> np.ndarray:
    """The input index ``scipy.ndimage.zoom(..., order=0, mode="nearest")`` picks for each of *count* outputs along
    an axis of *size* (TotalSegmentator's labels back to the CT grid); order 0 is separable, so a 3D zoom is the
    array indexed by each axis's picks. *reverse*: the picks of the same zoom done on the axis reversed (the
    model's axis runs against TotalSegmentator's canonical one), in this axis's direction."""
    from scipy import ndimage

    if size == count:
        return np.arange(count)
    picks = ndimage.zoom(np.arange(size, dtype=np.float64), count / size, order=0, mode="nearest")
    if len(picks) != count:
        raise ValueError(f"zoom of {size} voxels by {count}/{size} gives {len(picks)}, not {count}")
    indices: np.ndarray = np.rint(picks).astype(np.int64)
    if reverse:
        return np.asarray(size - 1 - indices[::-1])
    return indices
