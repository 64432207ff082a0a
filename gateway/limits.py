"""``[limits]``: size caps on what the node accepts and processes.

Its own module, shared by the receiving side (data set bytes, pixels per instance) and the inference side (series
and model-grid voxels, plausible geometry), which need nothing else of the configuration.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Limits"]


class Limits(BaseModel):
    """Size caps on what the node accepts and processes, each checked from headers before decoding or allocating.

    Each refusal has its own reason code (C-STORE failure status at receipt, a failed task later).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Bytes of one received data set; larger ones are refused (0xA700, ``dataset_too_large``) without being
    #: buffered whole: a receiver holds at most about twice this for one association.
    max_dataset_bytes: Annotated[int, Field(ge=1024 * 1024, le=4 * 1024**3)] = 128 * 1024 * 1024
    #: Rows x Columns x Number of Frames of one received image; more is refused from the header, before any
    #: decoding (0xC230, ``too_many_pixels``).
    max_pixels_per_instance: Annotated[int, Field(ge=64 * 64, le=2**31)] = 4096 * 4096
    #: Voxels of one series as received (``series_too_large``), and on a model's grid after resampling
    #: (``model_grid_too_large``), both checked before anything is allocated.
    max_series_voxels: Annotated[int, Field(ge=10 * 64 * 64, le=2**34)] = 512 * 512 * 2048
    #: Plausible pixel spacing (mm) of a CT image, smallest and largest (``implausible_pixel_spacing``).
    pixel_spacing_mm: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.05, 5.0)
    #: Plausible distance between slices (mm), smallest and largest (``implausible_slice_spacing``).
    slice_spacing_mm: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.1, 20.0)

    @model_validator(mode="after")
    def _ranges_ordered(self) -> Self:
        for name in ("pixel_spacing_mm", "slice_spacing_mm"):
            low, high = getattr(self, name)
            if low >= high:
                raise ValueError(f"{name}: the smallest value must be below the largest")
        return self
