"""What one series goes through after pseudonymisation: infer, structure, reidentify, send.

Each stage reads the previous stage's committed output and commits its own state before the
next starts (:class:`~gateway.store.tasks.TaskStore`). A failure that retrying cannot fix ends the
series as ``failed`` with a reason code and an ``alert`` event; nothing is sent for it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset

from gateway.config import GatewayConfig, Route
from gateway.errors import CryptoError, InferenceError, ReidentificationError, StructureSetError, VolumeError
from gateway.failpoints import failpoint
from gateway.identity.stages import reidentify_task
from gateway.inference.confidence import Confidence
from gateway.inference.ensemble import decode_confidence, decode_masks, decode_split, encode_masks, infer
from gateway.inference.farm import TritonFarm
from gateway.inference.model_cache import Predictors
from gateway.inference.predictor import Prediction
from gateway.inference.progress import InferenceProgress, SpeedMemory
from gateway.inference.volume import Volume, VolumeLimits, volume_from_datasets
from gateway.ops.audit import AuditLog
from gateway.ops.metrics import Metrics
from gateway.pipeline.qa import ContourQa
from gateway.rt.plausibility import Outcome
from gateway.rt.results import build_results, encode_results, structure_set_picture
from gateway.rt.templates import apply_template, load_route_templates, manifests_of
from gateway.sending.delivery import deliver_due, outcome
from gateway.sending.scu import Sender
from gateway.store.jobs import JobState
from gateway.store.outputs import StageContext, load_output, load_work, save_output, save_outputs
from gateway.store.tasks import DeliveryState, Task

__all__ = ["SeriesStages"]

log = structlog.get_logger(__name__)

_NEXT_STAGE = {JobState.PSEUDONYMISED: "infer", JobState.INFERRED: "structure", JobState.STRUCTURED: "reidentify",
               JobState.REIDENTIFIED: "send"}


@dataclass(frozen=True)
class Series:
    """The pseudonymised CT of one task, as datasets and as a volume."""

    datasets: Sequence[Dataset]
    volume: Volume


@dataclass(frozen=True)
class Inferred:
    """What the infer stage found: each label's mask on the CT grid, and the model's confidence in it."""

    masks: Mapping[str, np.ndarray]  # made one at a time when read (MaskView)
    confidence: dict[str, Confidence]
    split_mm: dict[str, float]  # gaps to pieces that keeping the largest component discarded

    def renamed(self, masks: Mapping[str, np.ndarray], sources: Mapping[str, str]) -> Inferred:
        """The same figures under a template's names (*sources*: new name -> label), with the template's *masks*."""
        return Inferred(masks, {new: self.confidence[old] for new, old in sources.items() if old in self.confidence},
                        {new: self.split_mm[old] for new, old in sources.items() if old in self.split_mm})


class _TaskGone(Exception):
    """The series' task no longer exists: a corrected re-send reopened its job, which starts over."""


