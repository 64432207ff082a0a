"""The job runner: a worker pool that moves every completed study through the stages, driven by the job table.

A dispatcher thread asks the job table what can run now (completed studies, tasks between
stages, deliveries that are due) and hands each job to one pool worker at a time. A worker
runs one stage after the other; each stage reads the previous stage's committed output and
commits its own before the next starts, so after a crash (``kill -9`` included) the
dispatcher finds every unfinished job where it stopped. Receiving runs in other processes:
inference never delays an association.

Stages: ``pseudonymise`` (job) -> per task ``infer`` -> ``structure`` -> ``reidentify`` ->
``send``. A failure that retrying cannot fix ends the task as ``failed`` with a reason code
and an ``alert`` event; nothing is sent for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import structlog

from gateway.audit import AuditLog
from gateway.config import GatewayConfig, Route
from gateway.delivery import deliver_due, outcome
from gateway.errors import (
    CryptoError,
    InferenceError,
    ReidentificationError,
    SpoolError,
    StructureSetError,
    VolumeError,
)
from gateway.failpoints import failpoint
from gateway.infer import Prediction
from gateway.jobs import Job, JobState
from gateway.logs import bind_job
from gateway.metrics import Metrics
from gateway.models import Predictors
from gateway.pipeline import pseudonymise_job, reidentify_task
from gateway.processing import (
    Series,
    StageContext,
    build_results,
    infer,
    load_masks,
    load_series,
    save_masks,
    save_results,
)
from gateway.send import Sender
from gateway.tasks import Task

__all__ = ["Runner"]

log = structlog.get_logger(__name__)

#: How long a job waits after a stage could not write (disk full, I/O error) before it is tried again.
_DEFER_SECONDS = 30.0
#: Unexpected errors (a bug, a damaged file) after which a job is failed instead of tried again.
_MAX_ERRORS = 3


_NEXT_STAGE = {JobState.PSEUDONYMISED: "infer", JobState.INFERRED: "structure", JobState.STRUCTURED: "reidentify",
               JobState.REIDENTIFIED: "send"}


class _TaskFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Runner:
    """Runs jobs on ``pipeline.workers`` threads; :meth:`wake` when a job may have become runnable."""

    def __init__(self, config: GatewayConfig, ctx: StageContext, audit: AuditLog, *,
                 on_done: Callable[[Job], None] | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._metrics = metrics
        self._ctx = ctx
        self._audit = audit
        self._on_done = on_done
        self._clock = clock
        self._sender = Sender(config)
        self._pool = ThreadPoolExecutor(config.pipeline.workers, thread_name_prefix="pipeline")
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._deferred: dict[str, float] = {}
        self._errors: dict[str, int] = {}
        self._predictors = Predictors(config.inference)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True)

    def start(self) -> None:
        """Start dispatching (unfinished jobs from before a restart are picked up at once)."""
        self._thread.start()

    def wake(self) -> None:
        """Look for runnable jobs now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Stop dispatching and wait for the stages in progress to commit."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a wake-up during the look is not lost
            try:
                self._dispatch()
            except Exception as exc:  # keep dispatching; the next poll retries
                log.error("dispatch_failed", exc_info=exc)
            self._wake.wait(self._config.pipeline.poll_seconds)

    def _dispatch(self) -> None:
        now = self._clock()
        for job_id in self._ctx.tasks.runnable(now):
            with self._lock:
                if job_id in self._busy or self._deferred.get(job_id, 0.0) > now or self._stop.is_set():
                    continue
                self._busy.add(job_id)
            self._pool.submit(self._run, job_id)

    def is_busy(self, job_id: str) -> bool:
        """Whether a worker is on *job_id* right now."""
        with self._lock:
            return job_id in self._busy

    def _run(self, job_id: str) -> None:
        try:
            job = self._ctx.jobs.get(job_id)
            bind_job(job_id, job.study)
            if job.state is JobState.COMPLETE:
                self._pseudonymise(job)
            for task in self._ctx.tasks.tasks(job_id):
                if not task.state.terminal and not self._stop.is_set():
                    self._run_task(task)
            self._finish(job_id)
        except SpoolError as exc:  # disk full or I/O error: nothing was committed, try again later
            log.warning("stage_deferred", reason=str(exc), retry_in_seconds=_DEFER_SECONDS)
            with self._lock:
                self._deferred[job_id] = self._clock() + _DEFER_SECONDS
        except Exception as exc:
            if not self._ctx.jobs.exists(job_id):  # shredded at its deadline while a stage ran
                log.info("job_gone", reason="shredded")
                return
            log.error("job_error", exc_info=exc)
            self._on_error(job_id)
        finally:
            with self._lock:
                self._busy.discard(job_id)
            self._wake.set()

    def _on_error(self, job_id: str) -> None:
        """An unexpected error: try again later, and after a few tries fail the job rather than loop."""
        with self._lock:
            errors = self._errors[job_id] = self._errors.get(job_id, 0) + 1
            self._deferred[job_id] = self._clock() + _DEFER_SECONDS
        if errors < _MAX_ERRORS:
            return
        if self._ctx.jobs.get(job_id).state is JobState.COMPLETE:
            self._ctx.jobs.set_state(job_id, JobState.FAILED, reason="internal_error")
        for task in self._ctx.tasks.tasks(job_id):
            if not task.state.terminal:
                self._ctx.tasks.advance(job_id, task.task_no, JobState.FAILED, stage=None, duration_ms=0,
                                        now=self._clock(), reason="internal_error")
        log.error("alert", outcome="failed", reason="internal_error", errors=errors)
        self._finish(job_id)

    def _pseudonymise(self, job: Job) -> None:
        self._audit.append("received", self._clock(), job_id=job.job_id, study=job.study,
                           first_instance_at=job.created_at, last_instance_at=job.last_received_at,
                           instances=job.instance_count, peer=job.peer)
        failpoint("before:pseudonymise")
        result = pseudonymise_job(self._ctx, job.job_id, self._config.routes)
        log.info("stage_done", stage="pseudonymise", duration_ms=result.duration_ms, instances=result.instances,
                 quarantined=result.quarantined, series=result.series, outcome=result.state.value)
        self._observe("pseudonymise", result.duration_ms)
        self._audit.append("pseudonymised", self._clock(), job_id=job.job_id, study=job.study,
                           instances=result.instances, quarantined=result.quarantined, series=result.series,
                           outcome=result.state.value)
        if result.state is JobState.FAILED:
            log.error("alert", stage="pseudonymise", reason="all_instances_quarantined")

    def _run_task(self, task: Task) -> None:
        route = next((r for r in self._config.routes if r.name == task.route), None)
        structlog.contextvars.bind_contextvars(task=task.task_no)
        state, series, masks = task.state, None, None
        try:
            if route is None:
                raise _TaskFailed("route_not_configured")
            if state is JobState.PSEUDONYMISED:
                started = time.monotonic()
                failpoint("before:infer")
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
                failpoint("before:reidentify")
                count = self._reidentify(task)
                deliveries = [(item, name) for item in range(count) for name in route.destinations]
                state = self._commit(task, JobState.REIDENTIFIED, "reidentify", started, deliveries=deliveries,
                                     results=count)
            if state is JobState.REIDENTIFIED:
                self._send(task)
        except _TaskFailed as failure:
            self._ctx.tasks.advance(task.job_id, task.task_no, JobState.FAILED, stage=None, duration_ms=0,
                                    now=self._clock(), reason=failure.reason)
            log.error("alert", stage=_NEXT_STAGE.get(state, state.value), outcome="failed", reason=failure.reason)
        finally:
            structlog.contextvars.unbind_contextvars("task")

    def _structure(self, task: Task, route: Route, series: Series | None,
                   masks: dict[str, np.ndarray] | None) -> JobState:
        started = time.monotonic()
        failpoint("before:structure")
        series = series or self._load(task)
        loaded = masks if masks is not None else load_masks(self._ctx, task.job_id, task.task_no)
        try:
            results = build_results(series, loaded, self._predictors.get(route.model).manifest, route)
        except StructureSetError as exc:
            raise _TaskFailed("structure_set_empty" if "empty" in str(exc) else "structure_set_failed") from exc
        save_results(self._ctx, task.job_id, task.task_no, results, "pseudo")
        contours = sum(len(getattr(item, "ContourSequence", [])) for item in results[0].ROIContourSequence)
        return self._commit(task, JobState.STRUCTURED, "structure", started, results=len(results),
                            structures=len(results[0].StructureSetROISequence), contours=contours)

    def _commit(self, task: Task, state: JobState, stage: str, started: float, *,
                deliveries: list[tuple[int, str]] | None = None, **counts: int) -> JobState:
        failpoint(f"after:{stage}")
        duration_ms = int((time.monotonic() - started) * 1000)
        self._ctx.tasks.advance(task.job_id, task.task_no, state, stage=stage, duration_ms=duration_ms,
                                now=self._clock(), deliveries=deliveries or ())
        log.info("stage_done", stage=stage, duration_ms=duration_ms, outcome=state.value, **counts)
        self._observe(stage, duration_ms)
        return state

    def _observe(self, stage: str, duration_ms: int) -> None:
        if self._metrics is not None:
            self._metrics.stage(stage, duration_ms / 1000)

    def _load(self, task: Task) -> Series:
        try:
            return load_series(self._ctx, task.job_id, task.task_no)
        except VolumeError as exc:
            raise _TaskFailed(exc.reason) from exc

    def _infer(self, route: Route, series: Series) -> Prediction:
        try:
            return infer(self._predictors.get(route.model), series)
        except InferenceError as exc:
            raise _TaskFailed("inference_empty" if str(exc) == "inference_empty" else "inference_failed") from exc

    def _reidentify(self, task: Task) -> int:
        try:
            return reidentify_task(self._ctx, task.job_id, task.task_no)
        except (ReidentificationError, CryptoError) as exc:
            raise _TaskFailed("reidentification_failed") from exc

    def _send(self, task: Task) -> None:
        started = time.monotonic()
        failpoint("before:send")
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
        self._observe("send", duration_ms)
        log.info("stage_done", stage="send", duration_ms=duration_ms, outcome=state.value,
                 destinations=len({d.destination for d in deliveries}),
                 delivered=sum(d.state is JobState.SENT for d in deliveries))
        if state is JobState.DEAD_LETTER:
            log.error("alert", stage="send", outcome=state.value, reason=reason)

    def _finish(self, job_id: str) -> None:
        job = self._ctx.jobs.get(job_id)
        if not job.state.terminal:
            return
        now = self._clock()
        tasks = self._ctx.tasks.tasks(job_id)
        log.info("job_done", state=job.state.value, reason=job.reason, series=len(tasks),
                 sent=sum(t.state is JobState.SENT for t in tasks),
                 latency_ms=int((now - job.last_received_at) * 1000),
                 processing_ms=int((now - (job.completed_at or now)) * 1000))
        if self._on_done is not None:
            self._on_done(job)
