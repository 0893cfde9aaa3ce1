"""Synthetic FLARE-like abdominal CT with the 13 FLARE 2022 organ labels.

The embedded data set of the project: anyone without FLARE 2022 (or trying the
project for the first time) runs the whole pipeline on these phantoms. Each
case is an int16 volume in Hounsfield units with an anisotropic voxel size
drawn per case (0.6-0.9 mm in plane, 2.5-5 mm between slices), stored in RAS
orientation (array axes x, y, z = patient left, anterior, superior) and laid
out exactly like the FLARE 2022 download::

    O/labelled/images/FLARE22_Tr_0001_0000.nii.gz   CT, int16 HU
    O/labelled/labels/FLARE22_Tr_0001.nii.gz        organ labels, uint8, FLARE ids 0..13
    O/unlabelled/Case_00001_0000.nii.gz             CT without labels, longer field of view
    O/split.json                                    {"train": [case ids], "val": [case ids]}
    O/phantoms.json                                 the settings the volumes were made with

Anatomy: an elliptical body with subcutaneous fat and a muscle wall, the spine
(vertebral bodies, discs, canal, posterior elements), ribs at the upper levels,
lung bases above the diaphragm domes (heart and more lung when an unlabelled
case reaches higher), bowel loops and colon with gas, psoas and paraspinal
muscles, the portal venous system, and the 13 organs placed with anatomical
priors (liver on the patient's right, spleen left posterior, kidneys beside the
spine, aorta left-anterior of the spine, IVC to its right, pancreas crossing
in front of the aorta inside the duodenal C-loop, ...). Every organ varies per
case in position, size and shape (smooth random deformations), and every tissue
has a plausible portal-venous-phase HU value with smooth low-frequency texture
and Gaussian scanner noise. Unlabelled cases sometimes reach the heart at the
top and the pelvis (iliac wings, bladder, femoral heads) at the bottom.

The phantom is scaled to the field of view: the body fills the in-plane field
of view whatever ``--size_xy`` is, and the anatomy is stretched along z so that
a labelled case always spans from the lung bases to below the kidneys. A small
``--size_xy`` therefore gives a small patient, not a cropped one.

Usage::

    # the default demo set: 12 labelled + 24 unlabelled cases of 256 x 256 x ~80
    python make_phantoms.py --output_dir ~/data/phantoms

    # a tiny set for a quick test, with a picture of the first labelled case
    python make_phantoms.py --output_dir /tmp/ph --n_labelled 3 --n_unlabelled 2 \\
        --size_xy 128 --n_slices 40 --preview /tmp/ph/preview.png

    # then preprocess it like FLARE
    python preprocess_flare_labelled.py --data_dir ~/data/phantoms/labelled \\
        --output_dir ~/data/phantoms_2d/labelled --split_path ~/data/phantoms/split.json
    python preprocess_flare_unlabelled.py --data_dir ~/data/phantoms/unlabelled \\
        --output_dir ~/data/phantoms_2d/unlabelled

In Python::

    from make_phantoms import make_case, generate_dataset
    image, label, affine = make_case(seed=0)             # (256, 256, 80) int16, uint8, 4x4
    paths = generate_dataset("/tmp/ph", n_labelled=4, n_unlabelled=4)
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import matplotlib
import nibabel as nib
import numpy as np
from matplotlib.colors import ListedColormap
from tqdm import tqdm

from data import LABEL_NAMES as FLARE_LABEL_NAMES
from utils import UserError, atomic_write, atomic_write_json, prepare_output_dir, prepare_output_file, run_cli

logger = logging.getLogger(__name__)

#: Bumped whenever the generated volumes change for the same seed and size.
GENERATOR_VERSION = 2  # 2: x mirrored to true RAS+ (patient right at high x)

#: FLARE 2022 label ids by name ("right_kidney": 2, ...), from the one table in data.py.
LABELS: dict[str, int] = {name.replace(" ", "_"): i for i, name in enumerate(FLARE_LABEL_NAMES) if i > 0}
LABEL_NAMES: dict[int, str] = {v: k for k, v in LABELS.items()}

# --------------------------------------------------------------------------------------
# Tissues: each voxel gets one tissue id; its HU is base + amplitude * texture + noise.
# (name, base HU, per-case jitter of base, low-frequency texture amplitude,
#  fine texture amplitude)
# --------------------------------------------------------------------------------------
_TISSUES: list[tuple[str, float, float, float, float]] = [
    ("air", -1000.0, 0.0, 0.0, 0.0),
    ("fat", -100.0, 10.0, 8.0, 6.0),
    ("visceral_fat", -90.0, 10.0, 10.0, 8.0),
    ("muscle", 50.0, 6.0, 6.0, 5.0),
    ("bone_cortex", 850.0, 120.0, 60.0, 60.0),
    ("bone_marrow", 230.0, 40.0, 30.0, 45.0),
    ("disc", 90.0, 10.0, 8.0, 5.0),
    ("csf", 15.0, 5.0, 3.0, 2.0),
    ("cartilage", 130.0, 20.0, 10.0, 10.0),
    ("lung", -850.0, 30.0, 30.0, 25.0),
    ("heart_muscle", 90.0, 10.0, 6.0, 4.0),
    ("blood_pool", 170.0, 25.0, 6.0, 3.0),
    ("liver", 60.0, 8.0, 7.0, 3.0),
    ("spleen", 55.0, 8.0, 6.0, 3.0),
    ("kidney_cortex", 180.0, 25.0, 10.0, 5.0),
    ("kidney_medulla", 120.0, 20.0, 10.0, 5.0),
    ("renal_sinus", -60.0, 15.0, 15.0, 10.0),
    ("pancreas", 45.0, 8.0, 8.0, 12.0),
    ("aorta", 200.0, 30.0, 5.0, 2.0),
    ("ivc", 120.0, 20.0, 8.0, 3.0),
    ("portal_vein", 160.0, 20.0, 5.0, 2.0),
    ("adrenal", 35.0, 8.0, 5.0, 3.0),
    ("bile", 10.0, 5.0, 3.0, 2.0),
    ("gut_wall", 40.0, 8.0, 6.0, 4.0),
    ("gut_fluid", 15.0, 8.0, 8.0, 10.0),
    ("gut_gas", -900.0, 40.0, 20.0, 30.0),
    ("stool", -60.0, 30.0, 40.0, 160.0),
    ("bowel_wall", 80.0, 15.0, 8.0, 6.0),
    ("urine", 8.0, 4.0, 2.0, 2.0),
    ("esophagus", 40.0, 6.0, 5.0, 3.0),
]
#: tissue name -> id in the tissue map (see _make_case_full)
TISSUES: dict[str, int] = {name: i for i, (name, *_rest) in enumerate(_TISSUES)}
T = TISSUES


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
class _Grid:
    """Voxel centres in anatomy units (about 18 cm of a real patient per unit).

    Args:
        xu, yu, tu: increasing 1D coordinates of the voxel centres along x (patient
            left), y (anterior) and z (superior), in anatomy units.
    """

    def __init__(self, xu: np.ndarray, yu: np.ndarray, tu: np.ndarray):
        self.xu, self.yu, self.tu = xu.astype(np.float32), yu.astype(np.float32), tu.astype(np.float32)
        self.shape = (len(xu), len(yu), len(tu))

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in [lo, hi]; None when empty."""
        out = []
        for axis, a, b in zip((self.xu, self.yu, self.tu), lo, hi):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl):
        """Broadcastable (x, y, t) coordinates of a box."""
        return (
            self.xu[sl[0]][:, None, None],
            self.yu[sl[1]][None, :, None],
            self.tu[sl[2]][None, None, :],
        )


