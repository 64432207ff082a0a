"""Progress of long work in the logs: how far inference has got, and how long it should still take."""

from __future__ import annotations

import time

import structlog

__all__ = ["InferenceProgress", "SpeedMemory"]

log = structlog.get_logger(__name__)


class SpeedMemory:
    """Seconds per CT slice each model took last time, to say how long the next series will take."""

    def __init__(self) -> None:
        self._seconds_per_slice: dict[str, float] = {}

    def expect(self, model: str, slices: int) -> float | None:
        """Expected seconds for *slices* slices, or ``None`` before the model's first run."""
        rate = self._seconds_per_slice.get(model)
        return None if rate is None else round(rate * slices, 1)

    def remember(self, model: str, slices: int, seconds: float) -> None:
        """Record a finished run."""
        if slices:
            self._seconds_per_slice[model] = seconds / slices


class InferenceProgress:
    """Called by the predictor after each batch; logs ``inference_progress`` at most every *interval* seconds."""

    def __init__(self, interval: float = 5.0) -> None:
        self._interval = interval
        self._started = self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self._last < self._interval or done == 0:
            return
        self._last = now
        elapsed = now - self._started
        log.info("inference_progress", tiles_done=done, tiles=total, elapsed_seconds=round(elapsed, 1),
                 remaining_seconds=round(elapsed / done * (total - done), 1))
