"""pynetdicom acceptor machinery tuned for ingest: fast socket reads, no polling reactor, peer policy.

Subclasses only (no fork of pynetdicom 3.0.4):

* ``FastSocket`` (:mod:`gateway.receiving.sockets`) reads whole PDUs with ``recv_into`` instead of 4 KiB
  ``recv`` calls, and lets the DUL wait in ``select`` (socket + wake-up pipe) instead of polling every 1 ms.
* ``_GatewayAssociation`` waits on the DIMSE queue instead of sleeping 1 ms per loop.
  pynetdicom's polling costs up to a millisecond of latency per message in each thread,
  which is most of the difference between it and dcmtk on loopback.
* ``_GatewayDIMSE`` decodes plain C-STORE requests and encodes their responses directly instead of
  through pydicom (:mod:`gateway.receiving.commands`), appends data set fragments without copying
  them twice, and bounds what one DIMSE message may buffer: a data set over ``max_dataset_bytes`` is read on
  and dropped, and reaches the C-STORE handler as a :class:`DiscardedDataSet`.
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
from io import BytesIO
from typing import Any, cast

import structlog
from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE, DimsePrimitiveType
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from gateway.config import Peer
from gateway.ops.metrics import ASSOCIATION_OUTCOMES, NodeCounters
from gateway.ops.tls import ClientCertificate, client_certificate
from gateway.receiving.commands import ParsedStoreRequest, encode_c_store_response, parse_c_store_request
from gateway.receiving.policy import REJECTIONS, AssociationPolicy, AssociationSlots
from gateway.receiving.sockets import REACTOR_TICK_S, ConnectionLimits, FastSocket

__all__ = ["DiscardedDataSet", "FdAssociationServer"]

log = structlog.get_logger(__name__)


_LAST_COMMAND_FRAGMENT = b"\x03"  # PDV message control header, PS3.8 E.2
_COMMAND_BIT, _LAST_BIT = 0x01, 0x02  # ... its two significant bits
#: A command set is a few hundred bytes (PS3.7 E.1); more than this is no DICOM peer.
_MAX_COMMAND_BYTES = 64 * 1024
_EVT_INVALID_PDU = "Evt19"  # PS3.8 9.2: answered with A-ABORT


class DiscardedDataSet(BytesIO):
    """Stands in for a data set dropped for being over the size limit: empty, with what was received.

    The C-STORE handler answers it with a refusal without touching data.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received_bytes = 0


class _WakingQueue(queue.Queue[Any]):
    """The DUL's outgoing-primitive queue; a put wakes the DUL out of its select."""

    def __init__(self, wakeup_fd: int) -> None:
        super().__init__()
        self._wakeup_fd = wakeup_fd

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wakeup_fd, b"!")


class _InlineStoreQueue(queue.Queue[Any]):
    """The DIMSE message queue of an acceptor: a C-STORE request is served at once, on the DUL thread.

    pynetdicom hands every decoded message to the association's thread and the response back to the
    DUL thread: two thread switches per instance, a sixth of a C-STORE round trip on loopback. A C-STORE
    request is served where it was decoded instead, and its response leaves as soon as the DUL loop
    resumes. The peer sends nothing meanwhile (no asynchronous operations are negotiated); any other
    message still goes to the association's thread.
    """

    def __init__(self, serve: Callable[[Any, int], None]) -> None:
        super().__init__()
        self._serve = serve

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is None:
            self._serve(primitive, context_id)
            return
        super().put(item, block, timeout)


