"""The job database: one SQLite file under ``data_dir``, shared by the node's processes (WAL mode).

Opening it creates or upgrades the schema (:mod:`gateway.store.schema`); every table is reached through
:class:`Database` subclasses and helpers of :mod:`gateway.store`, the only code with SQL. ``synchronous`` is
``NORMAL`` except in durable transactions (``FULL``): job creation, data keys, shredding.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.store.schema import ADDED_COLUMNS, MIGRATIONS, SCHEMA, SCHEMA_VERSION, TASK_TABLES

__all__ = ["Database", "forget_tasks"]


class Database:
    """Thread-safe access to the job database of one process."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        self._add_columns()

    def _add_columns(self) -> None:
        with self.transaction() as db:
            for table, column, declaration in ADDED_COLUMNS:
                present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            for statement in MIGRATIONS:
                db.execute(statement)

    def close(self) -> None:
        """Close the connection (checkpointing the WAL when this is the last one)."""
        with self._lock:
            self._db.close()

    def delete(self, job_id: str) -> None:
        """Forget *job_id* and every row that belongs to it (durably: retention has shredded it)."""
        with self.transaction(durable=True) as db:
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database and truncate it (raises ``sqlite3.Error`` when busy)."""
        with self.reading() as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, held by this thread, for reads."""
        with self._lock:
            yield self._db

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed on exit, rolled back on an exception."""
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")


def forget_tasks(db: sqlite3.Connection, job_id: str) -> None:
    """Delete everything pseudonymisation derived for *job_id* (inside the caller's transaction)."""
    for table in TASK_TABLES:
        db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
