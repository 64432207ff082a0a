"""CT series -> volume: ordering, HU, geometry in every patient position, and every rejection."""

from __future__ import annotations

import random

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from gateway.errors import VolumeError
from gateway.inference.volume import VolumeLimits, volume_from_datasets
from tests.synthetic import ct_slice

#: Image Orientation (Patient) of axial slices per patient position (PS3.3 C.7.6.2.1.1).
ORIENTATIONS = {
    "HFS": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    "FFS": [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    "HFP": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0],
    "FFP": [1.0, 0.0, 0.0, 0.0, -1.0, 0.0],
}
SIZE, GAP, SPACING = 16, 2.5, (0.8, 0.7)  # rows/columns, slice gap, (row, column) pixel spacing


def series(position: str = "HFS", count: int = 12, *, gaps: list[float] | None = None,
           origin: tuple[float, float, float] = (-50.0, 30.0, 100.0)) -> list[Dataset]:
    """Axial slices stacked along the slice normal, Instance Numbers shuffled, list shuffled."""
    orientation = np.array(ORIENTATIONS[position])
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = np.concatenate([[0.0], np.cumsum(gaps if gaps is not None else [GAP] * (count - 1))])
    rng = np.random.default_rng(3)
    numbers = list(range(1, len(offsets) + 1))
    random.Random(1).shuffle(numbers)
    out = []
    for index, offset in enumerate(offsets):
        ds = ct_slice("1.2.3", "1.2.3.4", "1.2.3.5", index, SIZE, rng)
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = list(np.array(origin) + offset * normal)
        ds.PixelSpacing = list(SPACING)
        ds.PatientPosition, ds.InstanceNumber = position, numbers[index]
        out.append(ds)
    random.Random(2).shuffle(out)
    return out


def patient_point(ds: Dataset, row: int, column: int) -> np.ndarray:
    """PS3.3 C.7.6.2.1.1, written out independently of the code under test."""
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    return (np.array([float(v) for v in ds.ImagePositionPatient])
            + column * SPACING[1] * orientation[:3] + row * SPACING[0] * orientation[3:])


@pytest.mark.parametrize("position", sorted(ORIENTATIONS))
def test_geometry_matches_the_standard_in_every_patient_position(position: str) -> None:
    slices = series(position)
    marked = slices[5]
    pixels = marked.pixel_array.copy()
    pixels[3, 11] = 4000  # a marker at row 3, column 11 of one slice
    marked.PixelData = pixels.tobytes()
    volume = volume_from_datasets(slices)
    voxel = np.unravel_index(int(np.argmax(volume.hu)), volume.shape)
    np.testing.assert_allclose(volume.to_patient(np.array([voxel]))[0], patient_point(marked, 3, 11), atol=1e-6)
    assert volume.sop_instance_uids[voxel[0]] == marked.SOPInstanceUID
    assert volume.spacing == pytest.approx((GAP, SPACING[0], SPACING[1]))
    assert volume.patient_position == position


def test_slices_are_ordered_by_position_not_instance_number() -> None:
    slices = series()
    volume = volume_from_datasets(slices)
    normal = np.cross(ORIENTATIONS["HFS"][:3], ORIENTATIONS["HFS"][3:])
    by_position = sorted(slices, key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    assert volume.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in by_position)
    assert [ds.InstanceNumber for ds in by_position] != sorted(ds.InstanceNumber for ds in slices)


def test_hounsfield_units_use_each_slices_rescale() -> None:
    slices = series(count=10)
    for ds in slices:
        ds.RescaleIntercept = -1000.0
    integral = volume_from_datasets(slices)
    assert integral.hu.dtype == np.int16
    slices[0].RescaleSlope, slices[0].RescaleIntercept = 2.0, -1024.0
    scaled = volume_from_datasets(slices)
    assert scaled.hu.dtype == np.float32
    index = scaled.sop_instance_uids.index(str(slices[0].SOPInstanceUID))
    np.testing.assert_allclose(scaled.hu[index], slices[0].pixel_array * 2.0 - 1024.0)
    other = scaled.sop_instance_uids.index(str(slices[1].SOPInstanceUID))
    np.testing.assert_array_equal(scaled.hu[other], slices[1].pixel_array.astype(np.float32) - 1000.0)


