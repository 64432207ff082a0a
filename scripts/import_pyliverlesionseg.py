#!/usr/bin/env python3
"""Import pyliverlesionseg 0.3's whole-liver CT network as the ``liver`` model package (ONNX + manifest).

What it does: fetches the wheel ``pyliverlesionseg==0.3`` with pip (or takes ``--wheel``), checks its
sha256, reads the Keras 2.2.2 weights-only HDF5 file inside it with h5py, writes the network as ONNX
with ``onnx.helper`` (opset 17; no TensorFlow, no torch), and writes ``model.onnx``, ``manifest.toml``,
``NOTICE`` and the package's Apache-2.0 ``LICENSE`` into ``--out`` (default ``models/liver``). The package
is built and validated in a temporary folder beside ``--out`` and renamed into place, so a failed import
leaves no half package.

Where the facts come from:

* the network: pyliverlesionseg's ``architectures/unet_generalized.py::create_unet_like_model`` with the
  arguments its liver predictor passes (4 pathways at 1, 3, 9, 27; "same" convolutions; instance
  normalisation as a Keras ``Lambda``, ``(x - mean) / (std + 1e-7)``; LeakyReLU 0.01; "linear"
  upsampling = nearest x3 then a 3-voxel average pool), checked layer by layer against a tf2onnx export
  of the same weights (``shared/models/liver-unet-3mm``; ``tests/inference/test_import_liver.py`` compares outputs);
* the weights: the HDF5 file's ``layer_names`` give the layer order; the 15 ``conv3d_*`` layers are the
  only ones holding weights and are matched in that order;
* the pre-processing in the manifest: the package's ``predict_liver_lesion_seg.py`` (resample to 1.5 mm,
  3x3x3 median, resample to 3 mm, ``clip(HU / 1000, -0.2, 0.2) * 2.5``, threshold 0.5, largest component).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py  # type: ignore[import-untyped]  # h5py ships no type stubs
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gateway.errors import ConfigError  # noqa: E402
from gateway.inference.manifest import load_model_package  # noqa: E402

REQUIREMENT = "pyliverlesionseg==0.3"
WHEEL_NAME = "pyliverlesionseg-0.3-py3-none-any.whl"
WHEEL_SHA256 = "ffe1576aefff5922ea8d1cfa2c50864cda97798798559542b9517689fd290cb8"
MEMBER = ("pyliverlesionseg/trained_models/"
          "model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_dice_loss_val_binary_dice_mean.hdf5")
LICENSE_MEMBER = "pyliverlesionseg-0.3.dist-info/LICENSE"
PARAMETERS = 3_874_961
OPSET = 17
IR_VERSION = 8  # opset 17's own; onnxruntime >= 1.17 loads it (newer onnx writes IR versions it may not)
INPUT, OUTPUT = "ct_norm", "main"
PATCH_SIZE, OUTPUT_SIZE = (189, 162, 162), (163, 136, 136)
EPSILON = 1e-7  # added to the standard deviation, outside the square root (the Keras Lambda)
LEAKY_ALPHA = 0.01
FACTOR = 3  # pooling and upsampling factor between pathways

#: conv3d_1 ... conv3d_15 in layer order: kernel size (x, y, z), input and output channels.
CONVOLUTIONS: tuple[tuple[tuple[int, int, int], int, int], ...] = (
    ((3, 3, 1), 1, 20), ((3, 3, 3), 20, 40),
    ((3, 3, 1), 40, 40), ((3, 3, 3), 40, 80),
    ((3, 3, 1), 80, 80), ((3, 3, 3), 80, 160),
    ((3, 3, 3), 160, 160), ((3, 3, 3), 160, 160),
    ((3, 3, 3), 320, 160), ((3, 3, 1), 160, 80),
    ((3, 3, 3), 160, 80), ((3, 3, 1), 80, 40),
    ((3, 3, 3), 80, 40), ((3, 3, 1), 40, 20),
    ((1, 1, 1), 20, 1),
)
#: Up path: (voxels cropped from each side of the skip connection, first convolution of the level).
UP_LEVELS = ((1, 9), (4, 11), (13, 13))

MANIFEST = """\
[model]
name = "liver"
version = "0.3"   # pyliverlesionseg release
modality = "CT"
description = "Whole liver, 3D U-Net (pyliverlesionseg 0.3, KU Leuven, Apache-2.0; Tang et al. 2020)"
[input]
orientation = "RAS"          # x, y, z with x and y flipped from DICOM's LPS
spacing_mm = [3.0, 3.0, 3.0]
patch_size = [189, 162, 162]
output_crop = [13, 13, 13]
layout = "channels_last"
overlap = 0.0
tile_weighting = "constant"  # the package tiles without overlap
batch_size = 1
padding_hu = -1024
prefilter = { kind = "median", size = 3, spacing_mm = [1.5, 1.5, 1.5] }
normalisation = { kind = "clip_scale", hu_min = -200, hu_max = 200, out_min = -0.5, out_max = 0.5 }  \
# clip(HU/1000, -0.2, 0.2) * 2.5
[output]
kind = "sigmoid"
threshold = 0.5
[[labels]]
value = 1
name = "Liver"
colour = [165, 42, 42]
interpreted_type = "ORGAN"
keep_largest_component = true
fill_holes = true
min_volume_ml = 100
"""

NOTICE = f"""\
liver: whole-liver segmentation of CT, converted from pyliverlesionseg 0.3

