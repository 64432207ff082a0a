#!/usr/bin/env python3
"""Import a trained nnU-Net v2 model as a model package ("bring your own model"): ONNX + manifest.

Usage::

    scripts/import_nnunet.py RESULTS_FOLDER [--fold 0 --fold 1 ...] --out models/NAME

``RESULTS_FOLDER`` is a trained configuration, ``DatasetXXX_Name/<trainer>__<plans>__<configuration>/``,
holding ``plans.json``, ``dataset.json`` and ``fold_<n>/checkpoint_final.pth``. Without ``--fold``
the folds present are used, as ``nnUNetPredictor.auto_detect_available_folds`` does.

What it reproduces, and where in nnunetv2 2.8.1 each fact comes from:

* the network: ``inference/predict_from_raw_data.py::initialize_from_trained_model_folder``, i.e. the
  trainer class's ``build_network_architecture(..., enable_deep_supervision=False)`` and
  ``load_state_dict`` of each fold; several folds are one module averaging their logits (nnU-Net
  averages the folds' sliding-window logits, ``predict_logits_from_preprocessed_data``, which is the
  same sum since tiling and mirroring are linear);
* the input: ``transpose_forward`` (network axis ``i`` is input axis ``transpose_forward[i]``), the
  configuration's ``spacing`` and ``patch_size``, ``CTNormalization`` (clip to the foreground
  percentiles 0.5 and 99.5, minus the mean, over ``max(std, 1e-8)``), padding with 0 after
  normalisation, centred (``acvl_utils`` ``pad_nd_image``);
* the resampling (``resampling = "nnunet"`` in the manifest): ``preprocessing/resampling/default_resampling.py``'s
  ``resample_data_or_seg_to_shape`` as the default plans configure it, the normalised CT cubic (order 3) to the
  configuration's spacing and the logits linearly (order 1) back to the CT's, both with nnU-Net's automatic
  separate-z rule (anisotropy above 3: in-plane first, then nearest along the coarse axis);
* the sliding window: tile step ``--tile-step`` (``nnUNetPredictor``'s default 0.5; TotalSegmentator runs its
  ``total`` models at 0.8), written as ``overlap = 1 - step``, Gaussian weighting, and test-time mirroring over the
  checkpoint's ``inference_allowed_mirroring_axes`` (``sliding_window_prediction.py``): none where that is ``None``,
  as the ``*NoMirroring`` trainers save it, or with ``--disable-tta`` (TotalSegmentator's own default);
* the sums: tiles accumulated in float32, or with ``--accumulate float16`` in half precision as nnU-Net 2.8.1 does
  (``predict_sliding_window_return_logits``; the manifest's ``accumulate``), half the memory for many classes;
* the output: softmax over the averaged logits, one class per ``dataset.json`` label.

Which way the network's axes run is the image reader's doing (``plans.json``'s ``image_reader_writer``, which
nnU-Net's preprocessor instantiates at inference and its planner took from ``dataset.json``'s
``overwrite_image_reader_writer``; the two must agree):

* ``NibabelIOWithReorient`` (TotalSegmentator's): ``as_reoriented(io_orientation(affine))`` turns every image to
  RAS, then the array is transposed ``(2, 1, 0)``: the axes increase toward S, A, R, whatever the file stored, so
  the orientation is ``SAR`` and ``--orientation`` may only repeat it;
* ``SimpleITKIO`` (nnU-Net's default): the stored voxel axes, reversed; ``--orientation`` says what they were in
  training (default ``SPL``, axial LPS slices);
* ``NibabelIO``: the stored voxel axes too, so refused unless ``--orientation`` says what they were.

Trainer classes are found as nnU-Net names them, but without nnU-Net's search, which imports every trainer module
(the Primus trainers import timm and so torchvision, which fails where torchvision does not match torch): the
module of ``nnunetv2/training/nnUNetTrainer`` (then ``nnUNet_extTrainer``) whose source defines ``class <Name>(``
is imported alone. TotalSegmentator's own trainers (:data:`TOTALSEGMENTATOR_TRAINERS`) come from
``totalsegmentator.custom_trainers`` where it imports, else from the nnU-Net trainer they derive from, which builds
the same network (none of them overrides ``build_network_architecture``).

It refuses (exit code 2, naming the problem) what the gateway cannot reproduce: several input channels,
a normalisation other than ``CTNormalization``, an image reader other than the three above, an unknown
trainer class, a custom preprocessor, resampling functions or arguments other
than the defaults above, region-based training, a cascade, a 2d configuration, missing files. The package
is built and checked (ONNX written with IR version 8 and compared with torch on a random tile, the manifest
with ``gateway.inference.manifest.load_model_package``) in a temporary folder beside ``--out`` and renamed into place,
so a failed import leaves no half package. Exit codes: 0 success, 1 failure, 2 refused.
"""

from __future__ import annotations

