"""MONAI pipelines: the paper's augmentations of pretraining views and of fine-tuning crops.

Pretraining: each of the two IoU crops gets its own, independent chain, in the paper's
order and with its probabilities::

    zoom 0.8-1.2 (p 0.75) -> flip x (p 0.5) -> flip y (p 0.5) -> rotate k x 90 deg (p 0.5)
    -> intensity scale factor in [-0.1, 0.1] (p 0.75) -> intensity shift in [-0.1, 0.1] (p 0.75)
    -> Gaussian blur sigma 0.25-1.5 per axis (p 0.25) -> Gaussian noise sigma 0.01 (p 0.25)

The whole pretraining pipeline (:func:`pretrain_transforms`) for one image path::

    load (2D PNG slice via data.read_image_2d, or 3D volume via LoadImaged)
    -> pad to at least crop_size -> IoUCropd: two crops with IoU in [min_iou, max_iou]
    -> view chain on image1, an independent view chain on image2
    -> {"image1", "image2", "iou_value", "iou_feasible"}

Fine-tuning: flips x and y (p 0.25), rotate 90 (p 0.25), then blur, intensity scale,
intensity shift and noise (p 0.15 each); geometric ones move image and label together.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
)

logger = logging.getLogger(__name__)


def _blur(keys: Sequence[str], spatial_dims: int, prob: float) -> RandGaussianSmoothd:
    sig = (0.25, 1.5)
    return RandGaussianSmoothd(keys, sigma_x=sig, sigma_y=sig, sigma_z=sig if spatial_dims == 3 else (0.0, 0.0), prob=prob)


def view_augmentations(key: str, spatial_dims: int) -> Compose:
    """The paper's augmentation chain for one pretraining view stored under ``key``.

    Build one chain per view: two chains draw independent random parameters.
    In 3D, flips act on x and y and rotations in the axial (x, y) plane, as in 2D.
    Gaussian noise uses MONAI's default of a standard deviation drawn in [0, 0.01].
    """
    k = [key]
    return Compose(
        [
            RandZoomd(k, prob=0.75, min_zoom=0.8, max_zoom=1.2, keep_size=True, mode="bilinear", padding_mode="constant"),
            RandFlipd(k, prob=0.5, spatial_axis=0),
            RandFlipd(k, prob=0.5, spatial_axis=1),
            RandRotate90d(k, prob=0.5, max_k=3, spatial_axes=(0, 1)),
            RandScaleIntensityd(k, factors=0.1, prob=0.75),
            RandShiftIntensityd(k, offsets=0.1, prob=0.75),
            _blur(k, spatial_dims, prob=0.25),
            RandGaussianNoised(k, prob=0.25, mean=0.0, std=0.01),
        ]
    )


def finetune_augmentations(spatial_dims: int, image_key: str = "image", label_key: str = "label") -> Compose:
    """The paper's fine-tuning augmentations on an (image, label) crop."""
    both = [image_key, label_key]
    img = [image_key]
    return Compose(
        [
            RandFlipd(both, prob=0.25, spatial_axis=0),
            RandFlipd(both, prob=0.25, spatial_axis=1),
            RandRotate90d(both, prob=0.25, max_k=3, spatial_axes=(0, 1)),
            _blur(img, spatial_dims, prob=0.15),
            RandScaleIntensityd(img, factors=0.1, prob=0.15),
            RandShiftIntensityd(img, offsets=0.1, prob=0.15),
            RandGaussianNoised(img, prob=0.15, mean=0.0, std=0.01),
        ]
    )


