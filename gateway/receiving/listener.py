"""The listening socket and the receiver processes it hands connections to.

pynetdicom decodes PDUs in Python under the GIL, so parallel associations in one process
slow each other down. The parent process accepts each TCP connection, refuses source
addresses that match no peer before reading a byte, sets TCP_NODELAY, and passes the
socket (``SCM_RIGHTS``) to the least busy receiver process. The receivers share the count of
established associations (past ``max_associations`` they answer A-ASSOCIATE-RJ, transient,
local limit exceeded); connections that have not associated yet are capped separately
(``max_pending_connections``: further ones are closed at once), so idle or trickling sockets
cannot use up the association limit.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import select
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import structlog

from gateway.config import GatewayConfig
from gateway.errors import StartupError
from gateway.ops.metrics import NodeCounters
from gateway.receiving.handover import DRAIN_SECONDS, MSG_ACCEPT, MSG_ACCEPT_TLS, MSG_CLOSED, MSG_QUIT, MSG_READY
from gateway.receiving.receiver import run_receiver

__all__ = ["Listener"]

log = structlog.get_logger(__name__)

_HANDOVER_TIMEOUT_S = 2.0
_CRASH_LOOP_SECONDS = 5.0
#: How long start-up waits for every receiver process to report ready (imports on a busy machine take seconds).
_READY_TIMEOUT_S = 120.0


def _receiver_context() -> Any:
    """Receivers are forked from a server process that imported their code once, so four receivers start (and a
    dead one is replaced) without four cold imports; that server has no threads and none of our sockets. It
    listens on a Unix socket under ``TMPDIR``: where that path would be too long (108 bytes), receivers are
    started by ``spawn`` instead, each importing its code (slower to start, the same once running)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gateway.receiving.receiver"])
    try:
        multiprocessing.forkserver.ensure_running()
    except OSError as exc:
        log.warning("receiver_forkserver_unavailable", error=type(exc).__name__, fallback="spawn")
        return multiprocessing.get_context("spawn")
    return context


@dataclass(frozen=True)
class _Listening:
    message: bytes  # what the receiver is told with each accepted socket


_PLAIN, _TLS = _Listening(MSG_ACCEPT), _Listening(MSG_ACCEPT_TLS)


def _bound(sock: socket.socket | None) -> tuple[str, int] | None:
    if sock is None:
        return None
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


@dataclass
class _Receiver:
    index: int
    process: Any
    control: socket.socket
    active: int = 0
    alive: bool = True
    ready: bool = False
    started_at: float = 0.0


