"""A bundle runs as one model: its parts one after another, their class maps merged as TotalSegmentator merges them.

TotalSegmentator predicts its ``total`` task with five nnU-Net models ("parts") and writes each part's class map into
one combined map in turn, a later part's foreground over whatever an earlier part found there
(``totalsegmentator/nnunet.py``: ``np.copyto(seg_combined, mapped_seg, where=mapped_seg != 0)``).
:class:`BundlePredictor` does the same with the parts' :class:`~gateway.inference.predictor.Prediction` masks (each
already post-processed by its part and mapped to the CT grid), so a bundle's result is one class map of the
bundle's labels (:mod:`gateway.inference.packages`, ``[bundle]``). Only one part's result and the combined map are
held at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import structlog

from gateway.errors import VolumeError
from gateway.inference.confidence import Confidence
from gateway.inference.labels import LabelMasks
from gateway.inference.orientation import axis_transform, orientation_code
from gateway.inference.packages import ModelBundle
from gateway.inference.predictor import Prediction, Predictor
from gateway.inference.volume import Volume, VolumeLimits

__all__ = ["BundlePredictor", "overlay"]

log = structlog.get_logger(__name__)


class BundlePredictor:
    """Runs a :class:`~gateway.inference.packages.ModelBundle`; build once, call :meth:`predict` per series.

    One onnxruntime session per part, all made here (a part that cannot load fails the bundle at once).
    """

    def __init__(self, bundle: ModelBundle, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0, cuda_tf32: bool = False, device_id: int = 0) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.parts = [Predictor(part, providers=providers, threads=threads, cuda_tf32=cuda_tf32, device_id=device_id)
                      for part in bundle.parts]

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers the (first part's) session runs on, preferred first."""
        return self.parts[0].providers

    def predict(self, volume: Volume, progress: Callable[[int, int], None] | None = None, *,
                max_voxels: int = VolumeLimits().max_voxels) -> Prediction:
        """Segment *volume* with each part in turn and merge them, a later part's labels over an earlier part's.

        *progress* gets ``(tiles done, tiles in all)`` over the parts together, each part still to come counted
        as the running part's tiles.

        Raises
        ------
        VolumeError
            ``model_grid_too_large``, before any part runs, when a part's grid would exceed *max_voxels*.
        InferenceError
            When a part fails.
        """
        started = time.monotonic()
        self._check_grids(volume, max_voxels)
        values = {label.name: label.value for label in self.manifest.labels}
        classes = np.zeros(volume.shape, dtype=np.uint8 if len(values) <= 255 else np.uint16)
        confidence: dict[str, Confidence] = {}
        split_mm: dict[str, float] = {}
        tiles = _PartsProgress(progress, len(self.parts))
        for part in self.parts:
            prediction = part.predict(volume, tiles if progress is not None else None, max_voxels=max_voxels)
            tiles.next_part()
            overlay(classes, prediction, values)
            confidence.update(prediction.confidence)
            split_mm.update(prediction.split_mm)
            del prediction
        counts = np.bincount(classes.ravel(), minlength=len(values) + 1)
        voxels = {name: int(counts[value]) for name, value in values.items()}
        result = Prediction(LabelMasks.from_classes(classes, len(values)), values, voxels,
                            time.monotonic() - started, confidence, split_mm)
        log.info("inference_done", model=self.manifest.model.name, parts=len(self.parts),
                 seconds=round(result.seconds, 2), empty_labels=result.empty)
        return result

    def _check_grids(self, volume: Volume, max_voxels: int) -> None:
        """Every part's grids checked before the first part runs (a part checks only its own)."""
        code = orientation_code(volume.affine)
        for part in self.parts:
            order, _ = axis_transform(code, part.manifest.input.orientation)
            shape = [volume.shape[axis] for axis in order]
            spacing = [volume.spacing[axis] for axis in order]
            for grid in part.grid_shapes(shape, spacing):
                if math.prod(grid) > max_voxels:
                    raise VolumeError("model_grid_too_large", f"{' x '.join(map(str, grid))} voxels on the grid "
                                      f"of model {part.manifest.model.name}, at most {max_voxels}")


def overlay(classes: np.ndarray, prediction: Prediction, values: dict[str, int]) -> None:
    """Write *prediction*'s labels into the class map *classes* as the bundle's *values* (name -> value), over
    whatever is there: TotalSegmentator's merge of its parts. A voxel the part gives two labels (possible after
    hole filling) gets the later of them in the part's order."""
    boxes = prediction.masks.boxes(prediction.values.values())
    for name, value in sorted(prediction.values.items(), key=lambda item: item[1]):
        if value in boxes:
            box = boxes[value]
            classes[box][prediction.masks.region(value, box)] = values[name]


class _PartsProgress:
    """A part's ``(done, total)`` as the bundle's: the finished parts' tiles before it, the parts to come after."""

    def __init__(self, progress: Callable[[int, int], None] | None, parts: int) -> None:
        self._progress = progress
        self._left = parts
        self._finished = self._total = 0

    def __call__(self, done: int, total: int) -> None:
        self._total = total
        if self._progress is not None:
            self._progress(self._finished + done, self._finished + total * self._left)

    def next_part(self) -> None:
        self._finished += self._total
        self._left -= 1
        self._total = 0
