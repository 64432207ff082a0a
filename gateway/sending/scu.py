"""C-STORE SCU: send a dataset to a configured destination once, and classify every failure.

An empty response (timeout, abort) is a failure, never "sent". Failures are transient (connection refused or
timed out, A-ASSOCIATE-RJ transient, abort, 0xA7xx) or permanent (A-ASSOCIATE-RJ permanent, no accepted
presentation context, 0xA9xx, 0xCxxx, other failure statuses), each with its exact reason code;
:mod:`gateway.sending.delivery` retries the transient ones with backoff and dead-letters the rest.
"""

from __future__ import annotations

import socket
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from gateway.config import Destination, GatewayConfig
from gateway.errors import PermanentSendError, TransientSendError
from gateway.ops.tls import client_context
from gateway.sop import VERIFICATION, VERIFICATION_TRANSFER_SYNTAXES

__all__ = ["Sender", "classify_status"]

log = structlog.get_logger(__name__)

_WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}
_REJECT_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}


def classify_status(status: int) -> str:
    """Return ``success``, ``warning``, ``transient`` or ``permanent`` for a C-STORE status."""
    if status == 0x0000:
        return "success"
    if status in _WARNING_STATUSES:
        return "warning"
    if 0xA700 <= status <= 0xA7FF:
        return "transient"
    return "permanent"


def _set_nodelay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_NO_CONTEXT = "no presentation context accepted for the SOP class and transfer syntax"


def _unread_response(assoc: Association) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE response pynetdicom received but never read.

    pynetdicom 3.0.4 race: when the peer rejects and closes at once (dcmtk does), the DUL may
    close the socket before the requestor checks it, which then reports an abort and leaves
    the A-ASSOCIATE-RJ in the queue.
    """
    unread = list(assoc.dul.to_user_queue.queue)
    return next((p for p in unread if isinstance(p, A_ASSOCIATE)), None)


class Sender:
    """Sends datasets as this node's AE title to configured destinations."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config

    def _ae(self, destination: Destination, sop_class: str | None, transfer_syntax: str | None) -> AE:
        ae = AE(ae_title=destination.calling_ae_title or self._config.node.ae_title)
        ae.connection_timeout = destination.connect_timeout_seconds
        ae.acse_timeout = destination.acse_timeout_seconds
        ae.dimse_timeout = destination.dimse_timeout_seconds
        ae.network_timeout = destination.dimse_timeout_seconds
        ae.maximum_pdu_size = self._config.node.max_pdu_size
        if sop_class is None:
            ae.add_requested_context(VERIFICATION, list(VERIFICATION_TRANSFER_SYNTAXES))
        else:
            ae.add_requested_context(sop_class, [transfer_syntax] if transfer_syntax else None)
        return ae

    def _associate(self, ae: AE, destination: Destination) -> Association:
        connected: list[bool] = []

        def on_open(event: evt.Event) -> None:
            connected.append(True)
            _set_nodelay(event)

        tls_args = None
        if destination.tls is not None:
            tls = destination.tls
            tls_args = (client_context(tls.ca_file, tls.certificate_file, tls.private_key_file),
                        tls.server_name or destination.host)
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open)], tls_args=tls_args)
        if assoc.is_established:
            return assoc
        name = destination.name
        rsp = assoc.acceptor.primitive or _unread_response(assoc)
        if rsp is not None and rsp.result in _REJECT_RESULTS:
            result, source, diagnostic = rsp.result, rsp.result_source, rsp.diagnostic
            reason = (f"association {_REJECT_RESULTS.get(result, 'rejected')} "
                      f"(source {source}, reason {diagnostic})")
            raise (PermanentSendError if result == 1 else TransientSendError)(name, reason)
        # pynetdicom aborts an accepted association itself when no context was accepted.
        if rsp is not None and rsp.result == 0x00:
            raise PermanentSendError(name, _NO_CONTEXT)
        # pynetdicom marks a failed TCP connect as aborted too: only an opened connection was.
        if assoc.is_aborted and connected:
            raise TransientSendError(name, "association aborted by the peer during negotiation")
        raise TransientSendError(name, "connection failed (refused, unreachable or timed out)")

    def send_once(self, dataset: Dataset, destination: Destination) -> int:
        """Make one C-STORE attempt; return the peer's success or warning status.

        Raises
        ------
        TransientSendError, PermanentSendError
            Classified failure; the association is always released or aborted.
        """
        transfer_syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        assoc = self._associate(self._ae(destination, dataset.SOPClassUID, transfer_syntax), destination)
        try:
            if not any(cx.abstract_syntax == dataset.SOPClassUID for cx in assoc.accepted_contexts):
                raise PermanentSendError(destination.name, _NO_CONTEXT)
            response = assoc.send_c_store(dataset)
            status = getattr(response, "Status", None)
            if status is None:
                raise TransientSendError(destination.name, "no C-STORE response (timeout or abort)")
            kind = classify_status(int(status))
            if kind in ("transient", "permanent"):
                error = TransientSendError if kind == "transient" else PermanentSendError
                raise error(destination.name, f"C-STORE status 0x{int(status):04X}", status=int(status))
            assoc.release()
            return int(status)
        finally:
            if assoc.is_established:
                assoc.abort()

    def echo(self, destination: Destination) -> None:
        """C-ECHO *destination* once; raise :class:`SendError` on any failure."""
        assoc = self._associate(self._ae(destination, None, None), destination)
        try:
            response: Any = assoc.send_c_echo()
            status = getattr(response, "Status", None)
            if status is None:
                raise TransientSendError(destination.name, "no C-ECHO response (timeout or abort)")
            if int(status) != 0:
                raise PermanentSendError(destination.name, f"C-ECHO status 0x{int(status):04X}", status=int(status))
            assoc.release()
        finally:
            if assoc.is_established:
                assoc.abort()
