"""Tiny real ONNX networks (built with onnx.helper) and model packages around them, for the tests."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper


def _save(nodes: list[onnx.NodeProto], path: Path, initializers: list[onnx.TensorProto] | None = None,
          channels: int | None = None) -> None:
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "d", "h", "w"])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", channels or "c", "d", "h", "w"])
    graph = helper.make_graph(nodes, "test", [image], [scores], initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _constant(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def threshold_network(path: Path, cut: float = 0.5, steepness: float = 60.0) -> None:
    """One sigmoid channel: ``sigmoid((x - cut) * steepness)``."""
    _save([helper.make_node("Sub", ["image", "cut"], ["shifted"]),
           helper.make_node("Mul", ["shifted", "steep"], ["logit"]),
           helper.make_node("Sigmoid", ["logit"], ["scores"])],
          path, [_constant("cut", cut), _constant("steep", steepness)], channels=1)


def bands_network(path: Path, low: float, high: float, steepness: float = 60.0, logits: bool = False) -> None:
    """Softmax over (background, between low and high, above high); or its logits only."""
    nodes = [
        helper.make_node("Sub", ["image", "low"], ["a"]), helper.make_node("Mul", ["a", "k"], ["la"]),
        helper.make_node("Sigmoid", ["la"], ["above_low"]),
        helper.make_node("Sub", ["image", "high"], ["b"]), helper.make_node("Mul", ["b", "k"], ["lb"]),
        helper.make_node("Sigmoid", ["lb"], ["above_high"]),
        helper.make_node("Sub", ["one", "above_low"], ["background"]),
        helper.make_node("Sub", ["above_low", "above_high"], ["middle"]),
        helper.make_node("Concat", ["background", "middle", "above_high"], ["probabilities"], axis=1),
        helper.make_node("Mul", ["probabilities", "k"], ["scores" if logits else "logits"]),
    ]
    if not logits:
        nodes.append(helper.make_node("Softmax", ["logits"], ["scores"], axis=1))
    _save(nodes, path, [_constant("low", low), _constant("high", high), _constant("k", steepness),
                        _constant("one", 1.0)], channels=3)


def valid_network(path: Path, crop: int, cut: float = 0.5, steepness: float = 60.0) -> None:
    """Keras-style: channels last, ``sigmoid((x - cut) * steepness)`` less *crop* voxels at each side."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", "d", "h", "w", 1])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", "d2", "h2", "w2", 1])
    bounds = [helper.make_tensor("starts", TensorProto.INT64, [3], [crop] * 3),
              helper.make_tensor("ends", TensorProto.INT64, [3], [-crop] * 3),
              helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])]
    nodes = [helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["inner"]),
             helper.make_node("Sub", ["inner", "cut"], ["shifted"]),
             helper.make_node("Mul", ["shifted", "steep"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["scores"])]
    graph = helper.make_graph(nodes, "valid", [image], [scores],
                              initializer=[*bounds, _constant("cut", cut), _constant("steep", steepness)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def broken_network(path: Path, kind: str) -> None:
    """``nan``: returns NaN; ``channels``: returns 2 channels where 1 is declared."""
    if kind == "nan":
        _save([helper.make_node("Sub", ["image", "image"], ["zero"]),
               helper.make_node("Div", ["zero", "zero"], ["scores"])], path, channels=1)
    else:
        _save([helper.make_node("Concat", ["image", "image"], ["scores"], axis=1)], path, channels=2)


def manifest(folder: Path, *, kind: str = "sigmoid", labels: list[dict[str, Any]] | None = None,
             spacing: tuple[float, float, float] = (2.0, 2.0, 2.0), patch: tuple[int, int, int] = (16, 32, 32),
             orientation: str = "SPL", logits: bool = False, **input_extra: Any) -> Path:
    """Write ``manifest.toml`` (clip HU -1000..1000 to 0..1) next to ``model.onnx``; return the folder."""
    labels = labels or [{"value": 1, "name": "Bright", "colour": [255, 0, 0], "interpreted_type": "ORGAN"}]
    lines = ["[model]", 'name = "test"', 'version = "0.1"', "", "[input]", f'orientation = "{orientation}"',
             f"spacing_mm = {list(spacing)}", f"patch_size = {list(patch)}", "overlap = 0.5", "batch_size = 2",
             "padding_hu = -1024",
             'normalisation = { kind = "clip_scale", hu_min = -1000, hu_max = 1000, out_min = 0, out_max = 1 }']
    lines += [f"{key} = {json.dumps(value)}" for key, value in input_extra.items()]
    lines += ["", "[output]", f'kind = "{kind}"', f"logits = {json.dumps(logits)}", "threshold = 0.5", ""]
    for label in labels:
        lines += ["[[labels]]", *(f"{k} = {json.dumps(v)}" for k, v in label.items()), ""]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.toml").write_text("\n".join(lines))
    return folder


# --- the shipped default network with faults appended ---------------------------------------------------------

#: The shipped default package: External and lungs, sigmoid channels (body, lungs), axes S-P-L at 3 mm.
DEFAULT_PACKAGE = Path(__file__).resolve().parents[1] / "models" / "default"
#: The default's tile (S, P, L) in voxels, as its manifest says.
DEFAULT_TILE = (32, 192, 192)


def _int64(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _extended_default(path: Path, head: list[onnx.NodeProto], initializers: list[onnx.TensorProto],
                      channels: int) -> None:
    """The default network with *head* appended: it reads ``default_body`` and ``default_lungs`` (its two
    channels, ``[N, 1, D, H, W]`` each) and writes ``scores`` (*channels* channels)."""
    model = onnx.load(str(DEFAULT_PACKAGE / "model.onnx"))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["default_scores" if name == "scores" else name for name in node.output]
    graph.node.extend([helper.make_node("Split", ["default_scores", "default_split"],
                                        ["default_body", "default_lungs"], axis=1), *head])
    graph.initializer.extend([_int64("default_split", [1, 1]), *initializers])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", channels, "d", "h", "w"]))
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def split_lungs_network(path: Path, left_from: int, *, swapped: bool = False) -> None:
    """Three channels: body, Lung_L (the lungs from tile column *left_from* on: L is the tile's last axis) and
    Lung_R (the columns before it); *swapped* returns the right lung in the left's channel and vice versa."""
    step = [0.0] * left_from + [1.0] * (DEFAULT_TILE[2] - left_from)
    left, right = ("right", "left") if swapped else ("left", "right")
    _extended_default(path, [
        helper.make_node("Mul", ["default_lungs", "left_columns"], ["left"]),
        helper.make_node("Sub", ["default_lungs", "left"], ["right"]),
        helper.make_node("Concat", ["default_body", left, right], ["scores"], axis=1),
    ], [helper.make_tensor("left_columns", TensorProto.FLOAT, [1, 1, 1, 1, DEFAULT_TILE[2]], step)], channels=3)


def shifted_lungs_network(path: Path, voxels: int, axis: int = 3) -> None:
    """Body as the default; the lung channel moved *voxels* towards lower indices along tile *axis* (3: the
    P axis, so anteriorly), zeros filling in behind it."""
    pads = [0] * 10
    pads[5 + axis] = voxels
    _extended_default(path, [
        helper.make_node("Slice", ["default_lungs", "shift_starts", "shift_ends", "shift_axes"], ["cut_lungs"]),
        helper.make_node("Pad", ["cut_lungs", "shift_pads"], ["moved_lungs"], mode="constant"),
        helper.make_node("Concat", ["default_body", "moved_lungs"], ["scores"], axis=1),
    ], [_int64("shift_starts", [voxels]), _int64("shift_ends", [2**62]), _int64("shift_axes", [axis]),
        _int64("shift_pads", pads)], channels=2)


def gapped_lungs_network(path: Path, slices: list[int]) -> None:
    """Body as the default; the lung channel zeroed on *slices* of every tile (tile axis 2, S)."""
    keep = [0.0 if index in slices else 1.0 for index in range(DEFAULT_TILE[0])]
    _extended_default(path, [
        helper.make_node("Mul", ["default_lungs", "kept_slices"], ["gapped_lungs"]),
        helper.make_node("Concat", ["default_body", "gapped_lungs"], ["scores"], axis=1),
    ], [helper.make_tensor("kept_slices", TensorProto.FLOAT, [1, 1, DEFAULT_TILE[0], 1, 1], keep)], channels=2)


def default_labels() -> list[dict[str, Any]]:
    """The default manifest's ``[[labels]]`` tables, to change and write with :func:`default_manifest`."""
    with (DEFAULT_PACKAGE / "manifest.toml").open("rb") as file:
        labels: list[dict[str, Any]] = tomllib.load(file)["labels"]
    return labels


def default_manifest(folder: Path, labels: list[dict[str, Any]]) -> Path:
    """Write ``manifest.toml``: the default's model, input and output sections with *labels*; return the folder."""
    text = (DEFAULT_PACKAGE / "manifest.toml").read_text(encoding="utf-8")
    lines = [text[:text.index("[[labels]]")].rstrip(), ""]
    for label in labels:
        lines += ["[[labels]]", *(f"{k} = {json.dumps(v)}" for k, v in label.items()), ""]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.toml").write_text("\n".join(lines), encoding="utf-8")
    return folder


def levels_network(path: Path, centres: list[float], steepness: float = 200.0) -> None:
    """Softmax logits, one channel per centre: ``k (2 c x - c^2)``, so the class whose centre is nearest the
    (normalised) input wins (``-k (x - c)^2`` less the term all classes share)."""
    count = len(centres)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [count, 1, 1, 1, 1], [2 * steepness * c for c in centres])
    bias = helper.make_tensor("b", TensorProto.FLOAT, [count], [-steepness * c * c for c in centres])
    _save([helper.make_node("Conv", ["image", "w", "b"], ["scores"])], path, [weights, bias], channels=count)


def steps_network(path: Path, cuts: list[float], steepness: float = 200.0) -> None:
    """Sigmoid probabilities, one channel per cut: ``sigmoid(k (x - cut))`` (overlapping: each includes the next)."""
    count = len(cuts)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [count, 1, 1, 1, 1], [steepness] * count)
    bias = helper.make_tensor("b", TensorProto.FLOAT, [count], [-steepness * cut for cut in cuts])
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["scores"])]
    _save(nodes, path, [weights, bias], channels=count)
