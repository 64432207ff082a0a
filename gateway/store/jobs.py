"""The SQLite job table: one job per received study, its state, and its instances.

The database holds no patient data: studies and instances are known only by keyed
hashes of their UIDs (see :mod:`gateway.receiving.assembly`), jobs by random ids, and each job's
data key only wrapped by a key-encryption key kept outside ``data_dir`` (see :mod:`gateway.store.sealing`).
It is shared by the node's processes (WAL mode). Job creation is committed with ``synchronous=FULL``;
per-instance rows use ``NORMAL`` because every instance file is itself fsynced and
:func:`gateway.receiving.assembly.Assembler.reconcile` re-registers files after a power loss.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gateway.errors import JobNotFoundError
from gateway.store.schema import ADDED_COLUMNS, MIGRATIONS, SCHEMA, SCHEMA_VERSION, TASK_TABLES

__all__ = ["WRITE_LEASE_SECONDS", "Job", "JobState", "JobStore", "RecordOutcome", "Reservation", "WrappedKey",
           "forget_tasks"]

#: A write counted in flight for longer than this is a receiver that died: it no longer holds completion back.
WRITE_LEASE_SECONDS = 600.0

class JobState(StrEnum):
    """Where a job (a study) or one of its tasks (a series) stands, in the order of the stages."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PSEUDONYMISED = "pseudonymised"
    INFERRED = "inferred"
    STRUCTURED = "structured"
    REIDENTIFIED = "reidentified"
    SENT = "sent"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    NO_ROUTE = "no_route"

    @property
    def terminal(self) -> bool:
        """Whether nothing more will happen (until retention shreds it)."""
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SENT, JobState.FAILED, JobState.DEAD_LETTER, JobState.NO_ROUTE})


class RecordOutcome(StrEnum):
    """Result of registering one received instance."""

    STORED = "stored"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"
    JOB_CLOSED = "job_closed"


@dataclass(frozen=True)
class WrappedKey:
    """A job's data key as stored: encrypted, with the id of the key-encryption key (``None``: the master key)."""

    wrapped: bytes
    kek: str | None


@dataclass(frozen=True)
class Job:
    """One row of the job table (no patient data)."""

    job_id: str
    study_key: str
    peer: str
    state: JobState
    created_at: float
    last_received_at: float
    completed_at: float | None
    instance_count: int
    reason: str | None
    previous_job_id: str | None
    finished_at: float | None = None

    @property
    def study(self) -> str:
        """Pseudonymous study id for logs: a prefix of the keyed hash, not reversible."""
        return self.study_key[:16]


@dataclass(frozen=True)
class Reservation:
    """The receiving job an incoming instance belongs to, and the copy of that instance it holds."""

    job_id: str
    created: bool
    previous_job_id: str | None
    held: str | None  # the file of the copy of the instance the job holds already
    reopened: bool = False


