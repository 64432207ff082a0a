"""A human's look at contour QA: the per-series record (``python -m gateway qa``) and ``python -m gateway release``.

Both print structure names, check and reason codes and figures only; a release is written to the audit trail
with the operating-system account that made it, so who let a held study go to the TPS is on record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from gateway.ops.audit import AuditLog
from gateway.store.jobs import JobStore
from gateway.store.qa_records import QaRecord, QaRecords
from gateway.store.tasks import TaskStore

__all__ = ["qa_lines", "qa_summary", "release_held"]


def qa_lines(jobs: JobStore, job_id: str) -> Iterator[str]:
    """The QA record of every series of *job_id*: one line per check, flagged ones marked."""
    jobs.get(job_id)  # raises JobNotFoundError
    records = QaRecords(jobs).of_job(job_id)
    if not records:
        yield f"job {job_id}: no QA record (not structured yet, or shredded)"
        return
    states = {task.task_no: task for task in TaskStore(jobs).tasks(job_id)}
    for task_no in dict.fromkeys(r.task_no for r in records):
        task = states.get(task_no)
        state = "-" if task is None else task.state.value + (f" ({task.reason})" if task.reason else "")
        of_series = [r for r in records if r.task_no == task_no]
        yield f"job {job_id} series {task_no}: {state}; {qa_summary(of_series)}"
        yield f"  {'STRUCTURE':<18}{'CHECK':<26}{'OUTCOME':<9}{'VALUE':>10}  REASON"
        for record in of_series:
            mark = "" if record.outcome == "pass" else "  <--"
            yield (f"  {record.structure:<18}{record.check:<26}{record.outcome:<9}{record.value:>10g}  "
                   f"{record.reason or ''}{mark}")


def qa_summary(records: Sequence[QaRecord]) -> str:
    """``14 checks: 1 fail, 2 warn (Lung_L laterality_swapped, ...)``."""
    outcomes = Counter(r.outcome for r in records)
    flagged = [f"{r.structure} {r.reason}" for r in records if r.outcome != "pass"]
    text = f"{len(records)} checks: {outcomes['fail']} fail, {outcomes['warn']} warn"
    return text + (f" ({', '.join(flagged)})" if flagged else "")


def release_held(jobs: JobStore, job_id: str, audit: AuditLog, now: float, by: str) -> list[int]:
    """Let the series of *job_id* that contour QA held go on to be sent; audited with the account *by*."""
    released = TaskStore(jobs).release(job_id, now)
    if released:
        audit.append("qa_released", now, job_id=job_id, study=jobs.get(job_id).study, series=released, by=by)
    return released
