"""CT series -> HU volume and its voxel-to-patient geometry; series we cannot contour are rejected.

Slices are ordered by their position along the slice normal (never by Instance Number),
rescaled to Hounsfield units slice by slice, and described by an affine from voxel
indices ``(k, i, j)`` = (slice, row, column) to patient coordinates (LPS, mm), built from
Image Position/Orientation (Patient) and Pixel Spacing (PS3.3 C.7.6.2.1.1). Patient
position (HFS, FFS, HFP, FFP, ...) needs no special case: the geometry is in the
orientation and positions themselves.

A series is rejected, with a reason code, rather than guessed at: too few slices, no or
several frames of reference, differing orientations or pixel grids, gantry tilt,
duplicate or missing slices and non-uniform spacing beyond a tolerance; and, before any
pixel is decoded, more voxels than ``max_voxels`` or a pixel spacing or slice gap outside
its plausible range (``[limits]`` in the configuration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from gateway.errors import VolumeError
from gateway.limits import Limits

__all__ = ["Volume", "VolumeLimits", "volume_from_datasets"]


_DEFAULT = Limits()


@dataclass(frozen=True)
class VolumeLimits:
    """What a series must satisfy to become a volume."""

    min_slices: int = 10
    #: Most voxels (slices x rows x columns) of a volume, and of its resampling to a model's grid.
    max_voxels: int = _DEFAULT.max_series_voxels
    #: Plausible pixel spacing (mm), smallest and largest.
    pixel_spacing_mm: tuple[float, float] = _DEFAULT.pixel_spacing_mm
    #: Plausible distance between slices (mm), smallest and largest.
    slice_spacing_mm: tuple[float, float] = _DEFAULT.slice_spacing_mm
    #: Largest deviation of any slice gap from the median gap, as a fraction of it.
    spacing_tolerance: float = 0.05
    #: Largest difference between direction cosines still called "the same orientation".
    orientation_tolerance: float = 1e-4
    #: Largest in-plane drift of consecutive slice positions (mm) still called "no tilt".
    tilt_tolerance_mm: float = 0.01

    @classmethod
    def from_config(cls, limits: Limits) -> VolumeLimits:
        """The size and geometry limits of the configuration's ``[limits]``; the tolerances as by default."""
        return cls(max_voxels=limits.max_series_voxels, pixel_spacing_mm=limits.pixel_spacing_mm,
                   slice_spacing_mm=limits.slice_spacing_mm)


