"""Tests for gateway.sending.scu: the C-STORE SCU against real peers on loopback (dcmtk and pynetdicom).

How failures are classified is checked on single ``Sender.send_once`` attempts; how often and when they
are retried, through :func:`gateway.sending.delivery.deliver_due` with a real job database.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from gateway.config import Destination, GatewayConfig, parse_config
from gateway.errors import PermanentSendError, SendError, TransientSendError
from gateway.sending.delivery import deliver_due
from gateway.sending.scu import Sender, classify_status
from gateway.store.jobs import JobState, JobStore
from gateway.store.outputs import StageContext, save_output
from gateway.store.sealing import Sealer
from gateway.store.spool import Spool
from gateway.store.tasks import Delivery, DeliveryState, NewTask
from tests.conftest import dcmtk_env, free_port, key_ring, make_ct_series, require_tool

NOW = 1_800_000_000.0


def _config(port: int, *, attempts: int = 1, backoff: float = 0.5,
            dimse_timeout: float = 10.0) -> GatewayConfig:
    """A validated configuration with one destination ``tps`` (AE ``TPS``) on loopback."""
    return parse_config({
        "node": {"ae_title": "CONTOUR_GW"},
        "destinations": [{
            "name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": port,
            "connect_timeout_seconds": 2, "acse_timeout_seconds": 5,
            "dimse_timeout_seconds": dimse_timeout,
            "retry": {"max_attempts": attempts, "initial_backoff_seconds": backoff},
        }],
    })


def _sender(config: GatewayConfig) -> tuple[Sender, Destination]:
    """A sender for *config* and its destination ``tps``."""
    return Sender(config), config.destination("tps")


def _eventually(predicate: Callable[[], bool], timeout: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _assert_closed(ae: AE) -> None:
    """The SCP side saw the association released or aborted within a second."""
    assert _eventually(lambda: not ae.active_associations), ae.active_associations


def _count_attempts(monkeypatch: pytest.MonkeyPatch, sender: Sender) -> list[int]:
    """Wrap ``sender.send_once`` so every attempt ``deliver_due`` makes is counted."""
    attempts: list[int] = []
    original = sender.send_once

    def counting(dataset: Dataset, destination: Destination) -> int:
        attempts.append(1)
        return original(dataset, destination)

    monkeypatch.setattr(sender, "send_once", counting)
    return attempts


@dataclass
class Outbox:
    """A job in a real job database whose one task owes its result ``out0`` to the destination ``tps``."""

    ctx: StageContext
    job_id: str

    def deliver(self, config: GatewayConfig, sender: Sender, *, limit: int = 10) -> tuple[Delivery, list[float]]:
        """Run ``deliver_due`` whenever the delivery is due, as the runner does, until it ends.

        Returns the final delivery and the waits planned between its attempts; checks on the way
        that nothing is attempted before the planned time.
        """
        now, times = NOW, list[float]()
        for _ in range(limit):
            [delivery] = deliver_due(self.ctx, config, sender, self.job_id, 1, now)
            times.append(now)
            assert delivery.attempts == len(times)
            if delivery.state.terminal:
                return delivery, [later - earlier for earlier, later in itertools.pairwise(times)]
            assert delivery.next_attempt_at > now
            [early] = deliver_due(self.ctx, config, sender, self.job_id, 1, delivery.next_attempt_at - 0.01)
            assert early == delivery  # not due yet: no attempt made, nothing recorded
            now = delivery.next_attempt_at
        pytest.fail(f"the delivery was still pending after {limit} attempts")


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Callable[[Dataset], Outbox]]:
    """Factory: ``outbox(dataset)`` records a job owing *dataset* to ``tps``, sealed as re-identification leaves it."""
    spool = Spool(tmp_path / "var")
    spool.prepare()
    jobs = JobStore(spool.database_path)
    ctx = StageContext(spool, jobs, Sealer(key_ring(tmp_path / "keys"), jobs))

    def factory(dataset: Dataset) -> Outbox:
        job_id = jobs.reserve("a" * 64, "pacs", 1.0, NOW).job_id
        jobs.force_complete(job_id, NOW)
        ctx.tasks.create(job_id, [NewTask("ct", ["0" * 32])], duration_ms=0, now=NOW)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        save_output(ctx, job_id, 1, "out0", buffer.getvalue())
        ctx.tasks.advance(job_id, 1, JobState.REIDENTIFIED, stage=None, duration_ms=0, now=NOW,
                          deliveries=[(0, "tps")])
        return Outbox(ctx, job_id)

    yield factory
    jobs.close()


@pytest.fixture
def ct_dataset(tmp_path: Path) -> Dataset:
    """One synthetic CT slice, read back from its Part 10 file."""
    series = make_ct_series(tmp_path / "ct", 1)
    return pydicom.dcmread(series.files[0])


def _wait_for_acceptor(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait until *port* answers an A-ASSOCIATE-RQ (accept or reject; a bare TCP probe upsets
    ``storescp --refuse``)."""
    probe = AE(ae_title="PROBE")
    probe.add_requested_context(Verification)
    probe.connection_timeout = probe.acse_timeout = 2
    deadline = time.monotonic() + 10
    while True:
        assert process.poll() is None, f"storescp exited with {process.returncode}"
        assoc = probe.associate("127.0.0.1", port, ae_title="TPS")
        if assoc.is_established:
            assoc.release()
            return
        if assoc.is_rejected:
            return
        assert time.monotonic() < deadline, "storescp did not start answering"
        time.sleep(0.05)


