"""The audit trail: an append-only, hash-chained JSON lines file that documents the 24-hour promise.

One record per study event (``received``, ``pseudonymised``, ``exported``, ``deleted``), with the
job id and the pseudonymous study id only, so the file holds no patient data and is kept beyond
the 24 hours. Each record carries the SHA-256 of the line before it (``prev``); the first one
the hash of nothing, and its sequence number (``seq``, its line number). Appends from several
processes (the node, ``python -m gateway shred``) are serialised with ``flock``; the head (sequence
number and hash of the last record) is anchored in the job database under the same lock, so
records cut off the end are detected. Records can also be forwarded to syslog.

``verify`` re-computes the chain, compares its end with the anchored head, and checks per job the
time from the first instance received to the deletion that left nothing behind, and that no job
still in the job table is older than the ceiling.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import logging.handlers
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "JobAudit", "Verification", "verification_lines", "verify"]

_GENESIS = hashlib.sha256(b"").hexdigest()
_TAIL = 65_536  # the last record is found in the file's last 64 KiB


def _now_iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="milliseconds")


class AuditLog:
    """Appends records to ``data_dir/audit/audit.jsonl`` (and optionally to syslog)."""

    def __init__(self, path: Path, *, syslog_address: str | None = None,
                 anchor: Callable[[int, str], None] | None = None) -> None:
        self.path = path
        self._anchor = anchor
        self._lock = threading.Lock()
        self._syslog: logging.Logger | None = None
        if syslog_address:
            self._syslog = _syslog_logger(syslog_address)

    def append(self, event: str, when: float, **fields: Any) -> None:
        """Append one record; *fields* must be codes, counts, times and random ids, never patient data."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock, os.fdopen(os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600), "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                size = handle.seek(0, os.SEEK_END)  # now, under the lock: another writer may have appended
                last = _last_line(handle) if size else b""
                prev = hashlib.sha256(last).hexdigest() if size else _GENESIS
                seq = _seq_after(handle, last)
                line = json.dumps({"time": _now_iso(when), "event": event, **fields, "seq": seq, "prev": prev},
                                  separators=(",", ":"), sort_keys=False).encode("utf-8")
                handle.write(line + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                if self._anchor is not None:
                    self._anchor(seq, hashlib.sha256(line).hexdigest())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        if self._syslog is not None:
            self._syslog.info(line.decode("utf-8"))


def _last_line(handle: Any) -> bytes:
    size = handle.seek(0, os.SEEK_END)
    start = max(0, size - _TAIL)
    handle.seek(start)
    tail: bytes = handle.read()
    handle.seek(0, os.SEEK_END)
    return tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]


def _seq_after(handle: Any, last: bytes) -> int:
    """The sequence number of the record after *last* (its line number; counted once for older trails)."""
    if not last:
        return 1
    try:
        return int(json.loads(last)["seq"]) + 1
    except (ValueError, KeyError, TypeError):
        handle.seek(0)
        count = sum(1 for _ in handle)
        handle.seek(0, os.SEEK_END)
        return count + 1