def _threaded_map(fn: Any, paths: Sequence[str], threads: int, desc: str, progress: bool):
    """``fn(path)`` for every path, in order, from ``threads`` threads (0 = up to 8; PIL
    releases the GIL while reading), with a tqdm bar when ``progress``."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        yield from tqdm(pool.map(fn, paths), total=len(paths), desc=desc, disable=not progress, leave=False)


class SliceCache:
    """Decoded 2D slices held in memory as stored: uint8 (8-bit PNGs) or uint16 (16-bit).

    Built once, in the main process, before the DataLoader forks its workers: they share the
    buffers (copy-on-write pages that are never written), so a cache outlives the per-epoch
    workers. Slices live in one flat buffer per bit depth (a few thousand slices per buffer, no Python object per slice).
    :meth:`read` returns exactly what :func:`data.read_image_2d` returns for the file.

    Memory: X * Y bytes per 8-bit slice (twice that for 16-bit), e.g. 8.75 GB per 100k
    slices of 350 x 250 pixels.

    Args:
        paths: the PNG slices to decode.
        progress: show a tqdm bar while decoding.
        threads: decoding threads (PIL releases the GIL while decoding); 0 = up to 8.

    Raises:
        UserError: a file cannot be read as an 8- or 16-bit grayscale PNG (names the file).
    """

    CHUNK = 4096  # slices per buffer

    def __init__(self, paths: Sequence[str], progress: bool = True, threads: int = 0):
        from data import read_image_2d_stored

        paths = [str(p) for p in paths]
        self.index = {p: i for i, p in enumerate(paths)}
        n = len(paths)
        self.shapes = np.zeros((n, 2), dtype=np.int64)
        self.chunk = np.zeros(n, dtype=np.int64)  # which buffer holds slice i
        self.offsets = np.zeros(n, dtype=np.int64)  # where in it
        self.buffers: list[np.ndarray] = []  # flat uint8 / uint16 buffers of about CHUNK slices each
        pending: dict[Any, list[np.ndarray]] = {np.dtype(np.uint8): [], np.dtype(np.uint16): []}
        members: dict[Any, list[int]] = {np.dtype(np.uint8): [], np.dtype(np.uint16): []}

        def flush(dt: Any) -> None:
            if not pending[dt]:
                return
            self.buffers.append(np.concatenate(pending[dt]))
            off = 0
            for i, part in zip(members[dt], pending[dt]):
                self.chunk[i] = len(self.buffers) - 1
                self.offsets[i] = off
                off += part.size
            pending[dt], members[dt] = [], []

        for i, pic in enumerate(_threaded_map(read_image_2d_stored, paths, threads, "decoding slices", progress)):
            self.shapes[i] = pic.shape
            pending[pic.dtype].append(pic.ravel())
            members[pic.dtype].append(i)
            if len(pending[pic.dtype]) >= self.CHUNK:
                flush(pic.dtype)
        for dt in list(pending):
            flush(dt)

    @staticmethod
    def planned_nbytes(paths: Sequence[str], progress: bool = False, threads: int = 0) -> int:
        """Bytes a cache of ``paths`` will hold, from the PNG headers alone (no decoding).

        Raises:
            UserError: a file is missing or not an 8- or 16-bit grayscale PNG (names the file).
        """
        from data import stored_nbytes_2d

        return int(sum(_threaded_map(stored_nbytes_2d, paths, threads, "sizing the slice cache", progress and len(paths) >= 1000)))

    @classmethod
    def build(cls, paths: Sequence[str], what: str, flag: str, copies: int = 1, progress: bool = True) -> "SliceCache":
        """Check that the decoded ``paths`` fit in memory, decode them and log the size.

        The scripts' ``--cache_images`` goes through here: a cache that would not fit is
        refused before anything is decoded (:func:`utils.check_fits_in_memory`), instead
        of the system killing the run part-way through an epoch.

        Args:
            what: what the paths are, for the log and the error (e.g. ``"1,024 slices"``).
            flag: the option that asked for the cache, named in the error.
            copies: processes on this machine that each build the same cache (one per GPU
                under torchrun); the check counts them all.

        Raises:
            UserError: a file cannot be read, or the cache does not fit.
        """
        from utils import check_fits_in_memory, format_bytes

        need = cls.planned_nbytes(paths, progress=progress) * max(int(copies), 1)
        per = f" in each of {copies} processes" if copies > 1 else ""
        check_fits_in_memory(need, f"{flag}: {what}{per}", f"run without {flag}")
        cache = cls(paths, progress=progress)
        logger.info("%s: %s decoded, %s in memory%s", flag, what, format_bytes(cache.nbytes), per)
        return cache

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, path: object) -> bool:
        return str(path) in self.index

    @property
    def nbytes(self) -> int:
        """Bytes held by the decoded slices."""
        return int(sum(b.nbytes for b in self.buffers))

    def read(self, path: str) -> np.ndarray:
        """The slice ``path`` as :func:`data.read_image_2d` gives it: float32 (X, Y) in [0, 1].

        Raises:
            KeyError: ``path`` was not among the cached paths.
        """
        from data import stored_to_float

        return stored_to_float(self.read_stored(path))

    def read_stored(self, path: str) -> np.ndarray:
        """The slice ``path`` as stored in its PNG: uint8 or uint16 (X, Y), a read-only view
        (label slices: the ids, as :func:`data.read_label_2d` reads them before its checks).

        Raises:
            KeyError: ``path`` was not among the cached paths.
        """
        try:
            i = self.index[str(path)]
        except KeyError:
            raise KeyError(f"slice {path} is not in the image cache (built for {len(self)} other paths)") from None
        x, y = (int(v) for v in self.shapes[i])
        o = int(self.offsets[i])
        pic = self.buffers[int(self.chunk[i])][o : o + x * y].reshape(x, y)
        pic.flags.writeable = False
        return pic


class LoadSlice2Dd(MapTransform):
    """Replace the path under each key by the PNG slice it names, as a (1, X, Y) float32 array.

    Reading goes through :func:`data.read_image_2d` (8- or 16-bit PNG -> [0, 1]), or through
    ``cache`` (a :class:`SliceCache` holding every path; same values); a corrupt or
    unreadable file raises ``UserError`` naming the file.
    """

    def __init__(self, keys: Sequence[str], cache: SliceCache | None = None):
        super().__init__(keys)
        self.cache = cache

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from data import read_image_2d

        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (self.cache.read(d[key]) if self.cache is not None else read_image_2d(d[key]))[None]
        return d


class PadToAtLeastd(MapTransform):
    """Zero-pad each key's channel-first image symmetrically to at least ``spatial_size``
    per spatial axis, and hand it on as a plain numpy array.

    The same values as MONAI's ``SpatialPadd(keys, spatial_size, mode="constant")``
    (``floor(d / 2)`` before, the rest after), without its metadata tracking: the IoU crops
    that follow are then cut by plain slicing. This step and the MetaTensor crops cost about
    three quarters of the data pipeline's time per pair when the views are augmented on the
    device (``--batch_augment``); the images need no metadata after loading.
    """

    def __init__(self, keys: Sequence[str], spatial_size: Sequence[int]):
        super().__init__(keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, MetaTensor):
                img = img.as_tensor()
            arr = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            if arr.ndim != len(self.spatial_size) + 1:
                raise ValueError(f"PadToAtLeastd key {key!r}: expected a channel-first {len(self.spatial_size)}D image, got shape {arr.shape}")
            extra = [max(0, s - n) for n, s in zip(arr.shape[1:], self.spatial_size)]
            if any(extra):
                arr = np.pad(arr, [(0, 0)] + [(e // 2, e - e // 2) for e in extra], mode="constant")
            d[key] = arr
        return d


class LoadVolume3Dd(MapTransform):
    """Replace the path under each key by the NIfTI volume it names, channel first (1, X, Y, Z).

    MONAI's ``LoadImaged`` + ``EnsureChannelFirstd``, with any failure turned into a
    ``UserError`` that names the file.
    """

    def __init__(self, keys: Sequence[str]):
        super().__init__(keys)
        self.load = Compose([LoadImaged(keys, image_only=True, dtype=np.float32), EnsureChannelFirstd(keys)])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from utils import UserError

        try:
            return self.load(data)
        except Exception as e:
            paths = ", ".join(str(data[k]) for k in self.key_iterator(dict(data)))
            cause = e.__cause__ if e.__cause__ is not None else e
            raise UserError(f"cannot read volume {paths}: {type(cause).__name__}: {str(cause).strip()[:200]}") from None


def pretrain_transforms(
    spatial_dims: int,
    crop_size: int,
    min_iou: float,
    max_iou: float,
    strict: bool = False,
    augment: bool = True,
    cache: SliceCache | None = None,
) -> Compose:
    """The pretraining pipeline: image path in, two augmented IoU crops out.

    Input: ``{"image": path}`` (a PNG slice for ``spatial_dims`` 2, a preprocessed NIfTI
    volume for 3). Output: ``image1`` and ``image2`` (float32 tensors of shape
    ``(1, crop_size, ...)``), ``iou_value`` (the realised IoU of the two crops, before
    augmentation) and ``iou_feasible`` (False when the image admits no pair in the
    interval and the closest pair was used; the pretraining scripts log how often).

    Images smaller than the crop on an axis are zero-padded to it first (symmetrically).
    ``augment=False`` leaves out the view chains (the two crops as cut): for debugging, for
    tests that compare runs, and for ``--batch_augment``, where the chains run on the
    training device (``batch_augment.BatchViewAugment``). ``cache`` (2D only): read the
    slices from a :class:`SliceCache` instead of decoding the PNGs (same values).

    Raises:
        ValueError: bad ``spatial_dims``, crop size or interval (from ``IoUCropd``), or a
            cache with ``spatial_dims`` 3.
    """
    from iou_crops import IoUCropd

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if cache is not None and spatial_dims != 2:
        raise ValueError("an image cache holds 2D slices; it cannot serve spatial_dims 3")
    k = ["image"]
    if spatial_dims == 2:
        load: list = [LoadSlice2Dd(k, cache=cache)]
    else:
        load = [LoadVolume3Dd(k)]
    chain = [
        *load,
        PadToAtLeastd(k, spatial_size=[int(crop_size)] * spatial_dims),
        IoUCropd(k, spatial_dims, crop_size=crop_size, min_iou=min_iou, max_iou=max_iou, strict=strict, store_boxes=True),
        DeleteItemsd(["iou_start1", "iou_start2"]),
    ]
    if augment:
        chain += [view_augmentations("image1", spatial_dims), view_augmentations("image2", spatial_dims)]
    chain.append(EnsureTyped(["image1", "image2"], data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(chain)
