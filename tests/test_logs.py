"""Log output: JSON lines, and no patient data through exceptions, warnings or library loggers."""

from __future__ import annotations

import io
import json
import logging
import warnings
from typing import Any

import structlog

from gateway.errors import SpoolError
from gateway.logs import bind_job, configure_logging
from tests.conftest import CANARY_ID, CANARY_NAME


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _fail_with_phi(patient_name: str) -> None:
    local_copy = f"{patient_name} {CANARY_ID}"  # noqa: F841 - a local variable that must never be rendered
    raise ValueError(f"bad value {patient_name!r}")


def test_exceptions_are_rendered_without_message_or_locals() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    try:
        _fail_with_phi(CANARY_NAME)
    except ValueError as exc:
        structlog.get_logger("t").error("step_failed", exc_info=exc)
    text = stream.getvalue()
    assert CANARY_NAME not in text and CANARY_ID not in text
    [event] = _lines(stream)
    assert event["exception"]["type"] == "builtins.ValueError"
    assert event["exception"]["frames"][-1]["function"] == "_fail_with_phi"
    assert "message" not in event["exception"]


def test_our_own_errors_keep_their_message() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    structlog.get_logger("t").error("store_failed", exc_info=SpoolError("cannot write an instance file (ENOSPC)"))
    [event] = _lines(stream)
    assert event["exception"]["message"] == "cannot write an instance file (ENOSPC)"


def test_library_warnings_lose_their_text() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = warnings.showwarning  # keep the one configure_logging installed
        configure_logging("info", "json", stream=stream)
        warnings.warn(f"Invalid value for VR PN: '{CANARY_NAME}'", UserWarning, stacklevel=1)
    assert CANARY_NAME not in stream.getvalue()
    [event] = [e for e in _lines(stream) if e["event"] == "library_warning"]
    assert event["category"] == "UserWarning"


def test_library_loggers_keep_only_the_template_and_warning_level() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    pyn = logging.getLogger("pynetdicom.assoc")
    pyn.info("Received Store Request: %s", CANARY_NAME)
    pyn.warning("Peer sent %s", CANARY_NAME)
    text = stream.getvalue()
    assert CANARY_NAME not in text
    [event] = _lines(stream)
    assert event["event"] == "Peer sent %s"
    assert event["level"] == "warning"


def test_job_context_is_bound_to_every_event() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    bind_job("0123456789abcdef", study="feedfacefeedface")
    structlog.get_logger("t").info("stage_done")
    [event] = _lines(stream)
    assert event["job_id"] == "0123456789abcdef"
    assert event["study"] == "feedfacefeedface"
    assert event["timestamp"].endswith("Z")
