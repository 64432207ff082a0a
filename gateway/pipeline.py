"""The stages a completed job goes through, each committed before the next starts.

This issue brings the first: pseudonymisation. Later stages (volume, inference, RTSTRUCT,
re-identification, sending) join it here.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pydicom
import structlog

from gateway.crypt import Purpose, Sealer
from gateway.jobs import JobState, JobStore
from gateway.pseudonymise import (
    DEFAULT_UNWANTED_IMAGE_TYPES,
    ReidentificationRecord,
    UIDMap,
    encode,
    identity_of,
    new_pseudonym,
    pseudonymise,
    quarantine_reason,
)
from gateway.spool import Spool
from gateway.vault import Vault

__all__ = ["PseudonymisedJob", "StageContext", "pseudonymise_job"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StageContext:
    """What every stage works with."""

    spool: Spool
    jobs: JobStore
    sealer: Sealer

    @property
    def vault(self) -> Vault:
        """The re-identification vault (for the stages that may use it)."""
        return Vault(self.spool, self.sealer)


@dataclass(frozen=True)
class PseudonymisedJob:
    """Outcome of :func:`pseudonymise_job` (counts only, no patient data)."""

    job_id: str
    instances: int
    quarantined: int
    duration_ms: int


def pseudonymise_job(ctx: StageContext, job_id: str, *,
                     unwanted_image_types: Iterable[str] = DEFAULT_UNWANTED_IMAGE_TYPES) -> PseudonymisedJob:
    """Pseudonymise every received instance of *job_id* into ``work/``; store the vault entry.

    Instances that must not be processed are quarantined (recorded with a reason, never
    pseudonymised). If nothing is left, the job fails with ``all_instances_quarantined``.
    """
    started = time.monotonic()
    ctx.spool.remove_work(job_id)  # a stage interrupted by a crash is redone from the start
    uids, pseudonym = UIDMap(), new_pseudonym()
    identity: bytes | None = None
    written = quarantined = 0
    for file_id in sorted(ctx.jobs.instance_files(job_id)):
        plaintext = ctx.sealer.open(job_id, Purpose.RECEIVED, ctx.spool.read_instance(job_id, file_id))
        ds = pydicom.dcmread(io.BytesIO(plaintext))
        reason = quarantine_reason(ds, unwanted_image_types)
        if reason is not None:
            ctx.jobs.quarantine(job_id, file_id, reason, time.time())
            log.warning("instance_quarantined", job_id=job_id, reason=reason)
            quarantined += 1
            continue
        identity = identity or identity_of(ds)
        encoded = encode(pseudonymise(ds, uids, pseudonym))
        ctx.spool.write_work(job_id, ctx.sealer.seal(job_id, Purpose.PSEUDONYMISED, [encoded]))
        written += 1
    if identity is None:
        ctx.jobs.set_state(job_id, JobState.FAILED, reason="all_instances_quarantined")
        log.error("job_failed", job_id=job_id, reason="all_instances_quarantined", quarantined=quarantined)
    else:
        ctx.vault.store(job_id, ReidentificationRecord(uids.reverse(), identity, pseudonym))
        ctx.jobs.set_state(job_id, JobState.PSEUDONYMISED)
    result = PseudonymisedJob(job_id, written, quarantined, int((time.monotonic() - started) * 1000))
    log.info("job_pseudonymised", job_id=job_id, instances=written, quarantined=quarantined,
             duration_ms=result.duration_ms)
    return result
