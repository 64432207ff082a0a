"""Retention: every job's patient data is deleted before ``retention.max_age_seconds`` after its first instance.

The deadline counts from the receipt time the job table recorded at the job's first C-STORE
(never from file times). A sweep shreds every job whose deadline falls before the next sweep
could run (``deadline - sweep_interval - margin``), whatever its state: still receiving,
stuck, failed or delivered. A delivered job is shredded at once (or after
``keep_after_delivery_seconds``); files written for a folder destination stay until the
deadline, since they are the delivery.

Shredding one job: its data key is destroyed first (crypto-erase: every sealed file of the job
is unreadable from that commit on), then its files are unlinked, then its rows deleted
(``secure_delete``), and after the sweep the WAL is checkpointed (TRUNCATE) so deleted pages do
not linger there. Each deletion is written to the audit trail.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from gateway.audit import AuditLog
from gateway.config import Retention
from gateway.errors import JobNotFoundError
from gateway.jobs import Job, JobState, JobStore
from gateway.spool import Spool
from gateway.tasks import Export, TaskStore

__all__ = ["Shredded", "Shredder", "SweepReport", "SweepSchedule"]

log = structlog.get_logger(__name__)

_HOW = "data key destroyed (crypto-erase), files unlinked, rows deleted with secure_delete, WAL checkpointed"


@dataclass(frozen=True)
class Shredded:
    """One job shredded (or, in a dry run, due)."""

    job_id: str
    study: str
    state: str
    why: str  # deadline | delivered
    age_seconds: float
    removed: dict[str, int]


@dataclass
class SweepReport:
    """What a sweep did (or, in a dry run, would do)."""

    dry_run: bool
    jobs: list[Shredded] = field(default_factory=list)
    exports: list[Export] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


class Shredder:
    """Finds what is due and shreds it; safe to call from any thread of the node or from the CLI."""

    def __init__(self, spool: Spool, jobs: JobStore, retention: Retention, audit: AuditLog, *,
                 busy: Callable[[str], bool] = lambda _job_id: False,
                 on_sweep: Callable[[dict[str, int], bool], None] | None = None) -> None:
        self._on_sweep = on_sweep
        self._spool = spool
        self._jobs = jobs
        self._tasks = TaskStore(jobs)
        self._retention = retention
        self._audit = audit
        self._busy = busy
        self._lock = threading.RLock()
        self._depth = 0

    @property
    def lead_seconds(self) -> float:
        """How long before its deadline a job is shredded: one sweep interval plus a margin."""
        interval = self._retention.sweep_interval_seconds
        margin = min(60.0, (self._retention.max_age_seconds - interval) / 2)
        return interval + margin

    def shred_at(self, received_at: float) -> float:
        """When data first received at *received_at* is shredded at the latest."""
        return received_at + self._retention.max_age_seconds - self.lead_seconds

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One shredder at a time: threads of this process, and other processes (the ``shred`` command)."""
        with self._lock:
            if self._depth:  # re-entered (a sweep shredding a job): the file lock is held already
                yield
                return
            with open(self._spool.data_dir / "sweep.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # per open file: taken once, by the outermost caller
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def sweep(self, now: float | None = None, *, dry_run: bool = False) -> SweepReport:
        """Shred every job and export file that is due at *now* (default: the current time)."""
        with self._exclusive():
            return self._sweep(time.time() if now is None else now, dry_run)

    def _sweep(self, now: float, dry_run: bool) -> SweepReport:
        report = SweepReport(dry_run)
        for job in self._jobs.jobs():
            why = self._why(job, now)
            if why is not None:
                report.jobs.append(self._preview(job, why, now) if dry_run else self.shred(job, why, now))
        report.exports = self._tasks.exports(received_before=now - self._retention.max_age_seconds
                                             + self.lead_seconds)
        stored = self._spool.stored_job_ids()  # before the rows: a folder's row is committed before it exists
        report.orphans = sorted(stored - {job.job_id for job in self._jobs.jobs()})
        if not dry_run:
            self._delete_exports(report.exports, now)
            self._delete_orphans(report.orphans, now)
            with self._jobs.transaction() as db:  # a key made for a job shredded while an instance arrived
                db.execute("DELETE FROM data_keys WHERE job_id NOT IN (SELECT job_id FROM jobs)")
            self._checkpoint()
        if self._on_sweep is not None and not dry_run:
            by_reason: dict[str, int] = {}
            for shredded in report.jobs:
                by_reason[shredded.why] = by_reason.get(shredded.why, 0) + 1
            self._on_sweep(by_reason, True)
        if report.jobs or report.exports or report.orphans:
            log.info("sweep_done", dry_run=dry_run, jobs=len(report.jobs), exports=len(report.exports),
                     orphans=len(report.orphans))
        return report

    def shred_delivered(self, job_id: str, now: float | None = None) -> Shredded | None:
        """Shred a job the TPS has confirmed, unless the configuration keeps it a while."""
        if self._retention.keep_after_delivery_seconds > 0:
            return None
        try:
            job = self._jobs.get(job_id)
        except JobNotFoundError:  # shredded by a sweep meanwhile
            return None
        if job.state is not JobState.SENT:
            return None
        shredded = self.shred(job, "delivered", time.time() if now is None else now)
        self._checkpoint()
        if self._on_sweep is not None:
            self._on_sweep({"delivered": 1}, False)
        return shredded

    def _why(self, job: Job, now: float) -> str | None:
        if now >= self.shred_at(job.created_at):
            return "deadline"
        keep = self._retention.keep_after_delivery_seconds
        if (job.state is JobState.SENT and job.finished_at is not None and now >= job.finished_at + keep
                and not self._busy(job.job_id)):
            return "delivered"
        return None

    def _preview(self, job: Job, why: str, now: float) -> Shredded:
        return Shredded(job.job_id, job.study, job.state.value, why, now - job.created_at, {})

    def shred(self, job: Job, why: str, now: float) -> Shredded:
        """Crypto-erase, unlink and forget one job; write the ``deleted`` audit record."""
        with self._exclusive():  # the sweep and a delivery may both get here for one job
            if not self._jobs.exists(job.job_id):
                return Shredded(job.job_id, job.study, job.state.value, why, now - job.created_at, {})
            return self._shred(job, why, now)

    def _shred(self, job: Job, why: str, now: float) -> Shredded:
        with self._jobs.transaction(durable=True) as db:
            db.execute("DELETE FROM data_keys WHERE job_id = ?", (job.job_id,))
        removed = self._spool.remove_job(job.job_id)
        removed["quarantined"] = len(self._jobs.quarantined(job.job_id))
        with self._jobs.transaction(durable=True) as db:
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job.job_id,))
        pending = self._tasks.exports(job_id=job.job_id)
        shredded = Shredded(job.job_id, job.study, job.state.value, why, now - job.created_at, removed)
        self._audit.append("deleted", now, job_id=job.job_id, study=job.study, why=why, state=job.state.value,
                           first_instance_at=job.created_at, instances=job.instance_count,
                           age_seconds=round(now - job.created_at, 3), removed=removed, data_key="destroyed",
                           exports_kept=len(pending), complete=not pending, how=_HOW)
        log.info("job_shredded", job_id=job.job_id, study=job.study, why=why, state=job.state.value,
                 age_seconds=round(now - job.created_at, 1), exports_kept=len(pending))
        return shredded

    def _delete_exports(self, exports: list[Export], now: float) -> None:
        for export in exports:
            existed = self._spool.remove_export(export.destination, export.file_id)
            self._tasks.forget_export(export.file_id)
            left = self._tasks.exports(job_id=export.job_id)
            job_left = self._jobs.exists(export.job_id)
            self._audit.append("deleted", now, job_id=export.job_id, study=export.study, why="deadline",
                               first_instance_at=export.received_at, age_seconds=round(now - export.received_at, 3),
                               removed={"export": int(existed)}, destination=export.destination,
                               complete=not left and not job_left, how="overwritten with zeros, unlinked")
        files = self._spool.export_files()  # before the records: a record is committed before its file
        known = {e.file_id for e in self._tasks.exports()}
        for destination, file_id in files:
            if file_id not in known:  # its record is gone: nothing may keep it
                self._spool.remove_export(destination, file_id)

    def _delete_orphans(self, job_ids: list[str], now: float) -> None:
        for job_id in job_ids:  # folders whose job row is gone (shredded while a stage was still writing)
            removed = self._spool.remove_job(job_id)
            log.warning("orphan_files_removed", job_id=job_id, **removed)
            self._audit.append("deleted", now, job_id=job_id, why="orphan", removed=removed, complete=True,
                               how="unlinked (its data key was already destroyed)")

    def _checkpoint(self) -> None:
        try:
            with self._jobs.reading() as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # another connection busy: the next sweep checkpoints
            log.warning("wal_checkpoint_deferred", error=type(exc).__name__)


