"""Delivery of a task's outbox: each result to each of its route's destinations, with retries that survive restarts.

Every attempt is counted in the job database before the next one is planned, so a restart
neither forgets a failure nor retries early. The outbox files are sent as they are: a retry,
or a resend after a crash between the peer's confirmation and our commit, carries the same
SOP Instance UID, which a TPS stores once.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable

import pydicom
import structlog

from gateway.config import Destination, FolderDestination, GatewayConfig
from gateway.errors import PermanentSendError, SpoolError, TransientSendError
from gateway.failpoints import failpoint
from gateway.ops.audit import AuditLog
from gateway.sending.scu import Sender
from gateway.store.jobs import JobState
from gateway.store.outputs import StageContext, load_output
from gateway.store.tasks import Delivery, DeliveryState, Export

__all__ = ["deliver_due", "outcome"]

log = structlog.get_logger(__name__)


def deliver_due(ctx: StageContext, config: GatewayConfig, sender: Sender, job_id: str, task_no: int,
                now: float, *, audit: AuditLog | None = None,
                on_ended: Callable[[str, str], None] | None = None) -> list[Delivery]:
    """Attempt every delivery of the task that is due at *now*; return the task's deliveries afterwards.

    Each delivery that ends here (sent, or given up) is written to the *audit* trail.
    """
    before = ctx.tasks.deliveries(job_id, task_no)
    sop_classes = {}
    for delivery in before:
        if delivery.state is DeliveryState.PENDING and delivery.next_attempt_at <= now:
            sop_classes[delivery.key] = _attempt(ctx, config, sender, job_id, delivery, now)
    after = ctx.tasks.deliveries(job_id, task_no)
    ended = [d for d, b in zip(after, before, strict=False) if d.state.terminal and not b.state.terminal]
    if on_ended is not None:
        for delivery in ended:
            on_ended(delivery.destination, delivery.state.value)
    if audit is not None:
        for delivery in ended:
            audit.append("exported", now, job_id=job_id, study=ctx.jobs.get(job_id).study, series=task_no,
                         destination=delivery.destination, sop_class=sop_classes.get(delivery.key),
                         outcome=delivery.state.value, attempts=delivery.attempts, reason=delivery.reason)
    return after


def outcome(deliveries: list[Delivery]) -> tuple[JobState, str | None] | None:
    """The task's final state once no delivery is pending (``sent`` only if all were), else ``None``."""
    if any(d.state is DeliveryState.PENDING for d in deliveries):
        return None
    failed = [f"{d.destination}: {d.reason}" for d in deliveries if d.state is not DeliveryState.SENT]
    return (JobState.DEAD_LETTER, "; ".join(failed)) if failed else (JobState.SENT, None)


def _attempt(ctx: StageContext, config: GatewayConfig, sender: Sender, job_id: str, delivery: Delivery,
             now: float) -> str:
    """Try *delivery* once and record the outcome; return the SOP class name of what it carries (for the audit)."""
    attempt = delivery.attempts + 1
    raw = load_output(ctx, job_id, delivery.task_no, f"out{delivery.item}")  # decrypted once per attempt
    ds = pydicom.dcmread(io.BytesIO(raw))
    sop_class = str(ds.SOPClassUID.name)
    try:
        destination = config.destination(delivery.destination)
    except KeyError:
        ctx.tasks.record_attempt(job_id, delivery, DeliveryState.DEAD_LETTER, next_attempt_at=now,
                                 reason="destination no longer configured")
        log.error("send_failed", destination=delivery.destination, attempt=attempt, permanent=True,
                  reason="destination no longer configured")
        return sop_class
    try:
        status = _send(ctx, sender, destination, job_id, raw, ds)
    except (TransientSendError, SpoolError) as exc:
        reason = exc.reason
        last = attempt >= destination.retry.max_attempts
        delay = destination.retry.delay(attempt)
        ctx.tasks.record_attempt(job_id, delivery, DeliveryState.DEAD_LETTER if last else DeliveryState.PENDING,
                                 next_attempt_at=now + delay, reason=reason)
        log.warning("send_failed", destination=destination.name, attempt=attempt, permanent=False, reason=reason,
                    retry_in_seconds=None if last else delay)
    except PermanentSendError as exc:
        ctx.tasks.record_attempt(job_id, delivery, DeliveryState.DEAD_LETTER, next_attempt_at=now, reason=exc.reason)
        log.error("send_failed", destination=destination.name, attempt=attempt, permanent=True, reason=exc.reason)
    else:
        failpoint("delivered")
        ctx.tasks.record_attempt(job_id, delivery, DeliveryState.SENT, next_attempt_at=now)
        log.info("send_succeeded", destination=destination.name, attempt=attempt, status=status)
    return sop_class


def _send(ctx: StageContext, sender: Sender, destination: Destination | FolderDestination, job_id: str,
          raw: bytes, ds: pydicom.Dataset) -> str:
    if isinstance(destination, FolderDestination):
        job = ctx.jobs.get(job_id)
        export = Export(secrets.token_hex(16), destination.name, job_id, job.study, job.created_at)
        ctx.tasks.record_export(export)  # first: retention must know every file that may exist
        ctx.spool.write_export(destination.name, export.file_id, [raw])
        return "written"
    return f"0x{sender.send_once(ds, destination):04X}"
