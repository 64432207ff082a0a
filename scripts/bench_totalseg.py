#!/usr/bin/env python3
"""TotalSegmentator against the gateway (issue 20): its own CLI and our predictor, same CT, same weights, CPU.

Targets: our wall time / theirs <= 1.0 and our peak memory / theirs <= 1.0.

Method
------
* Weights: one TotalSegmentator ``total_fast`` results folder (``Dataset297_TotalSegmentator_total_3mm_1559subj/
  nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres``, fold 0), laid out as TotalSegmentator downloads
  it (``tests.nnunet_folder.totalsegmentator_recipe(297)``: its labels, reader, trainer, 3 mm spacing) but with a
  realistic network and random weights: nnU-Net's default 3d_fullres ``PlainConvUNet`` as its planner makes it
  for an isotropic 3 mm CT, 6 stages, features 32, 64, 128, 256, 320, 320, 3x3x3 kernels, two convolutions per
  stage, strides 1, 2, 2, 2, 2, (1, 1, 2), patch [112, 112, 128]. TotalSegmentator 2.18.0 does not ship its
  plans (they come with the downloaded weights); 297's patch is reported as [112, 112, 128], and the rest is
  nnU-Net 2.8.1's planner default for that patch (four poolings on 112, five on 128). Some 31 M parameters.
* It is imported once, with ``scripts/import_totalsegmentator.py --task total_fast``, into a temporary models
  folder with the importer's defaults for TotalSegmentator: ONNX, the task's tile step (0.8 for ``total_fast``, as
  TotalSegmentator runs it), float16 sums, ``resampling = "totalsegmentator"`` (its own resampling).
* CT: the pyradiomics ``lung2`` chest CT as plastimatch writes it in DICOM (``tests.realct.real_chest_ct``): 61
  slices of 512 x 512, 0.63 mm pixels, 5 mm slices. Both sides read the same DICOM folder: TotalSegmentator
  converts it itself (dicom2nifti), we read it with pydicom and ``volume_from_datasets``.
* Each side runs in a fresh child process, started and waited for by this one; the figures are the child's:
  wall seconds from start to exit (interpreter, imports, reading, inference, writing), the largest single process's
  peak RSS (``os.wait4``'s ``ru_maxrss``, which takes in the child's own children) and the peak of the whole
  process tree's summed PSS, sampled every 0.1 s from ``/proc`` (nnU-Net starts worker processes to preprocess
  and to export; the gateway runs in one process). The ratios use the tree figure.

  1. TotalSegmentator: ``TotalSegmentator -i DICOM_DIR -o seg.nii.gz --fast --ml --device cpu --nr_thr_resamp 1
     --nr_thr_saving 1``, ``TOTALSEG_WEIGHTS_PATH`` at the weights and ``TOTALSEG_HOME_DIR`` at a temporary
     folder whose ``config.json`` turns its usage statistics off; HTTP(S) proxies point at a closed local port,
     so it cannot download anything (it finds the weights and has nothing to fetch; ``total`` needs no licence).
     It is started as the console script starts it, ``totalsegmentator.bin.TotalSegmentator.main``, from a
     launcher (:data:`LAUNCHER`) that registers the trainer class (nnU-Net's own search for it fails in this
     venv) and makes ``multiprocessing.cpu_count()``, the torch thread count TotalSegmentator sets, ``--threads``.
  2. Ours: pydicom reads the folder, ``volume_from_datasets``, ``Predictor(load_model_package(...),
     threads=--threads)``, ``predict``, the label map saved as ``.npy``.

  Both have ``OMP_NUM_THREADS`` (and the MKL / OpenBLAS equivalents) set to ``--threads``.
* Reported: each side's seconds, peak RSS and tree PSS, the ratios ours / theirs, the labels each found, and the
  share of CT voxels where the two label maps agree (all voxels, and those either side labels). Both resample the
  CT to 3 mm as TotalSegmentator does (linear, cast to integers) and the label map back (nearest); what remains
  apart is TotalSegmentator reading the DICOM through dicom2nifti against pydicom here, and near-ties between
  classes (``tests/inference/test_totalseg_equivalence.py``, which gives both the same voxels).

Usage: ``scripts/bench_totalseg.py [--threads 2] [--repeat 1] [--keep DIR]``.
About 3 minutes on 2 CPUs (1 of them setup).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASK = "total_fast"
TASK_ID = 297
PATCH = [112, 112, 128]
ARCHITECTURE: dict[str, Any] = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]],
        "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
RATIO_TARGET = 1.0
_SAMPLE_S = 0.1


# --- the weights, the package and the CT (in this process) ---------------------------------------------------------


def write_weights(root: Path, seed: int = 297) -> Path:
    """TotalSegmentator's weights folder holding Dataset297 with :data:`ARCHITECTURE` and random weights."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from tests.nnunet_folder import dataset, plans, totalsegmentator_recipe

    recipe = totalsegmentator_recipe(TASK_ID)
    plan, data = plans(recipe), dataset(recipe)
    configuration = plan["configurations"][recipe.configuration]
    configuration["architecture"] = copy.deepcopy(ARCHITECTURE)
    configuration["patch_size"] = list(PATCH)
    configuration["median_image_size_in_voxels"] = [110, 110, 110]
    plan["original_median_shape_after_transp"] = [110, 110, 110]
    torch.manual_seed(seed)
    arch = ARCHITECTURE
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     len(recipe.channels), len(recipe.labels), deep_supervision=True)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith(("norm.weight", "norm.bias")):
                parameter.copy_(torch.randn_like(parameter) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    folder = root / recipe.dataset / f"{recipe.trainer}__nnUNetPlans__{recipe.configuration}"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plan, indent=2), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    torch.save({"network_weights": network.state_dict(),
                "init_args": {"plans": plan, "configuration": recipe.configuration, "fold": 0,
                              "dataset_json": data, "device": "cpu"},
                "trainer_name": recipe.trainer, "inference_allowed_mirroring_axes": None, "current_epoch": 4000},
               folder / "fold_0" / "checkpoint_final.pth")
    return root


