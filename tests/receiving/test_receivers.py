"""The receiver processes: the port opens only when they can serve, and a node stopped while one is being
replaced exits cleanly (no receiver is spawned once stopping has begun)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import NodeProcess, free_port, start_node, write_config


def _receivers(node: NodeProcess) -> list[int]:
    """The pids of the node's receiver processes that reported ready (the latest one per receiver)."""
    return list({e["worker"]: e["pid"] for e in node.events() if e["event"] == "receiver_ready"}.values())


def _connects(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _probe(port: int, log_path: Path, deadline: float) -> dict[str, int | bool]:
    """Connect to *port* until it accepts; count refusals before ``receivers_ready`` and whether it was logged first."""
    refused_before_ready = 0
    while time.monotonic() < deadline:
        ready_logged = log_path.exists() and '"receivers_ready"' in log_path.read_text()
        if _connects(port):
            return {"refused_before_ready": refused_before_ready,
                    "ready_logged_first": '"receivers_ready"' in log_path.read_text()}
        refused_before_ready += not ready_logged
        time.sleep(0.2)
    return {"refused_before_ready": refused_before_ready, "ready_logged_first": False}


def test_the_port_opens_only_once_every_receiver_is_ready(tmp_path: Path) -> None:
    """Receivers that take seconds to start (a busy machine): no connection is accepted before they can serve."""
    port = free_port()
    config = write_config(tmp_path / "gateway.toml", tmp_path / "var", port=port, extra_node="receive_workers = 2")
    log_path = tmp_path / "node.log"
    with ThreadPoolExecutor(1) as pool:
        probe = pool.submit(_probe, port, log_path, time.monotonic() + 120)
        node = start_node(config, log_path, {"CONTOUR_GW_FAILPOINT": "slow:receiver:ready:4"})
        try:
            outcome = probe.result(timeout=120)
            assert outcome["ready_logged_first"] is True  # receivers_ready is logged before the port is bound
            assert outcome["refused_before_ready"] > 0  # not vacuous: probed while the receivers were starting
            events = [e["event"] for e in node.events()]
            assert events.index("receivers_ready") < events.index("node_started")
        finally:
            assert node.stop() == 0


def test_a_node_stopped_while_replacing_a_receiver_exits_cleanly(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(extra_node="receive_workers = 2")
    receivers = _receivers(node)
    assert len(receivers) == 2
    os.kill(receivers[0], signal.SIGKILL)
    node.wait_for("receiver_process_died")
    assert node.stop() == 0  # during the crash-loop pause: the respawn must not start after stop
    log = node.log_text()
    assert "Traceback" not in log and "FileNotFoundError" not in log
    for pid in receivers:
        assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split(b")")[1][:3]
