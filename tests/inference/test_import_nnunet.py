"""scripts/import_nnunet.py: a trained nnU-Net v2 folder becomes a package our Predictor runs as nnU-Net does.

The reference is nnU-Net's own ``nnUNetPredictor`` on the same CT. nnU-Net sums the tiles' logits in float16
(``_internal_predict_sliding_window_return_logits``: ``predicted_logits`` and ``n_predictions`` are
``torch.half``, and so is ``compute_gaussian``'s map); our predictor sums in float32. The comparison to 1e-3
and identical labels (but at exact ties, :data:`TIE`) is made against ``nnUNetPredictor`` with only those
dtypes set to float32 (:func:`float32_sums`). Stock nnU-Net differs from that by its float16 rounding alone,
largest at the volume's faces, where the Gaussian weights of all covering tiles underflow float16's subnormals:
up to 0.2 in probability and some 0.1 % of the labels (``test_two_folds_without_mirroring`` measures it).

:class:`TestResampling` runs CTs that are not at the model's spacing, so that nnU-Net resamples the normalised CT
to the model's grid (cubic) and its logits back to the CT's (linear), separately along a coarse axis where the
spacing's anisotropy exceeds 3 (``determine_do_sep_z_and_axis``): our probabilities, on the CT grid, are compared
with nnU-Net's there.
"""

from __future__ import annotations

import contextlib
import functools
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from nnunetv2.inference import predict_from_raw_data
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, determine_do_sep_z_and_axis

from gateway.inference.manifest import load_model_package
from gateway.inference.predictor import Predictor
from gateway.inference.volume import Volume
from tests.nnunet_folder import PATCH, SPACING, Recipe, ct_volume, load_importer, write_results_folder

TOLERANCE = 1e-3
#: Where nnU-Net's two likeliest classes are closer than this, either may win: ONNX Runtime and torch differ by
#: some 1e-5 in a logit, and on this random network 4 voxels in 140,400 have margins under 1e-5.
TIE = 1e-4
TILE_STEP = 0.5  # nnUNetPredictor's default


@pytest.fixture(scope="module")
def importer() -> ModuleType:
    return load_importer()


@pytest.fixture(scope="module")
def volume() -> Volume:
    return ct_volume()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_results_folder(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def transposed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plans whose network sees the CT's axes as (x, z, y): ``transpose_forward = [2, 0, 1]``."""
    return write_results_folder(tmp_path_factory.mktemp("transposed"), Recipe(transpose_forward=(2, 0, 1)), seed=7)


@contextlib.contextmanager
def float32_sums() -> Iterator[None]:
    """nnU-Net's sliding window with its float16 sums (logits, weights, Gaussian map) made float32."""
    original = predict_from_raw_data.compute_gaussian
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict_from_raw_data, "compute_gaussian",
                      functools.partial(original, dtype=torch.float32))
        patch.setattr(torch, "half", torch.float32)  # the dtype of predicted_logits and n_predictions
        yield