class SweepSchedule:
    """Runs :meth:`Shredder.sweep` every ``sweep_interval_seconds`` on an APScheduler background thread.

    APScheduler 3's defaults would let a late run be skipped (``misfire_grace_time`` of 1 s) and
    several missed runs pile up; here a late run always happens (no grace limit), missed runs
    collapse into one (``coalesce``), and never two run at once. The job store is in memory on
    purpose: deadlines live in the job table, and :class:`~gateway.service.Node` sweeps once at
    start-up, before it accepts an association, to catch up on any downtime.
    """

    def __init__(self, shredder: Shredder, interval_seconds: float) -> None:
        self._shredder = shredder
        self._interval = interval_seconds
        self._scheduler = BackgroundScheduler(
            timezone=dt.UTC, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None})

    @property
    def running(self) -> bool:
        """Whether the scheduler thread is running."""
        return bool(self._scheduler.running)

    def start(self) -> None:
        """Schedule the first sweep one interval from now (the start-up sweep has just run)."""
        first = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._interval)
        self._scheduler.add_job(self._sweep, "interval", seconds=self._interval, id="retention-sweep",
                                next_run_time=first)
        self._scheduler.start()

    def stop(self) -> None:
        """Stop, letting a sweep in progress finish."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def _sweep(self) -> None:
        try:
            self._shredder.sweep()
        except Exception as exc:  # keep the schedule; the next run retries
            log.error("sweep_failed", exc_info=exc)
