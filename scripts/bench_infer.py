#!/usr/bin/env python3
"""Inference benchmark: the default model end to end, predictor overhead against bare onnxruntime, peak memory.

Method
------
* CT: the couch phantom of the tests (body, lungs, spine, bowel gas, couch, 30 HU noise) at
  512 x 512 in-plane, 0.98 mm pixels, 3 mm slices. It is generated in this process and handed
  to a fresh child process as a ``.npy`` file; the child's peak RSS (VmHWM) is the predictor's
  own plus the interpreter and the CT itself.
* (a) default model, 100 slices: seconds from volume to label bit-planes, and peak RSS.
* (b) default model, 300 slices: peak RSS (target <= 1.5 GB).
* (c) a 3D U-Net-sized network (four 3x3x3 convolutions, 1-32-32-16-2 channels, random
  weights) on the 100-slice CT at 1.5 mm: the predictor's time, and the time of bare
  onnxruntime ``run`` calls on batches of exactly the same shapes and count; the ratio is
  the predictor's overhead (resampling, normalisation, Gaussian accumulation; target <= 1.1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gateway.inference.manifest import load_model_package  # noqa: E402
from gateway.inference.predictor import Predictor  # noqa: E402
from gateway.inference.volume import Volume  # noqa: E402
from tests.synthetic import couch_phantom  # noqa: E402

PIXEL, SLICE = 512 / 500 * 0.96, 3.0  # ~0.98 mm pixels: a 500 mm field


def _unet(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    channels = [1, 32, 32, 16, 2]
    nodes, weights = [], []
    current = "image"
    for index, (cin, cout) in enumerate(itertools.pairwise(channels)):
        w = numpy_helper.from_array((rng.normal(0, 0.1, (cout, cin, 3, 3, 3))).astype(np.float32), f"w{index}")
        b = numpy_helper.from_array(np.zeros(cout, np.float32), f"b{index}")
        weights += [w, b]
        out = f"conv{index}"
        nodes.append(helper.make_node("Conv", [current, f"w{index}", f"b{index}"], [out], pads=[1] * 6))
        current = out
        if index < len(channels) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"relu{index}"]))
            current = f"relu{index}"
    nodes.append(helper.make_node("Softmax", [current], ["scores"], axis=1))
    graph = helper.make_graph(nodes, "unet-sized",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "d", "h", "w"])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 2, "d", "h", "w"])],
                              initializer=weights)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    (folder / "manifest.toml").write_text("\n".join([
        "[model]", 'name = "unet-sized"', 'version = "0"', "[input]", 'orientation = "SPL"',
        "spacing_mm = [3.0, 1.5, 1.5]", "patch_size = [32, 128, 128]", "overlap = 0.5", "batch_size = 2",
        'normalisation = { kind = "zscore", mean = 0.0, std = 500.0 }', "[output]", 'kind = "softmax"',
        "[[labels]]", "value = 1", 'name = "Thing"', "colour = [1, 2, 3]", ""]))
    return folder


def axial_volume(hu: np.ndarray, slice_mm: float, pixel_mm: float) -> Volume:
    """*hu* ``(slices, rows, columns)`` as an axial head-first-supine CT centred on the origin."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = slice_mm, pixel_mm, pixel_mm, 1.0
    affine[:3, 3] = [-hu.shape[2] / 2 * pixel_mm, -hu.shape[1] / 2 * pixel_mm, -hu.shape[0] / 2 * slice_mm]
    return Volume(hu, affine, tuple(map(str, range(hu.shape[0]))), "1.2.3", "HFS")


def peak_rss_mb() -> float:
    """This process's peak RSS in MB."""
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(npy: Path, model: Path, measure: str) -> dict[str, float]:
    """Run in a fresh process: load the CT, predict, report seconds, peak RSS and ORT time."""
    volume = axial_volume(np.load(npy), SLICE, PIXEL)
    predictor = Predictor(load_model_package(model))
    shapes: list[tuple[int, ...]] = []
    tiler = predictor._tiler
    run = tiler._network  # what the tiler calls per batch (the predictor's session run, bound at construction)

    def recording(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return run(batch)

    tiler._network = recording
    started = time.perf_counter()
    predictor.predict(volume)
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if measure == "overhead":
        session, name = predictor._session, predictor._input
        batches = [np.random.default_rng(1).normal(0, 1, shape).astype(np.float32) for shape in shapes]
        started = time.perf_counter()
        for batch in batches:
            session.run(None, {name: batch})
        result["bare_seconds"] = time.perf_counter() - started
        result["tiles"] = float(sum(shape[0] for shape in shapes))
    return result


def run_child(npy: Path, model: Path, measure: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", str(npy), str(model), measure], check=True,
                         capture_output=True, text=True, cwd=REPO)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.child[2])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        default = REPO / "models" / "default"
        for slices in (100, 300):
            volume, _ = couch_phantom(shape=(slices, 512, 512), spacing=(SLICE, PIXEL, PIXEL))
            np.save(root / f"ct{slices}.npy", volume.hu)
        small = run_child(root / "ct100.npy", default, "plain")
        large = run_child(root / "ct300.npy", default, "plain")
        unet = run_child(root / "ct100.npy", _unet(root / "unet"), "overhead")
    print("CT 512 x 512, 0.98 mm pixels, 3 mm slices (couch phantom)")
    print(f"default model, 100 slices: {small['seconds']:.2f} s end to end, peak RSS {small['peak_rss_mb']:.0f} MB")
    verdict = "met" if large["peak_rss_mb"] <= 1536 else "MISSED"
    print(f"default model, 300 slices: {large['seconds']:.2f} s, peak RSS {large['peak_rss_mb']:.0f} MB "
          f"(target <= 1536 MB, {verdict})")
    ratio = unet["seconds"] / unet["bare_seconds"]
    print(f"U-Net-sized network, 100 slices, {unet['tiles']:.0f} tiles: predictor {unet['seconds']:.2f} s, bare "
          f"onnxruntime on the same tiles {unet['bare_seconds']:.2f} s, ratio {ratio:.3f} "
          f"(target <= 1.1, {'met' if ratio <= 1.1 else 'MISSED'}), peak RSS {unet['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
