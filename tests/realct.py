"""Real CT for end-to-end tests: public clinical images, fetched once per machine, written as DICOM on demand.

Sources, each file pinned by SHA-256 and cached under :func:`cache_dir` (never in the repository):

* the pyradiomics 3.1.0 sdist (BSD-3-Clause), ``data/lung1_image.nrrd`` and ``lung2_image.nrrd``: two real
  chest CTs, 512 x 512 at 0.57 / 0.63 mm, 48 / 61 slices of 5 mm. ``pip download`` fetches and unpacks it,
  then discards it: its pyproject.toml says version 3.0.1a1, so metadata never matches 3.1.0 ("inconsistent
  version"). ``--no-clean`` keeps the unpacked tree, and the two files are taken from there.
* the dicompyler-core 0.5.6 sdist (BSD), ``tests/testdata/example_data/``: ``ct.0.dcm``, one real CT slice
  (a breast patient, 512 x 512, Implicit VR, ORIGINAL\\PRIMARY\\AXIAL) and ``rtss.dcm``, its clinical RTSTRUCT.
* Debian ``invesalius-examples`` (``make test`` installs it), ``Cranium.inv3``: an InVesalius project (a gzip
  tar) whose ``matrix.dat`` is a real head CT, 108 x 256 x 256 int16 HU at 0.957 x 0.957 x 1.5 mm.

plastimatch (``convert --output-dicom``) turns the NRRD and raw volumes into DICOM CT, as a site converting
a volume would. It writes ImageType DERIVED\\SECONDARY\\AXIAL, Patient's Name ``ANONYMOUS``, a random
``PL...`` Patient ID, UIDs under its root 1.2.826.0.1.3680043.8.274, Instance Number from 0, no Series
Number. The builders below keep its headers and pixels but give every series new Study/Series/Instance/
Frame of Reference UIDs, the canary identity of :mod:`tests.synthetic`, and the ImageType and Series
Description the test asks for. A source that cannot be obtained fails the test, never skips it.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.synthetic import CANARY_ACCESSION, CANARY_BIRTH, CANARY_ID, CANARY_NAME, CANARY_STUDY_PREFIX, CTSeries

__all__ = ["PATIENT_POSITIONS", "FourDCT", "Patient", "cache_dir", "dicompyler_file", "four_d_ct", "localizer",
           "real_chest_ct", "real_chest_ct_positioned", "real_ct_slice", "real_head_ct", "secondary_capture"]

#: (Patient's Name, Patient ID, Patient's Birth Date).
Patient = tuple[str, str, str]
CANARY_PATIENT: Patient = (CANARY_NAME, CANARY_ID, CANARY_BIRTH)
PYRADIOMICS = "pyradiomics==3.1.0"
DICOMPYLER = "dicompyler-core==0.5.6"
INVESALIUS_CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
#: Every file taken from a source: a changed upstream file fails the fetch instead of changing the tests.
_SHA256 = {
    "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
    "ct.0.dcm": "6eb080ed6a1f4c850706418582a0b40e6d10dc831c7f3e3fc7d7b0bdd404e542",
    "rtss.dcm": "8fe3e3a20d1acf911f5c284dc40288d46f97acd43e4a63753cd6e3e1dac398cb",
    "matrix.dat": "d87fd5e6aaf2c4fdf4f3fe28ee3335192fc2464ed8e9682fc78530cb837938da",
}
_CHEST = {"lung1": 48, "lung2": 61}  # slices each
_HEAD_SLICES = 108
_PIP_TIMEOUT_S = 600


def cache_dir() -> Path:
    """``$CONTOUR_GW_TEST_CACHE``, else ``$XDG_CACHE_HOME/contour-gateway-tests`` (``~/.cache`` by default)."""
    configured = os.environ.get("CONTOUR_GW_TEST_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "contour-gateway-tests"


# --- fetching and caching -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _machine_lock() -> Iterator[Path]:
    """One fetch at a time on this machine (parallel test runs share the cache)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root


