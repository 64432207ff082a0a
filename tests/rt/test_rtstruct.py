"""RT Structure Set: dciodvfy finds no error, plastimatch rasterises it back to the masks, references hold."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from gateway.errors import StructureSetError
from gateway.inference.labels import LabelMasks
from gateway.inference.manifest import Label, ModelManifest
from gateway.inference.volume import Volume, volume_from_datasets
from gateway.rt.rtstruct import StructureSetInput, build_structure_set
from tests.conftest import load_script, require_tool
from tests.inference.test_volume import series

MANIFEST = ModelManifest.model_validate({
    "model": {"name": "phantom", "version": "1.2"},
    "input": {"orientation": "SPL", "spacing_mm": [3, 3, 3], "patch_size": [8, 8, 8],
              "normalisation": {"kind": "clip_scale", "hu_min": -1000, "hu_max": 1000}},
    "output": {"kind": "sigmoid"},
    "labels": [{"value": 1, "name": "Ring", "colour": [255, 0, 0], "interpreted_type": "ORGAN"},
               {"value": 2, "name": "Islands", "colour": [0, 255, 0], "interpreted_type": "ORGAN"},
               {"value": 3, "name": "Empty", "colour": [0, 0, 255], "interpreted_type": "ORGAN"}],
})


def _masks(volume: Volume) -> dict[str, np.ndarray]:
    k, i, j = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    ring = ((i - 30) ** 2 + (j - 31) ** 2 <= 24**2) & ((i - 30) ** 2 + (j - 31) ** 2 > 10**2) & (k >= 2) & (k <= 12)
    islands = (((i - 10) ** 2 + (j - 10) ** 2 <= 7**2) | ((i - 50) ** 2 + (j - 52) ** 2 <= 9**2)) & (k >= 4) & (k <= 10)
    return {"Ring": ring, "Islands": islands, "Empty": np.zeros(volume.shape, dtype=bool)}


def _build(position: str, holes: str = "separate") -> tuple[list[Dataset], Volume, dict[str, np.ndarray], Dataset]:
    slices = series(position, count=15)  # odd slice count, 0.8 x 0.7 mm pixels
    for ds in slices:
        ds.Rows = ds.Columns = 64
        ds.PixelData = np.zeros((64, 64), dtype=np.int16).tobytes()
    volume = volume_from_datasets(slices)
    masks = _masks(volume)
    source = StructureSetInput(volume, slices, masks, MANIFEST, holes=holes)  # type: ignore[arg-type]
    return slices, volume, masks, build_structure_set(source)


def _read_mha(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    header = dict(line.split(" = ", 1) for line in raw[:end].decode().splitlines())
    size = [int(v) for v in header["DimSize"].split()]
    data = np.frombuffer(raw[end:], dtype=np.uint8).reshape(size[2], size[1], size[0])
    direction = np.array([float(v) for v in header["TransformMatrix"].split()]).reshape(3, 3).T
    return (data > 0, np.array([float(v) for v in header["Offset"].split()]),
            np.array([float(v) for v in header["ElementSpacing"].split()]), direction)


def _on_our_grid(path: Path, volume: Volume) -> np.ndarray:
    """plastimatch's mask mapped voxel by voxel (nearest) onto the volume grid."""
    data, offset, spacing, direction = _read_mha(path)
    z, y, x = np.nonzero(data)
    points = offset + (direction @ (np.column_stack([x, y, z]) * spacing).T).T
    voxels = np.linalg.solve(volume.affine[:3, :3], (points - volume.affine[:3, 3]).T).T
    index = np.round(voxels).astype(int)
    inside = np.all((index >= 0) & (index < np.array(volume.shape)), axis=1)
    out = np.zeros(volume.shape, dtype=bool)
    out[tuple(index[inside].T)] = True
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP"])
def test_plastimatch_rasterises_it_back_to_the_masks(position: str, tmp_path: Path) -> None:
    # plastimatch fills every contour on its own (no XOR of inner contours), so holes are keyholed here.
    slices, volume, masks, rtstruct = _build(position, holes="keyhole")
    ct_dir = tmp_path / "ct"
    ct_dir.mkdir()
    for index, ds in enumerate(slices):
        ds.save_as(ct_dir / f"ct{index:03d}.dcm", enforce_file_format=True)
    rtstruct.save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    plastimatch = require_tool("plastimatch")
    subprocess.run([plastimatch, "convert", "--input", str(ct_dir), "--output-img", str(tmp_path / "ct.mha")],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([plastimatch, "convert", "--input", str(tmp_path / "rs.dcm"), "--referenced-ct", str(ct_dir),
                    "--fixed", str(tmp_path / "ct.mha"), "--output-prefix", str(tmp_path / "out"),
                    "--prefix-format", "mha"], check=True, capture_output=True, timeout=120)
    for name in ("Ring", "Islands"):
        assert dice(_on_our_grid(tmp_path / "out" / f"{name}.mha", volume), masks[name]) >= 0.98, name
    assert not (tmp_path / "out" / "Empty.mha").exists()


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP"])
def test_dciodvfy_finds_no_error(position: str, tmp_path: Path) -> None:
    *_, rtstruct = _build(position)
    rtstruct.save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    result = subprocess.run([require_tool("dciodvfy"), str(tmp_path / "rs.dcm")], capture_output=True, text=True,
                            timeout=60)
    report = result.stdout + result.stderr
    assert "Error" not in report, report
    # Accepted warnings: the synthetic CT has no Study Time / Study ID (a real CT's are copied).
    unexpected = [line for line in report.splitlines() if line.startswith("Warning")
                  and "needed to build DICOMDIR" not in line]
    assert unexpected == []


def test_references_content_and_encoding(tmp_path: Path) -> None:
    slices, volume, _, rtstruct = _build("HFS")
    rtstruct.save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(tmp_path / "rs.dcm")
    ct_uids = {str(s.SOPInstanceUID) for s in slices}
    z_by_uid = {str(s.SOPInstanceUID): str(s.ImagePositionPatient[2]) for s in slices}
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == ds.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
    images = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert [str(i.ReferencedSOPInstanceUID) for i in images] == list(volume.sop_instance_uids)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Ring", "Islands"]  # the empty one is left out
    assert ds.ApprovalStatus == "UNAPPROVED"
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    holes = 0
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            uid = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            assert uid in ct_uids
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert contour.NumberOfContourPoints >= 3
            assert len(contour.ContourData) == 3 * contour.NumberOfContourPoints
            assert {str(v) for v in contour.ContourData[2::3]} == {z_by_uid[uid]}
            holes += roi.ReferencedROINumber == 1
    assert holes > 0
    raw = (tmp_path / "rs.dcm").read_bytes()
    for element in ds.iterall():
        if element.VR == "DS":
            values = element.value if isinstance(element.value, list | pydicom.multival.MultiValue) else [element.value]
            assert all(len(str(v)) <= 16 for v in values)
    assert b"AUTOMATIC" in raw


def test_nothing_to_write_is_an_error() -> None:
    slices, volume, masks, _ = _build("HFS")
    empty = {name: np.zeros_like(mask) for name, mask in masks.items()}
    with pytest.raises(StructureSetError, match="every structure is empty"):
        build_structure_set(StructureSetInput(volume, slices, empty, MANIFEST))


def test_site_template_names_orders_colours_and_keeps_empty_structures(tmp_path: Path) -> None:
    from gateway.config import StructureTemplate

    slices, volume, masks, _ = _build("HFS")
    template = {
        "Ring": StructureTemplate(name="Ring_Site", colour=[1, 2, 3], order=2),
        "Islands": StructureTemplate(order=1, interpreted_type="AVOIDANCE"),
        "Empty": StructureTemplate(name="Empty_Kept", write_if_empty=True),
    }
    ds = build_structure_set(StructureSetInput(volume, slices, masks, MANIFEST, template=template))
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Islands", "Ring_Site", "Empty_Kept"]
    assert [int(r.ROINumber) for r in ds.StructureSetROISequence] == [1, 2, 3]
    assert list(ds.ROIContourSequence[1].ROIDisplayColor) == [1, 2, 3]
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "AVOIDANCE"
    assert "ContourSequence" not in ds.ROIContourSequence[2]
    ds.save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    report = subprocess.run([require_tool("dciodvfy"), str(tmp_path / "rs.dcm")], capture_output=True, text=True,
                            timeout=60)
    assert "Error" not in report.stdout + report.stderr


def test_templates_must_name_labels_of_the_model(tmp_path: Path) -> None:
    from gateway.config import parse_config
    from gateway.errors import ConfigError
    from gateway.inference.model_cache import check_route_models
    from tests.conftest import REPO

    config = parse_config({
        "destinations": [{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 104}],
        "routes": [{"name": "ct", "model": "default", "destinations": ["tps"],
                    "structures": {"Liver": {"name": "LIVER"}, "External": {"interpreted_type": "BODY"}}}]})
    with pytest.raises(ConfigError) as info:
        check_route_models(REPO / "models", config.routes)
    assert "routes[0].structures: 'Liver' is not a label of model 'default'" in info.value.problems
    assert any("External.interpreted_type" in p for p in info.value.problems)


def test_dicom_segmentation_twin(tmp_path: Path) -> None:
    import highdicom as hd

    from gateway.rt.seg import build_segmentation

    slices, volume, masks, _ = _build("FFS")
    seg = build_segmentation(StructureSetInput(volume, slices, masks, MANIFEST))
    seg.save_as(tmp_path / "seg.dcm")
    report = subprocess.run([require_tool("dciodvfy"), str(tmp_path / "seg.dcm")], capture_output=True, text=True,
                            timeout=60)
    assert "Error" not in report.stdout + report.stderr
    read = hd.seg.segread(tmp_path / "seg.dcm")
    assert [item.SegmentLabel for item in read.SegmentSequence] == ["Ring", "Islands"]
    pixels = read.get_pixels_by_source_instance(list(volume.sop_instance_uids), segment_numbers=[1, 2],
                                                ignore_spatial_locations=True)
    np.testing.assert_array_equal(pixels[..., 0] > 0, masks["Ring"])
    np.testing.assert_array_equal(pixels[..., 1] > 0, masks["Islands"])
    assert read.FrameOfReferenceUID == slices[0].FrameOfReferenceUID


def test_a_structure_set_of_117_totalsegmentator_structures_passes_dciodvfy(tmp_path: Path) -> None:
    """Every class of TotalSegmentator's total task under its TG-263 name and colour, each a small block of a
    one-byte class map read one structure at a time: 117 ROIs, each contoured, and dciodvfy finds no error."""
    entries = list(load_script("totalseg_names").names_for("total").values())
    manifest = MANIFEST.model_copy(update={"labels": [
        Label.model_validate({"value": value, "name": entry.tg263, "colour": list(entry.colour),
                              "interpreted_type": entry.interpreted_type})
        for value, entry in enumerate(entries, start=1)]})
    slices = series("HFS", count=15)
    for ds in slices:
        ds.Rows = ds.Columns = 64
        ds.PixelData = np.zeros((64, 64), dtype=np.int16).tobytes()
    volume = volume_from_datasets(slices)
    classes = np.zeros(volume.shape, dtype=np.uint8)
    for value in range(1, len(entries) + 1):  # 5 x 5 pixel blocks, 12 a row, on slices 2-4, 6-8 ...
        row, column, layer = (value - 1) // 12 % 12, (value - 1) % 12, (value - 1) // 144
        classes[2 + 4 * layer:5 + 4 * layer, 2 + 5 * row:5 + 5 * row, 2 + 5 * column:5 + 5 * column] = value
    masks = LabelMasks.from_classes(classes, len(entries)).named({e.tg263: v for v, e in enumerate(entries, 1)})
    rtstruct = build_structure_set(StructureSetInput(volume, slices, masks, manifest))  # type: ignore[arg-type]
    names = [str(roi.ROIName) for roi in rtstruct.StructureSetROISequence]
    assert names == [entry.tg263 for entry in entries] and len(set(names)) == 117
    assert all(len(item.ContourSequence) == 3 for item in rtstruct.ROIContourSequence)
    assert [list(item.ROIDisplayColor) for item in rtstruct.ROIContourSequence] == [list(e.colour) for e in entries]
    rtstruct.save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    result = subprocess.run([require_tool("dciodvfy"), str(tmp_path / "rs.dcm")], capture_output=True, text=True,
                            timeout=60)
    report = result.stdout + result.stderr
    assert "Error" not in report, report


def test_overlapping_segments_are_written_as_a_stack(tmp_path: Path) -> None:
    """Segments that never overlap go as one label map; an External around the lungs needs a plane each."""
    import highdicom as hd

    from gateway.rt.seg import build_segmentation

    slices, volume, masks, _ = _build("HFS")
    masks = {**masks, "Islands": masks["Islands"] | masks["Ring"]}  # now encloses the ring, as an External would
    seg = build_segmentation(StructureSetInput(volume, slices, masks, MANIFEST))
    seg.save_as(tmp_path / "seg.dcm")
    read = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = read.get_pixels_by_source_instance(list(volume.sop_instance_uids), segment_numbers=[1, 2],
                                                ignore_spatial_locations=True)
    np.testing.assert_array_equal(pixels[..., 0] > 0, masks["Ring"])
    np.testing.assert_array_equal(pixels[..., 1] > 0, masks["Islands"])
