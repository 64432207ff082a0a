"""Receptions: which receiving job an incoming instance goes to, and the instances each job holds.

A receiver reserves the job of an instance's study before writing it (one write counted in flight, so the
job cannot complete meanwhile), then records the durably written file, replaces the copy the job held, or
releases the reservation. A corrected re-send of a completed study reopens its job.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from gateway.store.database import Database, forget_tasks

__all__ = ["Receptions", "RecordOutcome", "Reservation"]


class RecordOutcome(StrEnum):
    """Result of registering one received instance."""

    STORED = "stored"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"
    JOB_CLOSED = "job_closed"


@dataclass(frozen=True)
class Reservation:
    """The receiving job an incoming instance belongs to, and the copy of that instance it holds."""

    job_id: str
    created: bool
    previous_job_id: str | None
    held: str | None  # the file of the copy of the instance the job holds already
    reopened: bool = False


class Receptions(Database):
    """The reception rows of the job database: reservations, instances, writes in flight."""

    def reserve(self, study_key: str, peer: str, quiet_seconds: float, now: float, *, sop_key: str | None = None,
                differs: Callable[[str, str], bool] | None = None) -> Reservation:
        """Return the receiving job an incoming instance goes to, and the copy of it that job holds.

        The job's ``last_received_at`` is moved to *now* and one more write is counted in flight
        (:meth:`record_instance`, :meth:`replace_instance` or :meth:`release` end it), so the job
        cannot complete while the instance is written. With no receiving job for the study, a
        copy of the instance held by the study's latest job that *differs* (``(job_id, file_id)``
        -> whether the incoming content is different) reopens that job (a corrected re-send: its
        tasks are dropped and it is processed again once quiet); otherwise a new job is created.
        """
        with self.transaction() as db:  # the common case, one statement: the study's job is receiving
            row = db.execute(
                "UPDATE jobs SET last_received_at = max(last_received_at, ?), writing = writing + 1 "
                "WHERE study_key = ? AND state = 'receiving' RETURNING job_id", (now, study_key)).fetchone()
            if row is not None:
                return Reservation(row["job_id"], False, None, _held(db, row["job_id"], sop_key))
        corrected = self._corrected_copy(study_key, sop_key, differs)  # compared with no lock held
        with self.transaction(durable=True) as db:
            row = db.execute(
                "SELECT job_id FROM jobs WHERE study_key = ? AND state = 'receiving'", (study_key,)
            ).fetchone()
            if row is not None:
                _take_writer(db, row["job_id"], now)
                return Reservation(row["job_id"], False, None, _held(db, row["job_id"], sop_key))
            if corrected is not None and sop_key is not None and _latest_holder(db, study_key, sop_key) == corrected:
                return _reopen(db, *corrected, now)
            previous = db.execute(
                "SELECT job_id FROM jobs WHERE study_key = ? ORDER BY created_at DESC LIMIT 1", (study_key,)
            ).fetchone()
            job_id = secrets.token_hex(8)
            db.execute(
                "INSERT INTO jobs (job_id, study_key, peer, quiet_seconds, state, created_at, "
                "last_received_at, previous_job_id, writing) VALUES (?, ?, ?, ?, 'receiving', MAX(?, COALESCE("
                "(SELECT CAST(value AS REAL) FROM anchors WHERE name = 'time_seen'), 0)), ?, ?, 1)",
                (job_id, study_key, peer, quiet_seconds, now, now, previous["job_id"] if previous else None),
            )
            return Reservation(job_id, True, previous["job_id"] if previous else None, None)

    def _corrected_copy(self, study_key: str, sop_key: str | None,
                        differs: Callable[[str, str], bool] | None) -> tuple[str, str] | None:
        # The study's latest job holding this instance, and its file, if that copy differs from the incoming one.
        # Rare: only the first instance of a study after its completion gets here.
        if sop_key is None or differs is None:
            return None
        with self._lock:
            holder = _latest_holder(self._db, study_key, sop_key)
        return holder if holder is not None and differs(*holder) else None

    def release(self, job_id: str) -> None:
        """An instance write counted by :meth:`reserve` ended without registering anything."""
        with self.transaction() as db:
            _end_write(db, job_id)

    def record_instance(self, job_id: str, sop_key: str, file_id: str, size: int, now: float) -> RecordOutcome:
        """Register a durably written instance file with its job (ending the write counted by :meth:`reserve`).

        *now* is when the write became durable: the quiet period counts from it.
        """
        with self.transaction() as db:
            if not _end_write(db, job_id):
                return RecordOutcome.JOB_CLOSED
            cur = db.execute(
                "INSERT OR IGNORE INTO instances (job_id, sop_key, file_id, size, received_at) "
                "VALUES (?, ?, ?, ?, ?)", (job_id, sop_key, file_id, size, now))
            if cur.rowcount == 0:
                return RecordOutcome.DUPLICATE
            db.execute(
                "UPDATE jobs SET instance_count = instance_count + 1, "
                "last_received_at = max(last_received_at, ?) WHERE job_id = ?", (now, job_id))
            return RecordOutcome.STORED

    def replace_instance(self, job_id: str, sop_key: str, held: str, file_id: str, size: int,
                         now: float) -> RecordOutcome:
        """Put the durably written *file_id* in place of the copy *held* (the last copy received wins)."""
        with self.transaction() as db:
            if not _end_write(db, job_id):
                return RecordOutcome.JOB_CLOSED
            cur = db.execute(
                "UPDATE instances SET file_id = ?, size = ?, received_at = ? "
                "WHERE job_id = ? AND sop_key = ? AND file_id = ?",
                (file_id, size, now, job_id, sop_key, held))
            if cur.rowcount == 0:  # another copy won the race: this one is the last
                return RecordOutcome.DUPLICATE
            db.execute("DELETE FROM quarantine WHERE job_id = ? AND file_id = ?", (job_id, held))
            db.execute("UPDATE jobs SET last_received_at = max(last_received_at, ?) WHERE job_id = ?",
                       (now, job_id))
            return RecordOutcome.REPLACED

    def forget_writes(self) -> None:
        """No receiver is running (start-up): no instance write is in flight."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET writing = 0 WHERE writing != 0")

    def forget_instance(self, job_id: str, file_id: str) -> None:
        """Drop the row of an instance whose file is gone (start-up reconciliation)."""
        with self.transaction() as db:
            cur = db.execute("DELETE FROM instances WHERE job_id = ? AND file_id = ?", (job_id, file_id))
            if cur.rowcount:
                db.execute("UPDATE jobs SET instance_count = instance_count - ? WHERE job_id = ?",
                           (cur.rowcount, job_id))


