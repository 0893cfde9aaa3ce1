"""The paper's augmentation settings: one table read by both augmentation implementations.

``transforms.py`` builds MONAI's per-sample chains from it (DataLoader workers) and
``batch_augment.py`` the batched tensor chains (on the training device). This module
imports nothing, so the batched chains stay free of MONAI.

Pretraining view chain, in order (DESIGN.md, "Facts from the paper")::

    zoom (view_zoom_prob, view_zoom_range) -> flip x, flip y (view_flip_prob each)
    -> rotate k x 90 deg, k in 1..rot90_max_k (view_rot90_prob)
    -> intensity scale and shift in [-intensity_range, intensity_range] (view_intensity_prob each)
    -> Gaussian blur, sigma in blur_sigma per axis (view_blur_prob)
    -> Gaussian noise, std drawn in [0, noise_std] (view_noise_prob)

Fine-tuning chain, in order: flip x, flip y, rotate 90 (finetune_geometric_prob each; image
and label together), then blur, intensity scale, intensity shift and noise
(finetune_intensity_prob each; image only), with the same ranges.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of the pretraining view and fine-tuning augmentations.

    Attributes:
        view_zoom_prob: probability of the zoom of a pretraining view.
        view_zoom_range: (min, max) isotropic zoom factor.
        view_flip_prob: probability of each flip (x, then y) of a view.
        view_rot90_prob: probability of the rotation by k x 90 degrees of a view.
        view_intensity_prob: probability of the intensity scale, and of the shift, of a view.
        view_blur_prob: probability of the Gaussian blur of a view.
        view_noise_prob: probability of the Gaussian noise of a view.
        finetune_geometric_prob: probability of each flip and of the rotation of a fine-tuning crop.
        finetune_intensity_prob: probability of each of blur, scale, shift and noise of a crop.
        rot90_max_k: rotations draw k uniformly in 1..rot90_max_k.
        intensity_range: scale factors ``1 + f`` and shifts ``o`` draw f, o in [-range, range].
        blur_sigma: (min, max) of the blur's standard deviation, drawn per axis.
        noise_std: the noise's standard deviation is drawn per sample in [0, noise_std].
    """

    view_zoom_prob: float = 0.75
    view_zoom_range: tuple[float, float] = (0.8, 1.2)
    view_flip_prob: float = 0.5
    view_rot90_prob: float = 0.5
    view_intensity_prob: float = 0.75
    view_blur_prob: float = 0.25
    view_noise_prob: float = 0.25
    finetune_geometric_prob: float = 0.25
    finetune_intensity_prob: float = 0.15
    rot90_max_k: int = 3
    intensity_range: float = 0.1
    blur_sigma: tuple[float, float] = (0.25, 1.5)
    noise_std: float = 0.01


#: The paper's settings; the only instance the chains read.
AUGMENT = AugmentParams()
