"""A trained nnU-Net v2 results folder in miniature (random weights), and a CT to run it on, for the tests.

The folder holds what ``nnUNetPredictor.initialize_from_trained_model_folder`` reads: ``plans.json``
(the configuration with its architecture, ``transpose_forward``, the foreground intensity statistics and
the resampling functions), ``dataset.json`` (channels, labels, file ending) and
``fold_<n>/checkpoint_final.pth`` (``network_weights``, ``init_args``, ``trainer_name``,
``inference_allowed_mirroring_axes``), as nnU-Net's trainer saves them.

:func:`totalsegmentator_recipe` shapes the folder as TotalSegmentator 2.x ships its weights
(``~/.totalsegmentator/nnunet/results/<dataset>/<trainer>__nnUNetPlans__3d_fullres``): its dataset names, trainers,
``NibabelIOWithReorient`` reader and label maps (``totalsegmentator.map_to_binary``), on the small network here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from gateway.inference.volume import Volume
from tests.conftest import load_script

SPACING = (2.5, 1.5, 1.5)  # z, y, x: the network's grid before transpose_forward, and the CT's by default
PATCH = (24, 40, 40)
DATASET = "Dataset990_Toy"
LABELS = {"background": 0, "liver": 1, "Spinal cord": 2}
INTENSITIES = {"max": 3000.0, "mean": 48.5, "median": 41.0, "min": -1024.0, "percentile_00_5": -903.0,
               "percentile_99_5": 1207.0, "std": 251.25}
ARCHITECTURE: dict[str, Any] = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def load_importer() -> ModuleType:
    """``scripts/import_nnunet.py`` as the module ``import_nnunet`` (loaded once)."""
    return load_script("import_nnunet")


@dataclass(frozen=True)
class Recipe:
    """What to put in the folder; the defaults are a plain CT 3d_fullres model with two folds."""

    folds: tuple[int, ...] = (0, 1)
    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    configuration: str = "3d_fullres"
    normalisation: str = "CTNormalization"
    channels: dict[str, str] = field(default_factory=lambda: {"0": "CT"})
    labels: dict[str, Any] = field(default_factory=lambda: dict(LABELS))
    plans_extra: dict[str, Any] = field(default_factory=dict)  # merged into the configuration
    mirror_axes: tuple[int, ...] | None = (0, 1, 2)
    spacing: tuple[float, float, float] = SPACING  # z, y, x, before transpose_forward
    trainer: str = "nnUNetTrainer"
    dataset: str = DATASET  # DatasetXXX_Name
    #: plans.json's image_reader_writer; dataset.json's overwrite_image_reader_writer (None: not written)
    reader: str = "SimpleITKIO"
    reader_override: str | None = None


def plans(recipe: Recipe) -> dict[str, Any]:
    """``plans.json``: the configuration's spacing and patch are in transposed order, as the planner writes them."""
    order = recipe.transpose_forward
    backward = [order.index(axis) for axis in range(3)]
    configuration = {
        "data_identifier": f"nnUNetPlans_{recipe.configuration}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": [PATCH[axis] for axis in order],
        "median_image_size_in_voxels": [60, 60, 60], "spacing": [recipe.spacing[axis] for axis in order],
        "normalization_schemes": [recipe.normalisation] * len(recipe.channels),
        "use_mask_for_norm": [False] * len(recipe.channels),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": copy.deepcopy(ARCHITECTURE), "batch_dice": False, **recipe.plans_extra,
    }
    return {
        "dataset_name": recipe.dataset, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [recipe.spacing[axis] for axis in order],
        "original_median_shape_after_transp": [60, 60, 60], "image_reader_writer": recipe.reader,
        "transpose_forward": list(order), "transpose_backward": backward,
        "configurations": {recipe.configuration: configuration},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(INTENSITIES) for c in range(len(recipe.channels))},
    }


def dataset(recipe: Recipe) -> dict[str, Any]:
    """``dataset.json``."""
    data = {"channel_names": recipe.channels, "labels": recipe.labels, "numTraining": 10, "file_ending": ".nii.gz"}
    if recipe.reader_override is not None:
        data["overwrite_image_reader_writer"] = recipe.reader_override
    return data


