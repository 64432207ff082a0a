"""Anchors kept in the job database: facts the node compares against, so a swap or a cut does not go unnoticed.

* ``master_key_id``: the check value of the master key the data was sealed with; a node started
  with another key is refused before any job runs (:func:`check_master_key`).
* ``time_seen`` / ``time_seen_at``: the largest wall-clock time the node has seen, and where on the
  boot clock it saw it. :class:`RetentionClock` never goes back behind it (a clock set back does not
  extend any study's life), and new jobs never start before it.
* ``audit_head``: the sequence number and hash of the audit trail's last record
  (:func:`record_audit_head`), so lines cut off the end of the trail are detected.

None of these is patient data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

from gateway.errors import StartupError
from gateway.failpoints import wall_time
from gateway.store.jobs import JobStore

__all__ = ["AuditHead", "RetentionClock", "audit_head", "check_master_key", "record_audit_head"]

log = structlog.get_logger(__name__)

AuditHead = tuple[int, str]


def _get(jobs: JobStore, name: str) -> str | None:
    with jobs.reading() as db:
        row = db.execute("SELECT value FROM anchors WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row["value"])


def check_master_key(jobs: JobStore, key_id: str) -> None:
    """Record the master key's check value on first use; refuse a different key later.

    Raises
    ------
    StartupError
        When data_dir was sealed under another master key.
    """
    with jobs.transaction(durable=True) as db:
        db.execute("INSERT OR IGNORE INTO anchors (name, value) VALUES ('master_key_id', ?)", (key_id,))
        stored = db.execute("SELECT value FROM anchors WHERE name = 'master_key_id'").fetchone()["value"]
    if stored != key_id:
        raise StartupError(f"the master key (check value {key_id}) is not the one this data_dir was sealed with "
                           f"(check value {stored}): restore the right key; nothing was started")


def record_audit_head(jobs: JobStore, seq: int, digest: str) -> None:
    """Remember the audit trail's last record (called with the trail locked, so heads only move forward)."""
    with jobs.transaction(durable=True) as db:
        db.execute("INSERT OR REPLACE INTO anchors (name, value) VALUES ('audit_head', ?)", (f"{seq} {digest}",))


def audit_head(jobs: JobStore) -> AuditHead | None:
    """The anchored ``(sequence number, SHA-256)`` of the audit trail's last record, if any."""
    value = _get(jobs, "audit_head")
    if value is None:
        return None
    seq, digest = value.split(" ", 1)
    return int(seq), digest


def _boot_clock() -> tuple[str, float]:
    """This boot's id and the seconds since boot (suspend included): comparable across processes."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return boot_id, time.clock_gettime(time.CLOCK_BOOTTIME)


class RetentionClock:
    """The time retention decides by: the wall clock, but never behind the largest time seen.

    A clock set back is bridged by the boot clock since the largest time was seen (same boot), or
    by that time itself (after a reboot): a study's life is never extended. A clock set forward is
    followed: studies are shredded early rather than late.
    """

    def __init__(self, jobs: JobStore, *, wall: Callable[[], float] = wall_time,
                 boot: Callable[[], tuple[str, float]] = _boot_clock) -> None:
        self._jobs = jobs
        self._wall = wall
        self._boot = boot

    def now(self) -> float:
        """The retention time now; persisted as the new largest time seen."""
        wall, (boot_id, since_boot) = self._wall(), self._boot()
        with self._jobs.transaction(durable=True) as db:
            rows = dict(db.execute("SELECT name, value FROM anchors WHERE name IN ('time_seen', 'time_seen_at')")
                        .fetchall())
            floor = _floor(rows, boot_id, since_boot)
            now = max(wall, floor)
            db.execute("INSERT OR REPLACE INTO anchors (name, value) VALUES ('time_seen', ?), ('time_seen_at', ?)",
                       (repr(now), f"{boot_id} {since_boot!r}"))
        if floor - wall > 1.0:
            log.warning("clock_behind", seconds=round(floor - wall, 1),
                        note="the wall clock is behind the largest time seen: retention keeps to the latter")
        return now


def _floor(rows: dict[str, str], boot_id: str, since_boot: float) -> float:
    """The earliest the time can be now, from the anchored largest time seen."""
    if "time_seen" not in rows:
        return 0.0
    seen = float(rows["time_seen"])
    seen_boot, _, seen_since = rows.get("time_seen_at", "").partition(" ")
    if seen_boot == boot_id and seen_since and since_boot >= float(seen_since):
        return seen + (since_boot - float(seen_since))
    return seen