import argparse
import colorsys
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nnunetv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gateway.errors import ConfigError  # noqa: E402
from gateway.inference.manifest import load_model_package  # noqa: E402

OPSET = 17
#: ONNX IR version written: opset 17's. onnxruntime 1.31 refuses IR 14, which onnx >= 1.23 writes by default.
IR_VERSION = 8
INPUT, OUTPUT = "image", "logits"
TOLERANCE = 1e-3  # largest ONNX-vs-torch difference of a logit on the check tile
TILE_STEP = 0.5  # nnUNetPredictor's default tile_step_size
MAX_LABELS = 256  # foreground classes a model package may hold
#: The image readers the gateway reproduces -> the orientation they give the network's axes (before
#: ``transpose_forward``); None: the stored voxel axes, which the folder does not tell.
READERS: dict[str, str | None] = {"NibabelIOWithReorient": "SAR", "SimpleITKIO": None, "NibabelIO": None}
#: What ``--orientation`` is, for a reader that keeps the stored axes, when not given (``SimpleITKIO`` only).
DEFAULT_ORIENTATION = {"SimpleITKIO": "SPL"}
EXT_TRAINER_VARIABLE = "nnUNet_extTrainer"  # nnU-Net's: folders of further trainer classes
#: TotalSegmentator 2.x's trainers that nnunetv2 lacks (``totalsegmentator/custom_trainers.py``) -> the nnunetv2
#: trainer each derives from; they change training only, so that one builds the same network.
TOTALSEGMENTATOR_TRAINERS: dict[str, str] = {
    "nnUNetTrainer_MOSAIC_1k_QuarterLR_NoMirroring": "nnUNetTrainerNoMirroring",
    "nnUNetTrainerDiceTopK10Loss_2000epochs": "nnUNetTrainerDiceTopK10Loss",
    "nnUNetTrainerSkeletonRecall": "nnUNetTrainer",
}
STD_EPSILON = 1e-8  # CTNormalization divides by max(std, 1e-8)
#: The resampling the gateway reproduces (``resampling = "nnunet"``): nnU-Net's default plans. Arguments the
#: plans leave out take ``resample_data_or_seg_to_shape``'s defaults (``force_separate_z=False`` among them).
RESAMPLING_FN = "resample_data_or_seg_to_shape"
RESAMPLING_DEFAULTS: dict[str, object] = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": False,
                                          "separate_z_anisotropy_threshold": ANISO_THRESHOLD}
RESAMPLING: dict[str, dict[str, object]] = {  # resampling_fn_<kind>_kwargs -> the arguments reproduced
    "data": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None, "separate_z_anisotropy_threshold": 3},
    "probabilities": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None,
                      "separate_z_anisotropy_threshold": 3},
}
_ORIENTATION = re.compile(r"^(?=.*[LR])(?=.*[AP])(?=.*[SI])[LRAPSI]{3}$")
#: Distinct colours for the labels, in order (ROI Display Color, PS3.3 C.8.8.6).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128), (255, 255, 255), (255, 99, 71), (0, 255, 127), (65, 105, 225),
    (255, 165, 0), (138, 43, 226), (0, 191, 255), (255, 20, 147), (154, 205, 50), (139, 69, 19),
    (47, 79, 79), (218, 112, 214),
)


class Refused(Exception):
    """The model uses something the gateway cannot reproduce; the message names it (exit code 2)."""


class ImportFailure(Exception):
    """The import went wrong on the way (exit code 1)."""


@dataclass(frozen=True)
class Options:
    """What the command line asks for, beyond the results folder."""

    folds: tuple[str, ...] | None
    checkpoint: str
    out: Path
    #: Patient direction each axis of nnU-Net's input increases toward; None: the image reader's (see READERS).
    orientation: str | None = None
    #: Test-time mirroring over the checkpoint's axes (nnU-Net's default); False: none (TotalSegmentator's).
    mirroring: bool = True
    tile_step: float = TILE_STEP  # nnUNetPredictor's tile_step_size; the manifest's overlap is 1 - tile_step
    dynamic: bool = False
    name: str | None = None
    version: str = "1.0.0"
    renames: tuple[tuple[str, str], ...] = ()
    #: The dtype tiles are summed in (the manifest's ``accumulate``): nnU-Net 2.8.1 sums in float16.
    accumulate: str = "float32"
    #: The manifest's ``resampling``: "nnunet" (nnU-Net's own, from the CT's spacing), or "totalsegmentator" (the CT
    #: first resampled to the model's spacing as TotalSegmentator does, nnU-Net's resampling then an identity).
    resampling: str = "nnunet"
    #: Structure name (after ``renames``) -> (display colour, RT ROI Interpreted Type), over the palette and ORGAN.
    styles: tuple[tuple[str, tuple[int, int, int], str], ...] = ()


