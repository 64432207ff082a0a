"""QA pictures: contours over axial, coronal and sagittal slices of the CT, as one PNG a physicist can check.

Drawn from pixels and masks; the only text is the caption of each flagged structure, composed by
:func:`flag_caption` from the structure's name and the check's codes and figure, never from patient data.
:func:`rtstruct_masks` reads an RT Structure Set back onto its CT grid (even-odd filling, so inner contours
are holes), for checking what a TPS would receive.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage
from skimage.draw import polygon

from gateway.inference.orientation import axis_transform, orientation_code, oriented
from gateway.inference.volume import Volume
from gateway.rt.plausibility import Finding, Outcome

__all__ = ["flag_caption", "qa_picture", "rtstruct_masks"]

_WINDOW = (-1000.0, 1000.0)  # HU shown from black to white
#: The display array's axes run head to feet, front to back, the patient's right to left.
_DISPLAY = "IPL"
#: Checks along the head-feet axis, shown on a coronal panel (the cut or the gap is visible); all others axial.
_CORONAL_CHECKS = frozenset({"truncation", "continuity"})
_TEXT, _MARGIN = (255, 255, 255), 3  # caption colour and padding (pixels)
_OWN = "\0"  # keys of a flagged structure's own cut, apart from the overview's "axial", "coronal", "sagittal"


def qa_picture(volume: Volume, masks: Mapping[str, np.ndarray], colours: Mapping[str, Sequence[int]],
               flags: Sequence[Finding] = ()) -> bytes:
    """A PNG: three panels through the structures' centre, each structure's outline in its colour.

    Below them, one panel for each structure of *masks* with a finding of *flags* that did not pass
    (``Finding.structure`` names the mask), in the order of *masks*: a slice through that structure's centroid,
    centred on it, its outline thickened, and a caption strip with one line per flag (:func:`flag_caption`).
    The slice is coronal when a flag is ``truncation`` or ``continuity`` (the cut or the gap runs head to feet),
    axial otherwise. Without such flags the picture is the three panels alone.

    Drawn in the radiological convention whatever the patient position and the order of the slices: axial seen
    from the feet (anterior up, the patient's right on the viewer's left), coronal and sagittal with the head up
    (sagittal: anterior on the left).
    """
    order, flips = axis_transform(orientation_code(volume.affine), _DISPLAY)
    hu = oriented(volume.hu, order, flips)
    dz, dy, dx = (volume.spacing[axis] for axis in order)
    flagged = _by_structure(flags)
    drawn, union, centroids = _first_pass(masks, order, flips, hu.shape, set(flagged))
    z, y, x = [round(c) for c in ndimage.center_of_mass(union)] if union.any() else [n // 2 for n in hu.shape]
    cuts = {"axial": (0, z), "coronal": (1, y), "sagittal": (2, x)}
    for name in drawn:
        if name in flagged:
            coronal = any(f.check in _CORONAL_CHECKS for f in flagged[name])
            cuts[_OWN + name] = (1, centroids[name][1]) if coronal else (0, centroids[name][0])
    planes = _planes(masks, drawn, order, flips, cuts)
    panels = [
        _panel(hu[z], planes["axial"], colours, (dy, dx)),  # axial
        _panel(hu[:, y, :], planes["coronal"], colours, (dz, dx)),  # coronal
        _panel(hu[:, :, x], planes["sagittal"], colours, (dz, dy)),  # sagittal
    ]
    cells = [_flagged(hu, planes[_OWN + name], colours, name, flagged[name], cuts[_OWN + name], centroids[name],
                      (dz, dy, dx)) for name in drawn if name in flagged]
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (max(sum(p.width for p in panels), sum(c.width for c in cells)),
                              height + max((c.height for c in cells), default=0)))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, (height - panel.height) // 2))
        x += panel.width
    x = 0
    for cell in cells:
        sheet.paste(cell, (x, height))
        x += cell.width
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def flag_caption(finding: Finding) -> str:
    """The caption line of one flag: structure name, outcome, check, reason code and figure; nothing else.

    Printable ASCII only (anything else becomes ``?``), so the built-in font draws every character.
    """
    text = f"{finding.structure}  {finding.outcome.value}  {finding.check}  {finding.reason or '-'}  {finding.value:g}"
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _by_structure(flags: Sequence[Finding]) -> dict[str, list[Finding]]:
    """The non-passed flags of each structure."""
    found: dict[str, list[Finding]] = {}
    for finding in flags:
        if finding.outcome is not Outcome.PASS:
            found.setdefault(finding.structure, []).append(finding)
    return found


def _first_pass(masks: Mapping[str, np.ndarray], order: tuple[int, int, int], flips: tuple[bool, bool, bool],
                shape: tuple[int, ...], flagged: set[str]) -> tuple[list[str], np.ndarray, dict[str, list[int]]]:
    """One structure at a time (masks may be made as they are read): the non-empty ones, their union, and the
    centroid of each flagged one (display axes)."""
    drawn, union, centroids = [], np.zeros(shape, dtype=bool), {}
    for name in masks:
        mask = oriented(masks[name], order, flips)
        if not mask.any():
            continue
        drawn.append(name)
        union |= mask
        if name in flagged:
            centroids[name] = [round(c) for c in ndimage.center_of_mass(mask)]
    return drawn, union, centroids


def _planes(masks: Mapping[str, np.ndarray], drawn: Sequence[str], order: tuple[int, int, int],
            flips: tuple[bool, bool, bool], cuts: Mapping[str, tuple[int, int]]) -> dict[str, dict[str, np.ndarray]]:
    """For each cut (display axis, index), every structure's plane there that has something in it."""
    planes: dict[str, dict[str, np.ndarray]] = {key: {} for key in cuts}
    for name in drawn:
        mask = oriented(masks[name], order, flips)
        for key, (axis, index) in cuts.items():
            plane = np.take(mask, index, axis=axis)
            if plane.any():
                planes[key][name] = plane.copy()
    return planes


