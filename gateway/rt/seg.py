"""DICOM Segmentation output (PS3.3 A.51), the optional twin of the RT Structure Set, made with highdicom.

Binary segments, one per structure with voxels, referencing the same CT instances as the
RT Structure Set; segment labels, colours and algorithm come from the same site template and
model manifest. Written for viewers and archives that prefer voxels to contours.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from gateway import __version__
from gateway.errors import StructureSetError
from gateway.routes import StructureTemplate
from gateway.rt.rtstruct import MANUFACTURER, StructureSetInput

__all__ = ["build_segmentation"]


#: Type 2 attributes highdicom copies from the CT; pseudonymised data has none (re-identification adds them).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(ds: Dataset) -> Dataset:
    missing = [keyword for keyword in _TYPE2 if keyword not in ds]
    if not missing:
        return ds
    copied = copy.copy(ds)  # shallow: the pixel data is shared, the CT itself is not changed
    for keyword in missing:
        setattr(copied, keyword, "")
    return copied


def build_segmentation(source: StructureSetInput) -> Dataset:
    """Return a binary DICOM Segmentation of the non-empty masks of *source*.

    Raises
    ------
    StructureSetError
        If every mask is empty.
    """
    order = {uid: index for index, uid in enumerate(source.volume.sop_instance_uids)}
    ct = [_with_type2(ds) for ds in sorted(source.ct, key=lambda ds: order[str(ds.SOPInstanceUID)])]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=source.manifest.model.name, version=source.manifest.model.version,
        family=codes.cid7162.ArtificialIntelligence)
    descriptions: list[hd.seg.SegmentDescription] = []
    labelmap = np.zeros(source.volume.shape, dtype=np.uint8 if len(source.manifest.labels) < 256 else np.uint16)
    written: list[str] = []
    overlapping = False
    for label in source.manifest.labels:
        mask = source.masks.get(label.name)
        if mask is None or not mask.any():
            continue
        template = source.template.get(label.name, StructureTemplate())
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=len(descriptions) + 1, segment_label=template.name or label.name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.BodyStructure if label.interpreted_type == "EXTERNAL"
            else codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
        written.append(label.name)
        overlapping = overlapping or bool(labelmap[mask].any())
        if not overlapping:
            labelmap[mask] = len(descriptions)
    if not written:
        raise StructureSetError("every structure is empty", reason="structure_set_empty")
    # Segments that never overlap (a softmax model's organs) go as one label map, a byte or two a voxel; overlapping
    # ones (an External around the lungs) as a stack of one plane per segment, each mask read again.
    pixels = (np.stack([source.masks[name] for name in written], axis=-1).astype(np.uint8) if overlapping
              else labelmap)
    return hd.seg.Segmentation(
        source_images=ct, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9002, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name="contour-gateway",
        software_versions=f"contour-gateway {__version__}", device_serial_number="0",
        series_description=f"AUTO {source.manifest.model.name}: REVIEW REQUIRED"[:64])
