"""Model packages: ``models/<name>/model.onnx`` plus ``manifest.toml``, validated at start-up.

The manifest says everything the predictor needs to run a segmentation network the way it
was trained, and everything the RTSTRUCT writer needs to name what it found::

    [model]
    name = "default"
    version = "1.0.0"
    modality = "CT"
    regions = ["thorax", "abdomen"]  # body regions covered: head, neck, thorax, abdomen, pelvis, limbs

    [input]
    orientation = "SPL"          # direction each array axis increases toward (L/R, A/P, S/I)
    spacing_mm = [3.0, 3.0, 3.0] # voxel size along those axes
    patch_size = [32, 64, 64]    # the network's input tile (fixed-size networks: the only size they take)
    output_crop = [0, 0, 0]      # voxels the network drops at each side of its tile ("valid" networks)
    layout = "channels_first"    # [batch, 1, *tile]; or "channels_last", [batch, *tile, 1] (Keras, TensorFlow)
    overlap = 0.5                # fraction of an output tile shared by neighbouring tiles
    tile_weighting = "gaussian"  # nnU-Net's Gaussian importance map; or "constant"
    mirror_axes = []             # test-time mirroring over these tile axes (nnU-Net's default is [0, 1, 2])
    batch_size = 2
    padding_hu = -1024           # value outside the scan
    # padding_value = 0.0        # ... or this value after normalisation (nnU-Net pads with 0)
    pad_position = "end"         # where a scan smaller than a tile sits in it: "end" (at 0) or "centre"
    prefilter = { kind = "median", size = 3, spacing_mm = [1.5, 1.5, 1.5] }  # optional, at its own spacing
    resampling = "linear"        # or "nnunet": normalise, cubic resize, logits back to the CT grid (logits only);
                                 # or "totalsegmentator": its own resampling first (linear to int32, in RAS axes),
                                 # decided on the model grid, labels back by its nearest-neighbour zoom
    accumulate = "float32"       # or "float16": tiles summed in half precision, as nnU-Net (half the memory)
    normalisation = { kind = "clip_scale", hu_min = -1000, hu_max = 1000 }  # or kind = "zscore", mean, std

    [output]
    kind = "softmax"             # one channel per class incl. background; or "sigmoid", one per label
    logits = false               # true: the network returns logits; tiles are averaged, then softmax/sigmoid
    threshold = 0.5              # sigmoid only

    [[labels]]
    value = 1                    # softmax: the class index; sigmoid: the output channel + 1 by default
    name = "External"            # TG-263, <= 16 characters
    # channel = 2                # sigmoid: several labels may read one channel ...
    # side = "left"              # ... and split it at the patient midline of that channel's mask
    colour = [0, 255, 0]
    interpreted_type = "EXTERNAL"
    keep_largest_component = false
    min_component_ml = 100.0     # drop smaller pieces, keep the arms
    min_component_extent = 0.5   # drop pieces shorter along the patient than half the largest (a couch bar)
    fill_holes = true
    min_volume_ml = 0.0
    volume_ml = [500, 150000]    # plausible volume, for contour QA
    contiguous = true            # contour QA: no empty slice between its first and last
    # exclusive_with = ["Lung_R"] # contour QA: never shares a voxel with these labels
    # outside_external = [0.02, 0.10]  # contour QA: share outside the External that warns, that fails
    # within = "External"        # keep only what lies inside an earlier label (lungs: never in a couch pad)

Post-processing runs per label in manifest order: within, side, components, length along the patient,
holes per axial slice, minimum volume.

Several packages run as one model (TotalSegmentator's parts) are a bundle: :mod:`gateway.inference.packages`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError
from gateway.inference.labels import MAX_LABELS

__all__ = ["INTERPRETED_TYPES", "Label", "ModelInfo", "ModelManifest", "ModelPackage", "OutputSpec",
           "load_model_package", "read_manifest", "validation_problems"]

_ORIENTATION = re.compile(r"^(?=.*[LR])(?=.*[AP])(?=.*[SI])[LRAPSI]{3}$")
INTERPRETED_TYPES = {"EXTERNAL", "PTV", "CTV", "GTV", "ORGAN", "AVOIDANCE", "BOLUS", "CAVITY", "SUPPORT",
                      "FIXATION", "CONTROL", "REGISTRATION", "ISOCENTER", "MARKER", "BRACHY_CHANNEL",
                      "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "CONTRAST_AGENT", "DOSE_REGION",
                      "TREATED_VOLUME", "IRRAD_VOLUME", "DOSE_MEASUREMENT"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Model):
    """Identity of the network."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    version: Annotated[str, Field(min_length=1, max_length=32)]
    modality: Literal["CT"] = "CT"
    description: str = ""
    #: The body regions the model was built or trained for (what a site may route to it).
    regions: list[Literal["head", "neck", "thorax", "abdomen", "pelvis", "limbs"]] = Field(default_factory=list)


