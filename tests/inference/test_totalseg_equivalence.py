"""TotalSegmentator itself against our Predictor, on a real CT in two patient positions (issue 20).

TotalSegmentator's own Python API (``totalsegmentator.python_api.totalsegmentator``, CPU, ``--fast``: Dataset297,
one 3 mm network) runs in a subprocess on the same weights folder (:mod:`tests.nnunet_folder`'s small random
network) that ``scripts/import_totalsegmentator.py`` imports as a package with ``resampling = "totalsegmentator"``.
Both read the same voxels: the pyradiomics lung2 chest CT as plastimatch converts it, written by a scanner with the
patient head first supine and feet first supine (:mod:`tests.realct`), handed to TotalSegmentator as a NIfTI
written from our volume. The labels agree everywhere but at near-ties of the two best logits: that is the proof that
orientation and both resamplings are TotalSegmentator's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import nibabel
import numpy as np
import pydicom
import pytest

from gateway.inference.manifest import load_model_package
from gateway.inference.orientation import axis_transform, orientation_code, oriented
from gateway.inference.predictor import Predictor
from gateway.inference.resample import CANONICAL, zoom_factors, zoom_indices, zoom_shape, zoom_to_int32
from gateway.inference.volume import Volume, volume_from_datasets
from tests.conftest import REPO
from tests.nnunet_folder import load_totalseg_importer, write_totalsegmentator_weights
from tests.realct import real_chest_ct, real_chest_ct_positioned

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Softmax margin between the two best classes below which a voxel is a tie: float16 tile sums (nnU-Net's and ours)
#: and float32 against float64 normalisation round differently there.
TIE = 2e-3
#: The share of voxels that may differ at all (every one of them a tie).
SHARE = 1e-3

RUN_TOTALSEGMENTATOR = textwrap.dedent("""
    import os, sys
    repo, weights, home, source, target = sys.argv[1:6]
    os.environ.update(TOTALSEG_WEIGHTS_PATH=weights, TOTALSEG_HOME_DIR=home, nnUNet_results=weights,
                      nnUNet_raw=weights, nnUNet_preprocessed=weights)
    import nibabel
    import totalsegmentator.nnunet as totalseg_nnunet
    from totalsegmentator.python_api import totalsegmentator

    # nnU-Net's trainer search imports every trainer module, some of them torchvision, which PyPI's CPU torch
    # breaks: TotalSegmentator's own lookup (its custom trainers first) falls back to our importer's instead
    sys.path.insert(0, repo)
    from tests.nnunet_folder import load_importer

    totalseg_nnunet.recursive_find_trainer_class_by_name = load_importer().find_trainer_class

    seg = totalsegmentator(nibabel.load(source), None, ml=True, fast=True, task="total", device="cpu", quiet=True,
                           nr_thr_resamp=1, nr_thr_saving=1, skip_saving=True)
    nibabel.save(seg, target)