class Listener:
    """Accepts connections and spreads them over ``node.receive_workers`` processes."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self._context = _receiver_context()
        self._receivers: list[_Receiver] = []
        self._selector = selectors.DefaultSelector()
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # no receiver is spawned once stop() has begun
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._tls_socket: socket.socket | None = None
        #: Established associations per receiver, shared with them (see gateway.receiving.policy.AssociationSlots).
        self._associated: Any = self._context.Array("i", config.node.receive_workers)
        #: Connection and instance counts for the metrics, shared with the receivers.
        self.counters = NodeCounters.create(self._context, config.node.receive_workers)

    @property
    def address(self) -> tuple[str, int] | None:
        """The plain TCP ``(host, port)`` (real even when the config asked for 0), or ``None``."""
        return _bound(self._socket)

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """The DICOM TLS ``(host, port)``, or ``None``."""
        return _bound(self._tls_socket)

    def start(self) -> None:
        """Start the receiver processes, wait until each can serve, then bind and accept in a background thread.

        The port opens only when every receiver has finished importing, so the first association after
        ``node_started`` never waits on a cold start.
        """
        node = self._config.node
        for index in range(node.receive_workers):
            self._spawn(index)
        try:
            self._await_ready(time.monotonic() + _READY_TIMEOUT_S)
            log.info("receivers_ready", receivers=len(self._receivers))
            if node.plain:
                self._socket = self._listen(node.port, _PLAIN)
            if node.tls is not None:
                self._tls_socket = self._listen(node.tls.port, _TLS)
        except StartupError:
            self.stop()
            raise
        self._warn_unauthenticated_plain_port()
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)
        self._thread.start()

    def _await_ready(self, deadline: float) -> None:
        waiting = {receiver.control: receiver for receiver in self._receivers}
        while waiting:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise StartupError(f"{len(waiting)} receiver process(es) not ready after {_READY_TIMEOUT_S:.0f} s")
            readable, _, _ = select.select(list(waiting), [], [], timeout)
            for control in readable:
                receiver = waiting.pop(control)
                self._on_receiver_message(receiver)
                if not receiver.ready:
                    receiver.process.join(timeout=5)
                    raise StartupError(f"receiver process {receiver.index} exited while starting "
                                       f"(exit code {receiver.process.exitcode})")

    def _warn_unauthenticated_plain_port(self) -> None:
        # With [node.tls], a plain port left open by default is easy to miss: anyone on a peer's address
        # who knows its AE title can associate there without a certificate. Written explicitly, it is a choice.
        node = self._config.node
        if node.tls is None or self.address is None or "plain" in node.model_fields_set:
            return
        log.warning("plain_port_unauthenticated", port=self.address[1],
                    advice="set node.plain = false to accept DICOM TLS only, or plain = true to keep this port")

    def healthy(self) -> bool:
        """Whether connections are being accepted and at least one receiver process can serve them."""
        accepting = self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()
        return accepting and any(w.alive and w.ready and w.process.is_alive() for w in self._receivers)

    def _listen(self, port: int, kind: _Listening) -> socket.socket:
        bind = self._config.node.bind
        sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {bind}:{port} ({exc.strerror})") from exc
        sock.listen(128)
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, kind)
        return sock

    def _spawn(self, index: int) -> None:
        with self._spawning:
            if not self._stopping.is_set():
                self._start_receiver(index)

    def _start_receiver(self, index: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_end.settimeout(_HANDOVER_TIMEOUT_S)  # a stuck receiver must not stall accepting
        process = self._context.Process(
            target=run_receiver, args=(self._config, child_end, index, self._associated, self.counters.array),
            name=f"receiver-{index}",
            daemon=False
        )
        process.start()
        child_end.close()
        receiver = _Receiver(index, process, parent_end, started_at=time.monotonic())
        if index < len(self._receivers):
            self._receivers[index] = receiver
        else:
            self._receivers.append(receiver)
        self._selector.register(parent_end, selectors.EVENT_READ, receiver)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                for key, _ in self._selector.select(timeout=0.5):
                    if isinstance(key.data, _Listening):
                        self._accept(cast(socket.socket, key.fileobj), key.data)
                    else:
                        self._on_receiver_message(key.data)
            except Exception as exc:  # the node must keep accepting whatever one connection did
                log.error("listener_error", exc_info=exc)

    def _accept(self, listening: socket.socket, kind: _Listening) -> None:
        try:
            conn, address = listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("accept_failed", errno=exc.errno)
            return
        host = str(address[0])
        if not self._config.address_allowed(host):
            conn.close()  # before any PDU byte is read
            self.counters.add("association_address_not_allowed")
            log.warning("connection_refused", reason="address_not_allowed", address=host)
            return
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._dispatch(conn, kind.message)

    def _dispatch(self, conn: socket.socket, message: bytes) -> None:
        live = [w for w in self._receivers if w.alive]
        if not live:
            conn.close()
            log.error("connection_dropped", reason="no_receiver_process")
            return
        pending = sum(w.active for w in live) - sum(int(n) for n in self._associated)
        if pending >= self._config.node.max_pending_connections:
            conn.close()
            self.counters.add("association_too_many_pending_connections")
            log.warning("connection_refused", reason="too_many_pending_connections", pending=pending)
            return
        receiver = min(live, key=lambda w: (not w.ready, w.active))  # a respawned receiver may still be importing
        try:
            socket.send_fds(receiver.control, [message], [conn.fileno()])
            receiver.active += 1
        except OSError:
            log.error("connection_dropped", reason="receiver_unreachable", worker=receiver.index)
        finally:
            conn.close()

    def _on_receiver_message(self, receiver: _Receiver) -> None:
        try:
            data = receiver.control.recv(16)
        except OSError:
            data = b""
        if data == MSG_CLOSED:
            receiver.active = max(0, receiver.active - 1)
            return
        if data == MSG_READY:
            receiver.ready = True
            log.info("receiver_ready", worker=receiver.index, pid=receiver.process.pid)
            return
        if not data:
            self._on_receiver_exit(receiver)

    def _on_receiver_exit(self, receiver: _Receiver) -> None:
        self._selector.unregister(receiver.control)
        receiver.control.close()
        receiver.alive = False
        with self._associated.get_lock():  # its associations died with it
            self._associated[receiver.index] = 0
        receiver.active = 0
        if self._stopping.is_set() or self._thread is None:  # stopping, or still starting (start() reports it)
            return
        receiver.process.join(timeout=1)
        log.error("receiver_process_died", worker=receiver.index, exitcode=receiver.process.exitcode)
        # A receiver that cannot start must not be respawned in a tight loop; stop() cuts the wait short, and
        # no receiver is spawned after it began (its shared counters' semaphores go with the node).
        if time.monotonic() - receiver.started_at < _CRASH_LOOP_SECONDS and self._stopping.wait(_CRASH_LOOP_SECONDS):
            return
        self._spawn(receiver.index)

    def stop(self) -> None:
        """Stop accepting, let receivers finish the associations in flight, and reap them."""
        self._stopping.set()
        with self._spawning:  # a respawn in progress finishes; none starts after this
            pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sock in (self._socket, self._tls_socket):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                sock.close()
        for receiver in self._receivers:
            if receiver.alive:
                with contextlib.suppress(OSError):
                    receiver.control.send(MSG_QUIT)
        deadline = time.monotonic() + DRAIN_SECONDS + 5
        for receiver in self._receivers:
            receiver.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if receiver.process.is_alive():
                log.error("receiver_process_killed", worker=receiver.index)
                receiver.process.kill()
                receiver.process.join()
            if receiver.alive:
                receiver.control.close()
        self._selector.close()