def import_package(weights: Path, out: Path) -> None:
    """``scripts/import_totalsegmentator.py --task total_fast`` in a child process."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "import_totalsegmentator.py"), "--task", TASK,
                           "--weights", str(weights), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"import failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def write_ct(folder: Path) -> None:
    """The lung2 chest CT as DICOM."""
    from tests.realct import real_chest_ct

    real_chest_ct(folder, source="lung2")


# --- measuring a child -----------------------------------------------------------------------------------------------


def _tree(root: int) -> list[int]:
    """*root* and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(command: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run *command*; its wall seconds, largest process's peak RSS and the tree's peak summed PSS (MB)."""
    peak = [0]
    stop = threading.Event()
    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], sum(_pss_kb(pid) for pid in _tree(proc.pid)))
                stop.wait(_SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} ... failed ({proc.returncode}); its output:\n{log.read_text()[-4000:]}")
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "tree_pss_mb": peak[0] / 1024}


def environment(threads: int, home: Path, weights: Path) -> dict[str, str]:
    """The children's environment: thread counts, TotalSegmentator's folders, no way out to the network."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "TOTALSEG_HOME_DIR": str(home), "TOTALSEG_WEIGHTS_PATH": str(weights),
           "PYTHONPATH": str(REPO)}
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[proxy] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    return env


def totalseg_command(ct: Path, out: Path, threads: int) -> list[str]:
    """TotalSegmentator's CLI (``totalsegmentator.bin.TotalSegmentator.main``, what the console script runs) on *ct*:
    one multilabel NIfTI, 3 mm model, CPU; ``cpu_count`` answering *threads* and the trainer class registered
    (:data:`LAUNCHER`)."""
    args = ["-i", str(ct), "-o", str(out), "--fast", "--ml", "--device", "cpu", "--nr_thr_resamp", "1",
            "--nr_thr_saving", "1"]
    return [sys.executable, "-c", LAUNCHER, str(threads), *args]