def random_weights(seed: int, channels: int, classes: int) -> dict[str, torch.Tensor]:
    """A PlainConvUNet's state dict: He-initialised convolutions, and norm scales and shifts made random too."""
    torch.manual_seed(seed)
    arch = ARCHITECTURE
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     channels, classes, deep_supervision=True)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith(("norm.weight", "norm.bias")):
                parameter.copy_(torch.randn_like(parameter) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    weights: dict[str, torch.Tensor] = network.state_dict()
    return weights


def write_results_folder(root: Path, recipe: Recipe = Recipe(), seed: int = 0) -> Path:
    """``root/<dataset>/<trainer>__nnUNetPlans__<configuration>/`` with one checkpoint per fold."""
    folder = root / recipe.dataset / f"{recipe.trainer}__nnUNetPlans__{recipe.configuration}"
    folder.mkdir(parents=True)
    plan, data = plans(recipe), dataset(recipe)
    (folder / "plans.json").write_text(json.dumps(plan, indent=2), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    for fold in recipe.folds:
        (folder / f"fold_{fold}").mkdir()
        checkpoint = {
            "network_weights": random_weights(seed + fold, len(recipe.channels), len(recipe.labels)),
            "init_args": {"plans": plan, "configuration": recipe.configuration, "fold": fold, "dataset_json": data,
                          "device": "cpu"},
            "trainer_name": recipe.trainer,
            "inference_allowed_mirroring_axes": recipe.mirror_axes,
            "current_epoch": 1000,
        }
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


#: TotalSegmentator 2.x's ``total`` models (``map_tasks_config.py``): task id -> dataset folder, trainer, label map
#: (a key of ``class_map_5_parts``, or ``total``: ``class_map``'s) and isotropic spacing in mm.
TOTALSEGMENTATOR_TASKS: dict[int, tuple[str, str, str, float]] = {
    291: ("Dataset291_TotalSegmentator_part1_organs_1559subj", "nnUNetTrainerNoMirroring", "class_map_part_organs",
          1.5),
    292: ("Dataset292_TotalSegmentator_part2_vertebrae_1532subj", "nnUNetTrainerNoMirroring",
          "class_map_part_vertebrae", 1.5),
    293: ("Dataset293_TotalSegmentator_part3_cardiac_1559subj", "nnUNetTrainerNoMirroring", "class_map_part_cardiac",
          1.5),
    294: ("Dataset294_TotalSegmentator_part4_muscles_1559subj", "nnUNetTrainerNoMirroring", "class_map_part_muscles",
          1.5),
    295: ("Dataset295_TotalSegmentator_part5_ribs_1559subj", "nnUNetTrainerNoMirroring", "class_map_part_ribs", 1.5),
    297: ("Dataset297_TotalSegmentator_total_3mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring", "total", 3.0),
    298: ("Dataset298_TotalSegmentator_total_6mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring", "total", 6.0),
}


def totalsegmentator_labels(class_map_name: str) -> dict[str, int]:
    """``dataset.json``'s labels for a TotalSegmentator label map, read from the installed package."""
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts

    names = class_map["total"] if class_map_name == "total" else class_map_5_parts[class_map_name]
    return {"background": 0, **{name: int(value) for value, name in sorted(names.items())}}


def totalsegmentator_recipe(task_id: int, **changes: Any) -> Recipe:
    """A TotalSegmentator ``total`` model's folder in miniature: one fold, ``NibabelIOWithReorient`` in plans and
    dataset.json, the trainer's checkpoint without mirroring axes (the ``*NoMirroring`` trainers save ``None``)."""
    dataset_name, trainer, class_map_name, spacing = TOTALSEGMENTATOR_TASKS[task_id]
    fields: dict[str, Any] = {
        "folds": (0,), "labels": totalsegmentator_labels(class_map_name), "mirror_axes": None,
        "spacing": (spacing,) * 3, "trainer": trainer, "dataset": dataset_name, "reader": "NibabelIOWithReorient",
        "reader_override": "NibabelIOWithReorient",
    }
    return Recipe(**{**fields, **changes})


def ct_volume(shape: tuple[int, int, int] = (45, 60, 52), seed: int = 0,
              spacing: tuple[float, float, float] = SPACING) -> Volume:
    """Axial head-first-supine CT at *spacing* (z, y, x; orientation code SPL): air, a noisy body ellipsoid,
    spheres of lung, fat, bone and contrast (above the 99.5th percentile, so the clipping matters), all placed in
    mm about the volume's centre, so that every grid shows the same anatomy."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float).T * np.array(spacing)
    affine[:3, 3] = -(affine[:3, :3] @ ((np.array(shape) - 1) / 2))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    points = ((affine[:3, :3] @ grid.T).T + affine[:3, 3]).reshape(*shape, 3)  # LPS mm
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0)
    body = ((points / np.array([35.0, 38.0, 48.0])) ** 2).sum(axis=-1) <= 1
    hu[body] = 40 + rng.normal(0, 25, int(body.sum()))
    for centre, radius, value in (((-12, 0, 10), 11, -820), ((14, 8, -20), 9, -100), ((0, 24, 0), 7, 700),
                                  ((10, -10, 25), 6, 1500), ((-15, 12, -30), 8, 200)):
        hu[np.linalg.norm(points - np.array(centre), axis=-1) <= radius] = value
    hu = np.round(hu + rng.normal(0, 5, shape)).astype(np.int16)  # air stays far from 0: nnU-Net crops nothing
    return Volume(hu, affine, tuple(f"1.2.3.{k}" for k in range(shape[0])), "1.2.3", "HFS")


def load_totalseg_importer() -> ModuleType:
    """``scripts/import_totalsegmentator.py`` as the module ``import_totalsegmentator`` (loaded once), sharing
    :func:`load_importer`'s ``import_nnunet``."""
    load_importer()
    return load_script("import_totalsegmentator")


def write_totalsegmentator_weights(root: Path, task_ids: tuple[int, ...] = (291, 292, 293, 294, 295),
                                   seed: int = 0, **changes: Any) -> Path:
    """TotalSegmentator's weights folder (``nnunet/results``) in miniature: one results folder per dataset id of
    :data:`TOTALSEGMENTATOR_TASKS` (small random networks, *changes* to every recipe); return *root*."""
    for offset, task_id in enumerate(task_ids):
        write_results_folder(root, totalsegmentator_recipe(task_id, **changes), seed=seed + 10 * offset)
    return root
