"""Privacy promises on their unhappy paths: retention that cannot be stopped, erasure that reaches copies, keys.

Each test reproduces an attack or a failure first (a node that cannot start, a clock set back, a
copy of data_dir, a wrong key, a truncated audit trail), then checks the promise still holds.
"""

from __future__ import annotations

import base64
import configparser
import multiprocessing
import os
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config import Retention
from gateway.errors import CryptoError
from gateway.ops.audit import AuditLog, verify
from gateway.ops.metrics import Metrics, NodeCounters
from gateway.ops.retention import Shredder
from gateway.store.anchors import RetentionClock
from gateway.store.data_keys import DataKeys
from gateway.store.jobs import JobStore
from gateway.store.keys import KeyRing
from gateway.store.sealing import Purpose, Sealer
from gateway.store.spool import Spool
from tests.conftest import (
    REPO,
    CTSeries,
    NodeProcess,
    dcmtk_env,
    key_config,
    node_key_file,
    require_tool,
    spooled_instances,
    write_config,
)
from tests.pki import make_pki

DAY = 86_400
HOUR = 3600
T0 = 1_800_000_000.0
HELD = [{"name": "pacs", "ae_title": "*", "host": "127.0.0.1", "quiet_seconds": 600}]  # stays receiving


def _cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False, env={**os.environ, **(env or {})})


def _send(node: NodeProcess, series: CTSeries) -> str:
    result = subprocess.run([require_tool("storescu"), "-aet", "PACS", "-aec", "CONTOUR_GW", "127.0.0.1",
                             str(node.port), *map(str, series.files)], capture_output=True, text=True,
                            env=dcmtk_env(), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert len(spooled_instances(node.data_dir)) == len(series.files)
    return str(node.wait_for("job_created")["job_id"])


def _age_by(data_dir: Path, seconds: float) -> None:
    """Move every receipt time back, as if the study had arrived that much earlier."""
    with sqlite3.connect(data_dir / "gateway.db") as db:
        db.execute("UPDATE jobs SET created_at = created_at - ?, last_received_at = last_received_at - ?",
                   (seconds, seconds))


def _job_ids(data_dir: Path) -> list[str]:
    jobs = JobStore(data_dir / "gateway.db")
    try:
        return [job.job_id for job in jobs.jobs()]
    finally:
        jobs.close()


@pytest.fixture
def held_study(node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries]) -> Iterator[NodeProcess]:
    """A node that received one study (still in its quiet period) and was stopped."""
    node = node_factory(peers=HELD)
    node.job_id = _send(node, ct_series(count=3))  # type: ignore[attr-defined]
    assert node.stop() == 0
    yield node


def _stored_job(tmp_path: Path, created_at: float, study: str = "a") -> tuple[Spool, str]:
    """A job with one sealed instance, written as a receiver would, first instance at *created_at*."""
    spool = Spool(tmp_path / "var")
    spool.prepare()
    jobs = JobStore(spool.database_path)
    try:
        job_id = jobs.reserve(study * 64, "pacs", 30.0, created_at).job_id
        sealer = Sealer(KeyRing.open(key_config(spool.data_dir)), jobs)
        file_id, size = spool.write_instance(job_id, sealer.seal(job_id, Purpose.RECEIVED, [b"CANARY pixels"]))
        jobs.record_instance(job_id, "b" * 64, file_id, size, created_at)
        jobs.release(job_id)
    finally:
        jobs.close()
    return spool, job_id


