"""Coded attributes the pseudonymised copy keeps: Defined Terms only, so no free text rides along in them.

An attribute of the allow-list whose values are coded (Image Type, Rescale Type, Patient Position ...)
keeps a value only where it is a Defined Term of its position (PS3.3); any other value is free text to
this node. Decimal and integer strings keep only the characters of numbers.
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue

__all__ = ["DEFINED_TERMS", "is_numeric", "narrowed"]

_Element = DataElement | RawDataElement

#: The Defined Terms (PS3.3) a coded attribute of :data:`gateway.identity.pseudonymise.ALLOWED_KEYWORDS` may keep, per
#: value: any other value is free text to this node and is emptied (ImageType, where positions matter), replaced
#: by US "Unspecified" (RescaleType, as HU is implied when it is absent) or dropped with the attribute. Only CT
#: Image Storage is pseudonymised, so the CT Image IOD's terms are enough.
DEFINED_TERMS: dict[str, tuple[frozenset[str], ...]] = {
    "ImageType": (
        frozenset({"ORIGINAL", "DERIVED"}),  # C.7.6.1.1.2 value 1
        frozenset({"PRIMARY", "SECONDARY"}),  # C.7.6.1.1.2 value 2
        frozenset({"AXIAL", "LOCALIZER"}),  # C.8.2.1.1.1 value 3 of a CT image; later values are vendor text ...
        frozenset({"VMI", "MAT_SPECIFIC", "MAT_REMOVED", "MAT_FRACTIONAL", "EFF_ATOMIC_NUM", "ELECTRON_DENSITY",
                   "MAT_MODIFIED", "MAT_VALUE_BASED"}),  # ... but value 4 of multi-energy CT (C.8.2.1.1.1)
    ),
    "Modality": (frozenset({"CT"}),),  # C.7.3.1.1.1; the only modality of the CT Image IOD
    "PatientPosition": (frozenset({  # C.7.3.1.1.2
        "HFP", "HFS", "HFDR", "HFDL", "FFDR", "FFDL", "FFP", "FFS", "LFP", "LFS", "RFP", "RFS",
        "AFDR", "AFDL", "PFDR", "PFDL"}),),
    "PhotometricInterpretation": (frozenset({  # C.7.6.3.1.2, retired terms left out
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
        "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"}),),
    "RescaleType": (frozenset({"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"}),),  # C.11.1.1.2
}
#: Bytes a DS or IS value may hold (PS3.5 Table 6.2-1), NUL padding included.
_NUMERIC_BYTES = b"0123456789+-.eE \\\0"
#: Replaces a value none of whose values is kept: Rescale Type US, "Unspecified" (C.11.1.1.2), as an absent one
#: would mean HU in a CT image (C.8.2.1).
_FALLBACK_TERMS = {0x00281054: ["US"]}


def narrowed(elem: _Element, terms: tuple[frozenset[str], ...]) -> _Element | None:
    """*elem* with each value not a Defined Term of its position emptied; trailing empty values left out."""
    values = [value.strip(" \0") for value in _text_values(elem.value)]
    kept = [value if value.upper() in allowed else "" for value, allowed in zip(values, terms, strict=False)]
    if kept == values:
        return elem  # the common case: nothing to narrow, so nothing to re-encode
    kept = [value.upper() for value in kept]
    while kept and not kept[-1]:
        kept.pop()
    if not kept and any(values):
        kept = _FALLBACK_TERMS.get(int(elem.tag), [])
    if not kept:
        return None
    return DataElement(elem.tag, dictionary_VR(elem.tag), kept if len(kept) > 1 else kept[0])


def _text_values(value: object) -> list[str]:
    if value is None or value == b"" or value == "":
        return []
    if isinstance(value, bytes):
        return value.decode("latin-1").split("\\")
    if isinstance(value, MultiValue | list):
        return [str(item) for item in value]
    return [str(value)]


def is_numeric(elem: _Element) -> bool:
    """Whether a DS or IS value holds only the characters of numbers (decoded values were parsed as numbers)."""
    return not isinstance(elem.value, bytes) or not elem.value.translate(None, _NUMERIC_BYTES)
