"""Hostile and broken peers on loopback: oversized, slow, idle, malformed; the node stays up and bounded."""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from gateway.store.spool import count_instances
from tests.conftest import REPO, NodeProcess, group_memory_kib, write_config
from tests.synthetic import ct_slice

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
FAST = 'association_request_seconds = 3\npdu_seconds = 2'
#: How long the tests wait for the node to close or abort a connection its limits (FAST) end in seconds: a bound on
#: a failure only (a pass does not wait it out), generous for a busy machine, and well below what an idle timeout
#: reset by every byte would take to end a socket that keeps trickling.
CLOSE_DEADLINE_S = 30.0


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(calling: bytes = b"PACS", called: bytes = b"CONTOUR_GW") -> bytes:
    """A well-formed A-ASSOCIATE-RQ for Verification."""
    context = _item(0x20, b"\x01\x00\x00\x00" + _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT_LE.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (b"\x00\x01\x00\x00" + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def group_rss_kib(pgid: int) -> int:
    """Resident memory of every process in the node's process group."""
    return sum(group_memory_kib(pgid).values())


def settled_rss_kib(pgid: int, timeout: float = 30.0) -> int:
    """The group's memory once it stops growing (receiver processes finish importing after the first echo)."""
    deadline = time.monotonic() + timeout
    last = group_rss_kib(pgid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = group_rss_kib(pgid)
        if abs(now - last) < 1024:
            return now
        last = now
    return last


def echo(node: NodeProcess, timeout: float = 30.0) -> bool:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CONTOUR_GW")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


def connect(node: NodeProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the node closed *sock* (reading whatever it sent), or None if it did not."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_a_pdu_declaring_2_gib_is_aborted_before_it_is_read(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(extra_node=FAST)
    assert echo(node)
    before = settled_rss_kib(node.process.pid)
    with connect(node) as sock:
        sock.sendall(associate_rq())
        assert sock.recv(6)[0] == 0x02  # A-ASSOCIATE-AC
        sock.recv(65536)
        sock.sendall(struct.pack(">BBI", 0x04, 0, 2**31))
        # The node may abort on the header alone, before this first MiB of the body is through: the pipe then breaks.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(bytes(1024 * 1024))
        sock.settimeout(CLOSE_DEADLINE_S)
        answer = b""
        while len(answer) < 10:
            chunk = sock.recv(10 - len(answer))
            if not chunk:
                break
            answer += chunk
    assert answer[:1] == b"\x07", answer  # A-ABORT
    assert answer[8:10] == b"\x02\x06"  # service provider, invalid PDU parameter value
    assert node.wait_for("connection_aborted", reason="pdu_too_long")["declared"] == 2**31
    assert group_rss_kib(node.process.pid) - before < 20 * 1024
    assert echo(node)


def test_an_association_request_over_1_mib_is_aborted(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(extra_node=FAST)
    with connect(node) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0, 2 * 1024 * 1024))
        assert closed_within(sock, CLOSE_DEADLINE_S) is not None
    assert node.wait_for("connection_aborted", reason="pdu_too_long")["limit"] == 1024 * 1024


def test_idle_and_trickling_sockets_are_cut_off_and_do_not_deny_service(
        node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(extra_node=FAST, max_associations=4)
    idle = [connect(node) for _ in range(50)]
    trickling = [connect(node) for _ in range(10)]
    stop = threading.Event()

    def trickle() -> None:  # an A-ASSOCIATE-RQ one byte every 0.5 s, on every trickling socket
        request = associate_rq()
        for index in range(len(request)):
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.send(request[index:index + 1])
            if stop.wait(0.5):
                return

    dribbler = threading.Thread(target=trickle, daemon=True)
    dribbler.start()
    started = time.monotonic()
    succeeded = sum(echo(node) for _ in range(100))
    assert succeeded >= 99
    # Every bad socket is closed by its deadline (3 s to an A-ASSOCIATE-RQ); the trickling ones keep trickling
    # (a byte every 0.5 s: over a minute for the whole request) until closed, so no idle timeout ends them.
    try:
        for sock in idle + trickling:
            waited = closed_within(sock, max(0.1, started + CLOSE_DEADLINE_S - time.monotonic()))
            assert waited is not None, "a bad socket outlived its deadline"
            sock.close()
    finally:
        stop.set()
        dribbler.join(timeout=10)
    reasons = [e.get("reason") for e in node.events() if e["event"] == "connection_closed"]
    assert reasons.count("no_association_request_in_time") + reasons.count("pdu_too_slow") >= 60


def test_a_pdu_dribbled_after_association_is_cut_off(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(extra_node=FAST)
    with connect(node) as sock:
        sock.sendall(associate_rq())
        assert sock.recv(6)[0] == 0x02
        sock.recv(65536)
        sock.sendall(struct.pack(">BBI", 0x04, 0, 100) + b"\x00")  # then nothing more
        waited = closed_within(sock, CLOSE_DEADLINE_S)
    assert waited is not None
    assert node.wait_for("connection_closed", reason="pdu_too_slow")


@pytest.mark.parametrize("body", [
    struct.pack(">IB", 64, 1) + b"\x03CANARY^FUZZ",  # an item running past the end of its PDU
    struct.pack(">IB", 1, 1),  # an item without a message control header
    b"",  # no item
], ids=["past-the-end", "no-control-header", "empty"])
def test_a_malformed_p_data_after_association_is_aborted(node_factory: Callable[..., NodeProcess],
                                                         body: bytes) -> None:
    node = node_factory()
    with connect(node) as sock:
        sock.sendall(associate_rq())
        assert sock.recv(6)[0] == 0x02  # A-ASSOCIATE-AC
        sock.recv(65536)
        sock.sendall(struct.pack(">BBI", 0x04, 0, len(body)) + body)
        sock.settimeout(CLOSE_DEADLINE_S)
        assert sock.recv(1) == b"\x07"  # A-ABORT
    assert echo(node)
    assert "CANARY" not in node.log_text()


def _fuzz_pdu(rng: random.Random, valid: bytes) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:  # random type and length, random body
        body = rng.randbytes(rng.randrange(0, 64))
        length = rng.choice([len(body), rng.randrange(2**32)])
        return struct.pack(">BBI", rng.randrange(256), rng.randrange(256), length) + body
    if choice == 1:  # a valid request with bytes flipped
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        return bytes(mutated)
    if choice == 2:  # truncated
        return valid[:rng.randrange(len(valid))]
    if choice == 3:  # declared longer than sent
        return struct.pack(">BBI", rng.randrange(1, 8), 0, rng.randrange(100, 10**6)) + b"CANARY^FUZZ"
    if choice == 4:  # P-DATA before association
        return struct.pack(">BBI", 0x04, 0, 20) + b"CANARY^FUZZ" + bytes(9)
    return rng.randbytes(rng.randrange(1, 300))  # noise


def _flood(node: NodeProcess, payloads: list[bytes]) -> None:
    """Send each payload on its own connection, eight at a time, then wait for a legitimate C-ECHO."""

    def send(part: list[bytes]) -> None:
        for payload in part:
            try:
                with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)  # the node sees the end at once, as from a crashing peer
            except OSError:
                pass

    senders = [threading.Thread(target=send, args=(payloads[i::8],)) for i in range(8)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    started = time.monotonic()
    while not echo(node):
        assert time.monotonic() - started < 60, "no legitimate C-ECHO within 60 s of the flood"


def test_ten_thousand_malformed_pdus_leave_the_node_up_and_bounded(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(extra_node=FAST + "\nmax_pending_connections = 256")
    assert echo(node)
    rng = random.Random(11)
    valid = associate_rq(calling=b"FUZZER")
    payloads = [_fuzz_pdu(rng, valid) for _ in range(12_000)]
    # The first 2,000 warm the allocator up (a glibc arena per receiving thread, pages kept for reuse); the
    # other 10,000 must then cost next to nothing: what a leak of a few KB per connection would show.
    _flood(node, payloads[:2_000])
    before = settled_rss_kib(node.process.pid)
    _flood(node, payloads[2_000:])
    assert node.process.poll() is None
    grown = settled_rss_kib(node.process.pid) - before
    assert grown < 32 * 1024, f"{grown} KiB more after 10,000 malformed connections"
    assert "CANARY^FUZZ" not in node.log_text()


def test_the_node_refuses_to_run_optimised(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var")
    result = subprocess.run([sys.executable, "-O", "-m", "gateway", "serve", "--config", str(config)],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 2
    assert "without -O" in result.stderr


def _store(node: NodeProcess, ds: Dataset, calling_ae: str = "PACS") -> int:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CONTOUR_GW")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _files_outside(root: Path, inside: list[Path]) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and not any(p.is_relative_to(i) for i in inside)}


@pytest.mark.parametrize(("keyword", "value", "calling_ae", "status"), [
    ("SOPInstanceUID", "../../x", "PACS", 0xC220), ("StudyInstanceUID", "1." + "2" * 63, "PACS", 0xC220),
    ("SOPInstanceUID", "1.2.abc", "PACS", 0xC220), ("SeriesInstanceUID", "1.2/../3", "PACS", 0xC220),
    (None, None, "../../etc", 0x0000), (None, None, "..\\x", None)])
def test_path_like_identifiers_never_reach_a_path(node_factory: Callable[..., NodeProcess], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, keyword: str | None,
                                                 value: str | None, calling_ae: str, status: int | None) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    temp = tmp_path / "node-tmp"
    temp.mkdir()
    node = node_factory(env={"TMPDIR": str(temp)})
    before = _files_outside(tmp_path, [node.data_dir, temp])
    ds = ct_slice(generate_uid(), generate_uid(), generate_uid(), 0, 16, np.random.default_rng(1))
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = value
    if keyword is not None:
        setattr(ds, keyword, value)
    if status is None:  # a backslash is no AE title: pynetdicom will not even send it
        with pytest.raises(ValueError):
            _store(node, ds, calling_ae)
    else:
        assert _store(node, ds, calling_ae) == status
    kek_files = {p for p in (tmp_path / "keys").iterdir() if re.fullmatch(r"kek-[0-9]+\.key", p.name)}
    assert _files_outside(tmp_path, [node.data_dir, temp]) - before <= {node.log_path, *kek_files}
    # onnxruntime writes a session id (a time and a random UUID) to $TMPDIR/.ses when imported; multiprocessing
    # keeps a pymp-* folder for the receivers' fork server (its socket, or nothing when the path is too long).
    assert {p.name for p in temp.iterdir() if p.name != ".ses" and not (p.name.startswith("pymp-") and p.is_dir())} \
        == set()
    assert not [f for f in temp.rglob("*") if f.is_file() and f.name != ".ses"]  # no file: no data set, no name
    spooled = [p.name for p in (node.data_dir / "spool").rglob("*") if p.is_file()]
    assert all(re.fullmatch(r"[0-9a-f]{16}\.seg", name) for name in spooled), spooled  # names carry no data
    assert count_instances(node.data_dir) == (1 if status == 0 else 0)