class _Canvas:
    """Tissue and label volumes that organs are painted on, later paint wins."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.tissue = np.full(grid.shape, T["air"], dtype=np.uint8)
        self.label = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, sl, mask: np.ndarray, tissue: int, label: int = 0) -> None:
        """Set ``tissue`` and ``label`` where ``mask`` (broadcast to the box ``sl``) is True; no-op when ``sl`` is None."""
        if sl is None:
            return
        mask = np.broadcast_to(mask, tuple(s.stop - s.start for s in sl))
        self.tissue[sl][mask] = tissue
        self.label[sl][mask] = label


def _rot(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, y, z."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


_BUMP_MAX = 0.3  # largest relative bump of a deformed ellipsoid's surface


def _blob(grid: _Grid, center, radii, rot: np.ndarray | None, coef: np.ndarray | None):
    """A smoothly deformed ellipsoid.

    Inside where |q| < 1 + bump(q / |q|), q the point in the ellipsoid's own
    normalised frame and bump a random combination of low-order polynomials of the
    direction (clipped to +-0.3), so the surface is a smooth random bump field on
    the ellipsoid. The bump depends on the direction only and varies slowly, so it
    is evaluated on every second voxel in x and y and repeated.

    Args:
        grid: the volume's coordinates.
        center: (x, y, t) in anatomy units.
        radii: the three semi-axes in the ellipsoid's frame.
        rot: 3x3 rotation, world = rot @ local; None for axis-aligned.
        coef: 9 bump coefficients (typically N(0, 0.05-0.1)); None for a plain ellipsoid.

    Returns:
        (box slices, boolean mask of the box, normalised radius |q| in the box) or
        (None, None, None) when the blob misses the volume.
    """
    center = np.asarray(center, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    rot64 = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
    grow = 1.0 + (_BUMP_MAX if coef is not None else 0.0)
    reach = np.sqrt(((rot64 * radii[None, :]) ** 2).sum(1)) * grow  # half extent along x, y, t
    sl = grid.box(center - reach, center + reach)
    if sl is None:
        return None, None, None
    r = rot64.astype(np.float32)  # local = rot.T @ world
    inv_r = (1.0 / radii).astype(np.float32)
    c32 = center.astype(np.float32)

    def local(sl_):
        x, y, t = grid.coords(sl_)
        d = (x - c32[0], y - c32[1], t - c32[2])
        return [(d[0] * r[0, k] + d[1] * r[1, k] + d[2] * r[2, k]) * inv_r[k] for k in range(3)]

    q = local(sl)
    rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
    if coef is None:
        return sl, rho < 1, rho
    c = np.asarray(coef, dtype=np.float32)
    sub = (slice(sl[0].start, sl[0].stop, 2), slice(sl[1].start, sl[1].stop, 2), sl[2])
    q0, q1, q2 = local(sub)
    inv = 1.0 / (np.sqrt(q0 * q0 + q1 * q1 + q2 * q2) + np.float32(1e-6))
    n0, n1, n2 = q0 * inv, q1 * inv, q2 * inv
    bump = c[0] * n0 + c[1] * n1 + c[2] * n2
    bump += n0 * (c[3] * n1 + c[5] * n2 + c[6] * n0) + n1 * (c[4] * n2 - c[6] * n1 + c[8] * n0 * n2)
    bump += c[7] * (3 * n2 * n2 - 1)
    np.clip(bump, -_BUMP_MAX, _BUMP_MAX, out=bump)
    bump = np.repeat(np.repeat(bump, 2, axis=0), 2, axis=1)[: rho.shape[0], : rho.shape[1]]
    bump += 1
    return sl, rho < bump, rho


def _catmull_rom(points: np.ndarray, per_segment: int = 5) -> np.ndarray:
    """A smooth curve through the control points (Catmull-Rom spline), densely sampled."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) < 3:
        return p
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    s = np.linspace(0, 1, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        out.append(
            0.5
            * (2 * p1 + (-p0 + p2) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * s**3)
        )
    out.append(p[-1:])
    return np.vstack(out)


def _tube(grid: _Grid, points, radii, per_segment: int = 5):
    """A tube of varying radius along a smooth curve through ``points``.

    Each segment of the sampled curve only touches the voxels of its own bounding
    box, so long winding tubes (colon, bowel) cost little.

    Returns:
        (box slices, normalised distance d / r in the box: < 1 inside, inf far away)
        or (None, None) when the tube misses the volume.
    """
    pts = np.asarray(points, dtype=np.float64)
    rad = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
    if len(pts) >= 3:
        dense = _catmull_rom(pts, per_segment)
        rdense = np.interp(np.linspace(0, len(pts) - 1, len(dense)), np.arange(len(pts)), rad)
    else:
        dense, rdense = pts, rad
    rmax = rdense.max()
    sl = grid.box(dense.min(0) - rmax, dense.max(0) + rmax)
    if sl is None:
        return None, None
    best = np.full(tuple(s.stop - s.start for s in sl), np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(dense[:-1], dense[1:], rdense[:-1], rdense[1:]):
        r_seg = max(ra, rb)
        ss = grid.box(np.minimum(a, b) - r_seg, np.maximum(a, b) + r_seg)
        if ss is None:
            continue
        local = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(ss, sl))
        x, y, t = grid.coords(ss)
        ab = (b - a).astype(np.float32)
        inv_l2 = np.float32(1.0 / (float(ab @ ab) + 1e-12))
        px, py, pt = x - np.float32(a[0]), y - np.float32(a[1]), t - np.float32(a[2])
        u = (px * ab[0] + py * ab[1] + pt * ab[2]) * inv_l2
        np.clip(u, 0, 1, out=u)
        dx, dy, dt = px - u * ab[0], py - u * ab[1], pt - u * ab[2]
        r = np.float32(ra) + u * np.float32(rb - ra)
        val = (dx * dx + dy * dy + dt * dt) / (r * r)
        view = best[local]
        np.minimum(view, val, out=view)
    return sl, np.sqrt(best)


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable linear interpolation of a small (gx, gy, gz) grid to ``shape`` (float32)."""

    def weights(n: int, m: int) -> np.ndarray:
        pos = np.linspace(0, m - 1, n)
        i0 = np.clip(np.floor(pos).astype(int), 0, m - 2)
        w = (pos - i0).astype(np.float32)
        W = np.zeros((n, m), dtype=np.float32)
        W[np.arange(n), i0] = 1 - w
        W[np.arange(n), i0 + 1] += w
        return W

    X, Y, Z = shape
    gx, gy, gz = coarse.shape
    # plain 2D matrix products (numpy's broadcasting matmul is much slower)
    c = coarse.astype(np.float32).reshape(gx * gy, gz) @ weights(Z, gz).T  # (gx*gy, Z)
    c = c.reshape(gx, gy, Z).transpose(1, 0, 2).reshape(gy, gx * Z)
    c = (weights(Y, gy) @ c).reshape(Y, gx, Z).transpose(1, 0, 2)  # (gx, Y, Z)
    return (weights(X, gx) @ np.ascontiguousarray(c).reshape(gx, Y * Z)).reshape(X, Y, Z)


# --------------------------------------------------------------------------------------
# The case
# --------------------------------------------------------------------------------------
def _draw_spacing(rng: np.random.Generator) -> tuple[float, float, float]:
    """Voxel size of a case: 0.6-0.9 mm in plane, 2.5-5 mm slices (often a round value)."""
    sxy = float(np.round(rng.uniform(0.6, 0.9), 4))
    if rng.random() < 0.6:
        sz = float(rng.choice([2.5, 3.0, 4.0, 5.0]))
    else:
        sz = float(np.round(rng.uniform(2.5, 5.0), 4))
    return (sxy, sxy, sz)


def _validate(size_xy, n_slices, spacing) -> None:
    if isinstance(size_xy, bool) or not isinstance(size_xy, (int, np.integer)) or size_xy < 32:
        raise UserError(f"size_xy must be an integer >= 32, got {size_xy!r}")
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 8:
        raise UserError(f"n_slices must be an integer >= 8, got {n_slices!r}")
    if spacing is not None:
        try:
            sp = tuple(float(v) for v in spacing)
        except (TypeError, ValueError):
            sp = ()
        if len(sp) != 3 or not all(np.isfinite(v) and v > 0 for v in sp):
            raise UserError(f"spacing must be three positive numbers (mm), got {spacing!r}")


def make_case(
    seed: int,
    size_xy: int = 256,
    n_slices: int = 80,
    labelled: bool = True,
    spacing: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Make one synthetic abdominal CT.

    Args:
        seed: the case's seed; the same seed (and sizes) gives the same arrays, bit for bit.
        size_xy: voxels along x and y (>= 32).
        n_slices: voxels along z, i.e. axial slices (>= 8).
        labelled: True for a FLARE "labelled" case (field of view from the lung bases to
            below the kidneys, label volume returned); False for an "unlabelled" one (a
            longer, randomly placed field of view that may include the heart and the
            pelvis; label None).
        spacing: voxel size (x, y, z) in mm; drawn per case when None (0.6-0.9 mm in
            plane, 2.5-5 mm slices).

    Returns:
        (image, label, affine): image int16 HU of shape (size_xy, size_xy, n_slices) in
        RAS orientation (x towards the patient's right, y anterior, z superior); label
        uint8 of the same shape with FLARE ids 0..13 (all 13 present in a labelled case
        of the default size), or None when ``labelled`` is False; affine 4x4 float64 with
        the voxel sizes on the diagonal and the volume centred on the origin.

    Raises:
        UserError: a size or spacing out of range.
    """
    image, label, affine, _ = _make_case_full(seed, size_xy, n_slices, labelled, spacing)
    return image, label, affine


@dataclass
class _Body:
    """The body's nested layers over the whole grid (see :func:`_draw_body_wall`).

    ``rho`` is the normalised radius of the body outline (< 1 inside the body), to be
    compared with the per-voxel edge ``fat_edge`` (inner edge of the subcutaneous fat;
    the muscle wall's inner edge is ``fat_edge - muscle_width``); ``cavity`` is inside the
    muscle wall.
    """

    rho: np.ndarray
    fat_edge: np.ndarray
    cavity: np.ndarray
    half_width: float  #: half the body's width at mid level
    back_depth: float  #: from the body's centre to the back
    muscle_width: float  #: thickness of the muscle wall (in rho)


@dataclass
class _Diaphragm:
    """The two diaphragm domes (see :func:`_draw_diaphragm_and_lungs`)."""

    right_top: float  #: top of the right dome (the higher one)
    left_top: float  #: top of the left dome
    curvature: float

    def height(self, xx, yy):
        """z of the diaphragm above (x, y): two domes, flat in front, lower at the back."""
        ap = 0.8 * np.minimum((yy - 0.02) ** 2, 0.1)  # flat towards the front: no lung in front of the liver
        right = self.right_top - self.curvature * ((xx + 0.38) ** 2 + ap)
        left = self.left_top - self.curvature * ((xx - 0.4) ** 2 + ap)
        return np.maximum(right, left) + 0.3 * np.minimum(yy + 0.05, 0)  # lower at the back


class _Spine(NamedTuple):
    """Where the spine lies (y in anatomy units); organs around it are placed from it."""

    y: float  #: centre of the vertebral bodies
    canal_y: float  #: centre of the spinal canal


class _Aorta(NamedTuple):
    """The abdominal aorta's axis, radius and bifurcation (anatomy units)."""

    x: float
    y: float
    radius: float
    bifurcation: float  #: z of the aortic bifurcation


@dataclass
class _Case:
    """What the structures of one case are drawn with and painted on.

    ``rng`` gives every random draw of the case (the structures take theirs in a fixed
    order); ``body`` and ``diaphragm`` are set by the first structures and shared by
    the later ones.
    """

    rng: np.random.Generator
    grid: _Grid
    canvas: _Canvas
    min_r: float  #: smallest radius of thin structures (vessels, adrenals): a few voxels wide
    t_lo: float  #: 0.2 units below the lowest slice (long vessels run past the field of view)
    t_hi: float  #: 0.2 units above the highest slice
    body: _Body = field(init=False)  # set by _draw_body_wall
    diaphragm: _Diaphragm = field(init=False)  # set by _draw_diaphragm_and_lungs

    def jitter(self, s: float = 0.03, n: int = 3) -> np.ndarray:
        """``n`` Gaussian offsets of standard deviation ``s`` (a position's or an angle's jitter)."""
        return self.rng.normal(0.0, s, n)

    def bumps(self, s: float = 0.07) -> np.ndarray:
        """The 9 surface-bump coefficients of a deformed ellipsoid (see :func:`_blob`)."""
        return self.rng.normal(0.0, s, 9)

    def cavity(self, sl) -> np.ndarray:
        """Inside the muscle wall, in the box ``sl``."""
        return self.body.cavity[sl]

    def abdomen(self, sl) -> np.ndarray:
        """Inside the abdominal cavity, below the diaphragm, in the box ``sl``."""
        xx, yy, tt = self.grid.coords(sl)
        return (tt < self.diaphragm.height(xx, yy) - 0.025) & self.body.cavity[sl]


def _make_case_full(seed: int, size_xy: int, n_slices: int, labelled: bool, spacing) -> tuple:
    """make_case, also returning the uint8 tissue map (ids of ``TISSUES``) the image was drawn from.

    Every random draw of a case comes from one generator in a fixed order: the voxel
    size, the field of view, each structure in the order :func:`_paint_anatomy` lists
    them, then the intensities. Changing that order (or a structure's own draws)
    changes every case: bump ``GENERATOR_VERSION`` then.
    """
    _validate(size_xy, n_slices, spacing)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))
    sp = _draw_spacing(rng) if spacing is None else tuple(float(v) for v in spacing)
    shape = (int(size_xy), int(size_xy), int(n_slices))
    canvas = _paint_anatomy(rng, sp, shape, labelled)  # the geometry's float volumes are freed on return
    image = _draw_intensities(rng, canvas.tissue)
    return _to_ras(image, canvas, sp, labelled)