@dataclass
class StoreSCP:
    """A running dcmtk ``storescp`` process."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Factory: ``storescp(*extra_args)`` starts storescp as AE ``TPS``; stopped at teardown."""
    binary = require_tool("storescp")
    started: list[StoreSCP] = []

    def factory(*extra: str) -> StoreSCP:
        port, folder = free_port(), tmp_path / f"storescp{len(started)}"
        folder.mkdir()
        command = [binary, "-od", str(folder), "-aet", "TPS", "+xa", *extra, str(port)]
        process = subprocess.Popen(command, env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        started.append(StoreSCP(port, folder, process))
        _wait_for_acceptor(port, process)
        return started[-1]

    yield factory
    for scp in started:
        scp.process.terminate()
        try:
            scp.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            scp.process.kill()
            scp.process.wait(timeout=5)


@dataclass
class PynetdicomSCP:
    """A running pynetdicom acceptor and the statuses its C-STORE handler gave."""

    ae: AE
    port: int
    calls: list[int] = field(default_factory=list)


@pytest.fixture
def scp() -> Iterator[Callable[..., PynetdicomSCP]]:
    """Factory: pynetdicom acceptors giving C-STORE a fixed status; shut down at teardown."""
    started: list[AE] = []

    def factory(*, status: int = 0x0000, contexts: tuple[str, ...] = (CTImageStorage, Verification),
                before_reply: Callable[[], Any] | None = None, **attributes: Any) -> PynetdicomSCP:
        ae = AE(ae_title="TPS")
        for context in contexts:
            ae.add_supported_context(context)
        for name, value in attributes.items():
            setattr(ae, name, value)
        port = free_port()
        result = PynetdicomSCP(ae, port)

        def on_store(event: evt.Event) -> int:
            result.calls.append(status)
            if before_reply is not None:
                before_reply()
            return status

        ae.start_server(("127.0.0.1", port), block=False,
                        evt_handlers=[(evt.EVT_C_STORE, on_store)])
        started.append(ae)
        return result

    yield factory
    for ae in started:
        ae.shutdown()


class TestClassifyStatus:
    @pytest.mark.parametrize(("status", "kind"), [
        (0x0000, "success"),
        (0xB000, "warning"), (0xB006, "warning"), (0xB007, "warning"), (0x0001, "warning"),
        (0xA700, "transient"), (0xA7FF, "transient"), (0xA750, "transient"),
        (0xA900, "permanent"), (0xC000, "permanent"), (0xCFFF, "permanent"), (0x0122, "permanent"),
        (0x0110, "permanent"), (0xA6FF, "permanent"), (0xA800, "permanent"),
    ])
    def test_table(self, status: int, kind: str) -> None:
        """Warnings count as delivered; only 0xA7xx is worth retrying; anything else is final."""
        assert classify_status(status) == kind


class TestDcmtkStoreSCP:
    def test_delivery_stores_the_instance_unchanged(self, storescp: Callable[..., StoreSCP],
                                                    outbox: Callable[[Dataset], Outbox],
                                                    ct_dataset: Dataset) -> None:
        """storescp receives the same instance, pixel for pixel, on the first attempt."""
        peer = storescp()
        config = _config(peer.port, attempts=3)

        delivery, waits = outbox(ct_dataset).deliver(config, Sender(config))

        assert (delivery.state, delivery.attempts, delivery.reason) == (DeliveryState.SENT, 1, None)
        assert waits == []
        assert _eventually(lambda: len(list(peer.folder.iterdir())) == 1, timeout=5)
        [stored] = list(peer.folder.iterdir())
        received = pydicom.dcmread(stored)
        assert received.SOPInstanceUID == ct_dataset.SOPInstanceUID
        assert received.SOPClassUID == CTImageStorage
        assert received.PixelData == ct_dataset.PixelData
        assert len(received.PixelData) == 64 * 64 * 2

    def test_echo(self, storescp: Callable[..., StoreSCP]) -> None:
        """C-ECHO against storescp succeeds and stores nothing."""
        peer = storescp()
        sender, destination = _sender(_config(peer.port))
        assert sender.echo(destination) is None
        assert list(peer.folder.iterdir()) == []

    def test_refused_association_is_permanent(self, storescp: Callable[..., StoreSCP],
                                              outbox: Callable[[Dataset], Outbox],
                                              ct_dataset: Dataset) -> None:
        """``storescp --refuse`` sends A-ASSOCIATE-RJ permanent (service user): no retry."""
        peer = storescp("--refuse")
        config = _config(peer.port, attempts=3)
        sender, destination = _sender(config)

        with pytest.raises(PermanentSendError) as info:
            sender.send_once(ct_dataset, destination)

        assert info.value.reason == "association rejected-permanent (source 1, reason 1)"
        assert info.value.destination == "tps"
        assert info.value.status is None
        delivery, waits = outbox(ct_dataset).deliver(config, sender)
        assert (delivery.state, delivery.attempts, waits) == (DeliveryState.DEAD_LETTER, 1, [])
        assert delivery.reason == info.value.reason
        with pytest.raises(PermanentSendError, match="rejected-permanent"):
            sender.echo(destination)
        assert list(peer.folder.iterdir()) == []


class TestUnreachable:
    def test_closed_port_is_retried_with_exponential_backoff(self, monkeypatch: pytest.MonkeyPatch,
                                                             outbox: Callable[[Dataset], Outbox],
                                                             ct_dataset: Dataset) -> None:
        """Nothing listening: three attempts, 0.5 s then 1 s apart, then dead letter with the last failure."""
        config = _config(free_port(), attempts=3, backoff=0.5)
        sender, destination = _sender(config)

        with pytest.raises(TransientSendError) as info:
            sender.send_once(ct_dataset, destination)
        assert "connection failed" in info.value.reason
        assert info.value.status is None

        attempts = _count_attempts(monkeypatch, sender)
        delivery, waits = outbox(ct_dataset).deliver(config, sender)

        assert len(attempts) == 3
        assert waits == [0.5, 1.0]
        assert (delivery.state, delivery.attempts) == (DeliveryState.DEAD_LETTER, 3)
        assert delivery.reason == info.value.reason

    def test_backoff_is_capped(self, outbox: Callable[[Dataset], Outbox], ct_dataset: Dataset) -> None:
        """``max_backoff_seconds`` bounds every delay."""
        config = parse_config({"destinations": [{
            "name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": free_port(),
            "retry": {"max_attempts": 5, "initial_backoff_seconds": 1, "max_backoff_seconds": 3,
                      "multiplier": 2},
        }]})

        delivery, waits = outbox(ct_dataset).deliver(config, Sender(config))

        assert waits == [1.0, 2.0, 3.0, 3.0]
        assert (delivery.state, delivery.attempts) == (DeliveryState.DEAD_LETTER, 5)

    def test_echo_to_closed_port(self) -> None:
        sender, destination = _sender(_config(free_port()))
        with pytest.raises(TransientSendError, match="connection failed"):
            sender.echo(destination)


class TestAssociationRejected:
    def test_calling_ae_not_allowed_is_permanent(self, scp: Callable[..., PynetdicomSCP],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 outbox: Callable[[Dataset], Outbox],
                                                 ct_dataset: Dataset) -> None:
        """A-ASSOCIATE-RJ permanent (calling AE not recognised): one attempt, then dead letter."""
        peer = scp(require_calling_aet=["SOMEONE_ELSE"])
        config = _config(peer.port, attempts=3)
        sender, destination = _sender(config)

        with pytest.raises(PermanentSendError) as info:
            sender.send_once(ct_dataset, destination)

        assert "rejected-permanent" in info.value.reason
        assert info.value.reason.endswith("(source 1, reason 3)")
        _assert_closed(peer.ae)
        attempts = _count_attempts(monkeypatch, sender)
        delivery, waits = outbox(ct_dataset).deliver(config, sender)
        assert len(attempts) == 1
        assert (delivery.state, delivery.attempts, waits) == (DeliveryState.DEAD_LETTER, 1, [])
        assert delivery.reason == info.value.reason
        assert peer.calls == []
        _assert_closed(peer.ae)

    def test_local_limit_reject_is_transient(self, scp: Callable[..., PynetdicomSCP],
                                             monkeypatch: pytest.MonkeyPatch,
                                             outbox: Callable[[Dataset], Outbox],
                                             ct_dataset: Dataset) -> None:
        """A-ASSOCIATE-RJ transient (peer's association limit reached) is retried."""
        peer = scp(maximum_associations=1)
        config = _config(peer.port, attempts=2, backoff=0.25)
        sender, destination = _sender(config)
        pending = outbox(ct_dataset)
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(Verification)
        held = holder.associate("127.0.0.1", peer.port, ae_title="TPS")
        assert held.is_established
        try:
            with pytest.raises(TransientSendError) as info:
                sender.send_once(ct_dataset, destination)
            attempts = _count_attempts(monkeypatch, sender)
            delivery, waits = pending.deliver(config, sender)
        finally:
            held.release()
        assert info.value.reason == "association rejected-transient (source 3, reason 2)"
        assert info.value.status is None
        assert len(attempts) == 2
        assert waits == [0.25]
        assert (delivery.state, delivery.attempts) == (DeliveryState.DEAD_LETTER, 2)
        assert delivery.reason == info.value.reason
        assert peer.calls == []
        _assert_closed(peer.ae)


class TestStatuses:
    def test_success(self, scp: Callable[..., PynetdicomSCP], ct_dataset: Dataset) -> None:
        peer = scp(status=0x0000)
        sender, destination = _sender(_config(peer.port))
        assert sender.send_once(ct_dataset, destination) == 0x0000
        assert peer.calls == [0x0000]
        _assert_closed(peer.ae)

    def test_out_of_resources_is_retried(self, scp: Callable[..., PynetdicomSCP],
                                         outbox: Callable[[Dataset], Outbox],
                                         ct_dataset: Dataset) -> None:
        """0xA700: every attempt reaches the peer's handler, then the delivery is given up."""
        peer = scp(status=0xA700)
        config = _config(peer.port, attempts=3, backoff=0.5)
        sender, destination = _sender(config)

        with pytest.raises(TransientSendError) as info:
            sender.send_once(ct_dataset, destination)

        assert info.value.status == 0xA700
        assert info.value.reason == "C-STORE status 0xA700"
        assert peer.calls == [0xA700]
        delivery, waits = outbox(ct_dataset).deliver(config, sender)
        assert peer.calls == [0xA700] * 4
        assert waits == [0.5, 1.0]
        assert (delivery.state, delivery.attempts) == (DeliveryState.DEAD_LETTER, 3)
        assert delivery.reason == "C-STORE status 0xA700"
        _assert_closed(peer.ae)

    def test_processing_failure_is_permanent(self, scp: Callable[..., PynetdicomSCP],
                                             outbox: Callable[[Dataset], Outbox],
                                             ct_dataset: Dataset) -> None:
        """0xC000: exactly one C-STORE per delivery reaches the peer."""
        peer = scp(status=0xC000)
        config = _config(peer.port, attempts=3)
        sender, destination = _sender(config)

        with pytest.raises(PermanentSendError) as info:
            sender.send_once(ct_dataset, destination)

        assert info.value.status == 0xC000
        assert "0xC000" in info.value.reason
        assert peer.calls == [0xC000]
        delivery, waits = outbox(ct_dataset).deliver(config, sender)
        assert (delivery.state, delivery.attempts, waits) == (DeliveryState.DEAD_LETTER, 1, [])
        assert delivery.reason == info.value.reason
        assert peer.calls == [0xC000] * 2
        _assert_closed(peer.ae)

    def test_warning_counts_as_delivered(self, scp: Callable[..., PynetdicomSCP],
                                         outbox: Callable[[Dataset], Outbox],
                                         ct_dataset: Dataset) -> None:
        """0xB000 (coercion of data elements) is a delivery, not a failure."""
        peer = scp(status=0xB000)
        config = _config(peer.port, attempts=3)
        sender, destination = _sender(config)

        delivery, waits = outbox(ct_dataset).deliver(config, sender)
        assert (delivery.state, delivery.attempts, delivery.reason, waits) == (DeliveryState.SENT, 1, None, [])
        assert sender.send_once(ct_dataset, destination) == 0xB000

        assert peer.calls == [0xB000, 0xB000]
        _assert_closed(peer.ae)


class TestNegotiation:
    def test_no_storage_context_is_permanent(self, scp: Callable[..., PynetdicomSCP],
                                             monkeypatch: pytest.MonkeyPatch,
                                             outbox: Callable[[Dataset], Outbox],
                                             ct_dataset: Dataset) -> None:
        """The peer accepts the association but not CT Image Storage: no retry will help."""
        peer = scp(contexts=(Verification,))
        config = _config(peer.port, attempts=3)
        sender, destination = _sender(config)

        with pytest.raises(PermanentSendError) as info:
            sender.send_once(ct_dataset, destination)

        assert "presentation context" in info.value.reason
        assert info.value.status is None
        _assert_closed(peer.ae)
        attempts = _count_attempts(monkeypatch, sender)
        delivery, waits = outbox(ct_dataset).deliver(config, sender)
        assert len(attempts) == 1
        assert (delivery.state, delivery.attempts, waits) == (DeliveryState.DEAD_LETTER, 1, [])
        assert delivery.reason == info.value.reason
        assert peer.calls == []
        _assert_closed(peer.ae)
        sender.echo(destination)  # the same peer is otherwise reachable
        _assert_closed(peer.ae)


class TestTimeout:
    def test_no_response_is_transient(self, scp: Callable[..., PynetdicomSCP],
                                      ct_dataset: Dataset) -> None:
        """No answer within dimse_timeout_seconds: aborted, never counted as sent."""
        gate = threading.Event()
        peer = scp(before_reply=lambda: gate.wait(10))
        sender, destination = _sender(_config(peer.port, dimse_timeout=1.0))
        try:
            started = time.monotonic()
            with pytest.raises(TransientSendError) as info:
                sender.send_once(ct_dataset, destination)
            elapsed = time.monotonic() - started
        finally:
            gate.set()

        assert info.value.reason == "no C-STORE response (timeout or abort)"
        assert info.value.status is None
        assert 0.9 <= elapsed < 5
        assert peer.calls == [0x0000]
        _assert_closed(peer.ae)


def test_errors_share_the_send_error_base() -> None:
    """Callers may catch either kind through :class:`SendError`."""
    assert issubclass(TransientSendError, SendError)
    assert issubclass(PermanentSendError, SendError)
