"""The runner on its own: what it does with a job that keeps failing for an unexpected reason."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from structlog.testing import capture_logs

from gateway.config import parse_config
from gateway.ops.audit import AuditLog
from gateway.pipeline.runner import Runner
from gateway.store.jobs import JobState, JobStore
from gateway.store.outputs import StageContext
from gateway.store.sealing import Sealer
from gateway.store.spool import Spool
from tests.conftest import key_ring


def test_an_unexpected_error_fails_the_job_after_three_tries_instead_of_looping(tmp_path: Path) -> None:
    config = parse_config({"node": {"data_dir": str(tmp_path / "var")}, "pipeline": {"poll_seconds": 0.05}})
    spool = Spool(config.node.data_dir)
    spool.prepare()
    jobs = JobStore(spool.database_path)
    job_id = jobs.reserve("d" * 64, "pacs", 1.0, time.time()).job_id
    jobs.record_instance(job_id, "e" * 64, "f" * 32, 10, time.time())  # its file is missing: reading it fails
    jobs.force_complete(job_id, time.time())
    clock = itertools.count(time.time(), 31.0)  # every look is past the 30 s deferral
    ctx = StageContext(spool, jobs, Sealer(key_ring(tmp_path / "keys"), jobs))
    runner = Runner(config, ctx, AuditLog(spool.audit_path), clock=lambda: float(next(clock)))
    with capture_logs() as logs:
        runner.start()
        deadline = time.monotonic() + 20
        while jobs.get(job_id).state is not JobState.FAILED and time.monotonic() < deadline:
            time.sleep(0.05)
        runner.stop()
    job = jobs.get(job_id)
    jobs.close()
    assert (job.state, job.reason) == (JobState.FAILED, "internal_error")
    assert sum(entry["event"] == "job_error" for entry in logs) == 3
    assert [entry["reason"] for entry in logs if entry["event"] == "alert"] == ["internal_error"]
    assert [entry["state"] for entry in logs if entry["event"] == "job_done"] == ["failed"]
