"""QA pictures: contours over axial, coronal and sagittal slices of the CT, as one PNG a physicist can check.

Drawn from pixels and masks only: no text, no identifiers. :func:`rtstruct_masks` reads an RT
Structure Set back onto its CT grid (even-odd filling, so inner contours are holes), for checking
what a TPS would receive.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from scipy import ndimage
from skimage.draw import polygon

from gateway.inference.orientation import axis_transform, orientation_code, oriented
from gateway.inference.volume import Volume

__all__ = ["qa_picture", "rtstruct_masks"]

_WINDOW = (-1000.0, 1000.0)  # HU shown from black to white
#: The display array's axes run head to feet, front to back, the patient's right to left.
_DISPLAY = "IPL"


def qa_picture(volume: Volume, masks: Mapping[str, np.ndarray], colours: Mapping[str, Sequence[int]]) -> bytes:
    """A PNG: three panels through the structures' centre, each structure's outline in its colour.

    Drawn in the radiological convention whatever the patient position and the order of the slices: axial seen
    from the feet (anterior up, the patient's right on the viewer's left), coronal and sagittal with the head up
    (sagittal: anterior on the left).
    """
    order, flips = axis_transform(orientation_code(volume.affine), _DISPLAY)
    hu = oriented(volume.hu, order, flips)
    shown = {name: oriented(mask, order, flips) for name, mask in masks.items()}
    union = np.zeros(hu.shape, dtype=bool)
    for mask in shown.values():
        union |= mask
    centre = [round(c) for c in ndimage.center_of_mass(union)] if union.any() else [n // 2 for n in hu.shape]
    z, y, x = centre
    dz, dy, dx = (volume.spacing[axis] for axis in order)
    panels = [
        _panel(hu[z], {n: m[z] for n, m in shown.items()}, colours, (dy, dx)),  # axial
        _panel(hu[:, y, :], {n: m[:, y, :] for n, m in shown.items()}, colours, (dz, dx)),  # coronal
        _panel(hu[:, :, x], {n: m[:, :, x] for n, m in shown.items()}, colours, (dz, dy)),  # sagittal
    ]
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (sum(p.width for p in panels), height))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, (height - panel.height) // 2))
        x += panel.width
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _panel(hu: np.ndarray, masks: Mapping[str, np.ndarray], colours: Mapping[str, Sequence[int]],
           spacing: tuple[float, float]) -> Image.Image:
    low, high = _WINDOW
    grey = (np.clip((hu.astype(np.float32) - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for name, mask in masks.items():
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
