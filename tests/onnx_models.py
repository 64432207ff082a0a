"""Tiny real ONNX networks (built with onnx.helper) and model packages around them, for the tests."""

from __future__ import annotations

import json
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
