"""The schema of the job database (:mod:`~gateway.store.jobs`, :mod:`~gateway.store.tasks`); no patient data anywhere.

Version 4 adds the pipeline: a job's tasks (one per series), the pseudonymised files of each
task, the deliveries of each result, and the time every stage took. Version 5 adds retention:
when a job finished, and the files written for folder destinations (kept until the deadline
even when the job's own data is shredded on delivery). Version 6 adds the count of instance
writes in flight (a study completes only after its last durable write) and of the pipeline
attempts that did not end (a job that kills the process is not retried forever). Version 7 adds the
key-encryption key that wraps each data key (``data_keys.kek``, ``NULL`` for keys wrapped by the master
key before) and the node's anchors (``anchors``: the master key's check value, the largest time seen,
the audit trail's head), none of which is patient data. Version 8 names a delivery waiting to be sent
``pending`` (it was ``reidentified``, the state of its task). Version 9 adds the contour QA record of each task
(``qa_findings``: structure names as the model or template calls them, check and reason codes, figures).
"""

from __future__ import annotations

__all__ = ["ADDED_COLUMNS", "MIGRATIONS", "SCHEMA", "SCHEMA_VERSION", "TASK_TABLES"]

SCHEMA_VERSION = 9
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    study_key TEXT NOT NULL,
    peer TEXT NOT NULL,
    quiet_seconds REAL NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    completed_at REAL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    previous_job_id TEXT,
    finished_at REAL,
    writing INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS one_receiving_job_per_study ON jobs(study_key)
    WHERE state = 'receiving';
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_by_study ON jobs(study_key);
CREATE TABLE IF NOT EXISTS instances (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    sop_key TEXT NOT NULL,
    file_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (job_id, sop_key)
);
CREATE TABLE IF NOT EXISTS quarantine (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    file_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined_at REAL NOT NULL,
    PRIMARY KEY (job_id, file_id)
);
CREATE TABLE IF NOT EXISTS data_keys (
    job_id TEXT PRIMARY KEY,
    wrapped BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS anchors (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    task_no INTEGER NOT NULL,
    route TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    instance_count INTEGER NOT NULL,
    PRIMARY KEY (job_id, task_no)
);
CREATE TABLE IF NOT EXISTS task_files (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    task_no INTEGER NOT NULL,
    file_id TEXT NOT NULL,
    PRIMARY KEY (job_id, file_id)
);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    task_no INTEGER NOT NULL,
    item INTEGER NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    reason TEXT,
    PRIMARY KEY (job_id, task_no, item, destination)
);
CREATE TABLE IF NOT EXISTS stage_times (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    task_no INTEGER NOT NULL,
    stage TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (job_id, task_no, stage)
);
CREATE TABLE IF NOT EXISTS qa_findings (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    task_no INTEGER NOT NULL,
    structure TEXT NOT NULL,
    qa_check TEXT NOT NULL,
    outcome TEXT NOT NULL,
    value REAL NOT NULL,
    reason TEXT,
    PRIMARY KEY (job_id, task_no, structure, qa_check)
);
CREATE TABLE IF NOT EXISTS exports (
    file_id TEXT PRIMARY KEY,
    destination TEXT NOT NULL,
    job_id TEXT NOT NULL,
    study TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""

#: What pseudonymisation derives from a job's received instances; dropped when it is redone.
TASK_TABLES = ("tasks", "task_files", "deliveries", "stage_times", "qa_findings")
#: Columns added after a table was first created: ``(table, column, declaration)``.
ADDED_COLUMNS = (
    ("jobs", "finished_at", "REAL"),
    ("jobs", "writing", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("data_keys", "kek", "TEXT"),
)
#: Statements that bring rows written by an earlier version up to date; each is harmless when run again.
MIGRATIONS = (
    "UPDATE deliveries SET state = 'pending' WHERE state = 'reidentified'",
)
