"""Retention: every job's patient data is deleted before ``retention.max_age_seconds`` after its first instance.

The deadline counts from the receipt time the job table recorded at the job's first C-STORE
(never from file times). A sweep shreds every job whose deadline falls before the next sweep
could run (``deadline - sweep_interval - margin``), whatever its state: still receiving,
stuck, failed or delivered. A delivered job is shredded at once (or after
``keep_after_delivery_seconds``); files written for a folder destination stay until the
deadline, since they are the delivery.

Jobs whose data keys one key-encryption key (KEK) wraps are shredded together, when the first
of them is due (up to one KEK period, an hour at 24 h, early); once no data key refers to a KEK
and its period is over, the sweep destroys the KEK's file in ``key_dir``, so no copy of
``data_dir`` taken before can be decrypted either, even with the master key.

Shredding one job: its data key is destroyed first (crypto-erase: every sealed file of the job
is unreadable from that commit on), then its files are unlinked, then its rows deleted
(``secure_delete``), and after the sweep the WAL is checkpointed (TRUNCATE) so deleted pages do
not linger there. Each deletion is written to the audit trail. A job that cannot be shredded
(an unlink race, an unwritable audit file) does not stop the sweep: it is logged as an alert,
counted, and retried by the next sweep.

Time is the :class:`~gateway.store.anchors.RetentionClock`: a wall clock set back does not extend a
study's life.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog

from gateway.config import Retention
from gateway.errors import JobNotFoundError
from gateway.failpoints import wall_time
from gateway.ops.audit import AuditLog
from gateway.store.data_keys import DataKeys
from gateway.store.jobs import Job, JobState, JobStore
from gateway.store.keys import KekFiles, kek_period
from gateway.store.spool import Spool
from gateway.store.tasks import Export, TaskStore

__all__ = ["Shredded", "Shredder", "SweepReport"]

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
    keys: list[str] = field(default_factory=list)  # key-encryption keys destroyed
    failed: list[str] = field(default_factory=list)  # job ids left for the next sweep
    failed_steps: list[str] = field(default_factory=list)  # exports, orphans, keys: retried by the next sweep


class Shredder:
    """Finds what is due and shreds it; safe to call from any thread of the node or from the CLI."""

    def __init__(self, spool: Spool, jobs: JobStore, retention: Retention, audit: AuditLog, *,
                 keys: KekFiles | None = None, clock: Callable[[], float] = time.time,
                 busy: Callable[[str], bool] = lambda _job_id: False,
                 on_sweep: Callable[[dict[str, int], bool], None] | None = None) -> None:
        self._on_sweep = on_sweep
        self._keys = keys
        self._clock = clock
        self._spool = spool
        self._jobs = jobs
        self._data_keys = DataKeys(jobs)
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
        """Shred every job, export file and key-encryption key that is due at *now* (default: the clock's time)."""
        with self._exclusive():
            if now is None:
                wall, now = wall_time(), self._clock()
            else:  # a simulated time stands for the wall clock too
                wall = now
            return self._sweep(now, min(wall, now), dry_run)

    def _sweep(self, now: float, wall: float, dry_run: bool) -> SweepReport:
        report = SweepReport(dry_run)
        received = self._data_keys.first_received_by_kek()
        for job in self._jobs.jobs():
            why = self._why(job, now, received.get(job.job_id, job.created_at))
            if why is None:
                continue
            if dry_run:
                report.jobs.append(self._preview(job, why, now))
                continue
            shredded = self._shred_or_report(job, why, now)
            if shredded is None:
                report.failed.append(job.job_id)
            else:
                report.jobs.append(shredded)
        report.exports = self._tasks.exports(received_before=now - self._retention.max_age_seconds
                                             + self.lead_seconds)
        stored = self._spool.stored_job_ids()  # before the rows: a folder's row is committed before it exists
        report.orphans = sorted(stored - {job.job_id for job in self._jobs.jobs()})
        if not dry_run:  # each step on its own: one that fails does not keep the others from running
            for step, run in (("exports", lambda: self._delete_exports(report.exports, now)),
                              ("orphans", lambda: self._delete_orphans(report.orphans, now)),
                              ("keys", lambda: report.keys.extend(self._destroy_keys(wall)))):
                if not _attempt(step, run):
                    report.failed_steps.append(step)
            self._checkpoint()
        if self._on_sweep is not None and not dry_run:
            failures = len(report.failed) + len(report.failed_steps)
            by_reason: dict[str, int] = {"failed": failures} if failures else {}
            for shredded in report.jobs:
                by_reason[shredded.why] = by_reason.get(shredded.why, 0) + 1
            self._on_sweep(by_reason, True)
        if report.jobs or report.exports or report.orphans or report.keys or report.failed or report.failed_steps:
            log.info("sweep_done", dry_run=dry_run, jobs=len(report.jobs), exports=len(report.exports),
                     orphans=len(report.orphans), keys_destroyed=len(report.keys), failed=len(report.failed),
                     failed_steps=report.failed_steps)
        return report

    def _shred_or_report(self, job: Job, why: str, now: float) -> Shredded | None:
        shredded: list[Shredded] = []
        _attempt("job", lambda: shredded.append(self.shred(job, why, now)), job_id=job.job_id)
        return shredded[0] if shredded else None

    def _destroy_keys(self, wall: float) -> list[str]:
        """Destroy every key-encryption key no data key refers to any more, once its period is over."""
        self._data_keys.forget_orphans()
        if self._keys is None:
            return []
        destroyed = self._keys.due(self._data_keys.keks_in_use(), wall, kek_period(self._retention.max_age_seconds))
        for name in destroyed:
            self._keys.destroy(name)
            self._audit.append("key_destroyed", wall, key=name, how="key-encryption key file unlinked; every "
                               "data key it wrapped, in any copy of data_dir, no longer opens")
            log.info("key_destroyed", key=name)
        return destroyed

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
        shredded = self.shred(job, "delivered", self._clock() if now is None else now)
        self._checkpoint()
        if self._on_sweep is not None:
            self._on_sweep({"delivered": 1}, False)
        return shredded

    def _why(self, job: Job, now: float, received_at: float) -> str | None:
        if now >= self.shred_at(min(received_at, job.created_at)):
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
        self._data_keys.destroy(job.job_id)
        removed = self._spool.remove_job(job.job_id)
        removed["quarantined"] = len(self._jobs.quarantined(job.job_id))
        pending = self._tasks.exports(job_id=job.job_id)
        shredded = Shredded(job.job_id, job.study, job.state.value, why, now - job.created_at, removed)
        # Recorded before the row goes: if the trail cannot be written, the row stays and the next sweep retries.
        self._audit.append("deleted", now, job_id=job.job_id, study=job.study, why=why, state=job.state.value,
                           first_instance_at=job.created_at, instances=job.instance_count,
                           age_seconds=round(now - job.created_at, 3), removed=removed, data_key="destroyed",
                           exports_kept=len(pending), complete=not pending, how=_HOW)
        self._jobs.delete(job.job_id)
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
            self._jobs.checkpoint()
        except sqlite3.Error as exc:  # another connection busy: the next sweep checkpoints
            log.warning("wal_checkpoint_deferred", error=type(exc).__name__)


def _attempt(step: str, run: Callable[[], object], **fields: str) -> bool:
    """Run one step of a sweep; on any error alert and go on (the next sweep retries it)."""
    try:
        run()
    except Exception as exc:
        log.error("alert", stage="retention", outcome="shred_failed", step=step, exc_info=exc, **fields)
        return False
    return True
