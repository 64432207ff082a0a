"""The spool: the only module that knows paths under ``data_dir``.

Layout (every name is a server-generated random hex id, never a UID or patient data)::

    data_dir/
        gateway.db                 job table (gateway.store.jobs)
        spool/<job_id>/<segment_id>.seg   received instances (sealed records, gateway.store.segments)
        work/<job_id>/<file_id>.dcm    pseudonymised instances (sealed)
        vault/<job_id>.vault           re-identification entry (sealed; gateway.identity.vault only)
        results/<job_id>/t<n>.<kind>   stage outputs of task n: masks, structure sets, outbox (sealed)
        export/<destination>/<file_id>.dcm   results for a folder destination (plaintext, owner-only)
        audit/audit.jsonl              the audit trail (no patient data; kept beyond retention)
        <folder>/.<random>.tmp         while being written; removed at start-up

Received instances are records in segment files, ``spool/<job_id>/<segment_id>.seg``
(:mod:`gateway.store.segments`: one flush per instance, shared by concurrent writers); their
file ids are locators. A spool written by an earlier version keeps its one-file-per-instance
``spool/<job_id>/<file_id>.dcm``, read and removed as before. Every other file is durable when
its write returns: written to a temporary file in the same folder, fsynced, renamed, and the
folder fsynced.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from gateway.store import segments
from gateway.store.durable_files import (
    ID,
    SUFFIX,
    durable_write,
    file_ids,
    make_dir,
    remove_folder,
    restrict,
    spool_error,
)
from gateway.store.segment_writer import OpenSegments
from gateway.store.segments import fsync_dir

__all__ = ["Spool", "count_instances", "fsync_dir"]

_RESULT = re.compile(r"^t[0-9]{1,4}\.[a-z0-9-]{1,24}$")
_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_id(value: str) -> str:
    if not ID.match(value):
        raise ValueError(f"not a spool id: {value!r}")
    return value


class Spool:
    """Durable per-job folders of received instances under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "spool"
        self.work_root = data_dir / "work"
        self.vault_root = data_dir / "vault"
        self.results_root = data_dir / "results"
        self.export_root = data_dir / "export"
        self.database_path = data_dir / "gateway.db"
        self.audit_path = data_dir / "audit" / "audit.jsonl"
        self._segments = OpenSegments()  # this process's open segment of each job it receives

    def prepare(self) -> None:
        """Create the folders (owner-only) if missing."""
        for folder in (self.data_dir, self.root):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def restrict_modes(self) -> None:
        """Make everything already under ``data_dir`` owner-only (once, when the node starts)."""
        for below, _dirs, files in os.walk(self.data_dir):  # left by an older version or another umask
            restrict(Path(below), 0o700)
            for name in files:
                restrict(Path(below) / name, 0o600)

    def job_dir(self, job_id: str) -> Path:
        """Return (creating if needed) the folder of job *job_id*."""
        return make_dir(self.root / _check_id(job_id), self.root)

    def write_instance(self, job_id: str, parts: Iterable[bytes | bytearray | memoryview]) -> tuple[str, int]:
        """Append *parts* as one new received instance of *job_id*, durably; return ``(file_id, size)``.

        Raises
        ------
        SpoolError
            On any I/O error (disk full included); the sender is told, and reading the spool skips what is left.
        """
        try:
            return self._segments.append(job_id, lambda: self.job_dir(job_id), parts)
        except OSError as exc:
            raise spool_error("cannot write an instance", exc) from exc

    def close_segment(self, job_id: str) -> None:
        """Close this process's open segment of *job_id* (the job stopped receiving)."""
        self._segments.close(job_id)

    def close_idle_segments(self, idle_seconds: float) -> int:
        """Close the segments nothing was appended to for *idle_seconds* (or all, with 0); return how many."""
        return self._segments.close_idle(idle_seconds)

    def instance_size(self, job_id: str, file_id: str) -> int:
        """The stored (sealed) size of an instance."""
        if segments.is_locator(file_id):
            return segments.locator_size(file_id)
        return (self.root / _check_id(job_id) / f"{_check_id(file_id)}{SUFFIX}").stat().st_size

    def write_work(self, job_id: str, parts: Iterable[bytes | bytearray | memoryview]) -> str:
        """Write a pseudonymised file of *job_id* (``work/<job_id>/``); return its file id."""
        folder = make_dir(self.work_root / _check_id(job_id), self.work_root)
        file_id = secrets.token_hex(16)
        durable_write(folder, f"{file_id}{SUFFIX}", parts)
        return file_id

    def remove_work(self, job_id: str) -> None:
        """Delete the pseudonymised files of *job_id* (before a stage is redone)."""
        for file_id in self.work_file_ids(job_id):
            (self.work_root / job_id / f"{file_id}{SUFFIX}").unlink(missing_ok=True)

    def work_file_ids(self, job_id: str) -> list[str]:
        """The pseudonymised files of *job_id*."""
        return file_ids(self.work_root / _check_id(job_id))

    def read_work(self, job_id: str, file_id: str) -> bytes:
        """A pseudonymised file of *job_id* (sealed)."""
        return (self.work_root / _check_id(job_id) / f"{_check_id(file_id)}{SUFFIX}").read_bytes()

    def write_vault(self, job_id: str, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write the (sealed) re-identification entry of *job_id*, replacing an older one."""
        durable_write(make_dir(self.vault_root, self.data_dir), f"{_check_id(job_id)}.vault", parts)

    def read_vault(self, job_id: str) -> bytes:
        """The (sealed) re-identification entry of *job_id*."""
        return (self.vault_root / f"{_check_id(job_id)}.vault").read_bytes()

    def remove_results(self, job_id: str) -> None:
        """Delete the stage outputs of *job_id* (its pseudonymisation is being redone)."""
        remove_folder(self.results_root / _check_id(job_id))

    def write_result(self, job_id: str, name: str, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write (durably, replacing) the stage output *name* (``t<task>.<kind>``) of *job_id*."""
        if not _RESULT.match(name):
            raise ValueError(f"not a result name: {name!r}")
        durable_write(make_dir(self.results_root / _check_id(job_id), self.results_root), name, parts)

    def read_result(self, job_id: str, name: str) -> bytes:
        """A stage output of *job_id* (sealed); ``FileNotFoundError`` if it was never written."""
        if not _RESULT.match(name):
            raise ValueError(f"not a result name: {name!r}")
        return (self.results_root / _check_id(job_id) / name).read_bytes()

    def write_export(self, folder: str, file_id: str, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write the result file *file_id* (recorded beforehand, so retention finds it) for a folder destination."""
        if not _FOLDER.match(folder):
            raise ValueError(f"not a destination name: {folder!r}")
        durable_write(make_dir(self.export_root / folder, make_dir(self.export_root, self.data_dir)),
                       f"{_check_id(file_id)}{SUFFIX}", parts)

    def export_files(self) -> list[tuple[str, str]]:
        """Every ``(destination, file_id)`` in ``export/``."""
        if not self.export_root.is_dir():
            return []
        return [(folder.name, file_id) for folder in self.export_root.iterdir()
                if folder.is_dir() and _FOLDER.match(folder.name) for file_id in file_ids(folder)]

    def remove_export(self, folder: str, file_id: str) -> bool:
        """Overwrite (best effort: plaintext) and delete one export file; return whether it existed."""
        path = self.export_root / folder / f"{_check_id(file_id)}{SUFFIX}"
        try:
            with open(path, "r+b") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(0)
                handle.write(bytes(size))
                handle.flush()
                os.fsync(handle.fileno())
        except FileNotFoundError:
            return False
        path.unlink(missing_ok=True)
        return True

    def stored_job_ids(self) -> set[str]:
        """Every job id that still has a folder or vault entry under ``data_dir``."""
        ids = {entry.name for root in (self.root, self.work_root, self.results_root) if root.is_dir()
               for entry in os.scandir(root) if entry.is_dir() and ID.match(entry.name)}
        if self.vault_root.is_dir():
            ids |= {p.stem for p in self.vault_root.glob("*.vault") if ID.match(p.stem)}
        return ids

    def remove_job(self, job_id: str) -> dict[str, int]:
        """Delete every file of *job_id* (received, pseudonymised, stage outputs, vault); return counts by kind.

        Segments are per job: removing the job's folder removes every record of it, and nothing of another job.
        """
        self.close_segment(job_id)
        removed = {"received": len(self.file_ids(job_id))}  # instances, whether records or files
        remove_folder(self.root / job_id)
        for kind, folder in (("pseudonymised", self.work_root), ("results", self.results_root)):
            removed[kind] = remove_folder(folder / _check_id(job_id))
        vault = self.vault_root / f"{job_id}.vault"
        removed["vault"] = int(vault.exists())
        vault.unlink(missing_ok=True)
        return removed

    def read_instance(self, job_id: str, file_id: str) -> bytes:
        """The stored (sealed) bytes of an instance; ``FileNotFoundError`` if it is gone."""
        folder = self.root / _check_id(job_id)
        if segments.is_locator(file_id):
            return segments.read_record(folder, file_id)
        return (folder / f"{_check_id(file_id)}{SUFFIX}").read_bytes()

    def remove_instance(self, job_id: str, file_id: str) -> None:
        """Delete one instance (a duplicate that lost a race, a replaced copy, a write the sender was told failed)."""
        folder = self.root / _check_id(job_id)
        if segments.is_locator(file_id):
            segments.remove_record(folder, file_id)
        else:
            (folder / f"{_check_id(file_id)}{SUFFIX}").unlink(missing_ok=True)

    def job_ids(self) -> Iterator[str]:
        """Yield the id of every job folder present."""
        if self.root.is_dir():
            for entry in os.scandir(self.root):
                if entry.is_dir() and ID.match(entry.name):
                    yield entry.name

    def file_ids(self, job_id: str) -> list[str]:
        """The ids of the instances present for *job_id*: live segment records, and files of an older spool."""
        folder = self.root / _check_id(job_id)
        return [record.locator for record in segments.records(folder) if record.live] + file_ids(folder)

    def trim_segments(self) -> None:
        """Cut the space pre-allocated after the last record of every segment (start-up, no receiver running)."""
        for job_id in self.job_ids():
            segments.trim(self.root / job_id)

    def remove_temporaries(self) -> int:
        """Delete leftovers of writes interrupted by a crash; return how many."""
        removed = 0
        for pattern in ("spool/*/.*.tmp", "work/*/.*.tmp", "vault/.*.tmp", "results/*/.*.tmp", "export/*/.*.tmp"):
            for path in self.data_dir.glob(pattern):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def count_instances(data_dir: Path) -> int:
    """How many received instances the spool under *data_dir* holds (benchmarks and tests)."""
    spool = Spool(data_dir)
    return sum(len(spool.file_ids(job_id)) for job_id in spool.job_ids())
