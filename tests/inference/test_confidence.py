"""The model's confidence in each structure: its maths, both predictor paths, its storage, and a model fed the
wrong normalisation on a real CT, which it makes visible."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from gateway.inference.confidence import Confidence, from_logits, from_probabilities, measure
from gateway.inference.ensemble import decode_confidence, decode_masks, decode_split, encode_masks, merge_predictions
from gateway.inference.labels import LabelMasks
from gateway.inference.manifest import Label, load_model_package
from gateway.inference.predictor import Prediction, Predictor
from gateway.inference.volume import Volume, volume_from_datasets
from gateway.rt.plausibility import Outcome, check_structures
from tests.inference.test_infer import make_volume
from tests.onnx_models import bands_network, manifest, threshold_network
from tests.realct import real_chest_ct


def _label(value: int, name: str, **extra: object) -> Label:
    return Label.model_validate({"value": value, "name": name, "colour": [1, 2, 3], **extra})


class TestMaths:
    def test_mean_inside_the_mask_and_the_uncertain_share_of_the_channel(self) -> None:
        probability = np.array([0.1, 0.29, 0.3, 0.5, 0.7, 0.71, 0.95, 0.2])
        mask = np.array([False, False, False, True, True, True, True, False])
        figures = measure(probability, mask)
        assert figures is not None
        assert figures.mean_probability == pytest.approx((0.5 + 0.7 + 0.71 + 0.95) / 4)
        # p >= 0.3: 0.3, 0.5, 0.7, 0.71, 0.95 (in the mask or not); of these 0.3, 0.5, 0.7 are uncertain (inclusive)
        assert figures.uncertain_share == pytest.approx(3 / 5)

    def test_an_empty_mask_has_no_figures_and_a_sure_channel_no_uncertain_share(self) -> None:
        assert measure(np.full(4, 0.9), np.zeros(4, dtype=bool)) is None
        # A mask the network never claimed (post-processing put it there, filling a hole) counts as no confidence.
        assert measure(np.array([0.0, 0.1, 0.2, 0.25]), np.ones(4, dtype=bool)) == Confidence(0.0, 0.0)
        # Filled holes (p near 0) do not dilute the mean of what the network did claim.
        assert measure(np.array([0.0, 0.05, 0.9, 0.8]), np.ones(4, dtype=bool)) == Confidence(
            pytest.approx(0.85), 0.0)

    def test_softmax_labels_read_their_class_and_sigmoid_labels_their_channel(self) -> None:
        probabilities = np.array([[0.45, 0.9], [0.4, 0.8], [0.7, 0.35]])
        bits = LabelMasks.from_bits(np.array([0b01, 0b11], dtype=np.uint8))  # label 1 in both voxels, 2 in the second
        softmax = from_probabilities(probabilities, bits, [_label(1, "A"), _label(2, "B")], "softmax")
        assert softmax["A"].mean_probability == pytest.approx(0.6)  # class 1 = channel 1
        assert softmax["B"].mean_probability == pytest.approx(0.35)  # class 2 = channel 2, second voxel
        sigmoid = from_probabilities(probabilities, bits, [_label(1, "A"), _label(2, "B", channel=1)], "sigmoid")
        assert sigmoid["A"].mean_probability == pytest.approx(0.675)  # channel 0
        assert sigmoid["B"].mean_probability == pytest.approx(0.9)  # channel 0 too, second voxel

    @pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
    def test_logits_give_the_figures_of_their_probabilities_and_stay_unchanged(self, kind: str) -> None:
        rng = np.random.default_rng(19)
        logits = rng.normal(0, 2, (3, 6, 7, 8)).astype(np.float32)
        before = logits.copy()
        labels = [_label(1, "A"), _label(2, "B")] if kind == "softmax" else [_label(1, "A"), _label(2, "B"),
                                                                               _label(3, "C")]
        found = from_logits(logits, labels, kind, 0.5)
        np.testing.assert_array_equal(logits, before)
        if kind == "softmax":
            probabilities = np.exp(before) / np.exp(before).sum(axis=0)
            winner = probabilities.argmax(axis=0)
            bits = sum(((winner == c).astype(np.uint8) << (c - 1)) for c in (1, 2))
        else:
            probabilities = 1 / (1 + np.exp(-before))
            bits = sum(((probabilities[c] >= 0.5).astype(np.uint8) << c) for c in range(3))
        expected = from_probabilities(probabilities, LabelMasks.from_bits(np.asarray(bits)), labels, kind)
        assert found.keys() == expected.keys() == {label.name for label in labels}
        for name, figures in found.items():
            assert figures.mean_probability == pytest.approx(expected[name].mean_probability, abs=1e-5)
            assert figures.uncertain_share == pytest.approx(expected[name].uncertain_share, abs=1e-3)


class TestPredictor:
    def test_both_paths_report_each_label_found(self, tmp_path: Path) -> None:
        labels = [{"value": 1, "name": "Soft", "colour": [0, 0, 255]},
                  {"value": 2, "name": "Dense", "colour": [9, 9, 0]}]
        volume, _ = make_volume(spheres=(((0, 0, -20), 18.0, 100.0), ((0, -25, 25), 8.0, 900.0)))
        bands_network(tmp_path / "p" / "model.onnx", low=0.45, high=0.75)
        bands_network(tmp_path / "n" / "model.onnx", low=0.45, high=0.75, logits=True)
        linear = Predictor(load_model_package(manifest(tmp_path / "p", kind="softmax", labels=labels)))
        nnunet = Predictor(load_model_package(manifest(tmp_path / "n", kind="softmax", labels=labels, logits=True,
                                                       resampling="nnunet")))
        for prediction in (linear.predict(volume), nnunet.predict(volume)):
            assert prediction.confidence.keys() == {"Soft", "Dense"}
            assert all(0.5 <= figures.mean_probability <= 1 for figures in prediction.confidence.values())

    def test_a_prediction_built_without_figures_has_none(self) -> None:
        assert Prediction(LabelMasks.empty((1, 1, 1), 1), {"A": 1}, {"A": 0}, 0.0).confidence == {}


class TestStorage:
    def _prediction(self, name: str, figures: Confidence) -> Prediction:
        bits = np.zeros((2, 3, 4), dtype=np.uint8)
        bits[0, 1, 2] = 1
        return Prediction(LabelMasks.from_bits(bits), {name: 1}, {name: 1}, 1.0, {name: figures})

    def test_confidence_survives_merging_and_storage(self) -> None:
        merged = merge_predictions([self._prediction("A", Confidence(0.9, 0.1)),
                                    self._prediction("B", Confidence(0.55, 0.75))])
        data = encode_masks(merged)
        assert decode_confidence(data) == {"A": Confidence(0.9, 0.1), "B": Confidence(0.55, 0.75)}
        assert set(decode_masks(data)) == {"A", "B"}
        assert decode_confidence(encode_masks(Prediction(merged.masks, merged.values, merged.voxels, 1.0))) == {}

    def test_gaps_to_discarded_pieces_survive_merging_and_storage(self) -> None:
        first, second = self._prediction("A", Confidence(0.9, 0.1)), self._prediction("B", Confidence(0.9, 0.1))
        merged = merge_predictions([replace(first, split_mm={"A": 9.0}), second])
        assert decode_split(encode_masks(merged)) == {"A": 9.0}
        assert decode_split(encode_masks(second)) == {}

    def test_an_encoding_from_before_confidence_decodes_to_none(self) -> None:
        buffer = io.BytesIO()  # what encode_masks wrote before it stored confidence
        np.savez_compressed(buffer, bits=np.ones((1, 2, 2), dtype=np.uint8), names=np.array(["A"]),
                            values=np.array([1]))
        assert decode_confidence(buffer.getvalue()) == {} and decode_split(buffer.getvalue()) == {}
        assert decode_masks(buffer.getvalue())["A"].all()


# --- a model fed the wrong normalisation ------------------------------------------------------------------------

#: A steep threshold network finding the body (above -500 HU: 0.25 after clipping -1000..1000 to 0..1).
_RIGHT = "out_min = 0, out_max = 1"
#: The same HU range squeezed into 0.2..0.3 (a normalisation meant for another network): every voxel lands near
#: the network's cut. Measured on lung1 / lung2: mean probability 0.996 / 0.997 with the right one, 0.573 / 0.563
#: with this (uncertain shares 0.010 / 0.008 and 0.954 / 0.973); the mask shrinks to 42 / 39 % of the body.
#: The real liver U-Net (shared/models/liver-unet-3mm) is no use here: its instance normalisation makes it nearly
#: blind to the normalisation (on lung2: 0.827 right, 0.795 with -1024..1024 to 0..1, 0.832 inverted, 0.803 with a
#: lung window), so its confidence does not collapse.
_SQUEEZED = "out_min = 0.2, out_max = 0.3"


@pytest.fixture(scope="module")
def body_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("body")
    threshold_network(folder / "model.onnx", cut=0.25)
    return manifest(folder, spacing=(3.0, 3.0, 3.0), patch=(32, 128, 128), labels=[
        {"value": 1, "name": "External", "colour": [0, 255, 0], "interpreted_type": "EXTERNAL",
         "keep_largest_component": True, "volume_ml": [500, 150000], "contiguous": True}])


@pytest.fixture(scope="module", params=["lung1", "lung2"])
def chest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Volume:
    series = real_chest_ct(tmp_path_factory.mktemp(request.param), source=request.param)
    return volume_from_datasets([pydicom.dcmread(path) for path in series.files])


@pytest.mark.parametrize("normalisation", [_RIGHT, _SQUEEZED], ids=["right", "squeezed"])
def test_a_model_fed_the_wrong_normalisation_loses_its_confidence(body_model: Path, chest: Volume,
                                                                  normalisation: str) -> None:
    text = (body_model / "manifest.toml").read_text()
    (body_model / "manifest.toml").write_text(text.replace(_RIGHT, normalisation).replace(_SQUEEZED, normalisation))
    package = load_model_package(body_model)
    prediction = Predictor(package).predict(chest)
    findings = check_structures(chest, {"External": prediction.mask("External")}, package.manifest,
                                prediction.confidence)
    flagged = {(f.structure, f.check, f.outcome, f.reason) for f in findings if f.outcome is not Outcome.PASS}
    figures = prediction.confidence["External"]
    if normalisation == _RIGHT:
        assert flagged == set()
        assert figures.mean_probability > 0.99 and figures.uncertain_share < 0.02
    else:  # still a plausible body by volume and shape: only the model's own confidence shows the fault
        assert flagged == {("External", "confidence", Outcome.FAIL, "low_model_confidence")}
        assert figures.mean_probability < 0.58 and figures.uncertain_share > 0.9
    assert {f.check for f in findings} == {"volume", "continuity", "confidence"}
