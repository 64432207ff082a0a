"""Crash points for the restart tests: the node kills itself, runs out of memory or stalls where the environment says.

``CONTOUR_GW_FAILPOINT=after:infer`` kills the node (SIGKILL) once the inference stage has
written its output but before it committed the new state; ``before:<stage>`` before the stage
starts; ``delivered`` after a destination confirmed a result but before that was recorded.
``oom:<point>`` allocates memory at *point* until the kernel's OOM killer (a cgroup limit) ends
the process, as a model far too large for the machine would. ``slow:<point>:<seconds>`` stalls
there (a slow disk). ``clock:<seconds>`` shifts the wall clock retention reads by that many seconds
(negative: set back), as a clock stepped by hand or by NTP would. Unset (always, in production) a
failpoint does nothing.
"""

from __future__ import annotations

import os
import signal
import time

import structlog

__all__ = ["FAILPOINT_ENV", "failpoint", "wall_time"]

FAILPOINT_ENV = "CONTOUR_GW_FAILPOINT"
#: An ``oom:`` failpoint gives up (MemoryError) past this, should no limit stop it first.
_OOM_CEILING_BYTES = 4 * 1024**3
_OOM_CHUNK_BYTES = 64 * 1024**2

log = structlog.get_logger(__name__)


def failpoint(point: str) -> None:
    """Act as the configured failpoint says if it names *point*: kill, exhaust memory, or stall."""
    configured = os.environ.get(FAILPOINT_ENV)
    if not configured:
        return
    if configured == point:
        log.warning("failpoint_kill", point=point)
        os.kill(os.getpid(), signal.SIGKILL)
    elif configured == f"oom:{point}":
        log.warning("failpoint_oom", point=point)
        _exhaust_memory()
    elif configured.startswith(f"slow:{point}:"):
        log.warning("failpoint_slow", point=point)
        time.sleep(float(configured.rsplit(":", 1)[1]))


def wall_time() -> float:
    """``time.time()``, shifted as a ``clock:<seconds>`` failpoint says."""
    configured = os.environ.get(FAILPOINT_ENV)
    if configured and configured.startswith("clock:"):
        return time.time() + float(configured.removeprefix("clock:"))
    return time.time()


def _exhaust_memory() -> None:
    hoard: list[bytearray] = []
    while len(hoard) * _OOM_CHUNK_BYTES < _OOM_CEILING_BYTES:
        chunk = bytearray(_OOM_CHUNK_BYTES)
        chunk[::4096] = b"\1" * len(chunk[::4096])  # touch every page: resident, not just reserved
        hoard.append(chunk)
    raise MemoryError("failpoint: no memory limit stopped the allocation")
