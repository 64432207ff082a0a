"""The gateway's exception tree; every message is free of patient data by construction.

::

    GatewayError
    ├── ConfigError (ValueError)          invalid configuration, lists every problem
    ├── StartupError (OSError)            the node cannot start (port taken, data_dir unusable)
    ├── SpoolError (OSError)              an instance could not be stored durably
    ├── CryptoError                       a sealed file or wrapped key does not open (wrong key, tampered, shredded)
    ├── ReidentificationError             a result could not be mapped back completely
    ├── VolumeError (ValueError)           a series cannot become a volume (reason code)
    ├── InferenceError                    a model could not run or returned nonsense
    ├── StructureSetError                 no RT Structure Set can be written (all empty, no frame of reference)
    ├── JobNotFoundError (LookupError)    no job with that id
    └── SendError                         a C-STORE to a destination did not succeed
        ├── TransientSendError            worth retrying (refused, timeout, 0xA7xx)
        └── PermanentSendError            never retried (rejected, 0xCxxx, 0xA9xx)

Every error carries ``reason``, a short code (``inference_empty``, ``disk_full`` ...) that status, metrics, alerts
and the job table record; nothing parses the message. Third-party exceptions are translated at the module
boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ConfigError",
    "CryptoError",
    "GatewayError",
    "InferenceError",
    "InferenceUnavailable",
    "JobNotFoundError",
    "PermanentSendError",
    "ReidentificationError",
    "SendError",
    "SpoolError",
    "StartupError",
    "StructureSetError",
    "TransientSendError",
    "VolumeError",
]


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose; ``reason`` is its code (a class default)."""

    reason: str = "error"

    def __init__(self, *args: object, reason: str | None = None) -> None:
        super().__init__(*args)
        if reason is not None:
            self.reason = reason


class ConfigError(GatewayError, ValueError):
    """The configuration file is unusable; ``problems`` holds one line per fault."""

    reason = "invalid_configuration"

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration {source}: {len(self.problems)} problem(s)\n{lines}")


class StartupError(GatewayError, OSError):
    """The node cannot start: its port is taken, or ``data_dir`` cannot be used."""

    reason = "startup_failed"


class SpoolError(GatewayError, OSError):
    """An instance could not be written durably; nothing partial is left behind."""

    reason = "spool_write_failed"


class CryptoError(GatewayError):
    """A sealed file or a wrapped key does not open: wrong master key, tampering, or shredded."""

    reason = "crypto_failed"


class ReidentificationError(GatewayError):
    """A result could not be mapped back to the original identity; it must not be sent."""

    reason = "reidentification_failed"


class PixelDataError(GatewayError, ValueError):
    """Encapsulated pixel data that cannot be parsed (its frames are not the streams its transfer syntax names)."""

    reason = "undecodable_pixel_data"


class VolumeError(GatewayError, ValueError):
    """A series cannot be contoured safely; ``reason`` is a code such as ``gantry_tilt``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}", reason=reason)


class InferenceError(GatewayError):
    """A model could not be loaded or run, or its output was malformed (shape, NaN, infinity)."""

    reason = "inference_failed"


class InferenceUnavailable(GatewayError):
    """No inference server can take a series now (every one down, refusing or failing): transient, the series
    waits and is tried again until its retention deadline."""

    reason = "inference_unavailable"


class StructureSetError(GatewayError):
    """No RT Structure Set can be written: every structure is empty, or the CT lacks a frame of reference."""

    reason = "structure_set_failed"


class JobNotFoundError(GatewayError, LookupError):
    """No job with the given id exists."""

    reason = "job_not_found"

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class SendError(GatewayError):
    """A C-STORE to a destination failed; carries the destination and the reason.

    ``status`` is the DIMSE status returned by the peer, or ``None`` when the failure
    happened before a response (refused connection, association rejected, timeout).
    """

    def __init__(self, destination: str, reason: str, *, status: int | None = None) -> None:
        self.destination = destination
        self.status = status
        super().__init__(f"send to {destination!r} failed: {reason}", reason=reason)


class TransientSendError(SendError):
    """A failure that may succeed later: connection refused, timeout, 0xA7xx, transient reject."""


class PermanentSendError(SendError):
    """A failure that will not succeed on retry: permanent reject, refused context, 0xCxxx."""
