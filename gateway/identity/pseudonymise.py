"""Pseudonymisation: the dataset inference may see, built new from an allow-list, with random UIDs.

Nothing is scrubbed from a copy: :func:`pseudonymise` creates an empty dataset and copies
in only what segmentation and geometry need (:data:`ALLOWED_KEYWORDS`), so every other
attribute, private tags and sequences included, is absent by construction. What is copied
carries no free text either: coded attributes keep only the Defined Terms of PS3.3
(:data:`DEFINED_TERMS`), numbers must be numbers, and JPEG-family frames lose their comment
and application segments (:mod:`gateway.identity.encapsulated`; pixel values unchanged).
Study, series, instance and frame-of-reference UIDs are replaced by random ``2.25.`` UIDs
(not hashes, which are recomputable and so linkable), 1:1 within a study, and the patient
by a random pseudonym (PS3.15 E.1: Basic Application Confidentiality Profile).

This module never sees the re-identification vault: it hands the mapping and the
original identity attributes back as a :class:`ReidentificationRecord`, which the
pipeline stores in the vault.
"""

from __future__ import annotations

import secrets
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage

from gateway.encoding import file_meta_bytes
from gateway.errors import PixelDataError
from gateway.identity.coded_terms import DEFINED_TERMS, is_numeric, narrowed
from gateway.identity.encapsulated import MARKER_SYNTAXES, strip_pixel_data
from gateway.sop import DOSE_REPORT_SOP_CLASSES, SECONDARY_CAPTURE

__all__ = [
    "ALLOWED_KEYWORDS",
    "DEFINED_TERMS",
    "IDENTITY_KEYWORDS",
    "IDENTITY_TAGS",
    "UID_KEYWORDS",
    "ReidentificationRecord",
    "UIDMap",
    "encode",
    "identity_of",
    "new_pseudonym",
    "patient_of",
    "pseudonymise",
    "quarantine_reason",
]

#: Copied: SOP class, modality and patient position, image plane, image pixel, CT rescale. Values are unchanged,
#: but for the coded ones (:data:`DEFINED_TERMS`) and Pixel Data in a JPEG-family transfer syntax.
ALLOWED_KEYWORDS = (
    "SOPClassUID", "Modality", "PatientPosition", "ImageType",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "SliceLocation",
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "PlanarConfiguration", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "RescaleIntercept", "RescaleSlope", "RescaleType",
    "PixelData",
)
#: Replaced by random UIDs, the same original always by the same pseudo within a study.
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
#: What the TPS needs to file a result: Patient and General Study modules, Frame of Reference.
IDENTITY_KEYWORDS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription", "PositionReferenceIndicator",
)
#: ImageType values (value 3 on) of CT images that are not a patient volume: scout views, screen saves, dose
#: pages. Values 1 and 2 never refuse an image: DERIVED\SECONDARY is what 4D-CT averages, TPS exports and
#: converted CTs carry (PS3.3 C.7.6.1.1.2), and they are planning CTs.
DEFAULT_UNWANTED_IMAGE_TYPES = frozenset({"LOCALIZER", "SCREEN SAVE", "DOSE_INFO", "DOSE REPORT"})

_ALLOWED_TAGS = tuple(int(cast(int, tag_for_keyword(keyword))) for keyword in ALLOWED_KEYWORDS)
_CODED_TERMS = {int(cast(int, tag_for_keyword(keyword))): terms for keyword, terms in DEFINED_TERMS.items()}
_NUMERIC_TAGS = frozenset(tag for tag in _ALLOWED_TAGS if dictionary_VR(tag) in ("DS", "IS"))
_PIXEL_DATA_TAG = 0x7FE00010
_Element = DataElement | RawDataElement
IDENTITY_TAGS = tuple(int(cast(int, tag_for_keyword(keyword))) for keyword in IDENTITY_KEYWORDS)
_PATIENT_TAGS = (0x00100020, 0x00100021, 0x00100010, 0x00100030)  # ID, issuer, name, birth date
_CHARSET_TAG = 0x00080005
#: Value representations of identity attributes with a 2-byte length, copied as raw bytes.
_SHORT_TEXT_VRS = frozenset({"CS", "PN", "LO", "SH", "DA", "TM"})
_BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")
_DEIDENTIFICATION_METHOD = "Allow-list pseudonymisation; random UIDs; patient pseudonym"