def _take_writer(db: sqlite3.Connection, job_id: str, now: float) -> bool:
    cur = db.execute("UPDATE jobs SET last_received_at = max(last_received_at, ?), writing = writing + 1 "
                     "WHERE job_id = ? AND state = 'receiving'", (now, job_id))
    return cur.rowcount == 1


def _end_write(db: sqlite3.Connection, job_id: str) -> bool:
    """One write counted in flight ended; return whether the job is still receiving."""
    row = db.execute("UPDATE jobs SET writing = max(0, writing - 1) WHERE job_id = ? RETURNING state",
                     (job_id,)).fetchone()
    return row is not None and row["state"] == "receiving"


def _held(db: sqlite3.Connection, job_id: str, sop_key: str | None) -> str | None:
    if sop_key is None:
        return None
    row = db.execute("SELECT file_id FROM instances WHERE job_id = ? AND sop_key = ?", (job_id, sop_key)).fetchone()
    return None if row is None else str(row["file_id"])


def _latest_holder(db: sqlite3.Connection, study_key: str, sop_key: str) -> tuple[str, str] | None:
    row = db.execute(
        "SELECT j.job_id, i.file_id FROM instances i JOIN jobs j ON j.job_id = i.job_id "
        "WHERE j.study_key = ? AND i.sop_key = ? ORDER BY j.created_at DESC LIMIT 1", (study_key, sop_key)
    ).fetchone()
    return None if row is None else (str(row["job_id"]), str(row["file_id"]))


def _reopen(db: sqlite3.Connection, job_id: str, file_id: str, now: float) -> Reservation:
    # A corrected re-send: the job forgets its tasks and receives again (its deadline still counts from
    # its first instance); it is processed again from the received data once quiet.
    forget_tasks(db, job_id)
    db.execute("UPDATE jobs SET state = 'receiving', completed_at = NULL, finished_at = NULL, reason = NULL, "
               "attempts = 0, last_received_at = max(last_received_at, ?), writing = writing + 1 WHERE job_id = ?",
               (now, job_id))
    return Reservation(job_id, False, None, file_id, reopened=True)
