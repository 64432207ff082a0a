"""``python -m gateway status``: every job, its series, stage times and deliveries, without patient data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from gateway.ops.review import qa_summary
from gateway.store.jobs import Job, JobStore
from gateway.store.qa_records import QaRecords
from gateway.store.tasks import JOB_STAGE, TaskStore

__all__ = ["status_lines"]

_HEADER = f"{'JOB ID':<18}{'STATE':<14}{'INSTANCES':>10}{'AGE S':>10}  {'PEER':<16}REASON"


def status_lines(jobs: JobStore, now: float) -> Iterator[str]:
    """The status table: one line per job, then one per series with its stage times and deliveries."""
    tasks = TaskStore(jobs)
    yield _HEADER
    for job in jobs.jobs():
        yield _job_line(job, now)
        reasons = Counter(jobs.quarantined(job.job_id).values())
        if reasons:
            yield "    quarantined: " + ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
        times = tasks.stage_times(job.job_id)
        job_stages = [t for t in times if t.task_no == JOB_STAGE]
        if job_stages:
            yield "    " + "  ".join(f"{t.stage} {t.duration_ms} ms" for t in job_stages)
        qa = QaRecords(jobs).of_job(job.job_id)
        for task in tasks.tasks(job.job_id):
            stages = "  ".join(f"{t.stage} {t.duration_ms} ms" for t in times if t.task_no == task.task_no)
            yield (f"  series {task.task_no}: {task.state.value}, {task.instance_count} instances, "
                   f"route {task.route or '-'}" + (f"; {stages}" if stages else "")
                   + (f"; {task.reason}" if task.reason else ""))
            checks = [record for record in qa if record.task_no == task.task_no]
            if checks:
                yield f"    qa: {qa_summary(checks)}"
            for delivery in tasks.deliveries(job.job_id, task.task_no):
                state = "pending" if not delivery.state.terminal else delivery.state.value
                yield (f"    result {delivery.item} -> {delivery.destination}: {state} after "
                       f"{delivery.attempts} attempt(s)" + (f" ({delivery.reason})" if delivery.reason else ""))


def _job_line(job: Job, now: float) -> str:
    return (f"{job.job_id:<18}{job.state.value:<14}{job.instance_count:>10}{now - job.created_at:>10.0f}  "
            f"{job.peer:<16}{job.reason or ''}")