def _random_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def new_pseudonym() -> str:
    """A random patient pseudonym (no relation to any patient attribute)."""
    return f"PSEUDO-{secrets.token_hex(8).upper()}"


@dataclass
class UIDMap:
    """Original -> random pseudo UIDs for one study, 1:1."""

    forward: dict[str, str] = field(default_factory=dict)

    def pseudo(self, original: str) -> str:
        """The pseudo UID of *original*, created on first use."""
        found = self.forward.get(original)
        if found is None:
            found = self.forward[original] = _random_uid()
        return found

    def reverse(self) -> dict[str, str]:
        """``{pseudo: original}``."""
        return {pseudo: original for original, pseudo in self.forward.items()}


@dataclass(frozen=True)
class ReidentificationRecord:
    """What re-identification needs, and all that may leave the pseudonymised side.

    ``identities`` holds, per series (task number), the original identity attributes
    (:data:`IDENTITY_KEYWORDS`) of the instances that series' results are computed on, encoded
    by :func:`identity_of` so their values come back byte for byte.
    """

    uids: dict[str, str]  # pseudo -> original
    identities: dict[int, bytes]
    pseudonym: str

    def identity(self, series: int) -> bytes:
        """The encoded identity of *series* (records of one identity per job keep it under 0)."""
        found = self.identities.get(series, self.identities.get(0))
        if found is None:
            raise KeyError(f"no identity recorded for series {series}")
        return found


