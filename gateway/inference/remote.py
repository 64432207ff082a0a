"""A model package run by the inference farm: the same interface as the local predictor, the work on a server.

The node keeps the package (its manifest names the labels the later stages need, and its digest is checked
against what each server serves); the volume goes to the farm as :mod:`gateway.inference.wire` says, and the
masks come back on the CT grid, post-processed, with the model's confidence figures.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from gateway.errors import InferenceError
from gateway.inference.farm import TritonFarm
from gateway.inference.packages import load_model
from gateway.inference.predictor import Prediction
from gateway.inference.serving import package_digest
from gateway.inference.volume import Volume, VolumeLimits
from gateway.inference.wire import prediction_from_result, request_arrays

__all__ = ["RemotePredictor"]


class RemotePredictor:
    """Runs the package ``folder`` (Triton model name *model*) on the farm; build once, :meth:`predict` per series."""

    def __init__(self, model: str, folder: Path, farm: TritonFarm) -> None:
        self.manifest = load_model(folder).manifest
        self._model = model
        self._digest = package_digest(folder)
        self._farm = farm

    @property
    def providers(self) -> list[str]:
        """Where the model runs: on the farm's servers."""
        return ["triton"]

    def predict(self, volume: Volume, progress: Callable[[int, int], None] | None = None, *,
                max_voxels: int = VolumeLimits().max_voxels) -> Prediction:
        """Segment *volume* on a server of the farm.

        Raises
        ------
        InferenceUnavailable
            When no server answered (the stage waits and tries again).
        VolumeError, InferenceError
            When the model refused or failed on the volume, or the reply does not fit it.
        """
        started = time.monotonic()
        prediction = prediction_from_result(self._farm.infer(self._model, self._digest,
                                                             request_arrays(volume, max_voxels)))
        expected = {label.name: label.value for label in self.manifest.labels}
        if prediction.values != expected or prediction.masks.shape != volume.shape:
            raise InferenceError(f"the server's reply does not fit model {self._model} and this volume",
                                 reason="inference_reply_mismatch")
        if progress is not None:
            progress(1, 1)
        return dataclasses.replace(prediction, seconds=time.monotonic() - started)
