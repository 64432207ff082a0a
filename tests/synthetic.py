"""Synthetic CT series with canary patient data, for the tests and the benchmark scripts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: Canary values: if any of these shows up in a log, path or metric, PHI leaked.
CANARY_NAME = "CANARY^PATIENT^ZQX"
CANARY_ID = "CANARYID7731"
CANARY_BIRTH = "19451231"
CANARY_ACCESSION = "CANARYACC991"
CANARY_STUDY_PREFIX = "1.2.826.0.1.3680043.8.498.77"



@dataclass
class CTSeries:
    """A synthetic CT series written to disk, one file per slice."""

    folder: Path
    study_uid: str
    series_uid: str
    sop_uids: list[str]
    files: list[Path]


def make_ct_series(folder: Path, count: int = 8, *, size: int = 64, study_uid: str | None = None,
                   seed: int = 0) -> CTSeries:
    """Write *count* axial CT slices of *size* x *size* with canary patient data."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(prefix=CANARY_STUDY_PREFIX + ".")
    series_uid, frame_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    sop_uids, files = [], []
    for index in range(count):
        ds = ct_slice(study_uid, series_uid, frame_uid, index, size, rng)
        path = folder / f"slice{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(str(ds.SOPInstanceUID))
        files.append(path)
    return CTSeries(folder, study_uid, series_uid, sop_uids, files)


def ct_slice(study_uid: str, series_uid: str, frame_uid: str, index: int, size: int,
             rng: np.random.Generator) -> Dataset:
    """One axial slice *index* (3 mm apart) of *size* x *size* random HU-like values."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = CANARY_NAME, CANARY_ID, CANARY_BIRTH
    ds.AccessionNumber, ds.Modality, ds.StudyDate = CANARY_ACCESSION, "CT", "20261120"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.ImagePositionPatient = [-100.0, -100.0, index * 3.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.9, 0.9], 3.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
    ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
    return ds
