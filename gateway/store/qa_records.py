"""The contour QA record of each series: every plausibility check's outcome, kept until the study is shredded.

Rows hold structure names (the model's label names), check and reason codes and the figures measured: no
patient data. ``python -m gateway status`` and ``python -m gateway qa`` read them; a corrected re-send
that starts a job over drops them with the job's other task rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.store.jobs import JobStore

__all__ = ["QaRecord", "QaRecords"]


@dataclass(frozen=True)
class QaRecord:
    """One check of one structure of one series."""

    task_no: int
    structure: str
    check: str
    outcome: str  # pass, warn or fail
    value: float
    reason: str | None


class QaRecords:
    """The ``qa_findings`` rows of the job database (same connection as the job table)."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    def replace(self, job_id: str, task_no: int, records: Sequence[QaRecord]) -> None:
        """The series' record is *records* (a structure stage run again replaces what it wrote before)."""
        with self._jobs.transaction(durable=True) as db:
            db.execute("DELETE FROM qa_findings WHERE job_id = ? AND task_no = ?", (job_id, task_no))
            db.executemany("INSERT INTO qa_findings (job_id, task_no, structure, qa_check, outcome, value, reason) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(job_id, task_no, r.structure, r.check, r.outcome, r.value, r.reason) for r in records])

    def of_job(self, job_id: str) -> list[QaRecord]:
        """Every check recorded for *job_id*, by series, in the order they were made."""
        with self._jobs.reading() as db:
            rows = db.execute("SELECT * FROM qa_findings WHERE job_id = ? ORDER BY task_no, rowid",
                              (job_id,)).fetchall()
        return [QaRecord(row["task_no"], row["structure"], row["qa_check"], row["outcome"], row["value"],
                         row["reason"]) for row in rows]