@dataclass(frozen=True)
class TrainedModel:
    """A trained nnU-Net configuration as read from its results folder."""

    folder: Path
    trainer: str
    plans_name: str
    configuration_name: str
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration: dict[str, Any]  # with "inherits_from" resolved
    folds: tuple[str, ...]
    checkpoints: tuple[dict[str, Any], ...]  # one per fold, in the order of ``folds``

    @property
    def dataset_name(self) -> str:
        """``DatasetXXX_Name``: the plans' ``dataset_name``, else the parent folder's name."""
        return str(self.plans.get("dataset_name") or self.folder.parent.name)

    @property
    def mirror_axes(self) -> list[int]:
        """The tile axes nnU-Net mirrors at inference (the first fold's, as ``nnUNetPredictor``)."""
        axes = self.checkpoints[0].get("inference_allowed_mirroring_axes")
        return [] if axes is None else [int(axis) for axis in axes]


# --- reading the results folder -------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise Refused(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Refused(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise Refused(f"{path}: not a JSON object")
    return data


def parse_folder_name(folder: Path) -> tuple[str, str, str]:
    """``(trainer, plans, configuration)`` from ``<trainer>__<plans>__<configuration>``."""
    parts = folder.name.split("__")
    if len(parts) != 3 or not all(parts):
        raise Refused(f"{folder}: not an nnU-Net results folder name <trainer>__<plans>__<configuration>")
    return parts[0], parts[1], parts[2]


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """The configuration *name* of *plans*, merged over the ones it inherits from (as ``PlansManager``)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict):
        raise Refused("plans.json: no 'configurations'")
    resolved: dict[str, Any] = {}
    seen: list[str] = []
    while name not in seen:
        if name not in configurations:
            raise Refused(f"plans.json: no configuration {name!r} (it has {sorted(configurations)})")
        seen.append(name)
        resolved = {**configurations[name], **resolved}
        if "inherits_from" not in configurations[name]:
            return resolved
        name = configurations[name]["inherits_from"]
    raise Refused(f"plans.json: configurations inherit from each other in a circle: {' -> '.join([*seen, name])}")


def available_folds(folder: Path, checkpoint: str) -> tuple[str, ...]:
    """The ``fold_<n>`` folders holding *checkpoint*, ``fold_all`` excluded (``auto_detect_available_folds``)."""
    folds = sorted(int(path.name.removeprefix("fold_")) for path in folder.glob("fold_*")
                   if path.name.removeprefix("fold_").isdigit() and (path / checkpoint).is_file())
    if not folds:
        raise Refused(f"{folder}: no fold_<n>/{checkpoint}")
    return tuple(str(fold) for fold in folds)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise Refused(f"{path}: missing")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors alike
        raise Refused(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    keys = ("network_weights", "trainer_name", "init_args")
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in keys) \
            or not isinstance(checkpoint["init_args"], dict):
        raise Refused(f"{path}: not an nnU-Net checkpoint (a dict with {', '.join(keys)})")
    return checkpoint


def read_trained_model(folder: Path, folds: Sequence[str] | None, checkpoint: str) -> TrainedModel:
    """Read plans, dataset and the folds' checkpoints; check they belong together."""
    if not folder.is_dir():
        raise Refused(f"{folder}: no such folder")
    trainer, plans_name, configuration_name = parse_folder_name(folder)
    plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    chosen = tuple(folds) if folds else available_folds(folder, checkpoint)
    checkpoints = tuple(_load_checkpoint(folder / f"fold_{fold}" / checkpoint) for fold in chosen)
    for fold, data in zip(chosen, checkpoints, strict=True):
        trained = data["init_args"].get("configuration", configuration_name)
        if data["trainer_name"] != trainer or trained != configuration_name:
            raise Refused(f"fold_{fold}/{checkpoint}: trained as {data['trainer_name']}__{trained}, "
                          f"but the folder says {trainer}__{configuration_name}")
    return TrainedModel(folder, trainer, plans_name, configuration_name, plans, dataset,
                        resolve_configuration(plans, configuration_name), chosen, checkpoints)


# --- what the gateway can reproduce ---------------------------------------------------------------------------


def _channel_count(dataset: dict[str, Any]) -> int:
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict):
        raise Refused("dataset.json: no 'channel_names'")
    return len(channels)


