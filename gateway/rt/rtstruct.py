"""Label masks -> RT Structure Set Storage dataset referencing the CT it was computed on (PS3.3 A.19).

The reference chain uses the SOP Instance UIDs of the CT datasets actually used:
Referenced Frame of Reference -> RT Referenced Study -> RT Referenced Series -> Contour Image
(every slice), and every contour names its own slice. Contours are CLOSED_PLANAR at the slice's
position, holes as separate inner contours (Eclipse and RayStation combine them by XOR),
islands as separate contours. Approval is UNAPPROVED and every ROI says AUTOMATIC and which
model made it: the contours are for a clinician to review.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import structlog
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from gateway import __version__
from gateway.errors import StructureSetError
from gateway.inference.manifest import ModelManifest
from gateway.inference.volume import Volume
from gateway.routes import StructureTemplate
from gateway.rt.contours import Contour, format_ds_points, mask_contours
from gateway.rt.plausibility import Finding, Outcome

__all__ = ["StructureSetInput", "build_structure_set"]

log = structlog.get_logger(__name__)

MANUFACTURER = "Contour Gateway"
_CONTOUR_DATA = 0x30060050
_COPIED_FROM_CT = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


@dataclass(frozen=True)
class StructureSetInput:
    """What a structure set is built from: the CT it refers to, the masks, and the model that made them."""

    volume: Volume
    ct: Sequence[Dataset]  # the CT datasets of the series (any order), for the reference chain
    masks: Mapping[str, np.ndarray]  # label name -> boolean mask on the volume grid
    manifest: ModelManifest
    tolerance_mm: float = 0.5
    #: ``separate``: holes as inner contours (Eclipse, RayStation: XOR); ``keyhole``: cut into the outer one.
    holes: Literal["separate", "keyhole"] = "separate"
    #: The route's site template, keyed by the model's label names.
    template: Mapping[str, StructureTemplate] = field(default_factory=dict)
    #: Plausibility findings that did not pass, by label name: written where a TPS shows them.
    qa: Mapping[str, Sequence[Finding]] = field(default_factory=dict)


def build_structure_set(source: StructureSetInput, *, now: dt.datetime | None = None) -> Dataset:
    """Return the RT Structure Set dataset; empty structures are left out (and logged).

    Raises
    ------
    StructureSetError
        If every structure is empty, or the CT lacks a Frame of Reference.
    """
    now = now or dt.datetime.now()
    first = source.ct[0]
    if not str(first.get("FrameOfReferenceUID", "")):
        raise StructureSetError("the CT has no Frame of Reference UID")
    rois = _rois(source)
    if not any(roi.contours for roi in rois):
        raise StructureSetError("every structure is empty", reason="structure_set_empty")
    ds = _header(first, source.manifest, now)
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_frame_reference(source)])
    ds.StructureSetROISequence = DicomSequence(
        [_structure_set_roi(roi, first.FrameOfReferenceUID, source.manifest) for roi in rois])
    slices = _ordered(source)
    normal = source.volume.affine[:3, 0] / np.linalg.norm(source.volume.affine[:3, 0])
    axial = bool(abs(abs(float(normal[2])) - 1) < 1e-6)
    ds.ROIContourSequence = DicomSequence([_roi_contour(roi, slices, axial) for roi in rois])
    ds.RTROIObservationsSequence = DicomSequence([_observation(roi, source.qa.get(roi.label, ())) for roi in rois])
    ds.StructureSetDescription = _described(ds.StructureSetDescription, source, rois)
    return ds


def _described(description: str, source: StructureSetInput, rois: Sequence[_ROI]) -> str:
    """The description with the QA summary: structures flagged, and those left out (a route with ``qa = "drop"``)."""
    flagged = [roi.name for roi in rois if source.qa.get(roi.label)]
    left_out = [source.template.get(label, StructureTemplate()).name or label for label, flags in source.qa.items()
                if label not in source.masks and any(f.outcome is Outcome.FAIL for f in flags)]
    if flagged:
        description += f". QA flagged {len(flagged)} of {len(rois)}: {', '.join(flagged)}"
    if left_out:
        description += f". QA left out {len(left_out)}: {', '.join(left_out)}"
    return description[:1024]


@dataclass(frozen=True)
class _ROI:
    number: int
    name: str
    colour: list[int]
    interpreted_type: str
    contours: list[Contour]
    origin: str | None  # the model that found it, where a route merges several
    label: str  # the model's label name (the ROI name may come from the site template)


def _rois(source: StructureSetInput) -> list[_ROI]:
    """The structures to write, named, coloured and ordered by the site template over the manifest."""
    planned = []
    for position, label in enumerate(source.manifest.labels):
        template = source.template.get(label.name, StructureTemplate())
        mask = source.masks.get(label.name)
        contours = (mask_contours(mask, source.volume.affine, source.tolerance_mm, keyhole=source.holes == "keyhole")
                    if mask is not None else [])
        if not contours:
            log.warning("structure_empty", structure=label.name, written=template.write_if_empty)
            if not template.write_if_empty:
                continue
        order = template.order if template.order is not None else 10_000 + position
        planned.append((order, template.name or label.name, list(template.colour or label.colour),
                        template.interpreted_type or label.interpreted_type, contours, label.origin, label.name))
    planned.sort(key=lambda item: item[0])
    return [_ROI(number, name, colour, kind, contours, origin, label)
            for number, (_order, name, colour, kind, contours, origin, label) in enumerate(planned, start=1)]


def _header(ct: Dataset, manifest: ModelManifest, now: dt.datetime) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in _COPIED_FROM_CT:
        if keyword in ct:
            ds[keyword] = ct[keyword]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # type 2: present, empty when unknown
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    model = f"{manifest.model.name} {manifest.model.version}"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 9001
    ds.SeriesDescription = f"AUTO {manifest.model.name}: REVIEW REQUIRED"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, "contour-gateway"
    ds.SoftwareVersions = [f"contour-gateway {__version__}", f"model {model}"]
    ds.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber, ds.InstanceCreationDate, ds.InstanceCreationTime = 1, date, time
    ds.StructureSetLabel = "AUTO CONTOURS"
    ds.StructureSetName = manifest.model.name[:64]
    ds.StructureSetDescription = f"Automatic contours by {model}; not approved, clinical review required"[:1024]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def _frame_reference(source: StructureSetInput) -> Dataset:
    first = source.ct[0]
    images = []
    for ds in _ordered(source):
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = first.SeriesInstanceUID, DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, as TPSs expect)
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = first.FrameOfReferenceUID, DicomSequence([study])
    return frame


def _ordered(source: StructureSetInput) -> list[Dataset]:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source.ct}
    return [by_uid[uid] for uid in source.volume.sop_instance_uids]


def _structure_set_roi(source: _ROI, frame_uid: str, manifest: ModelManifest) -> Dataset:
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = source.number, frame_uid, source.name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = (source.origin or f"{manifest.model.name} {manifest.model.version}")[:64]
    return roi


def _roi_contour(roi: _ROI, slices: list[Dataset], axial: bool) -> Dataset:
    item = Dataset()
    item.ReferencedROINumber, item.ROIDisplayColor = roi.number, roi.colour
    if not roi.contours:
        return item  # Contour Sequence is type 3: an ROI the site wants listed even when empty
    sequence = []
    for contour in roi.contours:
        ct = slices[contour.slice_index]
        entry = Dataset()
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = ct.SOPClassUID, ct.SOPInstanceUID
        entry.ContourImageSequence = DicomSequence([image])
        entry.ContourGeometricType = "CLOSED_PLANAR"
        entry.NumberOfContourPoints = len(contour.points)
        # z exactly as the slice's Image Position (Patient) says, so a TPS matches the slice
        z_text = str(ct.ImagePositionPatient[2]).strip() if axial else None
        entry[_CONTOUR_DATA] = _raw_ds(_CONTOUR_DATA, format_ds_points(contour.points, z_text))
        # as if read from Explicit VR Little Endian: the writer copies the raw text instead of parsing it
        entry.set_original_encoding(False, True, default_encoding)
        sequence.append(entry)
    item.ContourSequence = DicomSequence(sequence)
    return item


def _raw_ds(tag: int, text: str) -> RawDataElement:
    # Already valid DS text: stored and written as it is, skipping pydicom's per-value conversion.
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b" "
    return RawDataElement(BaseTag(tag), "DS", len(raw), raw, 0, False, True)


def _observation(roi: _ROI, flags: Sequence[Finding]) -> Dataset:
    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = roi.number, roi.number
    if flags:  # what a TPS shows next to the structure (its name stays as the template says)
        worst = next((f for f in flags if f.outcome is Outcome.FAIL), flags[0])
        observation.ROIObservationLabel = f"QA: {worst.check.split(':', 1)[0]}?"[:64]
        observation.ROIObservationDescription = "; ".join(
            f"{f.outcome.value} {f.check} {f.reason} ({f.value:g})" for f in flags)[:1024]
    observation.RTROIInterpretedType, observation.ROIInterpreter = roi.interpreted_type, ""
    return observation
