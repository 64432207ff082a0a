"""Storage SCP: presentation contexts, and a C-STORE handler that only spools and answers.

The handler decodes just enough to identify the instance (structure and UIDs), writes
the received bytes unchanged behind a new File Meta Information group, and answers
with an explicit status (PS3.4 B.2.3). Success is sent only once the file is durable.
Association policy lives in :mod:`gateway.receiving.policy`; nothing slow runs on this thread.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, cast

import structlog
from pydicom.uid import (
    UID,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE

from gateway import encoding
from gateway.config import GatewayConfig, Peer
from gateway.errors import SpoolError
from gateway.limits import Limits
from gateway.receiving.assembly import Assembler, IncomingInstance
from gateway.receiving.dimse import DiscardedDataSet
from gateway.receiving.elements import MalformedDataSetError, top_level_values
from gateway.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION, VERIFICATION_TRANSFER_SYNTAXES

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "REFUSALS",
    "StoreStatus",
    "UndecodableError",
    "build_ae",
    "file_meta_bytes",
    "handle_store",
    "identify",
]

log = structlog.get_logger(__name__)

IMPLEMENTATION_CLASS_UID = UID(encoding.IMPLEMENTATION_CLASS_UID)
IMPLEMENTATION_VERSION_NAME = encoding.IMPLEMENTATION_VERSION_NAME


class StoreStatus(IntEnum):
    """C-STORE response statuses we send (PS3.4 Table B.2-1).

    ``0xA700`` (Refused: Out of Resources) also answers a data set over ``max_dataset_bytes``;
    ``0xC230`` (Error: Cannot understand) an image declaring more than ``max_pixels_per_instance``
    pixels, which no retry will change.
    """

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    UNDECODABLE = 0xC210
    INVALID_IDENTIFIERS = 0xC220
    TOO_MANY_PIXELS = 0xC230


#: The status that answers each reason a C-STORE is refused (gateway.ops.metrics.STORE_REFUSALS).
REFUSALS = {
    "no_data_set_or_peer": StoreStatus.CANNOT_UNDERSTAND,
    "disk_space_low": StoreStatus.OUT_OF_RESOURCES,
    "dataset_too_large": StoreStatus.OUT_OF_RESOURCES,
    "too_many_pixels": StoreStatus.TOO_MANY_PIXELS,
    "undecodable": StoreStatus.UNDECODABLE,
    "missing_or_invalid_uid": StoreStatus.INVALID_IDENTIFIERS,
    "dataset_does_not_match_request": StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    "out_of_resources": StoreStatus.OUT_OF_RESOURCES,
    "internal_error": StoreStatus.CANNOT_UNDERSTAND,
}


class UndecodableError(ValueError):
    """The received data set could not be parsed."""


@dataclass(frozen=True)
class Identity:
    """The UIDs that identify a received instance, and how many pixels it declares."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    pixels: int = 0  # Rows x Columns x Number of Frames; 0 without Rows or Columns


_UID_SYNTAX = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
_ROWS, _COLUMNS, _NUMBER_OF_FRAMES = 0x00280010, 0x00280011, 0x00280008
_WANTED = frozenset({_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES, _ROWS, _COLUMNS, _NUMBER_OF_FRAMES})


def _uid_value(values: dict[int, bytes], tag: int) -> str | None:
    text = values.get(tag, b"").decode("ascii", "replace").rstrip("\0 ")
    return text if 0 < len(text) <= 64 and _UID_SYNTAX.match(text) else None


def _declared_pixels(values: dict[int, bytes]) -> int:
    """Rows x Columns x Number of Frames, from the raw values (US little endian, IS)."""
    rows, columns = values.get(_ROWS), values.get(_COLUMNS)
    if not rows or not columns:
        return 0
    if len(rows) < 2 or len(columns) < 2:
        raise UndecodableError("Rows or Columns shorter than 2 bytes")
    frames_text = (values.get(_NUMBER_OF_FRAMES) or b"1").decode("ascii", "replace").strip(" \0")
    try:
        frames = float(frames_text or "1")
    except ValueError:
        raise UndecodableError("Number of Frames is not a number") from None
    if not (frames >= 1 and frames.is_integer()):
        raise UndecodableError("Number of Frames is not a positive integer")
    return int.from_bytes(rows[:2], "little") * int.from_bytes(columns[:2], "little") * int(frames)


def identify(data: bytes | memoryview, transfer_syntax: UID) -> Identity | None:
    """Walk *data* (a data set in *transfer_syntax*, little endian) and return its UIDs and declared pixel count.

    Only element headers and the identifying values are read (:mod:`gateway.receiving.elements`): no copy of
    the data set is made.

    Returns ``None`` when a UID is missing or malformed.

    Raises
    ------
    UndecodableError
        When the data set is empty, its elements do not fit it, or its Rows, Columns or Number of Frames
        are malformed.
    """
    try:
        values, count = top_level_values(data, transfer_syntax.is_implicit_VR, _WANTED)
    except MalformedDataSetError as exc:
        raise UndecodableError(f"data set not decodable ({exc})") from None
    if count == 0:
        raise UndecodableError("empty data set")
    pixels = _declared_pixels(values)
    uids = [_uid_value(values, tag) for tag in (_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES)]
    if None in uids:
        return None
    sop_class_uid, sop_instance_uid, study_uid, series_uid = cast(list[str], uids)
    return Identity(sop_class_uid, sop_instance_uid, study_uid, series_uid, pixels)


