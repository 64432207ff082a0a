"""What crosses the network to an inference server, and back: the minimum a model needs, nothing of the patient.

A request carries the HU volume (``int16``, or ``float32`` when the rescale is not integral) and its voxel axes
(the 3x3 part of the voxel-to-patient affine: spacing and direction), and the voxel limit the node applies. No
origin, no DICOM attribute, no UID, no pseudonym, no job id: the server rebuilds a :class:`Volume` with the origin
at zero, which changes nothing the models compute (their orientation, resampling and post-processing read the axes
only). The model's name and version are the request's path (Triton's model name and version).

The reply is one byte string: the label masks in their compact form (class layers or bit words, compressed) with
their names, values and voxel counts, the model's confidence figures, the discarded-piece gaps and the seconds the
model took. A failure the model reports on
purpose (a volume it refuses, a broken model) travels as ``contour-gateway:<reason>:<message>`` so the node keeps
the reason code; anything else is the server's failure.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping

import numpy as np

from gateway.errors import GatewayError, InferenceError, VolumeError
from gateway.inference.confidence import Confidence
from gateway.inference.labels import LabelMasks
from gateway.inference.predictor import Prediction
from gateway.inference.volume import Volume

__all__ = ["HU_FLOAT32", "HU_INT16", "MAX_VOXELS", "RESULT", "VOXEL_AXES", "error_text", "prediction_from_result",
           "raise_remote", "request_arrays", "result_array", "volume_from_request"]

HU_INT16 = "HU_INT16"
HU_FLOAT32 = "HU_FLOAT32"
VOXEL_AXES = "VOXEL_AXES"
MAX_VOXELS = "MAX_VOXELS"
RESULT = "RESULT"
_FORMAT = 1
_ERROR_PREFIX = "contour-gateway:"


def request_arrays(volume: Volume, max_voxels: int) -> dict[str, np.ndarray]:
    """The request's tensors for *volume*: its HU voxels, its voxel axes and the voxel limit."""
    name = HU_INT16 if volume.hu.dtype == np.int16 else HU_FLOAT32
    hu = np.ascontiguousarray(volume.hu, dtype=np.int16 if name == HU_INT16 else np.float32)
    return {name: hu, VOXEL_AXES: np.ascontiguousarray(volume.affine[:3, :3], dtype=np.float64),
            MAX_VOXELS: np.array([max_voxels], dtype=np.int64)}


def volume_from_request(arrays: Mapping[str, np.ndarray | None]) -> tuple[Volume, int]:
    """The volume a request describes (origin at zero, no UIDs) and its voxel limit.

    Raises :class:`VolumeError` (``volume_malformed``) when the tensors do not describe a volume.
    """
    hu = next((arrays[name] for name in (HU_INT16, HU_FLOAT32) if arrays.get(name) is not None), None)
    axes, limit = arrays.get(VOXEL_AXES), arrays.get(MAX_VOXELS)
    if hu is None or hu.ndim != 3 or axes is None or axes.shape != (3, 3) or limit is None or limit.size != 1:
        raise VolumeError("volume_malformed", "the request holds no 3-D volume with its voxel axes and limit")
    if not np.all(np.isfinite(axes)) or abs(float(np.linalg.det(axes))) < 1e-9:
        raise VolumeError("volume_malformed", "the voxel axes are not a valid geometry")
    affine = np.eye(4)
    affine[:3, :3] = axes
    return Volume(hu=hu, affine=affine, sop_instance_uids=(), frame_of_reference_uid="", patient_position=""), \
        int(limit.reshape(-1)[0])


def result_array(prediction: Prediction) -> np.ndarray:
    """The reply's one tensor (``BYTES``, shape ``[1]``) for *prediction*: a JSON header (names, values, voxel
    counts, confidence, gaps, the masks' form and shape), then the mask planes, deflated at level 1 (the planes are
    mostly zeros: a hundredth of their size, at some 400 MB/s)."""
    masks = prediction.masks
    planes = np.ascontiguousarray(masks.planes)
    header = json.dumps({
        "format": _FORMAT, "seconds": round(prediction.seconds, 3), "values": prediction.values,
        "voxels": prediction.voxels, "form": masks.form, "top": masks.top, "shape": list(planes.shape),
        "dtype": planes.dtype.str, "split_mm": prediction.split_mm,
        "confidence": {name: [c.mean_probability, c.uncertain_share] for name, c in prediction.confidence.items()},
    }).encode()
    return np.array([len(header).to_bytes(4, "big") + header + zlib.compress(planes.tobytes(), 1)], dtype=np.object_)


def prediction_from_result(result: np.ndarray) -> Prediction:
    """The prediction a server replied with.

    Raises :class:`InferenceError` when the reply is not one the node understands.
    """
    try:
        data = bytes(result.reshape(-1)[0])
        size = int.from_bytes(data[:4], "big")
        header = json.loads(data[4:4 + size])
        if header["format"] != _FORMAT or header["form"] not in ("classes", "bits"):
            raise ValueError("an unknown reply format")
        planes = np.frombuffer(zlib.decompress(data[4 + size:]), dtype=np.dtype(header["dtype"]))
        planes = planes.reshape(header["shape"]).copy()  # writable, as the later stages expect
        masks = LabelMasks(list(planes), "classes" if header["form"] == "classes" else "bits", int(header["top"]))
        confidence = {str(name): Confidence(float(mean), float(uncertain))
                      for name, (mean, uncertain) in header["confidence"].items()}
        return Prediction(masks, {str(k): int(v) for k, v in header["values"].items()},
                          {str(k): int(v) for k, v in header["voxels"].items()}, float(header["seconds"]),
                          confidence, {str(k): float(v) for k, v in header["split_mm"].items()})
    except (ValueError, KeyError, IndexError, TypeError, zlib.error) as exc:
        raise InferenceError(f"the server's reply is not a prediction ({type(exc).__name__})",
                             reason="inference_reply_malformed") from exc


def error_text(exc: GatewayError) -> str:
    """A failure the model reports on purpose, for the reply's error message (no patient data: reason codes and
    messages of volumes and models only)."""
    kind = "volume" if isinstance(exc, VolumeError) else "inference"
    return f"{_ERROR_PREFIX}{exc.reason}:{kind}:{str(exc)[:300]}"


def raise_remote(message: str) -> None:
    """Raise the node-side error a server's message reports on purpose; return if it is not one of those."""
    start = message.find(_ERROR_PREFIX)
    if start < 0:
        return
    reason, kind, text = [*message[start + len(_ERROR_PREFIX):].split(":", 2), "", ""][:3]
    if kind == "volume":
        raise VolumeError(reason or "volume_refused", f"inference server: {text.strip()}")
    raise InferenceError(f"inference server: {text.strip()}", reason=reason or "inference_failed")
