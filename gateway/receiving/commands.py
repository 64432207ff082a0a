"""C-STORE command sets encoded and decoded directly, without pydicom (PS3.7 9.3.1, Implicit VR Little Endian).

pynetdicom decodes every command set into a pydicom data set, then copies it element by element into a
primitive, and encodes every response the same way twice (once for its group length): together about
0.4 ms per instance, a tenth of a C-STORE round trip on loopback. A plain C-STORE request and response
are handled here instead; anything else (an unknown element, a malformed value) goes pynetdicom's way,
which keeps its own answers to malformed commands.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from gateway.encoding import implicit_element, padded

__all__ = ["ParsedStoreRequest", "encode_c_store_response", "parse_c_store_request"]

_C_STORE_RQ, _C_STORE_RSP = 0x0001, 0x8001  # CommandField, PS3.7 E.1
_NO_DATA_SET = 0x0101  # CommandDataSetType: no data set follows
_ELEMENT = struct.Struct("<HHI")
_UID_TAGS = {0x0002: "AffectedSOPClassUID", 0x1000: "AffectedSOPInstanceUID"}
_US_TAGS = {0x0100: "CommandField", 0x0110: "MessageID", 0x0700: "Priority", 0x0800: "CommandDataSetType",
            0x1031: "MoveOriginatorMessageID"}
_REQUIRED = {"AffectedSOPClassUID", "AffectedSOPInstanceUID", "CommandField", "MessageID", "Priority",
             "CommandDataSetType"}


def encode_c_store_response(response: C_STORE) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), Implicit VR Little Endian as PS3.7 6.3.1 requires."""
    body = b"".join((
        implicit_element(0x00000002, padded(str(response.AffectedSOPClassUID), b"\0")),
        implicit_element(0x00000100, struct.pack("<H", _C_STORE_RSP)),
        implicit_element(0x00000120, struct.pack("<H", response.MessageIDBeingRespondedTo)),
        implicit_element(0x00000800, struct.pack("<H", _NO_DATA_SET)),
        implicit_element(0x00000900, struct.pack("<H", response.Status)),
        implicit_element(0x00001000, padded(str(response.AffectedSOPInstanceUID), b"\0")),
    ))
    return implicit_element(0x00000000, struct.pack("<I", len(body))) + body


def _elements(encoded: memoryview) -> dict[str, Any] | None:
    """The values of a command set made only of C-STORE-RQ elements, or ``None``."""
    values: dict[str, Any] = {}
    offset, last_element = 0, -1
    while offset < len(encoded):
        if offset + _ELEMENT.size > len(encoded):
            return None
        group, element, length = _ELEMENT.unpack_from(encoded, offset)
        offset += _ELEMENT.size
        value = encoded[offset: offset + length]
        offset += length
        if group != 0 or element <= last_element or len(value) != length:
            return None
        last_element = element
        if element in _US_TAGS and length == 2:
            values[_US_TAGS[element]] = int.from_bytes(value, "little")
        elif element in _UID_TAGS:
            values[_UID_TAGS[element]] = bytes(value).decode("ascii", "replace").rstrip("\0 ")
        elif element == 0x1030 and length <= 16:
            values["MoveOriginatorApplicationEntityTitle"] = bytes(value).decode("ascii", "replace").strip()
        elif element != 0x0000:  # the group length is not needed
            return None
    return values


def parse_c_store_request(encoded: memoryview) -> C_STORE | None:
    """The C-STORE request primitive of a whole command set, or ``None`` when pynetdicom must decode it."""
    values = _elements(encoded)
    if (values is None or not values.keys() >= _REQUIRED or values["CommandField"] != _C_STORE_RQ
            or values["CommandDataSetType"] == _NO_DATA_SET):
        return None
    primitive = C_STORE()
    try:  # pynetdicom's own setters validate each value
        for name, value in values.items():
            if name not in ("CommandField", "CommandDataSetType"):
                setattr(primitive, name, value)
    except (ValueError, TypeError):
        return None
    return primitive


class ParsedStoreRequest(C_STORE_RQ):
    """A C-STORE-RQ message whose command set was decoded by :func:`parse_c_store_request`.

    Built without pynetdicom's constructor (it fills a pydicom data set nobody reads); its data set
    fragments are appended as usual, and :meth:`message_to_primitive` hands over the parsed primitive.
    """

    context_id: int | None
    _primitive: C_STORE

    @classmethod
    def start(cls, context_id: int, primitive: C_STORE) -> ParsedStoreRequest:
        """A message in progress: its command set complete, its data set to come."""
        message = cls.__new__(cls)
        message.context_id = context_id
        message.command_set = Dataset()
        message.encoded_command_set = BytesIO()
        message.data_set = BytesIO()
        message._data_set_file = None
        message._data_set_path = None
        message._primitive = primitive
        return message

    def message_to_primitive(self) -> C_STORE:
        """The parsed primitive, with the data set received."""
        self._primitive.DataSet = self.data_set
        return self._primitive
