"""A receiver process: runs the Storage SCP on connections handed over by the listener."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

import structlog

from gateway.config import GatewayConfig
from gateway.failpoints import failpoint
from gateway.ops.logs import configure_logging
from gateway.ops.metrics import NodeCounters
from gateway.ops.process import configure_process
from gateway.ops.tls import server_context
from gateway.receiving.acceptor import FdAssociationServer
from gateway.receiving.assembly import Assembler
from gateway.receiving.handover import DRAIN_SECONDS, MSG_ACCEPT_TLS, MSG_CLOSED, MSG_QUIT, MSG_READY, ignore_interrupts
from gateway.receiving.policy import AssociationPolicy, AssociationSlots, DiskWatermark
from gateway.receiving.sockets import ConnectionLimits
from gateway.receiving.storage_scp import build_ae, store_handlers
from gateway.store.jobs import JobStore
from gateway.store.keys import KeyRing
from gateway.store.spool import Spool

__all__ = ["run_receiver"]

log = structlog.get_logger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: A job's segment is closed (its pre-allocated tail cut) once nothing was appended to it for this long.
SEGMENT_IDLE_SECONDS = 5.0


def run_receiver(config: GatewayConfig, control: socket.socket, index: int, counters: Any, node_counters: Any) -> None:
    """Entry point of receiver process *index*; returns when told to quit or orphaned."""
    ignore_interrupts()
    configure_process()
    _keep_large_buffers()
    configure_logging(config.logging.level, config.logging.format)
    structlog.contextvars.bind_contextvars(worker=index)
    quit_event = threading.Event()

    def _on_term(_signum: int, _frame: FrameType | None) -> None:
        quit_event.set()
        control.shutdown(socket.SHUT_RD)

    signal.signal(signal.SIGTERM, _on_term)
    spool = Spool(config.node.data_dir)
    jobs = JobStore(spool.database_path)
    send_lock = threading.Lock()

    def _closed() -> None:
        with send_lock, contextlib.suppress(OSError):
            control.send(MSG_CLOSED)

    ae = build_ae(config)
    assembler = Assembler(spool, jobs, KeyRing.open(config))
    node = config.node
    limits = ConnectionLimits.from_config(config)
    slots = AssociationSlots(counters, index, node.max_associations)
    tls = None
    if node.tls is not None:
        context = server_context(node.tls.certificate_file, node.tls.private_key_file, node.tls.ca_file,
                                 node.tls.require_client_certificate)
        tls = (context, node.tls.handshake_seconds)
    server = FdAssociationServer(ae, AssociationPolicy(config), slots, limits,
                                 store_handlers(assembler, config.limits), _closed,
                                 disk_low=DiskWatermark(config).low, tls=tls,
                                 counters=NodeCounters(node_counters, row=index + 1))
    failpoint("receiver:ready")  # a receiver still importing on a busy machine
    closer = threading.Thread(target=_close_idle_segments, args=(spool, quit_event), name="segment-closer",
                              daemon=True)
    closer.start()
    with send_lock:
        control.send(MSG_READY)
    try:
        _serve(control, server, quit_event)
    finally:
        _drain(ae)
        server.server_close()
        quit_event.set()
        spool.close_idle_segments(0)
        jobs.close()
        control.close()


def _close_idle_segments(spool: Spool, stop: threading.Event) -> None:
    while not stop.wait(SEGMENT_IDLE_SECONDS / 2):
        spool.close_idle_segments(SEGMENT_IDLE_SECONDS)


def _keep_large_buffers() -> None:
    # Every C-STORE allocates several buffers of 128-512 KB (PDUs, the data set, its sealed
    # copy). glibc serves those with mmap and gives them back at once, so each one costs
    # fresh page faults; keeping them in the heap makes the receive path measurably faster.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)
        # One arena per connection thread (glibc's default, up to 8 per core) would keep that
        # heap once per thread: a burst of connections would leave the process much larger.
        libc.mallopt(_M_ARENA_MAX, 2)


def _serve(control: socket.socket, server: FdAssociationServer, quit_event: threading.Event) -> None:
    while not quit_event.is_set():
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 16, 4)
        except OSError:
            return
        if not message or message == MSG_QUIT:
            for fd in fds:
                socket.socket(fileno=fd).close()
            return
        for fd in fds:
            server.submit(fd, tls=message == MSG_ACCEPT_TLS)


def _drain(ae: object) -> None:
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        active = ae.active_associations  # type: ignore[attr-defined]
        if not active:
            return
        time.sleep(0.05)
    for assoc in ae.active_associations:  # type: ignore[attr-defined]
        log.warning("association_aborted_at_shutdown")
        assoc.abort()
