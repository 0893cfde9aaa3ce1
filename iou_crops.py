"""IoU-based positives: two equal-size crops of one image whose IoU lies in [min_iou, max_iou].

This module is the method of the project. It draws the two crops of a positive
pair for SimSiam / DINO pretraining so that ``min_iou <= IoU(crop1, crop2) <= max_iou``
(the paper's best interval is [0.3, 0.6]; [0, 1] is plain random cropping), in 2D
and 3D, with square / cubic or rectangular / cuboid crops.

Unlike the trial-and-error sampler of the original work (draw, test, retry a few
times, then silently return whatever was drawn last), the sampler here is exact:

* every returned pair has its IoU in the interval whenever the image admits such
  a pair at all;
* the first crop is uniform over the positions that have at least one valid
  partner, and the second crop is uniform over the valid partners of the first;
* when an image admits no valid pair, ``strict=True`` raises ``ValueError`` and
  ``strict=False`` returns the realisable pair whose IoU is closest to the
  interval and counts it in ``sampler.stats["infeasible"]`` (never silently).

How it works. For two crops of the same size ``c`` (per axis), the intersection
is the product over axes of the per-axis overlaps ``max(0, c_i - |a_i - b_i|)``,
so the IoU depends only on the per-axis offset *classes* ``t_i = min(|a_i - b_i|, c_i)``
(``t_i = c_i`` stands for "no overlap on this axis"). The sampler tabulates once,
per crop size and interval, which class vectors are valid (a table of at most
``prod(c_i + 1)`` entries). Given the first crop ``a``, the number of partners
``b`` in class ``t`` factorises over axes, so the second crop is drawn exactly,
axis by axis: class ``t_0`` from its marginal, then ``t_1`` given ``t_0``, and so
on, then a uniform position within the chosen classes. No rejection, no retries,
a fixed amount of work per pair.

For comparison, the original's sampler is here too: :class:`OriginalIoUSampler`, the
thesis' Algorithm 1 (r1 = 30 draws of the second crop per first crop, r2 = 4 first crops,
then the last pair drawn whatever its IoU), selected with ``sampler="original"`` in
:class:`IoUCrop` / :class:`IoUCropd` and ``--iou_sampler original`` in the scripts.

Python API::

    import numpy as np
    from iou_crops import IoUCropSampler, IoUCropd, crop_iou

    sampler = IoUCropSampler(crop_size=96, min_iou=0.3, max_iou=0.6)
    start_a, start_b = sampler.sample((300, 250), np.random.default_rng(0))
    assert 0.3 <= crop_iou(start_a, start_b, 96) <= 0.6

    # in a MONAI pipeline (channel-first arrays): writes image1 / image2, drops image
    crop = IoUCropd(keys="image", spatial_dims=2, crop_size=96, min_iou=0.3, max_iou=0.6)
    out = crop({"image": np.zeros((1, 300, 250), np.float32)})

    # the original's Algorithm 1, through the same transform
    original = IoUCropd(keys="image", spatial_dims=2, crop_size=96, min_iou=0.3, max_iou=0.6, sampler="original")

Command line (prints one pair per line, with its IoU)::

    .venv/bin/python iou_crops.py --image_shape 300 250 --crop_size 96 --min_iou 0.3 --max_iou 0.6 --n 5
    .venv/bin/python iou_crops.py --image_shape 200 200 120 --crop_size 64 --min_iou 0.6 --max_iou 1 --n 5 --seed 1
    .venv/bin/python iou_crops.py --image_shape 300 250 --min_iou 0 --max_iou 0 --n 5 --sampler original
"""

from __future__ import annotations

import argparse
import bisect
import collections
import logging
import math
from typing import Any, Hashable, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Crop, MapTransform, Randomizable, Transform
from monai.utils import TransformBackends

from utils import UserError, run_cli

logger = logging.getLogger(__name__)

__all__ = [
    "crop_iou",
    "CropPair",
    "IoUCropSampler",
    "OriginalIoUSampler",
    "IOU_SAMPLERS",
    "make_sampler",
    "IoUCrop",
    "IoUCropd",
    "cut_crop",
]

RNG = Union[np.random.Generator, np.random.RandomState]
SizeLike = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- helpers


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _crop_size_tuple(crop_size: SizeLike, ndim: int) -> tuple[int, ...]:
    """``crop_size`` (an int or one int per axis) as a tuple of ``ndim`` positive ints.

    Raises:
        ValueError: wrong number of values, a non-integer or a value <= 0.
    """
    if _is_int(crop_size):
        size = (int(crop_size),) * ndim
    else:
        try:
            size = tuple(crop_size)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"crop_size must be an int or a sequence of ints, got {crop_size!r}") from None
        if len(size) != ndim:
            raise ValueError(
                f"crop_size {tuple(crop_size)} has {len(size)} values, but the image has {ndim} spatial axes"
            )
        if not all(_is_int(s) for s in size):
            raise ValueError(f"crop_size must contain integers, got {size}")
        size = tuple(int(s) for s in size)
    if any(s <= 0 for s in size):
        raise ValueError(f"crop_size must be positive on every axis, got {size}")
    return size


def _is_random_state(rng: RNG) -> bool:
    """True for a ``numpy.random.RandomState``, False for a ``Generator``.

    Raises:
        TypeError: ``rng`` is neither.
    """
    if isinstance(rng, np.random.RandomState):
        return True
    if isinstance(rng, np.random.Generator):
        return False
    raise TypeError(f"rng must be a numpy.random.Generator or RandomState, got {type(rng).__name__}")


def _no_pair_error(shape: Sequence[int], size: tuple[int, ...], min_iou: float, max_iou: float) -> ValueError:
    """The ``strict=True`` refusal of an image that admits no pair in the interval."""
    return ValueError(
        f"image of shape {tuple(int(s) for s in shape)} admits no pair of {size} crops with IoU in "
        f"[{min_iou}, {max_iou}]"
    )


