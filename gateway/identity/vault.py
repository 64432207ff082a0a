"""The re-identification vault: the pseudo <-> original mapping and identity of each job, sealed apart.

Each job's entry is one file in ``data_dir/vault``, sealed under the vault's own key
(:attr:`gateway.store.sealing.Purpose.VAULT`, derived from the job's data key, so shredding the job
shreds its entry). Only :mod:`gateway.identity.stages` imports this module; nothing under
:mod:`gateway.inference` or :mod:`gateway.rt` can reach it (the import graph is checked by
``tests/test_privacy_boundary.py``).
"""

from __future__ import annotations

import base64
import json

from gateway.errors import CryptoError
from gateway.identity.pseudonymise import ReidentificationRecord
from gateway.store.sealing import Purpose, Sealer
from gateway.store.spool import Spool

__all__ = ["Vault"]

_FORMAT = 2  # 1: one identity per job; 2: one per series


class Vault:
    """Stores and loads :class:`ReidentificationRecord` entries, one per job."""

    def __init__(self, spool: Spool, sealer: Sealer) -> None:
        self._spool = spool
        self._sealer = sealer

    def store(self, job_id: str, record: ReidentificationRecord) -> None:
        """Write (durably, sealed) the entry of *job_id*, replacing an older one."""
        body = json.dumps({
            "format": _FORMAT,
            "uids": record.uids,
            "identities": {str(series): base64.b64encode(identity).decode("ascii")
                           for series, identity in record.identities.items()},
            "pseudonym": record.pseudonym,
        }).encode("utf-8")
        self._spool.write_vault(job_id, self._sealer.seal(job_id, Purpose.VAULT, [body]))

    def load(self, job_id: str) -> ReidentificationRecord:
        """The entry of *job_id*.

        Raises
        ------
        CryptoError
            When the entry is missing, shredded, or does not authenticate.
        """
        try:
            sealed = self._spool.read_vault(job_id)
        except FileNotFoundError:
            raise CryptoError(f"job {job_id} has no vault entry") from None
        body = json.loads(self._sealer.open(job_id, Purpose.VAULT, sealed))
        if body.get("format") == 1:  # written before identities were kept per series
            identities = {0: base64.b64decode(body["identity"])}
        elif body.get("format") == _FORMAT:
            identities = {int(series): base64.b64decode(value) for series, value in body["identities"].items()}
        else:
            raise CryptoError(f"vault entry of job {job_id} has an unknown format")
        return ReidentificationRecord(uids=dict(body["uids"]), identities=identities,
                                      pseudonym=str(body["pseudonym"]))
