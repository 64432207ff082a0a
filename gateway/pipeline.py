"""The stages that see identity: pseudonymisation (with routing) and re-identification.

Both are the only code, with :mod:`gateway.reidentify`, that reaches the vault. The stages in
between (:mod:`gateway.processing`) see pseudonymised data only.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue

from gateway.crypt import Purpose
from gateway.failpoints import failpoint
from gateway.jobs import JobState
from gateway.processing import StageContext, load_results, result_name
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
from gateway.reidentify import reidentify
from gateway.routes import Route
from gateway.tasks import NewTask
from gateway.vault import Vault

__all__ = ["PseudonymisedJob", "StageContext", "pseudonymise_job", "reidentify_task", "route_for"]

log = structlog.get_logger(__name__)

NO_ROUTE = "no_route"


@dataclass(frozen=True)
class PseudonymisedJob:
    """Outcome of :func:`pseudonymise_job` (counts only, no patient data)."""

    job_id: str
    instances: int
    quarantined: int
    series: int
    duration_ms: int
    state: JobState


def route_for(ds: Dataset, routes: Sequence[Route]) -> Route | None:
    """The first route whose ``match`` fits the series of *ds* (multi-valued attributes joined by ``\\``)."""
    for route in routes:
        attributes = {}
        for keyword in route.match:
            value = ds.get(keyword)
            if value is not None:
                attributes[keyword] = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
        if route.matches(attributes):
            return route
    return None


@dataclass
class _SeriesFiles:
    route: Route | None
    files: list[str]


def pseudonymise_job(ctx: StageContext, job_id: str, routes: Sequence[Route] = (), *,
                     unwanted_image_types: Iterable[str] = DEFAULT_UNWANTED_IMAGE_TYPES) -> PseudonymisedJob:
    """Pseudonymise every received instance of *job_id* into ``work/``, one task per series.

    Each series is routed on its original attributes (the first matching route); instances
    that must not be processed are quarantined (recorded with a reason, never pseudonymised).
    The vault entry is stored before the tasks are committed. If nothing is left, the job
    fails with ``all_instances_quarantined``.
    """
    started = time.monotonic()
    ctx.spool.remove_work(job_id)  # a stage interrupted by a crash is redone from the start
    ctx.tasks.start_over(job_id)
    uids, pseudonym = UIDMap(), new_pseudonym()
    identity: bytes | None = None
    series: dict[str, _SeriesFiles] = {}
    quarantined = 0
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
        group = series.setdefault(str(ds.get("SeriesInstanceUID", "")), _SeriesFiles(route_for(ds, routes), []))
        encoded = encode(pseudonymise(ds, uids, pseudonym))
        group.files.append(ctx.spool.write_work(job_id, ctx.sealer.seal(job_id, Purpose.PSEUDONYMISED, [encoded])))
    duration_ms = int((time.monotonic() - started) * 1000)
    written = sum(len(group.files) for group in series.values())
    if identity is None:
        state = JobState.FAILED
        ctx.jobs.set_state(job_id, state, reason="all_instances_quarantined")
    else:
        Vault(ctx.spool, ctx.sealer).store(job_id, ReidentificationRecord(uids.reverse(), identity, pseudonym))
        tasks = [NewTask(group.route.name if group.route else None, group.files,
                         None if group.route else NO_ROUTE) for group in series.values()]
        failpoint("after:pseudonymise")
        state = ctx.tasks.create(job_id, tasks, duration_ms=duration_ms, now=time.time())
    return PseudonymisedJob(job_id, written, quarantined, len(series), duration_ms, state)


def reidentify_task(ctx: StageContext, job_id: str, task_no: int) -> int:
    """Re-identify the task's results into its outbox (sealed Part 10 files); return how many.

    The outbox is what is sent, so every retry and every restart sends the same instances
    (same SOP Instance UIDs). Raises :class:`~gateway.errors.ReidentificationError` if a
    pseudo UID would survive.
    """
    record = Vault(ctx.spool, ctx.sealer).load(job_id)
    results = load_results(ctx, job_id, task_no, "pseudo")
    for index, raw in enumerate(results):
        ds = reidentify(pydicom.dcmread(io.BytesIO(raw)), record)
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        ctx.spool.write_result(job_id, result_name(task_no, f"out{index}"),
                               ctx.sealer.seal(job_id, Purpose.RESULT, [buffer.getvalue()]))
    return len(results)