def test_compressed_slices_decode_to_the_same_volume() -> None:
    slices = series(count=10)
    plain = volume_from_datasets(slices)
    for ds in slices:
        ds.compress(RLELossless, generate_instance_uid=False)
    np.testing.assert_array_equal(volume_from_datasets(slices).hu, plain.hu)


def _reason(slices: list[Dataset], limits: VolumeLimits | None = None) -> str:
    with pytest.raises(VolumeError) as info:
        volume_from_datasets(slices, limits or VolumeLimits())
    return info.value.reason


class TestRejections:
    def test_too_few_slices(self) -> None:
        assert _reason(series(count=5)) == "too_few_slices"
        assert volume_from_datasets(series(count=5), VolumeLimits(min_slices=5)).shape[0] == 5

    def test_mixed_orientations(self) -> None:
        slices = series()
        slices[3].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.8, 0.6]
        assert _reason(slices) == "mixed_orientations"

    def test_gantry_tilt(self) -> None:
        slices = series()
        tilted = np.tan(np.radians(15)) * GAP
        for ds in slices:
            z = float(ds.ImagePositionPatient[2])
            y = round(30.0 + (z - 100.0) / GAP * tilted, 4)
            ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), y, z]
        assert _reason(slices) == "gantry_tilt"

    def test_missing_slice(self) -> None:
        assert _reason(series(gaps=[GAP] * 5 + [2 * GAP] + [GAP] * 5)) == "missing_slices"

    def test_non_uniform_spacing(self) -> None:
        assert _reason(series(gaps=[GAP, GAP * 1.2] * 6)) == "non_uniform_spacing"
        assert volume_from_datasets(series(gaps=[GAP, GAP * 1.01] * 6)).shape[0] == 13

    def test_duplicate_slices(self) -> None:
        slices = series()
        slices[4].ImagePositionPatient = list(slices[5].ImagePositionPatient)
        assert _reason(slices) == "duplicate_slices"

    def test_several_frames_of_reference(self) -> None:
        slices = series()
        slices[2].FrameOfReferenceUID = "1.2.3.999"
        assert _reason(slices) == "several_frames_of_reference"

    def test_no_frame_of_reference(self) -> None:
        slices = series()
        del slices[2].FrameOfReferenceUID
        assert _reason(slices) == "no_frame_of_reference"

    def test_inconsistent_pixel_grid(self) -> None:
        slices = series()
        slices[1].PixelSpacing = [0.9, 0.9]
        assert _reason(slices) == "inconsistent_pixel_grid"

    def test_no_geometry(self) -> None:
        slices = series()
        del slices[0].ImagePositionPatient
        assert _reason(slices) == "no_geometry"

    def test_message_names_the_reason_and_no_patient_data(self) -> None:
        slices = series()
        for ds in slices:
            ds.PatientName = "CANARY^VOLUME"
        slices[2].FrameOfReferenceUID = "1.2.3.999"
        with pytest.raises(VolumeError) as info:
            volume_from_datasets(slices)
        assert str(info.value).startswith("several_frames_of_reference:")
        assert "CANARY" not in str(info.value) and "1.2.3.999" not in str(info.value)


def test_a_real_encoded_round_trip_keeps_geometry(tmp_path: pytest.TempPathFactory) -> None:
    slices = series("FFS")
    read_back = []
    for index, ds in enumerate(slices):
        path = f"{tmp_path}/s{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        read_back.append(pydicom.dcmread(path))
    np.testing.assert_allclose(volume_from_datasets(read_back).affine, volume_from_datasets(slices).affine)