class TestRetentionNeedsNothingButItsSections:
    def test_an_overdue_study_is_shredded_although_the_certificate_expired(
            self, held_study: NodeProcess, tmp_path: Path) -> None:
        node = held_study
        _age_by(node.data_dir, DAY - 120)  # due (a sweep's lead before the deadline), not yet over the ceiling
        pki = make_pki(tmp_path / "pki")
        tls = (f'[node.tls]\ncertificate_file = "{pki.expired.certificate}"\n'
               f'private_key_file = "{pki.expired.key}"\nca_file = "{pki.ca}"\n')
        config = write_config(tmp_path / "expired.toml", node.data_dir, peers=HELD, extra_node=tls)
        refused = _cli(config, "serve")
        assert refused.returncode == 2 and "expired on" in refused.stderr
        assert _job_ids(node.data_dir) == [] and spooled_instances(node.data_dir) == []
        assert '"event": "job_shredded"' in refused.stdout
        verified = _cli(config, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr

    def test_shred_works_with_a_config_whose_other_sections_are_invalid(self, tmp_path: Path) -> None:
        spool, job_id = _stored_job(tmp_path, created_at=time.time() - DAY)
        config = tmp_path / "broken.toml"
        config.write_text(f'[node]\ndata_dir = "{spool.data_dir}"\nport = 99999\nae_title = "WAY_TOO_LONG_AE_TITLE"\n'
                          '[inference]\nthreads = -1\n'
                          f'[encryption]\nmaster_key_file = "{node_key_file(spool.data_dir)}"\n')
        assert _cli(config, "status").returncode == 2  # the node itself would not start
        result = _cli(config, "shred")
        assert result.returncode == 0, result.stderr
        assert f"shredded: job {job_id}" in result.stdout
        assert "ignored (not needed to shred): node.port" in result.stderr
        assert "ignored (not needed to shred): inference.threads" in result.stderr
        assert spool.stored_job_ids() == set()

    def test_the_systemd_timer_service_shreds_while_the_node_is_down(self, tmp_path: Path) -> None:
        spool, job_id = _stored_job(tmp_path, created_at=time.time() - DAY)
        config = write_config(tmp_path / "gateway.toml", spool.data_dir)
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read(REPO / "deploy" / "contour-gateway-shred.service")
        command = shlex.split(unit["Service"]["ExecStart"])
        assert command[0].endswith("/python") and command[1:4] == ["-m", "gateway", "shred"]
        command = [sys.executable, *command[1:command.index("--config") + 1], str(config)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert f"shredded: job {job_id}" in result.stdout and spool.stored_job_ids() == set()


class TestOneFailureDoesNotStopTheSweep:
    def test_an_unshreddable_job_is_alerted_counted_and_retried(self, tmp_path: Path) -> None:
        spool, stuck = _stored_job(tmp_path, created_at=T0, study="a")
        _, other = _stored_job(tmp_path, created_at=T0 + 1, study="c")
        [pinned] = list((spool.root / stuck).iterdir())
        subprocess.run(["chattr", "+i", str(pinned)], check=True)  # unlink fails even for root: EPERM
        jobs = JobStore(spool.database_path)
        metrics = Metrics(NodeCounters.create(multiprocessing.get_context(), 0), jobs, spool.data_dir, DAY)
        shredder = Shredder(spool, jobs, Retention(), AuditLog(spool.audit_path), on_sweep=metrics.sweep)
        try:
            with capture_logs() as logs:
                report = shredder.sweep(T0 + DAY)
            assert report.failed == [stuck] and [j.job_id for j in report.jobs] == [other]
            assert next(e for e in logs if e["event"] == "alert")["outcome"] == "shred_failed"
            assert metrics.registry.get_sample_value("gateway_retention_shred_failures_total") == 1
            assert DataKeys(jobs).load(stuck) is None  # crypto-erased already: the files no longer open
        finally:
            subprocess.run(["chattr", "-i", str(pinned)], check=True)
        retried = shredder.sweep(T0 + DAY + 300)
        assert [j.job_id for j in retried.jobs] == [stuck] and retried.failed == []
        assert spool.stored_job_ids() == set()
        jobs.close()


    def test_an_unwritable_audit_trail_keeps_the_job_for_the_next_sweep(self, tmp_path: Path) -> None:
        spool, job_id = _stored_job(tmp_path, created_at=T0)
        spool.audit_path.parent.mkdir(parents=True, exist_ok=True)
        spool.audit_path.touch()
        jobs = JobStore(spool.database_path)
        shredder = Shredder(spool, jobs, Retention(), AuditLog(spool.audit_path))
        subprocess.run(["chattr", "+i", str(spool.audit_path)], check=True)  # not even root may write it
        try:
            report = shredder.sweep(T0 + DAY - 350)
            assert report.failed == [job_id] and report.jobs == []
            assert jobs.exists(job_id) and DataKeys(jobs).load(job_id) is None  # erased, not yet recorded
        finally:
            subprocess.run(["chattr", "-i", str(spool.audit_path)], check=True)
        assert [j.job_id for j in shredder.sweep(T0 + DAY - 50).jobs] == [job_id]  # the next sweep
        assert not jobs.exists(job_id)
        result = verify(spool.audit_path, DAY, T0 + DAY, held={})
        assert result.ok and result.jobs[job_id].deleted_at is not None
        jobs.close()


class _Clocks:
    """A wall clock that can be stepped and a boot clock that only runs forward."""

    def __init__(self, wall: float) -> None:
        self.wall, self.boot, self.boot_id = wall, 1000.0, "boot-1"

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds


class TestWallClockJumps:
    def _setup(self, tmp_path: Path) -> tuple[JobStore, Shredder, _Clocks, str]:
        spool, job_id = _stored_job(tmp_path, created_at=T0)
        jobs = JobStore(spool.database_path)
        clocks = _Clocks(T0)
        clock = RetentionClock(jobs, wall=lambda: clocks.wall, boot=lambda: (clocks.boot_id, clocks.boot))
        shredder = Shredder(spool, jobs, Retention(), AuditLog(spool.audit_path), clock=clock.now)
        return jobs, shredder, clocks, job_id

    def test_a_clock_set_back_does_not_extend_a_study_life(self, tmp_path: Path) -> None:
        jobs, shredder, clocks, job_id = self._setup(tmp_path)
        clocks.run(23 * HOUR)
        assert shredder.sweep().jobs == []
        clocks.wall -= 12 * HOUR  # set back by hand: the wall clock now says T0 + 11 h
        clocks.run(HOUR)  # an hour later in real time: T0 + 24 h, past the deadline
        with capture_logs() as logs:
            assert [j.job_id for j in shredder.sweep().jobs] == [job_id]
        assert any(e["event"] == "clock_behind" for e in logs)
        jobs.close()

    def test_after_a_reboot_with_the_clock_behind_time_does_not_go_back(self, tmp_path: Path) -> None:
        jobs, shredder, clocks, job_id = self._setup(tmp_path)
        clocks.run(DAY - 10 * 60)
        assert shredder.sweep().jobs == []  # T0 + 23 h 50 min: not due yet (lead 6 min)
        clocks.boot_id, clocks.boot, clocks.wall = "boot-2", 5.0, T0  # rebooted, the RTC a day behind
        assert shredder.sweep().jobs == []  # the time already seen, not the RTC's
        clocks.run(5 * 60)  # five minutes later: T0 + 23 h 55 min by the time seen, past the shred point
        assert [j.job_id for j in shredder.sweep().jobs] == [job_id]
        jobs.close()

    def test_a_clock_set_forward_shreds_early(self, tmp_path: Path) -> None:
        jobs, shredder, clocks, job_id = self._setup(tmp_path)
        clocks.run(HOUR)
        assert shredder.sweep().jobs == []
        clocks.wall += 30 * HOUR
        assert [j.job_id for j in shredder.sweep().jobs] == [job_id]
        jobs.close()

    def test_a_job_received_while_the_clock_is_behind_starts_at_the_time_seen(self, tmp_path: Path) -> None:
        jobs, shredder, clocks, _ = self._setup(tmp_path)
        clocks.run(10 * HOUR)
        shredder.sweep()
        late = jobs.reserve("d" * 64, "pacs", 30.0, T0 - 5 * HOUR).job_id  # a receiver reading a wall clock set back
        assert jobs.get(late).created_at == pytest.approx(T0 + 10 * HOUR)
        jobs.close()


class TestAuditAnchors:
    def test_records_cut_off_the_end_of_the_trail_are_detected(self, held_study: NodeProcess) -> None:
        node = held_study
        _age_by(node.data_dir, DAY - 120)
        assert _cli(node.config_path, "shred").returncode == 0
        trail = node.data_dir / "audit" / "audit.jsonl"
        lines = trail.read_bytes().splitlines(keepends=True)
        assert lines and _cli(node.config_path, "audit", "verify").returncode == 0
        trail.write_bytes(b"".join(lines[:-1]))  # the deletion record of the study removed
        result = _cli(node.config_path, "audit", "verify")
        assert result.returncode == 1 and "records were cut off" in result.stderr
        trail.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b'"why":"deadline"', b'"why":"delivered"'))
        rewritten = _cli(node.config_path, "audit", "verify")
        assert rewritten.returncode == 1 and "was rewritten" in rewritten.stderr

    def test_a_study_held_past_the_ceiling_fails_verification_without_any_record(self, tmp_path: Path) -> None:
        spool, job_id = _stored_job(tmp_path, created_at=time.time() - DAY - 60)  # never completed: no record
        config = write_config(tmp_path / "gateway.toml", spool.data_dir)
        result = _cli(config, "audit", "verify")
        assert result.returncode == 1
        assert f"{job_id}  study -  HELD after 24.0" in result.stdout
        assert "OVER CEILING (in the job table, no audit record)" in result.stdout

    def test_sequence_numbers_continue_an_older_trail(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        path.write_text('{"time":"2026-01-01T00:00:00.000+00:00","event":"x","prev":"%s"}\n' % ("0" * 64))
        heads: list[tuple[int, str]] = []
        AuditLog(path, anchor=lambda seq, digest: heads.append((seq, digest))).append("y", T0)
        assert heads[0][0] == 2
        assert verify(path, DAY, T0, head=heads[0]).cut is None


class TestErasureReachesCopies:
    def test_a_copy_of_data_dir_taken_before_the_shred_no_longer_decrypts(self, held_study: NodeProcess,
                                                                          tmp_path: Path) -> None:
        node, job_id = held_study, held_study.job_id  # type: ignore[attr-defined]
        backup = tmp_path / "backup-of-data-dir"
        shutil.copytree(node.data_dir, backup)
        opened = _open_copy(backup, node.data_dir, job_id)
        assert b"DICM" in opened  # the copy is readable now, so the test below can fail
        result = _cli(node.config_path, "shred", env={"CONTOUR_GW_FAILPOINT": f"clock:{DAY + 2 * HOUR}"})
        assert result.returncode == 0 and "destroyed: key-encryption key" in result.stdout, result.stderr
        with pytest.raises(CryptoError, match="was destroyed"):
            _open_copy(backup, node.data_dir, job_id)


def _open_copy(copy: Path, data_dir: Path, job_id: str) -> bytes:
    """An instance of *job_id* from a copy of data_dir, opened with the node's master key and key directory."""
    jobs = JobStore(copy / "gateway.db")
    try:
        spool = Spool(copy)
        [file_id, *_] = spool.file_ids(job_id)
        return Sealer(KeyRing.open(key_config(data_dir)), jobs).open(job_id, Purpose.RECEIVED,
                                                                     spool.read_instance(job_id, file_id))
    finally:
        jobs.close()


class TestMasterKeyHandling:
    def test_without_a_key_the_node_refuses_to_start_and_creates_none(self, tmp_path: Path) -> None:
        config = write_config(tmp_path / "gateway.toml", tmp_path / "var", extra="[encryption]")
        env = {"CONTOUR_GW_MASTER_KEY": ""}
        result = _cli(config, "serve", env=env)
        assert result.returncode == 2 and "no master key" in result.stderr and "keygen" in result.stderr
        assert not any(p.name.endswith(".key") for p in tmp_path.rglob("*"))

    def test_a_key_inside_data_dir_is_refused(self, tmp_path: Path) -> None:
        key = tmp_path / "var" / "master.key"
        assert _cli_plain("keygen", "--out", str(key)).returncode == 0
        config = write_config(tmp_path / "gateway.toml", tmp_path / "var",
                              extra=f'[encryption]\nmaster_key_file = "{key}"')
        result = _cli(config, "serve")
        assert result.returncode == 2 and "lies inside data_dir" in result.stderr

    def test_a_different_key_is_refused_before_any_job_runs(self, held_study: NodeProcess, tmp_path: Path) -> None:
        node = held_study
        other = tmp_path / "other" / "master.key"
        assert _cli_plain("keygen", "--out", str(other)).returncode == 0
        config = write_config(tmp_path / "other.toml", node.data_dir, peers=HELD,
                              extra=f'[encryption]\nmaster_key_file = "{other}"')
        result = _cli(config, "serve")
        assert result.returncode == 2 and "is not the one this data_dir was sealed with" in result.stderr
        assert "node_started" not in result.stdout and "job_" not in result.stdout.replace("job_shredded", "")
        assert _job_ids(node.data_dir) == [node.job_id]  # type: ignore[attr-defined]

    def test_keygen_writes_owner_only_files_and_never_overwrites(self, tmp_path: Path) -> None:
        env_file = tmp_path / "env"
        made = _cli_plain("keygen", "--env-file", str(env_file))
        assert made.returncode == 0 and stat.S_IMODE(env_file.stat().st_mode) == 0o600
        name, _, value = env_file.read_text().strip().partition("=")
        assert name == "CONTOUR_GW_MASTER_KEY" and len(base64.b64decode(value, validate=True)) == 32
        again = _cli_plain("keygen", "--env-file", str(env_file))
        assert again.returncode == 1 and "never overwritten" in again.stderr
        assert env_file.read_text().strip().partition("=")[2] == value


def _cli_plain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60, check=False)


class TestFileModes:
    def test_everything_under_data_dir_is_owner_only_whatever_the_umask(
            self, node_factory: Callable[..., NodeProcess], ct_series: Callable[..., CTSeries],
            tmp_path: Path) -> None:
        (tmp_path / "var" / "work").mkdir(parents=True, mode=0o755)  # left by an older version
        os.chmod(tmp_path / "var" / "work", 0o755)
        previous = os.umask(0o022)
        try:
            node = node_factory(destinations=[{"name": "folder", "type": "folder"}],
                                routes=[{"name": "ct", "match": {"Modality": "CT"}, "model": "default",
                                         "destinations": ["folder"]}])
        finally:
            os.umask(previous)
        _send(node, ct_series(count=3))
        node.wait_for("job_done", timeout=90)
        loose = [(str(path.relative_to(tmp_path)), oct(stat.S_IMODE(path.stat().st_mode)))
                 for root in (node.data_dir, tmp_path / "keys") for path in [root, *root.rglob("*")]
                 if stat.S_IMODE(path.stat().st_mode) != (0o700 if path.is_dir() else 0o600)]
        assert loose == []
        assert {p.name for p in node.data_dir.iterdir()} >= {"gateway.db", "audit", "spool", "work"}