def _paint_anatomy(
    rng: np.random.Generator, sp: tuple[float, float, float], shape: tuple[int, int, int], labelled: bool
) -> _Canvas:
    """Paint every structure of a case, in drawing order (later paint wins); returns the canvas.

    Args:
        rng: the case's generator, right after the voxel size was drawn.
        sp: voxel size (x, y, z) in mm.
        shape: (X, Y, Z) voxels.
        labelled: the field of view of a labelled case (True) or of an unlabelled one.
    """
    case = _start_case(rng, sp, shape, labelled)
    _draw_body_wall(case)
    _draw_rectus_abdominis(case)
    _draw_diaphragm_and_lungs(case)
    _draw_heart(case)
    _draw_colon(case)
    _draw_small_bowel(case)
    liver_centre = _draw_liver(case)
    _draw_liver_vessels(case, liver_centre)
    spleen_centre = _draw_spleen(case)
    stomach_path = _draw_stomach(case)
    _draw_gallbladder(case)
    spine = _draw_spine_position(case)
    _draw_kidneys(case, spine)
    _draw_adrenal_glands(case, spine)
    pancreas_path = _draw_pancreas(case)
    _draw_portal_veins(case, pancreas_path, spleen_centre, liver_centre)
    _draw_duodenum(case)
    aorta = _draw_aorta(case, spine)
    _draw_iliac_arteries(case, aorta)
    _draw_superior_mesenteric_artery(case, aorta)
    _draw_ivc(case, spine, aorta)
    _draw_esophagus(case, aorta, stomach_path)
    _draw_pelvis(case, spine)
    _draw_back_muscles(case, spine)
    _draw_vertebrae(case, spine)
    _draw_ribs(case, spine)
    return case.canvas


def _start_case(
    rng: np.random.Generator, sp: tuple[float, float, float], shape: tuple[int, int, int], labelled: bool
) -> _Case:
    """The field of view in anatomy units (grid, empty canvas, smallest radius).

    In plane the body fills the field of view; along z the anatomy is stretched so a
    labelled case spans 1.3-1.7 units (lung bases to below the kidneys) and an
    unlabelled one 1.9-2.6 units with a randomly placed top.
    """
    X, Y, Z = shape
    scale_xy = 0.5 * X * sp[0] * rng.uniform(0.97, 1.04)  # mm per unit
    physical_span = Z * sp[2] / scale_xy
    if labelled:
        span = float(np.clip(physical_span, 1.3, 1.7))
        t_top = rng.uniform(0.72, 0.88)
    else:
        span = float(np.clip(physical_span, 1.9, 2.6))
        t_top = rng.uniform(0.75, 1.3)
    scale_z = Z * sp[2] / span
    y_shift = rng.uniform(-0.05, 0.05)
    xu = (np.arange(X) - (X - 1) / 2) * sp[0] / scale_xy
    yu = (np.arange(Y) - (Y - 1) / 2) * sp[1] / scale_xy - y_shift
    tu = t_top - (Z - 1 - np.arange(Z)) * sp[2] / scale_z
    grid = _Grid(xu, yu, tu)
    return _Case(
        rng=rng,
        grid=grid,
        canvas=_Canvas(grid),
        min_r=1.6 * sp[0] / scale_xy,
        # from the float64 coordinates (the grid keeps float32 ones)
        t_lo=float(tu[0]) - 0.2,
        t_hi=float(tu[-1]) + 0.2,
    )


# ---- body wall ---------------------------------------------------------------------------
def _draw_body_wall(case: _Case) -> None:
    """Body outline, subcutaneous fat and the muscle wall (the first paint); sets ``case.body``."""
    rng, grid = case.rng, case.grid
    X, Y, Z = grid.shape
    x, y, t = grid.coords((slice(0, X), slice(0, Y), slice(0, Z)))
    a0 = rng.uniform(0.84, 0.94)
    b_ant0 = rng.uniform(0.58, 0.72)
    b_post0 = rng.uniform(0.62, 0.68)
    pelvis = np.clip((-0.6 - t) / 0.6, 0, 1)  # 0 above the pelvis, 1 deep in it
    chest = np.clip((t - 0.6) / 0.5, 0, 1)
    a = a0 * (1 + 0.07 * pelvis - 0.03 * chest) * (1 + 0.02 * np.sin(3.1 * t + rng.uniform(0, 6)))  # (1,1,Z)
    b = np.where(y > 0, b_ant0 * (1 - 0.08 * pelvis + 0.05 * chest), b_post0)  # (1,Y,Z)
    xa2 = (x / a) ** 2  # (X,1,Z)
    rho_body = np.sqrt(xa2 + (y / b) ** 2)  # (X,Y,Z) float32
    fat_w = rng.uniform(0.05, 0.15)
    musc_w = rng.uniform(0.04, 0.06)
    # subcutaneous fat a little thicker at the flanks, thinner in front
    fat_edge = (1 - fat_w) - np.float32(0.5 * fat_w) * xa2 + np.where(y > 0, np.float32(0.25 * fat_w), np.float32(0))
    in_body = rho_body < 1
    cavity = rho_body < fat_edge - musc_w
    wall = rho_body < fat_edge
    # the layers are nested: count how many of them a voxel is inside
    layer = in_body.view(np.uint8) + wall.view(np.uint8) + cavity.view(np.uint8)
    layer[in_body & (rho_body > 0.985)] = 2  # skin: a thin rim of soft tissue
    case.canvas.tissue = np.array([T["air"], T["fat"], T["muscle"], T["visceral_fat"]], dtype=np.uint8)[layer]
    case.body = _Body(rho_body, fat_edge, cavity, half_width=a0, back_depth=b_post0, muscle_width=musc_w)


