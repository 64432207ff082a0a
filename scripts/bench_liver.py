#!/usr/bin/env python3
"""Liver model benchmark: our predictor against bare onnxruntime on the same tiles, seconds and peak RSS.

Method
------
* Model: ``models/liver`` as ``scripts/import_pyliverlesionseg.py`` writes it (imported first
  if absent; the import downloads the pyliverlesionseg 0.3 wheel).
* CT: the abdomen phantom of the tests (body, lungs, spine, bowel gas, couch, a 60 HU liver-like
  ellipsoid under the right lung, 30 HU noise) at 512 x 512, 0.98 mm pixels, 100 slices of 2.5 mm.
  Made in this process, handed to fresh child processes as ``.npy``. (Without fat or organ context,
  the network does not outline the phantom's "liver"; the figures are about speed and memory.)
* (a) ours: a child runs ``Predictor.predict`` (reorientation, 1.5 mm resampling, 3x3x3 median,
  3 mm resampling, normalisation, fixed 189 x 162 x 162 tiles with their 13-voxel output crop,
  clean-up, mapping back to the CT grid) and saves the exact tiles it fed the network.
* (b) bare: another child loads those tiles, opens an onnxruntime session with the same
  options, and times ``session.run`` on each tile; nothing else.
* Each child's peak RSS is its VmHWM (this process image only). The ratios are (a) / (b):
  the cost of everything around the network (target <= 1.1 for time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_infer import axial_volume, peak_rss_mb  # noqa: E402 - the inference benchmark's helpers

from gateway.inference.manifest import load_model_package  # noqa: E402
from gateway.inference.predictor import Predictor  # noqa: E402
from tests.synthetic import abdomen_phantom  # noqa: E402

PIXEL, SLICE, SLICES = 512 / 500 * 0.96, 2.5, 100


def _phantom() -> np.ndarray:
    volume, _ = abdomen_phantom(shape=(SLICES, 512, 512), spacing=(SLICE, PIXEL, PIXEL))
    return volume.hu


def ours(npy: Path, model: Path, tiles_out: Path) -> dict[str, float]:
    """Child (a): the whole predictor; the tiles it feeds the network are saved for (b)."""
    predictor = Predictor(load_model_package(model))
    fed: list[np.ndarray] = []
    run = predictor._run

    def recording(batch: np.ndarray) -> np.ndarray:
        fed.append(batch.copy())
        return run(batch)

    predictor._tiler._network = recording
    volume = axial_volume(np.load(npy), SLICE, PIXEL)
    started = time.perf_counter()
    prediction = predictor.predict(volume)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    np.save(tiles_out, np.concatenate(fed))
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    return {"seconds": seconds, "peak_rss_mb": peak, "tiles": float(sum(len(b) for b in fed)),
            "liver_ml": prediction.voxels["Liver"] * voxel_ml}


def bare(tiles: Path, model: Path) -> dict[str, float]:
    """Child (b): the same tiles through a plain onnxruntime session (channels last, as the network takes them)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model / "model.onnx"), ort.SessionOptions(),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batches = np.load(tiles)
    started = time.perf_counter()
    for tile in batches:
        session.run(None, {name: np.ascontiguousarray(np.moveaxis(tile[None], 1, -1))})
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def _child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True,
                         cwd=REPO)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "liver")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = ours(Path(rest[0]), Path(rest[1]), Path(rest[2])) if kind == "ours" else bare(Path(rest[0]),
                                                                                               Path(rest[1]))
        print(json.dumps(result))
        return 0
    if not (args.model / "model.onnx").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "import_pyliverlesionseg.py"), "--out",
                        str(args.model)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        np.save(root / "ct.npy", _phantom())
        a = _child("ours", str(root / "ct.npy"), str(args.model), str(root / "tiles.npy"))
        b = _child("bare", str(root / "tiles.npy"), str(args.model))
    ratio, memory = a["seconds"] / b["seconds"], a["peak_rss_mb"] / b["peak_rss_mb"]
    print(f"liver model, CT 512 x 512 x {SLICES} ({PIXEL:.2f} mm pixels, {SLICE} mm slices), "
          f"{a['tiles']:.0f} tiles of 189 x 162 x 162")
    print(f"ours: {a['seconds']:.1f} s, peak RSS {a['peak_rss_mb']:.0f} MB, segmented {a['liver_ml']:.0f} ml")
    print(f"bare onnxruntime, same tiles: {b['seconds']:.1f} s, peak RSS {b['peak_rss_mb']:.0f} MB")
    print(f"ratio time {ratio:.3f} (target <= 1.1, {'met' if ratio <= 1.1 else 'MISSED'}), "
          f"ratio peak RSS {memory:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
