"""pynetdicom acceptor machinery tuned for ingest: fast socket reads, no polling reactor, peer policy.

Subclasses only (no fork of pynetdicom 3.0.4):

* ``FastSocket`` (:mod:`gateway.receiving.sockets`) reads whole PDUs with ``recv_into`` instead of 4 KiB
  ``recv`` calls, and lets the DUL wait in ``select`` (socket + wake-up pipe) instead of polling every 1 ms.
* :class:`gateway.receiving.upper_layer.GatewayDUL` reads each PDU into one buffer and hands P-DATA values
  to the DIMSE layer as views of it (pynetdicom copies them three times).
* ``_GatewayAssociation`` waits on the DIMSE queue instead of sleeping 1 ms per loop.
  pynetdicom's polling costs up to a millisecond of latency per message in each thread,
  which is most of the difference between it and dcmtk on loopback.
* :class:`gateway.receiving.dimse.GatewayDIMSE` codes plain C-STORE commands directly, copies data set
  fragments once and bounds what a message may buffer; a C-STORE request is served on the DUL thread that
  decoded it (:class:`gateway.receiving.dimse.InlineStoreQueue`).
* ``_PolicyACSE`` applies :class:`gateway.receiving.policy.AssociationPolicy` (with the verified TLS client
  certificate of the connection, if any) before pynetdicom's own negotiation, and the node-wide association limit.
* ``FdAssociationServer`` is a pynetdicom server that never listens itself: the parent
  process accepts and hands it connected sockets (see :mod:`gateway.receiving.listener`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import structlog
from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from gateway.config import Peer
from gateway.ops.metrics import ASSOCIATION_OUTCOMES, NodeCounters
from gateway.ops.tls import ClientCertificate, client_certificate
from gateway.receiving.dimse import GatewayDIMSE, InlineStoreQueue
from gateway.receiving.policy import REJECTIONS, AssociationPolicy, AssociationSlots
from gateway.receiving.sockets import REACTOR_TICK_S, ConnectionLimits, FastSocket
from gateway.receiving.upper_layer import GatewayDUL

__all__ = ["FdAssociationServer"]

log = structlog.get_logger(__name__)




class _WakingQueue(queue.Queue[Any]):
    """The DUL's outgoing-primitive queue; a put wakes the DUL out of its select."""

    def __init__(self, wakeup_fd: int) -> None:
        super().__init__()
        self._wakeup_fd = wakeup_fd

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wakeup_fd, b"!")


class _PolicyACSE(ACSE):
    """ACSE that applies the gateway's association policy before pynetdicom's own checks."""

    def _negotiate_as_acceptor(self) -> None:
        assoc: _GatewayAssociation = self.assoc  # type: ignore[assignment]
        rq = self.requestor.primitive
        info = self.requestor.address_info
        calling = str(getattr(rq, "calling_ae_title", "")).strip()
        called = str(getattr(rq, "called_ae_title", "")).strip()
        address = str(info.address) if info is not None else ""
        peer, reason = assoc.policy.decide(calling, called, address, assoc.client_certificate)
        if peer is not None and assoc.disk_low():
            peer, reason = None, "disk_space_low"
        elif peer is not None:
            assoc.counted = assoc.slots.take()
            if not assoc.counted:
                peer, reason = None, "local_limit_exceeded"
        if assoc.counters is not None:
            assoc.counters.add(f"association_{_outcome(reason)}")
        if peer is None:
            assert reason is not None
            log.warning("association_rejected", reason=reason, calling_ae=calling, called_ae=called,
                        address=address, tls=assoc.over_tls)
            self.requestor.ae_title = calling
            self.send_reject(*REJECTIONS[reason])
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        assoc.peer = peer
        log.info("association_accepted", peer=peer.name, calling_ae=calling, address=address, tls=assoc.over_tls)
        super()._negotiate_as_acceptor()


def _outcome(reason: str | None) -> str:
    """The metrics outcome of a policy decision: a refusal metrics does not list counts as what the peer was told."""
    outcome = reason or "accepted"
    return outcome if outcome in ASSOCIATION_OUTCOMES else "calling_ae_not_recognised"


