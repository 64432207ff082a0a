"""scripts/import_totalsegmentator.py on a TotalSegmentator weights folder in miniature (issue 20).

The folder holds TotalSegmentator's dataset and trainer folder names, readers and label maps with small random
networks (:mod:`tests.nnunet_folder`); the ``total`` task's five parts become one bundle whose 117 labels carry the
TG-263 names, colours and types of ``scripts/totalsegmentator_names.toml``, run as TotalSegmentator runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.inference.bundle import BundlePredictor
from gateway.inference.manifest import ModelPackage
from gateway.inference.packages import ModelBundle, load_model
from tests.nnunet_folder import ct_volume, load_totalseg_importer, write_totalsegmentator_weights

TOTAL = (291, 292, 293, 294, 295)
PARTS = ["part1_organs", "part2_vertebrae", "part3_cardiac", "part4_muscles", "part5_ribs"]


@pytest.fixture(scope="module")
def importer() -> ModuleType:
    return load_totalseg_importer()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five ``total`` parts, as TotalSegmentator keeps them under ``~/.totalsegmentator/nnunet/results``."""
    return write_totalsegmentator_weights(tmp_path_factory.mktemp("totalseg") / "nnunet" / "results", TOTAL)


@pytest.fixture(scope="module")
def total(importer: ModuleType, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "totalseg-total"
    assert importer.main(["--task", "total", "--weights", str(weights), "--out", str(out)]) == 0
    return out


def toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


class TestTotal:
    def test_one_bundle_of_five_parts(self, total: Path) -> None:
        spec = toml(total / "manifest.toml")
        assert spec["bundle"] == {"parts": PARTS, "overlap": "last_wins"}
        assert sorted(path.name for path in total.iterdir()) == sorted([*PARTS, "manifest.toml"])
        assert not [path for path in total.parent.iterdir() if path.name.startswith(".")]  # no staging left

    def test_labels_are_the_tables_tg263_names_in_totalsegmentators_order(self, importer: ModuleType,
                                                                          total: Path) -> None:
        bundle = load_model(total)
        assert isinstance(bundle, ModelBundle)
        labels = bundle.manifest.labels
        entries = list(importer.names.names_for("total", source="snapshot").values())
        assert len(labels) == 117
        assert [(label.value, label.name, tuple(label.colour), label.interpreted_type) for label in labels] == \
            [(value, e.tg263, e.colour, e.interpreted_type) for value, e in enumerate(entries, start=1)]
        names = [label.name for label in labels]
        for name in ("Lung_LUL", "Glnd_Adrenal_L", "VB_T01", "Rib01_L", "Spleen"):
            assert name in names

    def test_parts_run_as_totalsegmentator_runs_them(self, total: Path) -> None:
        bundle = load_model(total)
        assert isinstance(bundle, ModelBundle)
        for part in bundle.parts:
            spec = part.manifest.input
            assert (spec.orientation, spec.mirror_axes, spec.overlap, spec.accumulate) == ("SAR", [], 0.2, "float16")
            assert spec.spacing_mm == [1.5, 1.5, 1.5] and spec.resampling == "totalsegmentator"
        organs = {label.name: label for label in bundle.parts[0].manifest.labels}
        assert organs["Lung_LUL"].colour == [71, 232, 244]  # the table's colour in the part too
        assert "nnUNetTrainerNoMirroring" in bundle.parts[1].manifest.model.description
        assert "Dataset292" in bundle.parts[1].manifest.model.description

    def test_bundle_predicts(self, total: Path) -> None:
        bundle = load_model(total)
        assert isinstance(bundle, ModelBundle)
        volume = ct_volume()
        prediction = BundlePredictor(bundle).predict(volume)
        assert prediction.masks.shape == volume.shape and prediction.masks.top == 117
        assert len(prediction.values) == 117 and sum(prediction.voxels.values()) > 0
        assert list(prediction.values) == [label.name for label in bundle.manifest.labels]


class TestRefusals:
    def test_missing_part(self, importer: ModuleType, weights: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
        partial = tmp_path / "results"
        shutil.copytree(weights, partial, ignore=lambda folder, _: ["fold_0"] if folder.endswith("3d_fullres") else [])
        shutil.rmtree(next(partial.glob("Dataset294_*")))
        out = tmp_path / "models" / "totalseg-total"
        assert importer.main(["--task", "total", "--weights", str(partial), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "part 4 of total (class_map_part_muscles, Dataset294): no folder Dataset294_* in" in err
        assert not out.parent.exists()

    def test_label_map_differs_from_the_table(self, importer: ModuleType, weights: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        changed = tmp_path / "results"
        shutil.copytree(weights, changed, ignore=lambda folder, _: ["fold_0"] if folder.endswith("3d_fullres") else [])
        dataset = next(changed.glob("Dataset292_*/*/dataset.json"))
        data = json.loads(dataset.read_text(encoding="utf-8"))
        data["labels"]["vertebrae_L1"], data["labels"]["vertebrae_L2"] = (data["labels"]["vertebrae_L2"],
                                                                          data["labels"]["vertebrae_L1"])
        dataset.write_text(json.dumps(data), encoding="utf-8")
        out = tmp_path / "models" / "totalseg-total"
        assert importer.main(["--task", "total", "--weights", str(changed), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "part 2 of total (class_map_part_vertebrae, Dataset292)" in err
        assert "labels differ from the names table's snapshot" in err and "vertebrae_L2 here, vertebrae_L1" in err
        assert not out.parent.exists()

    def test_trainer_folder_missing(self, importer: ModuleType, weights: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
        assert importer.main(["--task", "total_fast", "--weights", str(weights), "--out",
                              str(tmp_path / "fast")]) == 2
        assert "total_fast (Dataset297): no folder Dataset297_* in" in capsys.readouterr().err

    def test_unknown_task(self, importer: ModuleType, weights: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
        assert importer.main(["--task", "liver_tumour", "--weights", str(weights)]) == 2
        assert "--task liver_tumour: not a task the names table covers (total, " in capsys.readouterr().err


def test_total_fast_is_one_package(importer: ModuleType, tmp_path: Path) -> None:
    """Dataset297 (3 mm, 117 classes, one network): a plain package with the combined labels."""
    weights = write_totalsegmentator_weights(tmp_path / "results", (297,))
    out = tmp_path / "models" / "totalseg-total_fast"
    assert importer.main(["--task", "total_fast", "--weights", str(weights), "--out", str(out)]) == 0
    package = load_model(out)
    assert isinstance(package, ModelPackage)
    spec = package.manifest
    assert (spec.input.spacing_mm, spec.input.overlap, spec.input.accumulate, spec.input.mirror_axes) == \
        ([3.0] * 3, 0.2, "float16", [])
    assert [label.name for label in spec.labels][:3] == ["Spleen", "Kidney_R", "Kidney_L"]
    assert len(spec.labels) == 117 and spec.labels[9].name == "Lung_LUL"


def test_list_says_which_weights_are_present(importer: ModuleType, weights: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert importer.main(["--list", "--weights", str(weights)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["total"] == "weights present"
    assert lines["total_fast"].startswith("total_fast (Dataset297): no folder")
    assert set(lines) >= {"total_v3", "body", "head_glands_cavities", "headneck_muscles", "body_fast"}


class TestAgainstTotalSegmentator:
    """The script's pinned facts against the installed TotalSegmentator 2.18.0."""

    def test_trainers_configurations_and_ids(self, importer: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        from totalsegmentator import python_api
        from totalsegmentator.python_api import get_task_config

        monkeypatch.setattr(python_api, "show_license_info", lambda: None)  # heartchambers_highres: licensed weights

        for task, (trainer, configuration) in importer.MODELS.items():
            config = get_task_config(task, quiet=True)
            assert (config["trainer"], config["model"], config["plans"]) == (trainer, configuration, None), task
            assert bool(config["crop"]) == (task in importer.CROPPED), task
            if config["crop"]:
                assert tuple(config["crop"]) == importer.CROPPED[task]
            ids = config["task_id"] if isinstance(config["task_id"], list) else [config["task_id"]]
            assert ids == [part.task_id for part in importer.resolve_task(task).parts], task
        for variant, (task, dataset_id, trainer) in importer.VARIANTS.items():
            config = get_task_config(task, fast=variant.endswith("_fast"), fastest=variant.endswith("_fastest"),
                                     quiet=True)
            assert (config["task_id"], config["trainer"]) == (dataset_id, trainer), variant

    @pytest.mark.parametrize("env", [{"TOTALSEG_WEIGHTS_PATH": "/w"}, {"TOTALSEG_HOME_DIR": "/h"}, {}])
    def test_weights_folder_as_totalsegmentator_finds_it(self, importer: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                         env: dict[str, str]) -> None:
        from totalsegmentator.config import get_weights_dir

        for name in ("TOTALSEG_WEIGHTS_PATH", "TOTALSEG_HOME_DIR"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert importer.default_weights() == get_weights_dir()
        assert os.environ.get("TOTALSEG_HOME_DIR") == env.get("TOTALSEG_HOME_DIR")