def unsupported(model: TrainedModel) -> list[str]:
    """Every reason the gateway cannot run *model* exactly as nnU-Net does (empty: it can)."""
    config, problems = model.configuration, []
    if (count := _channel_count(model.dataset)) != 1:
        problems.append(f"dataset.json: {count} input channels; the gateway feeds one (CT)")
    if config.get("normalization_schemes") != ["CTNormalization"]:
        problems.append(f"normalisation {config.get('normalization_schemes')}: only ['CTNormalization'] is "
                        "reproduced")
    if config.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        problems.append(f"preprocessor {config['preprocessor_name']}: only DefaultPreprocessor is reproduced")
    if model.plans.get("label_manager", "LabelManager") != "LabelManager":
        problems.append(f"label manager {model.plans['label_manager']}: only LabelManager (softmax) is reproduced")
    labels = model.dataset.get("labels")
    if not isinstance(labels, dict):
        problems.append("dataset.json: no 'labels'")
    elif regions := [name for name, value in labels.items() if isinstance(value, list | tuple)]:
        problems.append(f"region-based training (labels {regions} are lists of classes): not reproduced")
    if config.get("previous_stage") is not None or model.configuration_name == "3d_cascade_fullres":
        problems.append(f"configuration {model.configuration_name} is a cascade stage (it needs the previous "
                        "stage's segmentation): not reproduced")
    if len(config.get("patch_size", [])) != 3 or len(config.get("spacing", [])) != 3:
        problems.append(f"configuration {model.configuration_name}: not 3d (patch {config.get('patch_size')}); "
                        "only 3d networks are reproduced")
    if sorted(model.plans.get("transpose_forward", [])) != [0, 1, 2]:
        problems.append(f"plans.json: transpose_forward {model.plans.get('transpose_forward')} is not an axis order")
    return problems + resampling_problems(config)


def _same(value: object, expected: object) -> bool:
    """Equal and of the same kind (``True`` is not ``1``, ``None`` not ``False``); ints and floats compare."""
    if isinstance(expected, bool) or expected is None:
        return value is expected
    return isinstance(value, int | float) and not isinstance(value, bool) and value == expected


def resampling_problems(config: Mapping[str, Any]) -> list[str]:
    """Why the configuration's image or logit resampling is not the one the gateway reproduces (empty: it is).

    ``resampling_fn_seg`` is not checked: it resamples the nonzero mask only, which ``CTNormalization`` ignores
    and the prediction never sees.
    """
    problems = []
    for kind, expected in RESAMPLING.items():
        function, kwargs = config.get(f"resampling_fn_{kind}"), config.get(f"resampling_fn_{kind}_kwargs", {})
        if function != RESAMPLING_FN:
            problems.append(f"resampling_fn_{kind} {function!r}: only {RESAMPLING_FN!r} is reproduced")
            continue
        if not isinstance(kwargs, dict):
            problems.append(f"resampling_fn_{kind}_kwargs {kwargs!r}: not a JSON object")
            continue
        unknown = sorted(set(kwargs) - set(RESAMPLING_DEFAULTS))
        effective = {**RESAMPLING_DEFAULTS, **kwargs}
        differ = [f"{key}={effective[key]!r}" for key in expected if not _same(effective[key], expected[key])]
        if unknown or differ:
            wanted = ", ".join(f"{key}={value!r}" for key, value in expected.items())
            problems.append(f"resampling_fn_{kind}_kwargs {kwargs}: {', '.join(differ + unknown)} not reproduced "
                            f"(only {wanted})")
    return problems


def image_reader(model: TrainedModel) -> str:
    """The reader nnU-Net's inference reads images with: ``plans.json``'s ``image_reader_writer``, which must agree
    with ``dataset.json``'s ``overwrite_image_reader_writer`` where that is set; without either, SimpleITKIO where
    it reads the ``file_ending`` (``determine_reader_writer_from_file_ending``'s choice for the usual endings)."""
    planned = model.plans.get("image_reader_writer")
    override = model.dataset.get("overwrite_image_reader_writer")
    override = None if override in (None, "None") else override
    if planned is not None and override is not None and planned != override:
        raise Refused(f"plans.json reads images with {planned}, dataset.json's overwrite_image_reader_writer says "
                      f"{override}: which way the network's axes run is ambiguous")
    reader = planned if planned is not None else override
    if reader is None:
        ending = str(model.dataset.get("file_ending", "")).lower()
        if ending not in (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl"):
            raise Refused(f"plans.json names no image_reader_writer, and for file_ending {ending!r} nnU-Net would "
                          "not use SimpleITKIO: give the folder's plans.json its reader")
        reader = "SimpleITKIO"
    if not isinstance(reader, str) or reader not in READERS:
        raise Refused(f"image reader {reader!r}: the gateway reproduces the axes of {', '.join(READERS)} only")
    return reader


def input_orientation(reader: str, requested: str | None) -> str:
    """The orientation of nnU-Net's input array (before ``transpose_forward``) under *reader*; *requested* is
    ``--orientation`` (None: not given)."""
    if requested is not None and not _ORIENTATION.match(requested):
        raise Refused(f"--orientation {requested!r}: 3 letters, one of L/R, A/P and S/I each")
    fixed = READERS[reader]
    if fixed is not None:
        if requested is not None and requested != fixed:
            raise Refused(f"--orientation {requested}: {reader} reorients every image so that the network's axes "
                          f"run {fixed}; nothing else is right for this model")
        return fixed
    if requested is not None:
        return requested
    if reader in DEFAULT_ORIENTATION:
        return DEFAULT_ORIENTATION[reader]
    raise Refused(f"{reader} keeps each training image's stored voxel axes, which the folder does not record: "
                  "say with --orientation which patient direction each axis increased toward (e.g. RAS-stored "
                  "NIfTI: SAR; LPS: SPL)")


def intensity_properties(plans: dict[str, Any]) -> dict[str, float]:
    """Channel 0's foreground intensity statistics (``PlansManager.foreground_intensity_properties_per_channel``)."""
    per_channel = plans.get("foreground_intensity_properties_per_channel",
                            plans.get("foreground_intensity_properties_by_modality"))
    props = per_channel.get("0") if isinstance(per_channel, dict) else None
    keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
    if not isinstance(props, dict) or not all(isinstance(props.get(key), int | float) for key in keys):
        raise Refused(f"plans.json: foreground_intensity_properties_per_channel['0'] needs numbers {', '.join(keys)}")
    return {key: float(props[key]) for key in keys}


# --- labels ---------------------------------------------------------------------------------------------------


def colours(count: int) -> list[tuple[int, int, int]]:
    """*count* display colours: :data:`PALETTE`'s, then hues a golden angle apart (lightness and saturation
    alternating), so that neighbouring labels of a large model stay apart."""
    out = list(PALETTE[:count])
    for index in range(len(out), count):
        hue = (index * 0.618033988749895) % 1.0
        red, green, blue = colorsys.hls_to_rgb(hue, (0.45, 0.6, 0.75)[index % 3], (0.9, 0.65)[index % 2])
        out.append((round(red * 255), round(green * 255), round(blue * 255)))
    return out


def tg263_name(name: str) -> str:
    """A structure name an RT Structure Set accepts: TG-263 characters, at most 16, no backslash."""
    safe = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_^-]", "_", name.strip())).strip("_")
    return safe[:16].rstrip("_")