@dataclass(frozen=True)
class Volume:
    """HU voxels ``(slices, rows, columns)`` with their geometry and the slices they came from."""

    hu: np.ndarray
    affine: np.ndarray  # 4x4, voxel (k, i, j, 1) -> patient LPS mm
    sop_instance_uids: tuple[str, ...]  # one per slice, in volume order
    frame_of_reference_uid: str
    patient_position: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column)."""
        k, i, j = (float(np.linalg.norm(self.affine[:3, axis])) for axis in range(3))
        return k, i, j

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        slices, rows, columns = self.hu.shape
        return int(slices), int(rows), int(columns)

    def to_patient(self, voxels: np.ndarray) -> np.ndarray:
        """Patient coordinates (N, 3) of voxel indices (N, 3) ``(k, i, j)``."""
        homogeneous = np.column_stack([np.asarray(voxels, dtype=float), np.ones(len(voxels))])
        patient: np.ndarray = (self.affine @ homogeneous.T).T[:, :3]
        return patient


def volume_from_datasets(datasets: Sequence[Dataset], limits: VolumeLimits = VolumeLimits()) -> Volume:
    """Build the :class:`Volume` of one CT series.

    Every check runs before a pixel is decoded or the voxel array allocated.

    Raises
    ------
    VolumeError
        With a reason code when the series cannot be contoured safely: ``too_few_slices``,
        ``no_pixel_grid``, ``series_too_large``, ``implausible_pixel_spacing``,
        ``implausible_slice_spacing`` and those of the geometry checks.
    """
    if len(datasets) < limits.min_slices:
        raise VolumeError("too_few_slices", f"{len(datasets)} slices, at least {limits.min_slices} needed")
    frame = _frame_of_reference(datasets)
    row_dir, col_dir = _orientation(datasets, limits)
    normal = np.cross(row_dir, col_dir)
    row_spacing, column_spacing = _check_pixel_grid(datasets, limits)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    gap = _slice_gap(positions, normal, limits)
    affine = np.eye(4)
    affine[:3, 0] = normal * gap
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = row_dir * column_spacing
    affine[:3, 3] = positions[0]
    ordered = [datasets[index] for index in order]
    return Volume(
        hu=_hounsfield(ordered),
        affine=affine,
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in ordered),
        frame_of_reference_uid=frame,
        patient_position=str(datasets[0].get("PatientPosition", "")),
    )


def _frame_of_reference(datasets: Sequence[Dataset]) -> str:
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if "" in frames:
        raise VolumeError("no_frame_of_reference", "a slice has no Frame of Reference UID")
    if len(frames) > 1:
        raise VolumeError("several_frames_of_reference", f"{len(frames)} frames of reference in one series")
    return frames.pop()


def _orientation(datasets: Sequence[Dataset], limits: VolumeLimits) -> tuple[np.ndarray, np.ndarray]:
    try:
        orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
        [float(v) for ds in datasets for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        raise VolumeError("no_geometry", "a slice lacks Image Orientation or Position (Patient)") from None
    if orientations.shape[1] != 6 or np.ptp(orientations, axis=0).max() > limits.orientation_tolerance:
        raise VolumeError("mixed_orientations", "slices of the series have different orientations")
    row_dir, col_dir = orientations[0, :3], orientations[0, 3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 \
            or abs(row_dir @ col_dir) > 1e-3:
        raise VolumeError("invalid_orientation", "orientation vectors are not orthonormal")
    return row_dir, col_dir


def _check_pixel_grid(datasets: Sequence[Dataset], limits: VolumeLimits) -> tuple[float, float]:
    """The (row, column) pixel spacing, once rows, columns and spacing agree, fit the limits and are plausible."""
    try:
        grids = {(int(ds.Rows), int(ds.Columns), tuple(round(float(v), 6) for v in ds.PixelSpacing))
                 for ds in datasets}
    except (AttributeError, TypeError, ValueError):
        raise VolumeError("no_pixel_grid", "a slice lacks Rows, Columns or Pixel Spacing") from None
    if len(grids) > 1:
        raise VolumeError("inconsistent_pixel_grid", "slices differ in rows, columns or pixel spacing")
    rows, columns, _ = grids.pop()
    if len(datasets) * rows * columns > limits.max_voxels:
        raise VolumeError("series_too_large", f"{len(datasets)} x {rows} x {columns} voxels, at most "
                                              f"{limits.max_voxels}")
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    low, high = limits.pixel_spacing_mm
    if len(spacing) != 2 or not all(low <= value <= high for value in spacing):
        raise VolumeError("implausible_pixel_spacing", f"pixel spacing {spacing} mm, not within {low}-{high} mm")
    return spacing[0], spacing[1]


def _slice_gap(positions: np.ndarray, normal: np.ndarray, limits: VolumeLimits) -> float:
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if np.any(along <= 1e-6):
        raise VolumeError("duplicate_slices", "two slices share a position")
    drift = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    if drift.max() > limits.tilt_tolerance_mm:
        raise VolumeError("gantry_tilt", f"slice positions drift {drift.max():.2f} mm off the slice normal")
    gap = float(np.median(along))
    low, high = limits.slice_spacing_mm
    if not low <= gap <= high:
        raise VolumeError("implausible_slice_spacing", f"slices {gap:.3f} mm apart, not within {low}-{high} mm")
    worst = float(np.abs(along - gap).max())
    if worst > limits.spacing_tolerance * gap:
        reason = "missing_slices" if along.max() > 1.5 * gap else "non_uniform_spacing"
        raise VolumeError(reason, f"slice gaps from {along.min():.3f} to {along.max():.3f} mm (median {gap:.3f})")
    return gap


def _hounsfield(datasets: Sequence[Dataset]) -> np.ndarray:
    slopes = [float(ds.get("RescaleSlope", 1.0)) for ds in datasets]
    intercepts = [float(ds.get("RescaleIntercept", 0.0)) for ds in datasets]
    integral = all(s == 1.0 for s in slopes) and all(i.is_integer() for i in intercepts)
    dtype = np.int16 if integral else np.float32
    first = datasets[0]
    hu = np.empty((len(datasets), int(first.Rows), int(first.Columns)), dtype=dtype)
    for index, (ds, slope, intercept) in enumerate(zip(datasets, slopes, intercepts, strict=True)):
        pixels = ds.pixel_array
        if integral:
            hu[index] = np.clip(pixels.astype(np.int32) + int(intercept), -32768, 32767)
        else:
            hu[index] = pixels.astype(np.float32) * slope + intercept
    return hu
