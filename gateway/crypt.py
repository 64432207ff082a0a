"""Encryption at rest: a master key wraps one data key per job; patient files are AES-256-GCM sealed.

* The master key comes from the environment variable named in ``encryption.master_key_env``
  (base64 of 32 bytes) or else from ``encryption.master_key_file``, created with mode 0600
  on first start. It never touches patient data directly.
* Every job (one study reception) gets a random 256-bit data key, stored only wrapped
  (AES-GCM under the master key, bound to the job id) in the job table. Deleting that row
  makes every file of the job unreadable: crypto-shredding.
* A sealed file is ``MAGIC | nonce (12) | ciphertext | tag (16)``, with the job id as
  associated data, so a file moved to another job does not open; each kind of file
  (:class:`Purpose`) has its own key derived from the job's. Plaintext exists only in memory.
* Other secrets (the key for keyed UID hashes) are derived from the master key with HKDF,
  so no further key file lies on disk.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import threading
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config import GatewayConfig
from gateway.errors import CryptoError, StartupError

__all__ = ["MAGIC", "MasterKey", "Purpose", "Sealer"]

MAGIC = b"CGW\x01"
_NONCE_BYTES = 12
_KEY_BYTES = 32


def _derive(key: bytes, purpose: str) -> bytes:
    """A 32-byte key for *purpose* from *key* (HKDF-SHA-256)."""
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=purpose.encode()).derive(key)


def _nonce() -> bytes:
    return secrets.token_bytes(_NONCE_BYTES)


class MasterKey:
    """The node's master key: wraps data keys, derives secrets; never encrypts patient data."""

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError("the master key must be 32 bytes")
        self._aead = AESGCM(key)
        self._key = key
        #: Identifies the key in stored records without revealing it.
        self.key_id = hashlib.sha256(b"contour-gateway key id\0" + key).hexdigest()[:16]

    @classmethod
    def load(cls, config: GatewayConfig, *, create: bool = False) -> MasterKey:
        """Read the master key from the environment or the key file (creating the file if asked).

        Raises
        ------
        StartupError
            When the variable is malformed, or the file is missing, unreadable or malformed.
        """
        settings = config.encryption
        value = os.environ.get(settings.master_key_env, "")
        if value:
            try:
                return cls(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise StartupError(f"${settings.master_key_env} must be the base64 encoding of 32 random "
                                   "bytes") from None
        path = config.master_key_path
        if create and not path.exists():
            _create_key_file(path)
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            raise StartupError(f"master key file {path} does not exist") from None
        except OSError as exc:
            raise StartupError(f"cannot read the master key file {path} ({exc.strerror})") from None
        except ValueError:
            raise StartupError(f"master key file {path} is damaged (it must hold 32 bytes)") from None

    def derive(self, purpose: str) -> bytes:
        """A 32-byte secret for *purpose*, derived with HKDF-SHA-256."""
        return _derive(self._key, purpose)

    def wrap(self, data_key: bytes, job_id: str) -> bytes:
        """Encrypt *data_key* for storage, bound to *job_id*."""
        nonce = _nonce()
        return nonce + self._aead.encrypt(nonce, data_key, b"data-key\0" + job_id.encode())

    def unwrap(self, wrapped: bytes, job_id: str) -> bytes:
        """Decrypt a wrapped data key of *job_id*; raise :class:`CryptoError` if it does not open."""
        try:
            return self._aead.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], b"data-key\0" + job_id.encode())
        except InvalidTag:
            raise CryptoError(f"the data key of job {job_id} does not open with this master key") from None


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process won the race
    try:
        os.write(fd, secrets.token_bytes(_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DataKeyStore(Protocol):
    """Where wrapped data keys live (:class:`gateway.jobs.JobStore`)."""

    def load_data_key(self, job_id: str) -> bytes | None:
        """The stored wrapped key of *job_id*, or ``None``."""

    def store_data_key(self, job_id: str, wrapped: bytes) -> bytes:
        """Store *wrapped* unless a key exists; return the stored one."""


class Purpose(StrEnum):
    """What a sealed file holds; each purpose has its own key derived from the job's data key."""

    RECEIVED = "received instance"
    PSEUDONYMISED = "pseudonymised instance"
    RESULT = "result"
    VAULT = "re-identification vault"


class Sealer:
    """Seals and opens the files of jobs with their data keys (cached in memory, per process).

    A job's data key is created on first use (when two processes race, the first stored
    wins). Each :class:`Purpose` seals under its own key, derived from the data key with
    HKDF, so a vault entry and a pseudonymised instance of the same job do not share a key;
    deleting the data key shreds all of them.
    """

    def __init__(self, master: MasterKey, keys: DataKeyStore) -> None:
        self._master = master
        self._keys = keys
        self._cache: dict[tuple[str, Purpose], bytes] = {}
        self._lock = threading.Lock()

    def _key(self, job_id: str, purpose: Purpose) -> bytes:
        with self._lock:
            cached = self._cache.get((job_id, purpose))
        if cached is not None:
            return cached
        wrapped = self._keys.load_data_key(job_id)
        if wrapped is None:
            fresh = self._master.wrap(AESGCM.generate_key(bit_length=256), job_id)
            wrapped = self._keys.store_data_key(job_id, fresh)
        data_key = self._master.unwrap(wrapped, job_id)
        key = _derive(data_key, purpose.value)
        with self._lock:
            if len(self._cache) > 1024:
                self._cache.clear()
            self._cache[(job_id, purpose)] = key
        return key

    def forget(self, job_id: str) -> None:
        """Drop the cached keys of *job_id* (after crypto-shredding)."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == job_id]:
                del self._cache[key]

    def seal(self, job_id: str, purpose: Purpose, parts: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
        """Encrypt the concatenation of *parts* for *job_id* and *purpose*; return the file's pieces.

        Streamed part by part: no joined copy of a 512 KB instance is made (each extra large
        buffer costs page faults on the receive path, measured at a tenth of the ingest rate).
        """
        nonce = _nonce()
        encryptor = Cipher(algorithms.AES(self._key(job_id, purpose)), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(job_id.encode())
        pieces = [MAGIC + nonce, *(encryptor.update(part) for part in parts)]
        pieces.append(encryptor.finalize())
        pieces.append(encryptor.tag)
        return pieces

    def open(self, job_id: str, purpose: Purpose, sealed: bytes) -> bytes:
        """Decrypt a sealed file of *job_id*; raise :class:`CryptoError` if it is not authentic."""
        if sealed[: len(MAGIC)] != MAGIC:
            raise CryptoError("not a sealed gateway file")
        body = sealed[len(MAGIC):]
        if self._keys.load_data_key(job_id) is None:
            self.forget(job_id)
            raise CryptoError(f"job {job_id} has no data key (shredded)")
        try:
            aead = AESGCM(self._key(job_id, purpose))
            return aead.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], job_id.encode())
        except InvalidTag:
            raise CryptoError(f"a file of job {job_id} failed authentication") from None