class ClipScale(_Model):
    """HU clipped to ``[hu_min, hu_max]`` and scaled linearly to ``[out_min, out_max]``."""

    kind: Literal["clip_scale"]
    hu_min: float
    hu_max: float
    out_min: float = 0.0
    out_max: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.hu_max <= self.hu_min:
            raise ValueError("hu_max must be greater than hu_min")
        return self


class ZScore(_Model):
    """HU optionally clipped, then ``(hu - mean) / std`` (nnU-Net's CT normalisation)."""

    kind: Literal["zscore"]
    mean: float
    std: Annotated[float, Field(gt=0)]
    hu_min: float | None = None
    hu_max: float | None = None


Spacing = Annotated[list[Annotated[float, Field(gt=0, le=20)]], Field(min_length=3, max_length=3)]


class Median(_Model):
    """A median filter applied on its own grid before resampling to the model's (pyliverlesionseg's recipe)."""

    kind: Literal["median"]
    size: Annotated[int, Field(ge=3, le=7)] = 3
    spacing_mm: Spacing

    @field_validator("size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd")
        return value


class InputSpec(_Model):
    """How the network wants its input."""

    orientation: str
    spacing_mm: Spacing
    patch_size: Annotated[list[Annotated[int, Field(ge=4, le=1024)]], Field(min_length=3, max_length=3)]
    output_crop: Annotated[list[Annotated[int, Field(ge=0, le=256)]], Field(min_length=3, max_length=3)] = [0, 0, 0]
    layout: Literal["channels_first", "channels_last"] = "channels_first"
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.5
    tile_weighting: Literal["gaussian", "constant"] = "gaussian"
    mirror_axes: Annotated[list[Annotated[int, Field(ge=0, le=2)]], Field(max_length=3)] = []
    batch_size: Annotated[int, Field(ge=1, le=64)] = 1
    padding_hu: float = -1024.0
    padding_value: float | None = None
    pad_position: Literal["end", "centre"] = "end"
    prefilter: Median | None = None
    resampling: Literal["linear", "nnunet", "totalsegmentator"] = "linear"
    #: The dtype tile outputs are summed in; "float16" as nnU-Net v2 (Gaussian weights peaking at 10, in half).
    accumulate: Literal["float32", "float16"] = "float32"
    normalisation: ClipScale | ZScore = Field(discriminator="kind")

    @property
    def output_size(self) -> list[int]:
        """The size of the tile the network returns."""
        return [p - 2 * c for p, c in zip(self.patch_size, self.output_crop, strict=True)]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if min(self.output_size) < 1:
            raise ValueError("output_crop leaves nothing of the tile (it is cropped at both sides)")
        if len(set(self.mirror_axes)) != len(self.mirror_axes):
            raise ValueError("mirror_axes must not repeat an axis")
        if self.resampling != "linear" and self.prefilter is not None:
            raise ValueError("a prefilter works with linear resampling only")
        return self

    @field_validator("orientation")
    @classmethod
    def _orientation_code(cls, value: str) -> str:
        if not _ORIENTATION.match(value):
            raise ValueError("must be 3 letters naming one of L/R, A/P and S/I each, such as 'LPS' or 'SPL'")
        return value


class OutputSpec(_Model):
    """What the network returns."""

    kind: Literal["softmax", "sigmoid"]
    logits: bool = False
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5


class Label(_Model):
    """One structure the model segments."""

    value: Annotated[int, Field(ge=1, le=MAX_LABELS)]
    name: str
    colour: Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)]
    interpreted_type: str = "ORGAN"
    keep_largest_component: bool = False
    #: Drop connected components smaller than this (keeps e.g. both arms with the body, drops debris).
    min_component_ml: Annotated[float, Field(ge=0)] = 0.0
    #: Drop components shorter along the patient (the slice axis) than this fraction of the largest one's length:
    #: arms and legs in the field run along the patient, an indexing bar or a head rest's edge do not.
    min_component_extent: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: Keep only the part inside this earlier label's final mask (lungs inside the External: never in a couch pad).
    within: str | None = None
    fill_holes: bool = False
    min_volume_ml: Annotated[float, Field(ge=0)] = 0.0
    #: The volume range a plausible structure has (adult and child anatomy), for contour QA; not enforced here.
    volume_ml: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(gt=0)]] | None = None
    channel: Annotated[int, Field(ge=1, le=MAX_LABELS)] | None = None
    side: Literal["left", "right"] | None = None
    #: For contour QA: the structure has no empty slice between its first and last (an organ, not a chain).
    contiguous: bool = False
    #: For contour QA: labels this one never shares a voxel with (the two lungs).
    exclusive_with: tuple[str, ...] = ()
    #: For contour QA: the share of the structure outside the External that warns, and that fails (a structure that
    #: may reach past the skin, such as a bolus or the nostrils' airway, is given more).
    outside_external: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (0.02, 0.10)
    #: The model ("name version") that found this label, where a route merges several models' labels.
    origin: str | None = None

    @property
    def output_channel(self) -> int:
        """The network output channel this label reads (sigmoid models)."""
        return (self.channel if self.channel is not None else self.value) - 1

    @field_validator("name")
    @classmethod
    def _tg263(cls, value: str) -> str:
        if not 1 <= len(value) <= 16 or value != value.strip() or "\\" in value:
            raise ValueError("must be 1-16 characters (TG-263), no leading/trailing spaces or backslash")
        return value

    @field_validator("interpreted_type")
    @classmethod
    def _rt_type(cls, value: str) -> str:
        if value not in INTERPRETED_TYPES:
            raise ValueError("must be an RT ROI Interpreted Type (PS3.3 C.8.8.8), such as ORGAN or EXTERNAL")
        return value