class _GatewayDIMSE(DIMSEServiceProvider):
    """DIMSE provider that bounds what a message may buffer and codes plain C-STORE commands itself.

    pynetdicom appends every data set fragment of a message to one buffer, without limit. Here,
    once a message's data set passes *max_dataset_bytes*, the buffer is dropped and the rest of
    its fragments are read and discarded (the association stays in step); the message is then
    delivered with a :class:`DiscardedDataSet`, so the request is answered and the association
    serves the next one. A command set over ``_MAX_COMMAND_BYTES`` aborts the association.
    Fragments are decoded one PDV at a time (pynetdicom drops the PDVs of a P-DATA that follow
    the end of a message).

    A C-STORE request whose command set arrives whole in one fragment, with only the elements
    PS3.7 9.3.1.1 defines, is decoded directly; a response that carries only a status is encoded
    directly; anything else (error comments, offending elements, unknown command elements) goes
    the usual way. EVT_DIMSE_SENT is not triggered for the direct responses, nor EVT_DIMSE_RECV
    given a command set data set; nothing in the gateway binds them.
    """

    def __init__(self, assoc: Association, max_dataset_bytes: int) -> None:
        super().__init__(assoc)
        self._max_dataset_bytes = max_dataset_bytes
        self._command_bytes = 0  # of the message in progress
        self._dataset_bytes = 0  # of the message in progress
        self._aborting = False

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, fragment in primitive.presentation_data_value_list:
            kept = self._bounded(fragment)
            if kept is None:
                continue
            if self._parsed(context_id, kept) or self._appended(kept):
                if not kept[0] & _LAST_BIT or kept[0] & _COMMAND_BIT:
                    continue
                kept = kept[:1]  # the control byte alone ends the message in pynetdicom's decoder
            single = P_DATA()
            item: Any = [context_id, kept]  # a list, as pynetdicom's own decoder makes
            single.presentation_data_value_list = [item]
            super().receive_primitive(single)
            if self.message is None:  # a whole message was decoded: the next one starts from zero
                self._command_bytes = self._dataset_bytes = 0

    def _parsed(self, context_id: int, fragment: bytes) -> bool:
        """Start a C-STORE-RQ message from a whole command set in one fragment, decoded without pydicom."""
        if self.message is not None or not fragment or fragment[0] & (_COMMAND_BIT | _LAST_BIT) != 3:
            return False
        primitive = parse_c_store_request(memoryview(fragment)[1:])
        if primitive is None:
            return False
        self.message = ParsedStoreRequest.start(context_id, primitive)
        return True

    def _appended(self, fragment: bytes) -> bool:
        """Append a data set fragment to its message without the copy pynetdicom's ``data[1:]`` makes.

        Only once the command set is decoded (the message then has its own class) and the data set is buffered
        in memory. Returns whether it was appended: the last fragment is then passed on emptied, any other dropped.
        """
        message = self.message
        if (message is None or not fragment or fragment[0] & _COMMAND_BIT or type(message) is DIMSEMessage
                or getattr(message, "_data_set_file", None) or type(message.data_set) is not BytesIO):
            return False
        message.data_set.write(memoryview(fragment)[1:])
        return True

    def _bounded(self, fragment: bytes) -> bytes | None:
        """*fragment* while its message is within bounds; past them, what is left of it to decode (or None)."""
        if self._aborting:
            return None
        if not fragment:
            return fragment  # pynetdicom's to handle, as before
        if fragment[0] & _COMMAND_BIT:
            return self._bounded_command(fragment)
        self._dataset_bytes += len(fragment) - 1
        if self._dataset_bytes <= self._max_dataset_bytes:
            return fragment
        if self.message is None:
            self.message = DIMSEMessage()
        discarded = self.message.data_set
        if not isinstance(discarded, DiscardedDataSet):
            discarded = self.message.data_set = DiscardedDataSet()  # what was buffered is freed here
        discarded.received_bytes = self._dataset_bytes
        return fragment[:1] if fragment[0] & _LAST_BIT else None  # the last one, emptied, ends the message

    def _bounded_command(self, fragment: bytes) -> bytes | None:
        self._command_bytes += len(fragment) - 1
        if self._command_bytes <= _MAX_COMMAND_BYTES:
            return fragment
        log.warning("connection_aborted", reason="command_set_too_long", limit=_MAX_COMMAND_BYTES)
        self._aborting = True
        self.message = None
        self.dul.event_queue.put(_EVT_INVALID_PDU)
        return None

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and primitive.ErrorComment is None and primitive.OffendingElement is None):
            pdata = P_DATA()
            # pynetdicom wants [ID, PDV] lists here, although its annotation says tuples.
            item: Any = [context_id, _LAST_COMMAND_FRAGMENT + encode_c_store_response(primitive)]
            pdata.presentation_data_value_list = [item]
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)


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
        self.dimse = _GatewayDIMSE(self, server.limits.max_dataset_bytes)
        self.dimse.msg_queue = _InlineStoreQueue(self._serve_request)
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