def _draw_rectus_abdominis(case: _Case) -> None:
    """The anterior wall, thicker on both sides of the midline (taken out of the cavity)."""
    grid, body = case.grid, case.body
    rb = grid.box((-0.3, 0.2, -5), (0.3, 2, 5))
    if rb is None:
        return
    xx, yy, _ = grid.coords(rb)
    r_rho = body.rho[rb]
    rect = (np.abs(xx) < 0.22) & (r_rho < body.fat_edge[rb]) & (r_rho > body.fat_edge[rb] - body.muscle_width - 0.035)
    case.canvas.paint(rb, rect, T["muscle"])
    body.cavity[rb] &= ~rect


# ---- chest -------------------------------------------------------------------------------
def _chest_box(case: _Case):
    """Index box of the chest (from 1 unit below the right dome up); None when out of view."""
    return case.grid.box((-2, -2, case.diaphragm.right_top - 1.0), (2, 2, 9))


def _draw_diaphragm_and_lungs(case: _Case) -> None:
    """The diaphragm domes (sets ``case.diaphragm``), the lungs above them and the mediastinum."""
    rng, grid, cv = case.rng, case.grid, case.canvas
    dome_r_top = 0.70 + rng.uniform(-0.03, 0.06)
    dome_l_top = dome_r_top - rng.uniform(0.02, 0.07)
    k_dome = rng.uniform(1.1, 1.5)
    case.diaphragm = _Diaphragm(dome_r_top, dome_l_top, k_dome)
    tb = _chest_box(case)
    if tb is None:
        return
    xx, yy, tt = grid.coords(tb)
    dm = case.diaphragm.height(xx, yy)
    above = tt > dm
    cav = case.cavity(tb)
    mediastinum = (np.abs(xx - 0.03) < 0.08) & (yy > -0.35) & (yy < 0.1)
    cv.paint(tb, cav & above & ~mediastinum, T["lung"])
    cv.paint(tb, cav & above & mediastinum, T["visceral_fat"])
    cv.paint(tb, cav & ~above & (tt > dm - 0.025), T["muscle"])  # the diaphragm itself


def _draw_heart(case: _Case) -> None:
    """The heart on the central diaphragm: muscle around a blood pool (drawn only when the chest is in view)."""
    if _chest_box(case) is None:
        return
    grid, cv = case.grid, case.canvas
    top = case.diaphragm.right_top
    h_c = (0.12 + case.jitter(0.03, 1)[0], 0.2 + case.jitter(0.02, 1)[0], top + 0.12 + case.jitter(0.03, 1)[0])
    s_h, m_h, rho_h = _blob(grid, h_c, (0.34, 0.27, 0.36), _rot(rz=-0.5), case.bumps(0.05))
    if s_h is None:
        return
    xx, yy, tt = grid.coords(s_h)
    m_h = m_h & (tt > case.diaphragm.height(xx, yy)) & case.cavity(s_h)
    cv.paint(s_h, m_h, T["heart_muscle"])
    cv.paint(s_h, m_h & (rho_h < 0.78), T["blood_pool"])


# ---- bowel (not labelled) ----------------------------------------------------------------
#: control points of the colon, caecum to rectum (jittered per case)
_COLON_PATH = [
    [-0.50, 0.08, -0.75],  # caecum
    [-0.58, 0.0, -0.45],
    [-0.58, 0.02, -0.10],  # hepatic flexure
    [-0.40, 0.30, -0.05],
    [0.0, 0.44, -0.18],  # transverse colon sags
    [0.40, 0.30, 0.02],
    [0.62, 0.02, 0.15],  # splenic flexure
    [0.64, -0.06, -0.25],
    [0.58, 0.0, -0.65],  # descending colon
    [0.30, 0.08, -0.95],  # sigmoid
    [0.05, -0.12, -1.15],
    [0.0, -0.30, -1.6],  # rectum
]


def _draw_colon(case: _Case) -> None:
    """The colon: a wall around stool, with gas in its anterior part."""
    rng, grid, cv = case.rng, case.grid, case.canvas
    colon_pts = np.array(_COLON_PATH) + rng.normal(0, 0.03, (12, 3))
    s_c, d_c = _tube(grid, colon_pts, 0.085 * rng.uniform(0.85, 1.15))
    if s_c is None:
        return
    m = (d_c < 1) & case.cavity(s_c)
    cv.paint(s_c, m, T["bowel_wall"])
    lumen = m & (d_c < 0.8)
    cv.paint(s_c, lumen, T["stool"])
    _, yy, _ = grid.coords(s_c)
    cv.paint(s_c, lumen & (yy > 0.1 + rng.uniform(-0.05, 0.1)), T["gut_gas"])


def _draw_small_bowel(case: _Case) -> None:
    """Small bowel: meandering loops packed into the mid and lower abdomen, with fluid or gas."""
    rng, grid, cv = case.rng, case.grid, case.canvas
    for _ in range(int(rng.integers(12, 16))):
        start = np.array([rng.uniform(-0.45, 0.45), rng.uniform(-0.05, 0.45), rng.uniform(-1.0, 0.0)])
        pts = start + np.cumsum(rng.normal(0, 0.1, (12, 3)) * np.array([1.0, 0.7, 0.5]), axis=0)
        pts[:, 0] = np.clip(pts[:, 0], -0.55, 0.55)
        pts[:, 1] = np.clip(pts[:, 1], -0.1, 0.5)
        pts[:, 2] = np.minimum(pts[:, 2], 0.1)
        s_b, d_b = _tube(grid, pts, rng.uniform(0.05, 0.07), per_segment=3)
        if s_b is None:
            continue
        m = (d_b < 1) & case.abdomen(s_b)
        cv.paint(s_b, m, T["bowel_wall"])
        content = T["gut_gas"] if rng.random() < 0.1 else T["gut_fluid"]
        cv.paint(s_b, m & (d_b < 0.65), content)


# ---- upper abdominal organs --------------------------------------------------------------
def _draw_liver(case: _Case) -> np.ndarray:
    """The liver: right lobe, left lobe and the medial segments bridging them; returns the right lobe's centre."""
    rng, grid, cv = case.rng, case.grid, case.canvas
    liver_scale = rng.uniform(0.9, 1.1)
    c_right = np.array([-0.42, 0.0, 0.38]) + case.jitter(0.03)
    c_left = np.array([0.0, 0.26, 0.5]) + case.jitter(0.03)
    s1, m1, _ = _blob(
        grid, c_right, np.array([0.42, 0.54, 0.42]) * liver_scale, _rot(rz=0.35, ry=0.2), case.bumps(0.07)
    )
    s2, m2, _ = _blob(
        grid,
        c_left,
        np.array([0.4, 0.17, 0.17]) * liver_scale * rng.uniform(0.85, 1.15, 3),
        _rot(rz=-0.3, ry=-0.3),
        case.bumps(0.08),
    )
    c_mid = np.array([-0.15, 0.12, 0.38]) + case.jitter(0.03)  # medial segments bridging the lobes
    s3, m3, _ = _blob(grid, c_mid, np.array([0.26, 0.24, 0.26]) * liver_scale, _rot(rz=0.5), case.bumps(0.07))
    liver_tip = rng.uniform(-0.3, -0.12)  # lowest point of the right lobe
    for s_l, m_l in ((s1, m1), (s2, m2), (s3, m3)):
        if s_l is None:
            continue
        xx, _, tt = grid.coords(s_l)
        low_ok = tt > liver_tip + 0.5 * np.maximum(xx + 0.35, 0)  # the inferior edge rises medially
        cv.paint(s_l, m_l & case.abdomen(s_l) & low_ok, T["liver"], LABELS["liver"])
    return c_right


def _draw_liver_vessels(case: _Case, liver_centre: np.ndarray) -> None:
    """Intrahepatic vessels: a few branches of the portal and hepatic veins (labelled liver)."""
    rng, grid, cv = case.rng, case.grid, case.canvas
    for _ in range(6):
        p0 = liver_centre + np.array([0.2, 0.0, -0.05]) + case.jitter(0.03)
        d = rng.normal(0, 1, 3)
        d[0] = -abs(d[0])
        d /= np.linalg.norm(d)
        s_v, d_v = _tube(grid, np.stack([p0, p0 + 0.15 * d, p0 + 0.32 * d + case.jitter(0.04)]), [0.03, 0.02, 0.013])
        if s_v is not None:
            cv.paint(s_v, (d_v < 1) & (cv.label[s_v] == LABELS["liver"]), T["portal_vein"], LABELS["liver"])


def _draw_spleen(case: _Case) -> np.ndarray:
    """The spleen, left and posterior; returns its centre."""
    rng, grid = case.rng, case.grid
    c_sp = np.array([0.58, -0.22, 0.38]) + case.jitter(0.03)
    s_s, m_s, _ = _blob(
        grid,
        c_sp,
        np.array([0.12, 0.25, 0.24]) * rng.uniform(0.85, 1.2),
        _rot(rz=-0.6 + case.jitter(0.1, 1)[0]),
        case.bumps(0.07),
    )
    if s_s is not None:
        case.canvas.paint(s_s, m_s & case.abdomen(s_s), T["spleen"], LABELS["spleen"])
    return c_sp


