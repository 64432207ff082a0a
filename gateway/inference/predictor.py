"""Inference: one onnxruntime session per model; ``predict(volume)`` -> label masks on the CT grid.

The predictor reorients the volume to the model's axis convention, resamples it to the
model's spacing (through a median filter on its own grid if the manifest asks), normalises it,
and runs the network tile by tile (:mod:`gateway.inference.tiling`). Logits are averaged over tiles and
then turned into probabilities, as nnU-Net does. Structures may overlap (an External encloses the
lungs), so the result holds any number of labels per voxel (:mod:`gateway.inference.labels`). Each label is
cleaned on the (small) model grid as the manifest says (left/right split, largest component, holes per
axial plane, minimum volume), then the masks are mapped to the original CT grid; with
``resampling = "nnunet"`` the logits go back to the CT grid first and everything after happens
there, as in nnU-Net; with ``resampling = "totalsegmentator"`` the CT is resampled as TotalSegmentator does
before nnU-Net sees it (in its canonical axes, to int32) and the masks go back by its nearest-neighbour zoom.
The pure geometry helpers are in :mod:`gateway.inference.orientation`,
:mod:`gateway.inference.resample` and :mod:`gateway.inference.tiling`.

Networks take ``float32 [batch, 1, *patch]`` and return ``[batch, channels, *output]``, or
the same with the channel axis last (``layout = "channels_last"``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import structlog

from gateway.errors import InferenceError, VolumeError
from gateway.inference import confidence as _confidence
from gateway.inference.confidence import Confidence
from gateway.inference.labels import LabelMasks, decide, decide_logits
from gateway.inference.manifest import ClipScale, InputSpec, ModelPackage
from gateway.inference.orientation import axis_transform, orientation_code, oriented, unoriented
from gateway.inference.postprocess import ModelGrid, model_affine, postprocess
from gateway.inference.resample import (
    CANONICAL,
    back_to_grid,
    linear_shape,
    nnunet_resize,
    nnunet_shape,
    resample_linear,
    resample_median_linear,
    zoom_factors,
    zoom_indices,
    zoom_shape,
    zoom_to_int32,
)
from gateway.inference.tiling import Tiler
from gateway.inference.volume import Volume, VolumeLimits

__all__ = ["Prediction", "Predictor"]

log = structlog.get_logger(__name__)

_MAX_VOXELS = VolumeLimits().max_voxels


@dataclass(frozen=True)
class Prediction:
    """Label masks on the CT grid (:class:`~gateway.inference.labels.LabelMasks`, by label value), and the model's
    confidence in each label found (:mod:`gateway.inference.confidence`, on the model grid)."""

    masks: LabelMasks
    values: dict[str, int]  # label name -> label value
    voxels: dict[str, int]  # label name -> voxel count
    seconds: float
    confidence: dict[str, Confidence] = field(default_factory=dict)
    #: Label name -> gap (mm) between the largest component kept and a discarded piece continuing it.
    split_mm: dict[str, float] = field(default_factory=dict)

    def mask(self, name: str) -> np.ndarray:
        """The boolean mask of label *name* on the CT grid."""
        return self.masks.mask(self.values[name])

    @property
    def empty(self) -> list[str]:
        """Names of labels that found nothing."""
        return [name for name, count in self.voxels.items() if count == 0]

    @property
    def is_empty(self) -> bool:
        """Whether no label found anything (the pipeline must not send such a result)."""
        return all(count == 0 for count in self.voxels.values())


@dataclass(frozen=True)
class _ModelInput:
    """The volume as the network sees it, and how its grid maps back to the CT's."""

    image: np.ndarray
    order: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    factors: list[float]  # model voxels per scan voxel along each model axis
    shape: tuple[int, ...]  # the reoriented CT's shape
    spacing: list[float]  # ... and its voxel size
    #: ``resampling = "totalsegmentator"``: the model voxel each CT voxel takes its label from, per model axis.
    picks: tuple[np.ndarray, ...] | None = None


