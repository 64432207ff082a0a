"""The upper layer (DUL) of an acceptor association: each PDU read into one buffer, P-DATA decoded without copies.

pynetdicom 3.0.4 reads a PDU as its 6-byte header and then its body, joins the two (a copy), copies the
whole PDU again to decode it, and copies every presentation data value out of it into an item object: three
copies of every received byte before the DIMSE layer sees them. Here the PDU is read whole into one buffer
(:meth:`gateway.receiving.sockets.FastSocket.recv_pdu`, which has checked its declared length against what
was negotiated), and the presentation data values of a P-DATA-TF reach the DIMSE layer as views into that
buffer; the one copy left is the DIMSE layer's own (:mod:`gateway.receiving.dimse`). Every other PDU is
decoded by pynetdicom as before. EVT_DATA_RECV and EVT_PDU_RECV are not triggered for P-DATA-TF: nothing in
the gateway binds them.
"""

from __future__ import annotations

from typing import Any, cast

from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

from gateway.receiving.sockets import FastSocket

__all__ = ["GatewayDUL", "PDataView", "split_pdvs"]

_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))  # PS3.8 Table 9-1
_EVT_P_DATA, _EVT_CLOSED, _EVT_INVALID = "Evt10", "Evt17", "Evt19"  # PS3.8 Table 9-6
_ITEM_HEAD = 4  # Item Length; then the Presentation Context ID and the value (PS3.8 Table 9-23)
_MIN_ITEM_LENGTH = 2  # the context ID and the message control header (PS3.8 E.2)


def split_pdvs(body: memoryview) -> list[list[Any]]:
    """The ``[context ID, value]`` items of a P-DATA-TF's *body* (after its 6-byte header), values as views of it.

    Raises
    ------
    ValueError
        When the body holds no item, or an item is shorter than a context ID and a message control header
        or runs past the end of the PDU.
    """
    items: list[list[Any]] = []
    offset, end = 0, len(body)
    while offset < end:
        length = int.from_bytes(body[offset:offset + _ITEM_HEAD], "big")
        start = offset + _ITEM_HEAD
        if end - offset < _ITEM_HEAD + _MIN_ITEM_LENGTH or length < _MIN_ITEM_LENGTH or start + length > end:
            raise ValueError("presentation data value item of an invalid length")
        items.append([body[start], body[start + 1:start + length]])
        offset = start + length
    if not items:
        raise ValueError("P-DATA-TF without a presentation data value item")
    return items


class PDataView:
    """A received P-DATA-TF as pynetdicom's state machine uses it (DT-2 asks it for its primitive)."""

    __slots__ = ("_items",)

    def __init__(self, items: list[list[Any]]) -> None:
        self._items = items

    def to_primitive(self) -> P_DATA:
        """The P-DATA indication, its values still views of the received PDU (the type check is skipped)."""
        primitive = P_DATA()
        primitive._presentation_data_value_list = cast(list[tuple[int, bytes]], self._items)
        return primitive


class GatewayDUL(DULServiceProvider):
    """DUL service provider that reads every PDU whole and passes P-DATA-TF values on without copying them."""

    def _read_pdu_data(self) -> None:
        sock = cast(FastSocket, self.socket)
        try:
            pdu = sock.recv_pdu()
        except OSError:  # timeouts included; FastSocket has said why where it is ours to say
            self.event_queue.put(_EVT_CLOSED)
            return
        if len(pdu) < 6 or len(pdu) != 6 + int.from_bytes(pdu[2:6], "big"):
            self.event_queue.put(_EVT_CLOSED)  # the connection ended inside the PDU
            return
        decoded: Any
        if pdu[0] == _P_DATA_TF:
            try:
                decoded, event = PDataView(split_pdvs(memoryview(pdu)[6:])), _EVT_P_DATA
            except ValueError:
                self.event_queue.put(_EVT_INVALID)
                return
        elif pdu[0] not in _PDU_TYPES:
            self.event_queue.put(_EVT_INVALID)
            return
        else:
            try:
                decoded, event = self._decode_pdu(pdu)
            except Exception:  # pynetdicom raises many types for a malformed PDU
                self.event_queue.put(_EVT_INVALID)
                return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)