def _syslog_logger(address: str) -> logging.Logger:
    target: str | tuple[str, int] = address
    if not address.startswith("/"):
        host, _, port = address.rpartition(":")
        target = (host, int(port))
    logger = logging.getLogger("contour_gateway.audit")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.handlers.SysLogHandler(target, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
    handler.setFormatter(logging.Formatter("contour-gateway-audit: %(message)s"))
    logger.handlers = [handler]
    return logger


@dataclass
class JobAudit:
    """What the trail says about one job (one receipt of a study)."""

    job_id: str
    study: str | None = None
    received_at: float | None = None  # the first instance
    deleted_at: float | None = None  # the deletion that left nothing
    deletions: int = 0
    events: list[str] = field(default_factory=list)

    def age(self, now: float) -> float | None:
        """Seconds from receipt to the final deletion (or to *now* if data is still held)."""
        if self.received_at is None:
            return None
        return (self.deleted_at if self.deleted_at is not None else now) - self.received_at


@dataclass
class Verification:
    """The outcome of :func:`verify`."""

    records: int
    broken_links: list[int]  # line numbers whose ``prev`` does not match
    jobs: dict[str, JobAudit]
    over_ceiling: list[str]  # job ids held (or deleted) later than the ceiling
    held_unaudited: list[str] = field(default_factory=list)  # in the job table past the ceiling, no record
    cut: str | None = None  # how the trail's end disagrees with the anchored head

    @property
    def ok(self) -> bool:
        """Chain intact up to the anchored head, and every job deleted within the ceiling."""
        return not self.broken_links and not self.over_ceiling and not self.held_unaudited and self.cut is None


def verify(path: Path, ceiling_seconds: float, now: float, *, held: Mapping[str, float] | None = None,
           head: tuple[int, str] | None = None) -> Verification:
    """Check the chain of *path*, its end against *head*, and every job's age against *ceiling_seconds*.

    *held* maps the job ids still in the job table to their first instance's time; *head* is the
    anchored ``(sequence number, SHA-256)`` of the last record written.
    """
    broken: list[int] = []
    jobs: dict[str, JobAudit] = {}
    prev, count, digests = _GENESIS, 0, {}
    for number, raw in _lines(path):
        count += 1
        digest = hashlib.sha256(raw).hexdigest()
        if head is not None and number == head[0]:
            digests[number] = digest
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            broken.append(number)
            prev = digest
            continue
        if record.get("prev") != prev:
            broken.append(number)
        prev = digest
        _account(jobs, record)
    for job_id, received_at in (held or {}).items():  # what the table holds counts even without a record
        job = jobs.setdefault(job_id, JobAudit(job_id))
        job.deleted_at = None
        if job.received_at is None or received_at < job.received_at:
            job.received_at = received_at
    over = [job.job_id for job in jobs.values()
            if (age := job.age(now)) is not None and age >= ceiling_seconds]
    unaudited = [job_id for job_id in held or {} if job_id in over and "received" not in jobs[job_id].events
                 and "deleted" not in jobs[job_id].events]
    return Verification(count, broken, jobs, over, unaudited, _cut(head, count, digests))


def verification_lines(result: Verification, ceiling: float, now: float) -> tuple[list[str], list[str]]:
    """What ``python -m gateway audit verify`` prints: one line per job and the verdict, and the chain's faults."""
    lines = []
    for job in result.jobs.values():
        age = job.age(now)
        state = "deleted" if job.deleted_at is not None else "HELD"
        verdict = "OVER CEILING" if job.job_id in result.over_ceiling else "ok"
        unaudited = " (in the job table, no audit record)" if job.job_id in result.held_unaudited else ""
        lines.append(f"{job.job_id}  study {job.study or '-'}  {state} after "
                     f"{'-' if age is None else f'{age / 3600:.2f} h'}  {verdict}{unaudited}")
    lines.append(f"{result.records} record(s), {len(result.jobs)} job(s), ceiling {ceiling} s: "
                 f"{'OK' if result.ok else 'FAILED'}")
    problems = [f"chain broken at line {number}" for number in result.broken_links]
    return lines, problems + ([result.cut] if result.cut is not None else [])


def _cut(head: tuple[int, str] | None, count: int, digests: dict[int, str]) -> str | None:
    if head is None:
        return None
    seq, digest = head
    if count < seq:
        return f"the trail ends at record {count}, but record {seq} was written: records were cut off"
    if digests.get(seq) != digest:
        return f"record {seq} differs from the one written: the trail was rewritten"
    return None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line.rstrip(b"\n")


def _account(jobs: dict[str, JobAudit], record: dict[str, Any]) -> None:
    job_id = record.get("job_id")
    if not isinstance(job_id, str):
        return
    job = jobs.setdefault(job_id, JobAudit(job_id))
    job.study = record.get("study", job.study)
    job.events.append(str(record.get("event")))
    if record.get("event") == "received":
        job.received_at = float(record["first_instance_at"])
    elif record.get("event") == "deleted":
        job.deletions += 1
        if job.received_at is None and "first_instance_at" in record:  # shredded before it was ever processed
            job.received_at = float(record["first_instance_at"])
        if record.get("complete"):
            job.deleted_at = dt.datetime.fromisoformat(record["time"]).timestamp()
