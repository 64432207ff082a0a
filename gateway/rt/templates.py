"""Site templates: which structures a route writes, in which order, under which TG-263 names and colours.

A template is a TOML file in ``[inference] templates_dir`` (``config/templates/`` as shipped), named by a route's
``template = "thorax"``. Each ``[[structures]]`` entry is one ROI of the structure set, made from one or more of the
model's labels: one label is that label renamed (and keeps the manifest's QA expectations), several are their union
(a derived structure, such as ``Lungs`` from the five lobes). Structures are written in the file's order; the model's
other labels are not written. Every label a template names must be a label of the route's models: checked at
start-up, all problems listed.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ConfigError
from gateway.inference.labels import MaskView
from gateway.inference.manifest import INTERPRETED_TYPES, Label, ModelManifest
from gateway.routes import Route, StructureTemplate, check_structure_name
from gateway.rt.plausibility import expected_side

__all__ = ["SiteTemplate", "TemplateStructure", "Templated", "apply_template", "load_route_templates", "load_template",
           "manifests_of", "template_problems"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemplateStructure(_Model):
    """One ROI of the template: its name, the model labels it is made of, and how it is shown."""

    name: Annotated[str, AfterValidator(check_structure_name)]
    labels: Annotated[list[str], Field(min_length=1)]
    colour: Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)] | None = None
    interpreted_type: str | None = None
    #: An ROI with no contour rather than leaving the structure out when the model found nothing.
    write_if_empty: bool = False
    #: The plausible volume for contour QA; a single label's comes from the manifest unless given here.
    volume_ml: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=2, max_length=2)] | None = None


class SiteTemplate(_Model):
    """A template file: a description and its structures, in the order they are written."""

    description: str = ""
    structures: Annotated[list[TemplateStructure], Field(min_length=1, max_length=256)]


@dataclass(frozen=True)
class Templated:
    """A series' structures as the template writes them: a manifest of the template's ROIs and their masks."""

    manifest: ModelManifest
    masks: Mapping[str, np.ndarray]  # made one at a time when read
    structures: dict[str, StructureTemplate]  # by ROI name, for the structure set (write_if_empty)
    sources: dict[str, str]  # ROI name -> the one model label it renames (derived ROIs are absent)


def load_template(templates_dir: Path, name: str) -> SiteTemplate:
    """Read and validate ``templates_dir/<name>.toml``; a :class:`ConfigError` lists every problem."""
    path = templates_dir / f"{name}.toml"
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        template = SiteTemplate.model_validate(raw)
    except OSError as exc:
        raise ConfigError(str(path), [f"template {name!r}: cannot read {path} ({exc.strerror})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"template {name!r}: not TOML ({exc})"]) from exc
    except ValidationError as exc:
        raise ConfigError(str(path), [f"template {name!r}: {'.'.join(map(str, error['loc']))}: {error['msg']}"
                                      for error in exc.errors()]) from exc
    return template


def load_route_templates(templates_dir: Path, routes: Sequence[Route],
                         manifest_of: Callable[[Route], ModelManifest | None]) -> dict[str, SiteTemplate]:
    """The template of every route that names one, by route name, checked against the route's models
    (*manifest_of*; ``None`` where the models themselves are broken, which their own check reports).

    Raises
    ------
    ConfigError
        Listing every problem: a missing or invalid file, a label the models do not have, a duplicate name.
    """
    problems: list[str] = []
    templates: dict[str, SiteTemplate] = {}
    for index, route in enumerate(routes):
        if route.template is None:
            continue
        try:
            template = load_template(templates_dir, route.template)
        except ConfigError as exc:
            problems += [f"routes[{index}].{problem}" for problem in exc.problems]
            continue
        manifest = manifest_of(route)
        if manifest is not None:
            problems += [f"routes[{index}].{problem}" for problem in template_problems(route.template, template,
                                                                                      manifest)]
        templates[route.name] = template
    if problems:
        raise ConfigError(str(templates_dir), problems)
    return templates


def manifests_of(manifest: Callable[[Sequence[str]], ModelManifest]) -> Callable[[Route], ModelManifest | None]:
    """*manifest* (``Predictors.manifest``) per route, ``None`` where the route's packages cannot be read."""

    def of(route: Route) -> ModelManifest | None:
        try:
            return manifest(route.models)
        except (ConfigError, ValueError):  # reported by the models' own check
            return None

    return of


def template_problems(name: str, template: SiteTemplate, manifest: ModelManifest) -> list[str]:
    """What in *template* the route's (combined) *manifest* cannot honour: unknown labels, duplicate ROI names."""
    known = {label.name for label in manifest.labels}
    problems = [f"template {name!r}: structure {structure.name!r} names {label!r}, not a label of the model"
                for structure in template.structures for label in structure.labels if label not in known]
    names = [structure.name for structure in template.structures]
    problems += [f"template {name!r}: structure name {dup!r} is used more than once"
                 for dup in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"template {name!r}: structure {s.name!r}: {s.interpreted_type!r} is not an RT ROI Interpreted Type"
                 for s in template.structures
                 if s.interpreted_type is not None and s.interpreted_type not in INTERPRETED_TYPES]
    return problems


def apply_template(template: SiteTemplate, manifest: ModelManifest,
                   masks: Mapping[str, np.ndarray]) -> Templated:
    """The template's ROIs from the model's *masks*: renamed, or the union of several (computed one at a time)."""
    by_name = {label.name: label for label in manifest.labels}
    renamed = {s.labels[0]: s.name for s in template.structures if len(s.labels) == 1}
    labels, derived, structures = [], {}, {}
    for value, structure in enumerate(template.structures, start=1):
        labels.append(_label(value, structure, [by_name[name] for name in structure.labels], renamed))
        present = [name for name in structure.labels if name in masks]
        if present:
            derived[structure.name] = functools.partial(_union, masks, present)
        structures[structure.name] = StructureTemplate(write_if_empty=structure.write_if_empty)
    templated = manifest.model_copy(update={"labels": labels})
    sources = {roi: label for label, roi in renamed.items()}
    return Templated(templated, MaskView(derived), structures, sources)


def _label(value: int, structure: TemplateStructure, parts: Sequence[Label], renamed: Mapping[str, str]) -> Label:
    """A label for the ROI: one part keeps its QA expectations (under the template's names); a union keeps the
    side its parts share and has the volume range the template gives, if any."""
    first = parts[0]
    sides = {expected_side(part) for part in parts}
    update: dict[str, object] = {"value": value, "name": structure.name, "channel": None,
                                 "side": sides.pop() if len(sides) == 1 else None,
                                 "colour": structure.colour or first.colour,
                                 "interpreted_type": structure.interpreted_type or first.interpreted_type}
    if len(parts) > 1:
        update.update(volume_ml=None, contiguous=False, exclusive_with=[])
    else:
        update["exclusive_with"] = [renamed[other] for other in first.exclusive_with if other in renamed]
    if structure.volume_ml is not None:
        update["volume_ml"] = tuple(structure.volume_ml)
    return first.model_copy(update=update)


def _union(masks: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The union of the masks *names* (a new array: the model's masks are never changed)."""
    union = np.array(masks[names[0]], dtype=bool, copy=True)
    for name in names[1:]:
        union |= masks[name]
    return union
