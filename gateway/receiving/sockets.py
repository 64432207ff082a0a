"""The receiver's socket: event-driven waiting, whole-PDU reads, and the bounds a hostile peer meets.

Used by :mod:`gateway.receiving.acceptor` for every accepted connection (plain or TLS).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, cast

import structlog
from pynetdicom.transport import AssociationSocket

from gateway.config import GatewayConfig
from gateway.limits import Limits

__all__ = ["REACTOR_TICK_S", "ConnectionLimits", "FastSocket"]

log = structlog.get_logger(__name__)

#: Longest wait of the DUL and association reactors for an event before they re-check their
#: timers (ARTIM, idle) and kill flags; any event (PDU, outgoing primitive, DIMSE message) wakes them at once.
REACTOR_TICK_S = 0.01


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may ask of a receiver before it is cut off."""

    max_pdu_length: int  # P-DATA-TF: what we negotiated
    max_other_pdu_length: int = 1024 * 1024  # A-ASSOCIATE-RQ and the rest (dcmtk's bound)
    association_request_seconds: float = 10.0  # from connect to a complete A-ASSOCIATE-RQ
    pdu_seconds: float = 30.0  # from the first byte of a PDU to its last, whatever the sender's pace
    #: Data set bytes of one DIMSE message; past it the rest is read and dropped, and the C-STORE refused.
    max_dataset_bytes: int = Limits().max_dataset_bytes

    @classmethod
    def from_config(cls, config: GatewayConfig) -> ConnectionLimits:
        """The limits of ``[node]`` and ``[limits]`` in *config*."""
        node = config.node
        return cls(max_pdu_length=node.max_pdu_size, association_request_seconds=node.association_request_seconds,
                   pdu_seconds=node.pdu_seconds, max_dataset_bytes=config.limits.max_dataset_bytes)


#: A-ABORT, source service-provider (2), reason invalid-PDU-parameter value (6) (PS3.8 9.3.8).
_ABORT_INVALID_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
_P_DATA_TF = 0x04
_PREALLOCATE = 256 * 1024  # PDUs up to this long are read into a buffer of their declared size


