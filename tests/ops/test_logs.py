"""Log output: JSON lines, and no patient data through exceptions, warnings or library loggers."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from gateway.errors import SpoolError
from gateway.ops.logs import bind_job, configure_logging
from gateway.ops.process import configure_process
from tests.conftest import CANARY_ID, CANARY_NAME, NodeProcess
from tests.pipeline.test_e2e import phantom, route, send, ui_values

#: UIDs with letters: pydicom logs each as an invalid VR UI value, quoting it.
UID_CANARIES = {"SOPInstanceUID": "1.2.826.0.1.CANARYSOP1", "StudyInstanceUID": "1.2.826.0.1.CANARYSTU2",
                "SeriesInstanceUID": "1.2.826.0.1.CANARYSER3", "FrameOfReferenceUID": "1.2.826.0.1.CANARYFOR9"}
NESTED_UID_CANARY, PRIVATE_UID_CANARY = "1.2.826.0.1.CANARYREF4", "1.2.826.0.1.CANARYPRIV5"
#: The standard's own UIDs (SOP classes, transfer syntaxes) and pydicom's implementation UID identify no one. The
#: latter is compared whole: it is a prefix of one in nine UIDs that pydicom generates.
PUBLIC_UID_ROOT, PUBLIC_UIDS = "1.2.840.10008.", {pydicom.uid.PYDICOM_IMPLEMENTATION_UID}


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
        configure_process()  # inside catch_warnings, which restores showwarning on exit
        warnings.warn(f"Invalid value for VR PN: '{CANARY_NAME}'", UserWarning, stacklevel=1)
    assert CANARY_NAME not in stream.getvalue()
    [event] = [e for e in _lines(stream) if e["event"] == "library_warning"]
    assert event["category"] == "UserWarning"


def test_library_records_keep_only_their_logger_and_level() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    pyn = logging.getLogger("pynetdicom.assoc")
    pyn.info("Received Store Request: %s", CANARY_NAME)
    pyn.warning("Peer sent %s", CANARY_NAME)
    pyn.warning(f"Peer sent {CANARY_ID}")  # pre-formatted, as pydicom does
    logging.getLogger("urllib3.connectionpool").warning("Retrying %s", CANARY_NAME)
    text = stream.getvalue()
    assert CANARY_NAME not in text and CANARY_ID not in text and "Peer sent" not in text
    events = _lines(stream)
    assert [(e["event"], e["logger"], e["level"]) for e in events] == [
        ("library_log", "pynetdicom.assoc", "warning"), ("library_log", "pynetdicom.assoc", "warning"),
        ("library_log", "urllib3.connectionpool", "warning")]
    assert not any("message" in e or "positional_args" in e for e in events)


def test_fixed_library_messages_are_kept() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    pyn = logging.getLogger("pynetdicom.assoc")
    pyn.error("Association Aborted")
    pyn.error("Association Aborted", CANARY_ID)  # a fixed string given arguments is not fixed any more
    logging.getLogger("pydicom").warning("Association Aborted")  # fixed for pynetdicom only
    assert CANARY_ID not in stream.getvalue()
    events = _lines(stream)
    assert [e.get("message") for e in events] == ["Association Aborted", None, None]
    assert {e["event"] for e in events} == {"library_log"}


def _uid_canary_file() -> bytes:
    """A CT instance whose every UID (nested and private ones too) has letters in it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID_CANARIES["SOPInstanceUID"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
    for keyword, uid in UID_CANARIES.items():
        setattr(ds, keyword, uid)
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = CTImageStorage, NESTED_UID_CANARY
    ds.ReferencedImageSequence = [reference]
    ds.private_block(0x0099, "CANARY UIDS", create=True).add_new(0x01, "UI", PRIVATE_UID_CANARY)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_pydicom_records_never_carry_a_uid() -> None:
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    raw = _uid_canary_file()
    stream = io.StringIO()
    pydicom_config.settings.reading_validation_mode = pydicom_config.WARN  # pydicom's default, as in the node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns as well as logs; warnings are tested above
        configure_logging("debug", "json", stream=stream)
        read = pydicom.dcmread(io.BytesIO(raw))
        for _element in [*read.iterall(), *read.file_meta]:
            pass  # converting each raw element validates it, and pydicom logs every invalid UID
    text = stream.getvalue()
    canaries = [*UID_CANARIES.values(), NESTED_UID_CANARY, PRIVATE_UID_CANARY]
    assert [canary for canary in canaries if canary in text or canary.rsplit(".", 1)[-1] in text] == []
    pydicom_events = [e for e in _lines(stream) if e["logger"] == "pydicom"]
    assert len(pydicom_events) >= len(canaries)  # not vacuous: pydicom did log about each of them
    assert {(e["event"], e["level"]) for e in pydicom_events} == {("library_log", "warning")}


def test_apscheduler_records_are_rendered_with_their_arguments() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    scheduler = BackgroundScheduler()
    scheduler.add_job(lambda: None, "interval", seconds=3600, id="retention_sweep", name="retention_sweep")
    scheduler.start()
    scheduler.shutdown(wait=True)
    events = [e for e in _lines(stream) if e["logger"].startswith("apscheduler.")]
    messages = [e["message"] for e in events]
    assert any(m.startswith('Added job "retention_sweep" to job store "default"') for m in messages), messages
    assert "Scheduler started" in messages
    assert not [m for m in messages if re.search(r"%[-0-9.]*[sdfr]", m)]
    assert {e["event"] for e in events} == {"library_log"}


def _with_uid_canaries(files: list[Path]) -> None:
    """Give the series a Frame of Reference UID with letters, a nested and a private UID per instance."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = UID_CANARIES["FrameOfReferenceUID"]
        reference = Dataset()
        reference.ReferencedSOPClassUID = CTImageStorage
        reference.ReferencedSOPInstanceUID = f"{NESTED_UID_CANARY}.{index}"
        ds.ReferencedImageSequence = [reference]
        ds.private_block(0x0099, "CANARY UIDS", create=True).add_new(0x01, "UI", f"{PRIVATE_UID_CANARY}.{index}")
        ds.save_as(path, enforce_file_format=True)


def _uid_texts(files: list[Path]) -> set[str]:
    """Every UID value of *files* (file meta, nested, private), and its letter-bearing components alone."""
    texts: set[str] = set()
    for path in files:
        for uid in ui_values(pydicom.dcmread(path)):
            if not uid.startswith(PUBLIC_UID_ROOT) and uid not in PUBLIC_UIDS:
                texts |= {uid, *(part for part in uid.split(".") if not part.isdigit())}
    return texts


def test_no_uid_of_a_sent_study_reaches_the_node_log(node_factory: Callable[..., NodeProcess],
                                                    tmp_path: Path) -> None:
    ct = phantom(tmp_path / "ct")
    _with_uid_canaries(ct.files)
    uids = _uid_texts(ct.files)
    assert UID_CANARIES["FrameOfReferenceUID"] in uids and len(uids) > 3 * len(ct.files)
    node = node_factory(destinations=[{"name": "folder", "type": "folder"}], routes=[route("folder")])
    send(node, ct.files)
    assert node.wait_for("job_done", timeout=120)["state"] == "sent"
    node.stop()
    log = node.log_text()
    assert any(e.get("logger") == "pydicom" for e in node.events())  # pydicom did log about the UIDs
    assert sorted(uid for uid in uids if uid in log) == []


def test_job_context_is_bound_to_every_event() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    bind_job("0123456789abcdef", study="feedfacefeedface")
    structlog.get_logger("t").info("stage_done")
    [event] = _lines(stream)
    assert event["job_id"] == "0123456789abcdef"
    assert event["study"] == "feedfacefeedface"
    assert event["timestamp"].endswith("Z")