def nnunet(folder: Path, volume: Volume, folds: tuple[int, ...], *, mirroring: bool,
           exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's ``(segmentation, probabilities)`` of *volume* (array axes z, y, x as SimpleITK reads them)."""
    predictor = nnUNetPredictor(tile_step_size=TILE_STEP, use_gaussian=True, use_mirroring=mirroring,
                                device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds,
                                                   checkpoint_name="checkpoint_final.pth")
    with float32_sums() if exact else contextlib.nullcontext():
        segmentation, probabilities = predictor.predict_single_npy_array(
            volume.hu[None].astype(np.float32), {"spacing": list(volume.spacing)}, None, None, True)
    return segmentation, probabilities


def import_model(importer: ModuleType, folder: Path, out: Path, *options: str) -> int:
    code: int = importer.main([str(folder), "--out", str(out), *options])
    return code


def assert_as_nnunet(package: Path, volume: Volume, reference: tuple[np.ndarray, np.ndarray],
                     transpose: tuple[int, int, int] = (0, 1, 2)) -> Predictor:
    """Our probabilities within :data:`TOLERANCE` of nnU-Net's, and every label's mask its segmentation's but
    at ties (:data:`TIE`)."""
    segmentation, probabilities = reference
    predictor = Predictor(load_model_package(package))
    ours = predictor.probabilities(volume)
    expected = probabilities.transpose(0, *[axis + 1 for axis in transpose])  # to the network's axis order
    difference = float(np.abs(ours - expected).max())
    print(f"max abs probability difference to nnU-Net: {difference:.2e}")
    assert ours.shape == expected.shape and difference <= TOLERANCE
    ranked = np.sort(probabilities, axis=0)
    decided = ranked[-1] - ranked[-2] >= TIE
    prediction = predictor.predict(volume)
    for name, value in prediction.values.items():
        differ = prediction.mask(name) != (segmentation == value)
        print(f"{name}: {int(differ.sum())} voxels differ, {int((differ & decided).sum())} of them not at a tie")
        assert not (differ & decided).any()
    return predictor


class TestAgainstNnunet:
    def test_one_fold_with_mirroring(self, importer: ModuleType, trained: Path, volume: Volume,
                                     tmp_path: Path) -> None:
        assert import_model(importer, trained, tmp_path / "toy", "--fold", "0") == 0
        manifest = tomllib.loads((tmp_path / "toy" / "manifest.toml").read_text(encoding="utf-8"))
        assert manifest["input"]["orientation"] == "SPL" and manifest["input"]["mirror_axes"] == [0, 1, 2]
        assert manifest["input"]["resampling"] == "nnunet"
        assert onnx.load(str(tmp_path / "toy" / "model.onnx")).ir_version <= importer.IR_VERSION == 8
        assert manifest["input"]["normalisation"] == {"kind": "zscore", "mean": 48.5, "std": 251.25,
                                                      "hu_min": -903.0, "hu_max": 1207.0}
        assert [(label["value"], label["name"]) for label in manifest["labels"]] == [(1, "liver"),
                                                                                     (2, "Spinal_cord")]
        segmentation, probabilities = nnunet(trained, volume, (0,), mirroring=True)
        assert np.bincount(segmentation.ravel(), minlength=3).min() > 100  # every class is found somewhere
        assert_as_nnunet(tmp_path / "toy", volume, (segmentation, probabilities))

    def test_two_folds_without_mirroring(self, importer: ModuleType, trained: Path, volume: Volume,
                                         tmp_path: Path) -> None:
        assert import_model(importer, trained, tmp_path / "toy", "--disable-tta") == 0
        assert "folds 0, 1" in load_model_package(tmp_path / "toy").manifest.model.description
        reference = nnunet(trained, volume, (0, 1), mirroring=False)
        predictor = assert_as_nnunet(tmp_path / "toy", volume, reference)
        # Stock nnU-Net's float16 sums: 161 labels of 140,400 differ (109 on the volume's outer faces), and
        # probabilities by up to 0.18 at the faces, 1.7e-3 four or more voxels inside.
        stock_segmentation, stock = nnunet(trained, volume, (0, 1), mirroring=False, exact=False)
        ours = predictor.probabilities(volume)
        print(f"stock nnU-Net (float16 sums): max abs probability difference {np.abs(ours - stock).max():.2e}, "
              f"{int((ours.argmax(axis=0) != stock_segmentation).sum())} labels differ")
        assert (ours.argmax(axis=0) == stock_segmentation).mean() >= 0.998

    def test_transposed_plans_and_dynamic_axes(self, importer: ModuleType, transposed: Path, volume: Volume,
                                               tmp_path: Path) -> None:
        assert import_model(importer, transposed, tmp_path / "toy", "--fold", "1", "--disable-tta", "--dynamic") == 0
        spec = load_model_package(tmp_path / "toy").manifest.input
        assert (spec.orientation, spec.spacing_mm, spec.patch_size) == ("LSP", [1.5, 2.5, 1.5], [40, 24, 40])
        reference = nnunet(transposed, volume, (1,), mirroring=False)
        assert_as_nnunet(tmp_path / "toy", volume, reference, transpose=(2, 0, 1))


class TestResampling:
    """CTs off the model's grid: nnU-Net's cubic resampling of the normalised CT, and linear of the logits back."""

    @staticmethod
    def check_grids(volume: Volume, model_spacing: tuple[float, ...], transpose: tuple[int, int, int],
                    separate_z: tuple[bool, int | None]) -> None:
        """The CT is off the model's grid, resampled it still holds a patch, and nnU-Net resamples both ways
        with the separate-z choice *separate_z* (network axes)."""
        ct = [volume.spacing[axis] for axis in transpose]
        shape = [volume.shape[axis] for axis in transpose]
        patch = [PATCH[axis] for axis in transpose]
        resampled = compute_new_shape(shape, ct, model_spacing)
        assert list(resampled) != shape and all(resampled >= patch), (resampled, patch)
        assert determine_do_sep_z_and_axis(None, ct, model_spacing) == separate_z  # the CT to the model's grid
        assert determine_do_sep_z_and_axis(None, model_spacing, ct) == separate_z  # the logits back

    def test_near_isotropic_ct_with_mirroring(self, importer: ModuleType, trained: Path, tmp_path: Path) -> None:
        volume = ct_volume((56, 90, 66), spacing=(2.0, 1.0, 1.2))  # 45 x 60 x 53 on the model's grid
        self.check_grids(volume, SPACING, (0, 1, 2), (False, None))
        assert import_model(importer, trained, tmp_path / "toy", "--fold", "0") == 0
        reference = nnunet(trained, volume, (0,), mirroring=True)
        assert_as_nnunet(tmp_path / "toy", volume, reference)

    def test_anisotropic_ct_separately_along_z(self, importer: ModuleType, trained: Path, tmp_path: Path) -> None:
        volume = ct_volume((23, 90, 78), spacing=(5.0, 1.0, 1.0))  # anisotropy 5; 46 x 60 x 52 on the model's grid
        self.check_grids(volume, SPACING, (0, 1, 2), (True, 0))
        assert import_model(importer, trained, tmp_path / "toy", "--disable-tta") == 0
        reference = nnunet(trained, volume, (0, 1), mirroring=False)
        assert_as_nnunet(tmp_path / "toy", volume, reference)

    def test_anisotropic_ct_and_transposed_plans(self, importer: ModuleType, transposed: Path,
                                                 tmp_path: Path) -> None:
        """The coarse axis is the network's axis 1 (transpose_forward [2, 0, 1] puts z there)."""
        volume = ct_volume((23, 90, 78), spacing=(5.0, 1.0, 1.0))
        self.check_grids(volume, tuple(SPACING[axis] for axis in (2, 0, 1)), (2, 0, 1), (True, 1))
        assert import_model(importer, transposed, tmp_path / "toy", "--fold", "1", "--disable-tta") == 0
        reference = nnunet(transposed, volume, (1,), mirroring=False)
        assert_as_nnunet(tmp_path / "toy", volume, reference, transpose=(2, 0, 1))

    def test_anisotropic_model_and_near_isotropic_ct(self, importer: ModuleType, tmp_path: Path) -> None:
        """Separate z because the model's spacing (4 x 1 x 1 mm) is anisotropic, not the CT's."""
        spacing = (4.0, 1.0, 1.0)
        folder = write_results_folder(tmp_path / "results", Recipe(folds=(0,), spacing=spacing), seed=3)
        volume = ct_volume((70, 75, 65), spacing=(1.5, 1.2, 1.2))  # 26 x 90 x 78 on the model's grid
        self.check_grids(volume, spacing, (0, 1, 2), (True, 0))
        assert import_model(importer, folder, tmp_path / "toy", "--disable-tta") == 0
        reference = nnunet(folder, volume, (0,), mirroring=False)
        assert_as_nnunet(tmp_path / "toy", volume, reference)


class TestOnnxIrVersion:
    @staticmethod
    def identity(path: Path, opset: int, ir_version: int) -> None:
        node = onnx.helper.make_node("Identity", ["x"], ["y"])
        value = onnx.helper.make_tensor_value_info
        graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [2])],
                                       [value("y", onnx.TensorProto.FLOAT, [2])])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                       ir_version=ir_version)
        onnx.save(model, str(path))

    def test_lowered_to_opset_17s(self, importer: ModuleType, tmp_path: Path) -> None:
        self.identity(tmp_path / "model.onnx", 17, 10)
        assert importer.limit_ir_version(tmp_path / "model.onnx") == 8
        assert onnx.load(str(tmp_path / "model.onnx")).ir_version == 8
        session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": np.ones(2, np.float32)})[0].tolist() == [1.0, 1.0]

    def test_left_alone_at_8_and_refused_where_the_opset_needs_more(self, importer: ModuleType,
                                                                     tmp_path: Path) -> None:
        self.identity(tmp_path / "old.onnx", 13, 7)
        assert importer.limit_ir_version(tmp_path / "old.onnx") == 7
        self.identity(tmp_path / "new.onnx", 21, 10)
        with pytest.raises(importer.ImportFailure, match="need IR version 10"):
            importer.limit_ir_version(tmp_path / "new.onnx")