class _TaskFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SeriesStages:
    """Runs the stages of one series at a time; shared by the runner's worker threads."""

    def __init__(self, config: GatewayConfig, ctx: StageContext, audit: AuditLog, metrics: Metrics | None,
                 clock: Callable[[], float], farm: TritonFarm | None = None) -> None:
        self._config = config
        self._ctx = ctx
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._sender = Sender(config)
        self._predictors = Predictors(config.inference, farm)
        self._speed = SpeedMemory()
        self._volume_limits = VolumeLimits.from_config(config.limits)
        self._qa = ContourQa(ctx.jobs, audit, metrics, clock)
        self._templates = load_route_templates(config.inference.templates_dir, config.routes,
                                               manifests_of(self._predictors.manifest))

    def holds(self, task: Task) -> bool:
        """Whether contour QA may hold *task*'s study (its route has ``qa = "hold"``)."""
        return any(r.name == task.route and r.qa == "hold" for r in self._config.routes)

    def hold_study(self, job_id: str) -> None:
        """A series of *job_id* held by contour QA holds the others too: the study is released as one."""
        held = self._ctx.tasks.hold_study(job_id, self._clock())
        if held:
            log.warning("study_held", series=held, reason="study_held")

    def run(self, task: Task, *, send: bool = True) -> None:
        """Take one series as far as it can go now (its deliveries may wait for a retry); with *send* false, no
        further than its structure set, so that contour QA has seen every series before any is sent."""
        route = next((r for r in self._config.routes if r.name == task.route), None)
        structlog.contextvars.bind_contextvars(task=task.task_no)
        state, series, inferred = task.state, None, None
        try:
            if route is None:
                raise _TaskFailed("route_not_configured")
            if state is JobState.PSEUDONYMISED:
                started = time.monotonic()
                self.begin("infer")
                series = self._load(task)
                prediction = self._infer(route, series)
                save_output(self._ctx, task.job_id, task.task_no, "masks", encode_masks(prediction))
                inferred = Inferred(prediction.masks.named(prediction.values), prediction.confidence,
                                    prediction.split_mm)
                state = self._commit(task, JobState.INFERRED, "infer", started, structures=len(prediction.values),
                                     empty=len(prediction.empty), slices=series.volume.shape[0])
            if state is JobState.INFERRED:
                state = self._structure(task, route, series, inferred)
            if state is JobState.STRUCTURED and send:
                started = time.monotonic()
                self.begin("reidentify")
                count = self._reidentify(task)
                deliveries = [(item, name) for item in range(count) for name in route.destinations]
                state = self._commit(task, JobState.REIDENTIFIED, "reidentify", started, deliveries=deliveries,
                                     results=count)
            if state is JobState.REIDENTIFIED and send:
                self._send(task)
        except _TaskGone:
            log.info("job_gone", reason="reopened")
        except _TaskFailed as failure:
            if self._ctx.tasks.advance(task.job_id, task.task_no, JobState.FAILED, stage=None, duration_ms=0,
                                       now=self._clock(), reason=failure.reason) is None:
                log.info("job_gone", reason="reopened")  # a corrected re-send reopened the job: this series is gone
                return
            stage = _NEXT_STAGE.get(state, state.value)
            log.error("alert", stage=stage, outcome="failed", reason=failure.reason)
            if self._metrics is not None:
                self._metrics.failure(stage, failure.reason)
        finally:
            structlog.contextvars.unbind_contextvars("task")

    def _structure(self, task: Task, route: Route, series: Series | None,
                   inferred: Inferred | None) -> JobState:
        started = time.monotonic()
        self.begin("structure")
        series = series or self._load(task)
        if inferred is None:
            stored = load_output(self._ctx, task.job_id, task.task_no, "masks")
            inferred = Inferred(decode_masks(stored), decode_confidence(stored), decode_split(stored))
        manifest = self._predictors.manifest(route.models)
        template = self._templates.get(route.name)
        if template is not None:  # the site's structures: renamed, ordered, derived (unions of labels)
            templated = apply_template(template, manifest, inferred.masks)
            manifest, inferred = templated.manifest, inferred.renamed(templated.masks, templated.sources)
            route = route.model_copy(update={"structures": templated.structures})
        verdict = self._qa.check(task.job_id, task.task_no, route, series.volume, inferred.masks, manifest,
                                 inferred.confidence, inferred.split_mm)
        if verdict.dropped and not {f.structure for f in verdict.findings} - set(verdict.dropped):
            raise _TaskFailed("qa_failed")  # ``drop`` left nothing to send
        try:
            results = build_results(series.volume, series.datasets, verdict.masks, manifest, route, verdict.findings)
        except StructureSetError as exc:
            raise _TaskFailed(exc.reason) from exc
        save_outputs(self._ctx, task.job_id, task.task_no, "pseudo", encode_results(results))
        if route.qa_picture:  # sealed like every output: shredded with the study
            save_output(self._ctx, task.job_id, task.task_no, "qa-png",
                        structure_set_picture(series.volume, verdict.masks, results[0], route,
                                              verdict.findings))
        contours = sum(len(getattr(item, "ContourSequence", [])) for item in results[0].ROIContourSequence)
        state = JobState.HELD if verdict.held else JobState.STRUCTURED
        state = self._commit(task, state, "structure", started, reason="qa_failed" if verdict.held else None,
                             results=len(results), structures=len(results[0].StructureSetROISequence),
                             contours=contours, qa_warnings=verdict.count(Outcome.WARN),
                             qa_failures=verdict.count(Outcome.FAIL), qa_dropped=len(verdict.dropped))
        if verdict.held:  # fail closed: a human looks before anything is sent
            log.error("alert", stage="structure", outcome=state.value, reason="qa_failed", structures=verdict.failed)
            if self._metrics is not None:
                self._metrics.failure("structure", "qa_failed")
        return state

    def _commit(self, task: Task, state: JobState, stage: str, started: float, *, reason: str | None = None,
                deliveries: list[tuple[int, str]] | None = None, **counts: int) -> JobState:
        failpoint(f"after:{stage}")
        duration_ms = int((time.monotonic() - started) * 1000)
        if self._ctx.tasks.advance(task.job_id, task.task_no, state, stage=stage, duration_ms=duration_ms,
                                   now=self._clock(), reason=reason, deliveries=deliveries or ()) is None:
            raise _TaskGone(task.task_no)
        log.info("stage_done", stage=stage, duration_ms=duration_ms, outcome=state.value, **counts)
        self.observe(stage, duration_ms)
        return state

    def observe(self, stage: str, duration_ms: int) -> None:
        """A stage's duration, for the metrics."""
        if self._metrics is not None:
            self._metrics.stage(stage, duration_ms / 1000)

    def _load(self, task: Task) -> Series:
        datasets = [pydicom.dcmread(io.BytesIO(load_work(self._ctx, task.job_id, file_id)))
                    for file_id in self._ctx.tasks.files(task.job_id, task.task_no)]
        try:
            return Series(datasets, volume_from_datasets(datasets, self._volume_limits))
        except VolumeError as exc:
            raise _TaskFailed(exc.reason) from exc

    def begin(self, stage: str, **expected: float | None) -> None:
        """A stage starts: the crash point before it, and the log event."""
        failpoint(f"before:{stage}")
        log.info("stage_started", stage=stage, **expected)

    def _infer(self, route: Route, series: Series) -> Prediction:
        try:
            slices = series.volume.shape[0]
            log.info("inference_expected", model=route.model_key, slices=slices,
                     expected_seconds=self._speed.expect(route.model_key, slices))
            prediction = infer([self._predictors.get(model) for model in route.models], series.volume,
                               InferenceProgress(), self._volume_limits)
            self._speed.remember(route.model_key, slices, prediction.seconds)
            return prediction
        except VolumeError as exc:
            raise _TaskFailed(exc.reason) from exc
        except InferenceError as exc:
            raise _TaskFailed(exc.reason) from exc

    def _reidentify(self, task: Task) -> int:
        try:
            return reidentify_task(self._ctx, task.job_id, task.task_no)
        except (ReidentificationError, CryptoError) as exc:
            raise _TaskFailed("reidentification_failed") from exc

    def _send(self, task: Task) -> None:
        started = time.monotonic()
        self.begin("send")
        deliveries = deliver_due(self._ctx, self._config, self._sender, task.job_id, task.task_no, self._clock(),
                                 audit=self._audit,
                                 on_ended=self._metrics.delivery if self._metrics is not None else None)
        final = outcome(deliveries)
        if final is None:
            return
        state, reason = final
        failpoint("after:send")
        duration_ms = int((time.monotonic() - started) * 1000)
        self._ctx.tasks.advance(task.job_id, task.task_no, state, stage="send", duration_ms=duration_ms,
                                now=self._clock(), reason=reason)
        self.observe("send", duration_ms)
        log.info("stage_done", stage="send", duration_ms=duration_ms, outcome=state.value,
                 destinations=len({d.destination for d in deliveries}),
                 delivered=sum(d.state is DeliveryState.SENT for d in deliveries))
        if state is JobState.DEAD_LETTER:
            log.error("alert", stage="send", outcome=state.value, reason=reason)