def _draw_stomach(case: _Case) -> np.ndarray:
    """The stomach (J shape: fundus, body, antrum, pylorus) with fluid and a gas cap; returns its path."""
    rng, grid, cv = case.rng, case.grid, case.canvas
    st_pts = np.array(
        [[0.34, 0.0, 0.56], [0.38, 0.16, 0.36], [0.22, 0.32, 0.20], [0.0, 0.28, 0.15], [-0.08, 0.22, 0.15]]
    )
    st_pts += rng.normal(0, 0.025, st_pts.shape)
    s_st, d_st = _tube(grid, st_pts, np.array([0.15, 0.14, 0.11, 0.07, 0.05]) * rng.uniform(0.8, 1.2))
    if s_st is not None:
        m = (d_st < 1) & case.abdomen(s_st)
        cv.paint(s_st, m, T["gut_wall"], LABELS["stomach"])
        lumen = m & (d_st < 0.8)
        _, yy, _ = grid.coords(s_st)
        cv.paint(s_st, lumen, T["gut_fluid"], LABELS["stomach"])
        cv.paint(s_st, lumen & (yy > rng.uniform(0.05, 0.22)), T["gut_gas"], LABELS["stomach"])
    return st_pts


def _draw_gallbladder(case: _Case) -> None:
    """The gallbladder under the liver, filled with bile."""
    rng, grid = case.rng, case.grid
    c_gb = np.array([-0.30, 0.24, 0.06]) + case.jitter(0.03)
    s_g, m_g, _ = _blob(
        grid, c_gb, np.array([0.065, 0.075, 0.13]) * rng.uniform(0.8, 1.25), _rot(rx=-0.5, rz=0.3), case.bumps(0.05)
    )
    if s_g is not None:
        case.canvas.paint(s_g, m_g & case.cavity(s_g), T["bile"], LABELS["gallbladder"])


# ---- retroperitoneum ---------------------------------------------------------------------
def _draw_spine_position(case: _Case) -> _Spine:
    """Where the spine lies (drawn here: the kidneys, adrenals and vessels are placed from it)."""
    sp_y = -case.body.back_depth + 0.36 + case.jitter(0.015, 1)[0]  # vertebral body centre
    return _Spine(y=sp_y, canal_y=sp_y - 0.14)


def _draw_kidneys(case: _Case, spine: _Spine) -> None:
    """Both kidneys beside the spine: cortex, medulla and the renal sinus fat."""
    rng, grid, cv = case.rng, case.grid, case.canvas
    for side, lab in ((-1, LABELS["right_kidney"]), (1, LABELS["left_kidney"])):
        ck = np.array([0.33 * side, spine.y + 0.06, -0.10 if side < 0 else 0.0]) + case.jitter(0.025)
        rk = np.array([0.16, 0.11, 0.29]) * rng.uniform(0.85, 1.15)
        s_k, m_k, rho_k = _blob(
            grid, ck, rk, _rot(rz=side * (0.6 + case.jitter(0.1, 1)[0]), ry=-side * 0.15), case.bumps(0.04)
        )
        if s_k is None:
            continue
        m_k &= case.cavity(s_k)
        cv.paint(s_k, m_k, T["kidney_cortex"], lab)
        cv.paint(s_k, m_k & (rho_k < 0.72), T["kidney_medulla"], lab)
        # renal sinus fat opening towards the hilum (medial and anterior)
        x_k, y_k, _ = grid.coords(s_k)
        toward = ((x_k - ck[0]) * -side + (y_k - ck[1]) * 0.6) / rk[0]
        cv.paint(s_k, m_k & (rho_k < 0.55) & (toward > 0.1), T["renal_sinus"], 0)


def _draw_adrenal_glands(case: _Case, spine: _Spine) -> None:
    """Both adrenal glands: a thin inverted Y above each kidney."""
    grid, cv = case.grid, case.canvas
    for side, lab, top in ((-1, LABELS["right_adrenal_gland"], 0.30), (1, LABELS["left_adrenal_gland"], 0.32)):
        apex = np.array([0.19 * side, spine.y + 0.14, top]) + case.jitter(0.02)
        r = max(0.022, case.min_r)
        for limb in (
            apex + np.array([0.05 * side, -0.06, -0.12]) + case.jitter(0.015),
            apex + np.array([-0.01 * side, -0.09, -0.10]) + case.jitter(0.015),
        ):
            s_a, d_a = _tube(grid, np.stack([apex, limb]), [r, r * 0.8])
            if s_a is not None:
                cv.paint(s_a, (d_a < 1) & case.cavity(s_a), T["adrenal"], lab)


def _draw_pancreas(case: _Case) -> np.ndarray:
    """The pancreas from the head (in the duodenal C-loop) to the tail (at the spleen); returns its path."""
    rng = case.rng
    pa_pts = np.array(
        [[-0.17, 0.06, -0.02], [-0.02, 0.13, 0.05], [0.18, 0.08, 0.10], [0.40, -0.06, 0.18], [0.50, -0.12, 0.24]]
    )
    pa_pts += rng.normal(0, 0.02, pa_pts.shape)
    pa_r = np.maximum(np.array([0.075, 0.05, 0.05, 0.045, 0.035]) * rng.uniform(0.8, 1.2), case.min_r)
    s_p, d_p = _tube(case.grid, pa_pts, pa_r)
    if s_p is not None:
        case.canvas.paint(s_p, (d_p < 1) & case.cavity(s_p), T["pancreas"], LABELS["pancreas"])
    return pa_pts


def _draw_portal_veins(
    case: _Case, pancreas_path: np.ndarray, spleen_centre: np.ndarray, liver_centre: np.ndarray
) -> None:
    """Splenic, portal and superior mesenteric veins, meeting behind the pancreatic neck (no draws)."""
    conf = pancreas_path[1] + np.array([0.0, -0.07, 0.0])  # portal confluence behind the pancreatic neck
    veins = [
        (
            np.stack(
                [
                    spleen_centre + [-0.08, 0.04, -0.05],
                    pancreas_path[3] + [0, -0.06, 0],
                    pancreas_path[2] + [0, -0.06, 0],
                    conf,
                ]
            ),
            0.028,
        ),  # splenic
        (np.stack([conf, conf + [-0.1, -0.01, 0.1], liver_centre + [0.18, 0.02, -0.05]]), 0.035),  # portal
        (np.stack([conf, conf + [0.01, 0.04, -0.2], conf + [0.0, 0.06, -0.45]]), 0.028),  # superior mesenteric
    ]
    for pts, r in veins:
        s_v, d_v = _tube(case.grid, pts, max(r, case.min_r))
        if s_v is not None:
            case.canvas.paint(s_v, (d_v < 1) & case.cavity(s_v), T["portal_vein"], 0)


def _draw_duodenum(case: _Case) -> None:
    """The duodenum: a C-loop around the pancreatic head, with fluid or gas."""
    rng, cv = case.rng, case.canvas
    du_pts = np.array(
        [
            [-0.06, 0.22, 0.14],
            [-0.22, 0.16, 0.13],
            [-0.31, 0.03, 0.04],
            [-0.31, 0.01, -0.14],
            [-0.14, -0.02, -0.24],
            [0.08, -0.01, -0.22],
            [0.16, 0.05, -0.10],
        ]
    )
    du_pts += rng.normal(0, 0.02, du_pts.shape)
    s_d, d_d = _tube(case.grid, du_pts, 0.055 * rng.uniform(0.85, 1.15))
    if s_d is not None:
        m = (d_d < 1) & case.cavity(s_d)
        cv.paint(s_d, m, T["gut_wall"], LABELS["duodenum"])
        cv.paint(s_d, m & (d_d < 0.6), T["gut_gas"] if rng.random() < 0.15 else T["gut_fluid"], LABELS["duodenum"])


# ---- great vessels and esophagus ---------------------------------------------------------
def _draw_aorta(case: _Case, spine: _Spine) -> _Aorta:
    """The aorta, left-anterior of the spine, from above the field of view down to its bifurcation."""
    rng = case.rng
    ao_r = max(0.062 * rng.uniform(0.85, 1.2), case.min_r)
    ao_x = 0.05 + case.jitter(0.015, 1)[0]
    ao_y = spine.y + 0.085 + ao_r + 0.01
    bif = rng.uniform(-0.75, -0.55)  # aortic bifurcation
    zs = np.linspace(max(bif, case.t_lo), max(case.t_hi, bif + 0.1), 6)
    ao_pts = np.stack([ao_x + 0.015 * np.sin(2 * zs), ao_y + 0.03 * np.clip(zs - 0.4, 0, None), zs], axis=1)
    s_a, d_a = _tube(case.grid, ao_pts, ao_r)
    if s_a is not None:
        case.canvas.paint(s_a, d_a < 1, T["aorta"], LABELS["aorta"])
    return _Aorta(x=ao_x, y=ao_y, radius=ao_r, bifurcation=bif)


