"""The task table: how a job's state follows its series, and what the dispatcher finds runnable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import JobNotFoundError
from gateway.store.jobs import JobState, JobStore
from gateway.store.qa_records import QaRecord, QaRecords
from gateway.store.tasks import DeliveryState, NewTask, TaskStore

NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[JobStore, TaskStore]]:
    jobs = JobStore(tmp_path / "gateway.db")
    yield jobs, TaskStore(jobs)
    jobs.close()


def _job(jobs: JobStore, tasks: TaskStore, *routes: str | None) -> str:
    job_id = jobs.reserve("a" * 64 + str(len(jobs.jobs())), "pacs", 1.0, NOW).job_id
    jobs.force_complete(job_id, NOW)
    tasks.create(job_id, [NewTask(route, [f"{i:032x}"], None if route else "no_route")
                          for i, route in enumerate(routes)], duration_ms=5, now=NOW)
    return job_id


@pytest.mark.parametrize(("finals", "expected"), [
    ([JobState.SENT, JobState.NO_ROUTE], JobState.SENT),
    ([JobState.SENT, JobState.FAILED], JobState.FAILED),
    ([JobState.FAILED, JobState.DEAD_LETTER], JobState.DEAD_LETTER),
    ([JobState.NO_ROUTE, JobState.NO_ROUTE], JobState.NO_ROUTE),
])
def test_the_job_outcome_follows_its_series(store: tuple[JobStore, TaskStore], finals: list[JobState],
                                            expected: JobState) -> None:
    jobs, tasks = store
    job_id = _job(jobs, tasks, "a", "b")
    for task_no, state in enumerate(finals, start=1):
        tasks.advance(job_id, task_no, state, stage=None, duration_ms=0, now=NOW,
                      reason=None if state is JobState.SENT else f"code{task_no}")
    job = jobs.get(job_id)
    assert job.state is expected
    assert job.reason == "; ".join(f"series {n}: code{n}" for n, s in enumerate(finals, 1) if s is not JobState.SENT)


def test_a_running_job_shows_its_least_advanced_series(store: tuple[JobStore, TaskStore]) -> None:
    jobs, tasks = store
    job_id = _job(jobs, tasks, "a", "b", None)
    assert jobs.get(job_id).state is JobState.PSEUDONYMISED
    tasks.advance(job_id, 1, JobState.STRUCTURED, stage="structure", duration_ms=7, now=NOW)
    tasks.advance(job_id, 2, JobState.INFERRED, stage="infer", duration_ms=9, now=NOW + 1)
    assert jobs.get(job_id).state is JobState.INFERRED
    assert [(t.task_no, t.stage, t.duration_ms) for t in tasks.stage_times(job_id)] == [
        (0, "pseudonymise", 5), (1, "structure", 7), (2, "infer", 9)]


def test_runnable_jobs_and_due_deliveries(store: tuple[JobStore, TaskStore]) -> None:
    jobs, tasks = store
    receiving = jobs.reserve("b" * 64, "pacs", 1.0, NOW).job_id
    complete = jobs.reserve("c" * 64, "pacs", 1.0, NOW).job_id
    jobs.force_complete(complete, NOW)
    sending = _job(jobs, tasks, "a")
    assert set(tasks.runnable(NOW)) == {complete, sending}
    tasks.advance(sending, 1, JobState.REIDENTIFIED, stage="reidentify", duration_ms=1, now=NOW,
                  deliveries=[(0, "tps"), (0, "folder")])
    [tps] = [d for d in tasks.deliveries(sending, 1) if d.destination == "tps"]
    tasks.record_attempt(sending, tps, DeliveryState.PENDING, next_attempt_at=NOW + 60, reason="refused")
    assert sending in tasks.runnable(NOW)  # the folder delivery is still due
    [folder] = [d for d in tasks.deliveries(sending, 1) if d.destination == "folder"]
    tasks.record_attempt(sending, folder, DeliveryState.SENT, next_attempt_at=NOW)
    assert sending not in tasks.runnable(NOW + 59)  # only the retry is left, not due yet
    assert sending in tasks.runnable(NOW + 60)
    [tps] = [d for d in tasks.deliveries(sending, 1) if d.destination == "tps"]
    assert (tps.attempts, tps.reason, tps.state) == (1, "refused", DeliveryState.PENDING)
    assert receiving not in tasks.runnable(NOW + 60)


def test_a_delivery_written_as_reidentified_by_version_7_opens_as_pending(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "gateway.db")
    tasks = TaskStore(jobs)
    job_id = _job(jobs, tasks, "a")
    tasks.advance(job_id, 1, JobState.REIDENTIFIED, stage="reidentify", duration_ms=1, now=NOW,
                  deliveries=[(0, "tps")])
    with jobs.transaction() as db:  # as schema version 7 wrote it
        db.execute("UPDATE deliveries SET state = 'reidentified'")
    jobs.close()
    reopened = JobStore(tmp_path / "gateway.db")
    [delivery] = TaskStore(reopened).deliveries(job_id, 1)
    assert delivery.state is DeliveryState.PENDING and job_id in TaskStore(reopened).runnable(NOW)


def test_start_over_forgets_the_tasks(store: tuple[JobStore, TaskStore]) -> None:
    jobs, tasks = store
    job_id = _job(jobs, tasks, "a")
    tasks.start_over(job_id)
    assert tasks.tasks(job_id) == [] and tasks.files(job_id, 1) == [] and tasks.stage_times(job_id) == []


def test_a_held_series_waits_for_release_and_keeps_its_qa_record(store: tuple[JobStore, TaskStore]) -> None:
    jobs, tasks = store
    job_id = _job(jobs, tasks, "a", "b")
    records = QaRecords(jobs)
    records.replace(job_id, 1, [QaRecord(1, "Lung_L", "volume", "fail", 3.5, "volume_too_small"),
                                QaRecord(1, "Lung_L", "laterality", "pass", 71.2, None)])
    tasks.advance(job_id, 1, JobState.HELD, stage="structure", duration_ms=7, now=NOW, reason="qa_failed")
    tasks.advance(job_id, 2, JobState.SENT, stage="send", duration_ms=7, now=NOW)
    job = jobs.get(job_id)
    assert (job.state, job.reason, job.finished_at) == (JobState.HELD, "series 1: qa_failed", None)
    assert job_id not in tasks.runnable(NOW + 3600)  # nothing happens to a held series on its own

    assert tasks.release(job_id, NOW + 60) == [1]
    first = tasks.tasks(job_id)[0]
    assert (first.state, first.reason) == (JobState.STRUCTURED, None)
    assert jobs.get(job_id).state is JobState.STRUCTURED
    assert job_id in tasks.runnable(NOW + 60)
    assert tasks.release(job_id, NOW + 61) == []  # released once
    # The structure stage run again (a crash before its commit) replaces its record rather than adding to it.
    records.replace(job_id, 1, [QaRecord(1, "Lung_L", "volume", "pass", 900.0, None)])
    assert records.of_job(job_id) == [QaRecord(1, "Lung_L", "volume", "pass", 900.0, None)]
    tasks.start_over(job_id)  # a corrected re-send: everything derived from the old instances goes
    assert records.of_job(job_id) == []
    with pytest.raises(JobNotFoundError):
        tasks.release("0" * 16, NOW)


def test_a_held_series_holds_the_structured_series_of_its_study(store: tuple[JobStore, TaskStore]) -> None:
    jobs, tasks = store
    job_id = _job(jobs, tasks, "a", "b", "c")
    tasks.advance(job_id, 1, JobState.STRUCTURED, stage="structure", duration_ms=7, now=NOW)
    assert tasks.hold_study(job_id, NOW) == []  # nothing held: the structured series goes on
    assert tasks.tasks(job_id)[0].state is JobState.STRUCTURED
    tasks.advance(job_id, 2, JobState.HELD, stage="structure", duration_ms=7, now=NOW, reason="qa_failed")
    tasks.advance(job_id, 3, JobState.FAILED, stage=None, duration_ms=0, now=NOW, reason="too_few_slices")
    assert tasks.hold_study(job_id, NOW) == [1]
    assert [(t.state, t.reason) for t in tasks.tasks(job_id)] == [
        (JobState.HELD, "study_held"), (JobState.HELD, "qa_failed"), (JobState.FAILED, "too_few_slices")]
    job = jobs.get(job_id)
    assert job.state is JobState.HELD
    assert job.reason == "series 1: study_held; series 2: qa_failed; series 3: too_few_slices"
    assert job_id not in tasks.runnable(NOW + 3600)
    assert tasks.release(job_id, NOW + 60) == [1, 2]  # released as one study
    assert [t.state for t in tasks.tasks(job_id)] == [JobState.STRUCTURED, JobState.STRUCTURED, JobState.FAILED]
    assert tasks.hold_study(job_id, NOW + 61) == []
