"""Predictor: pure sliding-window and orientation helpers, and real ONNX networks end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.errors import ConfigError, InferenceError
from gateway.inference.labels import LabelMasks
from gateway.inference.manifest import Label, load_model_package
from gateway.inference.orientation import axis_transform, orientation_code, oriented, unoriented
from gateway.inference.postprocess import ModelGrid, postprocess
from gateway.inference.predictor import Predictor
from gateway.inference.volume import Volume
from tests.onnx_models import bands_network, broken_network, manifest, threshold_network, valid_network

#: Voxel -> LPS axes of axial CT, per patient position: columns are the k (slice), i (row), j (column) axes.
AXES = {
    "HFS": np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float).T,
    "FFS": np.array([[0, 0, -1], [0, 1, 0], [-1, 0, 0]], dtype=float).T,
    "HFP": np.array([[0, 0, 1], [0, -1, 0], [-1, 0, 0]], dtype=float).T,
    "FFP": np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]], dtype=float).T,
}


def make_volume(position: str = "HFS", shape: tuple[int, int, int] = (40, 64, 64),
                spacing: tuple[float, float, float] = (2.5, 1.5, 1.5),
                spheres: tuple[tuple[tuple[float, float, float], float, float], ...] = (((0, 0, 0), 25.0, 500.0),),
                ) -> tuple[Volume, list[np.ndarray]]:
    """A volume of air with HU spheres ``(centre LPS mm, radius mm, HU)``; returns it and each sphere's mask."""
    affine = np.eye(4)
    affine[:3, :3] = AXES[position] * np.array(spacing)
    centre_voxel = (np.array(shape) - 1) / 2
    affine[:3, 3] = -(affine[:3, :3] @ centre_voxel)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    points = (affine[:3, :3] @ grid.T).T + affine[:3, 3]
    hu = np.full(shape, -1000, dtype=np.int16)
    masks = []
    for centre, radius, value in spheres:
        mask = (np.linalg.norm(points - np.array(centre), axis=1) <= radius).reshape(shape)
        hu[mask] = value
        masks.append(mask)
    volume = Volume(hu, affine, tuple(f"1.2.3.{k}" for k in range(shape[0])), "1.2.3", position)
    return volume, masks


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


class TestOrientation:
    @pytest.mark.parametrize(("position", "code"), [("HFS", "SPL"), ("FFS", "IPR"), ("HFP", "SAR"),
                                                    ("FFP", "IAL")])
    def test_codes(self, position: str, code: str) -> None:
        assert orientation_code(make_volume(position, shape=(12, 12, 12))[0].affine) == code

    @pytest.mark.parametrize(("source", "target"), [("SPL", "LPS"), ("IPR", "SPL"), ("SAR", "RAS"), ("IAL", "IAL")])
    def test_transform_round_trip(self, source: str, target: str) -> None:

        array = np.random.default_rng(0).integers(0, 100, (3, 4, 5))
        order, flips = axis_transform(source, target)
        moved = oriented(array, order, flips)
        np.testing.assert_array_equal(unoriented(moved, order, flips), array)


@pytest.fixture
def threshold_package(tmp_path: Path) -> Path:
    threshold_network(tmp_path / "bright" / "model.onnx")
    return manifest(tmp_path / "bright", labels=[{"value": 1, "name": "Bright", "colour": [255, 0, 0],
                                                  "keep_largest_component": True, "fill_holes": True}])