class TestRefusals:
    @pytest.mark.parametrize(("recipe", "options", "reason"), [
        (Recipe(folds=(0,), normalisation="ZScoreNormalization"), (), "CTNormalization"),
        (Recipe(folds=(0,), channels={"0": "CT", "1": "PET"}), (), "2 input channels"),
        (Recipe(folds=(0,), labels={"background": 0, "body": [1, 2], "tumour": 2}), (), "region-based"),
        (Recipe(folds=(0,), configuration="3d_cascade_fullres", plans_extra={"previous_stage": "3d_lowres"}), (),
         "cascade"),
        (Recipe(folds=(0,)), ("--fold", "3"), "fold_3/checkpoint_final.pth: missing"),
        (Recipe(folds=(0,)), ("--rename", "kidney=Kidney_L"), "no label ['kidney']"),
        (Recipe(folds=(0,), labels={"background": 0, "left kidney": 1, "left_kidney": 2}), (), "tell them apart"),
        (Recipe(folds=(0,), plans_extra={"resampling_fn_data": "resample_torch_fornnunet"}), (),
         "resampling_fn_data 'resample_torch_fornnunet': only 'resample_data_or_seg_to_shape'"),
        (Recipe(folds=(0,), plans_extra={"resampling_fn_data_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                                       "force_separate_z": None}}), (), "order=1"),
        (Recipe(folds=(0,), plans_extra={"resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1}}), (),
         "force_separate_z=False not reproduced"),  # resample_data_or_seg_to_shape's default, not None
        (Recipe(folds=(0,), plans_extra={"resampling_fn_probabilities_kwargs": {
            "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": True}}), (), "force_separate_z=True"),
        (Recipe(folds=(0,), plans_extra={"resampling_fn_data_kwargs": {
            "is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None,
            "separate_z_anisotropy_threshold": 2}}), (), "separate_z_anisotropy_threshold=2"),
        (Recipe(folds=(0,), reader="Tiff3DIO"), (), "image reader 'Tiff3DIO': the gateway reproduces the axes of "
         "NibabelIOWithReorient, SimpleITKIO, NibabelIO only"),
        (Recipe(folds=(0,), reader="NibabelIO"), (), "NibabelIO keeps each training image's stored voxel axes"),
        (Recipe(folds=(0,), reader="SimpleITKIO", reader_override="NibabelIOWithReorient"), (),
         "plans.json reads images with SimpleITKIO, dataset.json's overwrite_image_reader_writer says "
         "NibabelIOWithReorient"),
        (Recipe(folds=(0,)), ("--orientation", "SPQ"), "--orientation 'SPQ': 3 letters"),
        (Recipe(folds=(0,)), ("--tile-step", "1.5"), "--tile-step 1.5: a fraction of the patch in (0, 1]"),
    ], ids=["zscore", "two-channels", "regions", "cascade", "missing-fold", "unknown-rename", "name-collision",
            "torch-resampling", "linear-image", "forced-no-separate-z", "forced-separate-z", "anisotropy-2",
            "tiff-reader", "nibabel-without-orientation", "readers-disagree", "bad-orientation", "tile-step"])
    def test_refused_with_exit_code_2_and_nothing_written(self, importer: ModuleType, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], recipe: Recipe,
                                                          options: tuple[str, ...], reason: str) -> None:
        folder = write_results_folder(tmp_path / "results", recipe)
        out = tmp_path / "models" / "toy"
        assert import_model(importer, folder, out, *options) == 2
        assert reason in capsys.readouterr().err
        assert not out.parent.exists() or not any(out.parent.iterdir())

    def test_missing_plans(self, importer: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        folder = write_results_folder(tmp_path / "results", Recipe(folds=(0,)))
        (folder / "plans.json").unlink()
        assert import_model(importer, folder, tmp_path / "toy") == 2
        assert "plans.json: missing" in capsys.readouterr().err


class TestReaders:
    """The orientation of the network's axes is the image reader's (plans.json's image_reader_writer)."""

    @pytest.mark.parametrize(("reader", "options", "orientation"), [
        ("SimpleITKIO", (), "SPL"), ("SimpleITKIO", ("--orientation", "IPR"), "IPR"),
        ("NibabelIO", ("--orientation", "SAR"), "SAR"), ("NibabelIOWithReorient", (), "SAR"),
    ], ids=["simpleitk-default", "simpleitk-given", "nibabel-given", "nibabel-reorient"])
    def test_orientation(self, importer: ModuleType, tmp_path: Path, reader: str, options: tuple[str, ...],
                         orientation: str) -> None:
        folder = write_results_folder(tmp_path / "results", Recipe(folds=(0,), reader=reader))
        assert import_model(importer, folder, tmp_path / "toy", "--tile-step", "0.75", *options) == 0
        spec = load_model_package(tmp_path / "toy").manifest.input
        assert (spec.orientation, spec.overlap) == (orientation, 0.25)


class TestNames:
    @pytest.mark.parametrize(("name", "safe"), [
        ("liver", "liver"), ("Spinal cord", "Spinal_cord"), ("a\\b", "a_b"), ("  left  kidney ", "left_kidney"),
        ("inferior vena cava (IVC)", "inferior_vena_ca"), ("?", ""),
    ])
    def test_tg263_name(self, importer: ModuleType, name: str, safe: str) -> None:
        assert importer.tg263_name(name) == safe

    @pytest.mark.parametrize(("name", "lost"), [
        ("lung_middle_lobe_right", True), ("adrenal_gland_left", True), ("Parotid gland (R)", False),
        ("Kidney_L", False), ("left_kidney", False), ("iliopsoas_muscle", False), ("humerus_left", False),
    ])
    def test_a_side_cut_off_is_found(self, importer: ModuleType, name: str, lost: bool) -> None:
        assert importer.loses_side(name) is lost

    def test_a_label_that_would_lose_its_side_is_refused(self, importer: ModuleType) -> None:
        dataset = {"labels": {"background": 0, "lung_middle_lobe_right": 1, "Spinal cord": 2}}
        with pytest.raises(importer.Refused, match="'lung_middle_lobe_right' would lose its side as "
                                                   "'lung_middle_lobe'"):
            importer.class_names(dataset, [])
        assert importer.class_names(dataset, [("lung_middle_lobe_right", "Lung_Lobe_Mid_R")]) == [
            "Lung_Lobe_Mid_R", "Spinal_cord"]

    def test_renamed_labels_and_a_second_import_replaces_the_first(self, importer: ModuleType, tmp_path: Path) -> None:
        folder = write_results_folder(tmp_path / "results", Recipe(folds=(0,)))
        out = tmp_path / "models" / "toy"
        assert import_model(importer, folder, out, "--rename", "liver=Liver", "--name", "toy-liver") == 0
        assert import_model(importer, folder, out, "--rename", "Spinal cord=SpinalCord", "--version", "2") == 0
        manifest = load_model_package(out).manifest
        assert [label.name for label in manifest.labels] == ["liver", "SpinalCord"]
        assert (manifest.model.name, manifest.model.version) == ("toy", "2")
        assert sorted(path.name for path in out.parent.iterdir()) == ["toy"]
