#!/usr/bin/env python3
"""Build ``models/default/model.onnx``: External and lungs from HU thresholds and morphology, as ONNX ops.

The network (float32 ``[N, 1, D, H, W]`` in, ``[N, 2, D, H, W]`` out, axes S-P-L at 3 mm, input
scaled from HU -1024..1024 to 0..1) computes two sigmoid channels of local evidence only:

1. body: tissue (HU above -300: skin, fat, muscle, bone), opened in-plane by a 3x3 window so
   that shells up to two voxels (6 mm) thick go: couch skins, curved couch shells, thermoplastic
   masks, the plastic skin of a vacuum bag, sheets. Foam pads, mattresses, vacuum-bag beads,
   head-rest foam and blankets (all below -300 HU) are never tissue;
2. lungs: the aerated band (HU between -950 and -400), opened in 3D by a 3x3x3 window, which
   removes the one- or two-voxel rims that partial volume leaves around gas (bowel, stomach,
   sinuses, the airway) while lung parenchyma, many voxels deep, stays; then the band voxels
   next to what stayed are given back, so the lungs keep their own edge.

What needs the whole scan is the manifest's post-processing: the External is the body's
components that are the patient (the largest, and those as long along the patient as half of
it: arms and legs, not an indexing bar), with holes filled per slice (lungs, gas, sinuses);
the lungs are kept only inside that External (pads and air outside it never count), split
left/right, largest component, a minimum volume, so a scan without lung yields none. The
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
BODY_HU, LUNG_LOW_HU, LUNG_HIGH_HU = -300.0, -950.0, -400.0
STEEPNESS = 200.0  # per unit of scaled intensity: a transition about 10 HU wide


def _scaled(hu: float) -> float:
    return (hu - HU_MIN) / (HU_MAX - HU_MIN)


def _constant(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def _sigmoid_above(source: str, cut: str, target: str) -> list[onnx.NodeProto]:
    """``target = sigmoid((source - cut) * steepness)``: about 1 above the cut, 0 below."""
    return [helper.make_node("Sub", [source, cut], [f"{target}_shift"]),
            helper.make_node("Mul", [f"{target}_shift", "steepness"], [f"{target}_logit"]),
            helper.make_node("Sigmoid", [f"{target}_logit"], [target])]


def _opening(source: str, target: str, kernel: list[int]) -> list[onnx.NodeProto]:
    """Morphological opening of a soft mask: erosion (a min: max pooling of the negation), then dilation."""
    pads = [k // 2 for k in kernel] * 2
    return [helper.make_node("Neg", [source], [f"{target}_neg"]),
            helper.make_node("MaxPool", [f"{target}_neg"], [f"{target}_eroded_neg"], kernel_shape=kernel, pads=pads,
                             strides=[1, 1, 1]),
            helper.make_node("Neg", [f"{target}_eroded_neg"], [f"{target}_eroded"]),
            helper.make_node("MaxPool", [f"{target}_eroded"], [target], kernel_shape=kernel, pads=pads,
                             strides=[1, 1, 1])]


def build() -> onnx.ModelProto:
    nodes = [
        *_sigmoid_above("image", "body_cut", "tissue"),
        *_opening("tissue", "body", [1, 3, 3]),  # thin shells outside the patient go
        *_sigmoid_above("image", "low_cut", "not_air"),
        *_sigmoid_above("image", "high_cut", "dense"),
        helper.make_node("Sub", ["one", "dense"], ["not_dense"]),
        helper.make_node("Mul", ["not_air", "not_dense"], ["band"]),
        *_opening("band", "lung_core", [3, 3, 3]),  # partial-volume rims around gas go
        # the opening also shaved the lungs' own edge: give back the band voxels next to what stayed
        helper.make_node("MaxPool", ["lung_core"], ["lung_reach"], kernel_shape=[3, 3, 3], pads=[1] * 6,
                         strides=[1, 1, 1]),
        helper.make_node("Mul", ["band", "lung_reach"], ["lungs"]),
        helper.make_node("Concat", ["body", "lungs"], ["scores"], axis=1),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "d", "h", "w"])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 2, "d", "h", "w"])
    initializers = [_constant("body_cut", _scaled(BODY_HU)), _constant("low_cut", _scaled(LUNG_LOW_HU)),
                    _constant("high_cut", _scaled(LUNG_HIGH_HU)), _constant("steepness", STEEPNESS),
                    _constant("one", 1.0)]
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
