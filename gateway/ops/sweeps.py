"""When sweeps run: on the node's schedule, and once, with nothing but data_dir, the key directory and [retention].

:class:`SweepSchedule` runs :meth:`~gateway.ops.retention.Shredder.sweep` on an APScheduler background
thread in the node. :func:`sweep_once` is the sweep of ``python -m gateway shred`` (the systemd timer,
the container's shredder) and of ``serve`` before any other start-up check: it needs no master key,
model, certificate or port.
"""

from __future__ import annotations

import datetime as dt
import functools

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from gateway.config import GatewayConfig
from gateway.errors import StartupError
from gateway.ops.audit import AuditLog
from gateway.ops.retention import Shredder, SweepReport
from gateway.store.anchors import RetentionClock, record_audit_head
from gateway.store.jobs import JobStore
from gateway.store.keys import KekFiles
from gateway.store.spool import Spool

__all__ = ["SweepSchedule", "sweep_lines", "sweep_once"]

log = structlog.get_logger(__name__)


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


def sweep_once(config: GatewayConfig, *, dry_run: bool = False) -> tuple[SweepReport, list[str]]:
    """One sweep that needs nothing but ``data_dir``, the key directory and ``[retention]``.

    Runs before any other start-up check of ``serve``, and as ``python -m gateway shred`` (the
    systemd timer): no master key, model, certificate or port is needed. Returns the report and
    notes on what could not be done.
    """
    notes: list[str] = []
    spool = Spool(config.node.data_dir)
    if not spool.database_path.exists():
        return SweepReport(dry_run), [f"nothing to shred: no job table in {config.node.data_dir} yet"]
    spool.prepare()
    jobs = JobStore(spool.database_path)
    try:
        try:
            keys: KekFiles | None = KekFiles.of(config)
        except StartupError as exc:
            keys = None
            notes.append(f"key-encryption keys not swept: {exc}")
        audit = AuditLog(spool.audit_path, syslog_address=config.audit.syslog_address,
                         anchor=functools.partial(record_audit_head, jobs))
        shredder = Shredder(spool, jobs, config.retention, audit, keys=keys, clock=RetentionClock(jobs).now)
        return shredder.sweep(dry_run=dry_run), notes
    finally:
        jobs.close()


def sweep_lines(report: SweepReport) -> tuple[list[str], list[str]]:
    """What ``python -m gateway shred`` prints: what was shredded (or is due), and what failed (empty when none)."""
    verb = "due" if report.dry_run else "shredded"
    done = [f"{verb}: job {job.job_id} ({job.state}, {job.why}, {job.age_seconds / 3600:.1f} h old)"
            for job in report.jobs]
    done += [f"{verb}: export {export.destination}/{export.file_id} of job {export.job_id}"
             for export in report.exports]
    done += [f"{verb}: orphaned files of job {orphan}" for orphan in report.orphans]
    done += [f"destroyed: key-encryption key {key}" for key in report.keys]
    failed = [f"FAILED: job {job_id} could not be shredded (retried by the next sweep)" for job_id in report.failed]
    failed += [f"FAILED: the sweep's {step} step (retried by the next sweep)" for step in report.failed_steps]
    done.append(f"{len(report.jobs)} job(s), {len(report.exports)} export(s), {len(report.orphans)} orphan(s) "
                f"{verb}, {len(report.keys)} key(s) destroyed, {len(report.failed)} failed")
    return done, failed
