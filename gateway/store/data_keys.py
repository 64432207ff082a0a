"""The ``data_keys`` table: each job's data key, wrapped by the key-encryption key of its hour.

Deleting a row is the crypto-erasure of a job; a key-encryption key no row refers to any more can be
destroyed (:mod:`gateway.ops.retention`).
"""

from __future__ import annotations

from gateway.store.jobs import JobStore, WrappedKey

__all__ = ["DataKeys"]


class DataKeys:
    """The wrapped data keys of the jobs of one job database."""

    def __init__(self, jobs: JobStore) -> None:
        self._jobs = jobs

    def load(self, job_id: str) -> WrappedKey | None:
        """The wrapped data key of *job_id* and the key that wraps it, or ``None`` (never created, or shredded)."""
        with self._jobs.reading() as db:
            row = db.execute("SELECT wrapped, kek FROM data_keys WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else WrappedKey(bytes(row["wrapped"]), row["kek"])

    def store(self, job_id: str, key: WrappedKey) -> WrappedKey:
        """Store *key* durably unless the job has a key already; return the stored key."""
        with self._jobs.transaction(durable=True) as db:
            db.execute("INSERT OR IGNORE INTO data_keys (job_id, wrapped, kek) VALUES (?, ?, ?)",
                       (job_id, key.wrapped, key.kek))
            row = db.execute("SELECT wrapped, kek FROM data_keys WHERE job_id = ?", (job_id,)).fetchone()
        return WrappedKey(bytes(row["wrapped"]), row["kek"])

    def destroy(self, job_id: str) -> None:
        """Crypto-erase *job_id*: its data key is gone, durably, so none of its files opens again."""
        with self._jobs.transaction(durable=True) as db:
            db.execute("DELETE FROM data_keys WHERE job_id = ?", (job_id,))

    def forget_orphans(self) -> None:
        """Drop keys of jobs that no longer exist (made for a job shredded while an instance arrived)."""
        with self._jobs.transaction() as db:
            db.execute("DELETE FROM data_keys WHERE job_id NOT IN (SELECT job_id FROM jobs)")

    def keks_in_use(self) -> set[str]:
        """The key-encryption keys that still wrap a data key."""
        with self._jobs.reading() as db:
            return {row["kek"] for row in db.execute("SELECT DISTINCT kek FROM data_keys WHERE kek IS NOT NULL")}

    def first_received_by_kek(self) -> dict[str, float]:
        """Per job, the first instance's time of the earliest job whose data key the same KEK wraps."""
        with self._jobs.reading() as db:
            rows = db.execute("SELECT k.job_id, k.kek, j.created_at FROM data_keys k JOIN jobs j USING (job_id) "
                              "WHERE k.kek IS NOT NULL").fetchall()
        earliest: dict[str, float] = {}
        for row in rows:
            earliest[row["kek"]] = min(earliest.get(row["kek"], row["created_at"]), row["created_at"])
        return {row["job_id"]: earliest[row["kek"]] for row in rows}
