"""Durable files under ``data_dir``: written whole or not at all, folders made and removed durably.

A file is durable when its write returns: written to a temporary file in the same folder, fsynced,
renamed, and the folder fsynced. Used by :mod:`gateway.store.spool`, the only module that knows paths.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from gateway.errors import SpoolError
from gateway.store.segments import fsync_dir

__all__ = ["ID", "SUFFIX", "durable_write", "file_ids", "make_dir", "remove_folder", "restrict", "spool_error"]

#: A server-generated id: the only thing a name under ``data_dir`` is made of.
ID = re.compile(r"^[0-9a-f]{16,64}$")
SUFFIX = ".dcm"


def _error_code(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


def spool_error(what: str, exc: OSError) -> SpoolError:
    code = _error_code(exc)
    return SpoolError(f"{what} ({code})", reason=f"spool_{code.lower()}")


def _write_all(fd: int, parts: Iterable[bytes | bytearray | memoryview]) -> int:
    total = 0
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]
            total += written
    return total


def restrict(path: Path, mode: int) -> None:
    with contextlib.suppress(FileNotFoundError):  # shredded meanwhile
        if stat.S_IMODE(path.lstat().st_mode) & ~mode and not path.is_symlink():
            os.chmod(path, mode)


def make_dir(path: Path, parent: Path) -> Path:
    if not path.is_dir():
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(parent)
        except OSError as exc:
            raise spool_error("cannot create a folder", exc) from exc
    return path


def durable_write(folder: Path, name: str, parts: Iterable[bytes | bytearray | memoryview]) -> int:
    # Temporary file in the same folder, fsync, rename, fsync the folder; nothing partial remains.
    tmp = folder / f".{secrets.token_hex(16)}.tmp"
    final = folder / name
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise spool_error("cannot create a file", exc) from exc
    try:
        try:
            size = _write_all(fd, parts)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fsync_dir(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise spool_error("cannot write a file", exc) from exc
    return size


def file_ids(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [p.name[: -len(SUFFIX)] for p in folder.iterdir()
            if p.name.endswith(SUFFIX) and ID.match(p.name[: -len(SUFFIX)])]


def remove_folder(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    count = 0
    for entry in os.scandir(folder):
        os.unlink(entry.path)
        count += 1
    folder.rmdir()
    fsync_dir(folder.parent)
    return count