class TestPredictor:
    @pytest.mark.parametrize("position", sorted(AXES))
    def test_sphere_is_found_in_every_patient_position(self, threshold_package: Path, position: str) -> None:
        volume, (mask,) = make_volume(position)
        prediction = Predictor(load_model_package(threshold_package)).predict(volume)
        assert prediction.masks.shape == volume.shape
        assert dice(prediction.mask("Bright"), mask) >= 0.95
        assert prediction.voxels["Bright"] > 0 and not prediction.is_empty

    def test_model_spacing_equal_to_the_scan_is_exact(self, tmp_path: Path) -> None:
        threshold_network(tmp_path / "m" / "model.onnx")
        folder = manifest(tmp_path / "m", spacing=(2.5, 1.5, 1.5))
        volume, (mask,) = make_volume()
        np.testing.assert_array_equal(Predictor(load_model_package(folder)).predict(volume).mask("Bright"), mask)

    def test_softmax_classes_and_largest_component(self, tmp_path: Path) -> None:
        bands_network(tmp_path / "b" / "model.onnx", low=0.45, high=0.75)  # -100 HU and +500 HU
        folder = manifest(tmp_path / "b", kind="softmax", labels=[
            {"value": 1, "name": "Soft", "colour": [0, 0, 255], "keep_largest_component": True},
            {"value": 2, "name": "Dense", "colour": [255, 255, 0]}])
        volume, (big, small, dense) = make_volume(spheres=(((0, 0, -20), 18.0, 100.0), ((0, 20, 25), 6.0, 100.0),
                                                           ((0, -25, 25), 8.0, 900.0)))
        prediction = Predictor(load_model_package(folder)).predict(volume)
        assert dice(prediction.mask("Soft"), big) >= 0.9
        assert not prediction.mask("Soft")[small].any()  # the smaller component was dropped
        assert dice(prediction.mask("Dense"), dense) >= 0.85

    def test_holes_are_filled(self, threshold_package: Path) -> None:
        volume, (_shell, cavity) = make_volume(spheres=(((0, 0, 0), 25.0, 500.0), ((0, 0, 0), 12.0, -1000.0)))
        bright = Predictor(load_model_package(threshold_package)).predict(volume).mask("Bright")
        assert bright[cavity].mean() > 0.95

    def test_nothing_found_is_reported_empty(self, threshold_package: Path) -> None:
        volume, _ = make_volume(spheres=())
        prediction = Predictor(load_model_package(threshold_package)).predict(volume)
        assert prediction.is_empty and prediction.empty == ["Bright"]

    def test_channels_last_network_with_an_output_crop(self, tmp_path: Path) -> None:
        valid_network(tmp_path / "v" / "model.onnx", crop=3)
        folder = manifest(tmp_path / "v", spacing=(2.5, 1.5, 1.5), patch=(16, 30, 30), output_crop=[3, 3, 3],
                          layout="channels_last")
        volume, (big, edge) = make_volume(spheres=(((0, 0, 0), 25.0, 500.0), ((0, 40, 40), 6.0, 500.0)))
        found = Predictor(load_model_package(folder)).predict(volume).mask("Bright")  # edge: at the scan's border
        np.testing.assert_array_equal(found, big | edge)

    def test_logits_are_averaged_then_softmaxed(self, tmp_path: Path) -> None:
        bands_network(tmp_path / "p" / "model.onnx", low=0.45, high=0.75)
        bands_network(tmp_path / "l" / "model.onnx", low=0.45, high=0.75, logits=True)
        labels = [{"value": 1, "name": "Soft", "colour": [0, 0, 255]},
                  {"value": 2, "name": "Dense", "colour": [9, 9, 0]}]
        volume, _ = make_volume(spheres=(((0, 0, -20), 18.0, 100.0), ((0, -25, 25), 8.0, 900.0)))
        softmaxed = Predictor(load_model_package(manifest(tmp_path / "p", kind="softmax", labels=labels)))
        from_logits = Predictor(load_model_package(manifest(tmp_path / "l", kind="softmax", labels=labels,
                                                            logits=True)))
        probabilities = from_logits.probabilities(volume)
        assert probabilities.shape[0] == 3
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, rtol=1e-5)
        assert probabilities.min() >= 0
        expected, found = softmaxed.predict(volume), from_logits.predict(volume)
        for name in ("Soft", "Dense"):
            assert dice(found.mask(name), expected.mask(name)) >= 0.98

    def test_nnunet_resampling_decides_on_the_ct_grid(self, tmp_path: Path) -> None:
        bands_network(tmp_path / "l" / "model.onnx", low=0.45, high=0.75, logits=True)
        labels = [{"value": 1, "name": "Soft", "colour": [0, 0, 255]},
                  {"value": 2, "name": "Dense", "colour": [9, 9, 0]}]
        volume, (soft, dense) = make_volume(spheres=(((0, 0, -20), 18.0, 100.0), ((0, -25, 25), 8.0, 900.0)))
        soft &= ~dense
        folder = manifest(tmp_path / "l", kind="softmax", labels=labels, logits=True, resampling="nnunet")
        predictor = Predictor(load_model_package(folder))
        probabilities = predictor.probabilities(volume)
        assert probabilities.shape == (3, *volume.shape)  # SPL: the CT's own axis order
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, rtol=1e-5)
        prediction = predictor.predict(volume)  # decided from the logits channel by channel: the same argmax
        np.testing.assert_array_equal(prediction.mask("Soft"), probabilities.argmax(axis=0) == 1)
        np.testing.assert_array_equal(prediction.mask("Dense"), probabilities.argmax(axis=0) == 2)
        assert dice(prediction.mask("Soft"), soft) >= 0.9 and dice(prediction.mask("Dense"), dense) >= 0.9

    def test_median_prefilter_removes_speckle(self, tmp_path: Path) -> None:
        volume, (mask,) = make_volume()
        speckle = np.zeros(volume.shape, dtype=bool)
        speckle[5, 5, 5::9] = True
        volume.hu[speckle] = 800
        threshold_network(tmp_path / "m" / "model.onnx")
        plain = Predictor(load_model_package(manifest(tmp_path / "m", spacing=(2.5, 1.5, 1.5))))
        assert plain.predict(volume).mask("Bright")[speckle].all()
        prefilter = '{ kind = "median", size = 3, spacing_mm = [2.5, 1.5, 1.5] }'
        folder = manifest(tmp_path / "m", spacing=(2.5, 1.5, 1.5))
        (folder / "manifest.toml").write_text((folder / "manifest.toml").read_text().replace(
            "padding_hu = -1024", f"padding_hu = -1024\nprefilter = {prefilter}"))
        filtered = Predictor(load_model_package(folder)).predict(volume).mask("Bright")
        assert not filtered[speckle].any() and dice(filtered, mask) >= 0.97

    @pytest.mark.parametrize(("kind", "message"), [("nan", "NaN"), ("channels", "output shape")])
    def test_broken_models_raise(self, tmp_path: Path, kind: str, message: str) -> None:
        broken_network(tmp_path / "x" / "model.onnx", kind)
        predictor = Predictor(load_model_package(manifest(tmp_path / "x")))
        with pytest.raises(InferenceError, match=message):
            predictor.predict(make_volume(shape=(20, 32, 32))[0])