def _draw_iliac_arteries(case: _Case, aorta: _Aorta) -> None:
    """The common iliac arteries from the bifurcation (not labelled; no draws)."""
    ao_x, ao_y, bif = aorta.x, aorta.y, aorta.bifurcation
    for side in (-1, 1):
        il = np.array(
            [[ao_x, ao_y, bif + 0.02], [ao_x + 0.12 * side, ao_y, bif - 0.25], [0.3 * side, ao_y + 0.1, bif - 0.7]]
        )
        s_i, d_i = _tube(case.grid, il, aorta.radius * 0.7)
        if s_i is not None:
            case.canvas.paint(s_i, d_i < 1, T["aorta"], 0)


def _draw_superior_mesenteric_artery(case: _Case, aorta: _Aorta) -> None:
    """The SMA, leaving the aorta forwards and running down (not labelled; no draws)."""
    ao_x, ao_y = aorta.x, aorta.y
    sma = np.array(
        [
            [ao_x, ao_y + 0.04, 0.14],
            [ao_x + 0.01, ao_y + 0.15, 0.06],
            [ao_x + 0.03, ao_y + 0.2, -0.1],
            [ao_x + 0.04, ao_y + 0.22, -0.45],
        ]
    )
    s_m, d_m = _tube(case.grid, sma, max(0.022, case.min_r * 0.8))
    if s_m is not None:
        case.canvas.paint(s_m, (d_m < 1) & case.cavity(s_m), T["aorta"], 0)


def _draw_ivc(case: _Case, spine: _Spine, aorta: _Aorta) -> None:
    """The inferior vena cava, right of the aorta, from the bifurcation up to the right dome."""
    rng = case.rng
    bif = aorta.bifurcation
    ivc_r = max(0.06 * rng.uniform(0.85, 1.2), case.min_r)
    zs = np.linspace(max(bif - 0.05, case.t_lo), max(min(case.diaphragm.right_top + 0.05, case.t_hi), bif + 0.1), 6)
    up = np.clip(zs - 0.15, 0, None)
    ivc_pts = np.stack([-0.11 + case.jitter(0.015, 1)[0] - 0.08 * up, spine.y + 0.09 + ivc_r + 0.2 * up, zs], axis=1)
    s_v, d_v = _tube(case.grid, ivc_pts, ivc_r)
    if s_v is not None:
        case.canvas.paint(s_v, d_v < 1, T["ivc"], LABELS["inferior_vena_cava"])


def _draw_esophagus(case: _Case, aorta: _Aorta, stomach_path: np.ndarray) -> None:
    """The esophagus, in front of the aorta down into the cardia, with a little gas."""
    rng, grid, cv = case.rng, case.grid, case.canvas
    ao_y = aorta.y
    es_pts = np.array(
        [[0.02, ao_y + 0.1, max(case.t_hi, 0.95)], [0.04, ao_y + 0.12, 0.72], [0.12, ao_y + 0.17, 0.6], [0.0, 0.0, 0.0]]
    )
    es_pts[1:3] += rng.normal(0, 0.015, (2, 3))
    es_pts[3] = stomach_path[0] + np.array([-0.12, 0.02, -0.02])  # into the cardia
    s_e, d_e = _tube(grid, es_pts, max(0.045, case.min_r))
    if s_e is not None:
        _, _, tt = grid.coords(s_e)
        m = (d_e < 1) & (tt > stomach_path[0, 2] - 0.06)
        cv.paint(s_e, m, T["esophagus"], LABELS["esophagus"])
        cv.paint(s_e, m & (d_e < 0.35), T["gut_gas"], LABELS["esophagus"])


# ---- pelvis, back, spine, ribs -----------------------------------------------------------
def _draw_pelvis(case: _Case, spine: _Spine) -> None:
    """Iliac wings, femoral heads and the bladder (no draws)."""
    grid, cv = case.grid, case.canvas
    pb = grid.box((-2, -2, -9), (2, 2, -0.7))
    if pb is None:
        return
    xx, yy, tt = grid.coords(pb)
    for side in (-1, 1):
        # iliac wing: a curved plate from the sacroiliac joint outwards and forwards,
        # concave in front, flaring wider towards the crest
        depth = np.clip((-0.72 - tt) / 0.5, 0, 1)  # 0 at the crest, 1 at the acetabulum roof
        r_w = 0.42 - 0.1 * depth
        cy_ = spine.y + 0.36
        dist = np.sqrt((xx - 0.14 * side) ** 2 + (yy - cy_) ** 2)
        wing = (np.abs(dist - r_w) < 0.022 + 0.02 * depth) & (yy < cy_) & (xx * side > 0.13)
        wing &= (tt < -0.72) & (tt > -1.45)
        cv.paint(pb, wing, T["bone_cortex"])
        cv.paint(pb, wing & (np.abs(dist - r_w) < 0.01 + 0.02 * depth), T["bone_marrow"])
        fem = np.sqrt((xx - 0.42 * side) ** 2 + (yy - 0.02) ** 2 + (tt + 1.75) ** 2)
        cv.paint(pb, fem < 0.12, T["bone_cortex"])
        cv.paint(pb, fem < 0.1, T["bone_marrow"])
    bl = np.sqrt((xx / 0.2) ** 2 + ((yy - 0.22) / 0.15) ** 2 + ((tt + 1.5) / 0.16) ** 2)
    cv.paint(pb, (bl < 1) & case.cavity(pb), T["urine"])


def _spine_box(case: _Case, spine: _Spine):
    """Index box around the spine and the back muscles; None when out of view."""
    return case.grid.box((-0.5, -2, -9), (0.5, spine.y + 0.2, 9))


def _draw_back_muscles(case: _Case, spine: _Spine) -> None:
    """Paraspinal muscles and the psoas muscles, widening downwards (no draws)."""
    sb = _spine_box(case, spine)
    if sb is None:
        return
    xx, yy, tt = case.grid.coords(sb)
    r_rho, f_edge = case.body.rho[sb], case.body.fat_edge[sb]
    for side in (-1, 1):
        para = ((xx - 0.16 * side) / 0.13) ** 2 + ((yy - spine.canal_y + 0.03) / 0.12) ** 2 < 1
        case.canvas.paint(sb, para & (r_rho < f_edge), T["muscle"])
        psoas_r = 0.015 + 0.065 * np.clip((0.15 - tt) / 0.8, 0, 1)
        psoas = ((xx - (0.1 + psoas_r) * side) / 1.1) ** 2 + ((yy - spine.y - 0.01) / 0.85) ** 2 < psoas_r**2
        case.canvas.paint(sb, psoas & (tt < 0.15) & case.cavity(sb), T["muscle"])


def _draw_vertebrae(case: _Case, spine: _Spine) -> None:
    """Vertebral bodies and discs, the canal and the posterior elements (drawn only when the spine is in view)."""
    sb = _spine_box(case, spine)
    if sb is None:
        return
    rng, cv = case.rng, case.canvas
    sp_y, canal_y = spine.y, spine.canal_y
    xx, yy, tt = case.grid.coords(sb)
    pitch = rng.uniform(0.17, 0.21)  # one vertebra and its disc
    phase = ((tt - rng.uniform(0, 1)) / pitch) % 1.0  # (1, 1, z)
    disc = phase < 0.18
    vb = np.sqrt((xx / 0.11) ** 2 + ((yy - sp_y) / 0.085) ** 2)
    cv.paint(sb, (vb < 1) & disc, T["disc"])
    cv.paint(sb, (vb < 1) & ~disc, T["bone_cortex"])
    cv.paint(sb, (vb < 0.8) & ~disc, T["bone_marrow"])
    canal = np.sqrt(xx**2 + (yy - canal_y) ** 2)
    post = (phase > 0.25) & (phase < 0.85)
    arch = (canal < 0.075) & (canal > 0.045) & (yy < canal_y + 0.02) & post
    pedicle = (np.abs(np.abs(xx) - 0.055) < 0.02) & (yy > canal_y) & (yy < sp_y) & post
    spinous = (np.abs(xx) < 0.018) & (yy < canal_y) & (yy > canal_y - 0.15) & post
    tp_y = canal_y + 0.02 - 0.25 * (np.abs(xx) - 0.06)  # transverse processes point back and out
    transverse = (np.abs(yy - tp_y) < 0.016) & (np.abs(xx) < 0.19) & (tt < 0.3) & (phase > 0.45) & (phase < 0.62)
    cv.paint(sb, arch | pedicle | spinous | transverse, T["bone_cortex"])
    cv.paint(sb, canal < 0.045, T["csf"])


