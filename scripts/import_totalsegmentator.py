#!/usr/bin/env python3
"""Import a TotalSegmentator task as ONE model package, its structures named by TG-263 (issue 20).

Usage::

    scripts/import_totalsegmentator.py --task total [--weights DIR] [--out models/totalseg-total]
    scripts/import_totalsegmentator.py --list [--weights DIR]

``DIR`` is TotalSegmentator's weights folder, found as TotalSegmentator 2.x finds it (``config.get_weights_dir``):
``$TOTALSEG_WEIGHTS_PATH``, else ``$TOTALSEG_HOME_DIR/nnunet/results``, else ``~/.totalsegmentator/nnunet/results``
(``/tmp/.totalsegmentator/...`` where the home folder is ``/``). It holds one ``Dataset<id>_<name>/`` per nnU-Net
model, with ``<trainer>__nnUNetPlans__<configuration>/`` inside, as TotalSegmentator downloads them.

The tasks are those ``scripts/totalsegmentator_names.toml`` names (``--list`` says which have their weights here),
and the one-model fast variants ``total_fast`` (Dataset297, 3 mm), ``total_fastest`` (298, 6 mm), ``total_v3_fast``,
``total_v3_fastest`` and ``body_fast``, which have their task's combined labels:

* a task of several models (``total``: datasets 291-295, ``total_v3``, ``headneck_muscles``) becomes a *bundle*
  (``gateway.inference.manifest``, ``[bundle]``): one package per part in a subfolder, run in TotalSegmentator's
  order, a later part's labels replacing an earlier part's where both found a voxel (TotalSegmentator's
  ``np.copyto(seg_combined, mapped_seg, where=mapped_seg != 0)``); the bundle's ``[[labels]]`` are the task's
  combined labels (``class_map[task]``, in order) with the table's TG-263 names, colours and interpreted types;
* a task of one model becomes a plain package with those labels.

Each part is imported by ``scripts/import_nnunet.py`` as TotalSegmentator runs it: fold 0, the task's trainer and
configuration (:data:`MODELS`, TotalSegmentator 2.18.0's ``map_tasks_config``), no test-time mirroring, tile step
0.8 for ``total``/``total_v3``/``total_mr`` and 0.5 otherwise (``nnunet.py``), tiles summed in float16 as nnU-Net
2.8.1 does (``accumulate = "float16"``: 117 classes on a 512 x 512 x 300 CT stay under 6 GB). Before anything is
converted it refuses (exit code 2, naming the problem) a part whose folder is missing and a part whose
``dataset.json`` labels differ from the table's snapshot of TotalSegmentator's class maps. The package is built in a
temporary folder beside ``--out`` and renamed into place, so a failed import leaves no half package.

TotalSegmentator resamples the CT itself to the task's spacing (:data:`RESAMPLE`) before nnU-Net sees it (linear,
in RAS axes, cast to int32) and the labels back (nearest neighbour); the packages say ``resampling =
"totalsegmentator"``, which does the same, where that spacing is the model's (nnU-Net's own resampling is then an
identity); ``--resampling nnunet`` writes nnU-Net's resampling from the CT's spacing instead (as before). A part
whose model spacing differs from the task's gets nnU-Net's, with a note.

Not reproduced: the cropping some tasks do to a region that ``total`` finds first
(:data:`CROPPED`: the gateway runs those models on the whole CT; the import says so).
Exit codes: 0 success, 1 failure, 2 refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import import_nnunet as nnunet  # noqa: E402
import totalseg_names as names  # noqa: E402

from gateway.errors import ConfigError  # noqa: E402
from gateway.inference.packages import load_bundle  # noqa: E402

FOLDS = ("0",)  # TotalSegmentator's default folds
CHECKPOINT = "checkpoint_final.pth"
PLANS = "nnUNetPlans"  # TotalSegmentator's default plans (its total_v3 "small" model aside)
#: TotalSegmentator 2.18.0 (``map_tasks_config.TASK_CONFIGS``, the default sub-mode): each task's nnU-Net trainer
#: and configuration.
MODELS: dict[str, tuple[str, str]] = {
    "total": ("nnUNetTrainerNoMirroring", "3d_fullres"),
    "total_v3": ("nnUNetTrainerNoMirroring", "3d_fullres"),
    "body": ("nnUNetTrainer", "3d_fullres"),
    "lung_vessels": ("nnUNetTrainerSkeletonRecall", "3d_fullres"),
    "heartchambers_highres": ("nnUNetTrainer", "3d_fullres"),
    "head_glands_cavities": ("nnUNetTrainer_DASegOrd0_NoMirroring", "3d_fullres_high"),
    "headneck_bones_vessels": ("nnUNetTrainer_DASegOrd0_NoMirroring", "3d_fullres_high"),
    "head_muscles": ("nnUNetTrainer_DASegOrd0_NoMirroring", "3d_fullres_high"),
    "headneck_muscles": ("nnUNetTrainer_DASegOrd0_NoMirroring", "3d_fullres_high"),
}
#: The one-model variants (``--fast``, ``--fastest``): variant -> (the task whose labels it has, dataset id, trainer).
VARIANTS: dict[str, tuple[str, int, str]] = {
    "total_fast": ("total", 297, "nnUNetTrainer_4000epochs_NoMirroring"),
    "total_fastest": ("total", 298, "nnUNetTrainer_4000epochs_NoMirroring"),
    "total_v3_fast": ("total_v3", 836, "nnUNetTrainer_4000epochs_NoMirroring"),
    "total_v3_fastest": ("total_v3", 837, "nnUNetTrainer_4000epochs_NoMirroring"),
    "body_fast": ("body", 300, "nnUNetTrainer"),
}
#: TotalSegmentator 2.18.0 (``map_tasks_config``): the spacing (RAS axes, mm) each task's CT is resampled to first.
RESAMPLE: dict[str, tuple[float, float, float]] = {
    "total": (1.5, 1.5, 1.5), "total_fast": (3.0, 3.0, 3.0), "total_fastest": (6.0, 6.0, 6.0),
    "total_v3": (1.5, 1.5, 1.5), "total_v3_fast": (3.0, 3.0, 3.0), "total_v3_fastest": (6.0, 6.0, 6.0),
    "body": (1.5, 1.5, 1.5), "body_fast": (6.0, 6.0, 6.0), "lung_vessels": (0.703125, 0.703125, 1.0),
    "heartchambers_highres": (1.5, 1.5, 1.5), "head_glands_cavities": (0.75, 0.75, 1.0),
    "headneck_bones_vessels": (0.75, 0.75, 1.0), "head_muscles": (0.75, 0.75, 1.0),
    "headneck_muscles": (0.47251562774181366, 0.47251562774181366, 0.8500002026557922),
}
#: Tasks TotalSegmentator runs with tile step 0.8 (all sub-modes); every other task 0.5.
COARSE_STEP_TASKS = ("total", "total_v3", "total_mr")
#: Tasks whose TotalSegmentator run first crops the CT to these classes of ``total`` (the gateway does not).
CROPPED: dict[str, tuple[str, ...]] = {
    "lung_vessels": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                     "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "heartchambers_highres": ("heart",),
    "head_glands_cavities": ("skull",),
    "headneck_bones_vessels": ("clavicula_left", "clavicula_right", "vertebrae_C1", "vertebrae_C5", "vertebrae_T1",
                               "vertebrae_T4"),
    "head_muscles": ("skull",),
    "headneck_muscles": ("clavicula_left", "clavicula_right", "vertebrae_C1", "vertebrae_C5", "vertebrae_T1",
                         "vertebrae_T4"),
}

Refused = nnunet.Refused


@dataclass(frozen=True)
class Task:
    """What one ``--task`` imports."""

    name: str  # as asked: total, total_fast, head_muscles ...
    labels_task: str  # the table's task whose labels (class_map[task]) the result has
    parts: tuple[names.Part, ...]  # in TotalSegmentator's order
    trainer: str
    configuration: str

    @property
    def tile_step(self) -> float:
        """TotalSegmentator's ``step_size`` for the task."""
        return 0.8 if self.labels_task in COARSE_STEP_TASKS else 0.5


