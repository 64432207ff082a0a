"""What one series goes through after pseudonymisation: infer, structure, reidentify, send.

Each stage reads the previous stage's committed output and commits its own state before the
next starts (:class:`~gateway.tasks.TaskStore`). A failure that retrying cannot fix ends the
series as ``failed`` with a reason code and an ``alert`` event; nothing is sent for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import structlog

from gateway.audit import AuditLog
from gateway.config import GatewayConfig, Route
from gateway.delivery import deliver_due, outcome
from gateway.errors import CryptoError, InferenceError, ReidentificationError, StructureSetError, VolumeError
from gateway.failpoints import failpoint
from gateway.infer import Prediction
from gateway.jobs import JobState
from gateway.metrics import Metrics
from gateway.models import Predictors
from gateway.pipeline import reidentify_task
from gateway.processing import (
    Series,
    StageContext,
    build_results,
    infer,
    load_masks,
    load_series,
    save_masks,
    save_qa_picture,
    save_results,
)
from gateway.progress import InferenceProgress, SpeedMemory
from gateway.send import Sender
from gateway.tasks import Task
from gateway.volume import VolumeLimits

__all__ = ["SeriesStages"]

log = structlog.get_logger(__name__)

_NEXT_STAGE = {JobState.PSEUDONYMISED: "infer", JobState.INFERRED: "structure", JobState.STRUCTURED: "reidentify",
               JobState.REIDENTIFIED: "send"}


class _TaskGone(Exception):
    """The series' task no longer exists: a corrected re-send reopened its job, which starts over."""


class _TaskFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SeriesStages:
    """Runs the stages of one series at a time; shared by the runner's worker threads."""

    def __init__(self, config: GatewayConfig, ctx: StageContext, audit: AuditLog, metrics: Metrics | None,
                 clock: Callable[[], float]) -> None:
        self._config = config
        self._ctx = ctx
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._sender = Sender(config)
        self._predictors = Predictors(config.inference)
        self._speed = SpeedMemory()
        self._volume_limits = VolumeLimits.from_config(config.limits)

    def run(self, task: Task) -> None:
        """Take one series as far as it can go now (its deliveries may wait for a retry)."""
        route = next((r for r in self._config.routes if r.name == task.route), None)
        structlog.contextvars.bind_contextvars(task=task.task_no)
        state, series, masks = task.state, None, None
        try:
            if route is None:
                raise _TaskFailed("route_not_configured")
            if state is JobState.PSEUDONYMISED:
                started = time.monotonic()
                self.begin("infer")
                series = self._load(task)
                prediction = self._infer(route, series)
                save_masks(self._ctx, task.job_id, task.task_no, prediction)
                masks = {name: prediction.mask(name) for name in prediction.values}
                state = self._commit(task, JobState.INFERRED, "infer", started, structures=len(prediction.values),
                                     empty=len(prediction.empty), slices=series.volume.shape[0])
            if state is JobState.INFERRED:
                state = self._structure(task, route, series, masks)
            if state is JobState.STRUCTURED:
                started = time.monotonic()
                self.begin("reidentify")
                count = self._reidentify(task)
                deliveries = [(item, name) for item in range(count) for name in route.destinations]
                state = self._commit(task, JobState.REIDENTIFIED, "reidentify", started, deliveries=deliveries,
                                     results=count)
            if state is JobState.REIDENTIFIED:
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
                   masks: dict[str, np.ndarray] | None) -> JobState:
        started = time.monotonic()
        self.begin("structure")
        series = series or self._load(task)
        loaded = masks if masks is not None else load_masks(self._ctx, task.job_id, task.task_no)
        try:
            results = build_results(series, loaded, self._predictors.manifest(route.models), route)
        except StructureSetError as exc:
            raise _TaskFailed("structure_set_empty" if "empty" in str(exc) else "structure_set_failed") from exc
        save_results(self._ctx, task.job_id, task.task_no, results, "pseudo")
        if route.qa_picture:
            save_qa_picture(self._ctx, task.job_id, task.task_no, series, loaded, results[0], route)
        contours = sum(len(getattr(item, "ContourSequence", [])) for item in results[0].ROIContourSequence)
        return self._commit(task, JobState.STRUCTURED, "structure", started, results=len(results),
                            structures=len(results[0].StructureSetROISequence), contours=contours)

    def _commit(self, task: Task, state: JobState, stage: str, started: float, *,
                deliveries: list[tuple[int, str]] | None = None, **counts: int) -> JobState:
        failpoint(f"after:{stage}")
        duration_ms = int((time.monotonic() - started) * 1000)
        if self._ctx.tasks.advance(task.job_id, task.task_no, state, stage=stage, duration_ms=duration_ms,
                                   now=self._clock(), deliveries=deliveries or ()) is None:
            raise _TaskGone(task.task_no)
        log.info("stage_done", stage=stage, duration_ms=duration_ms, outcome=state.value, **counts)
        self.observe(stage, duration_ms)
        return state

    def observe(self, stage: str, duration_ms: int) -> None:
        """A stage's duration, for the metrics."""
        if self._metrics is not None:
            self._metrics.stage(stage, duration_ms / 1000)

    def _load(self, task: Task) -> Series:
        try:
            return load_series(self._ctx, task.job_id, task.task_no, self._volume_limits)
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
            prediction = infer([self._predictors.get(model) for model in route.models], series, InferenceProgress(),
                               self._volume_limits)
            self._speed.remember(route.model_key, slices, prediction.seconds)
            return prediction
        except VolumeError as exc:
            raise _TaskFailed(exc.reason) from exc
        except InferenceError as exc:
            raise _TaskFailed("inference_empty" if str(exc) == "inference_empty" else "inference_failed") from exc

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
                 delivered=sum(d.state is JobState.SENT for d in deliveries))
        if state is JobState.DEAD_LETTER:
            log.error("alert", stage="send", outcome=state.value, reason=reason)

