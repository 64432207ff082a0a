"""The models the pipeline runs: one :class:`~gateway.infer.Predictor` per model package, loaded on first use."""

from __future__ import annotations

import threading

from gateway.config import Inference
from gateway.infer import Predictor
from gateway.manifest import ModelManifest, load_model_package

__all__ = ["Predictors"]


class Predictors:
    """Loads each model once and shares it between the pipeline's worker threads (onnxruntime allows it)."""

    def __init__(self, inference: Inference) -> None:
        self._inference = inference
        self._loaded: dict[str, Predictor] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Predictor:
        """The predictor of the package ``models_dir/<model>``.

        Raises
        ------
        ConfigError, InferenceError
            When the package cannot be loaded.
        """
        with self._lock:
            predictor = self._loaded.get(model)
            if predictor is None:
                package = load_model_package(self._inference.models_dir / model)
                predictor = Predictor(package, providers=self._inference.providers, threads=self._inference.threads)
                self._loaded[model] = predictor
            return predictor

    def manifest(self, model: str) -> ModelManifest:
        """The manifest of ``models_dir/<model>``, without starting an inference session if none is loaded yet
        (a series resumed after a restart at the structure stage needs the labels, not the network)."""
        with self._lock:
            predictor = self._loaded.get(model)
        if predictor is not None:
            return predictor.manifest
        return load_model_package(self._inference.models_dir / model).manifest
