"""Re-identification: a result built on pseudonymised data, mapped back to the original study.

Every UID that is a pseudo UID of the job (at any depth, in any UI element, file meta
included) is replaced by its original; the identity attributes (Patient and General Study
modules, Frame of Reference) of the series the result was computed on are restored byte for
byte from the vault record, and :func:`encode_reidentified` writes them as received (pydicom
would decode and re-encode them: invalid bytes and padding would change); the
de-identification markers are removed. An identity attribute the original lacks stays
present but empty (the result's IOD may require it, type 2). A pseudo UID that survives is an error, never sent.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from gateway.encoding import file_meta_bytes
from gateway.errors import ReidentificationError
from gateway.identity.pseudonymise import IDENTITY_KEYWORDS, IDENTITY_TAGS, ReidentificationRecord

__all__ = ["encode_reidentified", "reidentify"]

_DEIDENTIFICATION_MARKERS = (
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


def reidentify(result: Dataset, record: ReidentificationRecord, series: int = 1) -> Dataset:
    """Map *result* (changed in place and returned) back to the original identity of *series*.

    The identity elements are put in as raw elements, their bytes as received; write the
    result with :func:`encode_reidentified` to keep them so.

    Raises
    ------
    ReidentificationError
        If a pseudo UID is still present afterwards.
    """
    _map_uids(result, record.uids)
    if hasattr(result, "file_meta"):
        _map_uids(result.file_meta, record.uids)
    for keyword in _DEIDENTIFICATION_MARKERS:
        if keyword in result:
            delattr(result, keyword)
    for keyword in IDENTITY_KEYWORDS:  # emptied, not removed: type 2 ones must stay present
        if keyword in result:
            result[keyword].value = [] if result[keyword].VR == "SQ" else None
    leftovers = _pseudo_uids(result, set(record.uids))
    if leftovers:
        raise ReidentificationError(f"{leftovers} pseudo UID(s) survived re-identification")
    try:
        encoded = record.identity(series)
    except KeyError as exc:
        raise ReidentificationError(f"no identity recorded for series {series}") from exc
    identity = read_dataset(io.BytesIO(encoded), False, True)
    for tag in tuple(identity.keys()):
        result[tag] = identity.get_item(tag)  # raw: the bytes as received
    return result


def encode_reidentified(result: Dataset) -> bytes:
    """*result* (from :func:`reidentify`) as Part 10 bytes, Explicit VR Little Endian.

    Raw elements (the restored identity) are written as they are; every other text element is
    encoded in the identity's Specific Character Set.
    """
    charset = result.get_item(0x00080005)
    encodings = None
    if charset is not None and charset.value:
        raw = charset.value
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else "\\".join(
            map(str, raw if isinstance(raw, MultiValue | list) else [raw]))
        encodings = [value.strip(" \0") for value in text.split("\\")]
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    for tag in sorted(result.keys()):
        if tag.element == 0 and tag.group > 6:  # retired group lengths are not written (PS3.5 7.2)
            continue
        element = result.get_item(tag)
        raw = element.is_raw and int(tag) in IDENTITY_TAGS
        write_data_element(body, element if raw else result[tag], encodings)
    head = file_meta_bytes(str(result.SOPClassUID), str(result.SOPInstanceUID), ExplicitVRLittleEndian)
    return head + body.getvalue()


def _uid_elements(ds: Dataset) -> Iterator[DataElement]:
    """Every UI element of *ds*, at any depth; other raw elements stay raw (a structure set's contour points are
    most of its bytes, and parsing them is most of the time a full walk takes)."""
    for tag in tuple(ds.keys()):
        vr = ds.get_item(tag).VR or ds[tag].VR  # raw from Implicit VR: known once converted
        if vr == "UI":
            yield ds[tag]
        elif vr == "SQ":
            for item in ds[tag].value:
                yield from _uid_elements(item)


def _map_uids(ds: Dataset, uids: dict[str, str]) -> None:
    for element in _uid_elements(ds):
        if element.value is None:
            continue
        if isinstance(element.value, MultiValue | list):
            element.value = [uids.get(str(v), str(v)) for v in element.value]
        else:
            element.value = uids.get(str(element.value), str(element.value))


def _pseudo_uids(ds: Dataset, pseudo: set[str]) -> int:
    count = 0
    for element in _uid_elements(ds):
        if element.value is not None:
            values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
            count += sum(1 for v in values if str(v) in pseudo)
    return count
