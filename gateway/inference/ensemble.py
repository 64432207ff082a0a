"""A route's models run as one: their labels merged in order, and the result as bytes a stage can store."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np

from gateway.errors import InferenceError
from gateway.inference.predictor import Prediction, Predictor
from gateway.inference.volume import Volume, VolumeLimits

__all__ = ["decode_masks", "encode_masks", "infer", "merge_predictions"]


def infer(predictors: Sequence[Predictor], volume: Volume, progress: Callable[[int, int], None] | None = None,
          limits: VolumeLimits | None = None) -> Prediction:
    """Run the route's models, their labels merged in order; an all-empty result is an error (nothing is sent).

    Raises :class:`VolumeError` (``model_grid_too_large``) before allocating when a model's grid would exceed
    the series voxel limit, and :class:`InferenceError` with reason ``inference_empty`` when nothing was found.
    """
    max_voxels = (limits or VolumeLimits()).max_voxels
    predictions = [predictor.predict(volume, progress, max_voxels=max_voxels) for predictor in predictors]
    prediction = predictions[0] if len(predictions) == 1 else merge_predictions(predictions)
    if prediction.is_empty:
        raise InferenceError("every label is empty", reason="inference_empty")
    return prediction


def merge_predictions(predictions: Sequence[Prediction]) -> Prediction:
    """One prediction with every label of *predictions*, renumbered 1..N in order (as :func:`combine_manifests`)."""
    bits = np.zeros(predictions[0].bits.shape, dtype=np.uint32)
    values: dict[str, int] = {}
    voxels: dict[str, int] = {}
    for prediction in predictions:
        for name in prediction.values:
            values[name] = len(values) + 1
            bits |= prediction.mask(name).astype(np.uint32) << (values[name] - 1)
            voxels[name] = prediction.voxels[name]
    return Prediction(bits, values, voxels, sum(p.seconds for p in predictions))


def encode_masks(prediction: Prediction) -> bytes:
    """The label bit-planes, compressed, with their names and values."""
    buffer = io.BytesIO()
    names = list(prediction.values)
    np.savez_compressed(buffer, bits=prediction.bits, names=np.array(names),
                        values=np.array([prediction.values[name] for name in names]))
    return buffer.getvalue()


def decode_masks(data: bytes) -> dict[str, np.ndarray]:
    """The masks of :func:`encode_masks`, by label name."""
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        bits = stored["bits"]
        return {str(name): (bits >> (int(value) - 1)) & 1 == 1
                for name, value in zip(stored["names"], stored["values"], strict=True)}
