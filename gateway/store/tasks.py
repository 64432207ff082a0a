"""The tasks of a job: one per series, each going through the stages on its own.

A task's state takes the :class:`~gateway.store.jobs.JobState` values from ``pseudonymised`` on.
The job's state follows its tasks, in the same transaction as every task transition: the
least advanced unfinished task, and once all are finished the outcome: ``dead_letter`` if a
delivery was given up, else ``failed`` if a task failed, else ``sent`` if a result was
delivered, else ``no_route``. Every column holds counts, codes and random ids only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import JobNotFoundError
from gateway.store.database import forget_tasks
from gateway.store.jobs import JobState, JobStore

__all__ = ["JOB_STAGE", "Delivery", "DeliveryState", "Export", "NewTask", "StageTime", "Task", "TaskStore"]

#: The task number under which job-wide stages (pseudonymisation) record their time.
JOB_STAGE = 0
_ORDER = list(JobState)
_RESUMABLE = (JobState.PSEUDONYMISED, JobState.INFERRED, JobState.STRUCTURED)


@dataclass(frozen=True)
class NewTask:
    """A series found while pseudonymising: the route that takes it (or why none does) and its files."""

    route: str | None
    files: Sequence[str]
    reason: str | None = None


@dataclass(frozen=True)
class Task:
    """One series of a job on its way through the stages."""

    job_id: str
    task_no: int
    route: str | None
    state: JobState
    reason: str | None
    instance_count: int


class DeliveryState(StrEnum):
    """Where one delivery stands: waiting to be sent (and retried), sent, or given up."""

    PENDING = "pending"
    SENT = "sent"
    DEAD_LETTER = "dead_letter"

    @property
    def terminal(self) -> bool:
        """Whether nothing more will be attempted."""
        return self is not DeliveryState.PENDING


@dataclass(frozen=True)
class Delivery:
    """One result (``item``) of a task, owed to one destination."""

    task_no: int
    item: int
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    reason: str | None

    @property
    def key(self) -> tuple[int, int, str]:
        """What identifies the delivery within its job."""
        return self.task_no, self.item, self.destination


@dataclass(frozen=True)
class StageTime:
    """How long one stage of a task (or of the job: task 0) took."""

    task_no: int
    stage: str
    duration_ms: int


@dataclass(frozen=True)
class Export:
    """A file written for a folder destination; it outlives its job's rows until the deadline."""

    file_id: str
    destination: str
    job_id: str
    study: str
    received_at: float  # the first instance of the job: the retention deadline counts from it