def _flagged(hu: np.ndarray, planes: Mapping[str, np.ndarray], colours: Mapping[str, Sequence[int]], name: str,
             found: Sequence[Finding], cut: tuple[int, int], centroid: Sequence[int],
             spacing: tuple[float, float, float]) -> Image.Image:
    """One flagged structure's panel through its centroid (*cut*: display axis and index), centred on it, above its
    caption strip."""
    z, y, x = centroid
    dz, dy, dx = spacing
    if cut[0] == 1:
        plane, at, pixel = hu[:, y, :], (z, x), (dz, dx)
    else:
        plane, at, pixel = hu[z], (y, x), (dy, dx)
    panel = _panel(_centred(plane, at, _WINDOW[0]), {n: _centred(m, at, False) for n, m in planes.items()},
                   colours, pixel, emphasised=name)
    font = ImageFont.load_default()
    lines = [flag_caption(f) for f in found]
    widths = [round(font.getlength(line)) for line in lines]
    top, bottom = font.getbbox("Ag_|")[1::2]
    step = round(bottom - top) + _MARGIN
    cell = Image.new("RGB", (max(panel.width, max(widths) + 2 * _MARGIN), panel.height + step * len(lines) + _MARGIN))
    cell.paste(panel, ((cell.width - panel.width) // 2, 0))
    draw = ImageDraw.Draw(cell)
    for n, line in enumerate(lines):
        draw.text((_MARGIN, panel.height + _MARGIN + n * step - top), line, fill=_TEXT, font=font)
    return cell


def _centred(plane: np.ndarray, at: tuple[int, int], fill: float | bool) -> np.ndarray:
    """*plane* shifted so that the pixel *at* is at its centre; what comes in from outside is *fill*."""
    out = np.full_like(plane, fill)
    shifts = [size // 2 - a for size, a in zip(plane.shape, at, strict=True)]
    source = tuple(slice(max(0, -s), size - max(0, s)) for size, s in zip(plane.shape, shifts, strict=True))
    target = tuple(slice(max(0, s), size - max(0, -s)) for size, s in zip(plane.shape, shifts, strict=True))
    out[target] = plane[source]
    return out


def _panel(hu: np.ndarray, masks: Mapping[str, np.ndarray], colours: Mapping[str, Sequence[int]],
           spacing: tuple[float, float], emphasised: str | None = None) -> Image.Image:
    """*emphasised*'s outline is drawn three pixels thick, over the others."""
    low, high = _WINDOW
    grey = (np.clip((hu.astype(np.float32) - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for name, mask in sorted(masks.items(), key=lambda item: item[0] == emphasised):
        if name == emphasised:
            outline = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask, iterations=2)
        else:
            outline = mask & ~ndimage.binary_erosion(mask)
        rgb[outline] = colours.get(name, (255, 0, 0))
    image = Image.fromarray(rgb)
    rows, columns = hu.shape
    scale = min(spacing)  # square pixels: stretch the coarser axis to its true size
    size = (max(1, round(columns * spacing[1] / scale)), max(1, round(rows * spacing[0] / scale)))
    return image.resize(size, Image.Resampling.NEAREST)


def rtstruct_masks(rtstruct: Dataset, volume: Volume) -> dict[str, np.ndarray]:
    """The structures of *rtstruct* as masks on *volume*'s grid (contours filled even-odd, per slice)."""
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in rtstruct.StructureSetROISequence}
    inverse = np.linalg.inv(volume.affine)
    masks: dict[str, np.ndarray] = {}
    for item in rtstruct.ROIContourSequence:
        mask = np.zeros(volume.shape, dtype=bool)
        for contour in getattr(item, "ContourSequence", []):
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            voxels = (inverse @ np.column_stack([points, np.ones(len(points))]).T).T[:, :3]  # (k, i, j)
            k = round(float(np.median(voxels[:, 0])))
            if not 0 <= k < volume.shape[0]:
                continue
            rows, columns = polygon(voxels[:, 1], voxels[:, 2], volume.shape[1:])  # type: ignore[no-untyped-call]
            plane = np.zeros(volume.shape[1:], dtype=bool)
            plane[rows, columns] = True
            mask[k] ^= plane
        masks[names[int(item.ReferencedROINumber)]] = mask
    return masks
