"""A model package served to the network: what runs inside a Triton Python model, next to the GPU.

:class:`ModelServer` loads one package (or bundle) from the model repository and turns one request's tensors
(:mod:`gateway.inference.wire`) into the reply: the whole prediction (resampling, sliding window, blending,
post-processing, the masks back on the CT grid) runs here, so tiles never cross the network. It needs no key,
no database and no storage, and sees no identifier: only HU voxels and their axes.

:func:`package_digest` names a package's exact content; the repository writer puts it in the Triton model's
configuration, and the node refuses a server whose model is not the one it has (a stale or edited copy would
contour differently from what was commissioned).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gateway.failpoints import failpoint
from gateway.inference.bundle import BundlePredictor
from gateway.inference.packages import ModelBundle, load_model
from gateway.inference.predictor import Predictor
from gateway.inference.wire import HU_FLOAT32, HU_INT16, MAX_VOXELS, VOXEL_AXES, result_array, volume_from_request

__all__ = ["INPUTS", "ModelServer", "package_digest"]

#: The request tensors a served model reads (either HU tensor, not both).
INPUTS = (HU_INT16, HU_FLOAT32, VOXEL_AXES, MAX_VOXELS)


class ModelServer:
    """One model package ready to answer requests."""

    def __init__(self, folder: Path, *, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                 device_id: int = 0) -> None:
        loaded = load_model(folder)
        self.predictor: Predictor | BundlePredictor
        if isinstance(loaded, ModelBundle):
            self.predictor = BundlePredictor(loaded, providers=providers, threads=threads, device_id=device_id)
        else:
            self.predictor = Predictor(loaded, providers=providers, threads=threads, device_id=device_id)
        self.digest = package_digest(folder)

    def run(self, arrays: Mapping[str, np.ndarray | None]) -> np.ndarray:
        """The reply tensor to one request.

        Raises
        ------
        VolumeError, InferenceError
            When the request is not a volume this model can segment, or the model fails.
        """
        volume, max_voxels = volume_from_request(arrays)
        failpoint("remote_infer")
        return result_array(self.predictor.predict(volume, max_voxels=max_voxels))


def package_digest(folder: Path) -> str:
    """SHA-256 over every file of a model package (or bundle with its parts), by relative path and content."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _ignored(p.relative_to(folder))):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _ignored(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)
