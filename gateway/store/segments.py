"""Segment files: the received instances of a job, appended to pre-allocated files, one flush each.

A receiver process appends every instance of a job it receives to one open segment file in the job's
folder (``spool/<job_id>/<segment_id>.seg``). Space is pre-allocated ahead of the writes, so making an
instance durable is one ``fdatasync`` of data written into allocated space: no file is created, renamed
or named in a folder per instance. Associations of one process writing to the same segment share
flushes (group commit): a flush makes durable every record written before it started, and a writer
whose record it covered does not flush again.

Each record starts on a 4 KiB boundary (a torn write never touches the pages of an earlier one)::

    magic (8) | payload length (u64) | state (u32: 1 live, 2 removed) | CRC-32 of the 20 bytes before (u32)
    payload: the sealed instance (gateway.store.sealing), authenticated with the job's key

An instance is known by its *locator*: segment id (16 hex digits), offset (12) and payload length (10),
38 hex digits that take the place of the file id of a one-file-per-instance spool. The records that were
acknowledged form a prefix of valid records (each flush covered every earlier write), so reading a
segment stops at the first header that is not valid. A segment belongs to one job: shredding the job
removes its folder and every segment in it, exactly as before; a removed record (a replaced copy) is
zeroed in place. A closed segment is truncated to its last record.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HEAD_BYTES",
    "LIVE",
    "SEGMENT_SUFFIX",
    "Record",
    "aligned",
    "fsync_dir",
    "header",
    "is_locator",
    "locator",
    "locator_size",
    "pwrite_all",
    "read_record",
    "records",
    "remove_record",
    "segment_paths",
    "trim",
]

SEGMENT_SUFFIX = ".seg"
_MAGIC = b"CGWSEG01"
_HEADER = struct.Struct("<8sQI")
_CRC = struct.Struct("<I")
HEAD_BYTES = _HEADER.size + _CRC.size
LIVE, _REMOVED = 1, 2
_ALIGN = 4096
_IOV_MAX = 1024
_LOCATOR = re.compile(r"^([0-9a-f]{16})([0-9a-f]{12})([0-9a-f]{10})$")
_SEGMENT_NAME = re.compile(r"^[0-9a-f]{16}\.seg$")


@dataclass(frozen=True)
class Record:
    """A record found in a segment."""

    locator: str
    length: int
    live: bool


def is_locator(file_id: str) -> bool:
    """Whether *file_id* names a record in a segment (not a file of its own)."""
    return _LOCATOR.match(file_id) is not None


def locator_size(file_id: str) -> int:
    """The payload length a locator names."""
    return _parse(file_id)[2]


def _parse(file_id: str) -> tuple[str, int, int]:
    match = _LOCATOR.match(file_id)
    if match is None:
        raise ValueError(f"not a segment locator: {file_id!r}")
    return match[1], int(match[2], 16), int(match[3], 16)


def locator(segment_id: str, offset: int, length: int) -> str:
    return f"{segment_id}{offset:012x}{length:010x}"


def header(length: int, state: int) -> bytes:
    head = _HEADER.pack(_MAGIC, length, state)
    return head + _CRC.pack(zlib.crc32(head))


def _read_header(fd: int, offset: int, size: int) -> tuple[int, int] | None:
    """``(length, state)`` of a valid record header at *offset*, or ``None``."""
    if offset + HEAD_BYTES > size:
        return None
    raw = os.pread(fd, HEAD_BYTES, offset)
    if len(raw) < HEAD_BYTES or zlib.crc32(raw[: _HEADER.size]) != _CRC.unpack_from(raw, _HEADER.size)[0]:
        return None
    magic, length, state = _HEADER.unpack_from(raw)
    if magic != _MAGIC or state not in (LIVE, _REMOVED) or offset + HEAD_BYTES + length > size:
        return None
    return length, state


def aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def pwrite_all(fd: int, parts: Iterable[bytes | bytearray | memoryview], offset: int) -> None:
    views = [view for view in (memoryview(part).cast("B") for part in parts) if view.nbytes]
    while views:
        written = os.pwritev(fd, views[:_IOV_MAX], offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        offset += written
        while views and written >= views[0].nbytes:
            written -= views.pop(0).nbytes
        if written:
            views[0] = views[0][written:]


def segment_paths(folder: Path) -> list[Path]:
    """The segment files of a job folder."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if _SEGMENT_NAME.match(path.name))


def _walk(fd: int, segment_id: str) -> Iterator[tuple[Record, int]]:
    """Every valid record of an open segment, with the offset just after it."""
    size = os.fstat(fd).st_size
    offset = 0
    while (found := _read_header(fd, offset, size)) is not None:
        length, state = found
        yield Record(locator(segment_id, offset, length), length, state == LIVE), offset + HEAD_BYTES + length
        offset = aligned(offset + HEAD_BYTES + length)


def records(folder: Path) -> list[Record]:
    """Every record of every segment in job folder *folder*, in write order per segment."""
    found: list[Record] = []
    for path in segment_paths(folder):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # shredded meanwhile
            continue
        try:
            found.extend(record for record, _end in _walk(fd, path.name[: -len(SEGMENT_SUFFIX)]))
        finally:
            os.close(fd)
    return found


def _open_record(folder: Path, file_id: str, flags: int) -> tuple[int, int, int]:
    """Open the segment of *file_id*; return ``(fd, offset, length)`` of its live record."""
    segment_id, offset, length = _parse(file_id)
    fd = os.open(folder / f"{segment_id}{SEGMENT_SUFFIX}", flags | os.O_CLOEXEC)
    try:
        found = _read_header(fd, offset, os.fstat(fd).st_size)
    except BaseException:
        os.close(fd)
        raise
    if found != (length, LIVE):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "no such record (removed or never written)")
    return fd, offset, length


def read_record(folder: Path, file_id: str) -> bytes:
    """The payload of a live record; ``FileNotFoundError`` if it is gone."""
    fd, offset, length = _open_record(folder, file_id, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset + HEAD_BYTES)
    finally:
        os.close(fd)
    if len(data) != length:
        raise FileNotFoundError(errno.ENOENT, "record cut short")
    return data


def remove_record(folder: Path, file_id: str) -> None:
    """Zero a record's payload and mark it removed (not flushed: it is ciphertext under the job's key)."""
    try:
        fd, offset, length = _open_record(folder, file_id, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        pwrite_all(fd, [header(length, _REMOVED), bytes(length)], offset)
    finally:
        os.close(fd)


def trim(folder: Path) -> None:
    """Cut the pre-allocated space after the last record of every segment in *folder* (no writer open)."""
    for path in segment_paths(folder):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            end = 0
            for _record, after in _walk(fd, path.name[: -len(SEGMENT_SUFFIX)]):
                end = after
            if os.fstat(fd).st_size > end:
                os.ftruncate(fd, end)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder *path* (a file created, renamed or unlinked in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