def crop_iou(start_a: Sequence[int], start_b: Sequence[int], crop_size: SizeLike) -> float:
    """IoU of two axis-aligned crops of the same size, from their start corners.

    Args:
        start_a: start corner of the first crop, one int per spatial axis (array order, no channel axis).
        start_b: start corner of the second crop.
        crop_size: crop size, an int (all axes) or one int per axis.

    Returns:
        intersection volume / union volume, computed in float64 from the integer volumes.

    Raises:
        ValueError: the corners have different lengths, or ``crop_size`` does not fit them.
    """
    if len(start_a) != len(start_b):
        raise ValueError(f"start_a {tuple(start_a)} and start_b {tuple(start_b)} have different numbers of axes")
    size = _crop_size_tuple(crop_size, len(start_a))
    inter = 1
    vol = 1
    for a, b, c in zip(start_a, start_b, size):
        inter *= max(0, c - abs(int(a) - int(b)))
        vol *= c
    return float(inter) / float(2 * vol - inter)


class CropPair(NamedTuple):
    """One sampled pair: start corners (tuples of Python ints), its IoU, and whether the image
    admits a pair in the interval (``feasible``; for :class:`IoUCropSampler` the same as this
    pair being in it, for :class:`OriginalIoUSampler` not: its fallback pairs are outside)."""

    start_a: tuple[int, ...]
    start_b: tuple[int, ...]
    iou: float
    feasible: bool


class _ClassSet:
    """A set of offset-class vectors (the valid ones, or the closest ones) with its lookup tables.

    Offset class on axis i: ``t_i = min(|a_i - b_i|, c_i)`` (``t_i = c_i``: no overlap on
    that axis). For a set ``S`` of class vectors (boolean array ``member`` of shape
    ``(c_0 + 1, ..., c_{k-1} + 1)``) it keeps:

    * ``member_f``: ``member`` as float64 (for contractions with partner counts);
    * ``reach[m]``: some member ``t <= m`` (componentwise) exists, i.e. a first crop
      that can reach offsets up to ``m_i`` on every axis has a partner in ``S``;
    * prefix sums along the last axis, which turn the sum over the last axis of
      ``member * partner_row`` (a step function with few steps) into four lookups.
    """

    def __init__(self, member: np.ndarray) -> None:
        self.member = member
        self.member_f = member.astype(np.float64)
        self.reach = _reach(member)
        # prefix[..., j] = number of members with last class < j (length c_last + 2)
        zeros = np.zeros(member.shape[:-1] + (1,), dtype=np.float64)
        prefix = np.concatenate([zeros, np.add.accumulate(self.member_f, axis=-1)], axis=-1)
        self.prefix_rows = prefix.astype(np.int64)  # last axis last: one row per leading index (final draw)
        self.prefix_cols = np.ascontiguousarray(np.moveaxis(prefix, -1, 0))  # last axis first (contractions)
        self.first_col = np.ascontiguousarray(self.member_f[..., 0])
        self.last_col = np.ascontiguousarray(self.member_f[..., -1])


class _ClassTable:
    """What depends only on the crop size and the interval (not on the image).

    ``iou[t]`` is the IoU of two crops whose per-axis offset classes are ``t``;
    ``valid`` is the :class:`_ClassSet` of classes in the interval; ``dist[t]`` is the
    distance of ``iou[t]`` to the interval (0 inside).
    """

    def __init__(self, size: tuple[int, ...], min_iou: float, max_iou: float) -> None:
        self.size = size
        vol = math.prod(size)
        inter = np.ones((), dtype=np.int64)
        for c in size:
            overlap = c - np.arange(c + 1, dtype=np.int64)  # class t -> overlap c - t (0 for t = c)
            inter = np.multiply.outer(inter, overlap)
        # the same float64 division of the same integers as crop_iou: identical values
        self.iou = inter.astype(np.float64) / (2 * vol - inter).astype(np.float64)
        self.valid = _ClassSet((self.iou >= min_iou) & (self.iou <= max_iou))
        self.dist = np.where(
            self.iou < min_iou, min_iou - self.iou, np.where(self.iou > max_iou, self.iou - max_iou, 0.0)
        )


def _reach(member: np.ndarray) -> np.ndarray:
    """Cumulative OR of ``member`` along every axis."""
    out = member.copy()
    for ax in range(out.ndim):
        out = np.logical_or.accumulate(out, axis=ax)
    return out


class _ShapePlan:
    """What the sampler caches per image shape (small; see ``IoUCropSampler._plan``)."""

    __slots__ = ("n", "feasible", "classes", "all_uniform", "first_cum", "first_shape", "groups")

    def __init__(self) -> None:
        self.n: tuple[int, ...] = ()
        self.feasible = True
        self.classes: _ClassSet | None = None
        self.all_uniform = True
        self.first_cum: np.ndarray | None = None
        self.first_shape: tuple[int, ...] = ()
        self.groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []


def _partner_row(a: int, n: int, c: int) -> np.ndarray:
    """Number of partner positions per offset class on one axis.

    For a crop starting at ``a`` on an axis with ``n`` start positions and crop
    length ``c``: entry ``t < c`` counts positions ``b`` with ``|a - b| = t`` (1 for
    t = 0, else 0, 1 or 2), entry ``c`` counts positions with ``|a - b| >= c``.
    The row is 1 at t = 0, 2 on [1, e2], 1 on [e2 + 1, e1], 0 up to c - 1, z at c
    (see :func:`_row_steps`).
    """
    e2, e1, z = _row_steps(a, n, c)
    row = np.zeros(c + 1, dtype=np.float64)
    row[0] = 1.0
    row[1 : e2 + 1] = 2.0
    row[e2 + 1 : e1 + 1] = 1.0
    row[c] = z
    return row


def _row_steps(a: int, n: int, c: int) -> tuple[int, int, int]:
    """Steps of :func:`_partner_row`: offsets up to ``e2`` exist on both sides of ``a``,
    up to ``e1`` on at least one side, and ``z`` positions do not overlap ``a`` at all."""
    near = a if a < n - 1 - a else n - 1 - a
    far = n - 1 - near
    e2 = near if near < c - 1 else c - 1
    e1 = far if far < c - 1 else c - 1
    z = max(0, a - c + 1) + max(0, n - c - a)
    return e2, e1, z


def _draw_index(weights: np.ndarray, u: float) -> int:
    """Index ``i`` with probability ``weights[i] / weights.sum()`` (integer-valued float weights)."""
    cum = np.add.accumulate(weights)
    total = cum[-1]
    r = math.floor(u * total)
    if r >= total:
        r = total - 1
    return int(cum.searchsorted(r, side="right"))


