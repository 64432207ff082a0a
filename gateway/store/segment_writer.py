"""The open segment a receiver process appends a job's instances to, and the registry of open segments.

See :mod:`gateway.store.segments` for the format. Space is allocated ahead of the writes (doubling, up to
64 MiB a step; near a full disk exactly what a record needs), so a record costs one ``fdatasync``. Writers
of one segment share flushes: a flush makes durable every record written before it started, and a writer
whose record it covered returns without flushing again (group commit).
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from gateway.store.segments import HEAD_BYTES, LIVE, SEGMENT_SUFFIX, aligned, fsync_dir, header, locator, pwrite_all

__all__ = ["OpenSegments", "SegmentClosedError", "SegmentWriter"]

_FIRST_ALLOCATION = 1 << 20
_MAX_ALLOCATION_STEP = 64 << 20


class SegmentClosedError(RuntimeError):
    """The segment was closed (idle, or its job ended) between lookup and append: open a new one."""


class SegmentWriter:
    """The open segment one process appends a job's instances to (thread-safe, flushes shared)."""

    def __init__(self, folder: Path) -> None:
        self.segment_id = secrets.token_hex(8)
        self._fd = os.open(folder / f"{self.segment_id}{SEGMENT_SUFFIX}",
                           os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()  # offsets, allocation, writes
        self._flush_lock = threading.Lock()  # one flush at a time; taken before _lock
        self._end = self._allocated = self._durable = 0
        self.closed = False
        try:
            fsync_dir(folder)  # the segment's name is durable before any record in it is acknowledged
        except OSError:
            self._close_locked(sync=False)
            raise
        self.last_used = time.monotonic()

    def append(self, parts: Iterable[bytes | bytearray | memoryview]) -> tuple[str, int]:
        """Write *parts* as one record and return once it is durable: ``(locator, payload length)``.

        Raises
        ------
        SegmentClosedError
            When the segment was closed meanwhile (nothing written).
        OSError
            On any I/O error, disk full included; the segment is then closed.
        """
        parts = list(parts)
        length = sum(memoryview(part).nbytes for part in parts)
        with self._lock:
            if self.closed:
                raise SegmentClosedError
            offset = self._end
            try:
                self._allocate(offset + HEAD_BYTES + length)
                pwrite_all(self._fd, [header(length, LIVE), *parts], offset)
            except OSError:
                self._close_locked(sync=True)  # what others wrote before is still flushed for them
                raise
            self._end = end = aligned(offset + HEAD_BYTES + length)
            self.last_used = time.monotonic()
        self._flush(end)
        return locator(self.segment_id, offset, length), length

    def _allocate(self, end: int) -> None:
        # Allocation ahead of the writes (doubling, up to 64 MiB a step); near a full disk, exactly what is needed.
        if end <= self._allocated:
            return
        step = max(end - self._allocated, min(max(self._allocated, _FIRST_ALLOCATION), _MAX_ALLOCATION_STEP))
        try:
            os.posix_fallocate(self._fd, self._allocated, aligned(step))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EFBIG):
                raise
            os.posix_fallocate(self._fd, self._allocated, end - self._allocated)
            self._allocated = end
            return
        self._allocated += aligned(step)

    def _flush(self, needed: int) -> None:
        """Return once everything before offset *needed* is durable, flushing unless another flush covered it."""
        with self._flush_lock:
            if self._durable >= needed:
                return  # a flush that started after our write covered it (or the close did)
            with self._lock:
                if self.closed:
                    raise OSError(errno.EIO, "segment failed before its flush")
                upto = self._end
            try:
                os.fdatasync(self._fd)
            except OSError:
                with self._lock:
                    self._close_locked(sync=False)
                raise
            self._durable = upto

    def close(self) -> None:
        """Stop appending: flush what is written, cut the pre-allocated tail, close the file (idempotent)."""
        with self._flush_lock, self._lock:
            self._close_locked(sync=True)

    def _close_locked(self, *, sync: bool) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if sync and self._durable < self._end:
                os.fdatasync(self._fd)  # a writer waiting for its flush finds its record durable
                self._durable = self._end
            if self._allocated > self._end:
                os.ftruncate(self._fd, self._end)
        except OSError:
            pass  # a waiting writer then reports the failure; a tail of zeros stops readers anyway
        finally:
            os.close(self._fd)


class OpenSegments:
    """The segments this process has open, one per job it receives (thread-safe)."""

    def __init__(self) -> None:
        self._writers: dict[str, SegmentWriter] = {}
        self._lock = threading.Lock()

    def append(self, job_id: str, folder: Callable[[], Path],
               parts: Iterable[bytes | bytearray | memoryview]) -> tuple[str, int]:
        """Append *parts* durably to *job_id*'s open segment (opened in *folder()* if needed); see SegmentWriter."""
        parts = list(parts)
        for _attempt in range(3):
            with self._lock:
                writer = self._writers.get(job_id)
                if writer is None or writer.closed:
                    writer = self._writers[job_id] = SegmentWriter(folder())
            try:
                return writer.append(parts)
            except SegmentClosedError:  # closed as idle meanwhile: open another
                continue
        raise OSError(errno.EBUSY, "segments kept closing")

    def close(self, job_id: str) -> None:
        """Close *job_id*'s open segment, if any."""
        with self._lock:
            writer = self._writers.pop(job_id, None)
        if writer is not None:
            writer.close()

    def close_idle(self, idle_seconds: float) -> int:
        """Close the segments nothing was appended to for *idle_seconds* (or all, with 0); return how many."""
        now = time.monotonic()
        with self._lock:
            idle = [job_id for job_id, writer in self._writers.items() if now - writer.last_used >= idle_seconds]
            closing = [self._writers.pop(job_id) for job_id in idle]
        for writer in closing:
            writer.close()
        return len(closing)