Source: pyliverlesionseg 0.3 (https://github.com/KUL-recon-lab/pyliverlesionseg), by Xikai Tang and
Georg Schramm, KU Leuven. Licensed under the Apache License, Version 2.0 (Apache-2.0); the licence
text is in LICENSE, copied from the wheel.

Wheel: {WHEEL_NAME} from PyPI
sha256: {WHEEL_SHA256}
Weights: the Keras HDF5 member
  {MEMBER}

model.onnx holds these weights unchanged (float32), in an ONNX graph (opset {OPSET}) of the package's
U-Net, converted by scripts/import_pyliverlesionseg.py. The conversion changed the file format only:
no retraining, no change of weights.

Please cite (the reference the package gives): Tang X, et al. Whole liver segmentation based on deep
learning and manual adjustment for clinical use in SIRT. Eur J Nucl Med Mol Imaging (EJNMMI) 47, 2020.
https://doi.org/10.1007/s00259-020-04800-3
"""

Weights = list[tuple[np.ndarray, np.ndarray]]


class ImportFailure(Exception):
    """The import cannot go on; the message says why."""


def sha256_of(path: Path) -> str:
    """The hex sha256 of the file at *path*."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(folder: Path) -> Path:
    """Fetch the wheel with pip into *folder* (it declares Python 3.6 only, hence ``--python-version``)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.6",
               "--only-binary=:all:", REQUIREMENT, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImportFailure(f"pip download {REQUIREMENT} failed:\n{result.stderr.strip()}")
    wheel = folder / WHEEL_NAME
    if not wheel.is_file():
        raise ImportFailure(f"pip download did not write {WHEEL_NAME} into {folder}")
    return wheel


def verify_wheel(wheel: Path) -> None:
    """Refuse any wheel other than the one whose weights were checked against the reference."""
    actual = sha256_of(wheel)
    if actual != WHEEL_SHA256:
        raise ImportFailure(f"{wheel}: sha256 {actual} is not the expected {WHEEL_SHA256}")


def _convolution_layers(weights_file: h5py.File) -> list[h5py.Group]:
    """The layer groups holding weights, in the order of the ``layer_names`` attribute."""
    names = [name.decode() for name in weights_file.attrs["layer_names"]]
    layers = [weights_file[name] for name in names if len(weights_file[name].attrs["weight_names"])]
    found = [layer.name.lstrip("/") for layer in layers]
    if len(layers) != len(CONVOLUTIONS) or not all(name.startswith("conv3d_") for name in found):
        raise ImportFailure(f"{MEMBER}: expected {len(CONVOLUTIONS)} conv3d layers with weights, found {found}")
    return layers


def _layer_weights(layer: h5py.Group, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernel ``(kx, ky, kz, in, out)`` and bias of one layer, checked against :data:`CONVOLUTIONS`."""
    arrays = {name.decode().rsplit("/", 1)[-1]: np.asarray(layer[name.decode()], dtype=np.float32)
              for name in layer.attrs["weight_names"]}
    kernel_size, channels_in, channels_out = CONVOLUTIONS[index]
    kernel, bias = arrays.get("kernel:0"), arrays.get("bias:0")
    if kernel is None or bias is None or kernel.shape != (*kernel_size, channels_in, channels_out) \
            or bias.shape != (channels_out,):
        shapes = {name: array.shape for name, array in arrays.items()}
        raise ImportFailure(f"{MEMBER}: layer {layer.name} has weights {shapes}, expected kernel "
                            f"{(*kernel_size, channels_in, channels_out)} and bias ({channels_out},)")
    return kernel, bias


def read_weights(wheel: Path) -> Weights:
    """The 15 (kernel, bias) pairs, straight from the HDF5 member of the wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ImportFailure(f"{wheel}: cannot read {MEMBER}: {exc}") from exc
    with h5py.File(io.BytesIO(data), "r") as weights_file:
        return [_layer_weights(layer, index) for index, layer in enumerate(_convolution_layers(weights_file))]


def read_license(wheel: Path) -> str:
    """The Apache-2.0 licence text shipped in the wheel (Apache-2.0 §4(a): pass it on)."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(LICENSE_MEMBER).decode("utf-8")


def parameter_count(weights: Weights) -> int:
    """Number of trainable values in the network."""
    return sum(kernel.size + bias.size for kernel, bias in weights)


@dataclass
class _Graph:
    """Nodes and initialisers of the graph being built; each :meth:`op` returns its output's name."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    counter: int = 0

    def op(self, op_type: str, inputs: Sequence[str], *, name: str | None = None, **attributes: Any) -> str:
        self.counter += 1
        output = name or f"{op_type.lower()}_{self.counter}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output, **attributes))
        return output

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name


def _norm_act(graph: _Graph, x: str) -> str:
    """Keras' instance normalisation ``(x - mean) / (sqrt(mean((x - mean)^2)) + 1e-7)``, then LeakyReLU.

    Not ONNX InstanceNormalization: its epsilon sits inside the square root. The means are
    GlobalAveragePool (per sample and channel over the spatial axes, like ReduceMean over [2, 3, 4]
    with keepdims) because onnxruntime sums those in the order the reference export does: the outputs
    are then bit-identical, where ReduceMean's order drifts by about 1e-4 over the 14 normalisations.
    """
    mean = graph.op("GlobalAveragePool", [x])
    centred = graph.op("Sub", [x, mean])
    variance = graph.op("GlobalAveragePool", [graph.op("Mul", [centred, centred])])
    std = graph.op("Add", [graph.op("Sqrt", [variance]), "epsilon"])
    return graph.op("LeakyRelu", [graph.op("Div", [centred, std])], alpha=LEAKY_ALPHA)


def _conv(graph: _Graph, x: str, number: int, weights: Weights) -> str:
    """``conv3d_<number>``, stride 1, "same" padding; Keras kernel (kx, ky, kz, in, out) to (out, in, kx, ky, kz)."""
    kernel, bias = weights[number - 1]
    layer = f"conv3d_{number}"
    w = graph.constant(f"{layer}/kernel", np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
    b = graph.constant(f"{layer}/bias", bias)
    size = list(kernel.shape[:3])
    half = [k // 2 for k in size]
    return graph.op("Conv", [x, w, b], name=layer, kernel_shape=size, pads=half + half, strides=[1, 1, 1])


def _block(graph: _Graph, x: str, number: int, weights: Weights) -> str:
    """Normalise, activate, convolve: the unit the U-Net repeats."""
    return _conv(graph, _norm_act(graph, x), number, weights)


def _upsample(graph: _Graph, x: str) -> str:
    """"Linear" upsampling as the package does it: nearest x3 (``out[i] = in[i // 3]``), then a 3-voxel mean."""
    nearest = graph.op("Resize", [x, "", "upsample_scales"], mode="nearest",
                       coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return graph.op("AveragePool", [nearest], kernel_shape=[FACTOR] * 3, strides=[1, 1, 1])


def _crop(graph: _Graph, x: str, voxels: int) -> str:
    """Drop *voxels* at both ends of each spatial axis."""
    starts = graph.constant(f"crop{voxels}_starts", np.full(3, voxels, dtype=np.int64))
    ends = graph.constant(f"crop{voxels}_ends", np.full(3, -voxels, dtype=np.int64))
    return graph.op("Slice", [x, starts, ends, "spatial_axes"])


def _network(graph: _Graph, weights: Weights) -> str:
    """The U-Net from the channels-first input to the sigmoid; returns the name of the probability tensor."""
    x = _conv(graph, graph.op("Transpose", [INPUT], perm=[0, 4, 1, 2, 3]), 1, weights)
    skips = [_block(graph, x, 2, weights)]
    for number in (3, 5, 7):
        x = graph.op("MaxPool", [skips[-1]], kernel_shape=[FACTOR] * 3, strides=[FACTOR] * 3)
        x = _block(graph, _block(graph, x, number, weights), number + 1, weights)
        skips.append(x)
    x = skips.pop()
    for (crop, number), skip in zip(UP_LEVELS, reversed(skips), strict=True):
        x = graph.op("Concat", [_crop(graph, skip, crop), _upsample(graph, x)], axis=1)
        x = _block(graph, _block(graph, x, number, weights), number + 1, weights)
    return graph.op("Sigmoid", [_block(graph, x, 15, weights)])


def build_model(weights: Weights) -> onnx.ModelProto:
    """The whole ONNX model: ``ct_norm`` [batch, 189, 162, 162, 1] to ``main`` [batch, 163, 136, 136, 1]."""
    graph = _Graph()
    graph.constant("epsilon", np.array(EPSILON, dtype=np.float32))
    graph.constant("upsample_scales", np.array([1, 1, FACTOR, FACTOR, FACTOR], dtype=np.float32))
    graph.constant("spatial_axes", np.array([2, 3, 4], dtype=np.int64))
    graph.op("Transpose", [_network(graph, weights)], name=OUTPUT, perm=[0, 2, 3, 4, 1])
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *PATCH_SIZE, 1])]
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", *OUTPUT_SIZE, 1])]
    body = helper.make_graph(graph.nodes, "pyliverlesionseg_liver", inputs, outputs, graph.initializers)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="scripts/import_pyliverlesionseg.py",
                              doc_string=f"pyliverlesionseg 0.3 whole-liver U-Net ({MEMBER}), Apache-2.0")
    helper.set_model_props(model, {"source_wheel": WHEEL_NAME, "source_sha256": WHEEL_SHA256})
    onnx.checker.check_model(model, full_check=True)
    return model


