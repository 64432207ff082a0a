"""scripts/import_nnunet.py on folders shaped as TotalSegmentator 2.x ships its ``total`` weights (issue 20).

Dataset names, trainer names, ``plans.json``/``dataset.json`` with the ``NibabelIOWithReorient`` reader and the label
maps are TotalSegmentator's (``totalsegmentator.map_tasks_config``, ``map_to_binary``); the networks are small and
random (:mod:`tests.nnunet_folder`). What is checked:

* the orientation comes from the reader: ``NibabelIOWithReorient`` reorients every image to RAS and transposes the
  array ``(2, 1, 0)``, so the network's axes increase toward S, A, R: ``SAR``, whatever the CT stored;
* the ``*NoMirroring`` trainers' checkpoints hold no mirroring axes, so the package mirrors nothing, and
  ``--tile-step 0.8`` (TotalSegmentator's for ``total``) is an overlap of 0.2;
* the trainers are found without nnU-Net's search, which imports torchvision (through timm) and fails where
  torchvision does not match torch: a subprocess where importing torchvision raises imports both ``total`` trainers;
* unknown trainers and readers are refused, naming them;
* :class:`TestAgainstNnunet`: our Predictor against nnU-Net's ``nnUNetPredictor`` on a CT stored in a non-RAS
  orientation, written as NIfTI and read by nnU-Net's own ``NibabelIOWithReorient``: probabilities on the network's
  grid, and labels written back by nnU-Net's writer into the file's stored axes.

The ``total`` 3 mm model has 117 classes (a model package holds up to 256 labels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import nibabel
import numpy as np
import pytest
import torch
from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
from nnunetv2.inference import predict_from_raw_data
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from gateway.inference.manifest import load_model_package
from gateway.inference.orientation import orientation_code
from gateway.inference.predictor import Predictor
from tests.conftest import REPO
from tests.inference.test_import_nnunet import TIE, TOLERANCE, float32_sums, import_model
from tests.nnunet_folder import (
    ct_volume,
    load_importer,
    totalsegmentator_labels,
    totalsegmentator_recipe,
    write_results_folder,
)
from tests.synthetic import stored_along

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def importer() -> ModuleType:
    return load_importer()


def manifest(package: Path) -> dict[str, Any]:
    return tomllib.loads((package / "manifest.toml").read_text(encoding="utf-8"))


def renames(importer: ModuleType, labels: dict[str, int]) -> list[str]:
    """``--rename`` options for the labels whose 16-character structure names collide (``gluteus_maximus_left``
    and ``_right`` ...) or lose their side: ``TS<value>`` (the TG-263 table will name them properly)."""
    short = {name: importer.tg263_name(name) for name in labels if name != "background"}
    clashing = [name for name, safe in short.items()
                if list(short.values()).count(safe) > 1 or importer.loses_side(name)]
    return [option for name in clashing for option in ("--rename", f"{name}=TS{labels[name]}")]


class TestTotalParts:
    def test_vertebrae_part_is_sar_without_mirroring(self, importer: ModuleType, tmp_path: Path) -> None:
        """Dataset292 (26 vertebrae, nnUNetTrainerNoMirroring) at TotalSegmentator's tile step."""
        folder = write_results_folder(tmp_path / "results", totalsegmentator_recipe(292))
        assert folder.name == "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
        assert folder.parent.name == "Dataset292_TotalSegmentator_part2_vertebrae_1532subj"
        assert import_model(importer, folder, tmp_path / "vertebrae", "--tile-step", "0.8") == 0
        spec = manifest(tmp_path / "vertebrae")
        assert spec["input"]["orientation"] == "SAR"
        assert spec["input"]["mirror_axes"] == []
        assert spec["input"]["overlap"] == 0.2
        assert spec["input"]["spacing_mm"] == [1.5, 1.5, 1.5]
        labels = totalsegmentator_labels("class_map_part_vertebrae")
        assert [(label["value"], label["name"]) for label in spec["labels"]] == \
            [(value, name) for name, value in labels.items() if value]
        assert "nnUNetTrainerNoMirroring" in spec["model"]["description"]
        load_model_package(tmp_path / "vertebrae")

    def test_organs_part_needs_names_told_apart(self, importer: ModuleType, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        """Dataset291's lung lobes share their first 16 characters: refused until renamed."""
        folder = write_results_folder(tmp_path / "results", totalsegmentator_recipe(291))
        assert import_model(importer, folder, tmp_path / "organs") == 2
        err = capsys.readouterr().err
        assert "['lung_upper_lobe_left', 'lung_upper_lobe_right'] all become 'lung_upper_lobe'" in err
        labels = totalsegmentator_labels("class_map_part_organs")
        assert import_model(importer, folder, tmp_path / "organs", *renames(importer, labels)) == 0
        spec = manifest(tmp_path / "organs")
        assert (spec["input"]["orientation"], spec["input"]["mirror_axes"], spec["input"]["overlap"]) == \
            ("SAR", [], 0.5)
        assert len(spec["labels"]) == 24

    def test_total_3mm_model_with_117_classes(self, importer: ModuleType, tmp_path: Path) -> None:
        """Dataset297 (``--fast``): 117 classes, nnUNetTrainer_4000epochs_NoMirroring."""
        folder = write_results_folder(tmp_path / "results", totalsegmentator_recipe(297))
        assert folder.name == "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
        labels = totalsegmentator_labels("total")
        assert len(labels) == 118
        out = tmp_path / "total_3mm"
        assert import_model(importer, folder, out, "--tile-step", "0.8", *renames(importer, labels)) == 0
        package = load_model_package(out)
        spec = package.manifest
        assert (spec.input.orientation, spec.input.mirror_axes, spec.input.spacing_mm) == ("SAR", [], [3.0] * 3)
        assert spec.input.overlap == 0.2 and len(spec.labels) == 117
        colours = [tuple(label["colour"]) for label in manifest(out)["labels"]]
        assert len(set(colours)) == 117

    def test_mirroring_trainer_keeps_its_axes_unless_disabled(self, importer: ModuleType, tmp_path: Path) -> None:
        """A TotalSegmentator folder whose trainer mirrors (nnUNetTrainer, as its body and organ-subset tasks):
        the checkpoint's axes, unless ``--disable-tta`` (TotalSegmentator's own default)."""
        recipe = totalsegmentator_recipe(292, trainer="nnUNetTrainer", mirror_axes=(0, 1, 2))
        folder = write_results_folder(tmp_path / "results", recipe)
        assert import_model(importer, folder, tmp_path / "mirrored") == 0
        assert manifest(tmp_path / "mirrored")["input"]["mirror_axes"] == [0, 1, 2]
        assert import_model(importer, folder, tmp_path / "plain", "--disable-tta") == 0
        assert manifest(tmp_path / "plain")["input"]["mirror_axes"] == []


class TestRefusals:
    @pytest.mark.parametrize(("changes", "options", "reason"), [
        ({"trainer": "nnUNetTrainerMadeUp"}, (),
         "trainer nnUNetTrainerMadeUp: no class of that name in nnunetv2"),
        ({"reader": "MyFancyIO", "reader_override": "MyFancyIO"}, (),
         "image reader 'MyFancyIO': the gateway reproduces the axes of NibabelIOWithReorient, SimpleITKIO, "
         "NibabelIO only"),
        ({}, ("--orientation", "SPL"), "--orientation SPL: NibabelIOWithReorient reorients every image so that the "
                                       "network's axes run SAR"),
        ({"reader": "SimpleITKIO"}, (), "plans.json reads images with SimpleITKIO, dataset.json's "
                                        "overwrite_image_reader_writer says NibabelIOWithReorient"),
    ], ids=["unknown-trainer", "unknown-reader", "orientation-against-reorient", "readers-disagree"])
    def test_refused_naming_the_problem(self, importer: ModuleType, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], changes: dict[str, Any],
                                        options: tuple[str, ...], reason: str) -> None:
        folder = write_results_folder(tmp_path / "results", totalsegmentator_recipe(292, **changes))
        out = tmp_path / "models" / "vertebrae"
        assert import_model(importer, folder, out, *options) == 2
        assert reason in capsys.readouterr().err
        assert not out.parent.exists() or not any(out.parent.iterdir())

    def test_orientation_may_repeat_the_readers(self, importer: ModuleType, tmp_path: Path) -> None:
        folder = write_results_folder(tmp_path / "results", totalsegmentator_recipe(292))
        assert import_model(importer, folder, tmp_path / "vertebrae", "--orientation", "SAR") == 0


