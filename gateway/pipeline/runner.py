"""The job runner: a worker pool that moves every completed study through the stages, driven by the job table.

A dispatcher thread asks the job table what can run now (completed studies, tasks between
stages, deliveries that are due) and hands each job to one pool worker at a time. A worker
runs one stage after the other; each stage reads the previous stage's committed output and
commits its own before the next starts, so after a crash (``kill -9`` included) the
dispatcher finds every unfinished job where it stopped. Receiving runs in other processes:
inference never delays an association.

Stages: ``pseudonymise`` (job, here) -> per series ``infer`` -> ``structure`` -> ``reidentify``
-> ``send`` (:mod:`gateway.pipeline.series`).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from gateway.config import GatewayConfig
from gateway.errors import InferenceUnavailable, SpoolError
from gateway.identity.prepare import Preparer
from gateway.identity.stages import pseudonymise_job
from gateway.inference.farm import TritonFarm
from gateway.ops.audit import AuditLog
from gateway.ops.logs import bind_job
from gateway.ops.metrics import Metrics
from gateway.pipeline.series import SeriesStages
from gateway.store.jobs import Job, JobState
from gateway.store.outputs import StageContext

__all__ = ["Runner"]

log = structlog.get_logger(__name__)

#: How long a job waits after a stage could not write (disk full, I/O error) before it is tried again.
_DEFER_SECONDS = 30.0
#: Attempts that raised (a bug, a damaged file) or never ended (the process was killed: out of memory) after
#: which a job is failed instead of tried again; counted in the job table, so restarts do not reset it.
_MAX_ATTEMPTS = 3
#: How often the preparer looks for instances that arrived (one query while nothing is being received).
_PREPARE_SECONDS = 0.25
#: The preparer waits while instances arrive closer together than this (a burst: the receivers need the
#: processors); a scanner sending as it reconstructs leaves gaps, and every study leaves its quiet period.
_BURST_GAP_SECONDS = 0.3


class Runner:
    """Runs jobs on ``pipeline.workers`` threads; :meth:`wake` when a job may have become runnable."""

    def __init__(self, config: GatewayConfig, ctx: StageContext, audit: AuditLog, *,
                 on_done: Callable[[Job], None] | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time, farm: TritonFarm | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._ctx = ctx
        self._audit = audit
        self._on_done = on_done
        self._clock = clock
        self._pool = ThreadPoolExecutor(config.pipeline.workers, thread_name_prefix="pipeline")
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._deferred: dict[str, float] = {}
        self._waiting: set[str] = set()  # jobs that waited for an inference server (alerted once)
        self._stages = SeriesStages(config, ctx, audit, metrics, clock, farm)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True)
        limit = config.pipeline.prepare_mb * 2**20
        self._preparer = Preparer(ctx, config.routes, limit) if limit else None
        self._preparing: threading.Thread | None = None

    def start(self) -> None:
        """Start dispatching (unfinished jobs from before a restart are picked up at once), and preparing."""
        self._thread.start()
        if self._preparer is not None:
            self._preparing = threading.Thread(target=self._prepare_loop, args=(self._preparer,), name="preparer",
                                               daemon=True)
            self._preparing.start()

    def wake(self) -> None:
        """Look for runnable jobs now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Stop dispatching and wait for the stages in progress to commit."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._preparer is not None:
            self._preparer.close()
        if self._preparing is not None:
            self._preparing.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a wake-up during the look is not lost
            try:
                self._dispatch()
            except Exception as exc:  # keep dispatching; the next poll retries
                log.error("dispatch_failed", exc_info=exc)
            self._wake.wait(self._config.pipeline.poll_seconds)

    def _prepare_loop(self, preparer: Preparer) -> None:
        while not self._stop.wait(_PREPARE_SECONDS):
            try:
                preparer.step(self._ctx.jobs.awaiting_pseudonymisation(), self._arriving)
            except Exception as exc:  # the stage does the work instead
                log.warning("prepare_failed", reason=type(exc).__name__)

    def _arriving(self) -> bool:
        latest = self._ctx.jobs.last_arrival()
        return latest is not None and self._clock() - latest < _BURST_GAP_SECONDS

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
        attempts = 0
        try:
            job = self._ctx.jobs.get(job_id)
            bind_job(job_id, job.study)
            attempts = self._ctx.jobs.begin_attempt(job_id)
            if attempts > _MAX_ATTEMPTS:  # the earlier ones never ended: each took the process down
                self._fail(job_id, "crashed_repeatedly", attempts - 1)
                return
            if job.state is JobState.COMPLETE:
                self._pseudonymise(job)
            if any(self._stages.holds(task) for task in self._ctx.tasks.tasks(job_id)):
                self._run_tasks(job_id, send=False)  # QA sees every series before any is sent
                self._stages.hold_study(job_id)
            self._run_tasks(job_id)
            self._ctx.jobs.end_attempt(job_id)
            self._finish(job_id)
            with self._lock:
                self._waiting.discard(job_id)
        except SpoolError as exc:  # disk full or I/O error: nothing was committed, try again later
            log.warning("stage_deferred", reason=exc.reason, retry_in_seconds=_DEFER_SECONDS)
            with contextlib.suppress(sqlite3.Error):  # not the job's fault; the database may be short of room too
                self._ctx.jobs.end_attempt(job_id)
            self._defer(job_id)
        except InferenceUnavailable as exc:  # no inference server now: wait, until retention ends the study
            self._wait_for_servers(job_id, exc)
        except Exception as exc:
            self._on_error(job_id, exc, attempts)
        finally:
            with self._lock:
                self._busy.discard(job_id)
            self._wake.set()

    def _run_tasks(self, job_id: str, *, send: bool = True) -> None:
        for task in self._ctx.tasks.tasks(job_id):
            if not task.state.terminal and not self._stop.is_set():
                self._stages.run(task, send=send)

    def _reopened(self, job_id: str) -> bool:
        return self._ctx.jobs.get(job_id).state is JobState.RECEIVING

    def _defer(self, job_id: str, seconds: float = _DEFER_SECONDS) -> None:
        with self._lock:
            self._deferred[job_id] = self._clock() + seconds

    def _wait_for_servers(self, job_id: str, exc: InferenceUnavailable) -> None:
        """The series waits for an inference server: alerted once per job, counted each time, tried again after
        ``[inference.remote] wait_seconds``; retention shreds it at its deadline if none returns in time."""
        wait = self._config.inference.remote.wait_seconds
        with self._lock:
            first = job_id not in self._waiting
            self._waiting.add(job_id)
        if first:
            log.error("alert", stage="infer", outcome="waiting", reason=exc.reason, retry_in_seconds=wait)
        else:
            log.warning("stage_waiting", stage="infer", reason=exc.reason, retry_in_seconds=wait)
        if self._metrics is not None:
            self._metrics.waiting("infer", exc.reason)
        with contextlib.suppress(sqlite3.Error):
            self._ctx.jobs.end_attempt(job_id)  # waiting is not a failed attempt
        self._defer(job_id, wait)

    def _on_error(self, job_id: str, exc: Exception, attempts: int) -> None:
        """An unexpected error: try again later, and after a few tries fail the job rather than loop."""
        if not self._ctx.jobs.exists(job_id):  # shredded at its deadline while a stage ran
            log.info("job_gone", reason="shredded")
            return
        if self._reopened(job_id):  # a corrected instance replaced one this run was reading
            log.info("job_gone", reason="reopened")
            self._ctx.jobs.end_attempt(job_id)
            return
        log.error("job_error", exc_info=exc, attempts=attempts)
        self._defer(job_id)
        if attempts >= _MAX_ATTEMPTS:
            self._fail(job_id, "internal_error", attempts)

    def _fail(self, job_id: str, reason: str, attempts: int) -> None:
        """End the job and its unfinished series as failed with *reason*, and say so."""
        self._ctx.jobs.set_state(job_id, JobState.FAILED, reason=reason, only_from=JobState.COMPLETE)
        for task in self._ctx.tasks.tasks(job_id):
            if not task.state.terminal:
                self._ctx.tasks.advance(job_id, task.task_no, JobState.FAILED, stage=None, duration_ms=0,
                                        now=self._clock(), reason=reason)
        log.error("alert", outcome="failed", reason=reason, attempts=attempts)
        if self._metrics is not None:
            self._metrics.failure("pipeline", reason)
        self._finish(job_id)

    def _pseudonymise(self, job: Job) -> None:
        self._audit.append("received", self._clock(), job_id=job.job_id, study=job.study,
                           first_instance_at=job.created_at, last_instance_at=job.last_received_at,
                           instances=job.instance_count, peer=job.peer)
        self._stages.begin("pseudonymise")
        prepared = self._preparer.take(job.job_id) if self._preparer is not None else None
        result = pseudonymise_job(self._ctx, job.job_id, self._config.routes, prepared=prepared)
        quarantined = sum(result.quarantined.values())
        log.info("stage_done", stage="pseudonymise", duration_ms=result.duration_ms, instances=result.instances,
                 prepared=result.prepared, quarantined=quarantined, series=result.series, outcome=result.state.value,
                 **({"reason": result.reason} if result.reason else {}))
        self._stages.observe("pseudonymise", result.duration_ms)
        self._audit.append("pseudonymised", self._clock(), job_id=job.job_id, study=job.study,
                           instances=result.instances, quarantined=quarantined, series=result.series,
                           outcome=result.state.value, **({"reason": result.reason} if result.reason else {}))
        if self._metrics is not None:
            self._metrics.quarantined(result.quarantined)
        if result.reason is not None:
            log.error("alert", stage="pseudonymise", outcome="failed", reason=result.reason,
                      quarantined=result.quarantined)
            if self._metrics is not None:
                self._metrics.failure("pseudonymise", result.reason)

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