@dataclass(frozen=True)
class Options:
    """What the command line asks for, beyond the task."""

    weights: Path
    out: Path
    name: str | None = None
    version: str = "1.0.0"
    #: "totalsegmentator" (TotalSegmentator's resampling, where the model's spacing is the task's) or "nnunet".
    resampling: str = "totalsegmentator"


# --- the task and its folders -------------------------------------------------------------------------------------


def default_weights() -> Path:
    """TotalSegmentator's weights folder, as ``totalsegmentator.config.get_weights_dir`` finds it."""
    if "TOTALSEG_WEIGHTS_PATH" in os.environ:
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    if "TOTALSEG_HOME_DIR" in os.environ:
        home = Path(os.environ["TOTALSEG_HOME_DIR"])
    else:  # TotalSegmentator maps a home of "/" (containers) to /tmp
        home = (Path("/tmp") if str(Path.home()) == "/" else Path.home()) / ".totalsegmentator"
    return home / "nnunet" / "results"


def task_names() -> list[str]:
    """Every task this script imports: the table's, and the fast variants of those."""
    covered = names.covered_tasks()
    return [*covered, *(variant for variant, (base, _, _) in VARIANTS.items() if base in covered)]


def resolve_task(task: str) -> Task:
    """The task's parts (from the table's snapshot of TotalSegmentator's class maps), trainer and configuration."""
    if task in VARIANTS:
        base, dataset_id, trainer = VARIANTS[task]
        labels = names.labels_for(base, source="snapshot")
        return Task(task, base, (names.Part(dataset_id, task, labels),), trainer, MODELS[base][1])
    if task not in names.covered_tasks():
        raise Refused(f"--task {task}: not a task the names table covers ({', '.join(task_names())})")
    if task not in MODELS:
        raise Refused(f"--task {task}: the names table covers it but this script knows no trainer for it (MODELS)")
    trainer, configuration = MODELS[task]
    return Task(task, task, tuple(names.parts_for(task, source="snapshot")), trainer, configuration)