class TestTrainers:
    """TotalSegmentator's own trainers: from its package where that imports, else the nnunetv2 base they derive
    from; both build the same network."""

    NAMES: ClassVar[dict[str, str]] = {"nnUNetTrainer_MOSAIC_1k_QuarterLR_NoMirroring": "nnUNetTrainerNoMirroring",
             "nnUNetTrainerDiceTopK10Loss_2000epochs": "nnUNetTrainerDiceTopK10Loss",
             "nnUNetTrainerSkeletonRecall": "nnUNetTrainer"}

    def test_table_matches_the_installed_package(self, importer: ModuleType) -> None:
        assert importer.TOTALSEGMENTATOR_TRAINERS == self.NAMES
        import totalsegmentator.custom_trainers as custom

        for name, base in self.NAMES.items():
            found = importer.find_trainer_class(name)
            assert found is getattr(custom, name)
            assert issubclass(found, importer.find_trainer_class(base))
            assert found.build_network_architecture is importer.find_trainer_class(base).build_network_architecture

    def test_base_where_totalsegmentator_does_not_import(self, importer: ModuleType,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "totalsegmentator.custom_trainers", None)  # importing it raises
        for name, base in self.NAMES.items():
            assert importer.find_trainer_class(name).__name__ == base


NO_TORCHVISION = textwrap.dedent("""
    import importlib.abc, sys

    class Broken(importlib.abc.MetaPathFinder):
        # torchvision built for another torch: importing it raises, as on PyPI's CPU torch
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchvision":
                raise RuntimeError("operator torchvision::nms does not exist")
            return None

    sys.meta_path.insert(0, Broken())
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        pass
    else:
        raise SystemExit("the shim does not work")
    sys.path.insert(0, sys.argv[1])
    from tests.nnunet_folder import load_importer

    importer = load_importer()
    codes = [importer.main([folder, "--out", out]) for folder, out in zip(sys.argv[2::2], sys.argv[3::2])]
    print("codes", codes, "torchvision" in sys.modules, "timm" in sys.modules)
    raise SystemExit(max(codes))
""")


