"""Retention: every study is gone before its deadline, under downtime and crashes, with nothing left behind."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import Retention
from gateway.errors import CryptoError
from gateway.identity.vault import Vault
from gateway.ops.audit import AuditLog, verify
from gateway.ops.retention import Shredder
from gateway.ops.sweeps import SweepSchedule
from gateway.store.data_keys import DataKeys
from gateway.store.jobs import JobState, JobStore
from gateway.store.keys import KeyRing
from gateway.store.sealing import Purpose, Sealer
from gateway.store.spool import Spool
from gateway.store.tasks import Export, NewTask, TaskStore
from tests.conftest import REPO, NodeProcess, dcmtk_env, free_port, key_config, key_ring, require_tool
from tests.identity.canary import CanaryStudy, canary_study  # noqa: F401 (a fixture)

T0 = 1_800_000_000.0
DAY = 86_400


def _store(tmp_path: Path) -> tuple[Spool, JobStore, Sealer, AuditLog]:
    spool = Spool(tmp_path / "var")
    spool.prepare()
    jobs = JobStore(spool.database_path)
    return spool, jobs, Sealer(key_ring(tmp_path / "keys"), jobs), AuditLog(spool.audit_path)


def test_a_thousand_studies_over_two_days_are_each_shredded_before_their_deadline(tmp_path: Path) -> None:
    spool, jobs, sealer, audit = _store(tmp_path)
    retention = Retention()
    rng = random.Random(7)
    received: dict[str, float] = {}
    for n in range(1000):
        at = T0 + rng.uniform(0, 2 * DAY)
        job_id = jobs.reserve(f"{n:064x}", "pacs", 30.0, at).job_id
        file_id, size = spool.write_instance(job_id, sealer.seal(job_id, Purpose.RECEIVED, [b"pixels"]))
        jobs.record_instance(job_id, f"{n:064x}", file_id, size, at)
        fate = n % 4  # stuck receiving, complete, delivered an hour later, failed
        if fate:
            jobs.force_complete(job_id, at + 30)
        if fate >= 2:
            jobs.set_state(job_id, JobState.SENT if fate == 2 else JobState.FAILED, now=at + 3600)
        received[job_id] = at
    shredder = Shredder(spool, jobs, retention, audit)
    shredded_at: dict[str, float] = {}
    now = T0
    while now < T0 + 3 * DAY + 600:
        for job in shredder.sweep(now).jobs:
            shredded_at[job.job_id] = now
        now += retention.sweep_interval_seconds + rng.uniform(0, 30)  # a sweep may start up to 30 s late
    assert set(shredded_at) == set(received)
    ages = [shredded_at[job_id] - at for job_id, at in received.items()]
    assert max(ages) < retention.max_age_seconds
    assert jobs.jobs() == [] and spool.stored_job_ids() == set()
    result = verify(spool.audit_path, retention.max_age_seconds, now)
    assert result.ok and len(result.jobs) == 1000
    jobs.close()


def test_dry_run_deletes_nothing_and_a_shredded_job_cannot_be_decrypted(tmp_path: Path) -> None:
    spool, jobs, sealer, audit = _store(tmp_path)
    job_id = jobs.reserve("f" * 64, "pacs", 30.0, T0).job_id
    sealed = sealer.seal(job_id, Purpose.RECEIVED, [b"pixels"])
    spool.write_instance(job_id, sealed)
    shredder = Shredder(spool, jobs, Retention(), audit)
    assert [j.job_id for j in shredder.sweep(T0 + DAY, dry_run=True).jobs] == [job_id]
    assert spool.stored_job_ids() == {job_id} and DataKeys(jobs).load(job_id) is not None
    assert [j.why for j in shredder.sweep(T0 + DAY).jobs] == ["deadline"]
    assert DataKeys(jobs).load(job_id) is None and spool.stored_job_ids() == set()
    with pytest.raises(CryptoError):
        Sealer(key_ring(tmp_path / "keys"), jobs).open(job_id, Purpose.RECEIVED, b"".join(sealed))
    jobs.close()


def test_the_sweep_schedule_never_skips_a_late_run() -> None:
    schedule = SweepSchedule(Shredder.__new__(Shredder), 300)
    schedule.start()
    try:
        job = schedule._scheduler.get_job("retention-sweep")
        assert (job.misfire_grace_time, job.coalesce, job.max_instances) == (None, True, 1)
        assert schedule.running
    finally:
        schedule.stop()
    assert not schedule.running


def _send(node: NodeProcess, files: list[Path]) -> None:
    result = subprocess.run([require_tool("storescu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                             str(node.port), *map(str, files)], capture_output=True, text=True, env=dcmtk_env(),
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def _age_by(data_dir: Path, seconds: float) -> None:
    """Move every receipt time back, as if the node had been down that long."""
    with sqlite3.connect(data_dir / "gateway.db") as db:
        db.execute("UPDATE jobs SET created_at = created_at - ?, last_received_at = last_received_at - ?",
                   (seconds, seconds))
        db.execute("UPDATE exports SET received_at = received_at - ?", (seconds,))


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)


def test_shredding_the_canary_study_leaves_no_trace(node_factory: Callable[..., NodeProcess],
                                                    canary_study: CanaryStudy, tmp_path: Path) -> None:  # noqa: F811
    temp = tmp_path / "node-tmp"
    temp.mkdir()
    node = node_factory(env={"TMPDIR": str(temp)})
    _send(node, canary_study.files)
    job_id = node.wait_for("job_done", timeout=60)["job_id"]
    assert node.stop() == 0
    ring = KeyRing.open(key_config(node.data_dir))
    spool, jobs = Spool(node.data_dir), JobStore(node.data_dir / "gateway.db")
    pseudo_uids = list(Vault(spool, Sealer(ring, jobs)).load(job_id).uids)
    [old_file] = spool.file_ids(job_id)[:1]
    ciphertext = spool.read_instance(job_id, old_file)
    jobs.close()
    _age_by(node.data_dir, DAY)
    shred = _cli(node.config_path, "shred")
    assert shred.returncode == 0 and f"shredded: job {job_id}" in shred.stdout, shred.stderr

    sinks = {"node log": node.log_text(), "shred output": shred.stdout + shred.stderr}
    for root in (node.data_dir, temp):
        for path in root.rglob("*"):
            if path.is_file():  # every file: database, WAL, journal, keys, audit trail, temporaries
                sinks[str(path)] = path.read_bytes().decode("latin-1")
    assert any(name.endswith("gateway.db") for name in sinks)
    needles = [*canary_study.texts, *pseudo_uids]
    assert [(needle, sink) for needle in needles for sink, text in sinks.items() if needle in text] == []
    jobs = JobStore(node.data_dir / "gateway.db")
    try:
        assert DataKeys(jobs).load(job_id) is None and jobs.jobs() == []
        with pytest.raises(CryptoError):
            Sealer(ring, jobs).open(job_id, Purpose.RECEIVED, ciphertext)
    finally:
        jobs.close()
    assert _cli(node.config_path, "audit", "verify").returncode == 0


def test_overdue_studies_are_gone_before_the_first_association_after_downtime(
        node_factory: Callable[..., NodeProcess], canary_study: CanaryStudy) -> None:  # noqa: F811
    node = node_factory()
    _send(node, canary_study.files)
    node.wait_for("job_done", timeout=60)
    assert node.stop() == 0
    _age_by(node.data_dir, DAY - 30)  # down across the deadline
    again = node_factory(config_path=node.config_path)
    events = [e["event"] for e in again.events()]
    assert events.index("job_shredded") < events.index("startup_sweep_done") < events.index("node_started")
    assert not (node.data_dir / "spool").exists() or not any((node.data_dir / "spool").iterdir())


def test_the_running_node_sweeps_on_schedule_and_failed_deliveries_wait_for_the_deadline(
        node_factory: Callable[..., NodeProcess], canary_study: CanaryStudy) -> None:  # noqa: F811
    closed = {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": free_port(), "retry": {"max_attempts": 1}}
    route = {"name": "ct", "match": {"Modality": "CT"}, "model": "default", "destinations": ["tps"]}
    node = node_factory(destinations=[closed], routes=[route], extra="[retention]\nsweep_interval_seconds = 1")
    _send(node, canary_study.files)
    done = node.wait_for("job_done", timeout=60)
    assert done["state"] in ("dead_letter", "failed")  # undeliverable, or nothing found in 32 x 32 noise
    assert not any(e["event"] == "job_shredded" for e in node.events())  # kept: nobody has it yet
    _age_by(node.data_dir, DAY)
    shredded = node.wait_for("job_shredded", timeout=10)
    assert (shredded["why"], shredded["job_id"]) == ("deadline", done["job_id"])
    assert _cli(node.config_path, "audit", "verify").returncode == 0


def test_folder_exports_outlive_delivery_but_not_the_deadline(tmp_path: Path) -> None:
    spool, jobs, sealer, audit = _store(tmp_path)
    job_id = jobs.reserve("e" * 64, "pacs", 30.0, T0).job_id
    spool.write_instance(job_id, sealer.seal(job_id, Purpose.RECEIVED, [b"pixels"]))
    TaskStore(jobs).record_export(Export("a" * 32, "folder", job_id, "study", T0))
    spool.write_export("folder", "a" * 32, [b"DICM result"])
    spool.write_export("folder", "b" * 32, [b"DICM stray"])  # no record: nothing may keep it
    jobs.set_state(job_id, JobState.SENT, now=T0 + 60)
    shredder = Shredder(spool, jobs, Retention(), audit)
    assert [j.why for j in shredder.sweep(T0 + 61).jobs] == ["delivered"]
    assert spool.stored_job_ids() == set() and spool.export_files() == [("folder", "a" * 32)]
    assert not verify(spool.audit_path, DAY, T0 + 61).jobs[job_id].deleted_at  # the export is still held
    assert [e.file_id for e in shredder.sweep(T0 + DAY - 300).exports] == ["a" * 32]
    assert spool.export_files() == []
    result = verify(spool.audit_path, DAY, T0 + DAY)
    assert result.ok and result.jobs[job_id].deleted_at == pytest.approx(T0 + DAY - 300, abs=0.01)
    jobs.close()


def test_a_study_held_by_contour_qa_is_shredded_at_its_deadline_not_kept_for_review(tmp_path: Path) -> None:
    """A series nobody released stays ``held``: it waits for a human, never past the 24 hours."""
    spool, jobs, sealer, audit = _store(tmp_path)
    job_id = jobs.reserve("e" * 64, "pacs", 30.0, T0).job_id
    spool.write_instance(job_id, sealer.seal(job_id, Purpose.RECEIVED, [b"pixels"]))
    jobs.force_complete(job_id, T0 + 30)
    tasks = TaskStore(jobs)
    tasks.create(job_id, [NewTask("thorax", ["0" * 32])], duration_ms=5, now=T0 + 31)
    tasks.advance(job_id, 1, JobState.HELD, stage="structure", duration_ms=7, now=T0 + 60, reason="qa_failed")
    assert jobs.get(job_id).state is JobState.HELD
    shredder = Shredder(spool, jobs, Retention(), audit)
    assert shredder.sweep(T0 + DAY / 2).jobs == []  # held for review within the day
    assert [(j.job_id, j.state, j.why) for j in shredder.sweep(T0 + DAY).jobs] == [(job_id, "held", "deadline")]
    assert jobs.jobs() == [] and spool.stored_job_ids() == set()
    jobs.close()
