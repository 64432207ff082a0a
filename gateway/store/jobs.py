"""The job table: one job per received study, its state, attempts and quarantined instances.

The database (:mod:`gateway.store.database`) holds no patient data: studies and instances are known only by keyed
hashes of their UIDs (see :mod:`gateway.receiving.assembly`), jobs by random ids, and each job's
data key only wrapped by a key-encryption key kept outside ``data_dir`` (see :mod:`gateway.store.sealing`).
Job creation is committed with ``synchronous=FULL``; per-instance rows (:mod:`gateway.store.receptions`)
use ``NORMAL`` because every instance file is itself fsynced and
:func:`gateway.receiving.assembly.Assembler.reconcile` re-registers files after a power loss.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import JobNotFoundError
from gateway.store.receptions import Receptions

__all__ = ["WRITE_LEASE_SECONDS", "Job", "JobState", "JobStore", "WrappedKey"]

#: A write counted in flight for longer than this is a receiver that died: it no longer holds completion back.
WRITE_LEASE_SECONDS = 600.0


class JobState(StrEnum):
    """Where a job (a study) or one of its tasks (a series) stands, in the order of the stages."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PSEUDONYMISED = "pseudonymised"
    INFERRED = "inferred"
    STRUCTURED = "structured"
    #: Contour QA failed on a route with ``qa = "hold"``: nothing is sent until ``python -m gateway release``.
    HELD = "held"
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


class JobStore(Receptions):
    """The job table: each study's job, its state and its instances (receptions: :class:`Receptions`)."""

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

    def awaiting_pseudonymisation(self) -> list[str]:
        """The jobs still receiving, or complete and not yet pseudonymised, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT job_id FROM jobs WHERE state IN ('receiving', 'complete') "
                                    "ORDER BY created_at").fetchall()
        return [row["job_id"] for row in rows]

    def last_arrival(self) -> float | None:
        """When the latest instance of any study still receiving arrived (None: nothing is being received)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(last_received_at) AS latest FROM jobs WHERE state = 'receiving'"
                                   ).fetchone()
        return None if row["latest"] is None else float(row["latest"])

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


def _job(row: sqlite3.Row) -> Job:
    return Job(
        job_id=row["job_id"], study_key=row["study_key"], peer=row["peer"], state=JobState(row["state"]),
        created_at=row["created_at"], last_received_at=row["last_received_at"],
        completed_at=row["completed_at"], instance_count=row["instance_count"], reason=row["reason"],
        previous_job_id=row["previous_job_id"], finished_at=row["finished_at"],
    )