#: Starts TotalSegmentator's CLI. nnU-Net finds a checkpoint's trainer class by importing every module under
#: ``nnunetv2/training/nnUNetTrainer`` until one has it; on the way it imports the Primus trainers, hence timm and
#: torchvision, which fails where torchvision does not match torch (as in this project's venv). The launcher puts
#: the class nnU-Net would find into TotalSegmentator's own table of trainers (``totalsegmentator.nnunet
#: .custom_trainers``), so that search never runs; on an install where it does run it only adds imports to their
#: side. It also makes ``multiprocessing.cpu_count()`` answer the thread count, which TotalSegmentator gives torch.
LAUNCHER = """\
import multiprocessing, sys
threads = int(sys.argv[1])
multiprocessing.cpu_count = lambda: threads
from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs_NoMirroring as variants
import totalsegmentator.nnunet
totalsegmentator.nnunet.custom_trainers.setdefault(
    "nnUNetTrainer_4000epochs_NoMirroring", variants.nnUNetTrainer_4000epochs_NoMirroring)
from totalsegmentator.bin.TotalSegmentator import main
sys.argv = ["TotalSegmentator", *sys.argv[2:]]
sys.exit(main())
"""


# --- our side, in a fresh process -------------------------------------------------------------------------------------


def ours(ct: Path, model: Path, out: Path, threads: int) -> None:
    """Read the DICOM folder, predict, save the label map (and what the parent compares it with)."""
    started = time.perf_counter()
    import pydicom

    from gateway.inference.manifest import load_model_package
    from gateway.inference.predictor import Predictor
    from gateway.inference.volume import volume_from_datasets

    imported = time.perf_counter()
    volume = volume_from_datasets([pydicom.dcmread(path) for path in sorted(ct.iterdir()) if path.is_file()])
    read = time.perf_counter()
    predictor = Predictor(load_model_package(model), threads=threads)
    loaded = time.perf_counter()
    prediction = predictor.predict(volume)
    predicted = time.perf_counter()
    masks = prediction.masks
    if masks.form == "classes" and masks.planes.shape[0] == 1:
        classes = masks.planes[0]
    else:  # softmax gives one layer; this only keeps the comparison honest if it ever does not
        classes = np.zeros(masks.shape, np.uint8)
        for value in prediction.values.values():
            classes[masks.mask(value) & (classes == 0)] = value
    np.save(out / "ours.npy", classes)
    np.save(out / "ours_affine.npy", volume.affine)
    (out / "ours.json").write_text(json.dumps({
        "imports_s": imported - started, "read_s": read - imported, "load_s": loaded - read,
        "predict_s": predicted - loaded, "shape": list(volume.shape),
        "found": sorted(value for name, value in prediction.values.items() if prediction.voxels[name])}))


# --- comparing the label maps ---------------------------------------------------------------------------------------


