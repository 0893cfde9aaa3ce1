"""Scores of the fine-tuning evaluation, and the prediction figure.

Two scores, never to be confused:

``dice_paper`` (:class:`PaperDice`)
    What the paper reported; not the FLARE challenge metric. Per 2D slice (per
    item of a batch) MONAI's ``DiceMetric(include_background=True,
    ignore_empty=True)`` on one-hot prediction and label, averaged over the
    channels present in the label (background included), then averaged over
    all validation slices. Slices with little anatomy weigh as much as slices
    full of organs, a false positive of an organ the slice does not contain
    costs nothing (that channel is NaN and skipped), and the background
    channel, almost always close to 1, lifts every slice. Use it to reproduce
    the paper's table (0.853 for IoU [0.3, 0.6]), nothing else.

Challenge-grade scores (:func:`organ_scores`)
    Per case volume and per organ 1..13 (background excluded): volumetric Dice
    and normalized surface Dice (NSD), equal to those of the official FLARE 2022
    evaluation script (``FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py`` with
    ``SurfaceDice.py`` in github.com/JunMa11/FLARE): surfel-area NSD, its per-organ
    tolerances, its slice range for aorta / IVC / esophagus, its empty-organ and
    low-Dice rules; then the mean over organs per case and over cases. See
    :func:`organ_scores` for the exact conventions. They are computed once, at the
    end of a fine-tuning (``dice_paper`` is the per-epoch score).

Typical use from a training script::

    from metrics import PaperDice, organ_scores, summarize_case_scores, write_scores, format_summary
    paper = PaperDice()
    paper.update(pred_ids, label_ids, n_classes=14)       # [B, H, W] class ids per batch
    per_case = {case: organ_scores(pred_vol, label_vol, spacing=(1.0, 1.0, 2.5))}
    summary = summarize_case_scores(per_case)
    write_scores(per_case, run_dir, prefix="val")          # val_scores.csv + val_scores.json
    logger.info("dice_paper %.4f\\n%s", paper.mean(), format_summary(summary))

Check the scores of a saved prediction against its label from the shell::

    python metrics.py --pred pred/FLARE22_Tr_0001.nii.gz --label labels/FLARE22_Tr_0001.nii.gz
    python metrics.py --pred_dir preds/ --label_dir labels/ --out_dir results/   # every case, CSV + JSON

With ``--pred_dir`` every case of ``--label_dir`` is scored: a case without a prediction is an
error naming it, or with ``--missing_as_zero`` it scores 0 for every organ, as the FLARE
challenges score a missing submission.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import os
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from monai.metrics.utils import _get_neighbour_code_to_normals_table as _monai_normals_table  # private: MONAI pinned
from monai.metrics.utils import get_code_to_measure_table
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

import data
from data import FLARE_LABELS, LABEL_NAMES, LabelSet, load_nifti
from utils import (
    UserError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_outputs_apart,
    claim_outputs,
    prepare_output_dir,
    run_cli,
)

logger = logging.getLogger(__name__)

#: NSD tolerance in mm per FLARE organ id, as in the official FLARE 2022
#: evaluation script (chosen there per organ from inter-rater variability).
#: FLARE 2021 used 1 mm for every organ; pass ``tolerance_mm=1.0`` for that.
FLARE22_TOLERANCE_MM: Mapping[int, float] = MappingProxyType(
    {1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0, 8: 2.0, 9: 2.0, 10: 3.0, 11: 5.0, 12: 7.0, 13: 3.0}
)

#: Organs FLARE 2022 scores only on the slices where the label has them
#: (aorta, inferior vena cava, esophagus: long tubes annotated over a partial range).
FLARE22_Z_RESTRICTED: frozenset[int] = frozenset({5, 6, 10})

#: The official script sets NSD to 0 without computing it when the organ's Dice is below this.
FLARE22_NSD_MIN_DICE = 0.2


def number_or_json(text: str) -> float | str:
    """``type=`` of the tolerance flags: a number becomes a float (so the command line's check of
    non-finite numbers refuses ``nan`` / ``inf`` before anything runs), anything else stays text
    for :func:`parse_tolerance_mm` (a JSON object, or a file holding one)."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_tolerance_mm(value: str | float | None, flag: str = "--nsd_tolerance_mm") -> float | dict[int, float] | None:
    """An NSD tolerance flag: ``None``, one number of mm (``"2"``), or a JSON object of label
    id -> mm (``'{"1": 5, "2": 3}'``, or the path of a ``.json`` file holding one).

    Raises:
        UserError: not a number or such an object, an id that is not an integer, or a
            tolerance that is negative, NaN or infinite (``flag`` named).
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        obj: object = float(value)
    else:
        text = str(value).strip()
        try:
            obj = float(text)
        except ValueError:
            if text.endswith(".json") and os.path.isfile(text):
                try:
                    with open(text) as f:
                        text = f.read()
                except OSError as e:
                    raise UserError(f"{flag} {value}: cannot read it ({e.strerror or e})") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(
                    f"{flag} {value!r} is neither a number of mm nor a JSON object of label id -> mm "
                    '(e.g. \'{"1": 5, "2": 3}\')'
                ) from None
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        tol: float | dict[int, float] = float(obj)
        values = [tol]
    elif isinstance(obj, dict) and obj:
        tol = {}
        for k, v in obj.items():
            try:
                i = int(k)
            except (TypeError, ValueError):
                raise UserError(f"{flag}: key {k!r} is not a label id") from None
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise UserError(f"{flag}: the tolerance of label id {i} is {v!r}, not a number of mm")
            tol[i] = float(v)
        values = list(tol.values())
    else:
        raise UserError(f"{flag} {value!r} is neither a number of mm nor a JSON object of label id -> mm")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"{flag} {value}: NSD tolerances must be finite, non-negative numbers of mm")
    return tol


@dataclasses.dataclass(frozen=True)
class ScoringRules:
    """How the challenge-grade scores of a label set are computed (:func:`scoring_rules`).

    Attributes:
        labels: the label set (names in score files, tables and figures).
        tolerance_mm: NSD tolerance, one number or per label id.
        z_axis: the slice axis of FLARE 2022's slice-range rule for aorta, IVC and esophagus
            (-1), or None (any other label set: every class on the whole volume).
        tolerance_source: where the tolerance comes from, for the record.
    """

    labels: LabelSet
    tolerance_mm: float | Mapping[int, float]
    z_axis: int | None
    tolerance_source: str

    def tolerance_of(self, i: int) -> float:
        t = self.tolerance_mm
        return float(t[i] if isinstance(t, Mapping) else t)

    def record(self) -> dict:
        """What the score files record about their scoring: classes, tolerance per class, rules."""
        return {
            "labels": self.labels.to_json(),
            "label_source": self.labels.source,
            "nsd_tolerance_mm": {str(i): self.tolerance_of(i) for i in range(1, self.labels.n_classes)},
            "nsd_tolerance_source": self.tolerance_source,
            "slice_range_rule": sorted(FLARE22_Z_RESTRICTED) if self.z_axis is not None else [],
            "conventions": "FLARE 2022 (official evaluation)"
            if self.labels.is_flare and self.z_axis is not None
            else "FLARE 2022's Dice and surfel NSD, every class scored on the whole volume",
        }


def scoring_rules(
    labels: LabelSet = FLARE_LABELS,
    tolerance_mm: float | Mapping[int, float] | None = None,
    flag: str = "--nsd_tolerance_mm",
    z_restriction: bool = True,
) -> ScoringRules:
    """The scoring of a label set: FLARE 2022's 13 organs keep the official per-organ NSD
    tolerances (``tolerance_mm`` replaces them when given) and its slice-range rule; any other
    label set needs ``tolerance_mm`` (one value, or one per class id) and scores every class on
    the whole volume (the rule is FLARE's, for its organ ids).

    Raises:
        UserError: no tolerance for a label set that is not FLARE's, or a per-class mapping
            that misses a class or names an id outside the set (``flag`` named).
    """
    if tolerance_mm is None:
        if not labels.is_flare:
            raise UserError(
                f"the label set of {labels.source} ({labels.describe()}) is not FLARE 2022's: give the NSD "
                f"tolerance with {flag} (one number of mm, or a JSON object of label id -> mm)"
            )
        tolerance_mm, source = FLARE22_TOLERANCE_MM, "FLARE 2022 per-organ tolerances (official evaluation)"
    else:
        source = f"{flag} {json.dumps(tolerance_mm) if isinstance(tolerance_mm, Mapping) else f'{tolerance_mm:g}'}"
    if isinstance(tolerance_mm, Mapping):
        want = set(range(1, labels.n_classes))
        have = {int(k) for k in tolerance_mm}
        if have != want:
            miss, extra = sorted(want - have), sorted(have - want)
            what = f"has no tolerance for label ids {miss}" if miss else f"names label ids {extra} outside the set"
            raise UserError(f"{flag} {what} (classes: {labels.describe()})")
        tolerance_mm = {int(k): float(v) for k, v in tolerance_mm.items()}
    z_axis = -1 if (labels.is_flare and z_restriction) else None
    return ScoringRules(labels, tolerance_mm, z_axis, source)


def _label_names(label_names: Sequence[str] | None) -> Sequence[str]:
    """The organ names to use: ``label_names`` or, when None, ``data.LABEL_NAMES`` (the one source)."""
    if label_names is not None:
        return label_names
    return LABEL_NAMES


def _check_ids(arr: np.ndarray | torch.Tensor, what: str, n_classes: int) -> None:
    """Raise UserError when ``arr`` is not integer class ids in ``0..n_classes-1``."""
    if isinstance(arr, torch.Tensor):
        if arr.dtype.is_floating_point or arr.dtype.is_complex:
            raise UserError(f"{what} has dtype {arr.dtype}; pass integer class ids (argmax over channels)")
        if arr.numel() == 0:
            raise UserError(f"{what} is empty (shape {tuple(arr.shape)})")
        lo, hi = int(arr.min()), int(arr.max())
    else:
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            raise UserError(
                f"{what} has dtype {arr.dtype}; pass integer class ids (e.g. np.asarray(nii.dataobj), not get_fdata())"
            )
        if arr.size == 0:
            raise UserError(f"{what} is empty (shape {arr.shape})")
        lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > n_classes - 1:
        bad = lo if lo < 0 else hi
        raise UserError(f"{what} contains class id {bad}, outside 0..{n_classes - 1} (n_classes={n_classes})")


# ----------------------------------------------------------------------------------------------
# The paper's score
# ----------------------------------------------------------------------------------------------


def class_counts(
    pred: torch.Tensor, label: torch.Tensor, n_classes: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per item and class: voxels in both (intersection), in the label, in the prediction.

    Args:
        pred, label: class ids of shape ``[B, *spatial]`` on one device (ids in ``0..n_classes-1``,
            not checked here).
        method: "bincount" (fastest on the CPU), "scatter" (no host sync on CUDA, where
            bincount reads the maximum on the host) or "auto" (bincount on the CPU only).

    Returns:
        Three int64 tensors of shape ``[B, n_classes]`` on that device, read off the per-item
        confusion matrix (one counting pass, no one-hot tensor, no host sync).
    """
    b, k = pred.shape[0], int(n_classes)
    p = pred.reshape(b, -1).long()
    g = label.reshape(b, -1).long()
    idx = ((torch.arange(b, device=pred.device)[:, None] * k + g) * k + p).reshape(-1)
    n = b * k * k
    if method not in ("auto", "bincount", "scatter"):
        raise ValueError(f"method must be 'auto', 'bincount' or 'scatter', got {method!r}")
    if method == "bincount" or (method == "auto" and idx.device.type == "cpu"):
        conf = torch.bincount(idx, minlength=n)
    else:
        conf = torch.zeros(n, dtype=torch.int64, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    conf = conf.reshape(b, k, k)  # [item, label class, predicted class]
    return conf.diagonal(dim1=1, dim2=2), conf.sum(2), conf.sum(1)


def paper_dice_per_item(pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``dice_paper`` of each item of a batch: float64 tensor ``[B]`` on the inputs' device.

    Per class c present in the label, ``2 |P_c & G_c| / (|G_c| + |P_c|)`` computed in float32
    as MONAI's ``DiceMetric(include_background=True, ignore_empty=True)`` does (its sums
    of one-hot voxels are exact below 2^24 voxels per class and item, so the values are the
    same bit for bit there; above, within float32 rounding); classes absent from the label
    are left out; the item's value is the mean over the others (in float64, as
    ``torch.nanmean`` of MONAI's output). ``pred`` and ``label``: class ids ``[B, *spatial]``.
    """
    both, in_label, in_pred = class_counts(pred, label, n_classes)
    dice = (2.0 * both.float()) / (in_label.float() + in_pred.float())
    dice = torch.where(in_label > 0, dice, torch.full_like(dice, float("nan")))
    return torch.nanmean(dice.double(), dim=1)


class PaperDice:
    """Accumulates ``dice_paper``: what the paper reported; not the FLARE challenge metric.

    For every item of a batch (one 2D slice, or one volume with ``--spatial_dims 3``)
    MONAI ``DiceMetric(include_background=True, ignore_empty=True, reduction="none")``
    on the one-hot prediction and label: computed here by :func:`paper_dice_per_item`
    from per-class voxel counts, on the tensors' device (equal to MONAI's values, which
    the tests check; MONAI's loop over items and channels took 0.26 s per 512 x 512 slice
    on one CPU core). With ``ignore_empty=True`` a
    channel absent from the label is NaN whatever the prediction holds, so the
    item's value is the mean over the channels present in the label, background
    included. A slice whose label is all background therefore scores the Dice of
    its background channel alone: 1.0 when the prediction is all background too,
    less when it predicts organs there. (A label with no voxel at all cannot occur,
    so an item always has at least one channel.) :meth:`mean` averages the items,
    which is what MONAI's ``aggregate()`` with ``reduction="mean"`` returns.

    Distributed evaluation: each rank updates its own instance on its own slices;
    gather ``state()`` (sum, count) from every rank and :meth:`merge_state` them
    into one instance, or gather :meth:`values` and :meth:`extend` for a
    bit-identical sum. Padded duplicate samples must not be passed to ``update``.
    """

    name = "dice_paper"

    def __init__(self) -> None:
        self._values: list[float] = []
        self._merged_sum = 0.0
        self._merged_count = 0

    def update(self, pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> list[float]:
        """Score a batch and store one value per item.

        Args:
            pred: predicted class ids, shape ``[B, *spatial]`` (the argmax over channels), integer dtype.
            label: label class ids, same shape and an integer dtype.
            n_classes: number of classes including background (14 for FLARE).

        Returns:
            The ``B`` per-item values just added.

        Raises:
            UserError: shapes differ, a tensor is not integer ids, or an id is outside ``0..n_classes-1``.
        """
        pred = torch.as_tensor(pred)
        label = torch.as_tensor(label)
        if pred.shape != label.shape:
            raise UserError(
                f"dice_paper: prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}"
            )
        if pred.ndim < 2:
            raise UserError(f"dice_paper: expected [B, *spatial] class ids, got shape {tuple(pred.shape)}")
        _check_ids(pred, "prediction", n_classes)
        _check_ids(label, "label", n_classes)
        new = paper_dice_per_item(pred, label, n_classes).tolist()
        if any(math.isnan(v) for v in new):  # cannot happen with background included; guard anyway
            raise UserError("dice_paper: an item has no channel present in its label (empty label?)")
        self._values.extend(new)
        return new

    def extend(self, values: Sequence[float]) -> None:
        """Add per-item values gathered from another rank (see :meth:`values`)."""
        self._values.extend(float(v) for v in values)

    def values(self) -> list[float]:
        """Per-item values stored by ``update``/``extend`` on this instance (not those merged via ``merge_state``)."""
        return list(self._values)

    def state(self) -> tuple[float, int]:
        """``(sum, count)`` of everything seen, for exact gathering across ranks (sum via ``math.fsum``)."""
        return math.fsum(self._values) + self._merged_sum, len(self._values) + self._merged_count

    def merge_state(self, total: float, count: int) -> None:
        """Add another rank's ``state()``."""
        if count < 0:
            raise ValueError(f"merge_state: negative count {count}")
        self._merged_sum += float(total)
        self._merged_count += int(count)

    @classmethod
    def from_states(cls, states: Sequence[tuple[float, int]]) -> "PaperDice":
        """One accumulator holding the sum of every ``(sum, count)`` in ``states`` (e.g. one per rank)."""
        out = cls()
        for total, count in states:
            out.merge_state(total, count)
        return out

    def count(self) -> int:
        """Number of items seen."""
        return self.state()[1]

    def mean(self) -> float:
        """``dice_paper``: the mean over items.

        Raises:
            UserError: nothing was scored (an empty validation set).
        """
        total, count = self.state()
        if count == 0:
            raise UserError("dice_paper: no validation slices were scored (empty validation set)")
        return total / count

    def reset(self) -> None:
        """Forget everything."""
        self.__init__()


# ----------------------------------------------------------------------------------------------
# Surfaces and NSD, as the official FLARE 2022 evaluation computes them
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def surfel_measures(spacing: tuple[float, ...]) -> np.ndarray:
    """Area in mm^2 (3D) or length in mm (2D) of the surface element of each neighbour code.

    A neighbour code is the 2 x 2 x 2 (2D: 2 x 2) block of voxels around a corner of the
    voxel grid, one bit per voxel (see :func:`_neighbour_codes`); its surface element is the
    marching-cubes surface through that block. 3D: the table of surface normals of DeepMind's
    ``surface-distance`` package, which the official FLARE 2022 evaluation ships as
    ``SurfaceDice.py`` (MONAI carries the same table), each normal scaled by the spacing
    and its length summed per code, in float64 as the official code does. 2D: the contour
    lengths of the same package (MONAI's ``get_code_to_measure_table``).

    Args:
        spacing: voxel size in mm per axis, a tuple of 2 or 3 floats (the tables are cached per spacing).

    Returns:
        read-only float64 array of 256 (3D) or 16 (2D) entries; 0 for the all-outside and all-inside codes.
    """
    if len(spacing) == 3:
        normals = np.asarray(_monai_normals_table().cpu().numpy(), dtype=np.float64)  # [256, 4, 3], multiples of 1/8
        s0, s1, s2 = (float(s) for s in spacing)
        # the official code scales component 0 by s1 * s2, 1 by s0 * s2, 2 by s0 * s1, in this order
        scaled = np.stack((normals[..., 0] * s1 * s2, normals[..., 1] * s0 * s2, normals[..., 2] * s0 * s1), axis=-1)
        table = np.linalg.norm(scaled, axis=-1).sum(axis=-1)
    elif len(spacing) == 2:
        monai_table, _ = get_code_to_measure_table(tuple(float(s) for s in spacing))
        table = np.array(monai_table.cpu().numpy(), dtype=np.float64)
    else:
        raise ValueError(f"surfel_measures: spacing {spacing} must have 2 or 3 values")
    table.flags.writeable = False  # cached and shared: read-only
    return table


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbour code of every corner of the voxel grid of a boolean mask (zeros outside it).

    Corner ``i`` (per axis ``0 .. n``) sits between voxels ``i - 1`` and ``i``; its code
    has one bit per voxel of that 2 x 2 x 2 block, ``2 ** (7 - (4 a + 2 b + c))`` for
    the voxel at offset ``(a, b, c)`` in ``{0, 1}^3`` (2D: ``2 ** (3 - (2 a + b))``),
    the kernel of DeepMind's code and MONAI's ``ENCODING_KERNEL``. Returns uint8 of
    shape ``mask.shape + 1`` per axis.
    """
    padded = np.pad(mask.astype(np.uint8, copy=False), 1)
    nd = mask.ndim
    codes = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.uint8)
    bits = 2**nd
    for i, offset in enumerate(itertools.product((0, 1), repeat=nd)):
        block = padded[tuple(slice(o, o + s + 1) for o, s in zip(offset, mask.shape))]
        codes |= block << np.uint8(bits - 1 - i)
    return codes


def _surfels(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean map of the corners that carry surface (code neither all-outside nor all-inside)
    and the area (2D: length) of each of them, in ``np.argwhere`` order."""
    codes = _neighbour_codes(mask)
    border = (codes != 0) & (codes != (1 << 2**mask.ndim) - 1)
    return border, surfel_measures(spacing)[codes[border]]


def _close_to(src: np.ndarray, dst: np.ndarray, tree: cKDTree, scale: np.ndarray, tolerance: float) -> np.ndarray:
    """For each grid point of ``src`` (int [N, d]): is the nearest point of ``dst`` (int [M, d],
    indexed by ``tree``) within ``tolerance`` mm?

    The tree finds the nearest point; its distance is then recomputed from the integer offsets as
    ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` computes it (the official
    code's distance map), ``sqrt(sum((offset_i * spacing_i) ** 2))``, so that a distance equal to
    the tolerance compares exactly as there.
    """
    out = np.zeros(len(src), dtype=bool)
    if len(src) == 0:
        return out
    bound = np.nextafter(tolerance * (1.0 + 1e-6) + 1e-9, np.inf)
    dist, idx = tree.query(src * scale, k=1, distance_upper_bound=bound)
    found = np.flatnonzero(np.isfinite(dist))
    offset = (dst[idx[found]] - src[found]).astype(np.float64) * scale
    out[found] = np.sqrt(np.add.reduce(offset * offset, axis=1)) <= tolerance
    return out


def surface_dice(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalized surface Dice of two boolean masks, as the official FLARE 2022 evaluation.

    The surfaces are surface elements (surfels) at the corners of the voxel grid, each
    weighted by its area in mm^2 (2D: its length in mm), as DeepMind's ``surface-distance``
    ``compute_surface_distances`` / ``compute_surface_dice_at_tolerance`` that the official
    script uses: NSD = (area of ``a``'s surfels within ``tolerance_mm`` of ``b``'s surfels
    + area of ``b``'s within it of ``a``'s) / (total area of both). Distances are Euclidean in
    mm between surfel positions; a distance equal to the tolerance counts as within, compared
    in floating point exactly as the official code does (so 3 x 0.8 mm is *not* within 2.4 mm:
    ``3 * 0.8 = 2.4000000000000004``). Outside the arrays counts as outside the masks.
    1 when both masks are empty, 0 when exactly one is (the FLARE conventions).

    The nearest surfels come from a k-d tree searched up to the tolerance (the official code
    builds a distance map of the whole bounding box): the same values, a few times faster.

    Args:
        a, b: boolean masks of the same shape (2D or 3D).
        spacing: voxel size in mm per axis.
        tolerance_mm: the NSD tolerance in mm (>= 0).

    Raises:
        ValueError: the shapes differ, or the masks are not 2D or 3D.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"surface_dice: shapes differ {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3) or len(spacing) != a.ndim:
        raise ValueError(f"surface_dice: need 2D or 3D masks and one spacing per axis, got {a.shape} and {spacing}")
    a_any, b_any = bool(a.any()), bool(b.any())
    if not a_any and not b_any:
        return 1.0
    if not a_any or not b_any:
        return 0.0
    # surfels lie only around the union of both masks: crop to its box (the codes pad it with background)
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]
    a, b = a[box], b[box]
    spacing_t = tuple(float(s) for s in spacing)
    scale = np.asarray(spacing_t, dtype=np.float64)
    border_a, area_a = _surfels(a, spacing_t)
    border_b, area_b = _surfels(b, spacing_t)
    # corners on both surfaces are at distance 0; the tree is asked only about the others
    on_both = border_a & border_b
    close_a = on_both[border_a]
    close_b = on_both[border_b]
    pa, pb = np.argwhere(border_a), np.argwhere(border_b)
    tol = float(tolerance_mm)
    if not close_a.all():
        tree_b = cKDTree(pb * scale, balanced_tree=False, compact_nodes=False)
        close_a[~close_a] = _close_to(pa[~close_a], pb, tree_b, scale, tol)
    if not close_b.all():
        tree_a = cKDTree(pa * scale, balanced_tree=False, compact_nodes=False)
        close_b[~close_b] = _close_to(pb[~close_b], pa, tree_a, scale, tol)
    total = float(area_a.sum()) + float(area_b.sum())
    return (float(area_a[close_a].sum()) + float(area_b[close_b].sum())) / total


# ----------------------------------------------------------------------------------------------
# Challenge-grade per-organ scores
# ----------------------------------------------------------------------------------------------


def _union_box(*boxes: tuple[slice, ...] | None) -> list[slice]:
    present = [b for b in boxes if b is not None]
    return [slice(min(b[d].start for b in present), max(b[d].stop for b in present)) for d in range(len(present[0]))]


def flare22_z_range(label_slices: slice) -> slice:
    """The slices on which FLARE 2022 scores aorta, IVC and esophagus, from the label's range.

    The official script takes ``z_lower, z_upper`` = the first and last slice holding the organ
    in the label and scores ``gt[:, :, z_lower:z_upper]``: the label's last slice is left out.
    When the organ lies on one slice only that range is empty and the script fails (its
    surface-distance code cannot take an empty array); here that one slice is scored instead.

    Args:
        label_slices: ``slice(first, last + 1)`` of the organ in the label along the slice axis.
    """
    first, last = int(label_slices.start), int(label_slices.stop) - 1
    return slice(first, last if last > first else first + 1)


def organ_scores(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    n_classes: int = 14,
    tolerance_mm: float | Mapping[int, float] = FLARE22_TOLERANCE_MM,
    *,
    z_axis: int | None = -1,
) -> dict[int, dict[str, float]]:
    """Volumetric Dice and normalized surface Dice per organ of one case, as the official FLARE 2022 evaluation.

    The official script is ``FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py`` with ``SurfaceDice.py``
    in github.com/JunMa11/FLARE; with the defaults the values here equal its unrounded values
    (it writes them rounded to 4 decimals). Per organ id ``i`` in ``1..n_classes-1`` (background
    is not scored):

    * absent from both label and prediction (whole volume): Dice 1, NSD 1;
    * absent from exactly one of them (whole volume): Dice 0, NSD 0;
    * aorta (5), inferior vena cava (6) and esophagus (10) are scored only on the slices
      along ``z_axis`` from the first slice holding the organ in the label up to, *not
      including*, the last one, as the script's ``gt[:, :, z_lower:z_upper]`` (see
      :func:`flare22_z_range`; an organ on one slice only is scored on that slice, where the
      script fails); prediction outside that range is ignored and the cut is bordered by
      background. ``z_axis=None`` scores them on the whole volume like the others;
    * Dice = 2 |P & G| / (|P| + |G|) on that region; NSD = 0 when that Dice is below 0.2
      (:data:`FLARE22_NSD_MIN_DICE`, the script's shortcut), else :func:`surface_dice`
      (surfel areas, Euclidean distances in mm);
    * NSD tolerance: by default FLARE 2022's per-organ tolerances
      (:data:`FLARE22_TOLERANCE_MM`: liver, pancreas, stomach 5 mm; duodenum 7 mm;
      kidneys, spleen, esophagus 3 mm; aorta, IVC, adrenals, gallbladder 2 mm).
      The often-quoted 1 mm is FLARE 2021's (4 organs); pass ``tolerance_mm=1.0`` for it.

    Args:
        pred: predicted class ids of the whole case (3D, as the official script; 2D works too,
            with DeepMind's 2D contour lengths), integer dtype.
        label: label class ids, same shape and an integer dtype.
        spacing: voxel size in mm per axis, in array order (nibabel ``header.get_zooms()[:3]``
            for an (x, y, z) array, as the script reads it from the label).
        n_classes: classes including background; ids must lie in ``0..n_classes-1``.
        tolerance_mm: NSD tolerance, one number for all organs or a mapping organ id -> mm.
        z_axis: the slice axis for the aorta / IVC / esophagus restriction (-1 for nibabel's
            (x, y, z) order, the script's axis 2, and for slices stacked with
            ``np.stack(..., axis=-1)``); None scores these organs on the whole volume.

    Returns:
        ``{organ_id: {"dice", "nsd", "tolerance_mm", "label_voxels", "pred_voxels"}}`` (voxel counts over
        the whole volume, before any z restriction).

    Raises:
        UserError: shapes differ, arrays are not integer ids or hold ids outside the range,
            spacing is not one positive number per axis, or a tolerance is missing for an organ.
    """
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape:
        raise UserError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    _check_ids(pred, "prediction", n_classes)
    _check_ids(label, "label", n_classes)
    if label.ndim not in (2, 3):
        raise UserError(f"organ_scores scores 2D or 3D label maps, got shape {label.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != label.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UserError(f"spacing {spacing} must be one positive size in mm per axis of a {label.ndim}D array")
    if z_axis is not None and not -label.ndim <= z_axis < label.ndim:
        raise ValueError(f"z_axis {z_axis} is not an axis of a {label.ndim}D array")
    if isinstance(tolerance_mm, Mapping):
        missing = [i for i in range(1, n_classes) if i not in tolerance_mm]
        if missing:
            raise UserError(f"tolerance_mm has no tolerance for organ ids {missing}")
        tolerances = {i: float(tolerance_mm[i]) for i in range(1, n_classes)}
    else:
        tolerances = {i: float(tolerance_mm) for i in range(1, n_classes)}
    if not all(math.isfinite(t) and t >= 0 for t in tolerances.values()):
        raise UserError(f"NSD tolerances must be non-negative mm, got {tolerances}")

    lab_i = label.astype(np.intp, copy=False)
    pred_i = pred.astype(np.intp, copy=False)
    n_label = np.bincount(lab_i.ravel(), minlength=n_classes)
    n_pred = np.bincount(pred_i.ravel(), minlength=n_classes)
    box_label = ndimage.find_objects(lab_i, max_label=n_classes - 1)
    box_pred = ndimage.find_objects(pred_i, max_label=n_classes - 1)
    zax = None if z_axis is None else z_axis % label.ndim

    out: dict[int, dict[str, float]] = {}
    for i in range(1, n_classes):
        row: dict[str, float] = {
            "tolerance_mm": tolerances[i],
            "label_voxels": int(n_label[i]),
            "pred_voxels": int(n_pred[i]),
        }
        if n_label[i] == 0 and n_pred[i] == 0:
            row.update(dice=1.0, nsd=1.0)
        elif n_label[i] == 0 or n_pred[i] == 0:
            row.update(dice=0.0, nsd=0.0)
        else:
            region = _union_box(box_label[i - 1], box_pred[i - 1])
            if zax is not None and i in FLARE22_Z_RESTRICTED:
                zr = flare22_z_range(box_label[i - 1][zax])
                region[zax] = zr  # the whole scored range: the label holds the organ on its first slice
            region_t = tuple(region)
            lab_m = label[region_t] == i
            prd_m = pred[region_t] == i
            inter = int(np.count_nonzero(lab_m & prd_m))
            dice = 2.0 * inter / (int(np.count_nonzero(lab_m)) + int(np.count_nonzero(prd_m)))
            nsd = 0.0 if dice < FLARE22_NSD_MIN_DICE else surface_dice(lab_m, prd_m, spacing, tolerances[i])
            row.update(dice=dice, nsd=nsd)
        out[i] = row
    return out


def _mean_std(x: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(x, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def summarize_case_scores(
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]], label_names: Sequence[str] | None = None
) -> dict:
    """Means of :func:`organ_scores` results over organs and cases, JSON-serialisable.

    Args:
        per_case: ``{case_id: organ_scores(...)}``; every case must score the same organ ids.
        label_names: name per class id (index 0 background); default ``data.LABEL_NAMES``.

    Returns:
        ``{"n_cases", "dice_mean", "nsd_mean", "dice_std", "nsd_std", "per_case", "per_organ"}``:
        ``dice_mean``/``nsd_mean`` are the mean over cases of each case's mean over organs
        (``*_std``: their standard deviation over cases); ``per_case[case]`` holds
        ``dice_mean``/``nsd_mean``; ``per_organ[name]`` holds ``organ_id``, ``dice``, ``nsd``
        (means over cases), ``dice_std``, ``nsd_std``, ``tolerance_mm`` and ``n_cases_in_label``
        (cases whose label contains the organ).

    Raises:
        UserError: ``per_case`` is empty (no validation case) or cases score different organs.
    """
    if not per_case:
        raise UserError("no validation cases were scored (empty validation set)")
    names = _label_names(label_names)
    cases = list(per_case)
    organ_ids = sorted(per_case[cases[0]])
    for c in cases:
        if sorted(per_case[c]) != organ_ids:
            raise UserError(f"case {c!r} scores organs {sorted(per_case[c])}, case {cases[0]!r} scores {organ_ids}")
    if organ_ids and max(organ_ids) >= len(names):
        raise ValueError(f"label_names has {len(names)} names, organ id {max(organ_ids)} has none")
    summary_case = {}
    for c in cases:
        summary_case[c] = {
            "dice_mean": float(np.mean([per_case[c][i]["dice"] for i in organ_ids])),
            "nsd_mean": float(np.mean([per_case[c][i]["nsd"] for i in organ_ids])),
        }
    per_organ = {}
    for i in organ_ids:
        d_mean, d_std = _mean_std([per_case[c][i]["dice"] for c in cases])
        n_mean, n_std = _mean_std([per_case[c][i]["nsd"] for c in cases])
        row = {"organ_id": i, "dice": d_mean, "nsd": n_mean, "dice_std": d_std, "nsd_std": n_std}
        tol = per_case[cases[0]][i].get("tolerance_mm")
        if tol is not None:
            row["tolerance_mm"] = float(tol)
        if "label_voxels" in per_case[cases[0]][i]:
            row["n_cases_in_label"] = sum(1 for c in cases if per_case[c][i]["label_voxels"] > 0)
        per_organ[str(names[i])] = row
    d_mean, d_std = _mean_std([summary_case[c]["dice_mean"] for c in cases])
    n_mean, n_std = _mean_std([summary_case[c]["nsd_mean"] for c in cases])
    return {
        "n_cases": len(cases),
        "dice_mean": d_mean,
        "nsd_mean": n_mean,
        "dice_std": d_std,
        "nsd_std": n_std,
        "per_case": summary_case,
        "per_organ": per_organ,
    }


def _json_number(v: float | int) -> float | int:
    """A plain Python number for JSON (numpy scalars are not serialisable)."""
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else float(v)


_CSV_COLUMNS = ("case", "organ_id", "organ", "dice", "nsd", "tolerance_mm", "label_voxels", "pred_voxels")


def write_scores(
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]],
    out_dir: str | os.PathLike,
    prefix: str = "val",
    label_names: Sequence[str] | None = None,
    scoring: Mapping | None = None,
) -> dict[str, str]:
    """Write per-case, per-organ scores as CSV and JSON, atomically.

    ``<out_dir>/<prefix>_scores.csv``: one row per case x organ with columns
    ``case, organ_id, organ, dice, nsd, tolerance_mm, label_voxels, pred_voxels``
    (label / prediction voxel counts: 0 and 0 marks an organ absent from both, scored 1 by convention).
    ``<out_dir>/<prefix>_scores.json``: ``{"summary": summarize_case_scores(...),
    "per_case": {case: {organ_name: {organ_id, dice, nsd, ...}}}}``, and with ``scoring``
    (:meth:`ScoringRules.record`: the label set, the NSD tolerance per class and the rules)
    under ``"scoring"``.

    Returns:
        ``{"csv": path, "json": path}``.

    Raises:
        UserError: as :func:`summarize_case_scores`.
    """
    names = _label_names(label_names)
    summary = summarize_case_scores(per_case, names)
    out_dir = Path(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    detail: dict[str, dict[str, dict]] = {}
    for case, organs in per_case.items():
        detail[case] = {}
        for i in sorted(organs):
            s = organs[i]
            writer.writerow(
                [
                    case,
                    i,
                    names[i],
                    f"{s['dice']:.6f}",
                    f"{s['nsd']:.6f}",
                    "" if "tolerance_mm" not in s else f"{s['tolerance_mm']:g}",
                    "" if "label_voxels" not in s else int(s["label_voxels"]),
                    "" if "pred_voxels" not in s else int(s["pred_voxels"]),
                ]
            )
            detail[case][str(names[i])] = {"organ_id": i, **{k: _json_number(v) for k, v in s.items()}}
    csv_path = out_dir / f"{prefix}_scores.csv"
    json_path = out_dir / f"{prefix}_scores.json"
    atomic_write_text(csv_path, buf.getvalue())
    record = {"summary": summary, "per_case": detail}
    if scoring is not None:
        record["scoring"] = dict(scoring)
    atomic_write_json(json_path, record)
    return {"csv": str(csv_path), "json": str(json_path)}


def format_summary(summary: Mapping, label_names: Sequence[str] | None = None) -> str:
    """A compact text table of :func:`summarize_case_scores` output: organ, Dice, NSD (tolerance), then the mean.

    ``label_names`` is accepted for symmetry with the other functions; the summary already holds the names.
    """
    del label_names
    rows = [(name, o["dice"], o["nsd"], o.get("tolerance_mm")) for name, o in summary["per_organ"].items()]
    width = max([len("organ")] + [len(r[0]) for r in rows] + [len("mean (per case)")])
    out = [f"{'organ':<{width}}  {'Dice':>6}  {'NSD':>6}  tol mm", "-" * (width + 24)]
    for name, d, n, tol in rows:
        out.append(f"{name:<{width}}  {d:6.4f}  {n:6.4f}  {'' if tol is None else f'{tol:g}'}")
    out.append("-" * (width + 24))
    out.append(f"{'mean (per case)':<{width}}  {summary['dice_mean']:6.4f}  {summary['nsd_mean']:6.4f}")
    out.append(
        f"{summary['n_cases']} case(s); Dice and NSD per organ are means over cases (as FLARE 2022 computes them)"
    )
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------


def organ_colors(n_classes: int = 14) -> np.ndarray:
    """Fixed RGBA colour per class id (row 0, background, fully transparent); same ids, same colours everywhere."""
    base = colormaps["tab20"].colors
    # ids 1..13 (FLARE): liver red, kidneys blue / light blue, spleen green, pancreas orange,
    # aorta purple, IVC cyan, adrenals brown / light brown, gallbladder pink, esophagus grey,
    # stomach olive, duodenum light purple; neighbouring organs get far-apart colours
    order = [6, 0, 4, 2, 8, 18, 10, 11, 12, 14, 16, 9, 1, 3, 5, 7, 13, 15, 17, 19]
    colors = np.zeros((n_classes, 4))
    for i in range(1, n_classes):
        colors[i, :3] = base[order[(i - 1) % len(order)]]
        colors[i, 3] = 1.0
    return colors


def plot_predictions(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    output_path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    n_classes: int = 14,
    label_names: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> str:
    """Save a PNG: one row per slice, image | label | prediction, organs in fixed colours, legend with names.

    Args:
        images: 2D intensity slices (any range; each is shown with its own min..max).
        labels: 2D class-id slices, same shapes.
        preds: 2D predicted class-id slices, same shapes.
        output_path: the PNG to write (atomically); its folder is created.
        titles: one title per row (e.g. ``"FLARE22_Tr_0042 slice 57"``).
        n_classes: number of classes including background.
        label_names: names per class id; default ``data.LABEL_NAMES``.
        alpha: opacity of the organ colours over the image.

    Returns:
        The path written.

    Raises:
        UserError: empty or mismatched lists, non-2D slices, or ids outside ``0..n_classes-1``.
    """
    # the backend is chosen here, at drawing time, and pyplot imported after it: choosing it when
    # metrics is imported would impose Agg on every program that imports this module
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = len(images)
    if n == 0:
        raise UserError("plot_predictions: no slices to plot")
    if len(labels) != n or len(preds) != n or (titles is not None and len(titles) != n):
        raise UserError(
            f"plot_predictions: {n} images, {len(labels)} labels, {len(preds)} predictions"
            + ("" if titles is None else f", {len(titles)} titles")
        )
    names = _label_names(label_names)
    if len(names) < n_classes:
        raise ValueError(f"label_names has {len(names)} names for {n_classes} classes")
    colors = organ_colors(n_classes)
    cmap = ListedColormap(colors)
    present: set[int] = set()
    for k in range(n):
        img, lab, prd = np.asarray(images[k]), np.asarray(labels[k]), np.asarray(preds[k])
        if img.ndim != 2 or lab.shape != img.shape or prd.shape != img.shape:
            raise UserError(
                f"plot_predictions: slice {k} shapes image {img.shape}, label {lab.shape}, prediction {prd.shape}; need equal 2D"
            )
        _check_ids(lab, f"label of slice {k}", n_classes)
        _check_ids(prd, f"prediction of slice {k}", n_classes)
        present |= set(np.unique(lab).tolist()) | set(np.unique(prd).tolist())
    present.discard(0)

    fig, axes = plt.subplots(n, 3, figsize=(9.5, 3.1 * n + 0.6), squeeze=False)
    for k in range(n):
        img = np.asarray(images[k], dtype=np.float32)
        for col, (over, head) in enumerate([(None, "image"), (labels[k], "label"), (preds[k], "prediction")]):
            ax = axes[k, col]
            ax.imshow(img, cmap="gray", interpolation="nearest")
            if over is not None:
                over = np.asarray(over)
                ax.imshow(
                    np.ma.masked_equal(over, 0),
                    cmap=cmap,
                    vmin=-0.5,
                    vmax=n_classes - 0.5,
                    alpha=alpha,
                    interpolation="nearest",
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(head)
        if titles is not None:
            axes[k, 0].set_ylabel(titles[k], fontsize=9)
    handles = [Patch(facecolor=colors[i], label=f"{i} {names[i]}") for i in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.03 * math.ceil(len(handles) / 5) / max(n, 1), 1, 1))
    with atomic_write(output_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return os.fspath(output_path)


# ----------------------------------------------------------------------------------------------
# Command line: score saved NIfTI predictions against labels
# ----------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Challenge-grade per-organ Dice and NSD of NIfTI predictions against labels, as the official FLARE 2022 "
        "evaluation computes them",
        add_help=True,
    )
    g = parser.add_argument_group("inputs (one case, or two folders of cases)")
    g.add_argument(
        "--pred", type=str, default=None, help="A predicted label volume (.nii.gz) to score against --label."
    )
    g.add_argument(
        "--label",
        type=str,
        default=None,
        help="The reference label volume (.nii.gz) for --pred; its header gives the spacing.",
    )
    g.add_argument(
        "--pred_dir",
        type=str,
        default=None,
        help="Folder of predicted .nii.gz volumes, matched by file name to the cases of --label_dir.",
    )
    g.add_argument(
        "--label_dir",
        type=str,
        default=None,
        help="Folder of reference .nii.gz label volumes: every case in it is scored (a prediction without a label "
        "is an error).",
    )
    g.add_argument(
        "--missing_as_zero",
        action="store_true",
        help="Score a --label_dir case without a prediction as 0 (Dice and NSD of every organ), as the FLARE "
        "challenges do, instead of stopping with an error that names it.",
    )
    g = parser.add_argument_group("scoring")
    g.add_argument(
        "--labels",
        type=str,
        default=None,
        help="The label set (ids and names) of another data set: its dataset.json (nnU-Net v2, Decathlon), or a "
        "preprocessed folder / its manifest.json. Default: FLARE 2022's 13 organs. Names the classes in the output; "
        "FLARE's slice-range rule for aorta, IVC and esophagus applies to FLARE's organs only.",
    )
    g.add_argument(
        "--n_classes",
        type=int,
        default=None,
        help="Classes including background; default: those of --labels (14 for FLARE 2022). Without --labels another "
        "value scores classes named 'class <id>'.",
    )
    g.add_argument(
        "--tolerance_mm",
        type=number_or_json,
        default=None,
        help="NSD tolerance in mm: one number for every class (1.0 reproduces FLARE 2021), or a JSON object (or .json "
        "file) of label id -> mm. Default: FLARE 2022's per-organ tolerances; required for any other label set.",
    )
    g.add_argument(
        "--no_z_restriction",
        action="store_true",
        help="Score aorta, IVC and esophagus on the whole volume instead of the label's slice range (FLARE 2022 restricts them).",
    )
    g = parser.add_argument_group("output")
    g.add_argument(
        "--out_dir",
        type=str,
        default=None,
        help="Write <prefix>_scores.csv and .json here; without it only the table is printed.",
    )
    g.add_argument("--prefix", type=str, default="eval", help="File name prefix of the score files in --out_dir.")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="Let --out_dir's score files replace files that this project did not write (refused by default).",
    )
    return parser


def _load_ids(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    img = load_nifti(path)  # read in full: a corrupt .nii.gz is refused, not scored
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for a bad file
        raise UserError(f"{path} is not a readable NIfTI volume ({type(e).__name__}: {e})") from e
    if not (np.issubdtype(arr.dtype, np.integer)):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise UserError(f"{path} holds non-integer values; expected class ids")
        arr = arr.astype(np.int64)
    return arr, tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])