class JobStore:
    """Thread-safe access to the job database of one process."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        self._add_columns()

    def _add_columns(self) -> None:
        with self.transaction() as db:
            for table, column, declaration in ADDED_COLUMNS:
                present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            for statement in MIGRATIONS:
                db.execute(statement)

    def close(self) -> None:
        """Close the connection (checkpointing the WAL when this is the last one)."""
        with self._lock:
            self._db.close()

    def delete(self, job_id: str) -> None:
        """Forget *job_id* and every row that belongs to it (durably: retention has shredded it)."""
        with self.transaction(durable=True) as db:
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database and truncate it (raises ``sqlite3.Error`` when busy)."""
        with self.reading() as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, held by this thread, for reads."""
        with self._lock:
            yield self._db

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on exit, rolled back on an exception."""
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

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
        with self._lock:
            row = self._db.execute(
                "SELECT job_id FROM jobs WHERE study_key = ? AND state = 'receiving'", (study_key,)
            ).fetchone()
        if row is not None:
            with self.transaction() as db:
                if _take_writer(db, row["job_id"], now):
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

    def complete_due(self, now: float) -> list[Job]:
        """Close every receiving job that has been quiet for its peer's ``quiet_seconds``."""
        with self.transaction() as db:
            rows = db.execute(
                "UPDATE jobs SET state = 'complete', completed_at = ? WHERE state = 'receiving' "
                "AND last_received_at + quiet_seconds <= ? AND (writing = 0 OR last_received_at + ? <= ?) "
                "RETURNING *", (now, now, WRITE_LEASE_SECONDS, now)).fetchall()
        return [_job(row) for row in rows]

    def next_completion_at(self) -> float | None:
        """When the earliest receiving job's quiet period ends (it may still move later), or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT min(last_received_at + quiet_seconds) AS due FROM jobs "
                                   "WHERE state = 'receiving'").fetchone()
        return None if row["due"] is None else float(row["due"])

    def forget_writes(self) -> None:
        """No receiver is running (start-up): no instance write is in flight."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET writing = 0 WHERE writing != 0")

    def force_complete(self, job_id: str, now: float) -> Job:
        """Close a receiving job now, whatever its quiet period; other states are left alone."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = 'complete', completed_at = ? "
                       "WHERE job_id = ? AND state = 'receiving'", (now, job_id))
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return _job(row)

    def set_state(self, job_id: str, state: JobState, reason: str | None = None, *, now: float | None = None,
                  only_from: JobState | None = None) -> bool:
        """Move a job to *state*, recording *reason* (a code, never patient data) and, if final, when.

        With *only_from*, nothing changes unless the job is in that state; returns whether it moved.
        """
        finished = (now if now is not None else time.time()) if state.terminal else None
        with self.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(job_id)
            if only_from is not None and row["state"] != only_from:
                return False
            db.execute("UPDATE jobs SET state = ?, reason = ?, finished_at = ? WHERE job_id = ?",
                       (state, reason, finished, job_id))
        return True

    def begin_attempt(self, job_id: str) -> int:
        """Count (durably) one more pipeline attempt on *job_id*; return how many have not ended well.

        :meth:`end_attempt` resets the count; an attempt that raised or killed the process leaves it.
        """
        with self.transaction(durable=True) as db:
            row = db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE job_id = ? RETURNING attempts",
                             (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return int(row["attempts"])

    def end_attempt(self, job_id: str) -> None:
        """The attempt counted by :meth:`begin_attempt` ended without an error."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET attempts = 0 WHERE job_id = ?", (job_id,))

    def get(self, job_id: str) -> Job:
        """Return the job *job_id*."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return _job(row)

    def exists(self, job_id: str) -> bool:
        """Whether *job_id* is still in the table (not shredded)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone() is not None

    def jobs(self) -> list[Job]:
        """Return every job, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
        return [_job(row) for row in rows]

    def instance_files(self, job_id: str) -> dict[str, str]:
        """Return ``{file_id: sop_key}`` for the job's registered instances."""
        with self._lock:
            rows = self._db.execute("SELECT file_id, sop_key FROM instances WHERE job_id = ?",
                                    (job_id,)).fetchall()
        return {row["file_id"]: row["sop_key"] for row in rows}

    def quarantine(self, job_id: str, file_id: str, reason: str, now: float) -> None:
        """Record that an instance must not be processed, and why (a reason code)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO quarantine (job_id, file_id, reason, quarantined_at) "
                       "VALUES (?, ?, ?, ?)", (job_id, file_id, reason, now))

    def quarantined(self, job_id: str) -> dict[str, str]:
        """``{file_id: reason}`` of the job's quarantined instances."""
        with self._lock:
            rows = self._db.execute("SELECT file_id, reason FROM quarantine WHERE job_id = ?", (job_id,)).fetchall()
        return {row["file_id"]: row["reason"] for row in rows}

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
    return row is not None and row["state"] == JobState.RECEIVING


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


def forget_tasks(db: sqlite3.Connection, job_id: str) -> None:
    """Delete everything pseudonymisation derived for *job_id* (inside the caller's transaction)."""
    for table in TASK_TABLES:
        db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))


def _job(row: sqlite3.Row) -> Job:
    return Job(
        job_id=row["job_id"], study_key=row["study_key"], peer=row["peer"], state=JobState(row["state"]),
        created_at=row["created_at"], last_received_at=row["last_received_at"],
        completed_at=row["completed_at"], instance_count=row["instance_count"], reason=row["reason"],
        previous_job_id=row["previous_job_id"], finished_at=row["finished_at"],
    )
