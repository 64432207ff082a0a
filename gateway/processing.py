"""The stages that work on pseudonymised data only: volume, inference, structure set.

Each reads its input from the previous stage's sealed output and writes its own, so a stage
interrupted by a crash is redone from its input. Nothing here can reach the vault.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from gateway.crypt import Purpose, Sealer
from gateway.errors import InferenceError
from gateway.infer import Prediction, Predictor
from gateway.jobs import JobStore
from gateway.manifest import ModelManifest
from gateway.qa import qa_picture
from gateway.routes import Route
from gateway.rtstruct import StructureSetInput, build_structure_set
from gateway.seg import build_segmentation
from gateway.spool import Spool
from gateway.tasks import TaskStore
from gateway.volume import Volume, VolumeLimits, volume_from_datasets

__all__ = ["Series", "StageContext", "build_results", "infer", "load_masks", "load_qa_picture", "load_results",
           "load_series", "merge_predictions", "result_name", "save_masks", "save_qa_picture", "save_results"]


@dataclass(frozen=True)
class StageContext:
    """What every stage works with."""

    spool: Spool
    jobs: JobStore
    sealer: Sealer

    @property
    def tasks(self) -> TaskStore:
        """The task rows of the same database."""
        return TaskStore(self.jobs)


@dataclass(frozen=True)
class Series:
    """The pseudonymised CT of one task, as datasets and as a volume."""

    datasets: Sequence[Dataset]
    volume: Volume


def result_name(task_no: int, kind: str) -> str:
    """The spool name of a task's stage output (``masks``, ``pseudo0``, ``out0`` ...)."""
    return f"t{task_no}.{kind}"


def load_series(ctx: StageContext, job_id: str, task_no: int, limits: VolumeLimits | None = None) -> Series:
    """Decrypt and read the task's pseudonymised instances; raise :class:`VolumeError` if unfit."""
    datasets = [pydicom.dcmread(io.BytesIO(ctx.sealer.open(job_id, Purpose.PSEUDONYMISED,
                                                           ctx.spool.read_work(job_id, file_id))))
                for file_id in ctx.tasks.files(job_id, task_no)]
    return Series(datasets, volume_from_datasets(datasets, limits or VolumeLimits()))


def infer(predictors: Sequence[Predictor], series: Series, progress: Callable[[int, int], None] | None = None,
          limits: VolumeLimits | None = None) -> Prediction:
    """Run the route's models, their labels merged in order; an all-empty result is an error (nothing is sent).

    Raises :class:`VolumeError` (``model_grid_too_large``) before allocating when a model's grid would exceed
    the series voxel limit.
    """
    max_voxels = (limits or VolumeLimits()).max_voxels
    predictions = [predictor.predict(series.volume, progress, max_voxels=max_voxels) for predictor in predictors]
    prediction = predictions[0] if len(predictions) == 1 else merge_predictions(predictions)
    if prediction.is_empty:
        raise InferenceError("inference_empty")
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


def save_masks(ctx: StageContext, job_id: str, task_no: int, prediction: Prediction) -> None:
    """Store the label bit-planes (sealed, compressed) as the inference stage's output."""
    buffer = io.BytesIO()
    names = list(prediction.values)
    np.savez_compressed(buffer, bits=prediction.bits, names=np.array(names),
                        values=np.array([prediction.values[name] for name in names]))
    ctx.spool.write_result(job_id, result_name(task_no, "masks"),
                           ctx.sealer.seal(job_id, Purpose.RESULT, [buffer.getvalue()]))


def load_masks(ctx: StageContext, job_id: str, task_no: int) -> dict[str, np.ndarray]:
    """The masks saved by :func:`save_masks`, by label name."""
    sealed = ctx.spool.read_result(job_id, result_name(task_no, "masks"))
    with np.load(io.BytesIO(ctx.sealer.open(job_id, Purpose.RESULT, sealed)), allow_pickle=False) as data:
        bits = data["bits"]
        return {str(name): (bits >> (int(value) - 1)) & 1 == 1
                for name, value in zip(data["names"], data["values"], strict=True)}


def build_results(series: Series, masks: dict[str, np.ndarray], manifest: ModelManifest,
                  route: Route) -> list[Dataset]:
    """The RT Structure Set (and, if the route asks, its Segmentation twin) on the pseudonymised CT."""
    source = StructureSetInput(series.volume, series.datasets, masks, manifest, holes=route.holes,
                               template=route.structures)
    results = [build_structure_set(source)]
    if route.segmentation:
        results.append(build_segmentation(source))
    return results


def save_qa_picture(ctx: StageContext, job_id: str, task_no: int, series: Series, masks: dict[str, np.ndarray],
                    structure_set: Dataset, route: Route) -> None:
    """Store the QA picture of the structure set (sealed; shredded with the study) as ``t<task>.qa-png``."""
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in structure_set.StructureSetROISequence}
    colours = {names[int(item.ReferencedROINumber)]: [int(c) for c in item.ROIDisplayColor]
               for item in structure_set.ROIContourSequence}
    by_roi = {}
    for label, mask in masks.items():
        template = route.structures.get(label)
        name = (template.name if template is not None else None) or label
        if name in colours:  # written (empty structures are left out)
            by_roi[name] = mask
    picture = qa_picture(series.volume, by_roi, colours)
    ctx.spool.write_result(job_id, result_name(task_no, "qa-png"), ctx.sealer.seal(job_id, Purpose.RESULT, [picture]))


def load_qa_picture(ctx: StageContext, job_id: str, task_no: int) -> bytes:
    """The PNG stored by :func:`save_qa_picture`; ``FileNotFoundError`` if the route did not ask for one."""
    return ctx.sealer.open(job_id, Purpose.RESULT, ctx.spool.read_result(job_id, result_name(task_no, "qa-png")))


def save_results(ctx: StageContext, job_id: str, task_no: int, results: Sequence[Dataset], prefix: str) -> None:
    """Store each result as sealed Part 10 bytes under ``t<task>.<prefix><index>``."""
    for index, ds in enumerate(results):
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        ctx.spool.write_result(job_id, result_name(task_no, f"{prefix}{index}"),
                               ctx.sealer.seal(job_id, Purpose.RESULT, [buffer.getvalue()]))


def load_results(ctx: StageContext, job_id: str, task_no: int, prefix: str) -> list[bytes]:
    """The Part 10 bytes stored by :func:`save_results`, in order."""
    results: list[bytes] = []
    while True:
        try:
            sealed = ctx.spool.read_result(job_id, result_name(task_no, f"{prefix}{len(results)}"))
        except FileNotFoundError:
            return results
        results.append(ctx.sealer.open(job_id, Purpose.RESULT, sealed))
