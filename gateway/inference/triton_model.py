"""The Triton Python model of a contour-gateway model package: ``python -m gateway triton-repo`` copies this file as
``<model>/1/model.py`` of the repository it writes.

It runs inside Triton's Python backend stub, next to the GPU: the package sits in ``<model>/1/package``, each model
instance loads it once (on its GPU for ``KIND_GPU``, with onnxruntime's CUDA provider), and each request runs the
whole prediction (:class:`gateway.inference.serving.ModelServer`). The execution environment needs the
``contour-gateway`` package and its dependencies (``EXECUTION_ENV_PATH`` in ``config.pbtxt`` when it is not the
stub's own Python); the server needs no key, no database and no storage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from gateway.errors import GatewayError
from gateway.inference.serving import INPUTS, ModelServer
from gateway.inference.wire import RESULT, error_text


class TritonPythonModel:
    """Triton's entry points: ``initialize`` once per instance, ``execute`` per batch of requests."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        on_gpu = args.get("model_instance_kind") == "GPU"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
        folder = Path(args["model_repository"]) / str(args["model_version"]) / "package"
        self._server = ModelServer(folder, providers=providers, threads=int(parameters.get("threads") or 0),
                                   device_id=int(args.get("model_instance_device_id") or 0))
        if on_gpu and "CUDAExecutionProvider" not in self._server.predictor.providers:  # no silent CPU fallback
            raise pb_utils.TritonModelException("a KIND_GPU instance but onnxruntime has no CUDA provider here "
                                                "(install onnxruntime-gpu, check CUDA and cuDNN)")
        expected = parameters.get("package_sha256")
        if expected and expected != self._server.digest:
            raise pb_utils.TritonModelException("the model package differs from the one this repository was written "
                                                "for (package_sha256)")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            arrays = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                arrays[name] = None if tensor is None else tensor.as_numpy()
            try:
                result = self._server.run(arrays)
            except GatewayError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error_text(exc))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(RESULT, result)]))
        return responses