""")


class TestAsChangeSpacing:
    """The resampling helpers against TotalSegmentator's ``change_spacing`` on arrays."""

    @pytest.mark.parametrize(("shape", "spacing", "target"), [
        ((61, 50, 47), (0.7, 0.82, 5.0), (3.0, 3.0, 3.0)),  # a chest CT to the 3 mm model
        ((40, 33, 20), (0.976562, 0.976562, 2.5), (1.5, 1.5, 1.5)),  # not a float32 spacing: the header's counts
        ((30, 31, 32), (0.75, 0.75, 1.0), (0.75, 0.75, 1.0)),  # already there: returned as it is
    ])
    def test_ct_to_the_model_grid(self, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                                  target: tuple[float, float, float]) -> None:
        from totalsegmentator.resampling import change_spacing

        hu = np.random.default_rng(1).integers(-1024, 1500, shape).astype(np.int16)
        hu[:, : shape[1] // 2] = -1000  # uniform air: sums that land on an integer, or just below it
        image = nibabel.Nifti1Image(hu, np.diag([*spacing, 1.0]))
        theirs = np.asarray(change_spacing(image, list(target), order=1, dtype=np.int32).dataobj)
        factors = zoom_factors(spacing, target)
        ours = zoom_to_int32(hu, factors)
        assert ours.shape == theirs.shape == zoom_shape(shape, factors)
        assert np.array_equal(ours, theirs)

    @pytest.mark.parametrize(("small", "shape"), [((21, 17, 9), (61, 50, 47)), ((20, 20, 20), (40, 39, 20)),
                                                  ((7, 30, 5), (13, 29, 5))])
    def test_labels_back_to_the_ct_grid(self, small: tuple[int, int, int], shape: tuple[int, int, int]) -> None:
        from totalsegmentator.resampling import change_spacing

        labels = np.random.default_rng(2).integers(0, 118, small).astype(np.uint8)
        image = nibabel.Nifti1Image(labels, np.diag([3.0, 3.0, 3.0, 1.0]))
        theirs = np.asarray(change_spacing(image, [3.0, 3.0, 3.0], shape, order=0, dtype=np.uint8).dataobj)
        picks = [zoom_indices(m, n) for m, n in zip(small, shape, strict=True)]
        assert np.array_equal(labels[np.ix_(*picks)], theirs)
        reversed_picks = [zoom_indices(m, n, reverse=True) for m, n in zip(small, shape, strict=True)]
        flipped = np.flip(labels, (0, 1, 2))  # the model's axes running against the canonical ones
        assert np.array_equal(flipped[np.ix_(*reversed_picks)], np.flip(theirs, (0, 1, 2)))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """TotalSegmentator's weights folder holding Dataset297, and ``total_fast`` imported from it."""
    root = tmp_path_factory.mktemp("totalseg")
    weights = write_totalsegmentator_weights(root / "nnunet" / "results", (297,), seed=3)
    importer: ModuleType = load_totalseg_importer()
    out = root / "models" / "total_fast"
    assert importer.main(["--task", "total_fast", "--weights", str(weights), "--out", str(out)]) == 0
    return weights, out


def run_totalsegmentator(weights: Path, volume: Volume, folder: Path) -> np.ndarray:
    """TotalSegmentator's label map of *volume*, in the volume's own array axes."""
    home = folder / "home"
    home.mkdir()
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_TEST", "send_usage_stats": False,
                                                  "prediction_counter": 0}), encoding="utf-8")
    source, target = folder / "ct.nii.gz", folder / "seg.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume.hu, LPS_TO_RAS @ volume.affine), str(source))
    result = subprocess.run([sys.executable, "-c", RUN_TOTALSEGMENTATOR, str(REPO), str(weights), str(home),
                             str(source), str(target)], capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seg = nibabel.load(str(target))
    assert np.allclose(seg.affine, LPS_TO_RAS @ volume.affine, atol=1e-4)
    return np.asarray(seg.dataobj).astype(np.int64)


def margin(predictor: Predictor, volume: Volume) -> np.ndarray:
    """Our softmax margin between the two best classes, on the volume's grid: the model grid's taken back as the
    labels are (TotalSegmentator's nearest-neighbour zoom)."""
    spec = predictor.manifest.input
    probabilities = predictor.probabilities(volume)
    ranked = np.sort(probabilities, axis=0)
    sure = ranked[-1] - ranked[-2]
    del probabilities, ranked
    order, flips = axis_transform(orientation_code(volume.affine), spec.orientation)
    shape = oriented(volume.hu, order, flips).shape
    reverse = axis_transform(CANONICAL, spec.orientation)[1]
    picks = [zoom_indices(m, n, r) for m, n, r in zip(sure.shape, shape, reverse, strict=True)]
    back = sure[np.ix_(*picks)]
    for axis, flip in enumerate(flips):
        if flip:
            back = np.flip(back, axis)
    return np.transpose(back, np.argsort(order))


@pytest.mark.timeout(900)  # TotalSegmentator's own run, about 100 s a position on 2 CPUs
@pytest.mark.parametrize("position", ["HFS", "FFS"])
def test_same_labels_as_totalsegmentator(package: tuple[Path, Path], tmp_path: Path, position: str) -> None:
    weights, out = package
    ct_folder = tmp_path / "ct"
    # 2 x 2 pixel blocks averaged (real HU, 1.4 mm pixels, still finer than the 3 mm model grid) and the middle 24
    # of the 61 slices (12 cm of chest, 40 planes of the 3 mm grid): a tenth of the voxels, so both runs fit the
    # suite's time.
    if position == "HFS":
        series = real_chest_ct(ct_folder, source="lung2", slices=24, downsample=2)
    else:
        series = real_chest_ct_positioned(ct_folder, position, source="lung2", slices=24, downsample=2)
    volume = volume_from_datasets([pydicom.dcmread(path) for path in series.files])
    theirs = run_totalsegmentator(weights, volume, tmp_path)
    assert theirs.shape == volume.hu.shape

    predictor = Predictor(load_model_package(out))
    assert predictor.manifest.input.resampling == "totalsegmentator"
    prediction = predictor.predict(volume)
    ours = np.zeros(volume.hu.shape, dtype=np.int64)
    for name, value in prediction.values.items():
        ours[prediction.mask(name)] = value
    found = np.unique(theirs)
    assert len(found) > 5  # the random network finds several classes: the comparison means something

    differ = ours != theirs
    margins = margin(predictor, volume)[differ]
    not_tie = margins >= TIE
    share = float(differ.mean())
    print(f"{position} ({orientation_code(volume.affine)}): {int(differ.sum())} of {differ.size} voxels differ "
          f"({share:.2e}), {int(not_tie.sum())} of them not at a tie (largest margin there "
          f"{float(margins.max(initial=0)):.1e}); {len(found)} classes")
    assert share <= SHARE
    assert not not_tie.any()