def quarantine_reason(ds: Dataset, unwanted_image_types: Iterable[str] = DEFAULT_UNWANTED_IMAGE_TYPES) -> str | None:
    """Why *ds* must not be processed, as a reason code, or ``None``.

    Dose reports, secondary captures and other classes we do not contour; burned-in annotation
    (PS3.15 E.1: such pixel data can carry identity); an ImageType value that marks a localizer,
    screen save or dose page. ORIGINAL/DERIVED and PRIMARY/SECONDARY (values 1 and 2) are no reason.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in DOSE_REPORT_SOP_CLASSES:
        return "dose_report"
    if sop_class == SECONDARY_CAPTURE:
        return "secondary_capture"
    if sop_class != CTImageStorage:
        return "sop_class_not_processed"
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "burned_in_annotation"
    image_type = {str(value).strip().upper() for value in ds.get("ImageType", [])}
    unwanted = image_type & {value.upper() for value in unwanted_image_types}
    if unwanted:
        return "image_type_" + sorted(unwanted)[0].lower().replace(" ", "_")
    return None


def identity_of(ds: Dataset) -> bytes:
    """The identity attributes of *ds* as Explicit VR Little Endian elements, for the vault.

    Values not yet decoded by pydicom are copied as the raw bytes received, so names in any
    character set (invalid bytes, NUL or GB18030 padding included) come back unchanged; an
    odd-length value gets one space to make it valid. Sequences are re-encoded.
    """
    charset = ds.get_item(_CHARSET_TAG)
    encodings = None if charset is None else _charset_values(charset)
    return b"".join(_element_bytes(ds, tag, encodings) for tag in IDENTITY_TAGS if tag in ds)


def patient_of(ds: Dataset) -> tuple[bytes, ...]:
    """Who *ds* is about: Patient ID, Issuer of Patient ID, Patient's Name and Birth Date as received.

    Raw values without trailing padding and empty name components; absent and empty are the same.
    Two instances with different values must never be processed as one patient.
    """
    return tuple(_raw_value(ds, tag).rstrip(b" \0").rstrip(b"^=").rstrip(b" \0") for tag in _PATIENT_TAGS)


def _raw_value(ds: Dataset, tag: int) -> bytes:
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return b""
    if isinstance(elem.value, bytes):
        return elem.value
    return _element_bytes(ds, tag, None)[8:]


def _charset_values(elem: DataElement | RawDataElement) -> list[str]:
    value = elem.value
    if isinstance(value, bytes):
        return [v.strip(" \0") for v in value.decode("ascii", "replace").split("\\")]
    return [str(v) for v in value] if isinstance(value, MultiValue | list) else [str(value or "")]


def _element_bytes(ds: Dataset, tag: int, encodings: list[str] | None) -> bytes:
    elem = ds.get_item(tag)
    vr = str(dictionary_VR(tag))
    if elem is not None and elem.is_raw and isinstance(elem.value, bytes) and vr in _SHORT_TEXT_VRS \
            and len(elem.value) < 0xFFFF:
        value = elem.value + (b" " if len(elem.value) % 2 else b"")
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii") + struct.pack("<H", len(value)) + value
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_data_element(buffer, ds[tag], encodings)
    return buffer.getvalue()


def pseudonymise(ds: Dataset, uids: UIDMap, pseudonym: str) -> Dataset:
    """Build the pseudonymised dataset of *ds*: allow-listed attributes, pseudo UIDs, pseudonym.

    *ds* itself is not changed. The transfer syntax is kept: pixel data is passed through unchanged, but for
    comment and application segments left out of JPEG-family frames (decoded pixel values are the same).

    Raises
    ------
    ValueError
        If Pixel Data in a JPEG-family transfer syntax is not a JPEG, JPEG-LS or JPEG 2000 stream.
    """
    out = Dataset()
    for tag in _ALLOWED_TAGS:
        elem = _allowed_element(ds, tag)
        if elem is not None:
            out[tag] = elem
    for keyword in UID_KEYWORDS:
        if keyword in ds:
            setattr(out, keyword, uids.pseudo(str(ds[keyword].value)))
    out.PatientName = out.PatientID = pseudonym
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = _DEIDENTIFICATION_METHOD
    out.DeidentificationMethodCodeSequence = Sequence([_code(*_BASIC_PROFILE)])
    out.LongitudinalTemporalInformationModified = "REMOVED"  # no date or time is copied
    out.file_meta = _file_meta(ds, out)
    return out


def _allowed_element(ds: Dataset, tag: int) -> _Element | None:
    """The element of *tag* to copy from *ds*: as received (raw, not decoded and re-encoded) unless narrowed."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    terms = _CODED_TERMS.get(tag)
    if terms is not None:
        return narrowed(elem, terms)
    if tag in _NUMERIC_TAGS:
        return elem if is_numeric(elem) else None
    if tag == _PIXEL_DATA_TAG and str(ds.file_meta.get("TransferSyntaxUID", "")) in MARKER_SYNTAXES:
        return _stripped_pixel_data(ds, elem)
    return elem


def _stripped_pixel_data(ds: Dataset, elem: _Element) -> DataElement:
    if not isinstance(elem.value, bytes):
        raise PixelDataError("Pixel Data of a compressed transfer syntax holds no encapsulated frames")
    try:
        value = strip_pixel_data(elem.value, int(ds.get("NumberOfFrames") or 1))
    except ValueError as exc:  # byte offsets and marker names only: no value of the data set
        raise PixelDataError(f"encapsulated Pixel Data cannot be parsed ({exc})") from exc
    return DataElement(_PIXEL_DATA_TAG, "OB", value, is_undefined_length=True)


def encode(ds: Dataset) -> bytes:
    """*ds* (from :func:`pseudonymise`) as Part 10 bytes, in its transfer syntax."""
    meta = ds.file_meta
    syntax = UID(meta.TransferSyntaxUID)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
    write_dataset(buffer, ds)
    head = file_meta_bytes(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(syntax))
    return head + buffer.getvalue()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _file_meta(source: Dataset, out: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    return meta