class _GatewayAssociation(Association):
    """Acceptor association with an event-driven reactor and the gateway's policy."""

    def __init__(self, ae: Any, mode: str, server: FdAssociationServer) -> None:
        super().__init__(ae, mode)
        self.dul = GatewayDUL(self)
        # pynetdicom set the ARTIM and idle timers on the DUL it made: set them again on this one.
        self.acse_timeout, self.network_timeout = self.acse_timeout, self.network_timeout
        self.policy = server.policy
        self.slots = server.slots
        self.disk_low = server.disk_low
        self.counters = server.counters
        self.counted = False
        self._on_finished = server.on_closed
        self.peer: Peer | None = None
        #: Set by the request handler: whether the connection is DICOM TLS, and its verified client certificate.
        self.over_tls = False
        self.client_certificate: ClientCertificate | None = None
        self.acse = _PolicyACSE(self)
        self.dimse = GatewayDIMSE(self, server.limits.max_dataset_bytes)
        self.dimse.msg_queue = InlineStoreQueue(self._serve_request)
        self.wakeup_read, self._wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_read, False)
        os.set_blocking(self._wakeup_write, False)
        self.dul.to_provider_queue = _WakingQueue(self._wakeup_write)
        self.dul._run_loop_delay = 0  # _FastSocket.ready does the waiting

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.dul.join(timeout=5 * REACTOR_TICK_S + 1)
            os.close(self.wakeup_read)
            os.close(self._wakeup_write)
            if self.counted:
                self.slots.give_back()
            self._on_finished()

    def _run_reactor(self) -> None:
        # Same duties as Association._run_reactor, but a DIMSE message wakes it at once
        # instead of after a fixed 1 ms sleep per loop.
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=REACTOR_TICK_S)
            except queue.Empty:
                msg = None
            if msg:
                self._serve_request(msg, cast(int, context_id))
                continue
            if self._peer_finished():
                return

    def _peer_finished(self) -> bool:
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log.warning("association_idle_timeout")
            self.abort()
            self.kill()
            return True
        return False


class _RequestHandler(RequestHandler):
    server: FdAssociationServer

    def _create_association(self) -> Association:
        assoc = _GatewayAssociation(self.ae, "acceptor", self.server)
        assoc._server = self.server
        assoc.name = "AcceptorThread"
        assoc.over_tls = isinstance(self.request, ssl.SSLSocket)
        assoc.client_certificate = client_certificate(self.request)
        assoc.set_socket(FastSocket(assoc, self.request, assoc.wakeup_read, self.server.limits))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *cast(tuple[Any, Any], handlers))
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler, args)
        return assoc


def _tls_failure(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or type(exc).__name__)
    return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


class _HandedSocket(socket.socket):
    """A socket handed over by the listener, saying whether it came in on the TLS port."""

    gateway_tls = False


class FdAssociationServer(ThreadedAssociationServer):
    """A pynetdicom server fed with already-accepted sockets; it never binds or listens."""

    daemon_threads = True

    def __init__(self, ae: Any, policy: AssociationPolicy, slots: AssociationSlots, limits: ConnectionLimits,
                 evt_handlers: list[Any], on_closed: Callable[[], None],
                 disk_low: Callable[[], bool] = lambda: False,
                 tls: tuple[ssl.SSLContext, float] | None = None, counters: NodeCounters | None = None) -> None:
        self.policy = policy
        self.tls = tls
        self.counters = counters
        self.slots = slots
        self.limits = limits
        self.disk_low = disk_low
        self.on_closed = on_closed
        super().__init__(ae, ("127.0.0.1", 0), ae.ae_title, ae.supported_contexts, None, evt_handlers,
                         request_handler=_RequestHandler)

    def _handshake(self, sock: socket.socket, address: str) -> ssl.SSLSocket | None:
        """The TLS handshake, in this connection's own thread, within ``handshake_seconds``."""
        if self.tls is None:
            sock.close()
            return None
        context, seconds = self.tls
        tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls_sock.settimeout(seconds)
        try:
            tls_sock.do_handshake()
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            log.warning("tls_handshake_failed", reason=_tls_failure(exc), address=address)
            with contextlib.suppress(OSError):
                tls_sock.close()
            return None
        tls_sock.settimeout(None)
        cipher = tls_sock.cipher()
        log.debug("tls_established", version=tls_sock.version(), cipher=cipher[0] if cipher else None,
                  client_certificate=tls_sock.getpeercert() is not None and bool(tls_sock.getpeercert()))
        return tls_sock

    def server_bind(self) -> None:  # the parent process owns the listening socket
        pass

    def server_activate(self) -> None:
        pass

    def submit(self, fd: int, *, tls: bool = False) -> None:
        """Serve the connected socket *fd* in a new thread (after a TLS handshake, with *tls*)."""
        sock = _HandedSocket(fileno=fd)
        sock.gateway_tls = tls
        try:
            address = sock.getpeername()
        except OSError:
            sock.close()
            self.on_closed()
            return
        sock.settimeout(None)
        self.process_request(sock, address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # handle() only starts the association thread, which reports its own end.
        try:
            if getattr(request, "gateway_tls", False):
                request = self._handshake(request, str(client_address[0]))
                if request is None:
                    self.on_closed()
                    return
            self.finish_request(request, client_address)
        except Exception as exc:
            log.error("connection_setup_failed", exc_info=exc)
            self.shutdown_request(request)
            self.on_closed()