def file_meta_bytes(identity: Identity, transfer_syntax: UID, source_ae: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received instance."""
    return encoding.file_meta_bytes(identity.sop_class_uid, identity.sop_instance_uid, str(transfer_syntax),
                                     source_ae)


def handle_store(event: evt.Event, assembler: Assembler, limits: Limits) -> int:
    """EVT_C_STORE handler: identify, spool durably, answer with an explicit status (counted for the metrics)."""
    reason = _store(event, assembler, limits)
    counters = getattr(event.assoc, "counters", None)
    if counters is not None:
        if reason is None:
            counters.add("instances_stored")
        else:
            counters.refused(reason)
    return StoreStatus.SUCCESS if reason is None else REFUSALS[reason]


def _refused(reason: str, *, exc: BaseException | None = None, **fields: int) -> str:
    """Log why a C-STORE is refused (``store_failed`` with the exception when it is our fault); return *reason*."""
    status = f"0x{REFUSALS[reason]:04X}"
    if exc is not None:
        log.error("store_failed", status=status, reason=reason, exc_info=exc)
    elif reason == "no_data_set_or_peer":
        log.error("store_refused", status=status, reason=reason)
    else:
        log.warning("store_refused", status=status, reason=reason, **fields)
    return reason


def _store(event: evt.Event, assembler: Assembler, limits: Limits) -> str | None:
    """Spool the request's data set; return ``None``, or the reason it was refused."""
    request = cast(C_STORE, event.request)
    peer: Peer | None = getattr(event.assoc, "peer", None)  # set by the association policy
    if request.DataSet is None or peer is None:
        return _refused("no_data_set_or_peer")
    if isinstance(request.DataSet, DiscardedDataSet):  # over max_dataset_bytes: dropped unread (acceptor)
        return _refused("dataset_too_large", bytes=request.DataSet.received_bytes)
    disk_low: Callable[[], bool] | None = getattr(event.assoc, "disk_low", None)
    if disk_low is not None and disk_low():
        return _refused("disk_space_low")
    data = request.DataSet.getbuffer()
    try:
        return _spool(event, request, data, assembler, limits, peer)
    except (SpoolError, sqlite3.OperationalError) as exc:
        return _refused("out_of_resources", exc=exc)
    except Exception as exc:  # an escaping exception would be answered 0xC211 by pynetdicom
        return _refused("internal_error", exc=exc)
    finally:
        data.release()


def _spool(event: evt.Event, request: C_STORE, data: memoryview, assembler: Assembler, limits: Limits,
           peer: Peer) -> str | None:
    """Identify the data set (the received buffer *data*), check it against the request and *limits*, spool it."""
    transfer_syntax = UID(event.context.transfer_syntax)
    try:
        identity = identify(data, transfer_syntax)
    except UndecodableError:
        return _refused("undecodable")
    if identity is None:
        return _refused("missing_or_invalid_uid")
    if (identity.sop_instance_uid != str(request.AffectedSOPInstanceUID)
            or identity.sop_class_uid != str(request.AffectedSOPClassUID)):
        return _refused("dataset_does_not_match_request")
    if identity.pixels > limits.max_pixels_per_instance:  # from the header, before anything is decoded
        return _refused("too_many_pixels", pixels=identity.pixels, limit=limits.max_pixels_per_instance)
    head = file_meta_bytes(identity, transfer_syntax, str(event.assoc.requestor.ae_title))
    assembler.accept(IncomingInstance(identity.study_uid, identity.sop_instance_uid, (head, data)), peer)
    return None


def build_ae(config: GatewayConfig) -> AE:
    """Return the Storage SCP application entity described by *config*."""
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_pdu_size = node.max_pdu_size
    # The node-wide limit is kept by gateway.receiving.policy.AssociationSlots, counting only associations
    # that passed the policy; pynetdicom's own check would count connections that never associate.
    ae.maximum_associations = node.max_associations + node.max_pending_connections
    # As acceptor, the ACSE timeout is how long a connection may wait for its A-ASSOCIATE-RQ.
    ae.acse_timeout = min(node.acse_timeout_seconds, node.association_request_seconds)
    ae.dimse_timeout = node.dimse_timeout_seconds
    ae.network_timeout = node.network_timeout_seconds
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION, list(VERIFICATION_TRANSFER_SYNTAXES))
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def store_handlers(assembler: Assembler, limits: Limits | None = None) -> list[Any]:
    """The event handlers the Storage SCP binds (C-ECHO uses pynetdicom's default); *limits* default to ``Limits()``."""
    return [(evt.EVT_C_STORE, handle_store, [assembler, limits or Limits()])]