_SIDE_WORDS = frozenset({"left", "right", "l", "r", "lt", "rt", "sin", "dx"})


def _words(name: str) -> set[str]:
    return {word.lower() for word in re.split(r"[^A-Za-z0-9]+", name) if word}


def loses_side(name: str) -> bool:
    """Whether cutting *name* to a structure name drops the word that says its side (``lung_middle_lobe_right``
    would become ``lung_middle_lobe``): a structure of one side must never come out as a structure of neither."""
    side = _words(name) & _SIDE_WORDS
    return bool(side) and not side & _words(tg263_name(name))


def class_names(dataset: dict[str, Any], renames: Sequence[tuple[str, str]]) -> list[str]:
    """The structure name of each foreground class, in class index order (1, 2, ...).

    nnU-Net's segmentation is the argmax index over its sorted label values (``LabelManager.all_labels``,
    the ``ignore`` label excluded), so class ``c`` is the ``c``-th smallest value.
    """
    labels = {name: int(value) for name, value in dataset["labels"].items() if name != "ignore"}
    unknown = [old for old, _ in renames if old not in labels]
    if unknown:
        raise Refused(f"--rename: no label {unknown} in dataset.json (labels: {sorted(labels)})")
    if len(set(labels.values())) != len(labels) or 0 not in labels.values():
        raise Refused(f"dataset.json: labels {labels} need one background 0 and distinct values")
    renamed = {name: dict(renames).get(name, name) for name in labels}
    ordered = sorted((value, name) for name, value in labels.items() if value != 0)
    names = [tg263_name(renamed[name]) for _, name in ordered]
    problems = [f"label {old!r} has no usable name; give one with --rename {old}=NAME"
                for (_, old), new in zip(ordered, names, strict=True) if not new]
    problems += [f"label {old!r} would lose its side as {new!r} (16 characters); give a name that keeps it, e.g. "
                 f"--rename {old}=NAME_L" for (_, old), new in zip(ordered, names, strict=True)
                 if new and loses_side(renamed[old])]
    for new in sorted({new for new in names if new and names.count(new) > 1}):
        olds = [old for (_, old), safe in zip(ordered, names, strict=True) if safe == new]
        problems.append(f"labels {olds} all become {new!r}; tell them apart with --rename old=New")
    if not names:
        problems.append("dataset.json: no label besides the background")
    if len(names) > MAX_LABELS:
        problems.append(f"{len(names)} labels; a model package holds at most {MAX_LABELS}")
    if problems:
        raise Refused("; ".join(problems))
    return names


# --- the network ----------------------------------------------------------------------------------------------


class FoldAverage(nn.Module):
    """The mean of the folds' logits (one fold: that fold's)."""

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.folds = nn.ModuleList(networks)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor = self.folds[0](image)
        for network in self.folds[1:]:
            total = total + network(image)
        return total / len(self.folds) if len(self.folds) > 1 else total


