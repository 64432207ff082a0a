"""Re-identification: a result built on pseudonymised data, mapped back to the original study.

Every UID that is a pseudo UID of the job (at any depth, in any UI element, file meta
included) is replaced by its original; the identity attributes (Patient and General Study
modules, Frame of Reference) are restored byte for byte from the vault record; the
de-identification markers are removed. An identity attribute the original lacks stays
present but empty (the result's IOD may require it, type 2). A pseudo UID that survives is an error, never sent.
"""

from __future__ import annotations

import io

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue

from gateway.errors import ReidentificationError
from gateway.pseudonymise import IDENTITY_KEYWORDS, ReidentificationRecord

__all__ = ["reidentify"]

_DEIDENTIFICATION_MARKERS = (
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


def reidentify(result: Dataset, record: ReidentificationRecord) -> Dataset:
    """Map *result* (changed in place and returned) back to the original identity.

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
    identity = read_dataset(io.BytesIO(record.identity), False, True)
    for element in identity:
        result[element.tag] = element
    leftovers = _pseudo_uids(result, set(record.uids))
    if leftovers:
        raise ReidentificationError(f"{leftovers} pseudo UID(s) survived re-identification")
    return result


def _map_uids(ds: Dataset, uids: dict[str, str]) -> None:
    for element in ds.iterall():
        if element.VR != "UI" or element.value is None:
            continue
        if isinstance(element.value, MultiValue | list):
            element.value = [uids.get(str(v), str(v)) for v in element.value]
        else:
            element.value = uids.get(str(element.value), str(element.value))


def _pseudo_uids(ds: Dataset, pseudo: set[str]) -> int:
    count = 0
    for element in ds.iterall():
        if element.VR == "UI" and element.value is not None:
            values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
            count += sum(1 for v in values if str(v) in pseudo)
    return count