class TaskStore:
    """Task, delivery and timing rows of the job database (same connection as the job table)."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    def start_over(self, job_id: str) -> None:
        """Forget the tasks of *job_id* (its pseudonymisation is being redone)."""
        with self._jobs.transaction() as db:
            forget_tasks(db, job_id)

    def create(self, job_id: str, tasks: Sequence[NewTask], *, duration_ms: int, now: float) -> JobState:
        """Record the tasks found by pseudonymisation and move the job on; return its new state.

        A job that is no longer ``complete`` (reopened by a corrected re-send meanwhile) is left as it is.
        """
        with self._jobs.transaction(durable=True) as db:
            current = _job_state(db, job_id)
            if current is not JobState.COMPLETE:
                return current
            for task_no, task in enumerate(tasks, start=1):
                state = JobState.PSEUDONYMISED if task.route else JobState.NO_ROUTE
                db.execute("INSERT INTO tasks (job_id, task_no, route, state, reason, instance_count) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (job_id, task_no, task.route, state, task.reason,
                                                         len(task.files)))
                db.executemany("INSERT INTO task_files (job_id, task_no, file_id) VALUES (?, ?, ?)",
                               [(job_id, task_no, file_id) for file_id in task.files])
            _record_time(db, job_id, JOB_STAGE, "pseudonymise", duration_ms, now)
            return _settle(db, job_id, now)

    def tasks(self, job_id: str) -> list[Task]:
        """The tasks of *job_id* in series order."""
        with self._jobs.reading() as db:
            rows = db.execute("SELECT * FROM tasks WHERE job_id = ? ORDER BY task_no", (job_id,)).fetchall()
        return [Task(row["job_id"], row["task_no"], row["route"], JobState(row["state"]), row["reason"],
                     row["instance_count"]) for row in rows]

    def files(self, job_id: str, task_no: int) -> list[str]:
        """The pseudonymised files of one task."""
        with self._jobs.reading() as db:
            rows = db.execute("SELECT file_id FROM task_files WHERE job_id = ? AND task_no = ? ORDER BY file_id",
                              (job_id, task_no)).fetchall()
        return [row["file_id"] for row in rows]

    def advance(self, job_id: str, task_no: int, state: JobState, *, stage: str | None, duration_ms: int, now: float,
                reason: str | None = None, deliveries: Sequence[tuple[int, str]] = ()) -> JobState | None:
        """Commit a task's new *state* (with the stage's time, and the deliveries it now owes); return the job's.

        A task that is gone (its job was reopened by a corrected re-send) changes nothing: ``None``.
        """
        with self._jobs.transaction(durable=True) as db:
            cur = db.execute("UPDATE tasks SET state = ?, reason = ? WHERE job_id = ? AND task_no = ?",
                             (state, reason, job_id, task_no))
            if cur.rowcount == 0:
                return None
            db.executemany("INSERT OR IGNORE INTO deliveries (job_id, task_no, item, destination, state, "
                           "next_attempt_at) VALUES (?, ?, ?, ?, 'pending', ?)",
                           [(job_id, task_no, item, name, now) for item, name in deliveries])
            if stage is not None:
                _record_time(db, job_id, task_no, stage, duration_ms, now)
            return _settle(db, job_id, now)

    def hold_study(self, job_id: str, now: float) -> list[int]:
        """When contour QA holds a series of *job_id*, hold its other structured series too (reason ``study_held``):
        nothing of the study is sent until it is released. Return the numbers of the series held here."""
        with self._jobs.transaction(durable=True) as db:
            if db.execute("SELECT 1 FROM tasks WHERE job_id = ? AND state = ?", (job_id, JobState.HELD)).fetchone() \
                    is None:
                return []
            return _move_all(db, job_id, JobState.STRUCTURED, JobState.HELD, "study_held", now)

    def release(self, job_id: str, now: float) -> list[int]:
        """Series of *job_id* held by contour QA go on to be sent; return their numbers (none held: ``[]``)."""
        with self._jobs.transaction(durable=True) as db:
            _job_state(db, job_id)  # raises JobNotFoundError
            return _move_all(db, job_id, JobState.HELD, JobState.STRUCTURED, None, now)

    def deliveries(self, job_id: str, task_no: int) -> list[Delivery]:
        """What one task owes to its destinations, and how each stands."""
        with self._jobs.reading() as db:
            rows = db.execute("SELECT * FROM deliveries WHERE job_id = ? AND task_no = ? ORDER BY item, destination",
                              (job_id, task_no)).fetchall()
        return [Delivery(row["task_no"], row["item"], row["destination"], DeliveryState(row["state"]), row["attempts"],
                         row["next_attempt_at"], row["reason"]) for row in rows]

    def record_attempt(self, job_id: str, delivery: Delivery, state: DeliveryState, *, next_attempt_at: float,
                       reason: str | None = None) -> None:
        """Count one delivery attempt and its outcome (``sent``, ``dead_letter``, or still pending)."""
        with self._jobs.transaction(durable=True) as db:
            db.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, next_attempt_at = ?, reason = ? "
                       "WHERE job_id = ? AND task_no = ? AND item = ? AND destination = ?",
                       (state, next_attempt_at, reason, job_id, delivery.task_no, delivery.item,
                        delivery.destination))

    def runnable(self, now: float) -> list[str]:
        """Jobs with work that can be done now, oldest first."""
        resumable = ", ".join(f"'{state.value}'" for state in _RESUMABLE)
        with self._jobs.reading() as db:
            rows = db.execute(
                "SELECT job_id FROM jobs WHERE state = 'complete' OR job_id IN ("
                f" SELECT job_id FROM tasks WHERE state IN ({resumable})"
                " UNION SELECT t.job_id FROM tasks t WHERE t.state = 'reidentified' AND ("
                "  SELECT coalesce(min(d.next_attempt_at), 0) FROM deliveries d WHERE d.job_id = t.job_id"
                "  AND d.task_no = t.task_no AND d.state = 'pending') <= ?"
                ") ORDER BY created_at", (now,)).fetchall()
        return [row["job_id"] for row in rows]

    def record_export(self, export: Export) -> None:
        """Record a folder-destination file durably, before it is written."""
        with self._jobs.transaction(durable=True) as db:
            db.execute("INSERT INTO exports (file_id, destination, job_id, study, received_at) VALUES (?, ?, ?, ?, ?)",
                       (export.file_id, export.destination, export.job_id, export.study, export.received_at))

    def exports(self, received_before: float | None = None, *, job_id: str | None = None) -> list[Export]:
        """Recorded export files (only those received before *received_before*, or of *job_id*, if given)."""
        with self._jobs.reading() as db:
            rows = db.execute("SELECT * FROM exports WHERE received_at < ? AND (? IS NULL OR job_id = ?) "
                              "ORDER BY received_at",
                              (float("inf") if received_before is None else received_before, job_id, job_id)
                              ).fetchall()
        return [Export(row["file_id"], row["destination"], row["job_id"], row["study"], row["received_at"])
                for row in rows]

    def forget_export(self, file_id: str) -> None:
        """Drop the record of a deleted export file."""
        with self._jobs.transaction() as db:
            db.execute("DELETE FROM exports WHERE file_id = ?", (file_id,))

    def stage_times(self, job_id: str) -> list[StageTime]:
        """Every stage time recorded for *job_id*, in the order they finished."""
        with self._jobs.reading() as db:
            rows = db.execute("SELECT task_no, stage, duration_ms FROM stage_times WHERE job_id = ? "
                              "ORDER BY finished_at", (job_id,)).fetchall()
        return [StageTime(row["task_no"], row["stage"], row["duration_ms"]) for row in rows]


def _move_all(db: sqlite3.Connection, job_id: str, old: JobState, new: JobState, reason: str | None,
              now: float) -> list[int]:
    """Move every task of *job_id* in state *old* to *new* (with *reason*); return their numbers."""
    rows = db.execute("SELECT task_no FROM tasks WHERE job_id = ? AND state = ? ORDER BY task_no",
                      (job_id, old)).fetchall()
    db.execute("UPDATE tasks SET state = ?, reason = ? WHERE job_id = ? AND state = ?", (new, reason, job_id, old))
    if rows:
        _settle(db, job_id, now)
    return [row["task_no"] for row in rows]


def _record_time(db: sqlite3.Connection, job_id: str, task_no: int, stage: str, duration_ms: int,
                 now: float) -> None:
    db.execute("INSERT OR REPLACE INTO stage_times (job_id, task_no, stage, duration_ms, finished_at) "
               "VALUES (?, ?, ?, ?, ?)", (job_id, task_no, stage, duration_ms, now))


def _job_state(db: sqlite3.Connection, job_id: str) -> JobState:
    row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFoundError(job_id)
    return JobState(row["state"])


def _settle(db: sqlite3.Connection, job_id: str, now: float) -> JobState:
    rows = db.execute("SELECT task_no, state, reason FROM tasks WHERE job_id = ?", (job_id,)).fetchall()
    states = [JobState(row["state"]) for row in rows]
    unfinished = [state for state in states if not state.terminal]
    reasons = [f"series {row['task_no']}: {row['reason']}" for row in rows if row["reason"]]
    if unfinished:
        state = min(unfinished, key=_ORDER.index)
    else:
        state = next((s for s in (JobState.DEAD_LETTER, JobState.FAILED, JobState.SENT) if s in states),
                     JobState.NO_ROUTE)
    db.execute("UPDATE jobs SET state = ?, reason = ?, finished_at = ? WHERE job_id = ?",
               (state, "; ".join(reasons) or None, now if state.terminal else None, job_id))
    return state
