"""Sealed files: AES-256-GCM under per-job data keys, one derived key per kind of file.

* Every job (one study reception) gets a random 256-bit data key, stored in the job table only
  wrapped by the key-encryption key of the moment (:mod:`gateway.store.keys`), bound to the job id.
  Deleting that row makes every file of the job unreadable: crypto-shredding.
* A sealed file is ``MAGIC | nonce (12) | ciphertext | tag (16)``, with the job id as
  associated data, so a file moved to another job does not open; each kind of file
  (:class:`Purpose`) has its own key derived from the job's. Plaintext exists only in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import CryptoError
from gateway.store.data_keys import DataKeys
from gateway.store.jobs import JobStore
from gateway.store.keys import NONCE_BYTES, KeyRing, derive_key, new_nonce

__all__ = ["MAGIC", "Purpose", "Sealer"]

MAGIC = b"CGW\x01"


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

    def __init__(self, ring: KeyRing, jobs: JobStore) -> None:
        self._ring = ring
        self._keys = DataKeys(jobs)
        self._cache: dict[tuple[str, Purpose], bytes] = {}
        self._lock = threading.Lock()

    def _key(self, job_id: str, purpose: Purpose) -> bytes:
        with self._lock:
            cached = self._cache.get((job_id, purpose))
        if cached is not None:
            return cached
        wrapped = self._keys.load(job_id)
        if wrapped is None:
            fresh = self._ring.wrap(AESGCM.generate_key(bit_length=256), job_id, time.time())
            wrapped = self._keys.store(job_id, fresh)
        data_key = self._ring.unwrap(wrapped, job_id)
        key = derive_key(data_key, purpose.value)
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
        nonce = new_nonce()
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
        if self._keys.load(job_id) is None:
            self.forget(job_id)
            raise CryptoError(f"job {job_id} has no data key (shredded)")
        try:
            aead = AESGCM(self._key(job_id, purpose))
            return aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], job_id.encode())
        except InvalidTag:
            raise CryptoError(f"a file of job {job_id} failed authentication") from None


