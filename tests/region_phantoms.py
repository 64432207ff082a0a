"""Scenes with known truth for the default model's body regions (issue 17): what the real data here lacks.

Each scene function (``SCENES`` names them all) takes a *seed* and returns ``(Volume, truth)``: an axial
HFS CT on an LPS grid, axes ``(z, y, x)`` (+x the patient's left, +y posterior, +z superior; built as
:func:`tests.synthetic.couch_phantom` builds its own), 256 or 320 pixels of 1.3-1.8 mm, 56-80 slices of
2.5 or 3 mm, and boolean masks on the same grid:

``External``
    the skin outline: the patient and everything inside the skin (lungs, bowel and stomach gas,
    sinuses, nasal cavity, airway); arms and legs in the field belong to it; couch tops, foam pads,
    mattresses, vacuum bags, blankets, thermoplastic masks, head rests and the air between any of
    them and the skin do not.
``Lung_L``, ``Lung_R``
    aerated lung (parenchyma with its vessels and intrapulmonary airways); empty where the scan has none.
``Lung_ignore``
    "don't care" for the lung checks: the main bronchi from the carina down (lumen and wall with a 3 mm
    margin) where they are not lung, which a lung contour may include or leave out. The trachea above
    the carina is never in it. Empty where the scan has no carina.

Voxels are painted whole, so the truth is exact on the CT grid; the scanner comes in afterwards as
an in-plane blur (0.8 mm) and Gaussian noise (25 HU) over a smooth texture. HU: air -1000, foam
-900..-700, lung -850 with vessels, fat -100, soft tissue 10..60, muscle 40, cancellous bone
250..400 in cortex of 1000..1200, carbon fibre 300..450, thermoplastic 250. A layer thinner than a
voxel (the vacuum bag's 1 mm plastic skin) gets the HU its share of the voxel gives.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from gateway.inference.volume import Volume

__all__ = ["SCENES", "Scene", "abdomen_bowel_gas", "curved_couch_abdomen", "curved_couch_thorax",
           "flat_couch_thorax", "head_in_mask", "neck_and_upper_thorax", "pelvis", "vacuum_bag_thorax"]

Truth = dict[str, np.ndarray]
Scene = tuple[Volume, Truth]
Point = tuple[float, float, float]  # (x, y, z) in mm, LPS

NOISE_HU = 25.0
PSF_MM = 0.8


class _Canvas:
    """An HU volume under construction: coordinates in mm (LPS, centred on the grid) and a seeded generator."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> None:
        self.shape, self.spacing = shape, spacing
        self.rng = np.random.default_rng(seed)
        axes = [((np.arange(n) - n / 2) * s).astype(np.float32) for n, s in zip(shape, spacing, strict=True)]
        self.z, self.y, self.x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self._fields: dict[float, np.ndarray] = {}

    def full(self, mask: np.ndarray) -> np.ndarray:
        """*mask* broadcast to the grid."""
        return np.broadcast_to(mask, self.shape)

    def smooth(self, sigma_mm: float, key: int = 0) -> np.ndarray:
        """A smooth random field of unit standard deviation; *key* picks another one of the same grain.

        One field is filtered per grain (coarse grains on a coarser grid, repeated up); other keys are
        shifted copies of it, which are as good as independent for texture and cost no filtering.
        """
        if sigma_mm not in self._fields:
            step = max(1, int(sigma_mm / (2 * self.spacing[1])))
            coarse = [-(-n // f) for n, f in zip(self.shape, (1, step, step), strict=True)]
            white = self.rng.standard_normal(coarse, dtype=np.float32)
            sigma = [sigma_mm / self.spacing[0], sigma_mm / (step * self.spacing[1]),
                     sigma_mm / (step * self.spacing[2])]
            field = ndimage.gaussian_filter(white, sigma, truncate=3.0)
            field /= field.std()
            if step > 1:
                field = field.repeat(step, axis=1).repeat(step, axis=2)[:, :self.shape[1], :self.shape[2]]
            self._fields[sigma_mm] = np.ascontiguousarray(field)
        field = self._fields[sigma_mm]
        if key:
            field = np.roll(field, (7 * key, 37 * key, 53 * key), axis=(0, 1, 2))
        return field

    def paint(self, mask: np.ndarray, hu: float | np.ndarray) -> None:
        """Set the voxels of *mask* to *hu* (a number or a field on the grid)."""
        mask = self.full(mask)
        self.hu[mask] = np.broadcast_to(hu, self.shape)[mask] if isinstance(hu, np.ndarray) else hu

    def ellipse(self, cx: float | np.ndarray, cy: float | np.ndarray, ax: float | np.ndarray,
                ay: float | np.ndarray) -> np.ndarray:
        """An elliptic cylinder along z (the parameters may vary with z as ``(nz, 1, 1)`` arrays)."""
        return self.full(((self.x - cx) / ax) ** 2 + ((self.y - cy) / ay) ** 2 <= 1)

    def _box(self, low: Sequence[float], high: Sequence[float]) -> tuple[slice, slice, slice]:
        """The index box (z, y, x) holding the points from *low* to *high* (each x, y, z in mm)."""
        found = []
        for axis, lo, hi in zip((2, 1, 0), low, high, strict=True):
            n, s = self.shape[axis], self.spacing[axis]
            start, stop = int(np.floor(lo / s + n / 2)), int(np.ceil(hi / s + n / 2)) + 1
            found.append(slice(max(start, 0), max(min(stop, n), 0)))
        x, y, z = found
        return z, y, x

    def ellipsoid(self, centre: Point, semi: Point) -> np.ndarray:
        """An ellipsoid, computed in its bounding box only."""
        out = np.zeros(self.shape, dtype=bool)
        box = self._box([c - r for c, r in zip(centre, semi, strict=True)],
                        [c + r for c, r in zip(centre, semi, strict=True)])
        (cx, cy, cz), (ax, ay, az) = centre, semi
        out[box] = (((self.x[:, :, box[2]] - cx) / ax) ** 2 + ((self.y[:, box[1]] - cy) / ay) ** 2
                    + ((self.z[box[0]] - cz) / az) ** 2 <= 1)
        return out

    def tube(self, start: Point, end: Point, radius: float) -> np.ndarray:
        """The points within *radius* of the segment from *start* to *end*, computed in its bounding box only."""
        out = np.zeros(self.shape, dtype=bool)
        a, b = np.array(start, dtype=np.float32), np.array(end, dtype=np.float32)
        box = self._box([float(v) for v in np.minimum(a, b) - radius], [float(v) for v in np.maximum(a, b) + radius])
        x, y, z = self.x[:, :, box[2]] - a[0], self.y[:, box[1]] - a[1], self.z[box[0]] - a[2]
        d = b - a
        t = np.clip((x * d[0] + y * d[1] + z * d[2]) / max(float(d @ d), 1e-6), 0, 1)
        out[box] = (x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2 <= radius ** 2
        return out

    def depth(self, mask: np.ndarray) -> np.ndarray:
        """In-plane distance (mm) of each voxel of *mask* to the nearest voxel outside it (0 outside)."""
        sampling = self.spacing[1:]
        return np.stack([ndimage.distance_transform_edt(plane, sampling=sampling) for plane in self.full(mask)])

    def distance(self, mask: np.ndarray) -> np.ndarray:
        """In-plane distance (mm) of each voxel to *mask* (0 inside; large on slices without any of it)."""
        sampling = self.spacing[1:]
        planes = [ndimage.distance_transform_edt(~plane, sampling=sampling) if plane.any()
                  else np.full(plane.shape, 1e4) for plane in self.full(mask)]
        return np.stack(planes)

    def volume(self) -> Volume:
        """The CT as the scanner would show it: blurred in-plane, with noise, stored as int16 HU."""
        hu = ndimage.gaussian_filter(self.hu, (0, PSF_MM / self.spacing[1], PSF_MM / self.spacing[2]))
        hu += NOISE_HU * self.rng.standard_normal(self.shape, dtype=np.float32)
        np.clip(hu, -1024, 3071, out=hu)
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        affine = np.zeros((4, 4))
        affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = sz, sy, sx, 1
        affine[:3, 3] = [-(nx / 2) * sx, -(ny / 2) * sy, -(nz / 2) * sz]
        return Volume(np.round(hu).astype(np.int16), affine, tuple(str(k) for k in range(nz)), "1.2.3", "HFS")


def _grown(semi: Point, mm: float) -> Point:
    return semi[0] + mm, semi[1] + mm, semi[2] + mm


def _truth(c: _Canvas, external: np.ndarray, lung_l: np.ndarray | None = None, lung_r: np.ndarray | None = None,
           ignore: np.ndarray | None = None) -> Truth:
    empty = np.zeros(c.shape, dtype=bool)
    return {"External": np.array(external), "Lung_L": empty if lung_l is None else lung_l,
            "Lung_R": empty if lung_r is None else lung_r, "Lung_ignore": empty if ignore is None else ignore}


# --- the patient ---------------------------------------------------------------------------------------------

def _soft_tissue(c: _Canvas, body: np.ndarray, fat_mm: float) -> np.ndarray:
    """Muscle, subcutaneous fat (its thickness varying by a third) and skin in *body*; returns the depth (mm)."""
    depth = c.depth(body)
    c.paint(body, 40 + 6 * c.smooth(4.0))
    c.paint(body & (depth <= fat_mm * (1 + 0.3 * c.smooth(25.0, 1))), -100 + 10 * c.smooth(4.0))
    c.paint(body & (depth <= 2.0), 35.0)
    return depth


def _trunk(c: _Canvas, a: float | np.ndarray, b: float | np.ndarray, cy: float, flat: float = 12.0) -> np.ndarray:
    """An elliptic trunk with its back flattened where it lies: the back is at ``cy + b - flat``."""
    trunk: np.ndarray = c.ellipse(0.0, cy, a, b) & c.full(c.y <= cy + b - flat)
    return trunk


def _spine(c: _Canvas, y_body: float | np.ndarray, top: float = 1e3, bottom: float = -1e3,
           radius: float = 17.0) -> None:
    """Vertebrae (cortex, marrow, discs every 28 mm), the spinal canal and the spinous processes."""
    span = c.full((c.z <= top) & (c.z >= bottom))
    vertebra = c.ellipse(0.0, y_body, radius, radius * 0.85) & span
    c.paint(vertebra, 1100.0)
    c.paint(c.ellipse(0.0, y_body, radius - 2, radius * 0.85 - 2) & span, 280 + 40 * c.smooth(2.0))
    c.paint(vertebra & c.full((c.z % 28) < 6), 90.0)
    arch = c.ellipse(0.0, y_body + radius + 8, radius * 0.7, 11) & span
    c.paint(arch, 800.0)
    c.paint(c.ellipse(0.0, y_body + radius + 8, 7.0, 6.0) & span, 20.0)
    spinous = c.ellipse(0.0, y_body + radius + 18, 4.0, 7.0) & span & c.full((c.z % 28) > 8)
    c.paint(spinous, 750.0)


def _long_bone(c: _Canvas, cx: float | np.ndarray, cy: float | np.ndarray, radius: float) -> None:
    """A long bone along z: cortex (1150) round fatty marrow."""
    c.paint(c.ellipse(cx, cy, radius, radius), 1150.0)
    c.paint(c.ellipse(cx, cy, radius - 3, radius - 3), 60 + 20 * c.smooth(2.0))


# --- chest ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Chest:
    """Where the lungs and airways of a scene lie (mm)."""

    cy: float  # the body's centre (y)
    apex_z: float  # lung apices
    carina_z: float
    dome_z: float  # the top of the diaphragm domes (below the scan: no base)
    trachea_top: Point  # where the trachea enters the scan (x, y, z)
    spine_y: float | np.ndarray  # the vertebral bodies' centres (y), per slice where an array
    wall_mm: float = 28.0  # chest wall: skin to pleura


def _chest(c: _Canvas, body: np.ndarray, depth: np.ndarray, chest: _Chest) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
    """Mediastinum, airways, lungs with vessels, ribs and sternum; returns (Lung_L, Lung_R, Lung_ignore)."""
    cy, carina = chest.cy, chest.carina_z
    ly = cy - 5
    carina_point = (0.0, ly + 5, carina)
    right_end, left_end = (-42.0, ly + 10, carina - 24), (48.0, ly + 14, carina - 38)
    heart_z, heart_half = (chest.dome_z + carina) / 2 - 10, (carina - chest.dome_z) / 2 + 10
    heart = c.ellipsoid((15.0, cy - 38, heart_z), (62.0, 46.0, heart_half)) & body
    aorta = [((8.0, cy - 35, carina - 60), (6.0, cy - 32, carina + 12)),
             ((6.0, cy - 32, carina + 12), (22.0, cy + 25, carina + 8)),
             ((22.0, cy + 25, carina + 8), (22.0, cy + 28, -1e3))]
    vessels = np.zeros(c.shape, dtype=bool)
    for start, end in aorta:
        vessels |= c.tube(start, end, 12.0)
    band = c.full(np.abs(c.x) < np.where(c.y > cy - 40, 25.0, 14.0))  # trachea, oesophagus, spine; thymus
    grown = c.ellipsoid((15.0, cy - 38, heart_z), (66.0, 50.0, heart_half + 4)) | band
    for start, end in aorta:
        grown |= c.tube(start, end, 15.0)
    c.paint(heart | vessels, 45 + 4 * c.smooth(4.0))
    lungs, diaphragm = _lung_regions(c, depth, chest, grown)
    c.paint(diaphragm, 40.0)
    _lung_tissue(c, lungs, ly, carina)
    ignore = _airways(c, body, lungs, chest, (carina_point, right_end, left_end))
    lung_l, lung_r = lungs & c.full(c.x > 0), lungs & c.full(c.x <= 0)
    _spine(c, chest.spine_y)
    ribs = (depth > 14) & (depth <= 21) & c.full((((c.z + 0.35 * (c.y - cy)) % 24) < 9) & (c.z < chest.apex_z + 5))
    c.paint(ribs & ~c.ellipse(0.0, cy - 90, 30.0, 40.0), 700 + 60 * c.smooth(2.0))  # none at the sternum
    c.paint(c.ellipse(0.0, cy - 88, 16.0, 7.0) & (depth > 12) & c.full(c.z < chest.apex_z - 15), 600.0)  # sternum
    return lung_l, lung_r, ignore & ~lungs


def _lung_regions(c: _Canvas, depth: np.ndarray, chest: _Chest, mediastinum: np.ndarray) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Inside the chest wall, off the mediastinum, under domed apices and above the diaphragm (6 mm of muscle,
    also returned)."""
    ly = chest.cy - 5
    below_apex = np.clip((chest.apex_z - c.z) / 55.0, 0, 1)
    dome = (chest.dome_z - 28 * ((np.abs(c.x) - 60) / 70) ** 2 - 25 * ((c.y - ly) / 70) ** 2
            + 12 * (c.x < 0))  # the right dome sits higher over the liver
    taper = c.ellipse(np.sign(c.x) * 75.0, ly, 80 * np.sqrt(below_apex) + 1e-3, 105 * np.sqrt(below_apex) + 1e-3)
    space = taper & (depth > chest.wall_mm) & ~mediastinum
    return space & c.full(c.z > dome), space & c.full((c.z <= dome) & (c.z > dome - 6))


def _lung_tissue(c: _Canvas, lungs: np.ndarray, ly: float, carina: float) -> None:
    """Parenchyma denser where dependent, with vessels from the hila that stay 3 mm inside the lung."""
    c.paint(lungs, np.clip(-860 + 25 * c.smooth(4.0, 2) + 0.4 * (c.y - ly), -900, -780))
    core = c.depth(lungs) > 3
    for side in (-1, 1):
        hilum = (side * 32.0, ly + 8, carina - 28)
        inside = np.argwhere(core & c.full(np.sign(c.x) == side))
        if inside.size == 0:
            continue
        picks = inside[c.rng.choice(len(inside), size=min(28, len(inside)), replace=False)]
        for k, i, j in picks:
            end = (float(c.x[0, 0, j]), float(c.y[0, i, 0]), float(c.z[k, 0, 0]))
            middle = (0.5 * (hilum[0] + end[0]), 0.5 * (hilum[1] + end[1]), 0.5 * (hilum[2] + end[2]))
            vessel = c.tube(hilum, middle, 3.0) | c.tube(middle, end, 1.8)
            c.paint(vessel & core, 40.0)
        dots = inside[c.rng.choice(len(inside), size=min(150, len(inside)), replace=False)]
        for k, i, j in dots:
            spot = (float(c.x[0, 0, j]), float(c.y[0, i, 0]), float(c.z[k, 0, 0]))
            c.paint(c.ellipsoid(spot, (1.6, 1.6, 2.5)) & core, 30.0)


def _airways(c: _Canvas, body: np.ndarray, lungs: np.ndarray, chest: _Chest,
             bifurcation: tuple[Point, Point, Point]) -> np.ndarray:
    """Trachea from the top of the scan to the carina, main bronchi to the hila (*bifurcation*: carina, right and
    left ends), lobar bronchi inside the lungs only, an oesophagus with some air; returns the "don't care"
    region: the main bronchi below the carina with a 3 mm margin."""
    carina, right, left = bifurcation
    x0, y0, z0 = chest.trachea_top
    top = (x0, y0, max(z0, float(c.z.max()) + 10))
    main = [(top, carina, 8.0), (carina, right, 6.5), (carina, left, 5.5)]
    lobar = [(right, (-70.0, right[1] + 20, right[2] - 30), 4.0), (left, (80.0, left[1] + 25, left[2] - 25), 3.5),
             (right, (-65.0, right[1] - 30, right[2] + 10), 3.0), (left, (70.0, left[1] - 30, left[2] + 15), 3.0)]
    for pieces, within in ((main, body), (lobar, lungs)):
        walls = np.zeros(c.shape, dtype=bool)
        lumen = np.zeros(c.shape, dtype=bool)
        for start, end, radius in pieces:
            walls |= c.tube(start, end, radius + 2.0)
            lumen |= c.tube(start, end, radius)
        c.paint(walls & within, 80.0)
        c.paint(lumen & within, -1000.0)
    oesophagus = c.tube((8.0, y0 + 18, top[2]), (14.0, carina[1] + 22, -1e3), 8.0)
    c.paint(oesophagus & body, 40.0)
    c.paint(c.tube((8.0, y0 + 18, top[2]), (14.0, carina[1] + 22, carina[2] - 30), 2.5) & body
            & c.full(c.z < carina[2] + 25), -1000.0)
    ignore = c.tube(carina, right, 6.5 + 2 + 3) | c.tube(carina, left, 5.5 + 2 + 3)
    below: np.ndarray = ignore & c.full(c.z <= carina[2])
    return below


# --- abdomen and pelvis --------------------------------------------------------------------------------------

def _abdomen(c: _Canvas, body: np.ndarray, depth: np.ndarray, cy: float, top_z: float, *, fat_mm: float,
             gas: float) -> None:
    """Upper abdomen under a diaphragm at *top_z*: visceral fat, liver, spleen, kidneys, a stomach holding
    ``400 * gas`` ml of air over fluid, colon (gas pockets with fluid levels, stool) and small bowel."""
    inner = body & (depth > fat_mm + 10)
    c.paint(inner, -90 + 12 * c.smooth(4.0, 3))
    c.paint(c.ellipse(-35.0, cy + 60, 22.0, 20.0) & inner, 45.0)  # paraspinal and psoas muscles
    c.paint(c.ellipse(35.0, cy + 60, 22.0, 20.0) & inner, 45.0)
    liver = c.ellipsoid((-60.0, cy - 5, top_z - 60), (88.0, 78.0, 75.0)) & inner & c.full(c.x < 35)
    c.paint(liver, 62 + 5 * c.smooth(4.0, 4))
    c.paint(c.ellipsoid((-45.0, cy - 55, top_z - 120), (16.0, 16.0, 30.0)) & inner, 10.0)  # gallbladder
    c.paint(c.ellipsoid((95.0, cy + 35, top_z - 50), (30.0, 42.0, 55.0)) & inner, 48.0)  # spleen
    for side in (-1, 1):
        kidney = c.ellipsoid((side * 72.0, cy + 42, top_z - 110 - 10 * side), (28.0, 30.0, 55.0)) & inner
        c.paint(kidney, 32.0)
        c.paint(c.ellipsoid((side * 62.0, cy + 38, top_z - 110 - 10 * side), (9.0, 10.0, 25.0)) & inner, 10.0)
    c.paint(c.tube((14.0, cy + 22, top_z), (14.0, cy + 22, -1e3), 12.0) & inner, 45.0)  # aorta
    c.paint(c.tube((-22.0, cy + 22, top_z), (-22.0, cy + 22, -1e3), 13.0) & inner, 40.0)  # vena cava
    _stomach(c, inner, (60.0, cy - 35, top_z - 70), gas)
    _bowel(c, inner, cy, top_z, gas)


def _stomach(c: _Canvas, inner: np.ndarray, centre: Point, gas: float) -> None:
    """A stomach (4 mm wall) holding ``400 * gas`` ml of air over fluid (an air-fluid level, supine)."""
    wall = c.ellipsoid(centre, (58.0, 47.0, 62.0)) & inner
    lumen = c.ellipsoid(centre, (54.0, 43.0, 58.0)) & inner
    c.paint(wall, 45.0)
    c.paint(lumen, 15 + 5 * c.smooth(4.0, 5))
    voxel_ml = float(np.prod(c.spacing)) / 1000
    count = int(400 * gas / voxel_ml)
    if count and lumen.any():
        ys = np.broadcast_to(c.y, c.shape)[lumen]
        level = np.sort(ys)[min(count, len(ys) - 1)]
        c.paint(lumen & c.full(c.y < level), -1000.0)


def _bowel(c: _Canvas, inner: np.ndarray, cy: float, top_z: float, gas: float) -> None:
    """Colon (ascending with stool, transverse and descending with gas over fluid) and small-bowel loops."""
    rng = c.rng
    ascending = c.tube((-100.0, cy + 5, top_z - 150), (-100.0, cy + 5, -1e3), 22.0) & inner
    c.paint(ascending, np.where(c.smooth(2.0, 6) > 1.3, -950.0, 25.0))  # stool: mottled gas
    segments = [(((-100.0, cy - 55, top_z - 160), (100.0, cy - 60, top_z - 140)), 22.0),
                (((100.0, cy - 60, top_z - 140), (105.0, cy + 15, top_z - 150)), 20.0),
                (((105.0, cy + 15, top_z - 150), (105.0, cy + 15, -1e3)), 18.0)]
    for (start, end), radius in segments:
        tube = c.tube(start, end, radius) & inner
        c.paint(tube, 45.0)
        lumen = c.tube(start, end, radius - 3) & inner
        c.paint(lumen, 15.0)
        level = float(min(start[1], end[1])) + radius * (1.2 - 1.4 * gas)
        c.paint(lumen & c.full(c.y < level), -1000.0)  # gas above the fluid
    for _ in range(14):
        centre = (float(rng.uniform(-80, 80)), float(cy - 30 + rng.uniform(-30, 30)),
                  float(top_z - 130 - rng.uniform(0, 90)))
        semi = (float(rng.uniform(12, 18)), float(rng.uniform(10, 15)), float(rng.uniform(15, 30)))
        loop = c.ellipsoid(centre, semi) & inner
        c.paint(loop, 40.0)
        lumen = c.ellipsoid(centre, _grown(semi, -3.0)) & inner
        c.paint(lumen, 20.0)
        if rng.uniform() < gas:
            c.paint(lumen & c.full(c.y < centre[1] - semi[1] * 0.2), -1000.0)


# --- what the patient lies on --------------------------------------------------------------------------------

def _first_along_y(mask: np.ndarray) -> np.ndarray:
    """Each voxel at or behind (posterior to) the first voxel of *mask* in its column."""
    behind: np.ndarray = np.maximum.accumulate(mask, axis=1)
    return behind


def _drape(c: _Canvas, solid: np.ndarray, radius_mm: float) -> np.ndarray:
    """Everything under a cloth laid over *solid* from the front: per slice, the lower envelope of parabolas
    (curvature ``1 / radius_mm``) through the solid's front-most points. It bridges hollows and falls off the
    sides as a sheet of that stiffness would."""
    ys, xs = c.y.ravel(), c.x.ravel()
    present = solid.any(axis=1)
    top = np.where(present, ys[np.argmax(solid, axis=1)], np.inf)  # (nz, nx)
    fall = (xs[:, None] - xs[None, :]) ** 2 / (2 * radius_mm)
    line = np.min(top[:, None, :] + fall[None, :, :], axis=2)  # (nz, nx)
    return c.full(c.y >= line[:, None, :])


def _sheet(c: _Canvas, solid: np.ndarray, radius_mm: float, gap: np.ndarray, thickness: np.ndarray,
           stop: np.ndarray) -> np.ndarray:
    """A sheet draped over *solid*, *gap* mm off it (0: touching) and *thickness* mm thick, ending at *stop*."""
    distance = c.distance(_drape(c, solid, radius_mm))
    sheet: np.ndarray = (distance > gap) & (distance <= gap + thickness) & ~_first_along_y(stop)
    return sheet


def _blanket(c: _Canvas, patient: np.ndarray, support: np.ndarray) -> None:
    """A blanket (-500..-300 HU, 5-10 mm) over the patient, touching the skin in places, hanging onto *support*."""
    gap = np.clip(2 + 6 * c.smooth(25.0, 7), 0, 12)
    thickness = 7.5 + 2.0 * c.smooth(25.0, 8)
    blanket = _sheet(c, patient, 30.0, gap, thickness, support)
    c.paint(blanket, np.clip(-400 + 50 * c.smooth(4.0, 9), -500, -300))


def _pockets(c: _Canvas, count: int, x_range: tuple[float, float], depth_mm: tuple[float, float]) -> np.ndarray:
    """Air pockets between the back and what it lies on: a depth map (mm) over (x, z) of *count* bumps."""
    pockets = np.zeros((c.shape[0], 1, c.shape[2]), dtype=np.float32)
    z_low, z_high = float(c.z.min()), float(c.z.max())
    for _ in range(count):
        px, pz = c.rng.uniform(*x_range), c.rng.uniform(z_low, z_high)
        width, length, deep = c.rng.uniform(15, 30), c.rng.uniform(15, 40), c.rng.uniform(*depth_mm)
        bump = deep * np.exp(-((c.x - px) / width) ** 2 - ((c.z - pz) / length) ** 2)
        pockets = np.maximum(pockets, bump)
    return pockets


def _flat_couch(c: _Canvas, top_y: float) -> np.ndarray:
    """An RT couch top: 1.5 mm carbon skins (450 HU) round a 45 mm foam core (-850), 530 mm wide."""
    width = c.full(np.abs(c.x) < 265)
    couch: np.ndarray = width & c.full((c.y >= top_y) & (c.y < top_y + 48))
    c.paint(couch, 450 + 60 * c.smooth(4.0, 10))
    c.paint(width & c.full((c.y >= top_y + 1.5) & (c.y < top_y + 46.5)), -850 + 20 * c.smooth(8.0, 11))
    return couch


def _mattress(c: _Canvas, couch_top: float, body: np.ndarray, thickness: float = 30.0,
              bar: np.ndarray | None = None) -> np.ndarray:
    """A foam mattress (-850..-750) with a PVC cover (-200, one voxel) on the couch, pressed in by *body*
    and lying over an indexing *bar* where there is one."""
    band = c.full((np.abs(c.x) < 240) & (c.y >= couch_top - thickness) & (c.y < couch_top))
    mattress: np.ndarray = band & ~body
    if bar is not None:
        mattress &= ~bar
    c.paint(mattress, np.clip(-800 + 30 * c.smooth(8.0, 12) + 60 * (c.distance(body) < 15), -850, -700))
    cover = mattress & ~np.roll(mattress, 1, axis=1)
    c.paint(cover, -200.0)
    return mattress


#: The curved PET/CT pallet: the radius of its shell's inner face, where that face is lowest (y), its pad.
_PALLET_RADIUS_MM, _PALLET_BOTTOM_Y, _PAD_MM = 600.0, 170.0, 50.0


def _curved_couch(c: _Canvas, patient: np.ndarray, pockets: np.ndarray) -> np.ndarray:
    """A PET/CT pallet: a 5 mm carbon shell (300 HU) under a 50 mm foam pad (-900..-700, denser where pressed)
    with air *pockets* (mm) under the patient; returns shell and pad."""
    r = np.sqrt(c.x ** 2 + (c.y - (_PALLET_BOTTOM_Y - _PALLET_RADIUS_MM)) ** 2)
    shell = c.full((r >= _PALLET_RADIUS_MM) & (r < _PALLET_RADIUS_MM + 5) & (np.abs(c.x) < 235))
    c.paint(shell, 300 + 50 * c.smooth(4.0, 13))
    near = c.distance(patient)
    pad = c.full((r >= _PALLET_RADIUS_MM - _PAD_MM) & (r < _PALLET_RADIUS_MM) & (np.abs(c.x) < 225))
    pad = pad & ~patient & (near >= pockets)
    c.paint(pad, np.clip(-850 + 50 * c.smooth(8.0, 14) + 80 * (near < 20), -900, -700))
    support: np.ndarray = shell | pad
    return support


def _pad_top(x: float) -> float:
    """The y of the curved couch's pad surface over *x* (mm), where nothing presses it."""
    return _PALLET_BOTTOM_Y - _PALLET_RADIUS_MM + float(np.sqrt((_PALLET_RADIUS_MM - _PAD_MM) ** 2 - x ** 2))


# --- scenes --------------------------------------------------------------------------------------------------

def _arm_centres(c: _Canvas, a: float, arm: tuple[float, float]) -> list[tuple[np.ndarray, float]]:
    """Where the arms lie beside a trunk of half-width *a* on the curved couch: 4-16 mm off it, 5 mm into the pad."""
    gap = 10 + 6 * np.sin(c.z / 40.0)
    y = _pad_top(a + 10 + arm[0]) + 5 - arm[1]
    return [(side * (a + gap + arm[0]), y) for side in (-1, 1)]


def _curved_couch_patient(c: _Canvas, a: float, b: float,
                          arm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, float]:
    """A trunk sunk 12 mm into the curved couch's pad, arms (semi-axes *arm*) down beside it resting on the pad;
    returns trunk, arms and the trunk's centre (y)."""
    cy = _pad_top(0.0) + 12 - b + 12
    arms = np.zeros(c.shape, dtype=bool)
    for cx, cy_arm in _arm_centres(c, a, arm):
        arms |= c.ellipse(cx, cy_arm, *arm)
    return _trunk(c, a, b, cy), arms, cy


def curved_couch_abdomen(seed: int = 0) -> Scene:
    """The issue's failure: an upper abdomen (no lungs) on a curved PET/CT couch with a 5 cm foam pad, air
    pockets under the back, forearms down on the pad and a blanket over all."""
    c = _Canvas((56, 320, 320), (3.0, 1.7, 1.7), seed)
    a, b, arm = 150.0, 100.0, (38.0, 42.0)
    trunk, arms, cy = _curved_couch_patient(c, a, b, arm)
    body = trunk | arms
    depth = _soft_tissue(c, body, 14.0)
    _abdomen(c, trunk, depth, cy, top_z=float(c.z.max()) + 15, fat_mm=14.0, gas=0.8)
    _spine(c, cy + b - 60)
    for cx, cy_arm in _arm_centres(c, a, arm):
        _long_bone(c, cx, cy_arm, 9.0)
    support = _curved_couch(c, body, _pockets(c, 6, (-100, 100), (3, 10)))
    _blanket(c, body, support)
    return c.volume(), _truth(c, body)


def curved_couch_thorax(seed: int = 0) -> Scene:
    """A thorax (apices to the domes) on the curved PET/CT couch, pad, air pockets, upper arms down, blanket."""
    c = _Canvas((64, 320, 320), (3.0, 1.7, 1.7), seed)
    a, b, arm = 150.0, 100.0, (42.0, 46.0)
    trunk, arms, cy = _curved_couch_patient(c, a, b, arm)
    body = trunk | arms
    depth = _soft_tissue(c, body, 12.0)
    chest = _Chest(cy=cy, apex_z=80.0, carina_z=20.0, dome_z=-45.0, trachea_top=(0.0, cy - 30, 200.0),
                   spine_y=cy + b - 60)
    _abdomen(c, trunk, depth, cy, top_z=chest.dome_z, fat_mm=12.0, gas=0.4)
    lung_l, lung_r, ignore = _chest(c, trunk, depth, chest)
    for cx, cy_arm in _arm_centres(c, a, arm):
        _long_bone(c, cx, cy_arm, 12.0)
    support = _curved_couch(c, body, _pockets(c, 6, (-100, 100), (3, 10)))
    _blanket(c, body, support)
    return c.volume(), _truth(c, body, lung_l, lung_r, ignore)


def flat_couch_thorax(seed: int = 0) -> Scene:
    """A thorax, arms up out of the field, on a thin mattress on a flat carbon RT couch, an indexing bar (20 x 30 mm,
    across the couch) under the mattress below the lung bases."""
    c = _Canvas((64, 256, 256), (3.0, 1.8, 1.8), seed)
    a, b, couch_top = 160.0, 110.0, 160.0
    cy = couch_top - 35 + 8 - b + 12  # the back 8 mm into a 35 mm mattress: 7 mm of foam over the bar
    body = _trunk(c, a, b, cy)
    depth = _soft_tissue(c, body, 14.0)
    chest = _Chest(cy=cy, apex_z=80.0, carina_z=20.0, dome_z=-45.0, trachea_top=(0.0, cy - 30, 200.0),
                   spine_y=cy + b - 60)
    _abdomen(c, body, depth, cy, top_z=chest.dome_z, fat_mm=14.0, gas=0.4)
    lung_l, lung_r, ignore = _chest(c, body, depth, chest)
    _flat_couch(c, couch_top)
    bar = c.full((np.abs(c.x) < 240) & (c.y >= couch_top - 20) & (c.y < couch_top) & (c.z >= -75) & (c.z < -45))
    c.paint(bar, 500 + 30 * c.smooth(4.0, 15))
    _mattress(c, couch_top, body, thickness=35.0, bar=bar)
    return c.volume(), _truth(c, body, lung_l, lung_r, ignore)


def vacuum_bag_thorax(seed: int = 0) -> Scene:
    """A thorax, arms up, in a vacuum bag (polystyrene beads in a 1 mm plastic skin) moulded round the back and
    sides, touching the skin, on a flat couch; 2.5 mm slices."""
    c = _Canvas((72, 256, 256), (2.5, 1.8, 1.8), seed)
    a, b, couch_top = 155.0, 105.0, 160.0
    cy = couch_top - 40 - b + 12  # 40 mm of bag under the back
    body = _trunk(c, a, b, cy)
    depth = _soft_tissue(c, body, 13.0)
    chest = _Chest(cy=cy, apex_z=75.0, carina_z=15.0, dome_z=-50.0, trachea_top=(0.0, cy - 30, 200.0),
                   spine_y=cy + b - 60)
    _abdomen(c, body, depth, cy, top_z=chest.dome_z, fat_mm=13.0, gas=0.4)
    lung_l, lung_r, ignore = _chest(c, body, depth, chest)
    _flat_couch(c, couch_top)
    outer = c.ellipse(0.0, cy + 20, a + 55, b + 45) & c.full((c.y < couch_top) & (c.y > cy - 25))
    bag = outer & ~body
    c.paint(bag, np.clip(-850 + 35 * c.smooth(2.0, 16), -900, -800))
    skin = bag & (c.depth(bag) <= c.spacing[1])
    share = 1.0 / c.spacing[1]  # 1 mm of plastic (~0 HU) in a voxel of beads
    c.paint(skin, -850 * (1 - share))
    return c.volume(), _truth(c, body, lung_l, lung_r, ignore)


def abdomen_bowel_gas(seed: int = 0) -> Scene:
    """An abdomen below the lungs: a stomach holding 400 ml of air over fluid, colon gas with air-fluid levels,
    mottled stool, small-bowel gas; arms up, on a thin mattress on a flat couch."""
    c = _Canvas((60, 256, 256), (3.0, 1.7, 1.7), seed)
    a, b, couch_top = 165.0, 115.0, 150.0
    cy = couch_top - 30 + 8 - b + 12
    body = _trunk(c, a, b, cy)
    depth = _soft_tissue(c, body, 16.0)
    _abdomen(c, body, depth, cy, top_z=float(c.z.max()) + 10, fat_mm=16.0, gas=1.0)
    _spine(c, cy + b - 60)
    _flat_couch(c, couch_top)
    _mattress(c, couch_top, body)
    return c.volume(), _truth(c, body)


def pelvis(seed: int = 0) -> Scene:
    """A male pelvis: iliac wings, sacrum, femoral heads and shafts, bladder, prostate, rectal and sigmoid gas;
    below the perineum the thighs part (both in the External), on a thin mattress on a flat couch."""
    c = _Canvas((60, 256, 256), (3.0, 1.8, 1.8), seed)
    couch_top, b, split = 150.0, 110.0, -45.0
    back = couch_top - 30 + 8
    cy = back - b + 12
    a = np.where(c.z > 40, 175 - (c.z - 40) * 0.4, 175.0)
    hips = _trunk(c, a, b, cy) & c.full(c.z >= split)
    gap = np.clip((split - c.z) * 0.4, 0, 16)
    thigh_x = 85 + gap / 2
    thighs = (c.ellipse(-thigh_x, back - 85, 85.0, 95.0) | c.ellipse(thigh_x, back - 85, 85.0, 95.0)) \
        & c.full((c.z < split) & (c.y <= back))
    body = hips | thighs
    depth = _soft_tissue(c, body, 18.0)
    _pelvic_organs(c, hips, depth, cy)
    _pelvic_bones(c, hips, cy)
    for side in (-1, 1):
        shaft = c.tube((side * 135.0, cy + 15, -35), (side * 93.0, back - 85, -100), 13.0) & body
        c.paint(shaft, 1150.0)
        c.paint(c.tube((side * 135.0, cy + 15, -35), (side * 93.0, back - 85, -100), 8.0) & body, 40.0)
    _flat_couch(c, couch_top)
    _mattress(c, couch_top, body)
    return c.volume(), _truth(c, body)


def _pelvic_organs(c: _Canvas, hips: np.ndarray, depth: np.ndarray, cy: float) -> None:
    """Pelvic fat and muscles, bladder, prostate, rectum and sigmoid with gas, small-bowel loops with gas."""
    inner = hips & (depth > 30)
    c.paint(inner, -90 + 12 * c.smooth(4.0, 3))
    muscles = (c.ellipse(-75.0, cy + 10, 22.0, 25.0) | c.ellipse(75.0, cy + 10, 22.0, 25.0)) & c.full(c.z > -20)
    c.paint((muscles | (inner & c.full((c.y > cy + 45) & (np.abs(c.x) > 45)))) & inner, 45.0)
    c.paint(c.ellipsoid((0.0, cy - 40, 5.0), (50.0, 38.0, 42.0)) & inner, 40.0)  # bladder wall
    c.paint(c.ellipsoid((0.0, cy - 40, 5.0), (47.0, 35.0, 39.0)) & inner, 10.0)  # urine
    c.paint(c.ellipsoid((0.0, cy - 5, -30.0), (20.0, 16.0, 18.0)) & inner, 40.0)  # prostate
    for (start, end), gas_below in ((((0.0, cy + 52, -60.0), (0.0, cy + 50, 20.0)), cy + 46),
                                    (((0.0, cy + 50, 20.0), (-30.0, cy + 10, 60.0)), cy + 26)):
        c.paint(c.tube(start, end, 17.0) & inner, 40.0)
        lumen = c.tube(start, end, 13.0) & inner
        c.paint(lumen, 20 + 8 * c.smooth(2.0, 4))
        c.paint(lumen & c.full((c.y < gas_below) & (c.z > -20)), -1000.0)
    for _ in range(6):
        centre = (float(c.rng.uniform(-70, 70)), float(cy - 20 + c.rng.uniform(-30, 20)),
                  float(c.rng.uniform(55, 85)))
        c.paint(c.ellipsoid(centre, (15.0, 12.0, 20.0)) & inner, 40.0)
        lumen = c.ellipsoid(centre, (12.0, 9.0, 17.0)) & inner
        c.paint(lumen, 20.0)
        c.paint(lumen & c.full(c.y < centre[1] - 3), -1000.0)


def _pelvic_bones(c: _Canvas, hips: np.ndarray, cy: float) -> None:
    """Iliac wings, sacrum, pubis, acetabula, femoral heads and necks, greater trochanters, ischial tuberosities."""
    wing = (c.ellipse(0.0, cy + 15, 135.0, 80.0) & ~c.ellipse(0.0, cy + 15, 127.0, 72.0)
            & c.full((c.y > cy - 25) & (c.y < cy + 70) & (np.abs(c.x) > 40) & (c.z > 5)))
    c.paint(wing & hips, 750 + 60 * c.smooth(2.0))
    sacrum = c.ellipse(0.0, cy + 70, 48.0, 16.0) & c.full(c.z > 0)
    c.paint(sacrum & hips, 1000.0)
    c.paint(c.ellipse(0.0, cy + 70, 45.0, 13.0) & c.full(c.z > 0) & hips, 380.0)
    pubis = (c.ellipse(0.0, cy + 10, 95.0, 85.0) & ~c.ellipse(0.0, cy + 10, 88.0, 78.0)
             & c.full((c.y < cy - 30) & (c.z > -45) & (c.z < -15)))
    c.paint(pubis & hips, 750.0)
    for side in (-1, 1):
        head = (side * 92.0, cy + 5, -10.0)
        c.paint(c.ellipsoid(head, (31.0, 31.0, 31.0)) & c.full(c.z > -18) & hips, 800.0)  # acetabulum
        c.paint(c.ellipsoid(head, (24.0, 24.0, 24.0)), 1100.0)
        c.paint(c.ellipsoid(head, (22.0, 22.0, 22.0)), 350 + 40 * c.smooth(2.0))
        c.paint(c.tube(head, (side * 135.0, cy + 15, -35.0), 14.0) & hips, 700.0)
        c.paint(c.ellipsoid((side * 140.0, cy + 15, -30.0), (18.0, 20.0, 18.0)) & hips, 600.0)
        c.paint(c.ellipsoid((side * 55.0, cy + 55, -40.0), (14.0, 18.0, 18.0)) & hips, 700.0)


def neck_and_upper_thorax(seed: int = 0) -> Scene:
    """Lower neck to below the carina, arms up (the upper arms beside the neck, in the field): the trachea runs
    down the neck to the carina and splits into main bronchi that enter the lungs; 2.5 mm slices."""
    c = _Canvas((80, 256, 256), (2.5, 1.8, 1.8), seed)
    couch_top, b_trunk = 160.0, 105.0
    back = couch_top - 30 + 8
    cy = back - b_trunk + 12
    t = np.clip((c.z - 25) / 30, 0, 1)  # 0: trunk, 1: neck
    a, b, centre = 160 - 102 * t, b_trunk - 45 * t, cy - 20 * t
    body = c.ellipse(0.0, centre, a, b) & c.full(c.y <= back)
    arms = np.zeros(c.shape, dtype=bool)
    for side in (-1, 1):
        arms |= c.ellipse(side * 150.0, back - 45, 45.0, 48.0) & c.full(c.z > 15)
    patient = body | arms
    depth = _soft_tissue(c, patient, 12.0)
    chest = _Chest(cy=cy, apex_z=45.0, carina_z=-35.0, dome_z=-150.0, trachea_top=(0.0, cy - 45, 200.0),
                   spine_y=(1 - t) * (cy + b_trunk - 60) + t * (centre + 15))
    _abdomen(c, body, depth, cy, top_z=chest.dome_z, fat_mm=12.0, gas=0.0)
    lung_l, lung_r, ignore = _chest(c, body, depth, chest)
    for side in (-1, 1):
        c.paint(c.tube((side * 22.0, cy - 80, 32.0), (side * 95.0, cy - 30, 38.0), 6.0) & body, 900.0)  # clavicle
    humeri = c.ellipse(-150.0, back - 45, 13.0, 13.0) | c.ellipse(150.0, back - 45, 13.0, 13.0)
    c.paint(humeri & arms & c.full(c.z > 30), 1150.0)
    _flat_couch(c, couch_top)
    _mattress(c, couch_top, patient)
    return c.volume(), _truth(c, patient, lung_l, lung_r, ignore)


def head_in_mask(seed: int = 0) -> Scene:
    """A head and neck (no lungs) in a thermoplastic mask with holes, on a head rest on a flat couch: skull,
    brain, orbits, maxillary, frontal, ethmoid and sphenoid sinuses, nasal cavity and nostrils, oral air,
    pharynx and airway down the neck; 2.5 mm slices at 1.3 mm."""
    c = _Canvas((80, 256, 256), (2.5, 1.3, 1.3), seed)
    couch_top = 115.0
    head = (c.ellipsoid((0.0, -25.0, 15.0), (78.0, 98.0, 90.0)) | c.ellipsoid((0.0, -50.0, -40.0), (62.0, 72.0, 65.0))
            | c.ellipsoid((0.0, -120.0, -32.0), (17.0, 24.0, 26.0)) | (c.ellipse(0.0, -5.0, 55.0, 58.0)
                                                                     & c.full(c.z < -20)))
    depth = _soft_tissue(c, head, 4.0)
    _skull_and_brain(c, head)
    _sinuses(c, head, depth)
    _spine(c, 15.0, top=-30.0, radius=10.0)
    block = c.full((np.abs(c.x) < 80) & (c.y >= 30) & (c.y < couch_top))
    rest = block & ~head
    rest &= c.distance(head) >= _pockets(c, 4, (-40, 40), (1, 3))
    c.paint(rest, np.clip(-800 + 40 * c.smooth(4.0, 17), -880, -720))
    c.paint(rest & (c.depth(rest) <= 1.5), 300.0)  # the head rest's dense skin
    _flat_couch(c, couch_top)
    frame = c.full((np.abs(c.x) >= 82) & (np.abs(c.x) < 96) & (c.y >= couch_top - 15) & (c.y < couch_top))
    c.paint(frame, 500.0)  # the mask's frame, clipped to the couch beside the head rest
    _mask(c, head, block, couch_top - 15)
    return c.volume(), _truth(c, head)


def _skull_and_brain(c: _Canvas, head: np.ndarray) -> None:
    """Skull 3-6 mm thick (open in front of the orbits), its base, the brain with ventricles, the orbits."""
    outer = c.ellipsoid((0.0, -25.0, 15.0), (73.0, 93.0, 85.0))
    inner = c.ellipsoid((0.0, -26.0, 15.5), (70.0, 88.0, 81.0))
    face_window = c.full((c.z < 10) & (c.y < -70))
    c.paint(outer & ~inner & c.full(c.z > -25) & ~face_window, 1000 + 80 * c.smooth(2.0))
    brain = inner & c.full(c.z > -25) & ~c.full((c.y < -60) & (c.z < 12))
    c.paint(brain, 35 + 4 * c.smooth(4.0))
    c.paint(inner & c.full(((c.z > -30) & (c.z <= -25) & (c.y > -60)) | ((c.z >= 12) & (c.z < 15) & (c.y < -60))),
            900.0)  # skull base and orbital roofs
    for side in (-1, 1):
        c.paint(c.ellipsoid((side * 12.0, -30.0, 35.0), (6.0, 25.0, 10.0)), 5.0)  # ventricles
        c.paint(c.ellipsoid((side * 32.0, -85.0, -5.0), (17.0, 22.0, 16.0)) & head, -80.0)  # orbital fat
        c.paint(c.ellipsoid((side * 32.0, -95.0, -5.0), (12.0, 12.0, 12.0)) & head, 10.0)  # eye
    for z0, z1, hu in ((-84.0, -66.0, 900.0), (-66.0, -54.0, 1800.0)):  # mandible, teeth
        jaw = c.ellipse(0.0, -45.0, 40.0, 48.0) & ~c.ellipse(0.0, -45.0, 34.0, 42.0)
        c.paint(jaw & c.full((c.y < -15) & (c.z > z0) & (c.z <= z1)) & head, hu)
    c.paint(c.ellipsoid((0.0, -75.0, -63.0), (22.0, 25.0, 2.5)) & head, -1000.0)  # air over the tongue


def _sinuses(c: _Canvas, head: np.ndarray, depth: np.ndarray) -> None:
    """Paranasal sinuses (bone walls, 2.5 mm mucosa, a fluid level), nasal cavity with septum and turbinates,
    nostrils opening downwards, pharynx and airway."""
    cavities = [((-30.0, -68.0, -38.0), (15.0, 18.0, 18.0)), ((30.0, -68.0, -38.0), (15.0, 18.0, 18.0)),
                ((-11.0, -105.0, 25.0), (10.0, 7.0, 13.0)), ((11.0, -105.0, 25.0), (10.0, 7.0, 13.0)),
                ((0.0, -40.0, -15.0), (14.0, 12.0, 11.0))]
    for centre, semi in cavities:
        c.paint(c.ellipsoid(centre, _grown(semi, 1.5)) & head, 700.0)
        c.paint(c.ellipsoid(centre, semi) & head, 30.0)  # mucosa
        c.paint(c.ellipsoid(centre, _grown(semi, -2.5)) & head, -1000.0)
    c.paint(c.ellipsoid((-30.0, -68.0, -38.0), (12.5, 15.5, 15.5)) & c.full(c.y > -60), 20.0)  # a fluid level
    ethmoid = c.full((np.abs(c.x) < 13) & (c.y > -100) & (c.y < -60) & (c.z > -22) & (c.z < 8)) & head
    cells = c.full((np.abs((c.x / 5.5) % 1 - 0.5) < 0.32) & (np.abs((c.y / 6.0) % 1 - 0.5) < 0.32)
                   & (np.abs((c.z / 5.0) % 1 - 0.5) < 0.4))
    c.paint(ethmoid, 500.0)
    c.paint(ethmoid & cells, -1000.0)
    up = np.clip((c.z + 56) / 40, 0, 1)  # 0 at the floor of the nose, 1 under the cribriform plate
    nasal = c.full((np.abs(c.x) < 13 - 6 * up) & (c.y > -112 + 10 * up) & (c.y < -28) & (c.z > -56) & (c.z < -16))
    nasal = nasal & (depth > 4)
    c.paint(nasal, -1000.0)
    c.paint(nasal & c.full(np.abs(c.x) < 1.2), 300.0)  # septum
    for side in (-1, 1):
        c.paint(c.tube((side * 9.0, -110.0, -45.0), (side * 9.0, -40.0, -45.0), 4.0) & nasal, 40.0)
        c.paint(c.tube((side * 8.0, -100.0, -32.0), (side * 8.0, -45.0, -32.0), 3.5) & nasal, 40.0)
        nostril = c.ellipsoid((side * 4.5, -126.0, -50.0), (3.0, 5.0, 7.0)) | c.tube(
            (side * 4.5, -126.0, -50.0), (side * 6.0, -106.0, -47.0), 3.0)  # the vestibule
        c.paint(nostril & head, -1000.0)
    airway = [(0.0, -28.0, -25.0), (0.0, -18.0, -55.0), (0.0, -22.0, -80.0), (0.0, -30.0, -110.0)]
    for start, end in itertools.pairwise(airway):
        c.paint(c.tube(start, end, 11.0) & head & c.full(c.z < -40), 60.0)
    for start, end in itertools.pairwise(airway):
        c.paint(c.tube(start, end, 9.0) & head, -1000.0)


def _mask(c: _Canvas, head: np.ndarray, rest: np.ndarray, frame_y: float) -> None:
    """A thermoplastic mask: 2.5 mm (250 HU), 0-5 mm off the skin, bridging hollows narrower than about 2 cm
    (air between it and the face beside the nose), down the sides of the head and the head *rest* to the frame
    at *frame_y*, with a staggered pattern of 5 mm holes 8 mm apart."""
    closed = c.depth(c.distance(head | rest) <= 10.0) > 10.0  # closed by a 10 mm disc, slice by slice
    gap = np.clip(2 + 2 * c.smooth(25.0, 18), 0, 5)
    distance = c.distance(closed | head | rest)
    shell = (distance > gap) & (distance <= gap + 2.5) & c.full((c.y < frame_y) & (c.z > -75))
    arc = 90 * np.arctan2(c.x, -(c.y + 25))
    row = np.floor(c.z / 6.5)
    u = (arc / 8 + 0.5 * (row % 2)) % 1 - 0.5
    v = (c.z / 6.5) % 1 - 0.5
    holes = c.full((u * 8) ** 2 + (v * 6.5) ** 2 <= 2.5 ** 2)
    c.paint(shell & ~holes, 250 + 20 * c.smooth(2.0, 19))


SCENES = {"curved_couch_abdomen": curved_couch_abdomen, "curved_couch_thorax": curved_couch_thorax,
          "flat_couch_thorax": flat_couch_thorax, "vacuum_bag_thorax": vacuum_bag_thorax,
          "head_in_mask": head_in_mask, "abdomen_bowel_gas": abdomen_bowel_gas, "pelvis": pelvis,
          "neck_and_upper_thorax": neck_and_upper_thorax}
