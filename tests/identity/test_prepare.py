"""Pseudonymisation ahead of time: what the stage makes of a prepared study is what it makes alone.

The canary study (every Table E.1-1 attribute, four instances to quarantine) as a real node received it; the
preparer runs here in the test's process on the node's data folder, as the runner's preparer thread would.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3

import pydicom
import pytest
from pydicom.dataset import Dataset
from structlog.testing import capture_logs

from gateway.identity.prepare import Preparer
from gateway.identity.pseudonymise import ReidentificationRecord
from gateway.identity.stages import PseudonymisedJob, pseudonymise_job
from gateway.identity.vault import Vault
from gateway.store.outputs import StageContext
from gateway.store.sealing import Purpose
from tests.identity.canary import CANARY_ROOT, CT_ROUTE, CanaryStudy, Received

_UNLIMITED = 2**40


def _outcome(ctx: StageContext, job_id: str) -> tuple[list[tuple[str, ...]], dict[str, str], ReidentificationRecord]:
    """What the stage left: each pseudonymised instance with its pseudo UIDs put back (pixel digest and the
    attributes that are not UIDs or the pseudonym), the quarantine reasons, and the vault record."""
    record = Vault(ctx.spool, ctx.sealer).load(job_id)
    instances = []
    for file_id in ctx.spool.work_file_ids(job_id):
        ds = pydicom.dcmread(io.BytesIO(ctx.sealer.open(job_id, Purpose.PSEUDONYMISED,
                                                        ctx.spool.read_work(job_id, file_id))))
        instances.append(_fingerprint(ds, record))
    quarantined = sorted(ctx.jobs.quarantined(job_id).values())
    return sorted(instances), {str(n): r for n, r in enumerate(quarantined)}, record


def _fingerprint(ds: Dataset, record: ReidentificationRecord) -> tuple[str, ...]:
    uids = [record.uids[str(ds[k].value)] for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                    "FrameOfReferenceUID")]
    assert str(ds.PatientID) == str(ds.PatientName) == record.pseudonym
    kept = [f"{element.keyword}={element.value}" for element in ds if element.VR not in ("UI", "SQ", "OB", "OW")
            and element.keyword not in ("PatientName", "PatientID")]
    return (*uids, hashlib.sha256(ds.PixelData).hexdigest(), *kept)


def _stage(received: Received, preparer: Preparer | None) -> PseudonymisedJob:
    prepared = preparer.take(received.job_id) if preparer is not None else None
    return pseudonymise_job(received.ctx, received.job_id, [CT_ROUTE], prepared=prepared)


def test_a_prepared_study_comes_out_as_the_stage_makes_it_alone(received: Received,
                                                                canary_study: CanaryStudy) -> None:
    preparer = Preparer(received.ctx, [CT_ROUTE], _UNLIMITED)
    assert preparer.step([received.job_id]) == len(canary_study.files)
    assert preparer.step([received.job_id]) == 0  # nothing new arrived
    assert preparer.size > 0
    ahead = _stage(received, preparer)
    assert preparer.size == 0
    with_preparation = _outcome(received.ctx, received.job_id)

    alone = _stage(received, None)  # the same job again from the received data: fresh UIDs, same content
    without = _outcome(received.ctx, received.job_id)
    assert (ahead.prepared, alone.prepared) == (len(canary_study.files), 0)
    assert (ahead.instances, ahead.quarantined, ahead.state) == (alone.instances, alone.quarantined, alone.state)
    assert with_preparation[:2] == without[:2]
    assert with_preparation[2].identities == without[2].identities  # byte for byte, per series
    assert sorted(with_preparation[2].uids.values()) == sorted(without[2].uids.values())  # same originals
    assert not set(with_preparation[2].uids) & set(without[2].uids)  # random pseudo UIDs each time
    assert len(with_preparation[0]) == len(canary_study.originals)


def test_a_replaced_instance_discards_the_preparation(received: Received) -> None:
    preparer = Preparer(received.ctx, [CT_ROUTE], _UNLIMITED)
    preparer.step([received.job_id])
    prepared = preparer.take(received.job_id)
    assert prepared is not None
    # as if one prepared instance had been replaced by a corrected re-send: its file is no longer the job's
    gone_uid = f"{CANARY_ROOT}.999"
    prepared.uids.pseudo(gone_uid)
    prepared.files["0" * 38] = next(iter(prepared.files.values()))
    with capture_logs():
        result = pseudonymise_job(received.ctx, received.job_id, [CT_ROUTE], prepared=prepared)
    assert result.prepared == 0
    record = Vault(received.ctx.spool, received.ctx.sealer).load(received.job_id)
    assert gone_uid not in record.uids.values()  # the vault holds only UIDs of the study as it is
    assert record.pseudonym != prepared.pseudonym
    assert len(received.ctx.spool.work_file_ids(received.job_id)) == result.instances > 0


def test_memory_bound_leaves_the_rest_to_the_stage(received: Received, canary_study: CanaryStudy) -> None:
    preparer = Preparer(received.ctx, [CT_ROUTE], 1)  # full after the first pseudonymised instance
    prepared = preparer.step([received.job_id])
    assert 1 <= prepared < len(canary_study.files)
    assert preparer.step([received.job_id]) == 0
    result = _stage(received, preparer)
    assert result.prepared == prepared
    assert result.instances == len(canary_study.originals)
    assert sorted(received.ctx.jobs.quarantined(received.job_id).values()) == sorted(canary_study.quarantined.values())


def test_jobs_no_longer_waiting_are_forgotten_and_taken_ones_left_alone(received: Received) -> None:
    preparer = Preparer(received.ctx, [CT_ROUTE], _UNLIMITED)
    assert preparer.step([received.job_id], busy=lambda: True) == 0  # a burst is arriving: nothing now
    assert preparer.step([received.job_id]) > 0
    assert preparer.step([]) == 0 and preparer.size == 0  # shredded or failed meanwhile: memory given back
    assert preparer.step([received.job_id]) > 0  # waiting again: prepared again
    assert preparer.take(received.job_id) is not None
    assert preparer.step([received.job_id]) == 0 and preparer.size == 0  # its stage has it
    preparer.step([])  # it left the waiting jobs (pseudonymised) ...
    assert preparer.step([received.job_id]) > 0  # ... and came back (a corrected re-send reopened it)
    preparer.close()
    assert preparer.size == 0 and preparer.step([received.job_id]) == 0


def test_an_unreadable_instance_leaves_the_study_to_the_stage(received: Received) -> None:
    ctx = received.ctx
    file_id = sorted(ctx.jobs.instance_files(received.job_id))[2]
    sealed = ctx.spool.read_instance(received.job_id, file_id)
    segment = ctx.spool.root / received.job_id / f"{file_id[:16]}.seg"
    content = bytearray(segment.read_bytes())
    at = content.find(sealed)
    assert at >= 0
    content[at + len(sealed) - 40] ^= 0xFF  # one byte of ciphertext: its authentication fails
    segment.write_bytes(bytes(content))
    preparer = Preparer(ctx, [CT_ROUTE], _UNLIMITED)
    with capture_logs() as logs:
        assert preparer.step([received.job_id]) == 2  # the two before it
    assert [(e["job_id"], e["log_level"]) for e in logs if e["event"] == "prepare_skipped"] == [
        (received.job_id, "warning")]
    assert preparer.size == 0 and preparer.take(received.job_id) is None
    assert preparer.step([received.job_id]) == 0  # left to the stage, which says what is wrong


def test_a_database_error_ends_the_step_without_leaving_the_study(received: Received,
                                                                  canary_study: CanaryStudy,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    preparer = Preparer(received.ctx, [CT_ROUTE], _UNLIMITED)

    def locked(job_id: str) -> dict[str, str]:
        raise sqlite3.OperationalError("database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(received.ctx.jobs, "instance_files", locked)
        with pytest.raises(sqlite3.OperationalError):
            preparer.step([received.job_id])  # the runner logs prepare_failed and steps again later
    assert preparer.step([received.job_id]) == len(canary_study.files)  # not a bad study: prepared as usual
