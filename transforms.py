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
    SpatialPadd,
)


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


class LoadSlice2Dd(MapTransform):
    """Replace the path under each key by the PNG slice it names, as a (1, X, Y) float32 array.

    Reading goes through :func:`data.read_image_2d` (8- or 16-bit PNG -> [0, 1]); a
    corrupt or unreadable file raises ``UserError`` naming the file.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from data import read_image_2d

        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = read_image_2d(d[key])[None]
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
) -> Compose:
    """The pretraining pipeline: image path in, two augmented IoU crops out.

    Input: ``{"image": path}`` (a PNG slice for ``spatial_dims`` 2, a preprocessed NIfTI
    volume for 3). Output: ``image1`` and ``image2`` (float32 tensors of shape
    ``(1, crop_size, ...)``), ``iou_value`` (the realised IoU of the two crops, before
    augmentation) and ``iou_feasible`` (False when the image admits no pair in the
    interval and the closest pair was used; the pretraining scripts log how often).

    Images smaller than the crop on an axis are zero-padded to it first (symmetrically).
    ``augment=False`` leaves out the view chains (the two crops as cut), for debugging
    and for tests that compare runs.

    Raises:
        ValueError: bad ``spatial_dims``, crop size or interval (from ``IoUCropd``).
    """
    from iou_crops import IoUCropd

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    k = ["image"]
    if spatial_dims == 2:
        load: list = [LoadSlice2Dd(k)]
    else:
        load = [LoadVolume3Dd(k)]
    chain = [
        *load,
        SpatialPadd(k, spatial_size=[int(crop_size)] * spatial_dims, mode="constant"),
        IoUCropd(k, spatial_dims, crop_size=crop_size, min_iou=min_iou, max_iou=max_iou, strict=strict, store_boxes=True),
        DeleteItemsd(["iou_start1", "iou_start2"]),
    ]
    if augment:
        chain += [view_augmentations("image1", spatial_dims), view_augmentations("image2", spatial_dims)]
    chain.append(EnsureTyped(["image1", "image2"], data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(chain)
