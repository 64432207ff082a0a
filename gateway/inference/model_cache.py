"""The model cache: one :class:`~gateway.inference.predictor.Predictor` per model package (a
:class:`~gateway.inference.bundle.BundlePredictor` per bundle of packages), loaded on first use, and the routes'
models checked at start-up (a route may merge the structures of several models, a bundle among them)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from gateway.config import Inference
from gateway.errors import ConfigError
from gateway.inference.bundle import BundlePredictor
from gateway.inference.farm import TritonFarm
from gateway.inference.labels import MAX_LABELS
from gateway.inference.manifest import INTERPRETED_TYPES, ModelInfo, ModelManifest, OutputSpec
from gateway.inference.packages import ModelBundle, load_model
from gateway.inference.predictor import Predictor
from gateway.inference.remote import RemotePredictor
from gateway.routes import Route

__all__ = ["Predictors", "check_route_models", "combine_manifests"]


class Predictors:
    """Loads each model once and shares it between the pipeline's worker threads (onnxruntime allows it); with
    ``backend = "triton"``, each model is run by *farm* instead."""

    def __init__(self, inference: Inference, farm: TritonFarm | None = None) -> None:
        self._inference = inference
        self._farm = farm
        self._loaded: dict[str, Predictor | BundlePredictor | RemotePredictor] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Predictor | BundlePredictor | RemotePredictor:
        """The predictor of the package (or bundle) ``models_dir/<model>``.

        Raises
        ------
        ConfigError, InferenceError
            When the package cannot be loaded.
        """
        with self._lock:
            predictor = self._loaded.get(model)
            if predictor is None:
                predictor = self._load(model)
                self._loaded[model] = predictor
            return predictor

    def _load(self, model: str) -> Predictor | BundlePredictor | RemotePredictor:
        folder = self._inference.models_dir / model
        if self._farm is not None:
            return RemotePredictor(model, folder, self._farm)
        loaded = load_model(folder)
        settings = self._inference
        if isinstance(loaded, ModelBundle):
            return BundlePredictor(loaded, providers=settings.providers, threads=settings.threads,
                                   cuda_tf32=settings.cuda_tf32)
        return Predictor(loaded, providers=settings.providers, threads=settings.threads,
                         cuda_tf32=settings.cuda_tf32)

    def manifest(self, models: Sequence[str]) -> ModelManifest:
        """The (combined) manifest of the packages ``models_dir/<model>``, without starting an inference session
        if none is loaded yet (a series resumed after a restart at the structure stage needs the labels only)."""
        manifests = []
        for model in models:
            with self._lock:
                predictor = self._loaded.get(model)
            manifests.append(predictor.manifest if predictor is not None
                             else load_model(self._inference.models_dir / model).manifest)
        return combine_manifests(manifests)


def combine_manifests(manifests: Sequence[ModelManifest]) -> ModelManifest:
    """One manifest for the structures of several models: labels renumbered 1..N in order, each with its origin.

    Raises
    ------
    ValueError
        When two models have a label of the same name, or there are more than :data:`MAX_LABELS` labels in all.
    """
    if len(manifests) == 1:
        return manifests[0]
    labels = [label.model_copy(update={"value": 0, "channel": None, "side": None,
                                       "origin": f"{manifest.model.name} {manifest.model.version}"})
              for manifest in manifests for label in manifest.labels]
    names = [label.name for label in labels]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"label names found by more than one model: {', '.join(clashes)}")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels in all the models of a route, not {len(labels)}")
    info = ModelInfo(name="+".join(m.model.name for m in manifests)[:64],
                     version="+".join(m.model.version for m in manifests)[:32],
                     description="; ".join(m.model.description for m in manifests if m.model.description))
    return ModelManifest(model=info, input=manifests[0].input, output=OutputSpec(kind="sigmoid"),
                         labels=[label.model_copy(update={"value": index}) for index, label in enumerate(labels, 1)])


def check_route_models(models_dir: Path, routes: Sequence[Route]) -> None:
    """Load every model package a route names and check its template; one :class:`ConfigError` lists all."""
    problems: list[str] = []
    for index, route in enumerate(routes):
        manifests = [_route_model(models_dir, index, model, problems) for model in route.models]
        if None in manifests:
            continue
        try:
            labels = {label.name for label in combine_manifests([m for m in manifests if m is not None]).labels}
        except ValueError as exc:
            problems.append(f"routes[{index}].model: {exc}")
            continue
        for key, template in route.structures.items():
            if key not in labels:
                problems.append(f"routes[{index}].structures: {key!r} is not a label of model {route.model_key!r}")
            if template.interpreted_type is not None and template.interpreted_type not in INTERPRETED_TYPES:
                problems.append(f"routes[{index}].structures.{key}.interpreted_type: not an RT ROI Interpreted Type")
    if problems:
        raise ConfigError(str(models_dir), problems)


def _route_model(models_dir: Path, index: int, model: str, problems: list[str]) -> ModelManifest | None:
    folder = models_dir / model
    if not folder.is_dir():
        problems.append(f"routes[{index}]: model {model!r} has no package folder {folder}")
        return None
    try:
        return load_model(folder).manifest
    except ConfigError as exc:
        problems += [f"model {model!r}: {problem}" for problem in exc.problems]
        return None