def _trainer_module(name: str, folder: Path) -> Path | None:
    """The first ``.py`` file under *folder* (sorted) whose source defines ``class <name>(``."""
    pattern = re.compile(rf"^class\s+{re.escape(name)}\s*\(", re.MULTILINE)
    for path in sorted(folder.rglob("*.py")):
        try:
            if pattern.search(path.read_text(encoding="utf-8", errors="replace")):
                return path
        except OSError:
            continue
    return None


def _import_class(name: str, path: Path, module_name: str) -> Any:
    try:
        if module_name in sys.modules or importlib.util.find_spec(module_name) is not None:
            module = importlib.import_module(module_name)
        else:  # an nnUNet_extTrainer file outside any package on sys.path
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"no loader for {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    except Exception as exc:  # the trainer's module may import anything, and fail in any way
        raise Refused(f"trainer {name}: importing {path} failed ({type(exc).__name__}: {exc})") from None
    return getattr(module, name, None)


def _totalsegmentator_trainer(name: str) -> Any:
    """*name* from ``totalsegmentator.custom_trainers`` where that imports, else the nnunetv2 trainer it derives
    from (:data:`TOTALSEGMENTATOR_TRAINERS`)."""
    try:
        custom = importlib.import_module("totalsegmentator.custom_trainers")
    except Exception:  # not installed, or its imports fail here: the base builds the same network
        return find_trainer_class(TOTALSEGMENTATOR_TRAINERS[name])
    return getattr(custom, name, None) or find_trainer_class(TOTALSEGMENTATOR_TRAINERS[name])


