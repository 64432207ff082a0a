"""The stages that see identity: pseudonymisation (with routing) and re-identification.

With the rest of :mod:`gateway.identity`, the only code that reaches the vault. The stages in
between (:mod:`gateway.inference`, :mod:`gateway.rt`) see pseudonymised data only.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pydicom
import structlog

from gateway.failpoints import failpoint
from gateway.identity.prepare import PreparedJob, prepare_instance
from gateway.identity.pseudonymise import DEFAULT_UNWANTED_IMAGE_TYPES, ReidentificationRecord
from gateway.identity.reidentify import encode_reidentified, reidentify
from gateway.identity.vault import Vault
from gateway.routes import Route
from gateway.store.jobs import JobState
from gateway.store.outputs import StageContext, load_outputs, save_outputs, save_work
from gateway.store.tasks import NewTask

__all__ = ["PseudonymisedJob", "StageContext", "pseudonymise_job", "reidentify_task"]

log = structlog.get_logger(__name__)

@dataclass(frozen=True)
class PseudonymisedJob:
    """Outcome of :func:`pseudonymise_job` (counts and reason codes only, no patient data)."""

    job_id: str
    instances: int
    quarantined: dict[str, int]  # reason code -> instances
    series: int
    duration_ms: int
    state: JobState
    reason: str | None = None  # why the job failed
    prepared: int = 0  # instances read and pseudonymised ahead, while the study arrived


@dataclass
class _SeriesFiles:
    route: Route | None
    reason: str | None
    identity: bytes
    files: list[str] = field(default_factory=list)


def _quarantine(ctx: StageContext, job_id: str, file_id: str, reason: str, counts: dict[str, int]) -> None:
    ctx.jobs.quarantine(job_id, file_id, reason, time.time())
    log.warning("instance_quarantined", job_id=job_id, reason=reason)
    counts[reason] = counts.get(reason, 0) + 1


def pseudonymise_job(ctx: StageContext, job_id: str, routes: Sequence[Route] = (), *,
                     unwanted_image_types: Iterable[str] = DEFAULT_UNWANTED_IMAGE_TYPES,
                     prepared: PreparedJob | None = None) -> PseudonymisedJob:
    """Pseudonymise every received instance of *job_id* into ``work/``, one task per series.

    Each series is routed on its original attributes (the first route that takes it); instances
    that must not be processed are quarantined (recorded with a reason, never pseudonymised).
    The vault entry, with the identity of each series taken from that series' own instances, is
    stored before the tasks are committed. The job fails, and nothing of it is processed, with
    ``identity_conflict`` when its instances disagree on the patient (one Study Instance UID, two
    patients), or ``all_instances_quarantined`` when nothing is left. What was *prepared* ahead
    (:class:`~gateway.identity.prepare.Preparer`, with the same *routes* and *unwanted_image_types*) is used
    as long as every instance it holds is still one of the job's.
    """
    started = time.monotonic()
    ctx.spool.remove_work(job_id)  # a stage interrupted by a crash (or a reopened job) is redone from the start
    ctx.spool.remove_results(job_id)
    ctx.tasks.start_over(job_id)
    files = sorted(ctx.jobs.instance_files(job_id))
    if prepared is not None and not prepared.files.keys() <= set(files):
        prepared = None  # an instance was replaced since: afresh, so the vault holds no UID of the old one
    ahead = prepared or PreparedJob()
    series: dict[str, _SeriesFiles] = {}
    quarantined: dict[str, int] = {}
    patients: set[tuple[bytes, ...]] = set()
    for file_id in files:
        item = ahead.files.get(file_id) or prepare_instance(ctx, job_id, file_id, ahead.uids, ahead.pseudonym,
                                                             routes, unwanted_image_types)
        patients.add(item.patient)  # quarantined instances too: the study is suspect either way
        if item.quarantine is not None:
            _quarantine(ctx, job_id, file_id, item.quarantine, quarantined)
            continue
        if item.series_uid not in series:
            series[item.series_uid] = _SeriesFiles(item.route, item.route_reason, item.identity)
            if item.route is None:
                log.info("series_not_routed", job_id=job_id, series=len(series), reason=item.route_reason)
        if item.encoded is None:
            _quarantine(ctx, job_id, file_id, "undecodable_pixel_data", quarantined)
            continue
        series[item.series_uid].files.append(save_work(ctx, job_id, item.encoded))
    duration_ms = int((time.monotonic() - started) * 1000)
    written = sum(len(group.files) for group in series.values())
    failure = "identity_conflict" if len(patients) > 1 else "all_instances_quarantined" if not series else None
    if failure is not None:
        ctx.spool.remove_work(job_id)  # nothing of a failed job may be processed
        moved = ctx.jobs.set_state(job_id, JobState.FAILED, reason=failure, only_from=JobState.COMPLETE)
        state = JobState.FAILED if moved else ctx.jobs.get(job_id).state
        return PseudonymisedJob(job_id, 0, quarantined, len(series), duration_ms, state, failure)
    identities = {number: group.identity for number, group in enumerate(series.values(), start=1)}
    Vault(ctx.spool, ctx.sealer).store(job_id, ReidentificationRecord(ahead.uids.reverse(), identities,
                                                                      ahead.pseudonym))
    tasks = [NewTask(group.route.name if group.route else None, group.files, group.reason)
             for group in series.values()]
    failpoint("after:pseudonymise")
    state = ctx.tasks.create(job_id, tasks, duration_ms=duration_ms, now=time.time())
    return PseudonymisedJob(job_id, written, quarantined, len(series), duration_ms, state,
                            prepared=len(prepared.files) if prepared is not None else 0)


def reidentify_task(ctx: StageContext, job_id: str, task_no: int) -> int:
    """Re-identify the task's results into its outbox (sealed Part 10 files); return how many.

    The outbox is what is sent, so every retry and every restart sends the same instances
    (same SOP Instance UIDs). Raises :class:`~gateway.errors.ReidentificationError` if a
    pseudo UID would survive.
    """
    record = Vault(ctx.spool, ctx.sealer).load(job_id)
    results = [encode_reidentified(reidentify(pydicom.dcmread(io.BytesIO(raw)), record, task_no))
               for raw in load_outputs(ctx, job_id, task_no, "pseudo")]
    save_outputs(ctx, job_id, task_no, "out", results)
    return len(results)