class FastSocket(AssociationSocket):
    """AssociationSocket that waits for data or a wake-up, reads whole PDUs at once, and bounds each PDU.

    pynetdicom's DUL polls ``ready`` with a zero timeout and sleeps 1 ms between polls;
    here ``ready`` blocks in ``select`` on the socket and the association's wake-up pipe,
    so a PDU or an outgoing primitive is handled at once and an idle association costs
    no CPU.

    pynetdicom reads a PDU as ``recv(6)`` then ``recv(length)``, trusting the declared length
    and waiting as long as the sender dribbles. Here a declared length above the limit for
    its type is answered with A-ABORT before a byte of it is read, every PDU must arrive
    within ``pdu_seconds`` of its first byte, and the A-ASSOCIATE-RQ within
    ``association_request_seconds`` of the connection.
    """

    def __init__(self, assoc: Any, client_socket: socket.socket, wakeup_fd: int, limits: ConnectionLimits) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._limits = limits
        self._connected_at = time.monotonic()
        self._first_pdu_read = False
        self._woken = False
        self._pdu_deadline: float | None = None  # set while a PDU is being read
        self._wakeup_fd = wakeup_fd
        self._socket_fd = client_socket.fileno()
        self._poll = select.poll()  # poll, not select: no FD_SETSIZE limit
        self._poll.register(self._socket_fd, select.POLLIN)
        self._poll.register(wakeup_fd, select.POLLIN)

    @property
    def ready(self) -> bool:
        sock: socket.socket | None = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        if not self._first_pdu_read and time.monotonic() > self._request_deadline:
            log.warning("connection_closed", reason="no_association_request_in_time")
            self.event_queue.put("Evt18")  # as if ARTIM expired: the state machine closes the connection
            self._first_pdu_read = True  # once
            return False
        try:
            events = dict(self._poll.poll(REACTOR_TICK_S * 1000))
        except OSError:
            events = {self._socket_fd: select.POLLNVAL}
        if self._wakeup_fd in events:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wakeup_fd, 4096)
        socket_events = events.get(self._socket_fd, 0)
        if socket_events & select.POLLNVAL:
            self.event_queue.put("Evt17")  # as pynetdicom does when select fails
            return False
        # POLLHUP/POLLERR: let recv() read what is left and see the end of the connection.
        return bool(socket_events)

    def close(self) -> None:
        super().close()
        self._wake_acceptor()

    def _wake_acceptor(self) -> None:
        # Before association, the acceptor thread waits for the A-ASSOCIATE-RQ primitive for the
        # whole ACSE timeout; once the connection is over none will come: wake it (None = timed out).
        assoc = self.assoc
        if not assoc.is_established and not assoc.is_released and not self._woken:
            self._woken = True
            cast(Any, assoc.dul.to_user_queue).put(None)

    @property
    def _request_deadline(self) -> float:
        return self._connected_at + self._limits.association_request_seconds

    def recv(self, nr_bytes: int) -> bytearray:
        try:
            data = self._recv_pdu_part(nr_bytes)
        except OSError:
            self._wake_acceptor()
            raise
        if len(data) < nr_bytes:  # the peer closed the connection
            self._wake_acceptor()
        return data

    def _recv_pdu_part(self, nr_bytes: int) -> bytearray:
        if self._pdu_deadline is None:  # the DUL asks for a PDU header: a new PDU starts
            deadline = time.monotonic() + self._limits.pdu_seconds
            self._pdu_deadline = deadline if self._first_pdu_read else min(deadline, self._request_deadline)
            header = self._read(nr_bytes)
            if len(header) == 6:
                self._check_length(header[0], int.from_bytes(header[2:6], "big"))
            else:
                self._pdu_deadline = None
            return header
        try:
            return self._read(nr_bytes)
        finally:
            self._pdu_deadline = None
            self._first_pdu_read = True

    def _check_length(self, pdu_type: int, length: int) -> None:
        limit = self._limits.max_pdu_length if pdu_type == _P_DATA_TF else self._limits.max_other_pdu_length
        if length <= limit:
            return
        self._pdu_deadline = None
        log.warning("connection_aborted", reason="pdu_too_long", pdu_type=pdu_type, declared=length, limit=limit)
        with contextlib.suppress(OSError):
            cast(socket.socket, self.socket).sendall(_ABORT_INVALID_PARAMETER)
        raise OSError("declared PDU length over the limit")  # the DUL closes the connection

    def recv_pdu(self) -> bytearray:
        """The next PDU, header and body in one buffer; shorter than it declares when the connection ended.

        A P-DATA-TF (its declared length already checked against what was negotiated) is read straight into
        a buffer of its size; any other PDU as :meth:`recv` reads it.

        Raises
        ------
        OSError
            As :meth:`recv`: the connection failed, the PDU was too long or too slow.
        """
        header = self.recv(6)
        if len(header) < 6:
            return header
        length = int.from_bytes(header[2:6], "big")
        if header[0] != _P_DATA_TF:
            return header + self.recv(length)
        pdu = bytearray(6 + length)
        pdu[:6] = header
        try:
            received = self._read_into(memoryview(pdu)[6:])
        except OSError:
            self._wake_acceptor()
            raise
        finally:
            self._pdu_deadline = None
            self._first_pdu_read = True
        if received < length:  # the peer closed the connection
            self._wake_acceptor()
            del pdu[6 + received:]
        return pdu

    def _read(self, nr_bytes: int) -> bytearray:
        if nr_bytes > _PREALLOCATE:
            return self._read_growing(nr_bytes)
        buffer = bytearray(nr_bytes)
        received = self._read_into(memoryview(buffer))
        return buffer if received == nr_bytes else buffer[:received]

    def _read_into(self, view: memoryview) -> int:
        """Fill *view* from the socket before the PDU's deadline; return how many bytes came (fewer: it closed)."""
        sock: socket.socket = self.socket  # type: ignore[assignment]
        assert self._pdu_deadline is not None
        received, wanted = 0, len(view)
        try:
            while received < wanted:
                # A timeout per call (a TLS record is read whole, so waiting for readability is not enough).
                sock.settimeout(max(0.001, self._pdu_deadline - time.monotonic()))
                count = sock.recv_into(view[received:], wanted - received)
                if not count:
                    break
                received += count
        except TimeoutError:
            self._pdu_deadline = None
            log.warning("connection_closed", reason="pdu_too_slow", limit_seconds=self._limits.pdu_seconds)
            raise
        finally:
            view.release()
            sock.settimeout(self._limits.pdu_seconds)  # what our own sends may wait for a peer that does not read
        return received

    def _read_growing(self, nr_bytes: int) -> bytearray:
        # A large declared length (up to the A-ASSOCIATE-RQ bound): memory follows the bytes that
        # actually arrive, so a peer that declares much and sends little costs little.
        buffer = bytearray()
        while len(buffer) < nr_bytes:
            wanted = min(_PREALLOCATE, nr_bytes - len(buffer))
            chunk = self._read(wanted)
            buffer += chunk
            if len(chunk) < wanted:  # the connection ended
                break
        return buffer