def part_label(task: Task, part: names.Part) -> str:
    """What to call a part in messages: ``part 2 of total (Dataset292)``."""
    if len(task.parts) == 1:
        return f"{task.name} (Dataset{part.task_id:03d})"
    return f"part {task.parts.index(part) + 1} of {task.name} ({part.name}, Dataset{part.task_id:03d})"


def part_folder_name(task: Task, part: names.Part) -> str:
    """The part's subfolder in a bundle: ``part1_organs``, ``part2_vertebrae`` ... (``class_map_part_<x>``)."""
    index = task.parts.index(part) + 1
    return f"part{index}_{part.name.removeprefix('class_map_part_').removeprefix('class_map_')}"


def results_folder(weights: Path, task: Task, part: names.Part) -> Path:
    """``weights/Dataset<id>_*/<trainer>__nnUNetPlans__<configuration>``; refused where it is not there."""
    what = part_label(task, part)
    datasets = sorted(path for path in weights.glob(f"Dataset{part.task_id:03d}_*") if path.is_dir())
    if not datasets:
        raise Refused(f"{what}: no folder Dataset{part.task_id:03d}_* in {weights} (TotalSegmentator downloads it "
                      f"when it first runs the task, or: totalseg_download_weights -t {task.labels_task})")
    if len(datasets) > 1:
        raise Refused(f"{what}: several folders {', '.join(p.name for p in datasets)} in {weights}; keep one")
    folder = datasets[0] / f"{task.trainer}__{PLANS}__{task.configuration}"
    if not folder.is_dir():
        present = sorted(path.name for path in datasets[0].iterdir() if path.is_dir())
        raise Refused(f"{what}: no {folder.name} in {datasets[0]} (it has {', '.join(present) or 'nothing'})")
    return folder


