"""The control channel between the listener and its receiver processes: one byte per message, sockets alongside.

The listener passes each accepted socket with ``SCM_RIGHTS`` and one of the ``MSG_ACCEPT`` bytes; a receiver
answers ``MSG_READY`` once it can serve (its imports done, its Storage SCP built) and ``MSG_CLOSED`` whenever one
connection ends. Shared by both sides so neither imports the other's module.
"""

from __future__ import annotations

import signal

__all__ = ["DRAIN_SECONDS", "MSG_ACCEPT", "MSG_ACCEPT_TLS", "MSG_CLOSED", "MSG_QUIT", "MSG_READY",
           "ignore_interrupts"]

MSG_ACCEPT = b"A"  # listener -> receiver: serve this socket
MSG_ACCEPT_TLS = b"T"  # listener -> receiver: serve this socket with DICOM TLS
MSG_QUIT = b"Q"  # listener -> receiver: finish what is in flight, then exit
MSG_READY = b"R"  # receiver -> listener: imports done, ready to serve
MSG_CLOSED = b"C"  # receiver -> listener: one connection ended
#: How long a stopping receiver lets the associations in flight finish.
DRAIN_SECONDS = 30.0


def ignore_interrupts() -> None:
    """Receivers are stopped by the parent; a terminal's Ctrl-C must not kill them mid-write."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
