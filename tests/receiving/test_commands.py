"""C-STORE command sets decoded without pydicom give what pynetdicom gives, or defer to it."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode

from gateway.receiving.commands import parse_c_store_request

_FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
           "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


def _command_set(primitive: C_STORE | C_ECHO) -> bytes:
    """The encoded command set pynetdicom sends for *primitive* (one fragment, control byte dropped)."""
    message = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    message.primitive_to_message(primitive)
    [command, *_data] = list(message.encode_msg(1, 1 << 20))
    [(_context, value)] = command.presentation_data_value_list
    return bytes(value[1:])


def _request(instance_uid: str = "1.2.3.45", **extra: object) -> C_STORE:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = instance_uid
    request.Priority = 2
    for name, value in extra.items():
        setattr(request, name, value)
    request.DataSet = BytesIO(b"\x08\x00\x16\x00")
    return request


def _pynetdicom_decoded(encoded: bytes) -> C_STORE:
    message = DIMSEMessage()
    message.encoded_command_set.write(encoded)
    message.command_set = decode(message.encoded_command_set, True, True)
    message.__class__ = C_STORE_RQ
    message.data_set = BytesIO()
    primitive = message.message_to_primitive()
    assert isinstance(primitive, C_STORE)
    return primitive


@pytest.mark.parametrize("request_", [
    _request("1.2.3.4"), _request("1.2.3.45"),  # even and odd UID lengths
    _request(MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3),
])
def test_a_plain_store_request_decodes_as_pynetdicom_decodes_it(request_: C_STORE) -> None:
    encoded = _command_set(request_)
    ours = parse_c_store_request(memoryview(encoded))
    assert ours is not None
    theirs = _pynetdicom_decoded(encoded)
    for name in _FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def test_anything_unusual_is_left_to_pynetdicom() -> None:
    plain = _command_set(_request())
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert parse_c_store_request(memoryview(_command_set(echo))) is None  # not a C-STORE
    assert parse_c_store_request(memoryview(plain[:-3])) is None  # cut short
    assert parse_c_store_request(memoryview(plain + _element(0x1040, b"x\0"))) is None  # an unknown element
    priority = plain.replace(_element(0x0700, b"\x02\x00"), _element(0x0700, b"\x09\x00"))
    assert priority != plain and parse_c_store_request(memoryview(priority)) is None  # invalid: pynetdicom decides
    no_data = plain.replace(_element(0x0800, b"\x01\x00"), _element(0x0800, b"\x01\x01"))
    assert no_data != plain and parse_c_store_request(memoryview(no_data)) is None
    reordered = _element(0x1000, b"1.2\0") + plain
    assert parse_c_store_request(memoryview(reordered)) is None  # elements out of order
