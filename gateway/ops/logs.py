"""Structured logs: JSON lines on stdout, with no patient data in any field.

Four leaks are closed here rather than at each call site:

* exceptions are rendered as type and frames only; local variables never, and the
  message only for our own :class:`~gateway.errors.GatewayError` (built PHI-free);
* pydicom's warnings quote element values, so warnings are logged by category and
  source line only;
* pynetdicom logs identifiers and dataset dumps at INFO/DEBUG, so its logger is
  bridged at WARNING and its identifier logging is switched off;
* third-party records may quote any value of a data set (pydicom logs an invalid UID
  pre-formatted into its message), so a record from outside ``gateway.*`` keeps only its
  logger and level, as a ``library_log`` event; its message is kept when it is one of a
  few fixed strings known to carry no value, and rendered in full only for APScheduler,
  whose records name jobs and times and nothing else.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

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


#: Fixed messages, per library, known to carry no value; they are kept when logged without arguments.
_FIXED_MESSAGES: dict[str, frozenset[str]] = {
    "pynetdicom": frozenset({
        "Aborting Association",
        "Association Aborted",
        "Association Rejected",
        "Attempted to send data over closed connection",
        "Connection closed before the entire PDU was received",
        "Connection closed while waiting for DIMSE message",
        "DIMSE timeout reached while waiting for message response",
        "Exception in DUL.run(), aborting association",
        "Exception in the handler bound to 'evt.EVT_C_STORE'",
        "Insufficient data received to decode the PDU",
        "Invalid status returned by the EVT_C_STORE handler",
        "Network timeout reached",
        "No accepted presentation contexts",
        "Received an invalid A-ASSOCIATE response from the peer",
        "Unable to decode the received PDU data",
    }),
}
#: Libraries whose records carry no patient data, rendered with their arguments.
_RENDERED_LIBRARIES = frozenset({"apscheduler"})
_LIBRARY_EVENT = "library_log"


def _library_message(record: logging.LogRecord, args: Any) -> str | None:
    library = record.name.partition(".")[0]
    if library in _RENDERED_LIBRARIES:  # as LogRecord.getMessage, whose record has lost its args by now
        template = str(record.msg)
        try:
            return template % args if args else template
        except (TypeError, ValueError, KeyError):
            return template  # a raise here would reach Handler.handleError, which prints the arguments
    if not args and isinstance(record.msg, str) and record.msg in _FIXED_MESSAGES.get(library, frozenset()):
        return record.msg
    return None


def _redact_foreign(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Reduce a stdlib record from outside ``gateway.*`` to its logger, level and a fixed message."""
    args = event.pop("positional_args", ())
    record: logging.LogRecord = event["_record"]
    if record.name == "gateway" or record.name.startswith("gateway."):
        return event  # our own templates, never formatted
    event["event"] = _LIBRARY_EVENT
    event.pop("stack_info", None)
    message = _library_message(record, args)
    if message is not None:
        event["message"] = message
    return event


def show_warning(
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
        foreign_pre_chain=[_redact_foreign, *shared],
        # Third-party records may interpolate data set values: never format them here;
        # _redact_foreign decides what of a record is shown, given its arguments.
        use_get_message=False,
        pass_foreign_args=True,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # pynetdicom and pydicom: nothing below WARNING (their identifiers are off: gateway.ops.process).
    for name in ("pynetdicom", "pydicom"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.WARNING)


def bind_job(job_id: str, study: str | None = None) -> None:
    """Bind the job (and pseudonymous study id) to every log event of the current thread."""
    structlog.contextvars.clear_contextvars()
    if study is None:
        structlog.contextvars.bind_contextvars(job_id=job_id)
    else:
        structlog.contextvars.bind_contextvars(job_id=job_id, study=study)
