"""Synthetic CT series with canary patient data, for the tests and the benchmark scripts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from gateway.inference.volume import Volume

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


SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIDENTIALITY_TABLE = SHARED / "dicom-standard" / "confidentiality_profile_attributes.json"
#: UIDs the receiver needs consistent across a series; the canary study sets them itself.
SERIES_UIDS = {0x0020000D, 0x0020000E, 0x00080018, 0x00200052}


def confidentiality_rows() -> list[dict[str, str]]:
    """PS3.15 Table E.1-1, one row per attribute (the machine-readable copy in ../shared)."""
    import json

    return list(json.loads(CONFIDENTIALITY_TABLE.read_text()))


def concrete_tag(row: dict[str, str]) -> int | None:
    """The row's tag as an int, or ``None`` for repeating groups and "private attributes"."""
    try:
        return int(row["id"], 16)
    except ValueError:
        return None


def _canary_value(vr: str, n: int) -> object:
    text = {
        "PN": f"CANARY^PN{n:04d}", "LO": f"CANARYLO{n:04d}", "SH": f"CANARYSH{n:04d}", "ST": f"CANARYST{n:04d}",
        "LT": f"CANARYLT{n:04d}", "UT": f"CANARYUT{n:04d}", "UC": f"CANARYUC{n:04d}", "CS": f"CNRY_CS{n:04d}",
        "AE": f"CNRYAE{n:04d}", "UR": f"http://canary.example/UR{n:04d}",
        "DA": f"19{n % 100:02d}{n % 12 + 1:02d}{n % 28 + 1:02d}", "TM": f"{n % 24:02d}{n % 60:02d}11.{n:06d}",
        "DT": f"19{n % 100:02d}{n % 12 + 1:02d}{n % 28 + 1:02d}{n % 24:02d}1122.{n:06d}",
        "UI": f"1.2.826.0.1.3680043.8.498.99.{n}", "DS": f"9{n:04d}.25", "IS": f"77{n:04d}",
        "AS": f"{n % 100:03d}Y",
    }
    if vr in text:
        return text[vr]
    if vr in ("OB", "UN", "OW"):
        return f"CANARYOB{n:04d}".encode()
    if vr in ("US", "SS", "UL", "SL"):
        return 7000 + n
    if vr in ("FL", "FD"):
        return 7000.5 + n
    raise ValueError(f"no canary for VR {vr}")


def canary_text(vr: str, n: int) -> str | None:
    """The searchable text of the canary for *vr* (``None`` for binary numbers)."""
    value = _canary_value(vr, n)
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None


def add_confidentiality_canaries(ds: Dataset) -> list[str]:
    """Set every concrete Table E.1-1 attribute of *ds* (but the series UIDs) to a unique canary.

    Sequences get one item carrying a canary; private blocks with PN/LO values and a private
    sequence are added too. Returns the canary texts to search for.
    """
    from pydicom.datadict import dictionary_VR

    texts: list[str] = []
    for n, row in enumerate(confidentiality_rows()):
        tag = concrete_tag(row)
        if tag is None or tag in SERIES_UIDS or tag >> 16 in (0x0000, 0x0002):
            continue  # command and file meta elements cannot be in a data set
        vr = dictionary_VR(tag).split(" ")[0]
        if vr == "SQ":
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator = "CNRY", "99CNRY"
            item.CodeMeaning = f"CANARYSQ{n:04d}"
            item.add_new(0x00081155, "UI", f"1.2.826.0.1.3680043.8.498.98.{n}")  # a nested UID
            ds.add_new(tag, vr, [item])
            texts += [item.CodeMeaning, f"1.2.826.0.1.3680043.8.498.98.{n}"]
            continue
        ds.add_new(tag, vr, _canary_value(vr, n))
        text = canary_text(vr, n)
        if text is not None:
            texts.append(text)
    block = ds.private_block(0x0099, "CANARY PRIVATE", create=True)
    block.add_new(0x01, "PN", "CANARY^PRIVATE^PN")
    block.add_new(0x02, "LO", "CANARYPRIVATELO")
    private_item = Dataset()
    private_item.add_new(0x00100010, "PN", "CANARY^IN^PRIVATE^SQ")
    block.add_new(0x03, "SQ", [private_item])
    texts += ["CANARY PRIVATE", "CANARY^PRIVATE^PN", "CANARYPRIVATELO", "CANARY^IN^PRIVATE^SQ"]
    return texts