def _case_name(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def _volumes(folder: Path) -> dict[str, Path]:
    """``{case: path}`` of the .nii / .nii.gz files directly in ``folder``."""
    return {_case_name(p): p for p in sorted(folder.iterdir()) if p.name.endswith((".nii.gz", ".nii")) and p.is_file()}


def missing_prediction_scores(label: np.ndarray, rules: ScoringRules) -> dict:
    """The scores of a case without a prediction (``--missing_as_zero``): Dice 0 and NSD 0 for
    every organ of ``rules``' label set, as the FLARE challenges score a missing submission."""
    n_classes = rules.labels.n_classes
    counts = np.bincount(np.asarray(label, dtype=np.intp).ravel(), minlength=n_classes)
    out = {}
    for i in range(1, n_classes):
        out[i] = {
            "tolerance_mm": rules.tolerance_of(i),
            "label_voxels": int(counts[i]),
            "pred_voxels": 0,
            "dice": 0.0,
            "nsd": 0.0,
        }
    return out


def cli_label_set(path: str | None, n_classes: int | None) -> LabelSet:
    """The label set of ``--labels`` (a ``dataset.json``, a preprocessed folder or its
    ``manifest.json``), checked against ``--n_classes``; without it FLARE 2022's, or for
    another ``--n_classes`` classes named ``class <id>``.

    Raises:
        UserError: the file cannot be read or holds no label set, or ``--n_classes`` differs.
    """
    if path is None:
        if n_classes is None or n_classes == FLARE_LABELS.n_classes:
            return FLARE_LABELS
        if n_classes < 2:
            raise UserError(f"--n_classes must be at least 2, got {n_classes}")
        return LabelSet(("background", *(f"class {i}" for i in range(1, n_classes))), f"--n_classes {n_classes}")
    p = os.path.abspath(path)
    if os.path.isdir(p):
        cands = [
            os.path.join(p, n) for n in (data.MANIFEST_NAME, data.DATASET_JSON) if os.path.isfile(os.path.join(p, n))
        ]
        if not cands:
            raise UserError(f"--labels {p} holds neither a manifest.json nor a dataset.json")
        p = cands[0]
    if os.path.basename(p) == data.MANIFEST_NAME:
        labels = data.manifest_labels(data.read_manifest(os.path.dirname(p)), p)
    else:
        obj = data.read_dataset_json(p)
        if "labels" not in obj:
            raise UserError(f"--labels {p} has no 'labels' (label ids and names)")
        labels = data.parse_label_set(obj["labels"], p)
    if n_classes is not None and n_classes != labels.n_classes:
        raise UserError(f"--n_classes {n_classes}, but --labels {p} declares {labels.n_classes} ({labels.describe()})")
    return labels


def main(args: argparse.Namespace) -> dict:
    """Score the given predictions; returns the summary dict (see :func:`summarize_case_scores`).

    With ``--pred_dir`` / ``--label_dir`` every case of the label folder is scored; a missing
    prediction is an error (or 0 with ``--missing_as_zero``), and so is a prediction without a label.
    """
    if (args.pred is None) != (args.label is None):
        raise UserError("--pred and --label go together")
    if (args.pred_dir is None) != (args.label_dir is None):
        raise UserError("--pred_dir and --label_dir go together")
    if (args.pred is None) == (args.pred_dir is None):
        raise UserError("give either --pred/--label or --pred_dir/--label_dir")
    if args.out_dir is not None:
        inputs = {
            "--pred": args.pred,
            "--label": args.label,
            "--pred_dir": args.pred_dir,
            "--label_dir": args.label_dir,
        }
        check_outputs_apart({"--out_dir": args.out_dir}, inputs)
        out_dir = prepare_output_dir(args.out_dir, "--out_dir")
        claim_outputs(
            [os.path.join(out_dir, f"{args.prefix}_scores.{ext}") for ext in ("csv", "json")],
            args.overwrite,
            "--out_dir",
        )
    pairs: list[tuple[str, Path | None, Path]]
    if args.pred is not None:
        pairs = [(_case_name(Path(args.pred)), Path(args.pred), Path(args.label))]
    else:
        pred_dir, label_dir = Path(args.pred_dir), Path(args.label_dir)
        for d, flag in ((pred_dir, "--pred_dir"), (label_dir, "--label_dir")):
            if not d.is_dir():
                raise UserError(f"{flag} {d} is not a folder")
        labels, preds = _volumes(label_dir), _volumes(pred_dir)
        if not labels:
            raise UserError(f"--label_dir {label_dir} holds no .nii.gz volumes")
        orphans = sorted(set(preds) - set(labels))
        if orphans:
            more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
            raise UserError(f"prediction {preds[orphans[0]]}{more} has no label in --label_dir {label_dir}")
        missing = sorted(set(labels) - set(preds))
        if missing and not args.missing_as_zero:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(
                f"case {missing[0]!r}{more} of --label_dir has no prediction {pred_dir / labels[missing[0]].name}; "
                f"every labelled case is scored (--missing_as_zero scores a missing one as 0, as FLARE does)"
            )
        if missing:
            logger.warning("%d case(s) have no prediction and score 0: %s", len(missing), ", ".join(missing))
        pairs = [(c, preds.get(c), labels[c]) for c in labels]
    labels = cli_label_set(args.labels, args.n_classes)
    rules = scoring_rules(
        labels, parse_tolerance_mm(args.tolerance_mm, "--tolerance_mm"), "--tolerance_mm", not args.no_z_restriction
    )
    n_classes, tol = labels.n_classes, rules.tolerance_mm
    per_case = {}
    for case, pred_path, label_path in tqdm(pairs, desc="scoring", disable=len(pairs) < 2):
        label, spacing = _load_ids(label_path)
        if pred_path is None:
            per_case[case] = missing_prediction_scores(label, rules)
            continue
        pred, _ = _load_ids(pred_path)
        if pred.shape != label.shape:
            raise UserError(f"{pred_path} has shape {pred.shape}, its label {label_path} has {label.shape}")
        try:
            per_case[case] = organ_scores(
                pred,
                label,
                spacing,
                n_classes=n_classes,
                tolerance_mm=tol,
                z_axis=rules.z_axis,
            )
        except UserError as e:
            raise UserError(f"{pred_path} against {label_path}: {e}") from e
    summary = summarize_case_scores(per_case, labels.names)
    if args.out_dir is not None:
        paths = write_scores(
            per_case, args.out_dir, prefix=args.prefix, label_names=labels.names, scoring=rules.record()
        )
        logger.info("wrote %s and %s", paths["csv"], paths["json"])
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