class ModelManifest(_Model):
    """The whole ``manifest.toml``."""

    model: ModelInfo
    input: InputSpec
    output: OutputSpec
    labels: Annotated[list[Label], Field(min_length=1)]

    @model_validator(mode="after")
    def _labels_distinct(self) -> Self:
        values = [label.value for label in self.labels]
        names = [label.name for label in self.labels]
        if len(set(values)) != len(values) or len(set(names)) != len(names):
            raise ValueError("label values and names must be unique")
        if len(self.labels) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels per model, not {len(self.labels)}")
        for index, label in enumerate(self.labels):
            if label.within is not None and label.within not in names[:index]:
                raise ValueError(f"label {label.name!r}: within must name a label listed before it")
            if set(label.exclusive_with) - set(names) or label.name in label.exclusive_with:
                raise ValueError(f"label {label.name!r}: exclusive_with must name other labels of the model")
            if label.volume_ml is not None and label.volume_ml[0] >= label.volume_ml[1]:
                raise ValueError(f"label {label.name!r}: volume_ml must be [smallest, largest]")
            if label.outside_external[0] > label.outside_external[1]:
                raise ValueError(f"label {label.name!r}: outside_external must be [warn, fail], warn <= fail")
        if self.input.resampling == "nnunet" and not self.output.logits:
            raise ValueError("resampling = \"nnunet\" resamples logits: set output.logits = true")
        if self.output.kind == "sigmoid":
            channels = {label.output_channel for label in self.labels}
            if channels != set(range(len(channels))):
                raise ValueError("sigmoid labels must read channels 1..N with none unused")
        elif any(label.channel is not None or label.side is not None for label in self.labels):
            raise ValueError("channel and side apply to sigmoid models only")
        elif sorted(values) != list(range(1, len(values) + 1)):
            raise ValueError("softmax labels must be numbered 1..N, one per class after background")
        return self

    @property
    def channels(self) -> int:
        """How many channels the network returns."""
        if self.output.kind == "softmax":
            return len(self.labels) + 1
        return len({label.output_channel for label in self.labels})


class ModelPackage(_Model):
    """A validated package: its folder, network file and manifest."""

    folder: Path
    onnx_path: Path
    manifest: ModelManifest


def load_model_package(folder: Path) -> ModelPackage:
    """Read and validate ``folder/manifest.toml`` and check ``folder/model.onnx`` exists.

    Raises
    ------
    ConfigError
        Listing every problem with the package.
    """
    source = str(folder)
    onnx_path = folder / "model.onnx"
    problems = []
    if not onnx_path.is_file():
        problems.append(f"{onnx_path.name}: missing")
    raw = read_manifest(folder, problems)
    if "bundle" in raw:
        raise ConfigError(source, ["manifest.toml: a bundle of several packages ([bundle]), not one network; "
                                   "gateway.inference.packages.load_model reads it"])
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        problems += validation_problems(exc)
        raise ConfigError(source, problems) from None
    if problems:
        raise ConfigError(source, problems)
    return ModelPackage(folder=folder, onnx_path=onnx_path, manifest=manifest)


def read_manifest(folder: Path, problems: list[str]) -> dict[str, object]:
    """``folder/manifest.toml`` as TOML; :class:`ConfigError` with *problems* and the reading's where it fails."""
    try:
        return tomllib.loads((folder / "manifest.toml").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(folder), [*problems, f"manifest.toml: cannot read ({exc.strerror})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(folder), [*problems, f"manifest.toml: not valid TOML: {exc}"]) from None


def validation_problems(exc: ValidationError) -> list[str]:
    """One line per field a pydantic validation of a manifest refused."""
    return [f"manifest.toml {'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors(include_url=False, include_input=False)]
