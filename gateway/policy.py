"""Association policy: which callers may associate, and how refusals are answered (PS3.8 9.3.4)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import GatewayConfig, Peer

__all__ = ["REJECTIONS", "AssociationPolicy"]

#: Refusal reason -> A-ASSOCIATE-RJ (result, source, reason/diag.).
REJECTIONS = {
    "calling_ae_not_recognised": (0x01, 0x01, 0x03),  # permanent, service user
    "called_ae_not_recognised": (0x01, 0x01, 0x07),  # permanent, service user
    "local_limit_exceeded": (0x02, 0x03, 0x02),  # transient, service provider (presentation)
}


@dataclass(frozen=True)
class AssociationPolicy:
    """Who may associate: a ``[[peers]]`` entry must match calling AE and source address,
    and the called AE must be ours."""

    config: GatewayConfig

    def decide(self, calling_ae: str, called_ae: str, address: str) -> tuple[Peer | None, str | None]:
        """Return ``(peer, None)`` to accept, or ``(None, reason)`` to reject (a :data:`REJECTIONS` key)."""
        peer = self.config.peer_for(calling_ae, address)
        if peer is None:
            return None, "calling_ae_not_recognised"
        if called_ae.strip() != self.config.node.ae_title:
            return None, "called_ae_not_recognised"
        return peer, None
