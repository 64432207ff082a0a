"""Encryption at rest: master key sources, sealed files, tampering, crypto-shredding."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.crypt import MAGIC, MasterKey, Purpose, Sealer
from gateway.errors import CryptoError, StartupError
from gateway.jobs import JobStore

JOB = "0123456789abcdef"
OTHER_JOB = "fedcba9876543210"


def _config(tmp_path: Path, **encryption: str) -> GatewayConfig:
    return parse_config({"node": {"data_dir": str(tmp_path / "var")}, "encryption": encryption})


@pytest.fixture
def jobs(tmp_path: Path) -> JobStore:
    (tmp_path / "var").mkdir()
    store = JobStore(tmp_path / "var" / "gateway.db")
    yield store
    store.close()


class TestMasterKey:
    def test_key_file_is_created_owner_only_and_reused(self, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONTOUR_GW_MASTER_KEY", raising=False)
        config = _config(tmp_path)
        first = MasterKey.load(config, create=True)
        path = tmp_path / "var" / "keys" / "master.key"
        assert path.stat().st_mode & 0o777 == 0o600
        assert len(path.read_bytes()) == 32
        assert MasterKey.load(config).key_id == first.key_id

    def test_missing_file_is_an_error_unless_created(self, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONTOUR_GW_MASTER_KEY", raising=False)
        with pytest.raises(StartupError, match="does not exist"):
            MasterKey.load(_config(tmp_path))

    def test_damaged_file_is_an_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONTOUR_GW_MASTER_KEY", raising=False)
        key_file = tmp_path / "elsewhere" / "master.key"
        key_file.parent.mkdir()
        key_file.write_bytes(b"short")
        with pytest.raises(StartupError, match="is damaged"):
            MasterKey.load(_config(tmp_path, master_key_file=str(key_file)), create=True)

    def test_environment_variable_wins_and_creates_no_file(self, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        key = bytes(range(32))
        monkeypatch.setenv("GW_TEST_KEY", base64.b64encode(key).decode())
        loaded = MasterKey.load(_config(tmp_path, master_key_env="GW_TEST_KEY"), create=True)
        assert loaded.key_id == MasterKey(key).key_id
        assert not (tmp_path / "var" / "keys" / "master.key").exists()

    @pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"too short").decode()])
    def test_malformed_environment_variable_is_an_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        value: str) -> None:
        monkeypatch.setenv("GW_TEST_KEY", value)
        with pytest.raises(StartupError, match=r"\$GW_TEST_KEY must be the base64 encoding of 32 random bytes"):
            MasterKey.load(_config(tmp_path, master_key_env="GW_TEST_KEY"))

    def test_derived_secrets_differ_by_purpose(self) -> None:
        master = MasterKey(bytes(32))
        assert master.derive("a") != master.derive("b")
        assert master.derive("a") == MasterKey(bytes(32)).derive("a")


class TestSealer:
    def test_round_trip_and_no_plaintext(self, jobs: JobStore) -> None:
        sealer = Sealer(MasterKey(bytes(32)), jobs)
        sealed = b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"CANARY^PATIENT", b" and more"]))
        assert sealed.startswith(MAGIC)
        assert b"CANARY" not in sealed
        assert sealer.open(JOB, Purpose.RECEIVED, sealed) == b"CANARY^PATIENT and more"

    def test_each_job_has_its_own_key_stored_only_wrapped(self, jobs: JobStore, tmp_path: Path) -> None:
        sealer = Sealer(MasterKey(bytes(32)), jobs)
        b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"x"]))
        b"".join(sealer.seal(OTHER_JOB, Purpose.RECEIVED, [b"x"]))
        wrapped = {jobs.load_data_key(JOB), jobs.load_data_key(OTHER_JOB)}
        assert len(wrapped) == 2 and None not in wrapped

    def test_tampered_file_does_not_open(self, jobs: JobStore) -> None:
        sealer = Sealer(MasterKey(bytes(32)), jobs)
        sealed = bytearray(b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"pixel data"])))
        sealed[-20] ^= 0x01
        with pytest.raises(CryptoError, match="failed authentication"):
            sealer.open(JOB, Purpose.RECEIVED, bytes(sealed))

    def test_file_moved_to_another_job_does_not_open(self, jobs: JobStore) -> None:
        sealer = Sealer(MasterKey(bytes(32)), jobs)
        sealed = b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"pixel data"]))
        b"".join(sealer.seal(OTHER_JOB, Purpose.RECEIVED, [b"other"]))
        with pytest.raises(CryptoError):
            sealer.open(OTHER_JOB, Purpose.RECEIVED, sealed)

    def test_wrong_master_key_does_not_open(self, jobs: JobStore) -> None:
        sealed = b"".join(Sealer(MasterKey(bytes(32)), jobs).seal(JOB, Purpose.RECEIVED, [b"pixel data"]))
        with pytest.raises(CryptoError, match="does not open with this master key"):
            Sealer(MasterKey(b"\x01" * 32), jobs).open(JOB, Purpose.RECEIVED, sealed)

    def test_deleting_the_data_key_shreds_the_job(self, jobs: JobStore, tmp_path: Path) -> None:
        sealer = Sealer(MasterKey(bytes(32)), jobs)
        sealed = b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"pixel data"]))
        with sqlite3.connect(tmp_path / "var" / "gateway.db") as db:
            db.execute("DELETE FROM data_keys WHERE job_id = ?", (JOB,))
        fresh = Sealer(MasterKey(bytes(32)), jobs)  # no cached key, as after a restart
        with pytest.raises(CryptoError, match="has no data key"):
            fresh.open(JOB, Purpose.RECEIVED, sealed)
        with pytest.raises(CryptoError, match="has no data key"):
            sealer.open(JOB, Purpose.RECEIVED, sealed)  # a cached key is not enough either

    def test_purposes_have_separate_keys(self, jobs: JobStore) -> None:
        sealer = Sealer(MasterKey(bytes(32)), jobs)
        vault_entry = b"".join(sealer.seal(JOB, Purpose.VAULT, [b"original identity"]))
        with pytest.raises(CryptoError, match="failed authentication"):
            sealer.open(JOB, Purpose.PSEUDONYMISED, vault_entry)
        assert sealer.open(JOB, Purpose.VAULT, vault_entry) == b"original identity"

    def test_two_processes_agree_on_one_key(self, tmp_path: Path) -> None:
        (tmp_path / "var").mkdir()
        first, second = JobStore(tmp_path / "var" / "gateway.db"), JobStore(tmp_path / "var" / "gateway.db")
        try:
            a, b = Sealer(MasterKey(bytes(32)), first), Sealer(MasterKey(bytes(32)), second)
            sealed_by_a = b"".join(a.seal(JOB, Purpose.RECEIVED, [b"from a"]))
            assert b.open(JOB, Purpose.RECEIVED, sealed_by_a) == b"from a"
            assert a.open(JOB, Purpose.RECEIVED, b"".join(b.seal(JOB, Purpose.RECEIVED, [b"from b"]))) == b"from b"
        finally:
            first.close()
            second.close()
