"""Structured logs: JSON lines on stdout, with no patient data in any field.

Three leaks are closed here rather than at each call site:

* exceptions are rendered as type and frames only; local variables never, and the
  message only for our own :class:`~gateway.errors.GatewayError` (built PHI-free);
* pydicom's warnings quote element values, so warnings are logged by category and
  source line only;
* pynetdicom logs identifiers and dataset dumps at INFO/DEBUG, so its logger is
  bridged at WARNING and its identifier logging is switched off.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog
from pynetdicom import _config as pynetdicom_config

from gateway.errors import GatewayError

__all__ = ["bind_job", "configure_logging", "safe_exception"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def safe_exception(exc: BaseException) -> dict[str, Any]:
    """Describe *exc* without its message (unless ours) and without local variables."""
    frames = [
        {"file": f.filename.rsplit("/site-packages/", 1)[-1], "line": f.lineno, "function": f.name}
        for f in traceback.extract_tb(exc.__traceback__)[-8:]
    ]
    info: dict[str, Any] = {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "frames": frames}
    if isinstance(exc, GatewayError):
        info["message"] = str(exc)
    if exc.__cause__ is not None and exc.__cause__ is not exc:
        info["cause"] = f"{type(exc.__cause__).__module__}.{type(exc.__cause__).__qualname__}"
    return info


def _render_exception(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    exc_info = event.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        event["exception"] = safe_exception(exc_info)
    elif isinstance(exc_info, tuple) and exc_info[1] is not None:
        event["exception"] = safe_exception(exc_info[1])
    event.pop("exception_text", None)
    return event


def _showwarning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    structlog.get_logger("gateway.warnings").warning(
        "library_warning",
        category=category.__name__,
        source=f"{filename.rsplit('/site-packages/', 1)[-1]}:{lineno}",
    )


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib bridge; safe to call more than once."""
    stream = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _render_exception,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        # Third-party records may interpolate dataset values: keep the static template only.
        use_get_message=False,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # pynetdicom: no identifiers, no dataset dumps, nothing below WARNING.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    for name in ("pynetdicom", "pydicom"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.WARNING)
    warnings.showwarning = _showwarning


def bind_job(job_id: str, study: str | None = None) -> None:
    """Bind the job (and pseudonymous study id) to every log event of the current thread."""
    structlog.contextvars.clear_contextvars()
    if study is None:
        structlog.contextvars.bind_contextvars(job_id=job_id)
    else:
        structlog.contextvars.bind_contextvars(job_id=job_id, study=study)
