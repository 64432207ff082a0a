"""Model bundles: several packages run as one model, and the loader that reads either kind.

A *bundle* is several packages run as one model, as TotalSegmentator runs its ``total`` task in five parts: the
folder holds one subfolder per part (each a package, :mod:`gateway.inference.manifest`) and a ``manifest.toml``
with ``[model]``, ``[bundle]`` and the final labels::

    [model]
    name = "totalseg-total"
    version = "1.0.0"

    [bundle]
    parts = ["part1_organs", "part2_vertebrae"]  # subfolders, run in this order
    overlap = "last_wins"        # a later part's label replaces an earlier part's where both found a voxel

    [[labels]]                   # every label of every part, once: value 1..N (by position when left out)
    name = "Spleen"
    colour = [50, 170, 60]
    interpreted_type = "ORGAN"
    # volume_ml, contiguous, exclusive_with: contour QA, as in a package

The parts' labels must be exactly these names; post-processing is each part's (set in its manifest), so the
bundle's labels may not set it. A part is a softmax model (one class per voxel), so the bundle's result is one
class map. :func:`load_model` reads either kind; the bundle's :attr:`ModelBundle.manifest` is an ordinary
:class:`ModelManifest` (the first part's ``[input]`` and ``[output]``, the bundle's labels) for the RTSTRUCT writer
and contour QA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import ConfigError
from gateway.inference.manifest import (
    Label,
    ModelInfo,
    ModelManifest,
    ModelPackage,
    load_model_package,
    read_manifest,
    validation_problems,
)

__all__ = ["BundleSpec", "ModelBundle", "load_bundle", "load_model"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BundleSpec(_Model):
    """``[bundle]``: the parts, in the order they run, and how their labels meet."""

    parts: Annotated[list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]],
                     Field(min_length=1, max_length=32)]
    #: TotalSegmentator's merge: each part's class map written over the result in turn, foreground only.
    overlap: Literal["last_wins"] = "last_wins"

    @field_validator("parts")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("must name each part folder once")
        return value


#: Label fields that change a mask: a part's to set, not a bundle's.
_POSTPROCESSING = ("keep_largest_component", "min_component_ml", "min_component_extent", "within", "fill_holes",
                   "min_volume_ml", "channel", "side")


class _BundleManifest(_Model):
    model: ModelInfo
    bundle: BundleSpec
    labels: Annotated[list[Label], Field(min_length=1)]


class ModelBundle(_Model):
    """A validated bundle: its folder, its parts (packages, in order) and the combined manifest."""

    folder: Path
    bundle: BundleSpec
    parts: tuple[ModelPackage, ...]
    manifest: ModelManifest


def load_model(folder: Path) -> ModelPackage | ModelBundle:
    """A package or, where ``manifest.toml`` has a ``[bundle]`` table, a bundle (:func:`load_bundle`).

    Raises
    ------
    ConfigError
        Listing every problem with the package or bundle.
    """
    try:
        raw = read_manifest(folder, [])
    except ConfigError:
        return load_model_package(folder)  # which lists every problem, model.onnx's too
    return load_bundle(folder) if "bundle" in raw else load_model_package(folder)


def load_bundle(folder: Path) -> ModelBundle:
    """Read and validate a bundle: its ``manifest.toml``, every part's package, and that the parts' labels are the
    bundle's, each found by one part.

    Raises
    ------
    ConfigError
        Listing every problem with the bundle and its parts.
    """
    source = str(folder)
    raw = read_manifest(folder, [])
    labels = raw.get("labels")
    if isinstance(labels, list):  # value by position where left out
        raw = {**raw, "labels": [{"value": index, **label} if isinstance(label, dict) else label
                                 for index, label in enumerate(labels, start=1)]}
    try:
        spec = _BundleManifest.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc)) from None
    problems = [f"manifest.toml labels.{index}: {field} is a part's post-processing; set it in the part's manifest"
                for index, label in enumerate(spec.labels) for field in _POSTPROCESSING
                if field in label.model_fields_set]
    parts: list[ModelPackage] = []
    for name in spec.bundle.parts:
        if not (folder / name).is_dir():
            problems.append(f"part {name!r}: no folder {folder / name}")
            continue
        try:
            part = load_model_package(folder / name)
        except ConfigError as exc:
            problems += [f"part {name!r}: {problem}" for problem in exc.problems]
            continue
        if part.manifest.output.kind != "softmax":
            problems.append(f"part {name!r}: a {part.manifest.output.kind} model; a bundle's parts are softmax models "
                            "(one class a voxel)")
        parts.append(part)
    if len(parts) == len(spec.bundle.parts):
        problems += _label_problems(spec, parts)
    if problems:
        raise ConfigError(source, problems)
    try:
        manifest = ModelManifest(model=spec.model, input=parts[0].manifest.input, output=parts[0].manifest.output,
                                 labels=spec.labels)
    except ValidationError as exc:
        raise ConfigError(source, validation_problems(exc)) from None
    return ModelBundle(folder=folder, bundle=spec.bundle, parts=tuple(parts), manifest=manifest)


def _label_problems(spec: _BundleManifest, parts: list[ModelPackage]) -> list[str]:
    problems = []
    wanted = [label.name for label in spec.labels]
    found: dict[str, str] = {}
    for name, part in zip(spec.bundle.parts, parts, strict=True):
        names = [label.name for label in part.manifest.labels]
        if unknown := [label for label in names if label not in wanted]:
            problems.append(f"part {name!r}: labels {', '.join(unknown)} are not among the bundle's [[labels]]")
        for label in names:
            if (first := found.setdefault(label, name)) != name:
                problems.append(f"label {label!r}: found by parts {first!r} and {name!r}; a label is one part's")
    if missing := [label for label in wanted if label not in found]:
        problems.append(f"labels {', '.join(missing)}: found by no part")
    return problems
