"""Crash points for the restart tests: the node kills itself (SIGKILL) where the environment says.

``CONTOUR_GW_FAILPOINT=after:infer`` kills the node once the inference stage has written its
output but before it committed the new state; ``before:<stage>`` before the stage starts;
``delivered`` after a destination confirmed a result but before that was recorded. Unset
(always, in production) a failpoint does nothing.
"""

from __future__ import annotations

import os
import signal

import structlog

__all__ = ["FAILPOINT_ENV", "failpoint"]

FAILPOINT_ENV = "CONTOUR_GW_FAILPOINT"

log = structlog.get_logger(__name__)


def failpoint(point: str) -> None:
    """Kill this process with SIGKILL if *point* is the configured failpoint."""
    if os.environ.get(FAILPOINT_ENV) == point:
        log.warning("failpoint_kill", point=point)
        os.kill(os.getpid(), signal.SIGKILL)