def _draw_index_cum(cum: np.ndarray, u: float) -> int:
    """Like :func:`_draw_index` from precomputed cumulative weights."""
    total = cum[-1]
    r = math.floor(u * total)
    if r >= total:
        r = total - 1
    return int(cum.searchsorted(r, side="right"))


def _draw_first_start(plan: _ShapePlan, draws: list[float]) -> list[int]:
    """Start corner of the first crop: uniform over the positions that have a valid partner.

    Args:
        plan: the image shape's plan.
        draws: ``ndim + 1`` uniforms: the position on each axis, then the group (see below).

    When every position has a partner (``plan.all_uniform``) each axis is drawn on its
    own from ``draws[axis]``. Otherwise the positions of each axis are grouped by the
    largest offset class they can reach (``plan.groups``); ``draws[ndim]`` picks one
    group per axis at once (weight: does the group combination reach a valid class,
    times the number of positions in it, ``plan.first_cum``), then ``draws[axis]`` a
    position within the axis's group.
    """
    n_starts = plan.n
    ndim = len(n_starts)
    if plan.all_uniform:
        return [min(int(draws[axis] * n_starts[axis]), n_starts[axis] - 1) for axis in range(ndim)]
    cell = _draw_index_cum(plan.first_cum, draws[ndim])  # type: ignore[arg-type]
    group_of_axis = np.unravel_index(cell, plan.first_shape)
    start_a = []
    for axis in range(ndim):
        order, group_starts, group_sizes = plan.groups[axis]
        group = int(group_of_axis[axis])
        group_size = int(group_sizes[group])
        start_a.append(int(order[int(group_starts[group]) + min(int(draws[axis] * group_size), group_size - 1)]))
    return start_a


