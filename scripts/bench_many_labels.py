#!/usr/bin/env python3
"""Many-label benchmark: a 117-class softmax model on a 512 x 512 x 300 CT, seconds and peak RSS (target <= 6 GB).

Method
------
* Network: random weights, ``[1, 1, *tile]`` -> 3x3x3 convolution to 8 channels, ReLU, 1x1x1 convolution to
  118 channels (117 classes and background), logits. Manifest as an imported nnU-Net model, in each of the
  importers' two modes: ``resampling = "nnunet"`` (cubic resize to the model's grid, logits back to the CT grid
  channel by channel) and ``resampling = "totalsegmentator"`` (TotalSegmentator's own: classes decided on the
  model grid, nearest back),
  ``accumulate = "float16"`` (as nnU-Net), 3 mm isotropic, tiles of 128^3, overlap 0.5, no mirroring; every 10th
  label keeps its largest component, every 7th has its holes filled.
* CT: the couch phantom of the tests (body, arms, lungs, spine, bowel gas, couch, 30 HU noise), 300 slices of
  512 x 512, 0.98 mm pixels, 3 mm slices. It is made in one child process and stored as ``.npy``; each
  measurement runs in a fresh child that only loads it, so the parent's memory is in none of the figures.
* Figures, per child: wall seconds of ``Predictor.predict``, peak RSS as ``getrusage(RUSAGE_SELF).ru_maxrss``
  and as ``VmHWM`` (this process image only); the masks' form and size; labels found.
  ``ct`` is the floor: the interpreter, numpy, onnxruntime and the CT alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = 117
PIXEL, SLICE = 512 / 500 * 0.96, 3.0  # ~0.98 mm pixels: a 500 mm field
TARGET_MB = 6 * 1024


def network(path: Path, classes: int = CLASSES, hidden: int = 8) -> None:
    """The random-weight network: 3x3x3 conv (1 -> *hidden*), ReLU, 1x1x1 conv (*hidden* -> classes + 1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(117)
    initializers = [numpy_helper.from_array(rng.normal(0, 0.5, (hidden, 1, 3, 3, 3)).astype(np.float32), "w0"),
                    numpy_helper.from_array(rng.normal(0, 0.1, hidden).astype(np.float32), "b0"),
                    numpy_helper.from_array(rng.normal(0, 1.0, (classes + 1, hidden, 1, 1, 1)).astype(np.float32),
                                            "w1"),
                    numpy_helper.from_array(rng.normal(0, 0.1, classes + 1).astype(np.float32), "b1")]
    nodes = [helper.make_node("Conv", ["image", "w0", "b0"], ["features"], pads=[1] * 6),
             helper.make_node("Relu", ["features"], ["active"]),
             helper.make_node("Conv", ["active", "w1", "b1"], ["scores"])]
    graph = helper.make_graph(nodes, "many-labels",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "d", "h", "w"])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                                             ["n", classes + 1, "d", "h", "w"])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def package(folder: Path, resampling: str, classes: int = CLASSES) -> Path:
    """The model package: :func:`network` and its manifest, with *resampling* ``nnunet`` or ``totalsegmentator``."""
    network(folder / "model.onnx", classes)
    lines = ["[model]", 'name = "many-labels"', 'version = "0"', "", "[input]", 'orientation = "SPL"',
             "spacing_mm = [3.0, 3.0, 3.0]", "patch_size = [128, 128, 128]", "overlap = 0.5", "batch_size = 1",
             "padding_value = 0.0", f'resampling = "{resampling}"', 'accumulate = "float16"',
             'normalisation = { kind = "zscore", mean = -300.0, std = 500.0, hu_min = -1024, hu_max = 1500 }', "",
             "[output]", 'kind = "softmax"', "logits = true", ""]
    for value in range(1, classes + 1):
        lines += ["[[labels]]", f"value = {value}", f'name = "Organ_{value:03d}"',
                  f"colour = [{value * 37 % 256}, {value * 91 % 256}, {value * 13 % 256}]"]
        lines += ["keep_largest_component = true"] if value % 10 == 0 else []
        lines += ["fill_holes = true"] if value % 7 == 0 else []
        lines.append("")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.toml").write_text("\n".join(lines), encoding="utf-8")
    return folder


def _peaks() -> dict[str, float]:
    hwm = next((int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")), float("nan"))
    return {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vmhwm_mb": hwm}


def child(measure: str, npy: Path, model: Path) -> dict[str, object]:
    """One measurement, in a fresh process."""
    if measure == "make-ct":
        from tests.synthetic import couch_phantom

        volume, _ = couch_phantom(shape=(300, 512, 512), spacing=(SLICE, PIXEL, PIXEL))
        np.save(npy, volume.hu)
        return {}
    from gateway.inference.manifest import load_model_package
    from gateway.inference.predictor import Predictor
    from gateway.inference.volume import Volume

    hu = np.load(npy)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = SLICE, PIXEL, PIXEL, 1.0
    volume = Volume(hu, affine, tuple(map(str, range(hu.shape[0]))), "1.2.3", "HFS")
    if measure == "ct":
        return {"shape": list(hu.shape), **_peaks()}
    predictor = Predictor(load_model_package(model))
    started = time.perf_counter()
    prediction = predictor.predict(volume)
    seconds = time.perf_counter() - started
    found = sum(1 for count in prediction.voxels.values() if count)
    return {"seconds": round(seconds, 1), **_peaks(), "labels": len(prediction.values), "labels_found": found,
            "masks_form": prediction.masks.form, "masks_mb": round(prediction.masks.nbytes / 2**20, 1)}


def run_child(measure: str, npy: Path, model: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, __file__, "--child", measure, str(npy), str(model)], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--resampling", nargs="+", choices=["nnunet", "totalsegmentator"],
                        default=["nnunet", "totalsegmentator"], help="the imports' two modes (default: both)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        npy = root / "ct.npy"
        run_child("make-ct", npy, root)
        floor = run_child("ct", npy, root)
        print(f"CT {floor['shape']}, {PIXEL:.2f} mm pixels, {SLICE} mm slices: floor (interpreter + CT) "
              f"{floor['ru_maxrss_mb']:.0f} MB")
        met = True
        for resampling in args.resampling:
            result = run_child("predict", npy, package(root / resampling, resampling))
            peak = max(float(str(result["ru_maxrss_mb"])), float(str(result["vmhwm_mb"])))
            met = met and peak <= TARGET_MB
            print(f"{CLASSES} classes, resampling {resampling}: {result['seconds']} s, peak RSS "
                  f"{result['ru_maxrss_mb']:.0f} MB (ru_maxrss), {result['vmhwm_mb']:.0f} MB (VmHWM); target <= "
                  f"{TARGET_MB} MB: {'met' if peak <= TARGET_MB else 'MISSED'}")
            print(f"  labels found {result['labels_found']} of {result['labels']}; masks {result['masks_form']}, "
                  f"{result['masks_mb']} MB on the CT grid")
        return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
