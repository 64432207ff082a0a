"""Study assembly: received instances grouped into one job per study, complete after a quiet period.

A study is complete when no instance of it arrived for the sending peer's
``quiet_seconds``, counted from the end of the last instance's durable write, across any
number of associations and in any order; A-RELEASE says nothing about completeness (PS3.4
B.4). Instances that arrive after completion start a new job, except a corrected copy (same
SOP Instance UID, different content) of an instance the study's last job holds: it replaces
that copy and reopens the job, which is then processed again. Studies and instances are
known by keyed hashes (HMAC-SHA-256 with a node secret) of their UIDs, so the job table
holds no UIDs and the hashes cannot be recomputed without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import pydicom
import structlog
from pydicom.errors import InvalidDicomError

from gateway.config import Peer
from gateway.errors import CryptoError
from gateway.failpoints import failpoint
from gateway.store.jobs import Job, JobState, JobStore
from gateway.store.keys import KeyRing
from gateway.store.receptions import RecordOutcome, Reservation
from gateway.store.sealing import Purpose, Sealer
from gateway.store.spool import Spool

__all__ = ["Assembler", "IncomingInstance", "StoreResult", "complete_due", "force_complete"]

log = structlog.get_logger(__name__)


class StoreResult(StrEnum):
    """What happened to an incoming instance."""

    STORED = "stored"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class IncomingInstance:
    """An instance ready to spool: its identifying UIDs and the bytes of the file to write.

    ``parts[0]`` is the File Meta Information the node wrote; the rest is the data set as received.
    """

    study_uid: str
    sop_instance_uid: str
    parts: tuple[bytes | bytearray | memoryview, ...]


class Assembler:
    """Puts received instances into study jobs and closes jobs after their quiet period."""

    def __init__(self, spool: Spool, jobs: JobStore, ring: KeyRing, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._spool = spool
        self._jobs = jobs
        self._clock = clock
        self._secret = ring.master.derive("keyed UID hashes")
        self.sealer = Sealer(ring, jobs)

    def key(self, uid: str) -> str:
        """Keyed hash of a UID: stable within this node, meaningless elsewhere."""
        return hmac.new(self._secret, uid.encode("ascii"), hashlib.sha256).hexdigest()

    def accept(self, instance: IncomingInstance, peer: Peer) -> StoreResult:
        """Store *instance* durably in its study's receiving job.

        A copy of an instance the job holds already is a duplicate when its content is the same,
        and replaces the held copy when it differs (a corrected re-send: the last one wins); a
        corrected copy of an instance of a study already completed reopens that study's job.
        Contents are compared only then: a new instance costs no hashing.

        Raises
        ------
        SpoolError
            When the instance could not be written; nothing of it remains.
        """
        study_key = self.key(instance.study_uid)
        sop_key = self.key(instance.sop_instance_uid)
        for _attempt in range(3):
            reservation = self._reserve(study_key, sop_key, instance, peer)
            job_id, held = reservation.job_id, reservation.held
            if held is not None and not reservation.reopened and not self._differs(job_id, held, instance):
                self._jobs.release(job_id)
                log.debug("instance_duplicate", job_id=job_id)
                return StoreResult.DUPLICATE
            outcome = self._write(job_id, sop_key, held, instance)
            if outcome is RecordOutcome.STORED:
                return StoreResult.STORED
            if outcome is RecordOutcome.REPLACED:
                return StoreResult.REPLACED
            if outcome is RecordOutcome.DUPLICATE:
                log.debug("instance_duplicate", job_id=job_id)
                return StoreResult.DUPLICATE
            # The job was closed while we wrote (forced completion): file it anew.
        raise RuntimeError("job kept closing while an instance was stored")

    def _differs(self, job_id: str, file_id: str, instance: IncomingInstance) -> bool:
        """Whether the data set of *instance* differs from the copy *file_id* of *job_id* holds."""
        try:
            held = self.sealer.open(job_id, Purpose.RECEIVED, self._spool.read_instance(job_id, file_id))
        except (CryptoError, OSError):
            return True  # an unreadable copy is replaced by the one that arrived
        data_set = memoryview(held)[144 + int.from_bytes(held[140:144], "little"):]  # after the file meta
        incoming = instance.parts[1:]
        return data_set != (incoming[0] if len(incoming) == 1 else b"".join(incoming))

    def _write(self, job_id: str, sop_key: str, held: str | None, instance: IncomingInstance) -> RecordOutcome:
        try:
            sealed = self.sealer.seal(job_id, Purpose.RECEIVED, instance.parts)
            file_id, size = self._spool.write_instance(job_id, sealed)
            failpoint("write_instance")
        except BaseException:
            self._jobs.release(job_id)
            raise
        try:
            if held is None:
                outcome = self._jobs.record_instance(job_id, sop_key, file_id, size, self._clock())
            else:
                outcome = self._jobs.replace_instance(job_id, sop_key, held, file_id, size, self._clock())
        except BaseException:
            self._spool.remove_instance(job_id, file_id)  # the sender is told it failed
            raise
        if outcome is RecordOutcome.STORED:
            log.debug("instance_stored", job_id=job_id, bytes=size)
        elif outcome is RecordOutcome.REPLACED and held is not None:
            self._spool.remove_instance(job_id, held)
            log.info("instance_replaced", job_id=job_id, bytes=size)
        else:
            self._spool.remove_instance(job_id, file_id)
            if outcome is RecordOutcome.JOB_CLOSED:
                self._spool.close_segment(job_id)
        return outcome

    def _reserve(self, study_key: str, sop_key: str, instance: IncomingInstance, peer: Peer) -> Reservation:
        reservation = self._jobs.reserve(
            study_key, peer.name, peer.quiet_seconds, self._clock(), sop_key=sop_key,
            differs=lambda job_id, file_id: self._differs(job_id, file_id, instance))
        if reservation.created:
            log.info("job_created", job_id=reservation.job_id, study=study_key[:16], peer=peer.name,
                     previous_job_id=reservation.previous_job_id)
            if reservation.previous_job_id is not None:
                log.info("study_received_after_completion", job_id=reservation.job_id,
                         study=study_key[:16], previous_job_id=reservation.previous_job_id)
        if reservation.reopened:
            log.warning("job_reopened", job_id=reservation.job_id, study=study_key[:16], peer=peer.name,
                        reason="instance_corrected")
        return reservation

    def reconcile(self) -> None:
        """Make the database and the spool agree after a crash or power loss."""
        removed = self._spool.remove_temporaries()
        self._spool.trim_segments()
        self._jobs.forget_writes()  # no receiver runs yet
        known = {job.job_id: job for job in self._jobs.jobs()}
        for job_id in self._spool.job_ids():
            job = known.get(job_id)
            if job is None:
                log.warning("orphan_job_folder", job_id=job_id)
                continue
            self._reconcile_job(job, self._spool.file_ids(job_id))
        log.info("spool_reconciled", temporaries_removed=removed, jobs=len(known))

    def _reconcile_job(self, job: Job, present: Iterable[str]) -> None:
        registered = self._jobs.instance_files(job.job_id)
        present = set(present)
        for file_id in set(registered) - present:
            self._jobs.forget_instance(job.job_id, file_id)
            log.warning("instance_row_without_file", job_id=job.job_id)
        for file_id in present - set(registered):
            sop_uid = self._read_sop_instance_uid(job.job_id, file_id)
            outcome = RecordOutcome.JOB_CLOSED
            if sop_uid is not None and job.state is JobState.RECEIVING:
                size = self._spool.instance_size(job.job_id, file_id)
                outcome = self._jobs.record_instance(job.job_id, self.key(sop_uid), file_id, size, self._clock())
            if outcome is not RecordOutcome.STORED:
                # Never acknowledged to the sender (it was not registered), so it will be re-sent.
                self._spool.remove_instance(job.job_id, file_id)
            log.warning("unregistered_instance_file", job_id=job.job_id, outcome=outcome)


    def _read_sop_instance_uid(self, job_id: str, file_id: str) -> str | None:
        try:
            plaintext = self.sealer.open(job_id, Purpose.RECEIVED, self._spool.read_instance(job_id, file_id))
            ds = pydicom.dcmread(io.BytesIO(plaintext), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            return str(ds.SOPInstanceUID)
        except (CryptoError, InvalidDicomError, AttributeError, OSError, ValueError):
            return None


def complete_due(jobs: JobStore, now: float) -> list[Job]:
    """Close every receiving job whose quiet period has passed at *now*; return them."""
    done = jobs.complete_due(now)
    for job in done:
        log.info("job_complete", job_id=job.job_id, study=job.study, instances=job.instance_count,
                 trigger="quiet_period", receiving_seconds=round(job.last_received_at - job.created_at, 3))
    return done


def force_complete(jobs: JobStore, job_id: str, now: float) -> Job:
    """Close *job_id* now, whatever its quiet period (``python -m gateway complete``)."""
    job = jobs.force_complete(job_id, now)
    log.info("job_complete", job_id=job.job_id, study=job.study, instances=job.instance_count,
             trigger="forced", state=job.state)
    return job