def _stage(out: Path, model: onnx.ModelProto, licence: str) -> Path:
    """Write the package into a fresh folder beside *out* and validate it there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        (staging / "model.onnx").write_bytes(model.SerializeToString())
        (staging / "manifest.toml").write_text(MANIFEST, encoding="utf-8")
        (staging / "NOTICE").write_text(NOTICE, encoding="utf-8")
        (staging / "LICENSE").write_text(licence, encoding="utf-8")
        load_model_package(staging)
    except BaseException:
        shutil.rmtree(staging)
        raise
    staging.chmod(0o755)
    return staging


def install_package(out: Path, model: onnx.ModelProto, licence: str) -> list[Path]:
    """Put the package at *out*, replacing any previous one only once the new one is complete."""
    staging = _stage(out, model, licence)
    previous = out.parent / f".{out.name}.previous"
    try:
        shutil.rmtree(previous, ignore_errors=True)  # left by an import killed mid-swap
        if out.exists():
            out.rename(previous)
        staging.rename(out)
    except OSError:
        shutil.rmtree(staging)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return sorted(out.iterdir())


def run_import(out: Path, wheel: Path | None) -> list[Path]:
    """Fetch (unless given) and verify the wheel, convert the network, install the package; return its files."""
    with tempfile.TemporaryDirectory(prefix="pyliverlesionseg-") as scratch:
        wheel = wheel if wheel is not None else download_wheel(Path(scratch))
        verify_wheel(wheel)
        weights = read_weights(wheel)
        count = parameter_count(weights)
        if count != PARAMETERS:
            raise ImportFailure(f"{MEMBER}: {count:,} parameters, expected {PARAMETERS:,}")
        files = install_package(out, build_model(weights), read_license(wheel))
    print(f"converted {len(weights)} convolutions, {count:,} parameters, from {wheel.name} (sha256 verified)")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "models" / "liver", help="package folder to write")
    parser.add_argument("--wheel", type=Path, help="use this downloaded wheel instead of fetching it with pip")
    args = parser.parse_args(argv)
    try:
        files = run_import(args.out.resolve(), args.wheel)
    except (ImportFailure, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