def test_trainers_found_without_torchvision(tmp_path: Path) -> None:
    """The two ``total`` trainers import in a process where torchvision cannot: nnU-Net's search would fail there."""
    arguments = []
    for task in (291, 297):
        recipe = totalsegmentator_recipe(task, labels={"background": 0, "liver": 1, "spleen": 2})
        arguments += [str(write_results_folder(tmp_path / "results", recipe)), str(tmp_path / f"model{task}")]
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", NO_TORCHVISION, str(REPO), *arguments], capture_output=True,
                            text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "codes [0, 0] False False" in result.stdout
    for task in (291, 297):
        spec = manifest(tmp_path / f"model{task}")
        assert (spec["input"]["orientation"], spec["input"]["mirror_axes"]) == ("SAR", [])


class TestAgainstNnunet:
    """Our Predictor on a CT stored IPR (feet first, right-left mirrored) against nnU-Net reading its NIfTI."""

    def test_reoriented_ct(self, importer: ModuleType, tmp_path: Path) -> None:
        recipe = totalsegmentator_recipe(292, labels={"background": 0, "vertebrae_L1": 1, "spinal_cord": 2,
                                                      "sacrum": 3})
        folder = write_results_folder(tmp_path / "results", recipe, seed=5)
        assert import_model(importer, folder, tmp_path / "model", "--tile-step", "0.8") == 0
        volume, _ = stored_along(ct_volume(), {}, (0, 2))
        assert orientation_code(volume.affine) == "IPR"  # not RAS, nor the network's SAR
        path = tmp_path / "ct.nii.gz"
        nibabel.save(nibabel.Nifti1Image(volume.hu, LPS_TO_RAS @ volume.affine), str(path))

        reader = NibabelIOWithReorient()
        image, properties = reader.read_images([str(path)])
        predictor = nnUNetPredictor(tile_step_size=0.8, use_gaussian=True, use_mirroring=True,
                                    device=torch.device("cpu"), perform_everything_on_device=False,
                                    allow_tqdm=False)
        with pytest.MonkeyPatch.context() as patch:  # as TotalSegmentator does: nnU-Net's search needs torchvision
            patch.setattr(predict_from_raw_data, "recursive_find_trainer_class_by_name", importer.find_trainer_class)
            predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,),
                                                           checkpoint_name="checkpoint_final.pth")
        assert predictor.allowed_mirroring_axes is None
        with float32_sums():
            segmentation, probabilities = predictor.predict_single_npy_array(image, properties, None, None, True)
        stored = to_stored(segmentation, tmp_path / "seg.nii.gz", properties)  # nnU-Net's writer: the file's axes
        assert stored.shape == volume.shape
        assert np.bincount(stored.ravel(), minlength=4).min() > 100  # every class somewhere

        ours = Predictor(load_model_package(tmp_path / "model"))
        mine = ours.probabilities(volume)  # the network's axes: SAR, as nnU-Net's reader made them
        difference = float(np.abs(mine - probabilities).max())
        print(f"max abs probability difference to nnU-Net: {difference:.2e}")
        assert mine.shape == probabilities.shape and difference <= TOLERANCE
        ranked = np.sort(probabilities, axis=0)
        decided = to_stored((ranked[-1] - ranked[-2] >= TIE).astype(np.uint8), tmp_path / "decided.nii.gz",
                            properties).astype(bool)
        prediction = ours.predict(volume)
        for name, value in prediction.values.items():
            differ = prediction.mask(name) != (stored == value)
            print(f"{name}: {int(differ.sum())} voxels differ, {int((differ & decided).sum())} of them not at a tie")
            assert not (differ & decided).any()


def to_stored(array: np.ndarray, path: Path, properties: dict[str, Any]) -> np.ndarray:
    """*array* (nnU-Net's axes) in the CT file's stored axes, as nnU-Net's ``NibabelIOWithReorient`` writes it."""
    NibabelIOWithReorient().write_seg(array, str(path), properties)
    return np.asarray(nibabel.load(str(path)).dataobj).astype(np.int64)


def test_folder_files_are_totalsegmentators(tmp_path: Path) -> None:
    """The fixture writes what TotalSegmentator's folders hold: the reader in both files, its dataset name."""
    folder = write_results_folder(tmp_path, totalsegmentator_recipe(291))
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert plans["image_reader_writer"] == dataset["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    assert plans["dataset_name"] == "Dataset291_TotalSegmentator_part1_organs_1559subj"
    assert dataset["labels"]["spleen"] == 1 and len(dataset["labels"]) == 25
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerNoMirroring"
    assert checkpoint["inference_allowed_mirroring_axes"] is None
