"""The acceptor's upper layer: whole PDUs read into one buffer, P-DATA-TF values split without copies."""

from __future__ import annotations

import io
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from gateway.receiving.sockets import ConnectionLimits, FastSocket
from gateway.receiving.upper_layer import PDataView, split_pdvs
from tests.receiving.test_hardening import associate_rq


def _c_store_pdus(data_set: bytes, max_pdu: int) -> list[bytes]:
    """The encoded P-DATA-TF PDUs pynetdicom sends for a C-STORE-RQ carrying *data_set*."""
    request = C_STORE()
    request.MessageID, request.Priority = 7, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    request.DataSet = io.BytesIO(data_set)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(3, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def _pdata(*items: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack(">IB", len(value) + 1, context_id) + value for context_id, value in items)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


class TestSplit:
    def test_items_are_what_pynetdicom_decodes_and_views_of_the_pdu(self) -> None:
        data_set = bytes(range(256)) * 2000
        for encoded in _c_store_pdus(data_set, 16384):
            reference = P_DATA_TF()
            reference.decode(encoded)
            buffer = bytearray(encoded)
            items = split_pdvs(memoryview(buffer)[6:])
            assert [(context_id, bytes(value)) for context_id, value in items] == [
                (item.presentation_context_id, item.presentation_data_value)
                for item in reference.presentation_data_value_items]
            assert all(isinstance(value, memoryview) and value.obj is buffer for _, value in items)

    def test_several_items_in_one_pdu_are_each_kept(self) -> None:
        pdu = _pdata((1, b"\x03command"), (3, b"\x02data"), (5, b"\x00"))
        assert [(context_id, bytes(value)) for context_id, value in split_pdvs(memoryview(pdu)[6:])] == [
            (1, b"\x03command"), (3, b"\x02data"), (5, b"\x00")]

    @pytest.mark.parametrize("body", [
        b"",  # no item
        struct.pack(">IB", 1, 1),  # an item with a context ID and no control header
        struct.pack(">IB", 10, 1) + b"\x02abc",  # an item longer than the PDU
        _pdata((1, b"\x02ok"))[6:] + b"\x00\x00\x00",  # a cut-off item length after a good item
        struct.pack(">IB", 0xFFFFFFFF, 1) + b"\x02",  # a length near 4 GiB
    ], ids=["empty", "no-control-header", "past-the-end", "trailing-bytes", "huge-length"])
    def test_a_malformed_body_is_refused(self, body: bytes) -> None:
        with pytest.raises(ValueError):
            split_pdvs(memoryview(body))

    def test_the_primitive_carries_the_views_unchecked(self) -> None:
        pdu = bytearray(_pdata((1, b"\x02data")))
        primitive = PDataView(split_pdvs(memoryview(pdu)[6:])).to_primitive()
        assert isinstance(primitive, P_DATA)
        ((context_id, value),) = primitive.presentation_data_value_list
        assert context_id == 1 and bytes(value) == b"\x02data"


@pytest.fixture
def socket_pair() -> Iterator[tuple[FastSocket, socket.socket]]:
    ours, peer = socket.socketpair()
    wakeup_read, wakeup_write = socket.socketpair()
    limits = ConnectionLimits(max_pdu_length=1 << 20)
    fast = FastSocket(Association(AE(), "acceptor"), ours, wakeup_read.fileno(), limits)
    try:
        yield fast, peer
    finally:
        for sock in (ours, peer, wakeup_read, wakeup_write):
            sock.close()


def _send_later(peer: socket.socket, payload: bytes, close: bool = False) -> threading.Thread:
    def send() -> None:
        for start in range(0, len(payload), 65536):  # in pieces, as TCP delivers them
            peer.sendall(payload[start:start + 65536])
        if close:
            peer.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    return sender


class TestRecvPdu:
    def test_a_p_data_larger_than_the_preallocation_comes_whole_in_one_buffer(
            self, socket_pair: tuple[FastSocket, socket.socket]) -> None:
        fast, peer = socket_pair
        fast._first_pdu_read = True  # past the association request
        pdu = _pdata((1, b"\x02" + bytes(range(256)) * 3000))  # 750 KiB, over the 256 KiB read-ahead
        sender = _send_later(peer, pdu + _pdata((1, b"\x02next")))
        assert fast.recv_pdu() == pdu
        assert fast.recv_pdu() == _pdata((1, b"\x02next"))
        sender.join()

    def test_other_pdus_come_whole(self, socket_pair: tuple[FastSocket, socket.socket]) -> None:
        fast, peer = socket_pair
        request, release = associate_rq(), b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
        sender = _send_later(peer, request + release)
        assert fast.recv_pdu() == request
        assert fast.recv_pdu() == release
        sender.join()

    def test_a_p_data_cut_off_by_the_peer_comes_short(self, socket_pair: tuple[FastSocket, socket.socket]) -> None:
        fast, peer = socket_pair
        fast._first_pdu_read = True
        pdu = _pdata((1, b"\x02" + bytes(300_000)))
        sender = _send_later(peer, pdu[:200_000], close=True)
        received = fast.recv_pdu()
        sender.join()
        assert received == pdu[:200_000]

    def test_a_p_data_over_the_negotiated_length_is_refused_unread(
            self, socket_pair: tuple[FastSocket, socket.socket]) -> None:
        fast, peer = socket_pair
        fast._first_pdu_read = True
        peer.sendall(struct.pack(">BBI", 0x04, 0, (1 << 20) + 1))
        with pytest.raises(OSError):
            fast.recv_pdu()
        assert peer.recv(10)[:1] == b"\x07"  # A-ABORT
