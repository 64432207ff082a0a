"""Label masks for many structures: up to 256 labels per model and per route, overlapping, in bounded memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import ConfigError, InferenceError
from gateway.inference.ensemble import decode_masks, encode_masks, merge_predictions
from gateway.inference.labels import MAX_LABELS, LabelMasks
from gateway.inference.manifest import Label, load_model_package
from gateway.inference.model_cache import combine_manifests
from gateway.inference.postprocess import ModelGrid, postprocess
from gateway.inference.predictor import Prediction, Predictor
from gateway.inference.volume import Volume
from tests.onnx_models import levels_network, manifest, steps_network

SHAPE = (6, 60, 60)  # slices of 12 x 10 blocks of 5 x 6 voxels: 120 blocks


def block_levels() -> np.ndarray:
    """Each voxel's block number, 0..119 (block b: rows 5 (b // 10) on, columns 6 (b % 10) on)."""
    rows, columns = np.meshgrid(np.arange(SHAPE[1]) // 5, np.arange(SHAPE[2]) // 6, indexing="ij")
    return np.broadcast_to(rows * 10 + columns, SHAPE)


def volume_of(levels: np.ndarray, steps: int) -> Volume:
    """A CT whose HU maps level l to l / steps after clipping -1000..1000 to 0..1 (the test manifests' scaling)."""
    hu = (-1000 + 2000 * np.minimum(levels, steps) / steps).astype(np.int16)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])[[2, 1, 0, 3]]  # axial: k along z, i along y, j along x; 2 mm voxels
    return Volume(hu.copy(), affine, tuple(map(str, range(SHAPE[0]))), "1.2.3", "HFS")


def labels(count: int, **extra: object) -> list[dict[str, object]]:
    return [{"value": v, "name": f"Organ_{v:03d}", "colour": [v % 256, 0, 0], **extra} for v in range(1, count + 1)]


class TestLabelMasks:
    def test_eight_overlapping_labels_take_one_byte_a_voxel_as_before(self) -> None:
        masks = LabelMasks.empty((4, 5, 6), 8)
        for value in range(1, 9):
            masks.add(value, np.ones((4, 5, 6), dtype=bool))  # every label everywhere
        assert masks.form == "bits" and masks.nbytes == 4 * 5 * 6
        assert all(masks.mask(value).all() for value in range(1, 9))

    def test_disjoint_labels_are_one_class_map_and_nested_ones_a_few_layers(self) -> None:
        levels = block_levels()[0]
        masks = LabelMasks.empty(levels.shape, 256)
        for value in range(1, 120):
            masks.add(value, levels == value)
        assert masks.form == "classes" and masks.nbytes == levels.size * 2  # uint16: values above 255 allowed
        masks.add(200, levels >= 1)  # an External around them all: a second layer
        assert masks.form == "classes" and masks.nbytes == levels.size * 4
        assert all((masks.mask(value) == (levels == value)).all() for value in range(1, 120))
        assert (masks.mask(200) == (levels >= 1)).all() and masks.counts()[200] == int((levels >= 1).sum())

    def test_old_bit_fields_read_back(self) -> None:
        bits = np.array([[1 << 31 | 1, 1 << 8]], dtype=np.uint32)
        masks = LabelMasks.from_bits(bits)
        assert masks.mask(32).tolist() == [[True, False]] and masks.mask(9).tolist() == [[False, True]]
        assert masks.mask(1).tolist() == [[True, False]] and not masks.mask(2).any()


class TestManyLabelsEndToEnd:
    @pytest.mark.parametrize("resampling", ["linear", "nnunet"])
    def test_117_softmax_classes_each_found_where_it_wins(self, tmp_path: Path, resampling: str) -> None:
        levels_network(tmp_path / "m" / "model.onnx", [c / 117 for c in range(118)])
        folder = manifest(tmp_path / "m", kind="softmax", labels=labels(117), logits=True, spacing=(2.0, 2.0, 2.0),
                          patch=(8, 32, 32), resampling=resampling)
        levels = np.minimum(block_levels(), 117)  # blocks 117-119: class 117
        prediction = Predictor(load_model_package(folder)).predict(volume_of(levels, 117))
        assert prediction.masks.form == "classes" and prediction.masks.nbytes == levels.size  # one uint8 map
        for value in range(1, 118):
            np.testing.assert_array_equal(prediction.mask(f"Organ_{value:03d}"), levels == value)
            assert prediction.voxels[f"Organ_{value:03d}"] == 5 * 6 * SHAPE[0] * (3 if value == 117 else 1)

    def test_40_overlapping_sigmoid_labels(self, tmp_path: Path) -> None:
        steps_network(tmp_path / "s" / "model.onnx", [(c - 0.5) / 40 for c in range(1, 41)])
        folder = manifest(tmp_path / "s", labels=labels(40, keep_largest_component=True), spacing=(2.0, 2.0, 2.0),
                          patch=(8, 32, 32))
        levels = block_levels() % 41  # level l is inside labels 1..l
        prediction = Predictor(load_model_package(folder)).predict(volume_of(levels, 40))
        assert prediction.masks.nbytes <= levels.size * 5  # never more than a bit per label
        for value in range(1, 41):
            expected = levels >= value
            if value > 1:  # several pieces (blocks l >= value in each run of 41 blocks): the largest only
                assert prediction.mask(f"Organ_{value:03d}").sum() <= expected.sum()
                assert not (prediction.mask(f"Organ_{value:03d}") & ~expected).any()
            else:
                np.testing.assert_array_equal(prediction.mask("Organ_001"), expected)


