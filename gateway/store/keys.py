"""Keys: the master key, the hourly key-encryption keys that wrap the jobs' data keys, and key files.

* The master key comes from the environment variable named in ``encryption.master_key_env``
  (base64 of 32 bytes) or else from ``encryption.master_key_file`` (32 raw bytes, mode 0600,
  made by ``python -m gateway keygen``). The node never creates it, and refuses one kept inside
  ``data_dir`` unless told so. It never touches patient data directly; other secrets (the key
  for keyed UID hashes) are derived from it with HKDF, so no further key file lies on disk.
* Key-encryption keys (KEKs): one per period (an hour at the 24 h ceiling), random, kept in
  ``encryption.key_dir`` (outside ``data_dir``) sealed by the master key. Each wraps the data keys
  of the jobs that started in its period (:class:`KeyRing`). A retention sweep destroys a KEK once
  no data key refers to it and its period is over (:class:`KekFiles`); all jobs under one KEK are
  shredded together, when the first of them is due, so destroying it makes every copy of
  ``data_dir`` taken before unreadable for those jobs, even with the master key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config import GatewayConfig
from gateway.errors import CryptoError, StartupError
from gateway.store.jobs import WrappedKey
from gateway.store.spool import fsync_dir

__all__ = ["KekFiles", "KeyRing", "MasterKey", "create_key_file", "derive_key", "kek_period", "new_nonce"]

NONCE_BYTES = 12
_KEY_BYTES = 32


def derive_key(key: bytes, purpose: str) -> bytes:
    """A 32-byte key for *purpose* from *key* (HKDF-SHA-256)."""
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=purpose.encode()).derive(key)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


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
    def load(cls, config: GatewayConfig) -> MasterKey:
        """Read the master key from the environment or the key file; never create one.

        Raises
        ------
        StartupError
            When no key is configured, the variable is malformed, the file lies inside ``data_dir``
            (unless allowed), or it is missing, unreadable or malformed.
        """
        settings = config.encryption
        value = os.environ.get(settings.master_key_env, "")
        if value:
            try:
                return cls(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise StartupError(f"${settings.master_key_env} must be the base64 encoding of 32 random "
                                   "bytes") from None
        path = settings.master_key_file
        if path is None:
            raise StartupError(f"no master key: set ${settings.master_key_env}, or [encryption] master_key_file to a "
                               "key made with `python -m gateway keygen --out FILE`")
        _outside_data_dir(config, path, "encryption.master_key_file")
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            raise StartupError(f"master key file {path} does not exist (make one with `python -m gateway keygen "
                               f"--out {path}`)") from None
        except OSError as exc:
            raise StartupError(f"cannot read the master key file {path} ({exc.strerror})") from None
        except ValueError:
            raise StartupError(f"master key file {path} is damaged (it must hold 32 bytes)") from None

    def derive(self, purpose: str) -> bytes:
        """A 32-byte secret for *purpose*, derived with HKDF-SHA-256."""
        return derive_key(self._key, purpose)

    def wrap(self, data_key: bytes, job_id: str) -> bytes:
        """Encrypt *data_key* for storage, bound to *job_id*."""
        nonce = new_nonce()
        return nonce + self._aead.encrypt(nonce, data_key, b"data-key\0" + job_id.encode())

    def unwrap(self, wrapped: bytes, job_id: str) -> bytes:
        """Decrypt a wrapped data key of *job_id*; raise :class:`CryptoError` if it does not open."""
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], b"data-key\0" + job_id.encode())
        except InvalidTag:
            raise CryptoError(f"the data key of job {job_id} does not open with this master key") from None


    def seal_kek(self, kek: bytes, name: str) -> bytes:
        """Encrypt a key-encryption key for its file in ``key_dir``."""
        nonce = new_nonce()
        return nonce + self._aead.encrypt(nonce, kek, b"kek\0" + name.encode())

    def open_kek(self, sealed: bytes, name: str) -> bytes:
        """Decrypt a key-encryption key file; raise :class:`CryptoError` if it does not open."""
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], b"kek\0" + name.encode())
        except InvalidTag:
            raise CryptoError(f"key-encryption key {name} does not open with this master key") from None


def _outside_data_dir(config: GatewayConfig, path: Path, what: str) -> None:
    """Refuse a key location inside ``data_dir`` (a copy of it would hold the key) unless allowed."""
    if config.encryption.allow_keys_in_data_dir:
        return
    if path.resolve().is_relative_to(config.node.data_dir.resolve()):
        raise StartupError(f"{what} {path} lies inside data_dir: a copy of data_dir would then decrypt itself; "
                           "keep keys on another volume (or set encryption.allow_keys_in_data_dir = true)")


def create_key_file(path: Path, content: bytes | None = None) -> None:
    """Write a new key file (mode 0600, fsynced with its folder); refuse to overwrite one.

    Raises
    ------
    FileExistsError
        When *path* exists (another process may have won a race).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(_KEY_BYTES) if content is None else content)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def kek_period(max_age_seconds: float) -> int:
    """Seconds one key-encryption key is current: an hour at the 24 h ceiling, a 24th of a shorter one."""
    return max(1, min(3600, int(max_age_seconds // 24)))


class KekFiles:
    """The key-encryption key files of ``key_dir`` by name (their period's start, epoch seconds).

    Needs no master key: the retention sweep destroys files it cannot read.
    """

    _PREFIX = "kek-"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def of(cls, config: GatewayConfig) -> KekFiles:
        """The configured key directory (``key_dir``, else the master key file's folder).

        Raises
        ------
        StartupError
            When no key directory is configured, or it lies inside ``data_dir`` (unless allowed).
        """
        folder = config.encryption.key_dir or (config.encryption.master_key_file.parent
                                                if config.encryption.master_key_file else None)
        if folder is None:
            raise StartupError("no key directory: set [encryption] key_dir (outside data_dir, out of backups) when "
                               f"the master key comes from ${config.encryption.master_key_env}")
        _outside_data_dir(config, folder, "encryption.key_dir")
        return cls(folder)

    def path(self, name: str) -> Path:
        """The file of the key called *name*."""
        return self.folder / f"{self._PREFIX}{name}.key"

    def names(self) -> list[str]:
        """Every key present, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p.name[len(self._PREFIX):-4] for p in self.folder.glob(f"{self._PREFIX}*.key")]
        return sorted((n for n in found if n.isdigit()), key=int)

    def destroy(self, name: str) -> None:
        """Unlink the key's file and make that durable."""
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.folder)

    def due(self, in_use: set[str], now: float, period: int) -> list[str]:
        """Keys no data key references whose period (plus a grace for a wrap in flight) is over at *now*."""
        grace = max(period, 300)
        return [name for name in self.names() if name not in in_use and now >= int(name) + period + grace]


class KeyRing:
    """Wraps and unwraps data keys with the key-encryption key of the moment (cached in memory, per process)."""

    def __init__(self, master: MasterKey, files: KekFiles, period: int) -> None:
        self.master = master
        self.files = files
        self._period = period
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, config: GatewayConfig, master: MasterKey | None = None) -> KeyRing:
        """The configured key ring (loading the master key unless given); see :meth:`KekFiles.of`."""
        files = KekFiles.of(config)
        files.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(master or MasterKey.load(config), files, kek_period(config.retention.max_age_seconds))

    def wrap(self, data_key: bytes, job_id: str, now: float) -> WrappedKey:
        """Encrypt *data_key* under the key-encryption key current at *now*, bound to *job_id*."""
        name = str(int(now // self._period) * self._period)
        nonce = new_nonce()
        sealed = nonce + AESGCM(self._kek(name, create=True)).encrypt(nonce, data_key, _kek_aad(job_id, name))
        return WrappedKey(sealed, name)

    def unwrap(self, key: WrappedKey, job_id: str) -> bytes:
        """Decrypt a stored data key of *job_id*; raise :class:`CryptoError` if it does not open."""
        if key.kek is None:  # wrapped by the master key itself (schema 6 and before)
            return self.master.unwrap(key.wrapped, job_id)
        aead = AESGCM(self._kek(key.kek, create=False))
        try:
            return aead.decrypt(key.wrapped[:NONCE_BYTES], key.wrapped[NONCE_BYTES:], _kek_aad(job_id, key.kek))
        except InvalidTag:
            raise CryptoError(f"the data key of job {job_id} does not open") from None

    def _kek(self, name: str, *, create: bool) -> bytes:
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        path = self.files.path(name)
        if create and not path.exists():
            with contextlib.suppress(FileExistsError):  # another process made it just now: read theirs
                create_key_file(path, self.master.seal_kek(AESGCM.generate_key(bit_length=256), name))
        try:
            kek = self.master.open_kek(path.read_bytes(), name)
        except FileNotFoundError:
            raise CryptoError(f"key-encryption key {name} was destroyed") from None
        with self._lock:
            if len(self._cache) >= 48:  # two days of hourly keys; older ones are destroyed or rarely needed
                self._cache.clear()
            self._cache[name] = kek
        return kek

    def forget(self, name: str) -> None:
        """Drop a destroyed key from the cache."""
        with self._lock:
            self._cache.pop(name, None)


def _kek_aad(job_id: str, name: str) -> bytes:
    return b"data-key\0" + job_id.encode() + b"\0" + name.encode()