class TestManifest:
    def test_every_problem_is_listed(self, tmp_path: Path) -> None:
        folder = manifest(tmp_path / "bad", orientation="XYZ", labels=[
            {"value": 2, "name": "Name that is far too long", "colour": [255, 0, 0], "interpreted_type": "LIVER"}])
        with pytest.raises(ConfigError) as info:
            load_model_package(folder)
        text = "\n".join(info.value.problems)
        assert "model.onnx: missing" in text
        assert "input.orientation" in text
        assert "labels.0.name" in text and "labels.0.interpreted_type" in text

    def test_within_must_name_an_earlier_label_and_volume_ranges_be_ordered(self, tmp_path: Path) -> None:
        threshold_network(tmp_path / "w" / "model.onnx")
        folder = manifest(tmp_path / "w", labels=[
            {"value": 1, "name": "Bright", "colour": [1, 2, 3], "within": "Later"}])
        with pytest.raises(ConfigError, match="within must name a label listed before it"):
            load_model_package(folder)
        folder = manifest(tmp_path / "v", labels=[
            {"value": 1, "name": "Bright", "colour": [1, 2, 3], "volume_ml": [500, 50]}])
        threshold_network(tmp_path / "v" / "model.onnx")
        with pytest.raises(ConfigError, match=r"volume_ml must be \[smallest, largest\]"):
            load_model_package(folder)
        for name, exclusive in (("x", ["Absent"]), ("y", ["Bright"])):
            folder = manifest(tmp_path / name, labels=[
                {"value": 1, "name": "Bright", "colour": [1, 2, 3], "exclusive_with": exclusive}])
            threshold_network(tmp_path / name / "model.onnx")
            with pytest.raises(ConfigError, match="exclusive_with must name other labels of the model"):
                load_model_package(folder)

    def test_sigmoid_labels_must_match_channels(self, tmp_path: Path) -> None:
        threshold_network(tmp_path / "s" / "model.onnx")
        folder = manifest(tmp_path / "s", labels=[{"value": 2, "name": "Bright", "colour": [1, 2, 3]}])
        with pytest.raises(ConfigError, match=r"sigmoid labels must read channels 1\.\.N"):
            load_model_package(folder)


