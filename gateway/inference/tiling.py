"""Sliding-window inference: a network that sees one tile at a time, run over a whole volume.

As nnU-Net v2 does it (``nnunetv2/inference``), so that imported nnU-Net models give nnU-Net's
results: tile starts from ``compute_steps_for_sliding_window``, the Gaussian importance map of
``compute_gaussian``, test-time mirroring as ``_internal_maybe_mirror_and_predict``, and a volume
smaller than a tile padded as ``pad_nd_image`` does (``pad_position = "centre"``). Two additions
for networks from other frameworks: tiles in channels-last layout, and "valid" networks whose
output is the input tile less a margin (``output_crop``); the margin around the volume is padded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from gateway.inference.manifest import InputSpec

__all__ = ["Tiler", "gaussian_weights", "window_steps"]

#: Runs the network on ``[batch, 1, *patch]`` (channels first) and returns ``[batch, channels, *output]``.
Network = Callable[[np.ndarray], np.ndarray]


def window_steps(size: int, patch: int, overlap: float) -> list[int]:
    """Tile start positions covering ``size`` with tiles of ``patch``, neighbours sharing ``overlap``.

    As nnU-Net: the fewest tiles whose stride is at most ``patch * (1 - overlap)``,
    spread evenly from 0 to ``size - patch``.
    """
    if size <= patch:
        return [0]
    target = patch * (1 - overlap)
    count = math.ceil((size - patch) / target) + 1
    stride = (size - patch) / (count - 1)
    return [round(stride * i) for i in range(count)]


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 1 / 8, peak: float = 1.0,
                     dtype: type[np.floating] = np.float32) -> np.ndarray:
    """nnU-Net's tile weights: a unit impulse at ``patch // 2`` blurred with sigma ``patch * sigma_scale``,
    scaled to peak at *peak*, in *dtype*, zeros raised to the smallest weight (``compute_gaussian``)."""
    impulse = np.zeros(tuple(patch), dtype=np.float64)
    impulse[tuple(p // 2 for p in patch)] = 1
    blurred: np.ndarray = gaussian_filter(impulse, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    weights: np.ndarray = (blurred / (blurred.max() / peak)).astype(dtype)
    weights[weights == 0] = weights[weights > 0].min()
    return weights


def _mirror_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty combination of the mirror axes, as array axes of a ``[batch, channel, *tile]`` array."""
    shifted = [axis + 2 for axis in axes]
    return [combo for count in range(1, len(shifted) + 1) for combo in itertools.combinations(shifted, count)]


class Tiler:
    """Averages a network's tile outputs over a volume as the manifest's input section says."""

    def __init__(self, spec: InputSpec, channels: int, network: Network) -> None:
        self._spec = spec
        self._channels = channels
        self._network = network
        self._output = spec.output_size
        # float16 sums as nnU-Net's _internal_predict_sliding_window_return_logits: weights peak at 10, in half
        self._dtype = np.float16 if spec.accumulate == "float16" else np.float32
        half = self._dtype == np.float16
        self._weights = (gaussian_weights(self._output, peak=10.0 if half else 1.0, dtype=self._dtype)
                         if spec.tile_weighting == "gaussian" else np.ones(self._output, dtype=self._dtype))
        self._mirrors = _mirror_sets(spec.mirror_axes)

    def tiles(self, shape: Sequence[int]) -> int:
        """How many tiles a volume of *shape* takes."""
        return math.prod(len(window_steps(s, o, self._spec.overlap)) for s, o in zip(self._padded(shape), self._output,
                                                                                   strict=True))

    def scores(self, image: np.ndarray, padding: float,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The weighted mean of the tile outputs, ``[channels, *image.shape]`` (float32, or float16 as the manifest
        says: 118 channels on a 167 x 167 x 300 grid take 2 GB instead of 4)."""
        spec, output = self._spec, self._output
        space = self._padded(image.shape)
        offset = [(s - n) // 2 if spec.pad_position == "centre" else 0 for s, n in zip(space, image.shape, strict=True)]
        padded = np.pad(image, [(c + o, c + s - n - o) for c, o, s, n in
                                zip(spec.output_crop, offset, space, image.shape, strict=True)],
                        constant_values=padding)
        scores = np.zeros((self._channels, *space), dtype=self._dtype)
        weight = np.zeros(space, dtype=self._dtype)
        starts = list(itertools.product(*[window_steps(s, o, spec.overlap) for s, o in zip(space, output,
                                                                                            strict=True)]))
        for first in range(0, len(starts), spec.batch_size):
            group = starts[first:first + spec.batch_size]
            tiles = np.stack([padded[tuple(slice(s, s + p) for s, p in zip(start, spec.patch_size, strict=True))][None]
                              for start in group])
            for start, result in zip(group, self._run(tiles), strict=True):
                region = tuple(slice(s, s + o) for s, o in zip(start, output, strict=True))
                target = scores[(slice(None), *region)]
                for index, channel in enumerate(result):  # one channel at a time: no weighted copy of the whole tile
                    np.add(target[index], channel * self._weights, out=target[index])
                np.add(weight[region], self._weights, out=weight[region])
            if progress is not None:
                progress(first + len(group), len(starts))
        scores /= weight
        inside = tuple(slice(o, o + n) for o, n in zip(offset, image.shape, strict=True))
        return scores[(slice(None), *inside)]

    def _padded(self, shape: Sequence[int]) -> list[int]:
        """The extent the output tiles cover: the volume, or one output tile where the volume is smaller."""
        return [max(s, o) for s, o in zip(shape, self._output, strict=True)]

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        """The network's output on *tiles*, averaged over the mirrored copies (nnU-Net's order of sums)."""
        result = self._network(tiles)
        if not self._mirrors:
            return result
        result = result.copy() if not result.flags.writeable else result  # summed in place: one tile output at most
        for axes in self._mirrors:
            result += np.flip(self._network(np.ascontiguousarray(np.flip(tiles, axes))), axes)
        result /= len(self._mirrors) + 1
        return result
