"""Association policy: which callers may associate, and how refusals are answered (PS3.8 9.3.4)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Any

from gateway.config import GatewayConfig, Peer
from gateway.ops.tls import ClientCertificate

__all__ = ["REJECTIONS", "AssociationPolicy", "AssociationSlots", "DiskWatermark"]

#: Refusal reason -> A-ASSOCIATE-RJ (result, source, reason/diag.).
REJECTIONS = {
    "calling_ae_not_recognised": (0x01, 0x01, 0x03),  # permanent, service user
    "called_ae_not_recognised": (0x01, 0x01, 0x07),  # permanent, service user
    "local_limit_exceeded": (0x02, 0x03, 0x02),  # transient, service provider (presentation)
    "disk_space_low": (0x02, 0x03, 0x02),  # transient, service provider (presentation): local limit
    # The calling AE title is bound to a certificate (``[[peers]] certificate_name``) the connection did not present.
    "client_certificate_missing": (0x01, 0x01, 0x03),  # permanent, service user, calling AE title not recognised
    "client_certificate_mismatch": (0x01, 0x01, 0x03),  # permanent, service user, calling AE title not recognised
}


def _free_bytes(config: GatewayConfig) -> int:
    try:
        return shutil.disk_usage(config.node.data_dir).free
    except OSError:
        return 0


class DiskWatermark:
    """Whether ``data_dir`` has less free space than ``node.min_free_disk_mb``, asked for every C-STORE.

    The file system is asked at most once a second while free space is more than twice the mark,
    and every time once it is nearer.
    """

    def __init__(self, config: GatewayConfig, every_seconds: float = 1.0) -> None:
        self._threshold = config.node.min_free_disk_mb * 1024 * 1024
        self._config = config
        self._every = every_seconds
        self._checked_at = -float("inf")
        self._free = 0

    def low(self) -> bool:
        """Whether free space is below the watermark; re-checked every time once within twice the mark."""
        if self._threshold == 0:
            return False
        now = time.monotonic()
        if self._free < 2 * self._threshold or now - self._checked_at >= self._every:
            self._free = _free_bytes(self._config)
            self._checked_at = now
        return self._free < self._threshold


class AssociationSlots:
    """The node-wide count of established associations, shared by the receiver processes.

    One counter per receiver in a shared array (the parent zeroes a dead receiver's); only
    associations that passed the policy count, so connections that never ask for one cannot
    use up ``max_associations``.
    """

    def __init__(self, counters: Any, index: int, maximum: int) -> None:
        self._counters = counters
        self._index = index
        self._maximum = maximum

    def take(self) -> bool:
        """Count one more association unless the node is at its maximum."""
        with self._counters.get_lock():
            if sum(self._counters) >= self._maximum:
                return False
            self._counters[self._index] += 1
            return True

    def give_back(self) -> None:
        """One association counted by :meth:`take` has ended."""
        with self._counters.get_lock():
            self._counters[self._index] = max(0, self._counters[self._index] - 1)


@dataclass(frozen=True)
class AssociationPolicy:
    """Who may associate: a ``[[peers]]`` entry must match calling AE and source address,
    and the called AE must be ours.

    When any entry matching calling AE and address names a ``certificate_name``, the connection
    must also have presented a verified TLS client certificate carrying one of those names,
    whatever the order of the entries (a ``*`` entry cannot open a bound AE title); it is then
    served as the first entry whose name the certificate carries.
    """

    config: GatewayConfig

    def decide(self, calling_ae: str, called_ae: str, address: str,
               certificate: ClientCertificate | None = None) -> tuple[Peer | None, str | None]:
        """Return ``(peer, None)`` to accept, or ``(None, reason)`` to reject (a :data:`REJECTIONS` key).

        *certificate* is the connection's verified client certificate: ``None`` on plain TCP or without one.
        """
        peer = self.config.peer_for(calling_ae, address)
        if peer is None:
            return None, "calling_ae_not_recognised"
        if called_ae.strip() != self.config.node.ae_title:
            return None, "called_ae_not_recognised"
        bound = [(p, p.certificate_name) for p in self.config.peers
                 if p.certificate_name is not None and p.admits(calling_ae, address)]
        if not bound:
            return peer, None
        if certificate is None:
            return None, "client_certificate_missing"
        for candidate, name in bound:
            if certificate.carries(name):
                return candidate, None
        return None, "client_certificate_mismatch"
