"""Encryption at rest: master key sources, sealed files, tampering, crypto-shredding."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.errors import CryptoError, StartupError
from gateway.store.data_keys import DataKeys
from gateway.store.jobs import JobStore, WrappedKey
from gateway.store.keys import KekFiles, KeyRing, MasterKey, create_key_file, kek_period
from gateway.store.sealing import MAGIC, Purpose, Sealer
from tests.conftest import key_ring

JOB = "0123456789abcdef"
OTHER_JOB = "fedcba9876543210"


def _config(tmp_path: Path, **encryption: str) -> GatewayConfig:
    return parse_config({"node": {"data_dir": str(tmp_path / "var")}, "encryption": encryption})


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return key_ring(tmp_path / "keys")


@pytest.fixture
def jobs(tmp_path: Path) -> JobStore:
    (tmp_path / "var").mkdir()
    store = JobStore(tmp_path / "var" / "gateway.db")
    yield store
    store.close()


class TestMasterKey:
    def test_no_key_configured_is_refused_and_none_is_created(self, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONTOUR_GW_MASTER_KEY", raising=False)
        with pytest.raises(StartupError, match=r"no master key.*python -m gateway keygen"):
            MasterKey.load(_config(tmp_path))
        assert not any(tmp_path.rglob("*.key"))

    def test_missing_file_is_an_error_naming_keygen(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONTOUR_GW_MASTER_KEY", raising=False)
        key_file = tmp_path / "keys" / "master.key"
        with pytest.raises(StartupError, match=f"does not exist.*keygen --out {key_file}"):
            MasterKey.load(_config(tmp_path, master_key_file=str(key_file)))
        assert not key_file.exists()

    def test_a_key_inside_data_dir_is_refused_unless_allowed(self, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONTOUR_GW_MASTER_KEY", raising=False)
        key_file = tmp_path / "var" / "keys" / "master.key"
        create_key_file(key_file)
        with pytest.raises(StartupError, match="lies inside data_dir"):
            MasterKey.load(_config(tmp_path, master_key_file=str(key_file)))
        allowed = parse_config({"node": {"data_dir": str(tmp_path / "var")},
                                "encryption": {"master_key_file": str(key_file), "allow_keys_in_data_dir": True}})
        assert MasterKey.load(allowed).key_id == MasterKey(key_file.read_bytes()).key_id

    def test_key_dir_inside_data_dir_is_refused(self, tmp_path: Path) -> None:
        config = _config(tmp_path, key_dir=str(tmp_path / "var" / "keks"))
        with pytest.raises(StartupError, match=r"encryption.key_dir .* lies inside data_dir"):
            KekFiles.of(config)

    def test_environment_key_needs_a_key_dir(self, tmp_path: Path) -> None:
        with pytest.raises(StartupError, match="no key directory"):
            KekFiles.of(_config(tmp_path))

    def test_damaged_file_is_an_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CONTOUR_GW_MASTER_KEY", raising=False)
        key_file = tmp_path / "elsewhere" / "master.key"
        key_file.parent.mkdir()
        key_file.write_bytes(b"short")
        with pytest.raises(StartupError, match="is damaged"):
            MasterKey.load(_config(tmp_path, master_key_file=str(key_file)))

    def test_keygen_file_is_owner_only_and_never_overwritten(self, tmp_path: Path) -> None:
        key_file = tmp_path / "keys" / "master.key"
        create_key_file(key_file)
        first = key_file.read_bytes()
        assert key_file.stat().st_mode & 0o777 == 0o600 and len(first) == 32
        with pytest.raises(FileExistsError):
            create_key_file(key_file)
        assert key_file.read_bytes() == first

    def test_environment_variable_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        key = bytes(range(32))
        monkeypatch.setenv("GW_TEST_KEY", base64.b64encode(key).decode())
        loaded = MasterKey.load(_config(tmp_path, master_key_env="GW_TEST_KEY",
                                        master_key_file=str(tmp_path / "absent.key")))
        assert loaded.key_id == MasterKey(key).key_id

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
    def test_round_trip_and_no_plaintext(self, jobs: JobStore, ring: KeyRing) -> None:
        sealer = Sealer(ring, jobs)
        sealed = b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"CANARY^PATIENT", b" and more"]))
        assert sealed.startswith(MAGIC)
        assert b"CANARY" not in sealed
        assert sealer.open(JOB, Purpose.RECEIVED, sealed) == b"CANARY^PATIENT and more"

    def test_each_job_has_its_own_key_stored_only_wrapped(self, jobs: JobStore, ring: KeyRing, tmp_path: Path) -> None:
        sealer = Sealer(ring, jobs)
        b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"x"]))
        b"".join(sealer.seal(OTHER_JOB, Purpose.RECEIVED, [b"x"]))
        wrapped = {DataKeys(jobs).load(JOB), DataKeys(jobs).load(OTHER_JOB)}
        assert len(wrapped) == 2 and None not in wrapped

    def test_tampered_file_does_not_open(self, jobs: JobStore, ring: KeyRing) -> None:
        sealer = Sealer(ring, jobs)
        sealed = bytearray(b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"pixel data"])))
        sealed[-20] ^= 0x01
        with pytest.raises(CryptoError, match="failed authentication"):
            sealer.open(JOB, Purpose.RECEIVED, bytes(sealed))

    def test_file_moved_to_another_job_does_not_open(self, jobs: JobStore, ring: KeyRing) -> None:
        sealer = Sealer(ring, jobs)
        sealed = b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"pixel data"]))
        b"".join(sealer.seal(OTHER_JOB, Purpose.RECEIVED, [b"other"]))
        with pytest.raises(CryptoError):
            sealer.open(OTHER_JOB, Purpose.RECEIVED, sealed)

    def test_wrong_master_key_does_not_open(self, jobs: JobStore, ring: KeyRing, tmp_path: Path) -> None:
        sealed = b"".join(Sealer(ring, jobs).seal(JOB, Purpose.RECEIVED, [b"pixel data"]))
        with pytest.raises(CryptoError, match="does not open with this master key"):
            Sealer(key_ring(tmp_path / "keys", b"\x01" * 32), jobs).open(JOB, Purpose.RECEIVED, sealed)

    def test_deleting_the_data_key_shreds_the_job(self, jobs: JobStore, ring: KeyRing, tmp_path: Path) -> None:
        sealer = Sealer(ring, jobs)
        sealed = b"".join(sealer.seal(JOB, Purpose.RECEIVED, [b"pixel data"]))
        with sqlite3.connect(tmp_path / "var" / "gateway.db") as db:
            db.execute("DELETE FROM data_keys WHERE job_id = ?", (JOB,))
        fresh = Sealer(key_ring(tmp_path / "keys"), jobs)  # no cached key, as after a restart
        with pytest.raises(CryptoError, match="has no data key"):
            fresh.open(JOB, Purpose.RECEIVED, sealed)
        with pytest.raises(CryptoError, match="has no data key"):
            sealer.open(JOB, Purpose.RECEIVED, sealed)  # a cached key is not enough either

    def test_purposes_have_separate_keys(self, jobs: JobStore, ring: KeyRing) -> None:
        sealer = Sealer(ring, jobs)
        vault_entry = b"".join(sealer.seal(JOB, Purpose.VAULT, [b"original identity"]))
        with pytest.raises(CryptoError, match="failed authentication"):
            sealer.open(JOB, Purpose.PSEUDONYMISED, vault_entry)
        assert sealer.open(JOB, Purpose.VAULT, vault_entry) == b"original identity"

    def test_two_processes_agree_on_one_key(self, tmp_path: Path) -> None:
        (tmp_path / "var").mkdir()
        first, second = JobStore(tmp_path / "var" / "gateway.db"), JobStore(tmp_path / "var" / "gateway.db")
        try:
            a, b = Sealer(key_ring(tmp_path / "keys"), first), Sealer(key_ring(tmp_path / "keys"), second)
            sealed_by_a = b"".join(a.seal(JOB, Purpose.RECEIVED, [b"from a"]))
            assert b.open(JOB, Purpose.RECEIVED, sealed_by_a) == b"from a"
            assert a.open(JOB, Purpose.RECEIVED, b"".join(b.seal(JOB, Purpose.RECEIVED, [b"from b"]))) == b"from b"
        finally:
            first.close()
            second.close()


class TestKeyEncryptionKeys:
    def test_data_keys_are_wrapped_by_an_hourly_key_outside_data_dir(self, jobs: JobStore, ring: KeyRing,
                                                                       tmp_path: Path) -> None:
        b"".join(Sealer(ring, jobs).seal(JOB, Purpose.RECEIVED, [b"x"]))
        stored = DataKeys(jobs).load(JOB)
        assert stored is not None and stored.kek is not None and int(stored.kek) % 3600 == 0
        kek_file = tmp_path / "keys" / f"kek-{stored.kek}.key"
        assert kek_file.stat().st_mode & 0o777 == 0o600
        assert not any((tmp_path / "var").rglob("kek-*"))

    def test_destroying_the_kek_makes_a_copy_of_the_database_unreadable(self, jobs: JobStore, ring: KeyRing,
                                                                          tmp_path: Path) -> None:
        sealed = b"".join(Sealer(ring, jobs).seal(JOB, Purpose.RECEIVED, [b"pixel data"]))
        copy = tmp_path / "copy.db"
        with sqlite3.connect(tmp_path / "var" / "gateway.db") as db, sqlite3.connect(copy) as target:
            db.backup(target)
        stored = DataKeys(jobs).load(JOB)
        assert stored is not None and stored.kek is not None
        KekFiles(tmp_path / "keys").destroy(stored.kek)
        restored = JobStore(copy)
        try:  # the copy still holds the wrapped data key, and the master key is the same: neither is enough
            with pytest.raises(CryptoError, match="was destroyed"):
                Sealer(key_ring(tmp_path / "keys"), restored).open(JOB, Purpose.RECEIVED, sealed)
        finally:
            restored.close()

    def test_a_data_key_wrapped_by_the_master_key_before_still_opens(self, jobs: JobStore, ring: KeyRing) -> None:
        data_key = bytes(range(32))
        DataKeys(jobs).store(JOB, WrappedKey(ring.master.wrap(data_key, JOB), None))
        assert ring.unwrap(DataKeys(jobs).load(JOB) or WrappedKey(b"", None), JOB) == data_key

    def test_kek_period_is_an_hour_at_the_ceiling_and_a_24th_below(self) -> None:
        assert kek_period(86_400) == 3600
        assert kek_period(3600) == 150
        assert kek_period(60) == 2