def couch_phantom(seed: int = 0, shape: tuple[int, int, int] = (60, 256, 256),
                  spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)) -> tuple[Volume, dict[str, np.ndarray]]:
    """A thorax-abdomen: body, two arms beside it (an air gap apart), lungs with vessels, spine,
    bowel gas, 30 HU noise, and a couch (an 8 mm shell against the patient's back over a foam
    core) that is not the patient."""
    k, i, j = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    z, y, x = ((k - shape[0] / 2) * spacing[0], (i - shape[1] / 2) * spacing[1], (j - shape[2] / 2) * spacing[2])
    hu = np.full(shape, -1000.0)
    trunk = (x / 160) ** 2 + (y / 110) ** 2 <= 1
    arms = (((np.abs(x) - 185) / 18) ** 2 + ((y - 20) / 30) ** 2 <= 1)
    body = trunk | arms
    hu[body] = 40
    lung_r = ((x + 70) / 50) ** 2 + ((y + 10) / 65) ** 2 + ((z - 20) / 80) ** 2 <= 1
    lung_l = ((x - 70) / 50) ** 2 + ((y + 10) / 65) ** 2 + ((z - 20) / 80) ** 2 <= 1
    hu[lung_r | lung_l] = -820
    hu[(lung_r | lung_l) & (((x % 20) - 10) ** 2 + ((y % 20) - 10) ** 2 < 4)] = 40  # vessels
    hu[(x / 15) ** 2 + ((y - 80) / 15) ** 2 <= 1] = 700  # spine
    hu[body & (((x - 30) / 12) ** 2 + ((y - 30) / 10) ** 2 + ((z + 60) / 10) ** 2 <= 1)] = -1000  # bowel gas
    couch = np.abs(x) < 230
    hu[couch & (((y >= 110) & (y < 118)) | ((y >= 160) & (y < 166)))] = 250
    hu[couch & (y >= 118) & (y < 160)] = -900
    hu += np.random.default_rng(seed).normal(0, 30, shape)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = spacing[0], spacing[1], spacing[2], 1
    affine[:3, 3] = [-(shape[2] / 2) * spacing[2], -(shape[1] / 2) * spacing[1], -(shape[0] / 2) * spacing[0]]
    volume = Volume(np.round(hu).astype(np.int16), affine, tuple(map(str, range(shape[0]))), "1.2.3", "HFS")
    return volume, {"External": body, "Lung_L": lung_l, "Lung_R": lung_r}


def abdomen_phantom(shape: tuple[int, int, int] = (60, 256, 256),
                    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)) -> tuple[Volume, dict[str, np.ndarray]]:
    """:func:`couch_phantom` with a liver: a 60 HU ellipsoid under the right lung (patient right is -x in LPS)."""
    volume, masks = couch_phantom(shape=shape, spacing=spacing)
    k, i, j = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    z, y, x = ((k - shape[0] / 2) * spacing[0], (i - shape[1] / 2) * spacing[1], (j - shape[2] / 2) * spacing[2])
    liver = ((x + 65) / 85) ** 2 + ((y + 5) / 70) ** 2 + ((z + 40) / 55) ** 2 <= 1
    liver &= ~(masks["Lung_R"] | masks["Lung_L"])
    hu = volume.hu.copy()
    hu[liver] += 20  # 40 HU body + noise -> 60 HU liver + noise
    return Volume(hu, volume.affine, volume.sop_instance_uids, volume.frame_of_reference_uid,
                  volume.patient_position), {**masks, "Liver": liver}


def write_volume_series(folder: Path, volume: Volume, *, study_uid: str | None = None,
                        patient: tuple[str, str] = (CANARY_NAME, CANARY_ID),
                        series_description: str = "Thorax 3mm") -> CTSeries:
    """Write an axial HFS *volume* (as from :func:`couch_phantom`) as a CT series with canary patient data."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(prefix=CANARY_STUDY_PREFIX + ".")
    series_uid, frame_uid = generate_uid(), generate_uid()
    rows, columns = volume.shape[1:]
    sop_uids, files = [], []
    for index in range(volume.shape[0]):
        ds = ct_slice(study_uid, series_uid, frame_uid, index, rows, np.random.default_rng(0))
        ds.PatientName, ds.PatientID = patient
        ds.SeriesDescription, ds.Columns = series_description, columns
        ds.ImagePositionPatient = [float(v) for v in volume.affine[:3, 3] + index * volume.affine[:3, 0]]
        ds.PixelSpacing = [float(volume.affine[1, 1]), float(volume.affine[0, 2])]
        ds.SliceThickness = float(volume.affine[2, 0])
        ds.RescaleIntercept = 0.0
        ds.PixelData = np.ascontiguousarray(volume.hu[index], dtype=np.int16).tobytes()
        path = folder / f"slice{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(str(ds.SOPInstanceUID))
        files.append(path)
    return CTSeries(folder, study_uid, series_uid, sop_uids, files)


def stored_along(volume: Volume, masks: dict[str, np.ndarray],
                 flips: tuple[int, ...]) -> tuple[Volume, dict[str, np.ndarray]]:
    """The same anatomy stored with array *flips* (feet first, prone, mirrored) and the affine that matches:
    every voxel keeps its patient (LPS) position."""
    affine = volume.affine.copy()
    for axis in flips:
        affine[:3, 3] += affine[:3, axis] * (volume.shape[axis] - 1)
        affine[:3, axis] *= -1
    return (replace(volume, hu=np.flip(volume.hu, flips), affine=affine),
            {name: np.flip(mask, flips) for name, mask in masks.items()})