class TestPostprocessing:
    """The topology steps a manifest asks for, on the model grid (slice axis 0, 3 mm voxels)."""

    @staticmethod
    def _labels(**extra: object) -> list[Label]:
        body = Label(value=1, name="Body", colour=[0, 255, 0], min_component_ml=1, **extra)  # type: ignore[arg-type]
        inner = Label(value=2, name="Inner", colour=[0, 0, 255], within="Body")
        return [body, inner]

    @staticmethod
    def _grid() -> ModelGrid:
        return ModelGrid(np.diag([3.0, 3.0, 3.0, 1.0]), slice_axis=0)

    def test_components_shorter_than_half_the_longest_are_dropped(self) -> None:
        decided = np.zeros((40, 40, 40), dtype=np.uint8)
        decided[2:38, 5:20, 5:20] = 1  # the trunk: 36 slices
        decided[5:35, 25:28, 25:28] = 1  # an arm: thin, but 30 slices long
        decided[18:22, 30:38, 2:38] = 1  # a bar across the couch: bulky, 4 slices
        labels = self._labels(min_component_extent=0.5)[:1]
        out, _gaps = postprocess(LabelMasks.from_bits(decided), labels, self._grid(), "sigmoid")
        body = out.mask(1)
        assert body[20, 10, 10] and body[20, 26, 26] and not body[20, 34, 20]

    def test_keeping_the_largest_component_reports_the_gap_to_a_piece_that_continues_it(self) -> None:
        organ = Label(value=1, name="Organ", colour=[0, 0, 255], keep_largest_component=True)
        decided = np.zeros((40, 30, 30), dtype=np.uint8)
        decided[12:30, 5:20, 5:20] = 1  # the largest piece: 18 slices
        decided[2:8, 6:20, 6:20] = 1  # a piece above it (over a quarter of its size), 4 empty slices away, in line
        decided[33:36, 22:28, 22:28] = 1  # below, but beside it (not in line): gas, not the organ
        decided[31:32, 10:12, 10:12] = 1  # debris below it: too small to count
        out, gaps = postprocess(LabelMasks.from_bits(decided), [organ], self._grid(), "sigmoid")
        kept = out.mask(1)
        assert kept[12:30].any() and not kept[2:8].any() and not kept[33:].any()  # only the largest is kept
        assert gaps == {"Organ": 4 * 3.0}  # mm along the slices
        decided[2:8] = 0
        assert postprocess(LabelMasks.from_bits(decided), [organ], self._grid(), "sigmoid")[1] == {}

    def test_a_label_within_another_keeps_only_what_lies_inside_it(self) -> None:
        decided = np.zeros((10, 20, 20), dtype=np.uint8)
        decided[:, 2:10, 2:10] = 0b01  # the body
        decided[:, 4:8, 4:8] = 0b11  # an inner structure inside it ...
        decided[:, 12:18, 12:18] = 0b10  # ... and one outside it (a foam pad)
        out, _gaps = postprocess(LabelMasks.from_bits(decided), self._labels(), self._grid(), "sigmoid")
        inner = out.mask(2)
        assert inner[:, 4:8, 4:8].all() and not inner[:, 12:18, 12:18].any()
