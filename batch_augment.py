"""Batched tensor versions of the paper's view and fine-tuning augmentations, for the GPU.

The MONAI chains in ``transforms.py`` augment one sample at a time in DataLoader workers.
Here the same chains run on a whole collated batch, on whatever device the batch is on,
every sample with its own random parameters, with no Python loop over samples and no
host-device synchronisation::

    from batch_augment import BatchViewAugment
    aug = BatchViewAugment(spatial_dims=2, generator=torch.Generator(device="cuda").manual_seed(0))
    v1, v2 = aug(x1.cuda()), aug(x2.cuda())     # x1, x2: (B, 1, 96, 96) IoU crops, un-augmented

Half-precision batches are augmented in float32 and rounded back once at the end.

The distributions are MONAI's, read off its source (monai 1.6.1), transform by transform:

============================  ===============================================================
pretraining view (in order)   what one sample gets
============================  ===============================================================
zoom, p 0.75                  one factor z ~ U(0.8, 1.2) for every axis; bilinear resize to
                              floor(n z) voxels (``align_corners=False``, the source index
                              clamped at the borders as ``torch.nn.functional.interpolate``
                              does), then a centre crop or a symmetric zero pad back to n
flip axis 0, p 0.5            ``x[::-1]`` along the first spatial axis
flip axis 1, p 0.5            along the second
rotate 90, p 0.5              ``torch.rot90`` by k ~ U{1, 2, 3} in the plane of axes (0, 1)
intensity scale, p 0.75       x * (1 + f), f ~ U(-0.1, 0.1)
intensity shift, p 0.75       x + o, o ~ U(-0.1, 0.1)
Gaussian blur, p 0.25         sigma ~ U(0.25, 1.5) drawn per axis; MONAI's ``erf`` kernel
                              (truncated at 4 sigma, not normalised), zero borders
Gaussian noise, p 0.25        x + N(0, s^2) per voxel, s ~ U(0, 0.01) per sample
============================  ===============================================================

Fine-tuning (:class:`BatchFinetuneAugment`): flips (p 0.25 each) and rotate 90 (p 0.25) move
image and label together (labels are permuted, never interpolated), then blur, scale, shift
and noise (p 0.15 each) on the image only.

Every transform fires independently per sample with its probability, in the listed order.
The probabilities and ranges are read from :data:`augment_params.AUGMENT`, the table that
``transforms.py`` builds MONAI's chains from.
``tests/test_batch_augment.py`` checks each operation against its MONAI counterpart for
fixed parameters and the whole chains against ``transforms.py`` in distribution
(Kolmogorov-Smirnov tests that also reject deliberately wrong chains).

Implementation notes. Zoom is separable: along each axis in turn every output voxel is
``w0 * x[i0] + w1 * x[i1]`` with per-sample indices gathered with ``torch.gather``; indices
and weights follow PyTorch's own float32 formula (source index rounded once, as its fused
multiply-add does), so the weights equal MONAI's and the output differs from MONAI's ``Zoom``
only in the rounding of the final sums (at most 1.2e-7 on images in [0, 1), 1-2 ulps; the
order of PyTorch's 2D/3D accumulation cannot be reproduced axis by axis). Blur is a sum of
shifted copies weighted by per-sample kernels, axis by axis (bitwise equal to MONAI's
convolution in our CPU runs; the tests allow 1e-6). Neither uses a matrix multiply or a convolution, so
TF32 settings on the GPU cannot change the results.

Command lines (speed of the batched chain against MONAI's per-sample chain)::

    # CPU, one thread, the brief's setting: 128 views of 96 x 96
    python batch_augment.py --batch_size 128 --size 96 --threads 1
    # GPU throughput only (MONAI's per-sample chain skipped), SimSiam batch of 2 x 128 views
    python batch_augment.py --device cuda --batch_size 256 --size 96 --iters 100 --skip_monai
    # the fine-tuning chain, 3D, written to a JSON file
    python batch_augment.py --chain finetune --spatial_dims 3 --size 64 --batch_size 8 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from augment_params import AUGMENT
from utils import UserError, atomic_write_json, run_cli

logger = logging.getLogger(__name__)

BLUR_TRUNCATED = 4.0  # MONAI GaussianFilter default
ERF_SQRT_HALF = 0.70710678  # the constant MONAI's gaussian_1d uses for 1 / sqrt(2)

Params = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _check_batch(x: torch.Tensor, spatial_dims: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} must have shape (B, C, {', '.join('HWD'[:spatial_dims])}) for spatial_dims={spatial_dims}, "
            f"got shape {tuple(x.shape)}"
        )


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    g = generator.device
    if g.type != device.type or (
        g.type != "cpu" and g.index is not None and device.index is not None and g.index != device.index
    ):
        raise ValueError(
            f"the generator is on {g} but the batch is on {device}: make the generator on the batch's device"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (kernels and weights need the precision), else x's dtype."""
    if not x.is_floating_point():
        raise TypeError(f"the image batch must be floating point, got {x.dtype}")
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) with ``ndim`` dimensions in all."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def _along(v: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """Reshape a (B, n) tensor to broadcast along dimension ``dim`` of an ``ndim``-d batch."""
    shape = [v.shape[0]] + [1] * (ndim - 1)
    shape[dim] = v.shape[1]
    return v.reshape(shape)


def _rand(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """n uniform numbers in [0, 1), float64 (as numpy's, which MONAI draws from)."""
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def _uniform(n: int, low: float, high: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * _rand(n, device, generator)


# ----------------------------------------------------------------------------------------
# the operations: each draws per-sample parameters (``sample``) and applies them (``apply``)
# ----------------------------------------------------------------------------------------


class BatchRandOp(nn.Module):
    """One random transform applied to a batch, every sample with its own parameters.

    ``sample(x, generator)`` draws the parameters (always a boolean ``"do"`` of shape (B,):
    whether the transform fires for that sample, ``u < prob`` as in MONAI); ``apply(x, params)``
    is deterministic, so tests can compare it with MONAI for fixed parameters.
    ``geometric`` ops are the ones that must move a label map with the image.
    """

    geometric = False

    def __init__(self, prob: float):
        super().__init__()
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        self.prob = float(prob)

    def _fires(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return _rand(x.shape[0], x.device, generator) < self.prob

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Params:  # pragma: no cover
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(x, generator))

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class BatchRandZoom(BatchRandOp):
    """MONAI ``RandZoom(min_zoom, max_zoom, mode="bilinear", keep_size=True, padding_mode="constant")``.

    One isotropic factor per sample, ``z ~ U(min_zoom, max_zoom)``; the image is resized to
    ``floor(n * z)`` voxels per axis (``interpolate(..., scale_factor=z, recompute_scale_factor=True,
    align_corners=False)``) and centre-cropped or symmetrically zero-padded back to ``n``.
    """

    geometric = True

    def __init__(self, prob: float, min_zoom: float = 0.8, max_zoom: float = 1.2):
        super().__init__(prob)
        if not 0.0 < min_zoom <= max_zoom:
            raise ValueError(f"need 0 < min_zoom <= max_zoom, got {min_zoom!r}, {max_zoom!r}")
        self.min_zoom, self.max_zoom = float(min_zoom), float(max_zoom)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Params:
        do = self._fires(x, generator)
        zoom = _uniform(x.shape[0], self.min_zoom, self.max_zoom, x.device, generator)
        return {"do": do, "zoom": zoom}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Zoom the samples with ``params["do"]`` by ``params["zoom"]`` (B,), float64 as MONAI's factor."""
        dt = _compute_dtype(x)
        for n in x.shape[2:]:
            if math.floor(n * self.min_zoom) < 1:
                raise ValueError(f"zoom {self.min_zoom} shrinks an axis of {n} voxels to nothing")
        zoom = torch.where(
            params["do"], params["zoom"].to(torch.float64), torch.ones_like(params["zoom"], dtype=torch.float64)
        )
        out = x.to(dt)
        for dim in range(x.ndim - 1, 1, -1):  # one spatial axis at a time (separable)
            out = _zoom_axis(out, zoom, dim)
        return torch.where(_per_sample(params["do"], x.ndim), out.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, zoom=[{self.min_zoom}, {self.max_zoom}]"


def _zoom_axis(x: torch.Tensor, zoom: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear resize of every sample along ``dim`` by its factor, then crop/pad back to the size.

    Reproduces ``torch.nn.functional.interpolate(mode="linear", align_corners=False)`` with an
    output size ``m = floor(n * zoom)`` (computed in float64, as MONAI does), followed by
    MONAI's ``ResizeWithPadOrCrop``: a centre crop starting at ``m // 2 - n // 2`` when m > n,
    a zero pad of ``(n - m) // 2`` before when m < n.
    """
    n = x.shape[dim]
    dt = x.dtype
    device = x.device
    m = torch.floor(zoom * float(n)).to(torch.int64)  # (B,)
    if m.device.type == "cpu" and bool((m < 1).any()):  # on an accelerator: a stall; see BatchRandZoom.apply
        raise ValueError(f"a zoom factor shrinks an axis of {n} voxels to nothing")
    offset = torch.where(m >= n, m // 2 - n // 2, -((n - m) // 2))  # zoomed index of output voxel 0
    i = torch.arange(n, device=device, dtype=torch.int64)[None, :] + offset[:, None]  # (B, n) zoomed index
    valid = (i >= 0) & (i < m[:, None])
    # PyTorch: scale = (float) in / out in the op's precision, then src = max(scale * (dst + 0.5) - 0.5, 0)
    # with a fused multiply-add (one rounding): computed in float64 and rounded once to match.
    m_f = m.to(dt)
    scale = torch.full_like(m_f, float(n)) / m_f  # a true division, as PyTorch's (float) in / out
    src = (scale.to(torch.float64)[:, None] * (i.to(torch.float64) + 0.5) - 0.5).to(dt).clamp_min(0.0)
    i0 = torch.floor(src).to(torch.int64).clamp_max(n - 1)
    lam1 = (src - i0.to(dt)).clamp(0.0, 1.0)
    lam0 = 1.0 - lam1
    i1 = i0 + (i0 < n - 1).to(torch.int64)
    i0 = torch.where(valid, i0, 0)
    i1 = torch.where(valid, i1, 0)
    shape = list(x.shape)
    g0 = torch.gather(x, dim, _along(i0, x.ndim, dim).expand(shape))
    g1 = torch.gather(x, dim, _along(i1, x.ndim, dim).expand(shape))
    out = g0 * _along(lam0, x.ndim, dim) + g1 * _along(lam1, x.ndim, dim)
    return torch.where(_along(valid, x.ndim, dim), out, torch.zeros((), dtype=dt, device=device))


class BatchRandFlip(BatchRandOp):
    """MONAI ``RandFlip(spatial_axis=axis)``: reverse one spatial axis."""

    geometric = True

    def __init__(self, prob: float, spatial_axis: int):
        super().__init__(prob)
        self.spatial_axis = int(spatial_axis)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Params:
        return {"do": self._fires(x, generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        dim = self.spatial_axis + 2
        if dim >= x.ndim:
            raise ValueError(f"spatial axis {self.spatial_axis} does not exist in a batch of shape {tuple(x.shape)}")
        return torch.where(_per_sample(params["do"], x.ndim), x.flip(dim), x)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, spatial_axis={self.spatial_axis}"


class BatchRandRotate90(BatchRandOp):
    """MONAI ``RandRotate90(max_k, spatial_axes)``: ``torch.rot90`` by k ~ U{1..max_k} when it fires.

    The plane must be square (H == W for axes (0, 1)): otherwise the samples of one batch
    would come out with different shapes.
    """

    geometric = True

    def __init__(self, prob: float, max_k: int = 3, spatial_axes: tuple[int, int] = (0, 1)):
        super().__init__(prob)
        if int(max_k) < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k!r}")
        self.max_k = int(max_k)
        self.spatial_axes = (int(spatial_axes[0]), int(spatial_axes[1]))

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Params:
        do = self._fires(x, generator)
        k = torch.randint(1, self.max_k + 1, (x.shape[0],), generator=generator, device=x.device)
        return {"do": do, "k": k}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        d0, d1 = (a + 2 for a in self.spatial_axes)
        if max(d0, d1) >= x.ndim:
            raise ValueError(f"spatial axes {self.spatial_axes} do not exist in a batch of shape {tuple(x.shape)}")
        if x.shape[d0] != x.shape[d1]:
            raise ValueError(
                f"rotate 90 in the plane of spatial axes {self.spatial_axes} needs a square plane, got {x.shape[d0]} x {x.shape[d1]}"
            )
        k = torch.where(params["do"], params["k"] % 4, 0)
        out = x
        for kk in range(1, 4):  # a loop over the three possible turns, not over samples
            out = torch.where(_per_sample(k == kk, x.ndim), torch.rot90(x, kk, (d0, d1)), out)
        return out

    def extra_repr(self) -> str:
        return f"prob={self.prob}, max_k={self.max_k}, spatial_axes={self.spatial_axes}"


class BatchRandScaleIntensity(BatchRandOp):
    """MONAI ``RandScaleIntensity(factors=f)``: ``x * (1 + factor)``, factor ~ U(-f, f)."""

    def __init__(self, prob: float, factors: float = 0.1):
        super().__init__(prob)
        self.low, self.high = -abs(float(factors)), abs(float(factors))

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Params:
        do = self._fires(x, generator)
        return {"do": do, "factor": _uniform(x.shape[0], self.low, self.high, x.device, generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        dt = _compute_dtype(x)
        mult = (1.0 + params["factor"].to(torch.float64)).to(dt)  # 1 + f in double, then the image's precision
        out = (x.to(dt) * _per_sample(mult, x.ndim)).to(x.dtype)
        return torch.where(_per_sample(params["do"], x.ndim), out, x)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, factor=[{self.low}, {self.high}]"


class BatchRandShiftIntensity(BatchRandOp):
    """MONAI ``RandShiftIntensity(offsets=o)``: ``x + offset``, offset ~ U(-o, o)."""

    def __init__(self, prob: float, offsets: float = 0.1):
        super().__init__(prob)
        self.low, self.high = -abs(float(offsets)), abs(float(offsets))

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Params:
        do = self._fires(x, generator)
        return {"do": do, "offset": _uniform(x.shape[0], self.low, self.high, x.device, generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        dt = _compute_dtype(x)
        out = (x.to(dt) + _per_sample(params["offset"].to(dt), x.ndim)).to(x.dtype)
        return torch.where(_per_sample(params["do"], x.ndim), out, x)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, offset=[{self.low}, {self.high}]"


def gaussian_kernels_1d(
    sigma: torch.Tensor, truncated: float = BLUR_TRUNCATED, tail: int | None = None
) -> torch.Tensor:
    """MONAI's ``gaussian_1d(sigma, truncated, approx="erf")`` for many sigmas at once.

    Kernel b has ``2 * tail_b + 1`` taps, ``tail_b = int(max(sigma_b * truncated, 0.5) + 0.5)``;
    all are returned centred in one (N, 2 * tail + 1) float32 tensor, zero outside their tails.

    Args:
        sigma: (N,) standard deviations (> 0), any float dtype; used in float32 as MONAI does.
        truncated: tail length in sigmas (MONAI's default 4.0).
        tail: the common half-width; default: the largest tail_b (this reads sigma on the host,
            pass it to keep a GPU stream free of synchronisation).

    Raises:
        ValueError: a sigma that is not positive, or a ``tail`` shorter than a kernel's.
    """
    s = sigma.to(torch.float32)
    tails = torch.floor(torch.clamp(s.to(torch.float64) * float(truncated), min=0.5) + 0.5).to(torch.int64)
    if tail is None:
        if bool((s <= 0).any()):
            raise ValueError("every sigma must be positive")
        tail = int(tails.max()) if s.numel() else 0
    x = torch.arange(-tail, tail + 1, dtype=torch.float32, device=s.device)[None, :]
    t = (ERF_SQRT_HALF / torch.abs(s))[:, None]
    k = 0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())
    k = k.clamp(min=0)
    inside = torch.abs(x) <= tails[:, None].to(torch.float32)
    return torch.where(inside, k, torch.zeros((), dtype=k.dtype, device=k.device))


def _tail_for(sigma_max: float, truncated: float = BLUR_TRUNCATED) -> int:
    return int(max(float(torch.tensor(sigma_max, dtype=torch.float32)) * truncated, 0.5) + 0.5)


class BatchRandGaussianSmooth(BatchRandOp):
    """MONAI ``RandGaussianSmooth(sigma_x=s, sigma_y=s[, sigma_z=s], approx="erf")``.

    One sigma per spatial axis, each ~ U(low, high); separable filtering with zero borders
    (``monai.networks.layers.separable_filtering``), first axis first.
    """

    def __init__(self, prob: float, sigma: tuple[float, float] = AUGMENT.blur_sigma, truncated: float = BLUR_TRUNCATED):
        super().__init__(prob)
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"need 0 < sigma low <= high, got {sigma!r}")
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.truncated = float(truncated)
        self.tail = _tail_for(self.sigma[1], self.truncated)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Params:
        do = self._fires(x, generator)
        nd = x.ndim - 2
        sig = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(
            (x.shape[0], nd), generator=generator, device=x.device, dtype=torch.float64
        )
        return {"do": do, "sigma": sig}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Blur the samples with ``params["do"]`` using ``params["sigma"]`` (B, spatial_dims).

        The sigmas must lie in (0, high] of this op's range (the kernels are ``self.tail``
        taps either side); checked for CPU tensors.
        """
        dt = _compute_dtype(x)
        sigma = params["sigma"]
        nd = x.ndim - 2
        if sigma.shape != (x.shape[0], nd):
            raise ValueError(f"sigma must have shape {(x.shape[0], nd)}, got {tuple(sigma.shape)}")
        out = x.to(dt)
        b = x.shape[0]
        # sigma of samples that are not blurred: any valid value (their output is discarded)
        sig = torch.where(params["do"][:, None], sigma.to(torch.float64), self.sigma[0])
        if sigma.device.type == "cpu" and bool(((sig <= 0) | (sig > self.sigma[1])).any()):
            # on an accelerator this check would stall the stream; sample() never breaks it
            raise ValueError(f"every sigma must lie in (0, {self.sigma[1]}], the range this op was built for")
        kernels = gaussian_kernels_1d(sig.reshape(-1), self.truncated, tail=self.tail).reshape(b, nd, -1).to(dt)
        for a in range(nd):
            out = _filter_axis(out, kernels[:, a], a + 2, self.tail)
        return torch.where(_per_sample(params["do"], x.ndim), out.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, sigma=[{self.sigma[0]}, {self.sigma[1]}], truncated={self.truncated}"


def _filter_axis(x: torch.Tensor, kernels: torch.Tensor, dim: int, tail: int) -> torch.Tensor:
    """Correlate every sample with its own 1D kernel along ``dim``; zeros outside the image.

    ``kernels`` is (B, 2 * tail + 1). A sum of shifted copies (one per tap) rather than a
    grouped convolution: exact float32 on any device, whatever the TF32 settings.
    """
    n = x.shape[dim]
    pad = [0, 0] * (x.ndim - 1 - dim) + [tail, tail]
    xp = torch.nn.functional.pad(x, pad)
    out = None
    for k in range(2 * tail + 1):
        term = xp.narrow(dim, k, n) * _per_sample(kernels[:, k], x.ndim)
        out = term if out is None else out + term
    return out


class BatchRandGaussianNoise(BatchRandOp):
    """MONAI ``RandGaussianNoise(mean, std=s, sample_std)``: x + N(mean, std^2) per voxel.

    With ``sample_std`` (MONAI's default) each sample's std is drawn from U(0, s), else it is s.
    """

    def __init__(self, prob: float, std: float = AUGMENT.noise_std, mean: float = 0.0, sample_std: bool = True):
        super().__init__(prob)
        self.std, self.mean, self.sample_std = float(std), float(mean), bool(sample_std)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Params:
        do = self._fires(x, generator)
        std = _uniform(x.shape[0], 0.0, self.std, x.device, generator)
        if not self.sample_std:
            std = torch.full_like(std, self.std)
        dt = _compute_dtype(x)
        unit = torch.randn(x.shape, generator=generator, device=x.device, dtype=dt)
        return {"do": do, "std": std, "unit_noise": unit}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        dt = _compute_dtype(x)
        noise = self.mean + params["unit_noise"].to(dt) * _per_sample(params["std"].to(dt), x.ndim)
        out = (x.to(dt) + noise).to(x.dtype)
        return torch.where(_per_sample(params["do"], x.ndim), out, x)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, std{'~U(0, ' if self.sample_std else '=('}{self.std}), mean={self.mean}"


# ----------------------------------------------------------------------------------------
# the chains
# ----------------------------------------------------------------------------------------


def view_ops(spatial_dims: int) -> list[BatchRandOp]:
    """The pretraining view chain of ``transforms.view_augmentations``, as batched ops in order
    (settings from :data:`augment_params.AUGMENT`)."""
    _check_dims(spatial_dims)
    a = AUGMENT
    return [
        BatchRandZoom(a.view_zoom_prob, *a.view_zoom_range),
        BatchRandFlip(a.view_flip_prob, 0),
        BatchRandFlip(a.view_flip_prob, 1),
        BatchRandRotate90(a.view_rot90_prob, a.rot90_max_k, (0, 1)),
        BatchRandScaleIntensity(a.view_intensity_prob, a.intensity_range),
        BatchRandShiftIntensity(a.view_intensity_prob, a.intensity_range),
        BatchRandGaussianSmooth(a.view_blur_prob, a.blur_sigma),
        BatchRandGaussianNoise(a.view_noise_prob, a.noise_std),
    ]


def finetune_ops(spatial_dims: int) -> list[BatchRandOp]:
    """The fine-tuning chain of ``transforms.finetune_augmentations``, as batched ops in order
    (settings from :data:`augment_params.AUGMENT`)."""
    _check_dims(spatial_dims)
    a = AUGMENT
    return [
        BatchRandFlip(a.finetune_geometric_prob, 0),
        BatchRandFlip(a.finetune_geometric_prob, 1),
        BatchRandRotate90(a.finetune_geometric_prob, a.rot90_max_k, (0, 1)),
        BatchRandGaussianSmooth(a.finetune_intensity_prob, a.blur_sigma),
        BatchRandScaleIntensity(a.finetune_intensity_prob, a.intensity_range),
        BatchRandShiftIntensity(a.finetune_intensity_prob, a.intensity_range),
        BatchRandGaussianNoise(a.finetune_intensity_prob, a.noise_std),
    ]


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


class BatchViewAugment(nn.Module):
    """The pretraining view augmentations on a batch: ``(B, C, H, W[, D]) -> same shape``.

    Each sample gets an independent draw of the whole chain (see the module docstring), as
    if ``transforms.view_augmentations`` had run on it alone. Randomness comes from
    ``generator`` (on the batch's device; the global RNG of that device when None), so a
    seeded generator makes runs reproducible; save ``generator.get_state()`` to resume.
    Both views of a pair can go through one call (``torch.cat``): samples are independent.

    Args:
        spatial_dims: 2 for (B, C, H, W) slices, 3 for (B, C, H, W, D) volumes; in 3D flips
            and rotations act on H and W, zoom and blur on all three axes.
        generator: the random number generator (not moved by ``.to()``).
    """

    def __init__(self, spatial_dims: int, generator: torch.Generator | None = None):
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        self.ops = nn.ModuleList(view_ops(self.spatial_dims))
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Augment every sample of ``x``; returns a new tensor of x's shape, dtype and device.

        Raises:
            ValueError: x has the wrong number of dimensions, a non-square (H, W) plane, or
                the generator lives on another device.
            TypeError: x is not a floating-point tensor.
        """
        _check_batch(x, self.spatial_dims)
        dtype = x.dtype
        x = x.to(_compute_dtype(x))
        _check_generator(self.generator, x.device)
        for op in self.ops:
            x = op(x, self.generator)
        return x.to(dtype)


class BatchFinetuneAugment(nn.Module):
    """The fine-tuning augmentations on a batch of (image, label) crops.

    Flips and rotate 90 move image and label together (the label is permuted exactly, any
    dtype); blur, intensity scale, shift and noise change the image only. Same randomness
    rules as :class:`BatchViewAugment`.

    Args:
        spatial_dims: 2 or 3.
        generator: the random number generator (on the batch's device), or None.
    """

    def __init__(self, spatial_dims: int, generator: torch.Generator | None = None):
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        self.ops = nn.ModuleList(finetune_ops(self.spatial_dims))
        self.generator = generator

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment (image, label); image (B, C, *spatial) float, label (B, C', *spatial) any dtype.

        Raises:
            ValueError: bad shapes, label not matching the image, or a generator on another device.
            TypeError: the image is not floating point.
        """
        _check_batch(image, self.spatial_dims, "image")
        _check_batch(label, self.spatial_dims, "label")
        if label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:] or label.device != image.device:
            raise ValueError(
                f"label {tuple(label.shape)} on {label.device} does not match image {tuple(image.shape)} on {image.device}"
            )
        _check_generator(self.generator, image.device)
        dtype = image.dtype
        image = image.to(_compute_dtype(image))
        for op in self.ops:
            params = op.sample(image, self.generator)
            image = op.apply(image, params)
            if op.geometric:
                label = op.apply(label, params)
        return image.to(dtype), label


# ----------------------------------------------------------------------------------------
# benchmark command line
# ----------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "batch_augment", description="Time the batched augmentation chain against MONAI's per-sample chain."
    )
    g = p.add_argument_group("what to time")
    g.add_argument(
        "--chain",
        choices=["view", "finetune"],
        default="view",
        help="view: the pretraining view chain; finetune: the fine-tuning chain (image + label)",
    )
    g.add_argument(
        "--spatial_dims",
        type=int,
        default=2,
        choices=[2, 3],
        help="2 for slices (B, 1, S, S), 3 for volumes (B, 1, S, S, S)",
    )
    g.add_argument(
        "--batch_size",
        type=int,
        default=128,
        help="samples per batched call (SimSiam pretraining: 2 x 128 views per step)",
    )
    g.add_argument("--size", type=int, default=96, help="edge length of each crop (the paper's crops are 96)")
    g = p.add_argument_group("how to time")
    g.add_argument("--device", default="cpu", help="device of the batched chain: cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads for both chains (1 = one DataLoader worker's share)"
    )
    g.add_argument("--iters", type=int, default=10, help="timed batched calls; raise on a GPU for a steadier number")
    g.add_argument("--warmup", type=int, default=2, help="untimed batched calls first (allocator, kernels)")
    g.add_argument(
        "--skip_monai",
        action="store_true",
        help="time only the batched chain (MONAI's chain needs transforms.py and is slow)",
    )
    g.add_argument(
        "--monai_samples",
        type=int,
        default=None,
        help="samples to push through MONAI's chain one by one (default: --batch_size)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the input images and of both chains")
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        default=None,
        help="also write the numbers as JSON to this path (e.g. benchmarks/results/batch_augment.json)",
    )
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Time both chains; print a table; return (and optionally write) the numbers."""
    for name in ("batch_size", "size", "iters", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.size < 2:
        raise UserError(f"--size must be >= 2, got {args.size}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f"--device {args.device!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device!r}: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    shape = (args.batch_size, 1) + (args.size,) * args.spatial_dims
    gen_cpu = torch.Generator().manual_seed(args.seed)
    x_cpu = torch.rand(shape, generator=gen_cpu)
    y_cpu = torch.randint(0, 14, shape, generator=gen_cpu, dtype=torch.int64)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.chain == "view":
        aug: nn.Module = BatchViewAugment(args.spatial_dims, gen)
    else:
        aug = BatchFinetuneAugment(args.spatial_dims, gen)
    x, y = x_cpu.to(device), y_cpu.to(device)

    def step() -> None:
        if args.chain == "view":
            aug(x)
        else:
            aug(x, y)

    with torch.no_grad():
        for _ in range(args.warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        _sync(device)
        batched_s = (time.perf_counter() - t0) / args.iters
    result: dict[str, Any] = {
        "chain": args.chain,
        "spatial_dims": args.spatial_dims,
        "shape": list(shape),
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "batched_s_per_batch": batched_s,
        "batched_samples_per_s": args.batch_size / batched_s,
    }
    if not args.skip_monai:
        result.update(_time_monai(args, x_cpu, y_cpu))
        result["speedup"] = result["monai_s_per_sample"] * args.batch_size / batched_s
    print(
        f"{'chain':<10}{'shape':<24}{'device':<8}{'batched s/batch':>16}{'samples/s':>12}"
        f"{'MONAI s/batch':>15}{'speed-up':>10}"
    )
    monai_batch = result.get("monai_s_per_sample", float("nan")) * args.batch_size
    print(
        f"{args.chain:<10}{'x'.join(map(str, shape)):<24}{str(device):<8}{batched_s:>16.4f}"
        f"{args.batch_size / batched_s:>12.0f}{monai_batch:>15.4f}{result.get('speedup', float('nan')):>10.1f}"
    )
    if args.out:
        atomic_write_json(args.out, result)
        logger.info("wrote %s", args.out)
    return result


def _time_monai(args: argparse.Namespace, x_cpu: torch.Tensor, y_cpu: torch.Tensor) -> dict[str, Any]:
    """MONAI's chain from transforms.py, sample by sample on the CPU (as a DataLoader worker runs it)."""
    # imported here: this module stays free of MONAI (see augment_params.py); only this speed
    # comparison of the command line (skipped with --skip_monai) needs MONAI's chains
    from transforms import finetune_augmentations, view_augmentations  # noqa: PLC0415

    n = args.monai_samples or args.batch_size
    if n < 1:
        raise UserError(f"--monai_samples must be >= 1, got {n}")
    if args.chain == "view":
        chain = view_augmentations("image", args.spatial_dims)
    else:
        chain = finetune_augmentations(args.spatial_dims)
    chain.set_random_state(seed=args.seed)
    samples = [
        {"image": x_cpu[i % x_cpu.shape[0]].clone(), "label": y_cpu[i % y_cpu.shape[0]].clone()} for i in range(n)
    ]
    if args.chain == "view":
        for s in samples:
            del s["label"]
    t0 = time.perf_counter()
    for s in tqdm(samples, desc="MONAI per sample", leave=False):
        chain(s)
    dt = time.perf_counter() - t0
    return {"monai_samples": n, "monai_s_per_sample": dt / n}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
