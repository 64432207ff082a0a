"""What a series' masks become: the RT Structure Set, its optional Segmentation twin, and the QA picture."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from gateway.inference.manifest import ModelManifest
from gateway.inference.volume import Volume
from gateway.routes import Route
from gateway.rt.plausibility import Finding, Outcome
from gateway.rt.qa_picture import qa_picture
from gateway.rt.rtstruct import StructureSetInput, build_structure_set
from gateway.rt.seg import build_segmentation

__all__ = ["build_results", "encode_results", "structure_set_picture"]


def build_results(volume: Volume, datasets: Sequence[Dataset], masks: Mapping[str, np.ndarray],
                  manifest: ModelManifest, route: Route, qa: Sequence[Finding] = ()) -> list[Dataset]:
    """The RT Structure Set (and, if the route asks, its Segmentation twin) on the pseudonymised CT.

    Findings of *qa* that did not pass are written with their structures (ROI Observation Label and Description)
    and summarised in the Structure Set Description.
    """
    flagged: dict[str, list[Finding]] = {}
    for finding in qa:
        if finding.outcome is not Outcome.PASS:
            flagged.setdefault(finding.structure, []).append(finding)
    source = StructureSetInput(volume, datasets, masks, manifest, holes=route.holes, template=route.structures,
                               qa=flagged)
    results = [build_structure_set(source)]
    if route.segmentation:
        results.append(build_segmentation(source))
    return results


def encode_results(results: Sequence[Dataset]) -> list[bytes]:
    """Each result as Part 10 bytes."""
    encoded = []
    for ds in results:
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        encoded.append(buffer.getvalue())
    return encoded


def structure_set_picture(volume: Volume, masks: Mapping[str, np.ndarray], structure_set: Dataset,
                          route: Route, findings: Sequence[Finding] = ()) -> bytes:
    """The QA picture (PNG) of the structures written in *structure_set*, in their display colours.

    Each written structure with *findings* (by label name) that did not pass gets its own panel, captioned with
    its ROI name and the flags.
    """
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in structure_set.StructureSetROISequence}
    colours = {names[int(item.ReferencedROINumber)]: [int(c) for c in item.ROIDisplayColor]
               for item in structure_set.ROIContourSequence}
    by_roi = {}
    roi_names = {}
    for label, mask in masks.items():
        template = route.structures.get(label)
        name = (template.name if template is not None else None) or label
        if name in colours:  # written (empty structures are left out)
            by_roi[name] = mask
            roi_names[label] = name
    flags = [replace(f, structure=roi_names[f.structure]) for f in findings if f.structure in roi_names]
    return qa_picture(volume, by_roi, colours, flags)