def on_our_grid(labels: np.ndarray, nifti_affine: np.ndarray, our_affine: np.ndarray, shape: tuple[int, ...]
                ) -> np.ndarray:
    """TotalSegmentator's label map (NIfTI voxels, RAS) at our voxels (LPS, ``(k, i, j)``): axis-aligned grids,
    nearest voxel."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    ours_to_theirs = np.linalg.inv(nifti_affine) @ lps_to_ras @ our_affine
    linear = ours_to_theirs[:3, :3]
    axes = np.abs(linear).argmax(axis=0)  # their axis along each of ours
    if sorted(axes.tolist()) != [0, 1, 2]:
        raise ValueError("the label maps' grids are not axis-aligned with each other")
    index = [np.rint(linear[axes[a], a] * np.arange(shape[a]) + ours_to_theirs[axes[a], 3]).astype(int)
             for a in range(3)]
    if any(i.min() < 0 or i.max() >= labels.shape[axes[a]] for a, i in enumerate(index)):
        raise ValueError("the label maps' grids do not cover the same voxels")
    picked = np.transpose(labels, axes.tolist())  # now indexed by our axes
    return np.asarray(picked[np.ix_(*index)])


def agreement(work: Path) -> dict[str, Any]:
    import nibabel as nib

    mine = np.load(work / "ours.npy")
    image = nib.load(str(work / "totalseg.nii.gz"))
    theirs_raw = np.asarray(image.dataobj).astype(np.uint8)
    theirs = on_our_grid(theirs_raw, image.affine, np.load(work / "ours_affine.npy"), mine.shape)
    either = (mine > 0) | (theirs > 0)
    return {"all": float((mine == theirs).mean()),
            "labelled": float((mine == theirs)[either].mean()) if either.any() else float("nan"),
            "their_found": sorted(int(v) for v in np.unique(theirs_raw) if v)}


# --- main --------------------------------------------------------------------------------------------------------


def _mean(runs: list[dict[str, float]], key: str) -> float:
    return float(np.mean([run[key] for run in runs]))


def bench(root: Path, threads: int, repeat: int) -> int:
    weights, home, model, ct = root / "weights", root / "home", root / "models" / "totalseg-total_fast", root / "ct"
    started = time.perf_counter()
    write_weights(weights)
    import_package(weights, model)
    write_ct(ct)
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_bench", "send_usage_stats": False,
                                                  "prediction_counter": 0, "statistics_disclaimer_shown": True}))
    onnx_mb = sum(p.stat().st_size for p in model.rglob("*.onnx")) / 2**20
    print(f"setup {time.perf_counter() - started:.0f} s: weights (random, 6-stage PlainConvUNet, patch {PATCH}), "
          f"imported ({onnx_mb:.0f} MB ONNX), CT written")
    env = environment(threads, home, weights)
    theirs_runs, our_runs = [], []
    for run in range(repeat):
        out = root / f"run{run}"
        out.mkdir()
        theirs_runs.append(measure(totalseg_command(ct, out / "totalseg.nii.gz", threads), env,
                                   out / "totalseg.log"))
        our_runs.append(measure([sys.executable, str(Path(__file__).resolve()), "--child", str(ct), str(model),
                                 str(out), str(threads)], env, out / "ours.log"))
    log = (root / "run0" / "totalseg.log").read_text()
    if "Downloading" in log:
        raise SystemExit(f"TotalSegmentator tried to download:\n{log[-2000:]}")
    detail = json.loads((root / "run0" / "ours.json").read_text())
    agree = agreement(root / "run0")
    print(f"CT lung2: {detail['shape'][0]} slices of {detail['shape'][1]} x {detail['shape'][2]} (DICOM, "
          f"{len(list(ct.iterdir()))} files); {threads} threads; {repeat} run(s) each, means")
    rows = {"TotalSegmentator CLI": theirs_runs, "ours (Predictor)": our_runs}
    for name, runs in rows.items():
        print(f"{name:22s} {_mean(runs, 'seconds'):7.1f} s   largest process {_mean(runs, 'rss_mb'):6.0f} MB   "
              f"process tree {_mean(runs, 'tree_pss_mb'):6.0f} MB (PSS)")
    print(f"ours, inside: imports {detail['imports_s']:.1f} s, DICOM read {detail['read_s']:.1f} s, "
          f"model load {detail['load_s']:.1f} s, predict {detail['predict_s']:.1f} s")
    time_ratio = _mean(our_runs, "seconds") / _mean(theirs_runs, "seconds")
    rss_ratio = _mean(our_runs, "rss_mb") / _mean(theirs_runs, "rss_mb")
    tree_ratio = _mean(our_runs, "tree_pss_mb") / _mean(theirs_runs, "tree_pss_mb")
    verdict = {True: "met", False: "MISSED"}
    print(f"ratio ours/theirs: time {time_ratio:.2f} (target <= {RATIO_TARGET}, "
          f"{verdict[time_ratio <= RATIO_TARGET]}), memory {tree_ratio:.2f} process tree (target <= {RATIO_TARGET}, "
          f"{verdict[tree_ratio <= RATIO_TARGET]}), {rss_ratio:.2f} largest process")
    mine, theirs = detail["found"], agree["their_found"]
    print(f"labels found: ours {len(mine)} of 117, TotalSegmentator {len(theirs)} of 117, "
          f"both {len(set(mine) & set(theirs))}")
    print(f"label maps agree on {100 * agree['all']:.1f} % of CT voxels, {100 * agree['labelled']:.1f} % of those "
          f"either labels")
    return 0 if time_ratio <= RATIO_TARGET and tree_ratio <= RATIO_TARGET else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for each side (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side (default 1)")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        ours(Path(args.child[0]), Path(args.child[1]), Path(args.child[2]), int(args.child[3]))
        return 0
    if args.keep:
        args.keep.mkdir(parents=True)
        return bench(args.keep.resolve(), args.threads, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        return bench(Path(tmp), args.threads, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
