"""Process-wide settings, in one place: applied once when a process starts, and restorable for tests.

Every process of the node (``serve``, each receiver process, each command) calls :func:`configure_process`
first; nothing else in the package changes interpreter-wide state, except two settings that belong to the
receivers alone: the listener's forkserver preloads the receiver module (``receiving.listener``), and each
receiver process keeps large buffers in glibc's heap (``receiving.receiver``, ``mallopt``).

* file modes: every file and folder the process creates is owner-only (umask 077), including what the node
  does not create with an explicit mode (SQLite's database, WAL and shared-memory files, parent folders);
* pynetdicom: no chunked receive (it writes each data set to a plaintext temporary file, left behind when a
  handler raises: data sets stay in memory until sealed), and no identifiers or data set dumps in its logs;
* warnings: shown through the log without their text (pydicom's quote data element values).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import structlog
from pynetdicom import _config as pynetdicom_config

from gateway.ops.logs import show_warning

__all__ = ["ProcessSettings", "configure_process"]

#: The pynetdicom settings the node relies on, and their values.
PYNETDICOM_SETTINGS = {
    "STORE_RECV_CHUNKED_DATASET": False,
    "LOG_HANDLER_LEVEL": "none",
    "LOG_REQUEST_IDENTIFIERS": False,
    "LOG_RESPONSE_IDENTIFIERS": False,
}
OWNER_ONLY_UMASK = 0o077


def configure_process() -> None:
    """Apply every process-wide setting that does not depend on the configuration (logging does: see
    :func:`gateway.ops.logs.configure_logging`)."""
    os.umask(OWNER_ONLY_UMASK)
    for name, value in PYNETDICOM_SETTINGS.items():
        setattr(pynetdicom_config, name, value)
    warnings.showwarning = show_warning


@dataclass(frozen=True)
class ProcessSettings:
    """A snapshot of what :func:`configure_process` and ``configure_logging`` change, to put back (tests)."""

    umask: int
    pynetdicom: dict[str, Any]
    showwarning: Any
    root_handlers: list[logging.Handler]
    root_level: int
    structlog_config: dict[str, Any]

    @classmethod
    def snapshot(cls) -> ProcessSettings:
        """The settings as they are now."""
        umask = os.umask(OWNER_ONLY_UMASK)
        os.umask(umask)
        root = logging.getLogger()
        return cls(umask, {name: getattr(pynetdicom_config, name) for name in PYNETDICOM_SETTINGS},
                   warnings.showwarning, list(root.handlers), root.level, structlog.get_config())

    def restore(self) -> None:
        """Put every setting back as it was when the snapshot was taken."""
        os.umask(self.umask)
        for name, value in self.pynetdicom.items():
            setattr(pynetdicom_config, name, value)
        warnings.showwarning = self.showwarning
        root = logging.getLogger()
        root.handlers[:] = self.root_handlers
        root.setLevel(self.root_level)
        structlog.configure(**self.structlog_config)
