"""A route's models run as one: their labels merged in order, and the result as bytes a stage can store."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from gateway.errors import InferenceError
from gateway.inference.confidence import Confidence
from gateway.inference.labels import MAX_LABELS, LabelMasks, MaskView
from gateway.inference.predictor import Prediction
from gateway.inference.volume import Volume, VolumeLimits

__all__ = ["SegmentsVolumes", "decode_confidence", "decode_masks", "decode_split",
           "encode_masks", "infer", "merge_predictions"]


class SegmentsVolumes(Protocol):
    """A predictor: local (:class:`Predictor`, :class:`BundlePredictor`) or remote (the inference farm's)."""

    def predict(self, volume: Volume, progress: Callable[[int, int], None] | None = None, *,
                max_voxels: int = ...) -> Prediction: ...


def infer(predictors: Sequence[SegmentsVolumes], volume: Volume,
          progress: Callable[[int, int], None] | None = None, limits: VolumeLimits | None = None) -> Prediction:
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
    """One prediction with every label of *predictions*, renumbered 1..N in order (as :func:`combine_manifests`).

    Raises :class:`InferenceError` when there are more than :data:`MAX_LABELS` labels in all.
    """
    total = sum(len(prediction.values) for prediction in predictions)
    if total > MAX_LABELS:
        raise InferenceError(f"{total} labels in the route's models, at most {MAX_LABELS}")
    masks = LabelMasks.empty(predictions[0].masks.shape, total)
    values: dict[str, int] = {}
    voxels: dict[str, int] = {}
    confidence: dict[str, Confidence] = {}
    split_mm: dict[str, float] = {}
    for prediction in predictions:
        confidence.update(prediction.confidence)
        split_mm.update(prediction.split_mm)
        boxes = prediction.masks.boxes(prediction.values.values())
        for name, value in prediction.values.items():
            values[name] = len(values) + 1
            voxels[name] = prediction.voxels[name]
            if value in boxes:
                masks.add(values[name], prediction.masks.region(value, boxes[value]), boxes[value])
    return Prediction(masks, values, voxels, sum(p.seconds for p in predictions), confidence, split_mm)


def encode_masks(prediction: Prediction) -> bytes:
    """The label masks in their compact form (:class:`LabelMasks`: class layers or bit words), compressed, with
    their names and values, and the model's confidence in each label."""
    buffer = io.BytesIO()
    names = list(prediction.values)
    sure = list(prediction.confidence)
    figures = [(prediction.confidence[name].mean_probability, prediction.confidence[name].uncertain_share)
               for name in sure]
    arrays = {"planes": np.asarray(prediction.masks.planes), "form": np.array(prediction.masks.form),
              "top": np.array(prediction.masks.top), "names": np.array(names),
              "values": np.array([prediction.values[name] for name in names]),
              "confidence_names": np.array(sure, dtype=str),
              "confidence": np.array(figures, dtype=np.float64).reshape(len(sure), 2),
              "split_names": np.array(list(prediction.split_mm), dtype=str),
              "split_mm": np.array(list(prediction.split_mm.values()), dtype=np.float64)}
    # an .npz as np.savez_compressed writes it, but at deflate level 3 instead of 6: on the label layers of a
    # 512 x 512 x 100 CT 0.10 s instead of 0.27, at 350 KB instead of 190
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=3) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, array, allow_pickle=False)
    return buffer.getvalue()


def decode_masks(data: bytes) -> MaskView:
    """The masks of :func:`encode_masks`, by label name, each made when read; also from releases that stored one
    integer bit-field (``bits``: bit ``value - 1`` set where the label is)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        if "bits" in stored.files:
            masks = LabelMasks.from_bits(stored["bits"])
        else:
            form = str(stored["form"])
            if form not in ("classes", "bits"):
                raise InferenceError(f"stored masks of an unknown form {form!r}")
            masks = LabelMasks(list(stored["planes"]), "classes" if form == "classes" else "bits", int(stored["top"]))
        pairs = zip(stored["names"], stored["values"], strict=True)
        return masks.named({str(name): int(value) for name, value in pairs})


def decode_confidence(data: bytes) -> dict[str, Confidence]:
    """The confidence figures of :func:`encode_masks`, by label name; none from an encoding older than them."""
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        if "confidence" not in stored.files:
            return {}
        return {str(name): Confidence(float(mean), float(uncertain))
                for name, (mean, uncertain) in zip(stored["confidence_names"], stored["confidence"], strict=True)}


def decode_split(data: bytes) -> dict[str, float]:
    """The gaps to discarded pieces of :func:`encode_masks` (``Prediction.split_mm``); none from older encodings."""
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        if "split_mm" not in stored.files:
            return {}
        return {str(name): float(gap) for name, gap in zip(stored["split_names"], stored["split_mm"], strict=True)}