def check_labels(folder: Path, task: Task, part: names.Part) -> None:
    """Refuse a part whose ``dataset.json`` labels are not the table's snapshot of TotalSegmentator's."""
    try:
        raw = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["labels"]
        found = {int(value): str(name) for name, value in raw.items() if name not in ("background", "ignore")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Refused(f"{part_label(task, part)}: {folder / 'dataset.json'} has no readable labels ({exc})") from None
    expected = dict(part.labels)
    if found != expected:
        differ = sorted(set(found.items()) ^ set(expected.items()))
        said = [f"{value}: {found.get(value, '-')} here, {expected.get(value, '-')} in the table"
                for value in dict.fromkeys(value for value, _ in differ)]
        raise Refused(f"{part_label(task, part)}: {folder / 'dataset.json'} labels differ from the names table's "
                      f"snapshot of TotalSegmentator's ({len(found)} here, {len(expected)} there; "
                      f"{'; '.join(said[:6])}{' ...' if len(said) > 6 else ''})")


def available_tasks(weights: Path) -> dict[str, list[str]]:
    """Each task -> the problems in the way of importing it from *weights* (empty: its weights are there)."""
    found: dict[str, list[str]] = {}
    for name in task_names():
        task = resolve_task(name)
        problems = []
        for part in task.parts:
            try:
                check_labels(results_folder(weights, task, part), task, part)
            except Refused as exc:
                problems.append(str(exc))
        found[name] = problems
    return found


# --- the import ---------------------------------------------------------------------------------------------------


def part_resampling(task: Task, part: names.Part, folder: Path, asked: str) -> str:
    """*asked*, unless it is "totalsegmentator" and the part's model spacing is not the task's :data:`RESAMPLE`
    (read by ``NibabelIOWithReorient``: reversed, then ``transpose_forward``): then "nnunet", with a note."""
    if asked != "totalsegmentator":
        return asked
    resample = RESAMPLE.get(task.name)
    try:
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
        spacing = [float(s) for s in plans["configurations"][task.configuration]["spacing"]]
        transpose = [int(axis) for axis in plans["transpose_forward"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Refused(f"{part_label(task, part)}: {folder / 'plans.json'} has no readable spacing ({exc})") from None
    expected = None if resample is None else [resample[::-1][axis] for axis in transpose]
    if expected is None or any(abs(a - b) > 1e-6 for a, b in zip(spacing, expected, strict=True)):
        print(f"note: {part_label(task, part)}: TotalSegmentator resamples to {resample} mm, the model's spacing is "
              f"{spacing}; nnU-Net's resampling is reproduced instead")
        return "nnunet"
    return asked


def part_options(task: Task, part: names.Part, entries: dict[str, names.NameEntry], out: Path, name: str,
                 version: str, resampling: str = "nnunet") -> nnunet.Options:
    """``import_nnunet``'s options for one part, as TotalSegmentator runs it, with the table's names and colours."""
    classes = list(part.labels.values())
    return nnunet.Options(
        folds=FOLDS, checkpoint=CHECKPOINT, out=out, orientation=None, mirroring=False, tile_step=task.tile_step,
        name=name, version=version, renames=tuple((cls, entries[cls].tg263) for cls in classes),
        accumulate="float16", resampling=resampling,
        styles=tuple((entries[cls].tg263, entries[cls].colour, entries[cls].interpreted_type) for cls in classes))


def bundle_text(task: Task, entries: dict[str, names.NameEntry], parts: Sequence[str], name: str,
                version: str) -> str:
    """The bundle's ``manifest.toml``: its parts and the task's combined labels, TG-263-named, in order."""
    datasets = ", ".join(f"Dataset{part.task_id:03d}" for part in task.parts)
    info = {"name": name, "version": version, "modality": "CT",
            "description": f"TotalSegmentator {task.name} ({datasets}), TG-263 names"}
    sections = [f"# Imported by scripts/import_totalsegmentator.py: TotalSegmentator task {task.name}\n",
                nnunet._table("[model]", info), nnunet._table("[bundle]", {"parts": list(parts),
                                                                            "overlap": "last_wins"})]
    for value, entry in enumerate(entries.values(), start=1):
        sections.append(nnunet._table("[[labels]]", {"value": value, "name": entry.tg263,
                                                     "colour": list(entry.colour),
                                                     "interpreted_type": entry.interpreted_type}))
    return "\n".join(sections)


def run_import(task_name: str, options: Options) -> Path:
    """Check every part's folder and labels, import the parts, install the package or bundle; return its folder."""
    task = resolve_task(task_name)
    entries = names.names_for(task.labels_task, source="snapshot")
    folders = [results_folder(options.weights, task, part) for part in task.parts]
    for folder, part in zip(folders, task.parts, strict=True):
        check_labels(folder, task, part)
    if task.labels_task in CROPPED and task.name == task.labels_task:
        print(f"note: TotalSegmentator crops the CT to {', '.join(CROPPED[task.labels_task])} (found by 'total') "
              f"before running {task.name}; the gateway runs it on the whole CT")
    out, name = options.out, options.name or options.out.name
    resampling = [part_resampling(task, part, folder, options.resampling)
                  for folder, part in zip(folders, task.parts, strict=True)]
    if len(task.parts) == 1:
        return nnunet.run_import(folders[0], part_options(task, task.parts[0], entries, out, name, options.version,
                                                          resampling[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        subfolders = [part_folder_name(task, part) for part in task.parts]
        for folder, part, subfolder, how in zip(folders, task.parts, subfolders, resampling, strict=True):
            print(f"{part_label(task, part)} -> {subfolder}")
            nnunet.run_import(folder, part_options(task, part, entries, staging / subfolder,
                                                   f"{name}-{subfolder}"[:64], options.version, how))
        (staging / "manifest.toml").write_text(bundle_text(task, entries, subfolders, name, options.version),
                                               encoding="utf-8")
        load_bundle(staging)
    except BaseException:
        shutil.rmtree(staging)
        raise
    staging.chmod(0o755)
    nnunet.install_package(out, staging)
    print(f"{task.name}: bundle of {len(task.parts)} parts, {len(entries)} labels, tile step {task.tile_step:g}")
    return out


# --- command line -------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="TotalSegmentator task: total, total_fast, head_glands_cavities ... (see --list)")
    what.add_argument("--list", action="store_true", help="list the tasks and whether their weights are present")
    parser.add_argument("--weights", type=Path, default=None,
                        help="TotalSegmentator's weights folder (default: $TOTALSEG_WEIGHTS_PATH, else "
                             "$TOTALSEG_HOME_DIR/nnunet/results, else ~/.totalsegmentator/nnunet/results)")
    parser.add_argument("--out", type=Path, help="package folder to write (default: models/totalseg-<task>)")
    parser.add_argument("--name", help="model name in the manifest (default: the --out folder's name)")
    parser.add_argument("--version", default="1.0.0", help="model version in the manifest")
    parser.add_argument("--resampling", choices=("totalsegmentator", "nnunet"), default="totalsegmentator",
                        help="totalsegmentator: resample the CT as TotalSegmentator does (default, where the model's "
                             "spacing is the task's); nnunet: nnU-Net's resampling from the CT's spacing")
    args = parser.parse_args(argv)
    weights = (args.weights or default_weights()).resolve()
    try:
        if args.list:
            for task, problems in available_tasks(weights).items():
                print(f"{task}: {'weights present' if not problems else problems[0]}")
            return 0
        out = (args.out or Path("models") / f"totalseg-{args.task}").resolve()
        run_import(args.task, Options(weights=weights, out=out, name=args.name, version=args.version,
                                         resampling=args.resampling))
    except (Refused, names.TableError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except (nnunet.ImportFailure, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
