"""Study assembly with an injected clock: quiet periods, duplicates, reopening, reconciliation, CLI."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from structlog.testing import capture_logs

from gateway.config import Peer
from gateway.encoding import file_meta_bytes
from gateway.errors import JobNotFoundError
from gateway.receiving.assembly import Assembler, IncomingInstance, StoreResult, complete_due, force_complete
from gateway.store.jobs import WRITE_LEASE_SECONDS, JobState, JobStore
from gateway.store.sealing import Purpose
from gateway.store.spool import Spool
from tests.conftest import key_ring, make_ct_series


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Spool, JobStore, Clock, Assembler]:
    spool = Spool(tmp_path / "var")
    spool.prepare()
    jobs = JobStore(spool.database_path)
    clock = Clock()
    yield spool, jobs, clock, Assembler(spool, jobs, key_ring(tmp_path / "keys", bytes(range(32))), clock=clock)
    jobs.close()


PEER = Peer(name="pacs", ae_title="PACS", host="127.0.0.1", quiet_seconds=30)


def _instance(study: str, sop: str, content: bytes = b"") -> IncomingInstance:
    head = file_meta_bytes(CTImageStorage, sop, ExplicitVRLittleEndian, "PACS")
    return IncomingInstance(study, sop, (head, sop.encode() + content))


def test_quiet_period_is_measured_from_the_last_instance(parts: tuple[Spool, JobStore, Clock, Assembler]) -> None:
    _, jobs, clock, assembler = parts
    assert assembler.accept(_instance("1.2.3", "1.2.3.1"), PEER) is StoreResult.STORED
    clock.now += 25
    assert assembler.accept(_instance("1.2.3", "1.2.3.2"), PEER) is StoreResult.STORED
    clock.now += 29.9
    assert complete_due(jobs, clock()) == []
    clock.now += 0.1
    [done] = complete_due(jobs, clock())
    assert done.instance_count == 2
    assert jobs.get(done.job_id).state is JobState.COMPLETE


def test_duplicates_are_stored_once(parts: tuple[Spool, JobStore, Clock, Assembler]) -> None:
    spool, jobs, _, assembler = parts
    assert assembler.accept(_instance("1.2.3", "1.2.3.1"), PEER) is StoreResult.STORED
    assert assembler.accept(_instance("1.2.3", "1.2.3.1"), PEER) is StoreResult.DUPLICATE
    [job] = jobs.jobs()
    assert job.instance_count == 1
    assert len(spool.file_ids(job.job_id)) == 1


def test_a_different_copy_replaces_the_held_one(parts: tuple[Spool, JobStore, Clock, Assembler]) -> None:
    spool, jobs, _, assembler = parts
    assert assembler.accept(_instance("1.2.3", "1.2.3.1", b"WRONG NAME"), PEER) is StoreResult.STORED
    [first] = spool.file_ids(jobs.jobs()[0].job_id)
    with capture_logs() as logs:
        assert assembler.accept(_instance("1.2.3", "1.2.3.1", b"RIGHT NAME"), PEER) is StoreResult.REPLACED
        assert assembler.accept(_instance("1.2.3", "1.2.3.1", b"RIGHT NAME"), PEER) is StoreResult.DUPLICATE
    [job] = jobs.jobs()
    [kept] = spool.file_ids(job.job_id)
    assert job.instance_count == 1 and kept != first
    assert assembler.sealer.open(job.job_id, Purpose.RECEIVED, spool.read_instance(job.job_id, kept)).endswith(
        b"RIGHT NAME")
    assert [e["event"] for e in logs if e["event"].startswith("instance_")] == ["instance_replaced",
                                                                                 "instance_duplicate"]


def test_a_corrected_copy_after_completion_reopens_the_job(parts: tuple[Spool, JobStore, Clock, Assembler]) -> None:
    spool, jobs, clock, assembler = parts
    assembler.accept(_instance("1.2.3", "1.2.3.1", b"WRONG NAME"), PEER)
    assembler.accept(_instance("1.2.3", "1.2.3.2", b"WRONG NAME"), PEER)
    clock.now += 31
    [done] = complete_due(jobs, clock())
    assert assembler.accept(_instance("1.2.3", "1.2.3.1", b"WRONG NAME"), PEER) is StoreResult.STORED  # same: new job
    assert len(jobs.jobs()) == 2
    clock.now += 31
    complete_due(jobs, clock())
    with capture_logs() as logs:
        assert assembler.accept(_instance("1.2.3", "1.2.3.2", b"RIGHT NAME"), PEER) is StoreResult.REPLACED
    [reopened] = [e for e in logs if e["event"] == "job_reopened"]
    assert (reopened["job_id"], reopened["reason"]) == (done.job_id, "instance_corrected")
    job = jobs.get(done.job_id)
    assert (job.state, job.completed_at, job.instance_count) == (JobState.RECEIVING, None, 2)
    assert len(spool.file_ids(done.job_id)) == 2


def test_a_write_in_flight_holds_completion_back(parts: tuple[Spool, JobStore, Clock, Assembler]) -> None:
    _, jobs, clock, _ = parts
    slow = jobs.reserve("s" * 64, "pacs", 30.0, clock()).job_id
    dead = jobs.reserve("d" * 64, "pacs", 30.0, clock()).job_id  # its receiver dies mid-write
    clock.now += 60  # the quiet period has passed while both writes go on
    assert complete_due(jobs, clock()) == []
    jobs.release(slow)
    assert [job.job_id for job in complete_due(jobs, clock())] == [slow]
    clock.now += WRITE_LEASE_SECONDS
    assert [job.job_id for job in complete_due(jobs, clock())] == [dead]


def test_two_studies_make_two_jobs_and_hold_no_uid(parts: tuple[Spool, JobStore, Clock, Assembler]) -> None:
    spool, jobs, _, assembler = parts
    assembler.accept(_instance("1.2.3", "1.2.3.1"), PEER)
    assembler.accept(_instance("1.2.4", "1.2.4.1"), PEER)
    assert len(jobs.jobs()) == 2
    raw = spool.database_path.read_bytes() + Path(f"{spool.database_path}-wal").read_bytes()
    assert b"1.2.3" not in raw and b"1.2.4" not in raw


def test_instances_after_completion_open_a_new_job(parts: tuple[Spool, JobStore, Clock, Assembler]) -> None:
    _, jobs, clock, assembler = parts
    assembler.accept(_instance("1.2.3", "1.2.3.1"), PEER)
    clock.now += 31
    [first] = complete_due(jobs, clock())
    with capture_logs() as logs:
        assembler.accept(_instance("1.2.3", "1.2.3.2"), PEER)
    reopened = [e for e in logs if e["event"] == "study_received_after_completion"]
    assert reopened and reopened[0]["previous_job_id"] == first.job_id
    assert [j.state for j in jobs.jobs()] == [JobState.COMPLETE, JobState.RECEIVING]


def test_force_complete(parts: tuple[Spool, JobStore, Clock, Assembler]) -> None:
    _, jobs, clock, assembler = parts
    assembler.accept(_instance("1.2.3", "1.2.3.1"), PEER)
    [job] = jobs.jobs()
    assert force_complete(jobs, job.job_id, clock()).state is JobState.COMPLETE
    with pytest.raises(JobNotFoundError):
        force_complete(jobs, "ffffffffffffffff", clock())


def test_reconcile_registers_orphans_and_forgets_missing_files(
        parts: tuple[Spool, JobStore, Clock, Assembler], tmp_path: Path) -> None:
    spool, jobs, _, assembler = parts
    series = make_ct_series(tmp_path / "ct", 3, size=16)
    for path, uid in zip(series.files, series.sop_uids, strict=True):
        assembler.accept(IncomingInstance(series.study_uid, uid, (path.read_bytes(),)), PEER)
    [job] = jobs.jobs()
    files = spool.file_ids(job.job_id)
    # A crash after the flush but before the row was written: the record exists, the row does not.
    with sqlite3.connect(spool.database_path) as db:
        db.execute("DELETE FROM instances WHERE file_id = ?", (files[0],))
    # And a row whose record vanished.
    spool.remove_instance(job.job_id, files[1])
    (spool.root / job.job_id / ".0123456789abcdef0123456789abcdef.tmp").write_bytes(b"partial")
    assembler.reconcile()
    assert set(jobs.instance_files(job.job_id)) == {files[0], files[2]}
    assert sorted(spool.file_ids(job.job_id)) == sorted([files[0], files[2]])
    assert not list((spool.root / job.job_id).glob(".*.tmp"))