class TestPostprocessManyLabels:
    def test_largest_component_kept_per_label_for_60_labels(self) -> None:
        decided = np.zeros((4, 40, 60), dtype=np.uint8)
        for value in range(1, 61):
            row, column = divmod(value - 1, 10)
            decided[:, 6 * row:6 * row + 4, 6 * column:6 * column + 4] = value  # the large piece
            decided[0, 6 * row + 5, 6 * column] = value  # debris
        specs = [Label(value=v, name=f"L{v}", colour=[0, 0, 0], keep_largest_component=True) for v in range(1, 61)]
        out, _gaps = postprocess(LabelMasks.from_classes(decided, 60), specs, ModelGrid(np.eye(4), 0), "softmax")
        for value in range(1, 61):
            row, column = divmod(value - 1, 10)
            expected = np.zeros(decided.shape, dtype=bool)
            expected[:, 6 * row:6 * row + 4, 6 * column:6 * column + 4] = True
            np.testing.assert_array_equal(out.mask(value), expected)


def many(count: int, prefix: str, shape: tuple[int, int, int] = (2, 3, 50)) -> Prediction:
    """A prediction of *count* labels, label v in column v % 50 of slice v // 50 % 2 (and all of row 2)."""
    masks = LabelMasks.empty(shape, count)
    values = {f"{prefix}{v}": v for v in range(1, count + 1)}
    for value in values.values():
        mask = np.zeros(shape, dtype=bool)
        mask[value // 50 % 2, 0, value % 50] = True
        mask[:, 2] = True
        masks.add(value, mask)
    return Prediction(masks, values, {name: 101 for name in values}, 1.0)


class TestMergeAndStorage:
    def test_a_route_of_256_labels_merges_and_300_is_refused(self) -> None:
        with pytest.raises(InferenceError, match="300 labels in the route's models, at most 256"):
            merge_predictions([many(150, "A"), many(150, "B")])
        first, second = many(150, "A"), many(106, "B")
        merged = merge_predictions([first, second])
        assert len(merged.values) == MAX_LABELS and merged.values["B106"] == 256
        for prediction in (first, second):
            for name in prediction.values:
                np.testing.assert_array_equal(merged.mask(name), prediction.mask(name))
        decoded = decode_masks(encode_masks(merged))
        assert decoded.keys() == merged.values.keys()
        assert all((decoded[name] == merged.mask(name)).all() for name in merged.values)

    def test_masks_written_by_the_old_encoder_still_decode(self) -> None:
        bits = np.zeros((2, 3, 4), dtype=np.uint32)  # as encode_masks wrote them: one bit-field, bit value - 1
        bits[0, 1, 2] = 1 << 0 | 1 << 31
        bits[1, 2, 3] = 1 << 20
        buffer = io.BytesIO()
        np.savez_compressed(buffer, bits=bits, names=np.array(["A", "B", "C"]), values=np.array([1, 21, 32]),
                            confidence_names=np.array([], dtype=str), confidence=np.zeros((0, 2)),
                            split_names=np.array([], dtype=str), split_mm=np.zeros(0))
        decoded = decode_masks(buffer.getvalue())
        assert np.argwhere(decoded["A"]).tolist() == [[0, 1, 2]] == np.argwhere(decoded["C"]).tolist()
        assert np.argwhere(decoded["B"]).tolist() == [[1, 2, 3]]


class TestCaps:
    def test_256_labels_per_model_and_route_and_no_more(self, tmp_path: Path) -> None:
        levels_network(tmp_path / "a" / "model.onnx", [0.0] * 257)
        accepted = load_model_package(manifest(tmp_path / "a", kind="softmax", labels=labels(256))).manifest
        assert len(accepted.labels) == 256
        levels_network(tmp_path / "b" / "model.onnx", [0.0] * 258)
        with pytest.raises(ConfigError, match=r"labels\.256\.value: Input should be less than or equal to 256"):
            load_model_package(manifest(tmp_path / "b", kind="softmax", labels=labels(257)))
        small = accepted.model_copy(update={"labels": [label.model_copy(update={"name": f"X{label.value}"})
                                                       for label in accepted.labels[:1]]})
        with pytest.raises(ValueError, match="at most 256 labels in all the models of a route, not 257"):
            combine_manifests([accepted, small])
        assert len(combine_manifests([accepted.model_copy(update={"labels": accepted.labels[:255]}),
                                      small]).labels) == 256


def test_named_masks_are_made_only_when_read_and_never_kept() -> None:
    classes = np.zeros((4, 5, 6), dtype=np.uint8)
    classes[1:3, 1:4, 2:5] = 2
    masks = LabelMasks.from_classes(classes, 3)
    made: list[int] = []
    original = masks.mask

    def counting(value: int) -> np.ndarray:
        made.append(value)
        return original(value)

    masks.mask = counting  # type: ignore[method-assign]
    view = masks.named({"A": 1, "B": 2, "C": 3})
    assert list(view) == ["A", "B", "C"] and len(view) == 3 and made == []
    assert view["B"].sum() == 2 * 3 * 3 and made == [2]
    assert view["B"] is not view["B"]  # made again: the view holds no mask
    smaller = view.without(["A", "C"])
    assert list(smaller) == ["B"] and not view["A"].any()
