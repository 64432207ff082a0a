"""The DIMSE layer of an acceptor association, tuned for ingest (subclasses of pynetdicom 3.0.4's, no fork).

* :class:`GatewayDIMSE` decodes plain C-STORE requests and encodes their responses directly
  (:mod:`gateway.receiving.commands`), appends data set fragments without copying them twice, and bounds
  what one message may buffer: a data set over ``max_dataset_bytes`` is read on and dropped, and reaches
  the C-STORE handler as a :class:`DiscardedDataSet`.
* :class:`InlineStoreQueue` serves a C-STORE request on the DUL thread that decoded it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from io import BytesIO
from typing import Any

import structlog
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE, DimsePrimitiveType
from pynetdicom.pdu_primitives import P_DATA

from gateway.receiving.commands import ParsedStoreRequest, encode_c_store_response, parse_c_store_request

__all__ = ["DiscardedDataSet", "GatewayDIMSE", "InlineStoreQueue"]

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


class InlineStoreQueue(queue.Queue[Any]):
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


class GatewayDIMSE(DIMSEServiceProvider):
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
            item: Any = [context_id, bytes(kept)]  # a list, as pynetdicom's own decoder makes; bytes, not a view
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
