#!/usr/bin/env python3
"""Build ``models/default/model.onnx``: External and lungs from HU thresholds and morphology, as ONNX ops.

The network (float32 ``[N, 1, D, H, W]`` in, ``[N, 2, D, H, W]`` out, axes S-P-L at 3 mm, input
scaled from HU -1024..1024 to 0..1) computes two sigmoid channels:

1. body: tissue (HU above -400) together with whatever is not air (above -950) and
   lies inside the tissue, i.e. has tissue somewhere in each of the four in-plane
   directions (directional running maxima). The lungs thus belong to the body, which makes a
   thin chest wall part of a thick solid; a morphological opening (erosion and dilation by
   max pooling, 15 mm in-plane) then removes couch shells, immobilisation masks and other
   thin structures outside the patient. The foam of a couch is not inside: no tissue beside it;
2. lungs: HU between -950 and -400, inside the tissue.

No smoothing: the resampling to 3 mm already averages the noise, and a smoothing kernel would
erase a chest wall two voxels thick; the thresholds sit 300 HU or more from the tissues they
separate.

Components, hole filling and the left/right split are the manifest's post-processing. The
build is deterministic: the same script writes the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
HU_MIN, HU_MAX = -1024.0, 1024.0
BODY_HU, LUNG_LOW_HU = -400.0, -950.0
STEEPNESS = 200.0  # per unit of scaled intensity: a transition about 10 HU wide
OPENING = 5  # voxels in-plane (15 mm at 3 mm)
DOUBLINGS = 9  # "inside" looks up to 2**9 voxels (1.5 m at 3 mm) each way


def _scaled(hu: float) -> float:
    return (hu - HU_MIN) / (HU_MAX - HU_MIN)


def _constant(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def _pool(op: str, source: str, target: str, kernel: list[int], pads: list[int]) -> onnx.NodeProto:
    return helper.make_node(op, [source], [target], kernel_shape=kernel, pads=pads, strides=[1, 1, 1])


def _directional_reach(source: str, prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """min over the four in-plane directions of "is there *source* somewhere that way".

    Each direction is a running maximum built by doubling: pad by d on one side, then a max
    pool of two taps d apart, for d = 1, 2, 4, ... (reach 2**DOUBLINGS voxels in a few passes).
    """
    nodes: list[onnx.NodeProto] = []
    tensors: list[onnx.TensorProto] = []
    ends = []
    for name, axis, before in (("anterior", 3, True), ("posterior", 3, False), ("right", 4, True),
                               ("left", 4, False)):
        current = source
        for step in range(DOUBLINGS):
            distance = 2 ** step
            pads = [0] * 10  # [begin N, C, D, H, W, end N, C, D, H, W]
            pads[axis if before else axis + 5] = distance
            kernel, dilations = [1, 1, 1], [1, 1, 1]
            kernel[axis - 2], dilations[axis - 2] = 2, distance
            stem = f"{prefix}_{name}_{step}"
            pad_name, padded, target = f"{stem}_pads", f"{stem}_padded", stem
            tensors.append(helper.make_tensor(pad_name, TensorProto.INT64, [10], pads))
            nodes.append(helper.make_node("Pad", [current, pad_name], [padded], mode="constant"))
            nodes.append(helper.make_node("MaxPool", [padded], [target], kernel_shape=kernel, dilations=dilations,
                                          strides=[1, 1, 1]))
            current = target
        ends.append(current)
    nodes.append(helper.make_node("Min", ends, [prefix]))
    return nodes, tensors


def build() -> onnx.ModelProto:
    body_cut, low_cut = _scaled(BODY_HU), _scaled(LUNG_LOW_HU)
    half = OPENING // 2
    inside_nodes, inside_tensors = _directional_reach("tissue", "inside")
    nodes = [
        # tissue, and what lies inside it
        helper.make_node("Sub", ["image", "body_cut"], ["tissue_shift"]),
        helper.make_node("Mul", ["tissue_shift", "steepness"], ["tissue_logit"]),
        helper.make_node("Sigmoid", ["tissue_logit"], ["tissue"]),
        *inside_nodes,
        helper.make_node("Sub", ["image", "low_cut"], ["low_shift"]),
        helper.make_node("Mul", ["low_shift", "steepness"], ["low_logit"]),
        helper.make_node("Sigmoid", ["low_logit"], ["not_air"]),
        # body: tissue plus non-air inside it, then an opening against thin outside structures
        helper.make_node("Mul", ["not_air", "inside"], ["enclosed"]),
        helper.make_node("Max", ["tissue", "enclosed"], ["body_full"]),
        helper.make_node("Neg", ["body_full"], ["body_neg"]),
        _pool("MaxPool", "body_neg", "eroded_neg", [1, OPENING, OPENING], [0, half, half, 0, half, half]),
        helper.make_node("Neg", ["eroded_neg"], ["eroded"]),
        _pool("MaxPool", "eroded", "body", [1, OPENING, OPENING], [0, half, half, 0, half, half]),
        # lungs: the low-density band inside the tissue
        helper.make_node("Sub", ["one", "tissue"], ["below_tissue"]),
        helper.make_node("Mul", ["not_air", "below_tissue"], ["band"]),
        helper.make_node("Mul", ["band", "inside"], ["lungs"]),
        helper.make_node("Concat", ["body", "lungs"], ["scores"], axis=1),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "d", "h", "w"])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 2, "d", "h", "w"])
    initializers = [_constant("body_cut", body_cut), _constant("low_cut", low_cut),
                    _constant("steepness", STEEPNESS), _constant("one", 1.0), *inside_tensors]
    graph = helper.make_graph(nodes, "default-external-lungs", [image], [scores], initializer=initializers)
    # IR version 8 goes with opset 17: every onnxruntime we support (>= 1.17) loads it, whatever onnx writes by default.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="contour-gateway",
                              ir_version=8)
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "models" / "default" / "model.onnx")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(build().SerializeToString())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