def _draw_ribs(case: _Case, spine: _Spine) -> None:
    """Ribs (oblique, descending anteriorly) in the chest wall, and the costal cartilage."""
    grid, cv, body = case.grid, case.canvas, case.body
    rib_low = case.rng.uniform(-0.1, 0.05)
    rbox = grid.box((-2, -2, rib_low - 0.1), (2, 2, 9))
    if rbox is None:
        return
    # work on the voxels of the chest-wall band only (a few % of the box)
    off_box = np.abs(body.rho[rbox] - (body.fat_edge[rbox] - np.float32(0.5 * body.muscle_width)))
    ix, iy, iz = np.nonzero(off_box < 0.026)
    off = off_box[ix, iy, iz]
    xx, yy, tt = grid.xu[rbox[0]][ix], grid.yu[rbox[1]][iy], grid.tu[rbox[2]][iz]
    r_rho = np.maximum(body.rho[rbox][ix, iy, iz], np.float32(1e-3))
    ny = np.clip(yy / np.float32(body.back_depth) / r_rho, -1, 1)
    nx = np.abs(xx) / np.float32(body.half_width) / r_rho
    h = tt + np.float32(0.15) * (ny + 1)  # the rib's height where it leaves the spine
    rib = ((h / np.float32(0.15)) % 1.0 < 0.27) & (h > rib_low)
    rib &= ~((nx < 0.3) & (ny > 0))  # the sternal gap
    rib &= (ny < -0.3 + 3.0 * (h - rib_low)) | (h > rib_low + 0.4)  # low ribs end at the flank
    rib &= ~((np.abs(xx) < 0.22) & (yy < spine.y))  # next to the spine: back muscles
    cart = rib & (ny > 0.4)
    tis_box, lab_box = cv.tissue[rbox], cv.label[rbox]
    for sel, tissue in (
        (rib & ~cart, T["bone_cortex"]),
        (rib & ~cart & (off < 0.012), T["bone_marrow"]),
        (cart, T["cartilage"]),
    ):
        tis_box[ix[sel], iy[sel], iz[sel]] = tissue
        lab_box[ix[sel], iy[sel], iz[sel]] = 0