def find_trainer_class(name: str) -> Any:  # a subclass of nnUNetTrainer
    """The trainer class *name*, importing only the module that defines it: nnunetv2's trainers, TotalSegmentator's
    (:data:`TOTALSEGMENTATOR_TRAINERS`), then the folders on ``nnUNet_extTrainer``."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise Refused(f"trainer {name!r}: not a Python class name")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    root = Path(nnunetv2.__file__).resolve().parent / "training" / "nnUNetTrainer"
    found: Any = None
    if (path := _trainer_module(name, root)) is not None:
        relative = path.relative_to(root.parent.parent).with_suffix("")
        found = _import_class(name, path, ".".join(("nnunetv2", *relative.parts)))
    elif name in TOTALSEGMENTATOR_TRAINERS:
        found = _totalsegmentator_trainer(name)
    else:
        for folder in filter(None, os.environ.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep)):
            if Path(folder).is_dir() and (path := _trainer_module(name, Path(folder))) is not None:
                found = _import_class(name, path, f"nnunet_ext_trainer_{path.stem}")
                break
    if found is None:
        raise Refused(f"trainer {name}: no class of that name in nnunetv2 {nnunetv2_version()}, among "
                      f"TotalSegmentator's ({', '.join(TOTALSEGMENTATOR_TRAINERS)}) or on nnUNet_extTrainer; "
                      "the network it builds is unknown")
    if not (isinstance(found, type) and issubclass(found, nnUNetTrainer)):
        raise Refused(f"trainer {name}: {found!r} is not an nnUNetTrainer")
    return found


def nnunetv2_version() -> str:
    try:
        from importlib.metadata import version

        return version("nnunetv2")
    except Exception:  # metadata missing: the version is only for the message
        return "(version unknown)"


def build_network(model: TrainedModel, classes: int) -> nn.Module:
    """The architecture as ``initialize_from_trained_model_folder`` builds it, without deep supervision."""
    plans_manager = PlansManager(model.plans)
    config = plans_manager.get_configuration(model.configuration_name)
    trainer = find_trainer_class(model.trainer)
    if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:
        network: nn.Module = trainer.build_network_architecture(plans_manager, config, 1, classes,
                                                                enable_deep_supervision=False)
        return network
    network = trainer.build_network_architecture(
        config.network_arch_class_name, config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import, 1, classes, enable_deep_supervision=False)
    return network


def load_folds(model: TrainedModel, classes: int) -> FoldAverage:
    """One network per fold with its weights, averaged, in eval mode."""
    networks = []
    for fold, checkpoint in zip(model.folds, model.checkpoints, strict=True):
        network = build_network(model, classes)
        try:
            network.load_state_dict(checkpoint["network_weights"])
        except RuntimeError as exc:
            raise Refused(f"fold_{fold}: the weights do not fit the plans' architecture ({exc})") from None
        networks.append(network)
    return FoldAverage(networks).eval()


def export_onnx(module: nn.Module, patch: Sequence[int], path: Path, *, dynamic: bool) -> None:
    """``image`` [batch, 1, *patch] -> ``logits`` [batch, classes, *patch], opset 17, batch always dynamic."""
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"} if dynamic else {0: "batch"}
    example = torch.zeros((1, 1, *patch), dtype=torch.float32)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and instance-norm notices
        warnings.simplefilter("ignore")
        try:  # TorchScript, not torch.export: the latter needs onnxscript, which the [nnunet] extra lacks
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: axes, OUTPUT: axes})
        except Exception as exc:  # the exporter raises whatever the traced operators raise
            raise ImportFailure(f"ONNX export failed ({type(exc).__name__}: {exc})") from exc


def limit_ir_version(path: Path) -> int:
    """Lower the ONNX file's IR version to :data:`IR_VERSION` where it is higher and its opsets allow; return
    the version the file has."""
    model = onnx.load(str(path))
    if model.ir_version <= IR_VERSION:
        return int(model.ir_version)
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if needed > IR_VERSION:
        raise ImportFailure(f"the ONNX file's opsets {[(o.domain, o.version) for o in model.opset_import]} need IR "
                            f"version {needed}; the gateway's onnxruntime reads up to {IR_VERSION}")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return IR_VERSION


def check_onnx(module: nn.Module, path: Path, patch: Sequence[int]) -> float:
    """The largest difference between ONNX Runtime's and torch's logits on a random tile."""
    tile = np.random.default_rng(0).normal(0.0, 1.0, (1, 1, *patch)).astype(np.float32)
    with torch.inference_mode():
        expected = module(torch.from_numpy(tile)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run([OUTPUT], {INPUT: tile})
    if actual.shape != expected.shape:
        raise ImportFailure(f"ONNX output shape {actual.shape}, torch's {expected.shape}")
    return float(np.abs(actual - expected).max())


# --- the manifest ---------------------------------------------------------------------------------------------


def _toml(value: object) -> str:
    """A TOML value: strings, numbers, booleans, lists and inline tables (dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _table(header: str, values: Mapping[str, object]) -> str:
    return "\n".join([header, *(f"{key} = {_toml(value)}" for key, value in values.items())]) + "\n"


def input_section(model: TrainedModel, options: Options) -> dict[str, object]:
    """``[input]``: nnU-Net's axis order, grid, tiling, mirroring, padding and ``CTNormalization``; *options* with
    the orientation resolved (:func:`input_orientation`)."""
    if options.orientation is None:
        raise ValueError("input_section needs the orientation resolved")
    transpose = [int(axis) for axis in model.plans["transpose_forward"]]
    props = intensity_properties(model.plans)
    return {
        "orientation": "".join(options.orientation[axis] for axis in transpose),
        "spacing_mm": [float(s) for s in model.configuration["spacing"]],
        "patch_size": [int(p) for p in model.configuration["patch_size"]],
        "output_crop": [0, 0, 0],
        "layout": "channels_first",
        "overlap": round(1 - options.tile_step, 12),
        "tile_weighting": "gaussian",
        "mirror_axes": model.mirror_axes if options.mirroring else [],
        "batch_size": 1,
        "padding_value": 0.0,
        "pad_position": "centre",
        "resampling": options.resampling,
        "accumulate": options.accumulate,
        "normalisation": {"kind": "zscore", "mean": props["mean"], "std": max(props["std"], STD_EPSILON),
                          "hu_min": props["percentile_00_5"], "hu_max": props["percentile_99_5"]},
    }


def manifest_text(model: TrainedModel, options: Options, names: Sequence[str]) -> str:
    """The whole ``manifest.toml``."""
    description = (f"nnU-Net v2 {model.trainer}__{model.plans_name}__{model.configuration_name}, "
                   f"folds {', '.join(model.folds)}, {model.dataset_name}")
    info = {"name": options.name or options.out.name, "version": options.version, "modality": "CT",
            "description": description}
    parts = [f"# Imported by scripts/import_nnunet.py from {model.folder.name}\n", _table("[model]", info),
             _table("[input]", input_section(model, options)),
             _table("[output]", {"kind": "softmax", "logits": True})]
    styles = {name: (colour, kind) for name, colour, kind in options.styles}
    for value, (name, colour) in enumerate(zip(names, colours(len(names)), strict=True), start=1):
        colour, kind = styles.get(name, (colour, "ORGAN"))
        parts.append(_table("[[labels]]", {"value": value, "name": name, "colour": list(colour),
                                           "interpreted_type": kind}))
    return "\n".join(parts)


# --- the package ----------------------------------------------------------------------------------------------


def _stage(out: Path, module: nn.Module, model: TrainedModel, options: Options, names: Sequence[str]) -> Path:
    """Write and check the package in a fresh folder beside *out*; return the folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        patch = [int(p) for p in model.configuration["patch_size"]]
        export_onnx(module, patch, staging / "model.onnx", dynamic=options.dynamic)
        limit_ir_version(staging / "model.onnx")
        difference = check_onnx(module, staging / "model.onnx", patch)
        print(f"ONNX vs torch on a random {patch} tile: max abs logit difference {difference:.2e}")
        if not difference <= TOLERANCE:
            raise ImportFailure(f"ONNX differs from torch by {difference:.2e} (> {TOLERANCE:g})")
        (staging / "manifest.toml").write_text(manifest_text(model, options, names), encoding="utf-8")
        load_model_package(staging)
    except BaseException:
        shutil.rmtree(staging)
        raise
    staging.chmod(0o755)
    return staging


def install_package(out: Path, staging: Path) -> None:
    """Put *staging* at *out*, replacing a previous package only once the new one is complete."""
    previous = out.parent / f".{out.name}.previous"
    if previous.exists():
        shutil.rmtree(previous)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    if previous.exists():
        shutil.rmtree(previous)


def run_import(folder: Path, options: Options) -> Path:
    """Read, check, convert and install; return the package folder."""
    if not 0 < options.tile_step <= 1:
        raise Refused(f"--tile-step {options.tile_step:g}: a fraction of the patch in (0, 1]")
    if options.accumulate not in ("float32", "float16"):
        raise Refused(f"--accumulate {options.accumulate}: float32 or float16")
    if options.resampling not in ("nnunet", "totalsegmentator"):
        raise Refused(f"--resampling {options.resampling}: nnunet or totalsegmentator")
    input_orientation("SimpleITKIO", options.orientation)  # a malformed --orientation before reading anything
    model = read_trained_model(folder, options.folds, options.checkpoint)
    if problems := unsupported(model):
        raise Refused("; ".join(problems))
    reader = image_reader(model)
    options = replace(options, orientation=input_orientation(reader, options.orientation))
    names = class_names(model.dataset, options.renames)
    module = load_folds(model, len(names) + 1)
    install_package(options.out, _stage(options.out, module, model, options, names))
    print(f"{model.folder.name}: folds {', '.join(model.folds)}, {len(names)} labels ({', '.join(names)}); "
          f"{reader}, orientation {options.orientation}, tile step {options.tile_step:g}, "
          f"mirror axes {input_section(model, options)['mirror_axes']}")
    return options.out


# --- command line ---------------------------------------------------------------------------------------------


def _rename(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise argparse.ArgumentTypeError(f"{text!r}: expected old=New")
    return old, new


def _fold(text: str) -> str:
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a fold is a number or 'all'")
    return text


def parse_options(argv: Sequence[str] | None) -> tuple[Path, Options]:
    """The results folder and the options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="<trainer>__<plans>__<configuration> folder")
    parser.add_argument("--fold", action="append", type=_fold, help="fold to use (repeat); default: all present")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold")
    parser.add_argument("--out", type=Path, required=True, help="package folder to write (models/NAME)")
    parser.add_argument("--orientation",
                        help="patient direction each axis of nnU-Net's input array increases toward, before "
                             "transpose_forward; default: the image reader's (NibabelIOWithReorient: SAR; "
                             "SimpleITKIO: SPL, as it reads axial LPS images); required for NibabelIO")
    parser.add_argument("--tile-step", type=float, default=TILE_STEP,
                        help="sliding-window step as a fraction of the patch (nnU-Net's default 0.5; "
                             "TotalSegmentator runs total, total_v3 and total_mr at 0.8)")
    parser.add_argument("--disable-tta", action="store_true",
                        help="no test-time mirroring (TotalSegmentator's default); *NoMirroring trainers have none")
    parser.add_argument("--accumulate", choices=("float32", "float16"), default="float32",
                        help="dtype the tiles are summed in (nnU-Net 2.8.1 and TotalSegmentator: float16, half the "
                             "memory; default float32)")
    parser.add_argument("--resampling", choices=("nnunet", "totalsegmentator"), default="nnunet",
                        help="nnunet: nnU-Net's resampling from the CT's spacing (default); totalsegmentator: the "
                             "CT resampled to the model's spacing first as TotalSegmentator does (linear, to int32), "
                             "labels back by nearest neighbour")
    parser.add_argument("--dynamic", action="store_true", help="export with dynamic spatial axes")
    parser.add_argument("--name", help="model name in the manifest (default: the --out folder's name)")
    parser.add_argument("--version", default="1.0.0", help="model version in the manifest")
    parser.add_argument("--rename", action="append", type=_rename, default=[], metavar="OLD=NEW",
                        help="structure name for a dataset.json label (repeat)")
    args = parser.parse_args(argv)
    options = Options(folds=tuple(args.fold) if args.fold else None, checkpoint=args.checkpoint,
                      out=args.out.resolve(), orientation=args.orientation, mirroring=not args.disable_tta,
                      tile_step=args.tile_step, dynamic=args.dynamic, name=args.name, version=args.version,
                      renames=tuple(args.rename), accumulate=args.accumulate,
                      resampling=args.resampling)
    return args.results.resolve(), options


def main(argv: Sequence[str] | None = None) -> int:
    folder, options = parse_options(argv)
    try:
        out = run_import(folder, options)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except (ImportFailure, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in sorted(out.iterdir()):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
