"""MONAI pipelines: the paper's augmentations of pretraining views and of fine-tuning crops.

Pretraining: each of the two IoU crops gets its own, independent chain, in the paper's
order and with its probabilities::

    zoom 0.8-1.2 (p 0.75) -> flip x (p 0.5) -> flip y (p 0.5) -> rotate k x 90 deg (p 0.5)
    -> intensity scale factor in [-0.1, 0.1] (p 0.75) -> intensity shift in [-0.1, 0.1] (p 0.75)
    -> Gaussian blur sigma 0.25-1.5 per axis (p 0.25) -> Gaussian noise sigma 0.01 (p 0.25)

Fine-tuning: flips x and y (p 0.25), rotate 90 (p 0.25), then blur, intensity scale,
intensity shift and noise (p 0.15 each); geometric ones move image and label together.
"""

from __future__ import annotations

from typing import Sequence

from monai.transforms import (
    Compose,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
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