# ---- image -------------------------------------------------------------------------------
def _draw_intensities(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """The int16 HU image of a tissue map.

    Each tissue's HU is its base value (jittered per case; contrast-enhanced tissues
    scaled by one per-case enhancement) plus smooth low-frequency and fine textures
    scaled per tissue; then a light in-plane blur (partial volume) and Gaussian scanner
    noise of a per-case level.
    """
    X, Y, Z = tissue.shape
    n_t = len(_TISSUES)
    base = np.array([v[1] for v in _TISSUES], dtype=np.float32)
    base += rng.normal(0, 1, n_t).astype(np.float32) * np.array([v[2] for v in _TISSUES], dtype=np.float32)
    enhance = rng.uniform(0.8, 1.2)  # contrast timing varies per case
    for name in ("kidney_cortex", "kidney_medulla", "aorta", "ivc", "portal_vein", "blood_pool"):
        base[T[name]] = 40 + (base[T[name]] - 40) * enhance
    amp1 = np.array([v[3] for v in _TISSUES], dtype=np.float32)
    amp2 = np.array([v[4] for v in _TISSUES], dtype=np.float32)
    low = _upsample(rng.normal(0, 1, (10, 10, max(4, Z // 10))), (X, Y, Z))
    fine = _upsample(rng.normal(0, 1, (max(8, X // 6), max(8, Y // 6), max(4, Z // 2))), (X, Y, Z))
    hu = base[tissue]
    low *= amp1[tissue]
    hu += low
    fine *= amp2[tissue]
    hu += fine
    del low, fine
    _blur_in_plane(hu)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(10.0, 20.0))
    hu += noise
    np.clip(hu, -1024, 3071, out=hu)
    return np.rint(hu).astype(np.int16)


def _blur_in_plane(hu: np.ndarray) -> None:
    """Partial volume: a light [0.15 0.7 0.15] blur along x, then y, in place (the border voxels stay)."""
    for axis in (0, 1):
        lo_, mid, hi_ = ([slice(None)] * 3 for _ in range(3))
        lo_[axis], mid[axis], hi_[axis] = slice(0, -2), slice(1, -1), slice(2, None)
        side = hu[tuple(lo_)] + hu[tuple(hi_)]
        side *= np.float32(0.15)
        centre = hu[tuple(mid)]
        centre *= np.float32(0.7)
        centre += side
        del side


def _to_ras(image: np.ndarray, canvas: _Canvas, sp: tuple[float, float, float], labelled: bool) -> tuple:
    """(image, label or None, affine, tissue) in RAS+, the volume centred on the origin."""
    X, Y, Z = image.shape
    affine = np.diag([sp[0], sp[1], sp[2], 1.0])
    affine[:3, 3] = -0.5 * (np.array([X, Y, Z]) - 1) * np.array(sp)
    # the anatomy is modelled with the patient's right at low x; RAS+ puts the
    # patient's right at high x (world x grows towards the right), so mirror x once here
    image = np.ascontiguousarray(image[::-1])
    label = np.ascontiguousarray(canvas.label[::-1]) if labelled else None
    tissue = np.ascontiguousarray(canvas.tissue[::-1])
    return image, label, affine, tissue


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def _case_seed(seed: int, kind: int, index: int) -> int:
    """Independent seed of case ``index`` of a kind (0 labelled, 1 unlabelled)."""
    return int(np.random.SeedSequence(entropy=int(seed), spawn_key=(kind, index)).generate_state(1)[0])


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file in memory, bit-identical for identical input (gzip mtime 0)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(data.dtype)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_case(job: tuple) -> str:
    """Make and write one case (worker entry point). Returns the case id."""
    kind, case_id, case_seed, size_xy, n_slices, image_path, label_path = job
    image, label, affine = make_case(case_seed, size_xy=size_xy, n_slices=n_slices, labelled=(kind == 0))
    if label_path is not None:
        with atomic_write(label_path) as f:
            f.write(_nifti_bytes(label, affine))
    with atomic_write(image_path) as f:  # the image last: its presence marks the case done
        f.write(_nifti_bytes(image, affine))
    return case_id


def generate_dataset(
    output_dir,
    n_labelled: int = 12,
    n_unlabelled: int = 24,
    seed: int = 0,
    size_xy: int = 256,
    n_slices: int = 80,
    n_train: int | None = None,
    num_workers: int = 1,
) -> dict:
    """Write a FLARE-layout synthetic data set to ``output_dir``.

    Labelled cases are ``FLARE22_Tr_0001`` upwards with ``n_slices`` slices; unlabelled
    cases are ``Case_00001`` upwards with 30 % more slices (a longer field of view, like
    FLARE's unlabelled scans). Each file is written atomically, and a rerun skips the
    cases whose files are already there (a case is done when its image exists: it is
    written after its label). ``split.json`` puts the first ``n_train`` labelled cases in
    train and the rest in val.

    Args:
        output_dir: folder to write into (created).
        n_labelled: labelled cases (>= 0; with 0 no split.json is written, e.g. for a
            pretraining-only set).
        n_unlabelled: unlabelled cases (>= 0).
        seed: data-set seed; case i gets its own seed derived from it.
        size_xy: voxels along x and y.
        n_slices: slices of a labelled case.
        n_train: labelled cases in the train split; default about a third (at least 1,
            and at least one case left for val when there are two or more).
        num_workers: processes that make cases in parallel.

    Returns:
        {"labelled_dir", "unlabelled_dir", "split_path", "n_written", "n_skipped"}; the
        directories are the ``--data_dir`` of the two preprocessing scripts; split_path
        is None when n_labelled is 0.

    Raises:
        UserError: bad counts or sizes, an output folder that cannot be written, or one
            holding phantoms made with other settings.
    """
    n_train = _check_dataset_args(n_labelled, n_unlabelled, num_workers, size_xy, n_slices, n_train)
    out = Path(output_dir).expanduser()
    lab_dir, unl_dir = out / "labelled", out / "unlabelled"
    _make_output_dirs(out, (lab_dir / "images", lab_dir / "labels", unl_dir))
    settings = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size_xy": int(size_xy),
        "n_slices": int(n_slices),
    }
    manifest = out / "phantoms.json"
    _check_manifest(manifest, settings)

    n_slices_unl = int(round(1.3 * n_slices))
    jobs, skipped = _case_jobs(
        lab_dir, unl_dir, n_labelled, n_unlabelled, seed, int(size_xy), int(n_slices), n_slices_unl
    )

    # the manifest first: a killed run is then resumed with the same settings
    atomic_write_json(
        manifest,
        {
            **settings,
            "n_labelled": int(n_labelled),
            "n_unlabelled": int(n_unlabelled),
            "n_slices_unlabelled": n_slices_unl,
            "labels": LABEL_NAMES,
        },
    )
    if skipped:
        logger.info("%d cases already in %s, skipped", skipped, out)
    _run_jobs(jobs, num_workers, out)
    split_path = _write_split(out, n_labelled, n_train)
    return {
        "labelled_dir": str(lab_dir),
        "unlabelled_dir": str(unl_dir),
        "split_path": None if split_path is None else str(split_path),
        "n_written": len(jobs),
        "n_skipped": skipped,
    }


def _check_dataset_args(n_labelled, n_unlabelled, num_workers, size_xy, n_slices, n_train) -> int:
    """Check generate_dataset's counts and sizes; returns ``n_train`` (its default filled in).

    Raises:
        UserError: a count or size out of range, or an ``n_train`` that does not fit ``n_labelled``.
    """
    for name, v, lo in (
        ("n_labelled", n_labelled, 0),
        ("n_unlabelled", n_unlabelled, 0),
        ("num_workers", num_workers, 1),
    ):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise UserError(f"{name} must be an integer >= {lo}, got {v!r}")
    if n_labelled > 9999 or n_unlabelled > 99999:
        raise UserError(
            f"at most 9999 labelled and 99999 unlabelled cases (FLARE file names), got {n_labelled} and {n_unlabelled}"
        )
    _validate(size_xy, n_slices, None)
    if n_labelled + n_unlabelled == 0:
        raise UserError("n_labelled and n_unlabelled are both 0: nothing to make")
    if n_labelled == 0:
        if n_train not in (None, 0):
            raise UserError(f"n_train={n_train!r} needs labelled cases, but n_labelled is 0")
        n_train = 0
    elif n_train is None:
        n_train = max(1, round(n_labelled / 3))
        if n_labelled >= 2:
            n_train = min(n_train, n_labelled - 1)
    if n_labelled and (not isinstance(n_train, (int, np.integer)) or not 1 <= n_train <= n_labelled):
        raise UserError(f"n_train must be between 1 and n_labelled={n_labelled}, got {n_train!r}")
    return n_train


def _make_output_dirs(out: Path, dirs) -> None:
    """Create the output folders.

    Raises:
        UserError: a folder cannot be created, or ``out`` is not writable.
    """
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {str(out)!r}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"output folder {str(out)!r} is not writable")


def _check_manifest(manifest: Path, settings: dict) -> None:
    """Refuse an output folder whose ``phantoms.json`` records other settings.

    Raises:
        UserError: the manifest cannot be read or records other settings.
    """
    if not manifest.exists():
        return
    try:
        old = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {manifest}: {e}") from None
    old_settings = {k: old.get(k) for k in settings}
    if old_settings != settings:
        raise UserError(
            f"{manifest} records phantoms made with {old_settings}, not {settings}; use another --output_dir"
        )


def _case_jobs(
    lab_dir: Path,
    unl_dir: Path,
    n_labelled: int,
    n_unlabelled: int,
    seed: int,
    size_xy: int,
    n_slices: int,
    n_slices_unl: int,
) -> tuple[list[tuple], int]:
    """The :func:`_write_case` jobs of the cases not written yet, and how many were skipped."""
    jobs, skipped = [], 0
    for i in range(1, n_labelled + 1):
        cid = f"FLARE22_Tr_{i:04d}"
        ip, lp = lab_dir / "images" / f"{cid}_0000.nii.gz", lab_dir / "labels" / f"{cid}.nii.gz"
        if ip.exists() and lp.exists():
            skipped += 1
            continue
        jobs.append((0, cid, _case_seed(seed, 0, i), size_xy, n_slices, str(ip), str(lp)))
    for i in range(1, n_unlabelled + 1):
        cid = f"Case_{i:05d}"
        ip = unl_dir / f"{cid}_0000.nii.gz"
        if ip.exists():
            skipped += 1
            continue
        jobs.append((1, cid, _case_seed(seed, 1, i), size_xy, n_slices_unl, str(ip), None))
    return jobs, skipped


def _run_jobs(jobs: list[tuple], num_workers: int, out: Path) -> None:
    """Make and write the cases of ``jobs`` (see :func:`_write_case`), in worker processes when asked."""
    if not jobs:
        return
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="phantoms", unit="case")
    if num_workers == 1 or len(jobs) == 1:
        for job in jobs:
            _write_case(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=min(num_workers, len(jobs))) as pool:
            for _ in pool.map(_write_case, jobs):
                bar.update()
    bar.close()
    logger.info("wrote %d cases to %s in %.1f s", len(jobs), out, time.perf_counter() - t0)


def _write_split(out: Path, n_labelled: int, n_train: int) -> Path | None:
    """Write ``split.json`` (the first ``n_train`` labelled cases in train); None without labelled cases."""
    if not n_labelled:
        logger.info("no labelled cases, so no split.json")
        return None
    ids = [f"FLARE22_Tr_{i:04d}" for i in range(1, n_labelled + 1)]
    split = {"train": ids[:n_train], "val": ids[n_train:]}
    if not split["val"]:
        logger.warning("split.json has no validation cases (n_train == n_labelled == %d)", n_labelled)
    split_path = out / "split.json"
    atomic_write_json(split_path, split)
    return split_path


# --------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------
def render_preview(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, path, title: str = "") -> None:
    """Draw axial slices at four levels and a coronal slice, with and without labels.

    Radiological convention: the patient's right on the image's left, anterior up.

    Args:
        image: (X, Y, Z) HU volume in RAS.
        label: (X, Y, Z) FLARE labels or None.
        affine: the volume's affine (for the voxel aspect ratio).
        path: PNG to write (atomically).
        title: figure title.
    """
    # the backend is chosen here, at drawing time, and pyplot imported after it: choosing it when
    # this module is imported would impose Agg on every program that imports it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sp = np.abs(np.diag(affine)[:3])
    X, Y, Z = image.shape
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:14].copy()
    colors[0, 3] = 0.0
    cmap = ListedColormap(colors)
    levels = [int(Z * f) for f in (0.85, 0.65, 0.5, 0.3)]
    # rows: anterior up; columns: x reversed, so the patient's right (high x in RAS) is on the left
    views = [
        (f"axial z={z}", image[::-1, :, z].T[::-1], None if label is None else label[::-1, :, z].T[::-1], 1.0)
        for z in levels
    ]
    yc = Y // 2 - int(0.1 * Y) if label is None else int(np.median(np.nonzero(label)[1]))
    views.append(
        ("coronal", image[::-1, yc, :].T[::-1], None if label is None else label[::-1, yc, :].T[::-1], sp[2] / sp[0])
    )
    rows = 2 if label is not None else 1
    fig, axes = plt.subplots(rows, len(views), figsize=(3.2 * len(views), 3.4 * rows), squeeze=False)
    for j, (name, img, lab, aspect) in enumerate(views):
        for i in range(rows):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=-160, vmax=240, aspect=aspect, interpolation="nearest")
            if i == 1 and lab is not None:
                ax.imshow(
                    np.ma.masked_equal(lab, 0),
                    cmap=cmap,
                    vmin=0,
                    vmax=13,
                    alpha=0.45,
                    aspect=aspect,
                    interpolation="nearest",
                )
            ax.set_title(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "make_phantoms", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_dir",
        required=True,
        type=str,
        help="folder for labelled/, unlabelled/ and split.json (created); rerunning into it skips finished cases",
    )
    g.add_argument(
        "--preview",
        type=str,
        default=None,
        help="also draw axial and coronal slices of the first labelled case with its labels to this PNG",
    )
    g = p.add_argument_group("data set size")
    g.add_argument(
        "--n_labelled",
        type=int,
        default=12,
        help="labelled cases FLARE22_Tr_0001...; FLARE 2022 has 50; 0 for a pretraining-only set (no split.json)",
    )
    g.add_argument("--n_unlabelled", type=int, default=24, help="unlabelled cases Case_00001...; FLARE 2022 has 2,000")
    g.add_argument(
        "--n_train",
        type=int,
        default=None,
        help="labelled cases in the train split (the rest go to val); default: a third, at least 1",
    )
    g = p.add_argument_group("volume size")
    g.add_argument("--size_xy", type=int, default=256, help="voxels along x and y (FLARE: 512); smaller is faster")
    g.add_argument(
        "--n_slices",
        type=int,
        default=80,
        help="slices of a labelled case; unlabelled cases get 30%% more (longer field of view)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="data-set seed; the same seed and sizes give identical files")
    g.add_argument(
        "--num_workers", type=int, default=2, help="processes making cases in parallel (at most the CPU cores)"
    )
    return p


def main(args: argparse.Namespace) -> dict:
    """Generate the data set (and the preview) from parsed arguments; returns generate_dataset's dict."""
    if args.preview is not None and not args.preview.lower().endswith(".png"):
        raise UserError(f"--preview must name a .png file, got {args.preview!r}")
    if args.preview is not None and args.n_labelled == 0:
        raise UserError("--preview draws the first labelled case, but --n_labelled is 0")
    prepare_output_dir(args.output_dir, "--output_dir")  # checked before hours of generation, not after
    if args.preview is not None:
        prepare_output_file(args.preview, "--preview")
    result = generate_dataset(
        args.output_dir,
        n_labelled=args.n_labelled,
        n_unlabelled=args.n_unlabelled,
        seed=args.seed,
        size_xy=args.size_xy,
        n_slices=args.n_slices,
        n_train=args.n_train,
        num_workers=args.num_workers,
    )
    if args.preview is not None:
        cid = "FLARE22_Tr_0001"
        img = nib.load(os.path.join(result["labelled_dir"], "images", f"{cid}_0000.nii.gz"))
        lab = nib.load(os.path.join(result["labelled_dir"], "labels", f"{cid}.nii.gz"))
        render_preview(
            np.asarray(img.dataobj),
            np.asarray(lab.dataobj),
            img.affine,
            Path(args.preview).expanduser(),
            title=f"{cid} (seed {args.seed}), spacing {tuple(round(float(v), 2) for v in img.header.get_zooms())} mm",
        )
        logger.info("preview written to %s", args.preview)
    print(
        f"labelled:   {result['labelled_dir']}\nunlabelled: {result['unlabelled_dir']}\nsplit:      {result['split_path'] or '(none: no labelled cases)'}"
    )
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
