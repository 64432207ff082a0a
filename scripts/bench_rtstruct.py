#!/usr/bin/env python3
"""RTSTRUCT benchmark: External + both lungs on a 512 x 512 x 100 CT (``--slices``), against rt-utils on the same masks.

Method
------
* CT: the couch phantom of the tests (trunk, arms, lungs, couch) as 100 DICOM slices of
  512 x 512, 0.98 mm pixels, 3 mm apart, with its known masks.
* Ours: :func:`gateway.rt.rtstruct.build_structure_set` (0.5 mm point reduction), then written to
  bytes. rt-utils 1.2.7 (PyPI): ``RTStructBuilder.create_new`` + ``add_roi`` per mask, then
  written. Both are timed over ``--repeat`` rounds (median), and their file sizes and mean
  points per contour are printed with the ratios. rt-utils is installed on first use into
  ``.bench/rt-utils`` (it ships a top-level ``tests`` package, which must not shadow ours).
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gateway.inference.manifest import load_model_package  # noqa: E402
from gateway.inference.volume import volume_from_datasets  # noqa: E402
from gateway.rt.plausibility import check_structures  # noqa: E402
from gateway.rt.rtstruct import StructureSetInput, build_structure_set  # noqa: E402
from tests.synthetic import couch_phantom, ct_slice  # noqa: E402

RT_UTILS = REPO / ".bench" / "rt-utils"


def _rt_utils() -> object:
    if not (RT_UTILS / "rt_utils").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(RT_UTILS),
                        "rt-utils==1.2.7", "opencv-python-headless"], check=True)
    sys.path.append(str(RT_UTILS))
    import rt_utils

    return rt_utils


def _write_ct(folder: Path, hu: np.ndarray, spacing: tuple[float, float, float]) -> list[object]:
    rng = np.random.default_rng(0)
    slices = []
    for index in range(hu.shape[0]):
        ds = ct_slice("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3",
                      index, hu.shape[1], rng)
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[2]], spacing[0]
        ds.StudyTime, ds.StudyID = "120000", "1"  # rt-utils copies them
        ds.ImagePositionPatient = [-250.0, -250.0, index * spacing[0]]
        ds.PixelData = (hu[index].astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"ct{index:03d}.dcm", enforce_file_format=True)
        slices.append(ds)
    return slices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--slices", type=int, default=100, help="CT slices (the contour QA target is set at 300)")
    args = parser.parse_args(argv)
    rt_utils = _rt_utils()
    spacing = (3.0, 0.98, 0.98)
    phantom, truth = couch_phantom(shape=(args.slices, 512, 512), spacing=spacing)
    manifest = load_model_package(REPO / "models" / "default").manifest
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        slices = _write_ct(folder, phantom.hu, spacing)
        volume = volume_from_datasets(slices)  # type: ignore[arg-type]
        ours_times, theirs_times, qa_times = [], [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            check_structures(volume, truth, manifest)  # the structure stage's plausibility checks
            qa_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            ours = build_structure_set(StructureSetInput(volume, slices, truth, manifest))  # type: ignore[arg-type]
            buffer = io.BytesIO()
            ours.save_as(buffer, enforce_file_format=True)
            ours_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            rtstruct = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(folder))  # type: ignore[attr-defined]
            for name, mask in truth.items():
                rtstruct.add_roi(mask=np.moveaxis(mask, 0, -1), name=name)  # rt-utils wants (rows, cols, slices)
            theirs_path = folder / "theirs.dcm"
            rtstruct.save(str(theirs_path))
            theirs_times.append(time.perf_counter() - started)
        theirs = pydicom.dcmread(theirs_path)
        theirs_size = theirs_path.stat().st_size
    ours_points = [c.NumberOfContourPoints for roi in ours.ROIContourSequence for c in roi.ContourSequence]
    theirs_points = [c.NumberOfContourPoints for roi in theirs.ROIContourSequence for c in roi.ContourSequence]
    ours_time, theirs_time = statistics.median(ours_times), statistics.median(theirs_times)
    print(f"External + Lung_L + Lung_R, 512 x 512 x {args.slices} CT (couch phantom), median of", args.repeat)
    print(f"time: gateway {ours_time:.2f} s, rt-utils {theirs_time:.2f} s, ratio {ours_time / theirs_time:.2f}")
    qa_time = statistics.median(qa_times)
    print(f"plausibility checks: {qa_time:.2f} s, {qa_time / ours_time:.1%} of the gateway's structure set")
    print(f"structure stage: {ours_time:.2f} s without contour QA, {ours_time + qa_time:.2f} s with it "
          f"(+{qa_time / ours_time:.1%}; target at most +10 %)")
    print(f"size: gateway {len(buffer.getvalue()) / 1e6:.2f} MB, rt-utils {theirs_size / 1e6:.2f} MB")
    print(f"points per contour: gateway {np.mean(ours_points):.0f} ({len(ours_points)} contours), rt-utils "
          f"{np.mean(theirs_points):.0f} ({len(theirs_points)} contours)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