def _draw_offset_classes(
    plan: _ShapePlan, size: tuple[int, ...], start_a: list[int], draws: list[float]
) -> tuple[list[int], int]:
    """Offset classes of the second crop, axis by axis, exactly from their conditional laws.

    Args:
        plan: the image shape's plan (``plan.classes``: the class vectors allowed).
        size: crop size per axis.
        start_a: the first crop's start corner.
        draws: ``ndim`` uniforms: one per axis 0 .. last - 1, then one for the last axis.

    Returns:
        (class per axis, last_pick): ``last_pick`` says which of the partner positions of
        the last axis's class to take (drawn jointly with that class from the last draw).

    The weight of class ``t`` on axis ``j``, given the classes of the axes before it, is
    the number of partner positions of ``start_a`` at class ``t`` on that axis
    (:func:`_partner_row`) times the number of partners over the later axes whose class
    vector completes an allowed one. The sum over the last axis is read from prefix
    sums, because the last axis's partner row is a step function (1 at class 0, 2 up
    to ``both_max``, 1 up to ``one_max``, 0 below the crop size, ``n_apart`` at it).
    """
    classes = plan.classes
    n_starts = plan.n
    ndim = len(n_starts)
    last = ndim - 1
    both_max, one_max, n_apart = _row_steps(start_a[last], n_starts[last], size[last])
    offset_class: list[int] = []
    for axis in range(last):
        chosen = tuple(offset_class)
        # sum over the last axis of member * partner row, from the prefix sums (row is a step function)
        weights = (
            classes.prefix_cols[both_max + 1][chosen]
            + classes.prefix_cols[one_max + 1][chosen]
            - classes.first_col[chosen]
            + n_apart * classes.last_col[chosen]
        )
        for middle in range(last - 1, axis, -1):  # middle axes (3D only): contract with the partner row
            weights = weights @ _partner_row(start_a[middle], n_starts[middle], size[middle])
        offset_class.append(_draw_index(weights * _partner_row(start_a[axis], n_starts[axis], size[axis]), draws[axis]))
    # last axis: pick a step of the row (weight = partners per class x allowed classes in
    # the step), then a class in the step and one of its partner positions
    prefix = classes.prefix_rows[tuple(offset_class)].tolist()  # prefix[t]: allowed classes below t
    last_size = size[last]
    steps = ((0, 0, 1), (1, both_max, 2), (both_max + 1, one_max, 1), (last_size, last_size, n_apart))
    step_weights = [per_class * (prefix[hi + 1] - prefix[lo]) for lo, hi, per_class in steps]
    total = step_weights[0] + step_weights[1] + step_weights[2] + step_weights[3]
    rank = min(math.floor(draws[last] * total), total - 1)
    for (lo, hi, per_class), weight in zip(steps, step_weights):
        if rank < weight:
            break
        rank -= weight
    # rank // per_class: which allowed class of the step; rank % per_class: which of its partner positions
    offset_class.append(bisect.bisect_right(prefix, prefix[lo] + rank // per_class) - 1)
    return offset_class, rank % per_class


def _place_partner(
    n_starts: tuple[int, ...],
    size: tuple[int, ...],
    start_a: list[int],
    offset_class: list[int],
    draws: list[float],
    last_pick: int,
) -> list[int]:
    """Start corner of the second crop from the first one and the offset classes.

    Args:
        n_starts: start positions per axis (image size - crop size + 1).
        size: crop size per axis.
        start_a: the first crop's start corner.
        offset_class: the drawn class per axis (``size[axis]``: no overlap on that axis).
        draws: ``ndim - 1`` uniforms, the partner position on axes 0 .. last - 1.
        last_pick: the partner position on the last axis (from :func:`_draw_offset_classes`).

    Class ``t < size``: the partner is ``t`` below or ``t`` above ``start_a`` (one of the
    two that exist; pick 0 prefers below). Class ``size``: one of the positions that do
    not overlap, those below ``start_a`` first.
    """
    last = len(n_starts) - 1
    start_b = []
    for axis in range(last + 1):
        t, pos_a, n_axis, c_axis = offset_class[axis], start_a[axis], n_starts[axis], size[axis]
        if t == 0:
            start_b.append(pos_a)
            continue
        below = pos_a - t >= 0 if t < c_axis else max(0, pos_a - c_axis + 1)  # partners below (bool or count)
        above = pos_a + t <= n_axis - 1 if t < c_axis else max(0, n_axis - c_axis - pos_a)  # partners above
        n_partners = int(below) + int(above)
        pick = last_pick if axis == last else min(int(draws[axis] * n_partners), n_partners - 1)
        if t < c_axis:
            start_b.append(pos_a - t if below and (pick == 0 or not above) else pos_a + t)
        else:
            start_b.append(pick if pick < below else pos_a + c_axis + (pick - below))
    return start_b


# --------------------------------------------------------------------------- the sampler


class _PairSampler:
    """What both samplers share: :meth:`sample` on top of their ``sample_pair``."""

    def sample_pair(self, image_shape: Sequence[int], rng: RNG) -> CropPair:
        raise NotImplementedError

    def sample(self, image_shape: Sequence[int], rng: RNG) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Draw one pair of crop start corners for an image of spatial shape ``image_shape``.

        Args:
            image_shape: spatial shape (2 or 3 ints, no channel axis).
            rng: a ``numpy.random.Generator`` or ``numpy.random.RandomState``; all randomness comes from it.

        Returns:
            ``(start_a, start_b)``, tuples of Python ints; both crops lie inside the image.

        Raises:
            ValueError: bad shape, or (``strict=True``) an image that admits no pair in the interval.
        """
        pair = self.sample_pair(image_shape, rng)
        return pair.start_a, pair.start_b


class IoUCropSampler(_PairSampler):
    """Exact sampler of crop pairs with ``min_iou <= IoU <= max_iou``.

    Args:
        crop_size: crop size, an int (square / cubic crops, any number of axes) or one
            int per axis (rectangular / cuboid crops; fixes the number of axes).
        min_iou: lower end of the IoU interval, in [0, 1].
        max_iou: upper end of the IoU interval, in [min_iou, 1].
        strict: when an image admits no pair in the interval, raise ValueError (True)
            or return the realisable pair whose IoU is closest to the interval and count
            it in ``stats["infeasible"]`` (False).
        cache_size: number of image shapes whose (small) sampling plan is kept.

    Raises:
        ValueError: an invalid interval or crop size (the message holds the values).

    ``stats`` is ``{"pairs": pairs drawn, "infeasible": pairs that could not meet the
    interval}``; in a multi-worker DataLoader each worker counts its own pairs, so use
    the ``iou_feasible`` entry of :class:`IoUCropd` (``store_boxes=True``) to audit there.
    """

    def __init__(
        self,
        crop_size: SizeLike,
        min_iou: float = 0.0,
        max_iou: float = 1.0,
        strict: bool = False,
        cache_size: int = 4096,
    ) -> None:
        for name, v in (("min_iou", min_iou), ("max_iou", max_iou)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if float(min_iou) > float(max_iou):
            raise ValueError(f"min_iou {min_iou} is larger than max_iou {max_iou}")
        if _is_int(crop_size):
            if int(crop_size) <= 0:
                raise ValueError(f"crop_size must be positive, got {crop_size}")
            self.ndim: int | None = None
            self._size_arg: SizeLike = int(crop_size)
        else:
            size = _crop_size_tuple(crop_size, len(tuple(crop_size)))  # type: ignore[arg-type]
            if len(size) not in (2, 3):
                raise ValueError(f"crop_size {size} must have 2 or 3 values (2D or 3D crops)")
            self.ndim = len(size)
            self._size_arg = size
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.min_iou = float(min_iou)
        self.max_iou = float(max_iou)
        self.strict = bool(strict)
        self.cache_size = int(cache_size)
        self._tables: dict[int, _ClassTable] = {}
        self._plans: collections.OrderedDict[tuple[int, ...], _ShapePlan] = collections.OrderedDict()
        self._closest: dict[tuple[int, ...], _ClassSet] = {}
        self._pairs = 0
        self._infeasible = 0

    # ---- small public helpers

    def __repr__(self) -> str:
        return (
            f"IoUCropSampler(crop_size={self._size_arg}, min_iou={self.min_iou}, max_iou={self.max_iou}, "
            f"strict={self.strict})"
        )

    def __getstate__(self) -> dict:
        # caches are rebuilt on demand; do not ship them to DataLoader workers
        state = self.__dict__.copy()
        state["_tables"] = {}
        state["_plans"] = collections.OrderedDict()
        state["_closest"] = {}
        return state

    @property
    def stats(self) -> dict[str, int]:
        """``{"pairs": ..., "infeasible": ...}`` since construction or the last :meth:`reset_stats`."""
        return {"pairs": self._pairs, "infeasible": self._infeasible}

    def reset_stats(self) -> None:
        """Set both counters of :attr:`stats` to zero."""
        self._pairs = 0
        self._infeasible = 0

    def crop_size_for(self, ndim: int) -> tuple[int, ...]:
        """The crop size as one int per axis for images with ``ndim`` spatial axes.

        Raises:
            ValueError: ``ndim`` is not 2 or 3, or does not match a per-axis ``crop_size``.
        """
        if ndim not in (2, 3):
            raise ValueError(f"images must have 2 or 3 spatial axes, got {ndim}")
        return _crop_size_tuple(self._size_arg, ndim)

    def is_feasible(self, image_shape: Sequence[int]) -> bool:
        """True when an image of spatial shape ``image_shape`` admits a pair in the interval.

        Raises:
            ValueError: the shape has the wrong number of axes or is smaller than the crop.
        """
        return self._plan(tuple(image_shape)).feasible

    # ---- sampling (``sample``: see :class:`_PairSampler`)

    def sample_pair(self, image_shape: Sequence[int], rng: RNG) -> CropPair:
        """Like :meth:`sample`, but also returns the pair's IoU and whether it is in the interval.

        Every pair takes exactly ``3 * ndim`` uniform draws on [0, 1) from ``rng``, in one
        call (``rng.random`` or ``RandomState.random_sample``), whatever the image and the
        interval; ``ndim`` is the number of spatial axes and ``last = ndim - 1``::

            draws[0 : ndim]                first crop: its position on each axis (uniform over
                                           the axis, or within the group drawn with draws[ndim])
            draws[ndim]                    first crop: one group of positions per axis, when
                                           some positions have no partner (else unused)
            draws[ndim + 1 : 2 * ndim]     second crop: the offset class on axes 0 .. last - 1,
                                           each given the classes drawn before it
            draws[2 * ndim]                second crop: the offset class on the last axis and,
                                           jointly, the partner position on that axis
            draws[2 * ndim + 1 : 3 * ndim] second crop: the partner position on axes 0 .. last - 1
                                           (below or above the first crop, or which of the
                                           non-overlapping positions; unused for class 0)

        Each draw picks among integer weights by ``floor(draw * total)``, so the result
        is a deterministic function of the draws (see :func:`_draw_index`).
        """
        shape = tuple(image_shape) if not isinstance(image_shape, tuple) else image_shape
        plan = self._plans.get(shape)
        if plan is None:
            plan = self._plan(shape)
        if not plan.feasible and self.strict:
            raise _no_pair_error(shape, self.crop_size_for(len(shape)), self.min_iou, self.max_iou)
        if _is_random_state(rng):
            draws = rng.random_sample(3 * len(shape)).tolist()
        else:
            draws = rng.random(3 * len(shape)).tolist()
        table = self._tables[len(shape)]
        ndim = len(shape)
        start_a = _draw_first_start(plan, draws[: ndim + 1])
        offset_class, last_pick = _draw_offset_classes(plan, table.size, start_a, draws[ndim + 1 : 2 * ndim + 1])
        start_b = _place_partner(plan.n, table.size, start_a, offset_class, draws[2 * ndim + 1 :], last_pick)
        self._pairs += 1
        if not plan.feasible:
            self._infeasible += 1
        return CropPair(tuple(start_a), tuple(start_b), float(table.iou[tuple(offset_class)]), plan.feasible)

    # ---- per-shape plan

    def _table(self, ndim: int) -> _ClassTable:
        table = self._tables.get(ndim)
        if table is None:
            table = _ClassTable(self.crop_size_for(ndim), self.min_iou, self.max_iou)
            self._tables[ndim] = table
        return table

    def _plan(self, shape: tuple[int, ...]) -> _ShapePlan:
        plan = self._plans.get(shape)
        if plan is not None:
            return plan
        if self.ndim is not None and len(shape) != self.ndim:
            raise ValueError(
                f"image shape {shape} has {len(shape)} axes, but crop_size {self._size_arg} has {self.ndim}"
            )
        if len(shape) not in (2, 3):
            raise ValueError(f"image shape {shape} must have 2 or 3 spatial axes (no channel axis)")
        if not all(_is_int(s) and s > 0 for s in shape):
            raise ValueError(f"image shape {shape} must contain positive integers")
        shape = tuple(int(s) for s in shape)
        table = self._table(len(shape))
        size = table.size
        if any(s < c for s, c in zip(shape, size)):
            raise ValueError(f"crop size {size} is larger than the image {shape} on at least one axis")
        n = tuple(s - c + 1 for s, c in zip(shape, size))
        # first crop at position a can reach offset classes 0..m(a) on each axis,
        # m(a) = min(max(a, n - 1 - a), c); the largest m is min(n - 1, c), the smallest
        # min(ceil((n - 1) / 2), c)
        m_max = tuple(min(ni - 1, ci) for ni, ci in zip(n, size))
        m_min = tuple(min(ni // 2, ci) for ni, ci in zip(n, size))
        plan = _ShapePlan()
        plan.n = n
        plan.feasible = bool(table.valid.reach[m_max])
        if plan.feasible:
            plan.classes = table.valid
        else:
            # the closest realisable classes: offsets up to m_max exist in this image
            closest = self._closest.get(m_max)
            if closest is None:
                box = tuple(slice(0, m + 1) for m in m_max)
                dmin = table.dist[box].min()
                member = np.zeros(table.iou.shape, dtype=bool)
                member[box] = table.dist[box] == dmin
                closest = _ClassSet(member)
                self._closest[m_max] = closest
            plan.classes = closest
        reach = plan.classes.reach
        plan.all_uniform = bool(reach[m_min])
        if not plan.all_uniform:
            groups = []
            mvals = []
            for ni, ci in zip(n, size):
                pos = np.arange(ni)
                m = np.minimum(np.maximum(pos, ni - 1 - pos), ci)
                order = np.argsort(m, kind="stable")
                values, counts = np.unique(m, return_counts=True)
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                groups.append((order, starts, counts))
                mvals.append(values)
            weight = reach[np.ix_(*mvals)].astype(np.float64)
            for i, (_, _, counts) in enumerate(groups):
                shp = [1] * len(n)
                shp[i] = len(counts)
                weight = weight * counts.reshape(shp).astype(np.float64)
            plan.first_cum = np.cumsum(weight.ravel())
            plan.first_shape = weight.shape
            plan.groups = groups
        self._plans[shape] = plan
        if len(self._plans) > self.cache_size:
            self._plans.popitem(last=False)
        return plan


# --------------------------------------------------------------------------- the original's Algorithm 1


#: The crop-pair samplers a pipeline can use: this project's exact one, or the original's Algorithm 1.
IOU_SAMPLERS: tuple[str, ...] = ("exact", "original")


def _randint(rng: RNG, low: int, high: int) -> int:
    """One integer uniform on ``[low, high)``: ``RandomState.randint`` (as the original's
    ``self.R.randint``) or ``Generator.integers``."""
    return int(rng.randint(low, high) if _is_random_state(rng) else rng.integers(low, high))


class OriginalIoUSampler(_PairSampler):
    """The original work's trial-and-error sampler: Algorithm 1 of the thesis, for comparison.

    Algorithm 1 with ``r1 = 30`` and ``r2 = 4`` (the thesis' values): up to ``r2`` times,
    draw the first crop uniformly over the image, then draw the second crop up to ``r1``
    times and return the first pair whose IoU lies in [min_iou, max_iou]; after ``r2 * r1``
    failures return the last pair drawn, whatever its IoU (the fallback to a random pair).
    As in the original code, when ``min_iou > 0`` the second crop is drawn only among the
    positions that overlap the box grown by one crop size around the first (start within
    ``crop_size`` of the first's on every axis, clipped to the image); with ``min_iou == 0``
    anywhere in the image.

    The draws are the original's, in its order: one ``randint`` per axis and crop from the
    random state, for axis 1 first, then axis 0, then axis 2 (the original swaps the first
    two axes to draw "x" first), so a ``RandomState`` in the same state gives the
    original's crops. Unlike the original it accepts rectangular / cuboid crops, does not
    print on a fallback but counts it (``stats["fallbacks"]``), and with ``strict=True``
    refuses images that admit no pair in the interval at all.

    The interface is that of :class:`IoUCropSampler` (``sample``, ``sample_pair``, ``stats``,
    ``crop_size_for``, ``is_feasible``), so :class:`IoUCrop` / :class:`IoUCropd` take either
    (``sampler="original"``). A pair's ``feasible`` says, as there, whether the image admits
    a pair in the interval; whether this pair is in it is ``min_iou <= pair.iou <= max_iou``
    (False for every fallback).

    Args:
        crop_size, min_iou, max_iou, strict, cache_size: as :class:`IoUCropSampler`.
        r1: draws of the second crop per first crop (30 in the thesis).
        r2: draws of the first crop before the fallback (4 in the thesis).

    Raises:
        ValueError: an invalid interval, crop size, ``r1`` or ``r2`` (the message holds the values).
    """

    def __init__(
        self,
        crop_size: SizeLike,
        min_iou: float = 0.0,
        max_iou: float = 1.0,
        strict: bool = False,
        r1: int = 30,
        r2: int = 4,
        cache_size: int = 4096,
    ) -> None:
        # the exact sampler checks the arguments and the image shapes, and knows which images admit the interval
        self._exact = IoUCropSampler(crop_size, min_iou, max_iou, strict=False, cache_size=cache_size)
        for name, v in (("r1", r1), ("r2", r2)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.min_iou = self._exact.min_iou
        self.max_iou = self._exact.max_iou
        self.strict = bool(strict)
        self.r1 = int(r1)
        self.r2 = int(r2)
        self._pairs = 0
        self._infeasible = 0
        self._fallbacks = 0

    def __repr__(self) -> str:
        return (
            f"OriginalIoUSampler(crop_size={self._exact._size_arg}, min_iou={self.min_iou}, max_iou={self.max_iou}, "
            f"strict={self.strict}, r1={self.r1}, r2={self.r2})"
        )

    @property
    def stats(self) -> dict[str, int]:
        """``{"pairs", "infeasible": pairs from images that admit no pair in the interval,
        "fallbacks": pairs returned after r2 x r1 failed draws (outside the interval)}``."""
        return {"pairs": self._pairs, "infeasible": self._infeasible, "fallbacks": self._fallbacks}

    def reset_stats(self) -> None:
        """Set every counter of :attr:`stats` to zero."""
        self._pairs = self._infeasible = self._fallbacks = 0

    def crop_size_for(self, ndim: int) -> tuple[int, ...]:
        """As :meth:`IoUCropSampler.crop_size_for`."""
        return self._exact.crop_size_for(ndim)

    def is_feasible(self, image_shape: Sequence[int]) -> bool:
        """As :meth:`IoUCropSampler.is_feasible` (whether any pair of this image is in the interval)."""
        return self._exact.is_feasible(image_shape)

    def sample_pair(self, image_shape: Sequence[int], rng: RNG) -> CropPair:
        """Algorithm 1 for an image of spatial shape ``image_shape``.

        Args:
            image_shape: spatial shape (2 or 3 ints, no channel axis).
            rng: a ``numpy.random.RandomState`` (the original's ``self.R``) or ``Generator``.

        Returns:
            The pair, its IoU and whether the image admits a pair in the interval.

        Raises:
            ValueError: bad shape, or (``strict=True``) an image that admits no pair in the interval.
        """
        shape = tuple(image_shape)
        feasible = self._exact.is_feasible(shape)  # also checks the shape against the crop size
        size = self._exact.crop_size_for(len(shape))
        if not feasible and self.strict:
            raise _no_pair_error(shape, size, self.min_iou, self.max_iou)
        n_starts = [int(s) - c + 1 for s, c in zip(shape, size)]
        order = (1, 0) + tuple(range(2, len(shape)))  # the original draws x (array axis 1) first
        start_a = start_b = [0] * len(shape)
        iou = 0.0
        for _ in range(self.r2):
            start_a = [0] * len(shape)
            for axis in order:
                start_a[axis] = _randint(rng, 0, n_starts[axis])
            if self.min_iou > 0:  # second crop near the first: start within one crop size, inside the image
                low = [max(a - c, 0) for a, c in zip(start_a, size)]
                high = [min(a + c, n - 1) + 1 for a, c, n in zip(start_a, size, n_starts)]
            else:
                low, high = [0] * len(shape), n_starts
            for _ in range(self.r1):
                start_b = [0] * len(shape)
                for axis in order:
                    start_b[axis] = _randint(rng, low[axis], high[axis])
                iou = crop_iou(start_a, start_b, size)
                if self.min_iou <= iou <= self.max_iou:
                    return self._count(CropPair(tuple(start_a), tuple(start_b), iou, feasible), fallback=False)
        return self._count(CropPair(tuple(start_a), tuple(start_b), iou, feasible), fallback=True)

    def _count(self, pair: CropPair, fallback: bool) -> CropPair:
        self._pairs += 1
        self._infeasible += not pair.feasible
        self._fallbacks += fallback
        return pair


def make_sampler(
    kind: str, crop_size: SizeLike, min_iou: float = 0.0, max_iou: float = 1.0, strict: bool = False
) -> IoUCropSampler | OriginalIoUSampler:
    """The crop-pair sampler ``kind`` (one of :data:`IOU_SAMPLERS`): ``"exact"`` is
    :class:`IoUCropSampler` (this project's), ``"original"`` :class:`OriginalIoUSampler`
    (the thesis' Algorithm 1, r1 = 30, r2 = 4).

    Raises:
        ValueError: an unknown ``kind``, or bad sampler arguments.
    """
    if kind == "exact":
        return IoUCropSampler(crop_size, min_iou, max_iou, strict)
    if kind == "original":
        return OriginalIoUSampler(crop_size, min_iou, max_iou, strict)
    raise ValueError(f"sampler must be one of {', '.join(IOU_SAMPLERS)}, got {kind!r}")


# --------------------------------------------------------------------------- cutting


_CROPPER = Crop()


def cut_crop(img: Any, start: Sequence[int], size: Sequence[int]) -> Any:
    """Cut ``img[:, start_0:start_0+size_0, ...]`` from a channel-first image, keeping its type.

    MetaTensors go through MONAI's ``Crop`` (affine updated, operation recorded);
    torch tensors and numpy arrays are sliced. As with MONAI's own crop transforms
    the result is a view of the input (no copy): the two crops of a pair may share
    memory where they overlap, so copy before modifying one of them in place.
    """
    slices = tuple(slice(int(s), int(s) + int(c)) for s, c in zip(start, size))
    if isinstance(img, MetaTensor):
        return _CROPPER(img, slices, lazy=False)
    if isinstance(img, (torch.Tensor, np.ndarray)):
        return img[(slice(None),) + slices]
    raise TypeError(f"expected a numpy array, torch tensor or MetaTensor, got {type(img).__name__}")


def _spatial_shape(img: Any, name: str) -> tuple[int, ...]:
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name}: expected a numpy array, torch tensor or MetaTensor, got {type(img).__name__}")
    if img.ndim not in (3, 4):
        raise ValueError(
            f"{name}: expected a channel-first 2D or 3D image (C, H, W[, D]), got shape {tuple(img.shape)}"
        )
    return tuple(int(s) for s in img.shape[1:])


# --------------------------------------------------------------------------- MONAI transforms


class IoUCrop(Randomizable, Transform):
    """Two crops of a channel-first image with IoU in [min_iou, max_iou] (array-level MONAI transform).

    ``__call__(img, randomize=True) -> (crop1, crop2)``. After a call, ``start_a``,
    ``start_b`` (tuples of ints), ``iou`` (float) and ``feasible`` (bool) describe the
    last pair. With ``randomize=False`` the last boxes are reused. For example, with
    ``crop_size=96`` an image of shape ``(1, 300, 250)`` gives two crops of shape
    ``(1, 96, 96)``, and one of shape ``(2, 200, 200, 120)`` with ``crop_size=(64, 64, 32)``
    two of shape ``(2, 64, 64, 32)``.

    Args:
        crop_size: crop size, an int or one int per spatial axis.
        min_iou, max_iou, strict: see :class:`IoUCropSampler`.
        sampler: ``"exact"`` (:class:`IoUCropSampler`, this project's) or ``"original"``
            (:class:`OriginalIoUSampler`, the thesis' Algorithm 1 with its fallback to a
            random pair); both draw from ``self.R``.

    Raises:
        ValueError: a bad crop size, interval or sampler (the message holds the values); at call
            time, an image that is not channel-first 2D / 3D or smaller than the crop, or
            (``strict=True``) one that admits no pair in the interval.
        TypeError: an image that is not a numpy array, torch tensor or MetaTensor.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        crop_size: SizeLike,
        min_iou: float = 0.0,
        max_iou: float = 1.0,
        strict: bool = False,
        sampler: str = "exact",
    ) -> None:
        self.sampler = make_sampler(sampler, crop_size, min_iou, max_iou, strict)
        self.start_a: tuple[int, ...] | None = None
        self.start_b: tuple[int, ...] | None = None
        self.iou: float | None = None
        self.feasible: bool | None = None

    @property
    def stats(self) -> dict[str, int]:
        """The sampler's counters (pairs drawn, infeasible pairs; fallbacks of the original) in this process."""
        return self.sampler.stats

    def randomize(self, data: Sequence[int]) -> None:
        """Draw a pair for an image of spatial shape ``data`` from ``self.R``."""
        pair = self.sampler.sample_pair(tuple(data), self.R)
        self.start_a, self.start_b, self.iou, self.feasible = pair

    def __call__(self, img: Any, randomize: bool = True) -> tuple[Any, Any]:
        shape = _spatial_shape(img, "IoUCrop")
        if randomize:
            self.randomize(shape)
        elif self.start_a is None:
            raise RuntimeError("IoUCrop called with randomize=False before any pair was drawn")
        size = self.sampler.crop_size_for(len(shape))
        return cut_crop(img, self.start_a, size), cut_crop(img, self.start_b, size)  # type: ignore[arg-type]


class IoUCropd(Randomizable, MapTransform):
    """Dictionary version of :class:`IoUCrop`: the same two boxes for every key.

    Like MONAI's ``RandSpatialCropd`` around ``RandSpatialCrop``, it holds an
    :class:`IoUCrop` (``self.cropper``), draws one pair per call with it and cuts that
    pair from every key. For each key ``k`` it writes ``{k}1`` and ``{k}2`` and drops
    ``{k}``. With ``store_boxes=True`` it also writes ``iou_start1`` and ``iou_start2``
    (int64 arrays of shape ``(spatial_dims,)``), ``iou_value`` (float, the realised IoU)
    and ``iou_feasible`` (bool, False when the image admitted no pair in the interval;
    the exact sampler then returns the closest pair). Crops are views of the input, as with MONAI's
    own crop transforms (see :func:`cut_crop`).

    Example: ``IoUCropd(["image", "label"], spatial_dims=2, crop_size=96, min_iou=0.3,
    max_iou=0.6, store_boxes=True)`` turns ``{"image": (1, 300, 250) array, "label":
    (1, 300, 250) array, "case": "x"}`` into ``{"case": "x", "image1", "image2",
    "label1", "label2": (1, 96, 96) each, "iou_start1", "iou_start2": int64 (2,) each,
    "iou_value": float in [0.3, 0.6], "iou_feasible": True}``; ``image1`` and ``label1``
    are cut from the same box. With ``spatial_dims=3`` and ``crop_size=(64, 64, 32)`` a
    ``(1, 200, 200, 120)`` volume gives ``(1, 64, 64, 32)`` crops and ``(3,)`` starts.

    Args:
        keys: keys of the channel-first images to crop (image and label get identical boxes).
        spatial_dims: 2 for slices (C, H, W), 3 for volumes (C, H, W, D).
        crop_size: crop size, an int or one int per spatial axis.
        min_iou, max_iou, strict: see :class:`IoUCropSampler`.
        sampler: ``"exact"`` or ``"original"`` (the thesis' Algorithm 1), see :class:`IoUCrop`.
        store_boxes: also write the boxes, IoU and feasibility (pair audit, debugging).
        allow_missing_keys: skip keys absent from the data instead of raising KeyError.

    Raises:
        ValueError: bad arguments (the message holds the values); at call time, images
            of the wrong dimensionality, keys whose spatial shapes differ, an output key
            that already exists, or (``strict=True``) an image admitting no pair.
        KeyError: a key is missing and ``allow_missing_keys`` is False.
    """

    backend = IoUCrop.backend

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        crop_size: SizeLike = 96,
        min_iou: float = 0.0,
        max_iou: float = 1.0,
        strict: bool = False,
        store_boxes: bool = False,
        allow_missing_keys: bool = False,
        sampler: str = "exact",
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = int(spatial_dims)
        self.crop_size = _crop_size_tuple(crop_size, self.spatial_dims)
        self.cropper = IoUCrop(self.crop_size, min_iou, max_iou, strict, sampler)
        self.store_boxes = bool(store_boxes)

    @property
    def sampler(self) -> IoUCropSampler | OriginalIoUSampler:
        """The wrapped :class:`IoUCrop`'s sampler."""
        return self.cropper.sampler

    @property
    def pair(self) -> CropPair | None:
        """The last pair drawn (None before the first)."""
        c = self.cropper
        if c.start_a is None:
            return None
        return CropPair(c.start_a, c.start_b, c.iou, c.feasible)  # type: ignore[arg-type]

    @property
    def stats(self) -> dict[str, int]:
        """The sampler's counters (pairs drawn, infeasible pairs; fallbacks of the original) in this process."""
        return self.cropper.stats

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> IoUCropd:
        """Set ``self.R`` (see MONAI's ``Randomizable``); the wrapped :class:`IoUCrop` shares it. Returns self."""
        super().set_random_state(seed, state)
        self.cropper.set_random_state(state=self.R)
        return self

    def randomize(self, data: Sequence[int]) -> None:
        """Draw the pair for spatial shape ``data`` from ``self.R``, with the wrapped :class:`IoUCrop`."""
        if self.cropper.R is not self.R:  # R replaced without set_random_state: share it again
            self.cropper.set_random_state(state=self.R)
        self.cropper.randomize(data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize(self._spatial_shape_of(d, keys))
        for key in keys:
            d[f"{key}1"], d[f"{key}2"] = self.cropper(d.pop(key), randomize=False)
        if self.store_boxes:
            pair = self.pair
            assert pair is not None
            d["iou_start1"] = np.asarray(pair.start_a, dtype=np.int64)
            d["iou_start2"] = np.asarray(pair.start_b, dtype=np.int64)
            d["iou_value"] = float(pair.iou)
            d["iou_feasible"] = bool(pair.feasible)
        return d

    def _spatial_shape_of(self, d: dict, keys: list) -> tuple[int, ...]:
        """The spatial shape all ``keys`` share.

        Raises:
            ValueError: an image of the wrong dimensionality, two keys with different
                spatial shapes, or an output key already in the data.
        """
        shape = None
        for key in keys:
            s = _spatial_shape(d[key], f"IoUCropd key {key!r}")
            if len(s) != self.spatial_dims:
                raise ValueError(
                    f"IoUCropd key {key!r}: shape {tuple(d[key].shape)} is not channel-first {self.spatial_dims}D"
                )
            if shape is None:
                shape = s
            elif s != shape:
                raise ValueError(f"IoUCropd: key {key!r} has spatial shape {s}, key {keys[0]!r} has {shape}")
            for suffix in ("1", "2"):
                if f"{key}{suffix}" in d:
                    raise ValueError(f"IoUCropd: output key {key}{suffix!s} already exists in the data")
        assert shape is not None
        return shape


# --------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw crop pairs with IoU in [min_iou, max_iou] and print them (a quick look at the sampler).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("image and crops")
    g.add_argument(
        "--image_shape",
        type=int,
        nargs="+",
        required=True,
        help="spatial shape of the image, 2 or 3 ints in array order (no channel axis)",
    )
    g.add_argument(
        "--crop_size",
        type=int,
        nargs="+",
        default=[96],
        help="crop size: one int for square/cubic crops or one per axis for rectangular/cuboid crops",
    )
    g = parser.add_argument_group("interval")
    g.add_argument("--min_iou", type=float, default=0.3, help="lower end of the IoU interval (paper's best: 0.3)")
    g.add_argument("--max_iou", type=float, default=0.6, help="upper end of the IoU interval (paper's best: 0.6)")
    g.add_argument(
        "--strict",
        action="store_true",
        help="fail when the image admits no pair in the interval instead of returning the closest pair",
    )
    g = parser.add_argument_group("sampling")
    g.add_argument(
        "--sampler",
        choices=IOU_SAMPLERS,
        default="exact",
        help="exact: this project's sampler; original: the thesis' Algorithm 1 (r1 = 30, r2 = 4, then the last "
        "pair drawn whatever its IoU), to see how often it misses the interval",
    )
    g.add_argument("--n", type=int, default=5, help="number of pairs to print")
    g.add_argument("--seed", type=int, default=0, help="seed of the numpy Generator; change it for other pairs")
    return parser


def main(args: argparse.Namespace) -> list[CropPair]:
    crop = args.crop_size[0] if len(args.crop_size) == 1 else tuple(args.crop_size)
    try:
        sampler = make_sampler(args.sampler, crop, args.min_iou, args.max_iou, strict=args.strict)
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        rng = np.random.default_rng(args.seed)
        pairs = [sampler.sample_pair(tuple(args.image_shape), rng) for _ in range(args.n)]
    except ValueError as e:
        raise UserError(str(e)) from None
    if not sampler.is_feasible(tuple(args.image_shape)):
        logger.warning(
            "the image admits no pair in the interval: printing %s pairs",
            "the closest" if args.sampler == "exact" else "the original's fallback",
        )
    print(f"{'start_a':>20} {'start_b':>20} {'IoU':>8} in_interval")
    for p in pairs:
        print(f"{str(p.start_a):>20} {str(p.start_b):>20} {p.iou:8.4f} {args.min_iou <= p.iou <= args.max_iou}")
    return pairs


if __name__ == "__main__":
    run_cli(main, get_args_parser())