class Predictor:
    """Runs one model package; build once, call :meth:`predict` per series."""

    def __init__(self, package: ModelPackage, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0, cuda_tf32: bool = False, device_id: int = 0) -> None:
        self.package = package
        self.manifest = package.manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        # TF32 convolutions differ from the CPU's float32 by up to 3e-3 in a probability (measured on the liver
        # network, H100); exact float32 costs some 20 % of the GPU time, so it is the default.
        settings = [{"use_tf32": "1" if cuda_tf32 else "0", "device_id": str(device_id)}
                    if p == "CUDAExecutionProvider" else {} for p in chosen]
        try:
            self._session = ort.InferenceSession(str(package.onnx_path), options, providers=chosen,
                                                 provider_options=settings)
        except Exception as exc:  # onnxruntime raises its own untyped errors; theirs name the model, not the patient
            detail = str(exc).strip().splitlines()[-1][-160:] if str(exc).strip() else type(exc).__name__
            raise InferenceError(f"model {self.manifest.model.name} cannot be loaded: {detail}") from exc
        self._input = self._session.get_inputs()[0].name
        self._channels = self.manifest.channels
        self._tiler = Tiler(self.manifest.input, self._channels, self._run)

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers the session runs on, preferred first."""
        providers: list[str] = self._session.get_providers()
        return providers

    def predict(self, volume: Volume, progress: Callable[[int, int], None] | None = None, *,
                max_voxels: int = _MAX_VOXELS) -> Prediction:
        """Segment *volume*; raise :class:`InferenceError` on any failure.

        *progress* is called after each batch of tiles with ``(tiles done, tiles in all)``.

        Raises
        ------
        VolumeError
            ``model_grid_too_large``, before anything is allocated, when *volume* resampled to the
            model's spacing would have more than *max_voxels* voxels (``VolumeLimits.max_voxels``).
        InferenceError
            When the model fails or its output is malformed.
        """
        started = time.monotonic()
        prepared = self._prepare(volume, max_voxels)
        output = self.manifest.output
        scores = self._scores(prepared.image, progress)
        order, flips, factors = prepared.order, prepared.flips, prepared.factors
        labels = self.manifest.labels
        if self.manifest.input.resampling == "nnunet":  # logits back to the CT grid, decided there (as nnU-Net)
            confidence = _confidence.from_logits(scores, labels, output.kind, output.threshold)  # raw decision
            decided = decide_logits(self._on_ct_grid(scores, prepared), len(scores), output.kind, output.threshold)
            factors, scores = [1.0, 1.0, 1.0], np.empty(0, dtype=np.float32)  # frees the logits
        else:  # decided and cleaned up on the (small) model grid, then the masks mapped to the CT grid
            scores = self._activate(scores)
            decided = decide(scores, output.kind, output.threshold)
        grid = ModelGrid(model_affine(volume.affine, order, flips, factors, prepared.shape), order.index(0))
        masks, split_mm = postprocess(decided, labels, grid, output.kind)
        del decided
        if self.manifest.input.resampling != "nnunet":
            confidence = _confidence.from_probabilities(scores, masks, labels, output.kind)
        masks = masks.map(lambda plane: unoriented(self._to_ct_grid(plane, prepared, factors), order, flips))
        values = {label.name: label.value for label in self.manifest.labels}
        counts = masks.counts()
        voxels = {name: counts[value] for name, value in values.items()}
        prediction = Prediction(masks, values, voxels, time.monotonic() - started, confidence, split_mm)
        log.info("inference_done", model=self.manifest.model.name, seconds=round(prediction.seconds, 2),
                 empty_labels=prediction.empty)
        return prediction

    def probabilities(self, volume: Volume, *, max_voxels: int = _MAX_VOXELS) -> np.ndarray:
        """Per-channel probabilities before any decision, ``[channels, *grid]`` in model axis order: on the model
        grid, or on the CT grid for ``resampling = "nnunet"`` (where nnU-Net computes them)."""
        prepared = self._prepare(volume, max_voxels)
        scores = self._scores(prepared.image)
        if self.manifest.input.resampling == "nnunet":
            scores = np.stack(list(self._on_ct_grid(scores, prepared)))
        return self._activate(scores)

    def grid_shapes(self, shape: Sequence[int], spacing: Sequence[float]) -> list[tuple[int, ...]]:
        """The grids preparing a CT of *shape* and *spacing* (model axis order) allocates: the model's grid,
        after the prefilter's grid if the manifest has one."""
        spec = self.manifest.input
        if spec.resampling == "nnunet":
            return [nnunet_shape(shape, spacing, spec.spacing_mm)]
        if spec.resampling == "totalsegmentator":
            return [zoom_shape(shape, zoom_factors(spacing, spec.spacing_mm))]
        if spec.prefilter is None:
            return [linear_shape(shape, [s / t for s, t in zip(spacing, spec.spacing_mm, strict=True)])]
        between = spec.prefilter.spacing_mm
        filtered = linear_shape(shape, [s / b for s, b in zip(spacing, between, strict=True)])
        return [filtered, linear_shape(filtered, [b / t for b, t in zip(between, spec.spacing_mm, strict=True)])]

    def _check_grids(self, shape: Sequence[int], spacing: Sequence[float], max_voxels: int) -> None:
        for grid in self.grid_shapes(shape, spacing):
            if math.prod(grid) > max_voxels:
                raise VolumeError("model_grid_too_large", f"{' x '.join(map(str, grid))} voxels on the grid of "
                                  f"model {self.manifest.model.name}, at most {max_voxels}")

    def _prepare(self, volume: Volume, max_voxels: int) -> _ModelInput:
        spec = self.manifest.input
        order, flips = axis_transform(orientation_code(volume.affine), spec.orientation)
        hu = oriented(volume.hu, order, flips)
        spacing = [volume.spacing[axis] for axis in order]
        self._check_grids(hu.shape, spacing, max_voxels)
        factors = [s / t for s, t in zip(spacing, spec.spacing_mm, strict=True)]
        if spec.resampling == "nnunet":  # normalised first, then a cubic resize (nnU-Net's preprocessing)
            shape = nnunet_shape(hu.shape, spacing, spec.spacing_mm)
            image = nnunet_resize(_normalise(hu, spec), shape, spacing, spec.spacing_mm, order=3)
            return _ModelInput(image, order, flips, factors, hu.shape, spacing)
        if spec.resampling == "totalsegmentator":
            return self._prepare_as_totalsegmentator(volume, order, flips, hu.shape, spacing)
        if spec.prefilter is None:
            resampled = resample_linear(hu, factors)
        else:  # resample, median-filter on the filter's grid, resample again (corner-aligned, so factors compose)
            between = spec.prefilter.spacing_mm
            resampled = resample_median_linear(resample_linear(hu, [s / b for s, b in zip(spacing, between,
                                                                                            strict=True)]),
                                               spec.prefilter.size,
                                               [b / t for b, t in zip(between, spec.spacing_mm, strict=True)])
        return _ModelInput(_normalise(resampled, spec), order, flips, factors, hu.shape, spacing)

    def _prepare_as_totalsegmentator(self, volume: Volume, order: tuple[int, int, int], flips: tuple[bool, bool, bool],
                                     shape: tuple[int, ...], spacing: list[float]) -> _ModelInput:
        """TotalSegmentator's ``change_spacing`` (order 1, int32) in its canonical axes, then the model's axes."""
        spec = self.manifest.input
        to_canonical = axis_transform(orientation_code(volume.affine), CANONICAL)
        to_model = axis_transform(CANONICAL, spec.orientation)
        target = [0.0, 0.0, 0.0]
        for model_axis, canonical_axis in enumerate(to_model[0]):
            target[canonical_axis] = spec.spacing_mm[model_axis]
        canonical = oriented(volume.hu, *to_canonical)
        factors = zoom_factors([volume.spacing[axis] for axis in to_canonical[0]], target)
        image = oriented(zoom_to_int32(canonical, factors), *to_model)
        del canonical
        picks = tuple(zoom_indices(m, n, reverse) for m, n, reverse in zip(image.shape, shape, to_model[1],
                                                                           strict=True))
        corners = [(m - 1) / (n - 1) if n > 1 else 1.0 for m, n in zip(image.shape, shape, strict=True)]
        return _ModelInput(_normalise(image, spec), order, flips, corners, shape, spacing, picks)

    def _to_ct_grid(self, plane: np.ndarray, prepared: _ModelInput, factors: Sequence[float]) -> np.ndarray:
        """A mask on the model grid mapped to the (oriented) CT grid."""
        if prepared.picks is not None:
            mapped: np.ndarray = plane[np.ix_(*prepared.picks)]
            return mapped
        return back_to_grid(plane, prepared.shape, factors)

    def _scores(self, image: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        spec = self.manifest.input
        padding = spec.padding_value
        if padding is None:
            padding = float(_normalise(np.float32(spec.padding_hu), spec))
        return self._tiler.scores(image, padding, progress)

    def _on_ct_grid(self, scores: np.ndarray, prepared: _ModelInput) -> Iterator[np.ndarray]:
        """Each channel's logits resampled to the (oriented) CT grid, linearly as nnU-Net does."""
        for channel in scores:  # float16 sums (manifest: accumulate) resampled in float32
            yield nnunet_resize(channel.astype(np.float32, copy=False), prepared.shape,
                                self.manifest.input.spacing_mm, prepared.spacing, order=1)

    def _activate(self, scores: np.ndarray) -> np.ndarray:
        output = self.manifest.output
        if not output.logits:
            return scores
        if output.kind == "sigmoid":
            return np.asarray(1 / (1 + np.exp(-scores)), dtype=np.float32)
        scores -= scores.max(axis=0, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=0, keepdims=True)
        return scores

    def _run(self, batch: np.ndarray) -> np.ndarray:
        channels_last = self.manifest.input.layout == "channels_last"
        feed = np.moveaxis(batch, 1, -1) if channels_last else batch
        try:
            (output,) = self._session.run(None, {self._input: np.ascontiguousarray(feed, dtype=np.float32)})[:1]
        except Exception as exc:
            raise InferenceError(f"model {self.manifest.model.name} failed on a tile ({type(exc).__name__})") from exc
        expected = (batch.shape[0], self._channels, *self.manifest.input.output_size)
        if channels_last:
            expected = (expected[0], *expected[2:], expected[1])
        if output.shape != expected:
            raise InferenceError(f"model output shape {output.shape}, expected {expected}")
        if not np.isfinite(output).all():
            raise InferenceError("model output contains NaN or infinite values")
        result: np.ndarray = output.astype(np.float32, copy=False)
        return np.moveaxis(result, -1, 1) if channels_last else result


def _normalise(hu: np.ndarray | np.float32, spec: InputSpec) -> np.ndarray:
    norm = spec.normalisation
    if isinstance(norm, ClipScale):
        clipped = np.clip(hu, norm.hu_min, norm.hu_max)
        scaled = (clipped - norm.hu_min) / (norm.hu_max - norm.hu_min) * (norm.out_max - norm.out_min) + norm.out_min
        return np.asarray(scaled, dtype=np.float32)
    low = -np.inf if norm.hu_min is None else norm.hu_min
    high = np.inf if norm.hu_max is None else norm.hu_max
    return np.asarray((np.clip(hu, low, high) - norm.mean) / norm.std, dtype=np.float32)
