"""Bundles: several model packages run as one model, merged as TotalSegmentator merges its parts (issue 20).

The parts here are tiny real networks (:func:`tests.onnx_models.levels_network`: the class whose centre is nearest
the normalised HU wins), so which part claims which voxels is known: ``first`` finds soft tissue and bone, ``second``
only the densest contrast, which ``first`` calls bone too. Where both claim a voxel the later part wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.config import Inference
from gateway.errors import ConfigError, VolumeError
from gateway.inference.bundle import BundlePredictor
from gateway.inference.ensemble import infer
from gateway.inference.manifest import load_model_package
from gateway.inference.model_cache import Predictors, check_route_models
from gateway.inference.packages import ModelBundle, load_bundle, load_model
from gateway.inference.predictor import Predictor
from gateway.routes import Route
from tests.nnunet_folder import ct_volume
from tests.onnx_models import levels_network, manifest, threshold_network

#: Normalised HU (-1000..1000 -> 0..1) of ct_volume's tissues: air 0, lung 0.09, fat 0.45, soft 0.52, a sphere of
#: 200 HU 0.6, bone 0.85, contrast 1.0 (clipped).
FIRST = ([0.0, 0.5, 0.85], ["Soft", "Bone"])  # Soft: 0.25-0.675; Bone: above 0.675 (bone and contrast)
SECOND = ([0.8, 1.0], ["Contrast"])  # above 0.9: contrast only, which FIRST calls Bone
COLOURS = {"Soft": [200, 120, 100], "Bone": [240, 240, 200], "Contrast": [255, 0, 255]}


def write_part(folder: Path, centres: list[float], names: list[str], **extra: Any) -> Path:
    levels_network(folder / "model.onnx", centres)
    labels = [{"value": value, "name": name, "colour": [value, 0, 0]} for value, name in enumerate(names, start=1)]
    return manifest(folder, kind="softmax", logits=True, labels=labels, **extra)


def write_bundle(folder: Path, parts: list[str], labels: list[str], **label_extra: Any) -> Path:
    lines = ["[model]", 'name = "pair"', 'version = "1.0"', "", "[bundle]",
             f"parts = [{', '.join(f'{part!r}' for part in parts)}]".replace("'", '"'), 'overlap = "last_wins"', ""]
    for name in labels:
        lines += ["[[labels]]", f'name = "{name}"', f"colour = {COLOURS.get(name, [1, 2, 3])}",
                  'interpreted_type = "ORGAN"', *(f"{key} = {value}" for key, value in label_extra.items()), ""]
    (folder / "manifest.toml").write_text("\n".join(lines), encoding="utf-8")
    return folder


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """``pair``: a bundle of ``first`` (Soft, Bone; 2 mm) then ``second`` (Contrast; 3 mm); ``bones``: a plain
    sigmoid package."""
    folder = tmp_path / "models"
    write_part(folder / "pair" / "first", *FIRST, spacing=(2.0, 2.0, 2.0))
    write_part(folder / "pair" / "second", *SECOND, spacing=(3.0, 3.0, 3.0))
    write_bundle(folder / "pair", ["first", "second"], ["Soft", "Bone", "Contrast"])
    threshold_network(folder / "bones" / "model.onnx", cut=0.65)
    manifest(folder / "bones", spacing=(3.0, 3.0, 3.0), patch=(16, 32, 32),
             labels=[{"value": 1, "name": "Bones", "colour": [255, 255, 200]}])
    return folder


class TestLoading:
    def test_bundle_manifest_is_the_combined_labels(self, models_dir: Path) -> None:
        bundle = load_model(models_dir / "pair")
        assert isinstance(bundle, ModelBundle)
        assert [part.folder.name for part in bundle.parts] == ["first", "second"]
        spec = bundle.manifest
        assert [(label.value, label.name, label.colour) for label in spec.labels] == [
            (1, "Soft", [200, 120, 100]), (2, "Bone", [240, 240, 200]), (3, "Contrast", [255, 0, 255])]
        assert spec.output.kind == "softmax" and spec.model.name == "pair"
        assert spec.input == bundle.parts[0].manifest.input
        assert load_model(models_dir / "bones").manifest.labels[0].name == "Bones"  # plain packages as before

    def test_package_loader_points_to_load_model(self, models_dir: Path) -> None:
        with pytest.raises(ConfigError, match="a bundle of several packages"):
            load_model_package(models_dir / "pair")

    @pytest.mark.parametrize(("change", "problem"), [
        (lambda d: write_bundle(d, ["first", "second"], ["Soft", "Bone"]),
         "part 'second': labels Contrast are not among the bundle's [[labels]]"),
        (lambda d: write_bundle(d, ["first", "second"], ["Soft", "Bone", "Contrast", "Liver"]),
         "labels Liver: found by no part"),
        (lambda d: write_bundle(d, ["first", "third"], ["Soft", "Bone", "Contrast"]),
         "part 'third': no folder"),
        (lambda d: write_bundle(d, ["first", "first"], ["Soft", "Bone"]),
         "bundle.parts: must name each part folder once"),
        (lambda d: write_bundle(d, ["first", "second"], ["Soft", "Bone", "Contrast"], fill_holes="true"),
         "labels.0: fill_holes is a part's post-processing"),
        (lambda d: write_part(d / "second", [0.8, 1.0], ["Bone"]),
         "label 'Bone': found by parts 'first' and 'second'"),
        (lambda d: manifest(d / "second", labels=[{"value": 1, "name": "Contrast", "colour": [1, 1, 1]}]),
         "part 'second': a sigmoid model; a bundle's parts are softmax models"),
    ], ids=["part-label-unknown", "label-of-no-part", "part-missing", "part-twice", "postprocessing",
            "label-in-two-parts", "sigmoid-part"])
    def test_problems_are_named(self, models_dir: Path, change: Any, problem: str) -> None:
        change(models_dir / "pair")
        with pytest.raises(ConfigError) as info:
            load_bundle(models_dir / "pair")
        assert any(problem in said for said in info.value.problems), info.value.problems


class TestPrediction:
    def test_later_part_wins_where_both_claim(self, models_dir: Path) -> None:
        bundle = load_bundle(models_dir / "pair")
        volume = ct_volume()
        first, second = (Predictor(part).predict(volume) for part in bundle.parts)
        soft, bone, contrast = first.mask("Soft"), first.mask("Bone"), second.mask("Contrast")
        assert (bone & contrast).sum() > 50 and (bone & ~contrast).sum() > 50  # both claim the contrast sphere

        prediction = BundlePredictor(bundle).predict(volume)
        assert prediction.values == {"Soft": 1, "Bone": 2, "Contrast": 3}
        assert prediction.masks.form == "classes" and prediction.masks.top == 3
        assert np.array_equal(prediction.mask("Contrast"), contrast)
        assert np.array_equal(prediction.mask("Bone"), bone & ~contrast)
        assert np.array_equal(prediction.mask("Soft"), soft & ~contrast)
        assert prediction.voxels == {"Soft": int((soft & ~contrast).sum()), "Bone": int((bone & ~contrast).sum()),
                                     "Contrast": int(contrast.sum())}
        assert set(prediction.confidence) == {"Soft", "Bone", "Contrast"}

    def test_part_order_decides(self, models_dir: Path) -> None:
        write_bundle(models_dir / "pair", ["second", "first"], ["Soft", "Bone", "Contrast"])
        prediction = BundlePredictor(load_bundle(models_dir / "pair")).predict(ct_volume())
        assert prediction.voxels["Contrast"] == 0 and prediction.voxels["Bone"] > 100

    def test_progress_runs_over_the_parts(self, models_dir: Path) -> None:
        calls: list[tuple[int, int]] = []
        BundlePredictor(load_bundle(models_dir / "pair")).predict(ct_volume(), lambda d, t: calls.append((d, t)))
        assert calls[-1][0] == calls[-1][1]  # the last part's last tile: all done
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)

    def test_too_large_for_any_part_fails_before_the_first_runs(self, models_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        write_part(models_dir / "pair" / "second", *SECOND, spacing=(1.0, 1.0, 1.0))
        predictor = BundlePredictor(load_bundle(models_dir / "pair"))
        monkeypatch.setattr(predictor.parts[0], "predict", lambda *args, **kwargs: pytest.fail("first part ran"))
        with pytest.raises(VolumeError, match="model test, at most 200000"):  # 2 mm fits, 1 mm does not
            predictor.predict(ct_volume(), max_voxels=200_000)


class TestRoutes:
    def route(self, models: list[str]) -> Route:
        return Route.model_validate({"name": "all", "model": models, "destinations": ["folder"]})

    def test_route_with_a_bundle_and_a_package(self, models_dir: Path) -> None:
        check_route_models(models_dir, [self.route(["pair", "bones"]), self.route(["pair"])])
        predictors = Predictors(Inference(models_dir=models_dir))
        assert [label.name for label in predictors.manifest(["pair", "bones"]).labels] == \
            ["Soft", "Bone", "Contrast", "Bones"]
        pair = predictors.get("pair")
        assert isinstance(pair, BundlePredictor) and predictors.get("pair") is pair
        prediction = infer([pair, predictors.get("bones")], ct_volume())
        assert list(prediction.values) == ["Soft", "Bone", "Contrast", "Bones"]
        assert prediction.voxels["Contrast"] > 0 and prediction.voxels["Bones"] > 0

    def test_broken_bundle_is_a_start_up_problem(self, models_dir: Path) -> None:
        write_bundle(models_dir / "pair", ["first", "second"], ["Soft", "Bone"])
        with pytest.raises(ConfigError) as info:
            check_route_models(models_dir, [self.route(["pair", "bones"])])
        assert "model 'pair': part 'second': labels Contrast are not among the bundle's [[labels]]" in \
            info.value.problems
