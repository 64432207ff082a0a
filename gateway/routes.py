"""Routes: which series go to which model, template and destinations (the ``[[routes]]`` of the config)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydicom.datadict import keyword_dict

__all__ = ["Route", "RouteImages", "StructureTemplate", "check_structure_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def _check_models(value: str | list[str]) -> str | list[str]:
    if isinstance(value, str):
        return _check_name(value)
    if not 1 <= len(value) <= 4:
        raise ValueError("must name 1 to 4 models")
    if len(set(value)) != len(value):
        raise ValueError("a model is listed twice")
    for name in value:
        _check_name(name)
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_match(value: Mapping[str, str]) -> Mapping[str, str]:
    problems = []
    for keyword, pattern in value.items():
        if keyword not in keyword_dict:
            problems.append(f"{keyword!r} is not a DICOM keyword")
        elif len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/"):
            try:
                re.compile(pattern[1:-1])
            except re.error as exc:
                problems.append(f"{keyword}: invalid regular expression ({exc})")
    if problems:
        raise ValueError("; ".join(problems))
    return value


def check_structure_name(value: str) -> str:
    if not 1 <= len(value) <= 16 or value != value.strip() or "\\" in value:
        raise ValueError("must be 1-16 characters (TG-263), no leading/trailing spaces or backslash")
    return value


class StructureTemplate(_Model):
    """How a site wants one of the model's structures written; unset fields come from the manifest."""

    name: Annotated[str, AfterValidator(check_structure_name)] | None = None
    colour: Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)] | None = None
    interpreted_type: str | None = None
    order: int | None = None  # structures are written in ascending order, then the manifest's
    write_if_empty: bool = False  # an ROI with no contour instead of leaving the structure out


def _check_image_types(value: list[str]) -> list[str]:
    for item in value:
        if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", item):
            raise ValueError(f"{item!r} is not an ImageType value (1-16 of A-Z, 0-9, '_' and space)")
    return value


def _words(value: str) -> set[str]:
    # "CT_SOM5 MIP" (Siemens) and "MIP" (Philips, GE) both name a MIP.
    return {value, *re.split(r"[ _]+", value)}


class RouteImages(_Model):
    """Series a route leaves to the next route, within what its ``match`` takes (a 4D-CT: phases, MIP).

    A series skipped here is offered to the following routes; if none takes it, its task ends
    ``no_route`` with the skip's reason code (``image_type_mip``, ``skipped_by_route``).
    """

    #: ImageType values (any value, or a word of one: ``MIP`` skips ``CT_SOM5 MIP``).
    skip_image_types: Annotated[list[str], AfterValidator(_check_image_types)] = Field(default_factory=list)
    #: Like ``match``: a series that fits every entry is skipped (e.g. the phases of a 4D-CT by description).
    skip: Annotated[dict[str, str], AfterValidator(_check_match)] = Field(default_factory=dict)

    def skip_reason(self, image_type: list[str], attributes: Mapping[str, str]) -> str | None:
        """Why this route leaves a series with *image_type* and *attributes* alone, or ``None``."""
        words = set().union(*(_words(value.strip().upper()) for value in image_type)) if image_type else set()
        skipped = sorted(words & set(self.skip_image_types))
        if skipped:
            return "image_type_" + skipped[0].lower().replace(" ", "_")
        if self.skip and _fits(self.skip, attributes):
            return "skipped_by_route"
        return None


class Route(_Model):
    """Which series go to which model and destinations; the first matching route wins."""

    name: Name
    match: Annotated[dict[str, str], AfterValidator(_check_match)] = Field(default_factory=dict)
    #: A model package name, or several whose structures go into one structure set (e.g. default + liver).
    model: Annotated[str | list[str], AfterValidator(_check_models)]
    destinations: Annotated[list[Name], Field(min_length=1)]
    #: Site template, keyed by the model's label names (checked against the manifest at start-up).
    structures: dict[str, StructureTemplate] = Field(default_factory=dict)
    #: Or a template file ``[inference] templates_dir/<template>.toml``: which structures, in which order, under
    #: which names, and derived ones (unions of labels); checked against the models at start-up.
    template: Annotated[str, AfterValidator(_check_name)] | None = None
    #: Holes in RTSTRUCT contours: separate inner contours (Eclipse, RayStation) or keyholes.
    holes: Literal["separate", "keyhole"] = "separate"
    #: Also send a DICOM Segmentation of the same structures.
    segmentation: bool = False
    #: Contour QA failures: written in the RTSTRUCT (``annotate``), holding the whole study until ``python -m gateway
    #: release`` (``hold``), or leaving the failing structures out (``drop``).
    qa: Literal["annotate", "hold", "drop"] = "annotate"
    #: Keep a QA picture (contours over three planes, sealed, shredded with the study): ``python -m gateway qa``.
    qa_picture: bool = False
    #: Series this route leaves to the next one (``[routes.images]``).
    images: RouteImages = RouteImages()

    @model_validator(mode="after")
    def _one_template(self) -> Self:
        if self.template is not None and self.structures:
            raise ValueError("a route has either a template file or [routes.structures], not both")
        return self

    @property
    def models(self) -> tuple[str, ...]:
        """The model packages the route runs, in order."""
        return (self.model,) if isinstance(self.model, str) else tuple(self.model)

    @property
    def model_key(self) -> str:
        """One name for the route's models together (logs, timing memory)."""
        return "+".join(self.models)

    @property
    def keywords(self) -> set[str]:
        """Every DICOM keyword the route looks at (``match`` and ``[routes.images] skip``)."""
        return {*self.match, *self.images.skip, "ImageType"}

    def matches(self, attributes: Mapping[str, str]) -> bool:
        """Return whether every ``match`` entry fits *attributes* (exact value or ``/regex/``)."""
        return _fits(self.match, attributes)


def _fits(patterns: Mapping[str, str], attributes: Mapping[str, str]) -> bool:
    for keyword, pattern in patterns.items():
        value = attributes.get(keyword)
        if value is None:
            return False
        if len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/"):
            if re.fullmatch(pattern[1:-1], value) is None:
                return False
        elif value != pattern:
            return False
    return True
