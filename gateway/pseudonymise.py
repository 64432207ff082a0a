"""Pseudonymisation: the dataset inference may see, built new from an allow-list, with random UIDs.

Nothing is scrubbed from a copy: :func:`pseudonymise` creates an empty dataset and copies
in only what segmentation and geometry need (:data:`ALLOWED_KEYWORDS`, values unchanged),
so every other attribute, private tags and sequences included, is absent by construction.
Study, series, instance and frame-of-reference UIDs are replaced by random ``2.25.`` UIDs
(not hashes, which are recomputable and so linkable), 1:1 within a study, and the patient
by a random pseudonym (PS3.15 E.1: Basic Application Confidentiality Profile).

This module never sees the re-identification vault: it hands the mapping and the
original identity attributes back as a :class:`ReidentificationRecord`, which the
pipeline stores in the vault.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage

from gateway._encoding import file_meta_bytes

__all__ = [
    "ALLOWED_KEYWORDS",
    "IDENTITY_KEYWORDS",
    "UID_KEYWORDS",
    "ReidentificationRecord",
    "UIDMap",
    "encode",
    "new_pseudonym",
    "pseudonymise",
    "quarantine_reason",
]

#: Copied unchanged: SOP class, modality and patient position, image plane, image pixel, CT rescale.
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
#: Radiation dose structured reports (PS3.4 Annex B): received and kept apart, never processed.
DOSE_REPORT_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR
})
#: Image classes besides CT that may arrive with a study (screenshots of dose pages, for one).
IMAGE_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.7"})  # Secondary Capture Image
#: ImageType values of images no route should contour unless it asks for them.
DEFAULT_UNWANTED_IMAGE_TYPES = frozenset({"LOCALIZER", "SCREEN SAVE", "SECONDARY", "DOSE_INFO", "DOSE REPORT"})

_ALLOWED_TAGS = tuple(int(cast(int, tag_for_keyword(keyword))) for keyword in ALLOWED_KEYWORDS)
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

    ``identity`` is the original identity attributes (:data:`IDENTITY_KEYWORDS`) encoded as
    an Explicit VR Little Endian data set, so their values come back byte for byte.
    """

    uids: dict[str, str]  # pseudo -> original
    identity: bytes
    pseudonym: str


def quarantine_reason(ds: Dataset, unwanted_image_types: Iterable[str] = DEFAULT_UNWANTED_IMAGE_TYPES) -> str | None:
    """Why *ds* must not be processed, as a reason code, or ``None``.

    Dose reports and other classes we do not contour; burned-in annotation (PS3.15 E.1: such
    pixel data can carry identity), stated or (outside CT Image) not stated; an ImageType that
    marks localizers, screen saves, secondary captures or dose pages.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in DOSE_REPORT_SOP_CLASSES:
        return "dose_report"
    if sop_class != CTImageStorage and sop_class not in IMAGE_SOP_CLASSES:
        return "sop_class_not_processed"
    burned_in = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if burned_in == "YES":
        return "burned_in_annotation"
    if not burned_in and sop_class != CTImageStorage:
        return "burned_in_annotation_unknown"
    image_type = {str(value).strip().upper() for value in ds.get("ImageType", [])}
    unwanted = image_type & {value.upper() for value in unwanted_image_types}
    if unwanted:
        return "image_type_" + sorted(unwanted)[0].lower().replace(" ", "_")
    return None


def identity_of(ds: Dataset) -> bytes:
    """The identity attributes of *ds*, encoded (Explicit VR Little Endian) for the vault."""
    identity = Dataset()
    for keyword in IDENTITY_KEYWORDS:
        if keyword in ds:
            identity[keyword] = ds[keyword]
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, identity)
    return buffer.getvalue()


def pseudonymise(ds: Dataset, uids: UIDMap, pseudonym: str) -> Dataset:
    """Build the pseudonymised dataset of *ds*: allow-listed attributes, pseudo UIDs, pseudonym.

    The transfer syntax is kept, so pixel data is passed through unchanged.
    """
    out = Dataset()
    for tag in _ALLOWED_TAGS:
        if tag in ds:
            out[tag] = ds.get_item(tag)  # the raw element: copied, not decoded and re-encoded
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