def _cached(name: str, expected: Sequence[str], fetch: Callable[[Path], None]) -> Path:
    """The cache folder *name* holding *expected*; *fetch* fills a staging folder on the first call only."""
    with _machine_lock() as root:
        folder = root / name
        if all((folder / item).exists() for item in expected):
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            fetch(staging)
            missing = [item for item in expected if not (staging / item).exists()]
            if missing:
                pytest.fail(f"real CT source {name}: fetching left out {missing}")
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder


def _check_digest(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != _SHA256[path.name]:
        pytest.fail(f"real CT source file {path.name} has SHA-256 {digest}, expected {_SHA256[path.name]}")


def _pip_download(requirement: str, staging: Path, wanted: Sequence[str]) -> None:
    """``pip download`` the sdist of *requirement* and copy the files whose paths end with *wanted*.

    They come from the downloaded archive, or, where pip rejects the sdist after unpacking it (pyradiomics
    3.1.0), from the tree ``--no-clean`` leaves in pip's temporary folder.
    """
    project = requirement.split("==")[0]
    work = staging / "pip"
    (work / "tmp").mkdir(parents=True)
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", project,
                                 "--no-clean", "--disable-pip-version-check", "--progress-bar", "off",
                                 "--dest", str(work / "dist"), requirement], capture_output=True, text=True,
                                env={**os.environ, "TMPDIR": str(work / "tmp")}, timeout=_PIP_TIMEOUT_S,
                                check=False)
        found = {**_from_unpacked(work / "tmp", wanted), **_from_archives(work / "dist", wanted)}
        for suffix in wanted:
            if suffix not in found:
                pytest.fail(f"real CT source {requirement}: pip download (exit {result.returncode}) gave no "
                            f"{suffix}; is the package index reachable?\n{(result.stdout + result.stderr)[-3000:]}")
            target = staging / Path(suffix).name
            target.write_bytes(found[suffix])
            _check_digest(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _from_archives(dist: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    found = {}
    for archive_path in sorted(dist.glob("*.tar.gz")):
        with tarfile.open(archive_path) as archive:
            for member in archive.getmembers():
                suffix = next((s for s in wanted if member.isfile() and member.name.endswith("/" + s)), None)
                extracted = archive.extractfile(member) if suffix else None
                if suffix and extracted is not None:
                    found[suffix] = extracted.read()
    return found


def _from_unpacked(tmp: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    found = {}
    for suffix in wanted:
        hits = sorted(path for path in tmp.rglob(Path(suffix).name) if path.as_posix().endswith("/" + suffix))
        if hits:
            found[suffix] = hits[0].read_bytes()
    return found


def _pyradiomics(staging: Path) -> None:
    _pip_download(PYRADIOMICS, staging, [f"data/{name}_image.nrrd" for name in _CHEST])


def _dicompyler(staging: Path) -> None:
    _pip_download(DICOMPYLER, staging, ["tests/testdata/example_data/ct.0.dcm",
                                        "tests/testdata/example_data/rtss.dcm"])


def _cranium(staging: Path) -> None:
    """matrix.dat out of Cranium.inv3, described by a MetaImage header for plastimatch."""
    if not INVESALIUS_CRANIUM.is_file():
        pytest.fail(f"real CT source {INVESALIUS_CRANIUM} is missing: run `make test`, which installs the Debian "
                    "package invesalius-examples (and check that dpkg does not path-exclude /usr/share/doc)")
    with tarfile.open(INVESALIUS_CRANIUM) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            extracted = archive.extractfile(member) if member.isfile() and name in ("main.plist", "matrix.dat") \
                else None
            if extracted is not None:
                (staging / name).write_bytes(extracted.read())
    _check_digest(staging / "matrix.dat")
    project = plistlib.loads((staging / "main.plist").read_bytes())
    slices, rows, columns = project["matrix"]["shape"]
    dx, dy, dz = project["spacing"]
    if (project["matrix"]["dtype"], project["modality"], slices) != ("int16", "CT", _HEAD_SLICES):
        pytest.fail(f"{INVESALIUS_CRANIUM} is not the 108-slice int16 head CT this module expects")
    (staging / "cranium.mha").write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\n"
        f"Offset = {-(columns - 1) * dx / 2:.4f} {-(rows - 1) * dy / 2:.4f} 0\n"
        f"ElementSpacing = {dx} {dy} {dz}\nDimSize = {columns} {rows} {slices}\n"
        "ElementType = MET_SHORT\nElementDataFile = matrix.dat\n")


def _converted(name: str, source: Path, slices: int) -> Path:
    """*source* (NRRD or MetaImage) as a DICOM CT series by plastimatch, cached."""
    marker = "converted"

    def convert(staging: Path) -> None:
        plastimatch = shutil.which("plastimatch")
        if plastimatch is None:
            pytest.fail("test peer 'plastimatch' is missing: run `make test`, which installs it")
        result = subprocess.run([plastimatch, "convert", "--input", str(source), "--output-dicom", str(staging)],
                                capture_output=True, text=True, timeout=300, check=False)
        written = sorted(staging.glob("image*.dcm"))
        if result.returncode != 0 or len(written) != slices:
            pytest.fail(f"plastimatch could not convert {source.name} ({len(written)} of {slices} slices):\n"
                        + (result.stdout + result.stderr)[-3000:])
        (staging / marker).touch()

    return _cached(f"dicom-{name}", [marker], convert)


# --- in memory ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RealCT:
    """A real CT series in memory: slice headers sorted foot to head, and HU voxels (slices, rows, columns)."""

    headers: tuple[Dataset, ...]
    hu: np.ndarray


@functools.cache
def _load(folder: Path) -> _RealCT:
    datasets = sorted((pydicom.dcmread(path) for path in folder.glob("*.dcm")),
                      key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    for ds in datasets:
        del ds.PixelData
    return _RealCT(tuple(datasets), np.round(hu).astype(np.int16))


def _chest(source: str) -> _RealCT:
    if source not in _CHEST:
        raise ValueError(f"no chest CT {source!r}: one of {sorted(_CHEST)}")
    folder = _cached("pyradiomics-3.1.0", [f"{name}_image.nrrd" for name in _CHEST], _pyradiomics)
    return _load(_converted(source, folder / f"{source}_image.nrrd", _CHEST[source]))


def _head() -> _RealCT:
    folder = _cached("invesalius-cranium", ["matrix.dat", "cranium.mha"], _cranium)
    return _load(_converted("cranium", folder / "cranium.mha", _HEAD_SLICES))


def dicompyler_file(name: str) -> Path:
    """``ct.0.dcm`` or ``rtss.dcm`` of the dicompyler-core 0.5.6 example data (cached)."""
    if name not in ("ct.0.dcm", "rtss.dcm"):
        raise ValueError(f"no dicompyler-core example file {name!r}")
    return _cached("dicompyler-core-0.5.6", ["ct.0.dcm", "rtss.dcm"], _dicompyler) / name


def _narrowed(ct: _RealCT, slices: int | None, downsample: int) -> _RealCT:
    """The middle *slices* slices, each *downsample* x *downsample* block averaged (in-plane)."""
    if slices is not None:
        if not 1 <= slices <= len(ct.headers):
            raise ValueError(f"slices must be 1 to {len(ct.headers)}, not {slices}")
        start = (len(ct.headers) - slices) // 2
        ct = _RealCT(ct.headers[start:start + slices], ct.hu[start:start + slices])
    if downsample == 1:
        return ct
    if downsample < 1:
        raise ValueError(f"downsample must be a positive integer, not {downsample}")
    k, rows, columns = ct.hu.shape
    rows, columns = rows // downsample, columns // downsample
    blocks = ct.hu[:, :rows * downsample, :columns * downsample].astype(np.float32)
    hu = blocks.reshape(k, rows, downsample, columns, downsample).mean(axis=(2, 4))
    headers = []
    for header in ct.headers:
        ds = copy.deepcopy(header)
        row_mm, column_mm = (float(v) for v in ds.PixelSpacing)
        cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
        shift = (downsample - 1) / 2 * (cosines[:3] * column_mm + cosines[3:] * row_mm)  # to the block centre
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array([float(v) for v in ds.ImagePositionPatient]) + shift]
        ds.PixelSpacing = [f"{row_mm * downsample:.6f}", f"{column_mm * downsample:.6f}"]
        ds.Rows, ds.Columns = rows, columns
        headers.append(ds)
    return _RealCT(tuple(headers), np.round(hu).astype(np.int16))


@dataclass(frozen=True)
class _Stamp:
    """What a test chooses about a series it writes."""

    patient: Patient
    study_uid: str
    frame_uid: str
    image_type: Sequence[str]
    description: str
    series_number: int | None


def _write(folder: Path, ct: _RealCT, stamp: _Stamp) -> CTSeries:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = str(generate_uid())
    sop_uids, files = [], []
    for index, (header, hu) in enumerate(zip(ct.headers, ct.hu, strict=True)):
        ds = copy.deepcopy(header)
        sop_uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = stamp.study_uid, series_uid, stamp.frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = stamp.patient
        ds.AccessionNumber = CANARY_ACCESSION
        ds.ImageType = list(stamp.image_type)
        ds.SeriesDescription = stamp.description
        if stamp.series_number is not None:  # else as the converter wrote it (plastimatch: none, instances from 0)
            ds.SeriesNumber, ds.InstanceNumber = stamp.series_number, index + 1
        stored = (hu.astype(np.float64) - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
        _set_pixels(ds, np.round(stored).astype(np.uint16 if ds.PixelRepresentation == 0 else np.int16))
        path = folder / f"slice{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(str(sop_uid))
        files.append(path)
    return CTSeries(folder, stamp.study_uid, series_uid, sop_uids, files)


def _study_uid(study_uid: str | None) -> str:
    return study_uid or str(generate_uid(prefix=CANARY_STUDY_PREFIX + "."))


# --- what tests call ------------------------------------------------------------------------------------------


def real_chest_ct(folder: Path, *, source: str = "lung1", patient: Patient = CANARY_PATIENT,
                  study_uid: str | None = None, frame_uid: str | None = None,
                  image_type: Sequence[str] = ("DERIVED", "SECONDARY", "AXIAL"), description: str = "Thorax 5mm",
                  series_number: int | None = 1, slices: int | None = None, downsample: int = 1) -> CTSeries:
    """Write a pyradiomics chest CT (``lung1`` or ``lung2``) as plastimatch converts it, restamped.

    ``series_number=None`` keeps plastimatch's empty Series Number and its Instance Numbers (from 0);
    *slices* keeps the middle ones; *downsample* averages n x n pixel blocks (real HU, coarser grid).
    """
    ct = _narrowed(_chest(source), slices, downsample)
    stamp = _Stamp(patient, _study_uid(study_uid), frame_uid or str(generate_uid()), image_type, description,
                   series_number)
    return _write(folder, ct, stamp)


#: Image Orientation (Patient) of axial slices as a scanner writes them in each patient position: the row
#: direction, then the column direction, in LPS. Rows and columns keep the gantry's directions, so they run along
#: the patient's axes one way or the other as the patient lies.
PATIENT_POSITIONS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


def _positioned(ct: _RealCT, position: str) -> _RealCT:
    """*ct* (axial, written HFS, sorted foot to head) as a scanner writes the same anatomy with the patient in
    *position*: Patient Position, Image Orientation (Patient) and pixels mirrored to match, each slice's Image
    Position (Patient) that of its new first pixel, and the slices in acquisition order (head first: from the
    head down; feet first: from the feet up), numbered from 1. Every voxel keeps its place in the patient (LPS)."""
    if position not in PATIENT_POSITIONS:
        raise ValueError(f"no patient position {position!r}: one of {sorted(PATIENT_POSITIONS)}")
    row_dir, column_dir = (np.array(v, dtype=float) for v in PATIENT_POSITIONS[position])
    headers, pixels = [], []
    for header, hu in zip(ct.headers, ct.hu, strict=True):
        cosines = np.array([float(v) for v in header.ImageOrientationPatient])
        if not np.allclose(cosines, [1, 0, 0, 0, 1, 0], atol=1e-6):
            raise ValueError("the source must be axial slices written HFS")
        row_mm, column_mm = (float(v) for v in header.PixelSpacing)
        flip_rows, flip_columns = bool(column_dir[1] < 0), bool(row_dir[0] < 0)
        first = np.array([float(v) for v in header.ImagePositionPatient])
        first += [(int(header.Columns) - 1) * column_mm if flip_columns else 0.0,
                  (int(header.Rows) - 1) * row_mm if flip_rows else 0.0, 0.0]
        ds = copy.deepcopy(header)
        ds.PatientPosition = position
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *column_dir)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in first]
        headers.append(ds)
        pixels.append(hu[::-1 if flip_rows else 1, ::-1 if flip_columns else 1])
    if position.startswith("HF"):  # acquired from the head down
        headers, pixels = headers[::-1], pixels[::-1]
    for number, ds in enumerate(headers, start=1):
        ds.InstanceNumber = number
    return _RealCT(tuple(headers), np.ascontiguousarray(np.stack(pixels)))


def real_chest_ct_positioned(folder: Path, position: str, *, source: str = "lung1",
                             patient: Patient = CANARY_PATIENT, study_uid: str | None = None,
                             frame_uid: str | None = None, description: str = "Thorax 5mm",
                             slices: int | None = None, downsample: int = 1) -> CTSeries:
    """Write :func:`real_chest_ct`'s anatomy as scanned with the patient in *position* (``HFS``, ``FFS``, ``HFP``
    or ``FFP``): headers and pixels rewritten so that every voxel's patient (LPS) position holds the same HU.
    Files are named and numbered in acquisition order (see :data:`PATIENT_POSITIONS`)."""
    ct = _positioned(_narrowed(_chest(source), slices, downsample), position)
    stamp = _Stamp(patient, _study_uid(study_uid), frame_uid or str(generate_uid()),
                   ("ORIGINAL", "PRIMARY", "AXIAL"), description, 1)
    return _write(folder, ct, stamp)


def real_head_ct(folder: Path, *, patient: Patient = CANARY_PATIENT, study_uid: str | None = None,
                 image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"), description: str = "Head 1.5mm",
                 slices: int | None = None, downsample: int = 1) -> CTSeries:
    """Write the InVesalius head CT (108 slices of 256 x 256) as a restamped DICOM CT series."""
    ct = _narrowed(_head(), slices, downsample)
    return _write(folder, ct, _Stamp(patient, _study_uid(study_uid), str(generate_uid()), image_type, description, 1))


def real_ct_slice(folder: Path, *, patient: Patient = CANARY_PATIENT, study_uid: str | None = None) -> CTSeries:
    """Write dicompyler-core's single clinical CT slice (as shipped: Implicit VR, its own header) with new UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(dicompyler_file("ct.0.dcm"))
    study_uid, series_uid, sop_uid = _study_uid(study_uid), str(generate_uid()), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
    ds.AccessionNumber = CANARY_ACCESSION
    path = folder / "slice0000.dcm"
    ds.save_as(path, enforce_file_format=True)
    return CTSeries(folder, study_uid, series_uid, [str(sop_uid)], [path])


@dataclass(frozen=True)
class FourDCT:
    """A 4D-CT study as a scanner exports it: phase series, their average and their maximum intensity projection."""

    study_uid: str
    phases: list[CTSeries]
    average: CTSeries
    mip: CTSeries

    @property
    def series(self) -> list[CTSeries]:
        """Every series, phases first."""
        return [*self.phases, self.average, self.mip]

    @property
    def files(self) -> list[Path]:
        """Every file of the study."""
        return [path for series in self.series for path in series.files]


def four_d_ct(folder: Path, *, phases: int = 3, patient: Patient = CANARY_PATIENT, source: str = "lung1",
              slices: int | None = None, downsample: int = 2) -> FourDCT:
    """Write one real chest CT as a 4D-CT study: *phases* phase series, AVG and MIP, one study and frame.

    Phase *n* is the CT plus seeded 10 HU noise (ORIGINAL\\PRIMARY\\AXIAL, "CT 0%", "CT 30%", ...); AVG is
    their mean (DERIVED\\SECONDARY\\AXIAL\\AVERAGE) and MIP their maximum (DERIVED\\SECONDARY\\AXIAL\\MIP).
    """
    if not 1 <= phases <= 10:
        raise ValueError(f"phases must be 1 to 10, not {phases}")
    ct = _narrowed(_chest(source), slices, downsample)
    study_uid, frame_uid = _study_uid(None), str(generate_uid())
    volumes = [np.clip(ct.hu + np.random.default_rng(n).normal(0, 10, ct.hu.shape), -1024, 3071).round()
               .astype(np.int16) for n in range(phases)]
    written = []
    for n, hu in enumerate(volumes):
        percent = 10 * (n * 10 // phases)
        stamp = _Stamp(patient, study_uid, frame_uid, ("ORIGINAL", "PRIMARY", "AXIAL"), f"CT {percent}%", n + 1)
        written.append(_write(folder / f"phase{percent:02d}", _RealCT(ct.headers, hu), stamp))
    derived = {"AVG": (np.mean(volumes, axis=0).round().astype(np.int16), "AVERAGE", 100),
               "MIP": (np.max(volumes, axis=0), "MIP", 101)}
    made = {name: _write(folder / name.lower(), _RealCT(ct.headers, hu),
                         _Stamp(patient, study_uid, frame_uid, ("DERIVED", "SECONDARY", "AXIAL", value), name, number))
            for name, (hu, value, number) in derived.items()}
    return FourDCT(study_uid, written, made["AVG"], made["MIP"])


def localizer(path: Path, ct: CTSeries) -> Path:
    """Write a scout view of *ct* (CT Image Storage, ORIGINAL\\PRIMARY\\LOCALIZER) into its study: the mean
    of its real slices front to back, head at the top, as a scanner shows a topogram."""
    first = pydicom.dcmread(ct.files[0])
    hu = np.stack([pydicom.dcmread(p).pixel_array for p in ct.files]).astype(np.float32)
    projection = hu.mean(axis=1)[::-1]  # (slices, columns), head first
    ds = _derived_image(first, CTImageStorage, "Topogram", 0)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.PixelSpacing = [first.SliceThickness, first.PixelSpacing[1]]
    _set_pixels(ds, np.round(projection).astype(np.int16))
    ds.save_as(path, enforce_file_format=True)
    return path


def secondary_capture(path: Path, ct: CTSeries) -> Path:
    """Write a screen capture of *ct*'s middle slice (Secondary Capture Image Storage, 8 bit, lung window) into
    its study. It states BurnedInAnnotation NO: a secondary capture is never contoured, whatever it says."""
    middle = pydicom.dcmread(ct.files[len(ct.files) // 2])
    hu = middle.pixel_array * float(middle.RescaleSlope) + float(middle.RescaleIntercept)
    ds = _derived_image(middle, SecondaryCaptureImageStorage, "Screen capture", 900)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "SliceLocation", "RescaleIntercept", "RescaleSlope", "RescaleType", "FrameOfReferenceUID",
                    "PositionReferenceIndicator", "KVP", "WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType, ds.BurnedInAnnotation = "WSD", "NO"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    _set_pixels(ds, np.clip((hu + 1350) / 1500 * 255, 0, 255).astype(np.uint8))  # window 1500, level -600
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.add_new(0x7FE00010, "OB" if pixels.itemsize == 1 else "OW", np.ascontiguousarray(pixels).tobytes())


def _derived_image(source: Dataset, sop_class: str, description: str, series_number: int) -> Dataset:
    """A copy of *source*'s header as the one instance of a new series of its study."""
    ds = copy.deepcopy(source)
    del ds.PixelData
    sop_uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_class), sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_class, sop_uid, generate_uid()
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, series_number, 1
    return ds
