"""batch_augment: each batched op equals its MONAI counterpart for fixed parameters, and the
whole chains agree in distribution with the MONAI chains of transforms.py.

The distribution tests push many copies of one small two-channel image through MONAI's
chain (sample by sample) and through the batched chain, and compare output statistics
with two-sample Kolmogorov-Smirnov tests (and a chi-square test on the detected
orientation). The same test, at the same threshold, must reject deliberately wrong chains:
that is what shows it has power.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import get_track_meta, set_track_meta
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import (
    Flip,
    GaussianSmooth,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    Rotate90,
    ScaleIntensity,
    ShiftIntensity,
    Zoom,
)
from scipy.stats import chi2_contingency, ks_2samp

import batch_augment as ba
from augment_params import AUGMENT
from transforms import finetune_augmentations, view_augmentations
from utils import UserError

ALPHA = 1e-4  # per statistic; ~14 statistics -> a family-wise false rejection rate of about 1e-3
N_VIEW = 1500  # samples per side in the view-chain distribution test
N_FT = 800  # samples per side in the fine-tuning distribution test


def _ones(b: int) -> torch.Tensor:
    return torch.ones(b, dtype=torch.bool)


def _plain(t) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


# ----------------------------------------------------------------------------------------
# each op against MONAI, fixed parameters
# ----------------------------------------------------------------------------------------

ZOOMS = [0.8, 0.83, 0.87, 0.9, 0.97, 1.0, 1.04, 1.13, 1.2]


@pytest.mark.parametrize("spatial", [(16, 16), (17, 13), (96, 96), (8, 7, 6), (9, 10, 5)])
def test_zoom_matches_monai(spatial):
    # Not bitwise: PyTorch's bilinear kernel fuses its multiply-adds in an order a gather of
    # two neighbours per axis cannot reproduce exactly; the difference is 1-2 float32 ulps.
    # Sizes and factors cover crop and pad, odd and even differences, non-square planes.
    torch.manual_seed(0)
    b = len(ZOOMS)
    x = torch.rand(b, 1, *spatial) * 2 - 0.5
    params = {"do": _ones(b), "zoom": torch.tensor(ZOOMS, dtype=torch.float64)}
    out = ba.BatchRandZoom(1.0).apply(x, params)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i, z in enumerate(ZOOMS):
        ref = _plain(Zoom(z, mode="bilinear", padding_mode="constant", keep_size=True)(x[i]))
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-6, msg=f"zoom {z} on {spatial}")
        if z < 1:  # zoomed out: MONAI pads with zeros, at least one row after the image
            assert bool((ref[0, -1] == 0).all())
    assert torch.equal(out[ZOOMS.index(1.0)], x[ZOOMS.index(1.0)])


def test_zoom_skipped_samples_are_untouched():
    x = torch.rand(4, 1, 12, 12)
    params = {
        "do": torch.tensor([True, False, True, False]),
        "zoom": torch.tensor([0.8, 0.8, 1.2, 1.2], dtype=torch.float64),
    }
    out = ba.BatchRandZoom(1.0).apply(x, params)
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])
    assert not torch.equal(out[0], x[0]) and not torch.equal(out[2], x[2])


@pytest.mark.parametrize("spatial", [(6, 6), (5, 5, 4)])
def test_flip_rot90_scale_shift_are_bitwise_monai(spatial):
    torch.manual_seed(1)
    b = 4
    x = torch.randn(b, 1, *spatial)
    for axis in (0, 1):
        out = ba.BatchRandFlip(1.0, axis).apply(x, {"do": torch.tensor([True, False, True, True])})
        for i in range(b):
            ref = _plain(Flip(spatial_axis=axis)(x[i])) if i != 1 else x[i]
            assert torch.equal(out[i], ref)
    ks = torch.tensor([1, 2, 3, 2])
    out = ba.BatchRandRotate90(1.0).apply(x, {"do": torch.tensor([True, True, True, False]), "k": ks})
    for i in range(b):
        ref = _plain(Rotate90(int(ks[i]), spatial_axes=(0, 1))(x[i])) if i != 3 else x[i]
        assert torch.equal(out[i], ref)
    factors = torch.tensor([-0.1, -0.0371, 0.0529, 0.09999], dtype=torch.float64)
    out = ba.BatchRandScaleIntensity(1.0).apply(x, {"do": _ones(b), "factor": factors})
    for i in range(b):
        assert torch.equal(out[i], _plain(ScaleIntensity(minv=None, maxv=None, factor=float(factors[i]))(x[i])))
    offsets = torch.tensor([-0.1, 0.0123, -0.0777, 0.0999], dtype=torch.float64)
    out = ba.BatchRandShiftIntensity(1.0).apply(x, {"do": _ones(b), "offset": offsets})
    for i in range(b):
        assert torch.equal(out[i], _plain(ShiftIntensity(float(offsets[i]))(x[i])))


def test_gaussian_kernels_equal_monai():
    sigmas = torch.cat([torch.linspace(0.25, 1.5, 60), torch.tensor([0.3749, 0.375, 0.3751, 0.625, 1.125, 1.375])])
    k = ba.gaussian_kernels_1d(sigmas, tail=6)
    assert k.shape == (len(sigmas), 13)
    for i, s in enumerate(sigmas):
        ref = gaussian_1d(s, truncated=4.0, approx="erf")
        t = (len(ref) - 1) // 2
        assert torch.equal(k[i, 6 - t : 7 + t], ref), float(s)
        assert k[i, : 6 - t].abs().sum() == 0 and k[i, 7 + t :].abs().sum() == 0
    # the default tail is the largest one needed
    assert ba.gaussian_kernels_1d(torch.tensor([0.25, 0.6])).shape == (2, 2 * int(0.6 * 4 + 0.5) + 1)
    with pytest.raises(ValueError, match="positive"):
        ba.gaussian_kernels_1d(torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize("spatial", [(16, 16), (13, 11), (8, 7, 6)])
def test_blur_matches_monai(spatial):
    torch.manual_seed(2)
    b = 5
    x = torch.rand(b, 1, *spatial)
    sig = 0.25 + 1.25 * torch.rand(b, len(spatial), dtype=torch.float64)
    sig[0] = 1.5  # the widest kernel: 13 taps, wider than the 11-voxel axis of (13, 11)
    sig[1] = 0.25
    do = torch.tensor([True, True, True, True, False])
    out = ba.BatchRandGaussianSmooth(1.0).apply(x, {"do": do, "sigma": sig})
    for i in range(b):
        if not do[i]:
            assert torch.equal(out[i], x[i])
            continue
        ref = _plain(GaussianSmooth(sigma=tuple(float(s) for s in sig[i]), approx="erf")(x[i]))
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        ba.BatchRandGaussianSmooth(1.0).apply(x, {"do": do, "sigma": sig + 1.0})


def test_noise_adds_scaled_unit_noise():
    x = torch.rand(3, 1, 8, 8)
    unit = torch.randn(3, 1, 8, 8)
    std = torch.tensor([0.01, 0.005, 0.002], dtype=torch.float64)
    out = ba.BatchRandGaussianNoise(1.0).apply(
        x, {"do": torch.tensor([True, True, False]), "std": std, "unit_noise": unit}
    )
    torch.testing.assert_close(out[:2], x[:2] + unit[:2] * std[:2, None, None, None].float(), rtol=0, atol=0)
    assert torch.equal(out[2], x[2])


def test_ops_fire_with_their_probabilities_and_ranges():
    g = torch.Generator().manual_seed(3)
    n = 20000
    x = torch.zeros(n, 1, 2, 2)
    # binomial standard deviation at p = 0.5 and n = 20000 is 0.0035: 0.02 is over 5 of them
    for op in ba.view_ops(2) + ba.finetune_ops(2):
        frac = op.sample(x, g)["do"].float().mean().item()
        assert abs(frac - op.prob) < 0.02, (op, frac)
    z = ba.BatchRandZoom(1.0).sample(x, g)["zoom"]
    assert 0.8 <= z.min() < 0.81 and 1.19 < z.max() < 1.2
    k = ba.BatchRandRotate90(1.0).sample(x, g)["k"]
    counts = torch.bincount(k, minlength=4)
    assert counts[0] == 0 and all(abs(c / n - 1 / 3) < 0.02 for c in counts[1:].tolist())
    s = ba.BatchRandGaussianSmooth(1.0).sample(torch.zeros(n, 1, 2, 2, 2), g)["sigma"]
    assert s.shape == (n, 3) and 0.25 <= s.min() and s.max() < 1.5 and abs(s.mean() - 0.875) < 0.01
    f = ba.BatchRandScaleIntensity(1.0).sample(x, g)["factor"]
    assert -0.1 <= f.min() < -0.099 and 0.099 < f.max() < 0.1
    std = ba.BatchRandGaussianNoise(1.0).sample(x, g)["std"]
    assert 0 <= std.min() and std.max() < 0.01 and abs(std.mean() - 0.005) < 2e-4


def test_chains_have_the_parameters_of_transforms_py():
    """The batched chains mirror transforms.py, op for op: a change there must show up here."""
    for dims in (2, 3):
        for monai_chain, ops in (
            (view_augmentations("img", dims), ba.view_ops(dims)),
            (finetune_augmentations(dims), ba.finetune_ops(dims)),
        ):
            assert len(monai_chain.transforms) == len(ops)
            for t, op in zip(monai_chain.transforms, ops):
                assert t.prob == pytest.approx(op.prob)
                if isinstance(t, RandZoomd):
                    z = t.rand_zoom
                    assert isinstance(op, ba.BatchRandZoom)
                    assert (z.min_zoom, z.max_zoom) == ((op.min_zoom,), (op.max_zoom,))
                    assert z.keep_size and z.prob == 1.0  # the dict wrapper's prob is the one that counts
                    assert (t.mode, t.padding_mode, t.align_corners) == (("bilinear",), ("constant",), (None,))
                elif isinstance(t, RandFlipd):
                    assert isinstance(op, ba.BatchRandFlip) and t.flipper.spatial_axis == op.spatial_axis
                elif isinstance(t, RandRotate90d):
                    assert isinstance(op, ba.BatchRandRotate90)
                    assert (t.max_k, tuple(t.spatial_axes)) == (op.max_k, op.spatial_axes)
                elif isinstance(t, RandScaleIntensityd):
                    assert isinstance(op, ba.BatchRandScaleIntensity)
                    assert tuple(t.scaler.factors) == (op.low, op.high) and not t.scaler.channel_wise
                elif isinstance(t, RandShiftIntensityd):
                    assert isinstance(op, ba.BatchRandShiftIntensity)
                    assert tuple(t.shifter.offsets) == (op.low, op.high) and not t.shifter.channel_wise
                elif isinstance(t, RandGaussianSmoothd):
                    s = t.rand_smooth
                    assert isinstance(op, ba.BatchRandGaussianSmooth) and s.approx == "erf"
                    for axis_range in (s.sigma_x, s.sigma_y, s.sigma_z)[:dims]:
                        assert tuple(axis_range) == op.sigma
                elif isinstance(t, RandGaussianNoised):
                    nz = t.rand_gaussian_noise
                    assert isinstance(op, ba.BatchRandGaussianNoise)
                    assert (nz.mean, nz.std, nz.sample_std) == (op.mean, op.std, op.sample_std)
                else:
                    raise AssertionError(f"no batched counterpart for {type(t).__name__}")


def test_monai_chains_hold_the_augment_table():
    """transforms.py builds its MONAI chains from augment_params.AUGMENT, the table the batched
    chains read: what the chain objects hold must be the table's numbers, op for op."""
    a = AUGMENT
    for dims in (2, 3):
        view = view_augmentations("img", dims).transforms
        ft = finetune_augmentations(dims).transforms
        assert [t.prob for t in view] == pytest.approx(
            [
                a.view_zoom_prob,
                a.view_flip_prob,
                a.view_flip_prob,
                a.view_rot90_prob,
                a.view_intensity_prob,
                a.view_intensity_prob,
                a.view_blur_prob,
                a.view_noise_prob,
            ]
        )
        assert [t.prob for t in ft] == pytest.approx([a.finetune_geometric_prob] * 3 + [a.finetune_intensity_prob] * 4)
        zoom = view[0].rand_zoom
        assert (zoom.min_zoom, zoom.max_zoom) == ((a.view_zoom_range[0],), (a.view_zoom_range[1],))
        for chain in (view, ft):
            for t in chain:
                if isinstance(t, RandRotate90d):
                    assert t.max_k == a.rot90_max_k
                elif isinstance(t, RandScaleIntensityd):
                    assert tuple(t.scaler.factors) == (-a.intensity_range, a.intensity_range)
                elif isinstance(t, RandShiftIntensityd):
                    assert tuple(t.shifter.offsets) == (-a.intensity_range, a.intensity_range)
                elif isinstance(t, RandGaussianSmoothd):
                    s = t.rand_smooth
                    assert [tuple(r) for r in (s.sigma_x, s.sigma_y, s.sigma_z)[:dims]] == [a.blur_sigma] * dims
                elif isinstance(t, RandGaussianNoised):
                    assert t.rand_gaussian_noise.std == a.noise_std


# ----------------------------------------------------------------------------------------
# the whole chains, in distribution
# ----------------------------------------------------------------------------------------


def _test_image() -> torch.Tensor:
    """(2, 16, 16): channel 0 with structure and an asymmetric marker, channel 1 flat.

    The flat channel isolates noise (its centre varies only by noise, scale and shift) and
    zoom (its zero frame after zooming out); the marker makes all 8 flip/rotation outcomes
    distinguishable.
    """
    i = torch.arange(16.0)[:, None]
    j = torch.arange(16.0)[None, :]
    img = 0.2 + 0.3 * i / 15 + 0.1 * torch.sin(j / 2.0)
    img[2:5, 5:9] = 1.0
    img[11, 3] = 0.7
    img[12, 3] = 0.6
    return torch.stack([img, torch.full((16, 16), 0.5)])


def _orientations(img: torch.Tensor) -> torch.Tensor:
    """The 8 flips/rotations of a (16, 16) image, centred and normalised, as (8, 256)."""
    v = []
    for k in range(4):
        r = torch.rot90(img, k, (0, 1))
        v += [r, r.flip(0)]
    v = torch.stack(v).reshape(8, -1)
    v = v - v.mean(1, keepdim=True)
    return v / v.norm(dim=1, keepdim=True)


def _statistics(y: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-sample statistics of (N, 2, 16, 16) outputs, and the detected orientation (0..7).

    Statistics are rounded to 1e-5: the two implementations differ by float32 rounding
    (1e-7, see the zoom test), which a statistic that is exactly zero for most samples (the
    flat channel's noise without noise) would otherwise turn into a spurious KS difference.
    """
    s, f = y[:, 0].double(), y[:, 1].double()
    flat = s.reshape(len(s), -1)
    centred = flat - flat.mean(1, keepdim=True)
    orient = (centred / centred.norm(dim=1, keepdim=True) @ _orientations(_test_image()[0]).double().T).argmax(1)

    def lap(a):
        return 4 * a[:, 1:-1, 1:-1] - a[:, 2:, 1:-1] - a[:, :-2, 1:-1] - a[:, 1:-1, 2:] - a[:, 1:-1, :-2]

    border = torch.cat([f[:, 0], f[:, -1], f[:, 1:-1, 0], f[:, 1:-1, -1]], 1)
    stats = {
        "mean": flat.mean(1),
        "std": flat.std(1),
        "max": flat.amax(1),
        "min": flat.amin(1),
        "pix_8_8": s[:, 8, 8],
        "pix_3_6": s[:, 3, 6],
        "pix_1_1": s[:, 1, 1],
        "pix_0_0": s[:, 0, 0],
        "gradient": (s[:, 1:] - s[:, :-1]).abs().mean((1, 2)) + (s[:, :, 1:] - s[:, :, :-1]).abs().mean((1, 2)),
        "high_freq": lap(s).std((1, 2)),
        "flat_centre": f[:, 6:10, 6:10].mean((1, 2)),
        "flat_border": border.mean(1),
        "flat_noise": lap(f[:, 4:12, 4:12]).std((1, 2)),
    }
    return {k: np.round(v.numpy(), 5) for k, v in stats.items()}, orient.numpy()


def _p_values(ref, other) -> dict[str, float]:
    """KS p-value per statistic, chi-square p-value of the orientation histogram."""
    (rs, ro), (os_, oo) = ref, other
    p = {k: float(ks_2samp(rs[k], os_[k]).pvalue) for k in rs}
    table = np.stack([np.bincount(ro, minlength=8), np.bincount(oo, minlength=8)])
    p["orientation"] = float(chi2_contingency(table[:, table.sum(0) > 0]).pvalue)
    return p


@pytest.fixture(scope="module")
def no_meta():
    """MONAI without MetaTensor bookkeeping (3x faster, same randomness); restored afterwards."""
    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


@pytest.fixture(scope="module")
def monai_view_reference(no_meta):
    chain = view_augmentations("img", 2)
    chain.set_random_state(seed=2024)
    img = _test_image()
    out = torch.stack([_plain(chain({"img": img.clone()})["img"]) for _ in range(N_VIEW)])
    assert out.shape == (N_VIEW, 2, 16, 16)
    return _statistics(out)


def _batched_view(aug: ba.BatchViewAugment) -> tuple[dict[str, np.ndarray], np.ndarray]:
    return _statistics(aug(_test_image()[None].repeat(N_VIEW, 1, 1, 1)))


def test_view_chain_matches_monai_in_distribution(monai_view_reference):
    aug = ba.BatchViewAugment(2, torch.Generator().manual_seed(7))
    stats = _batched_view(aug)
    p = _p_values(monai_view_reference, stats)
    assert min(p.values()) > ALPHA, p
    # every one of the 8 flip/rotation outcomes has a positive probability and is detected
    assert len(np.unique(stats[1])) == 8


def _wrong(index: int, op: ba.BatchRandOp) -> ba.BatchViewAugment:
    aug = ba.BatchViewAugment(2, torch.Generator().manual_seed(7))
    aug.ops[index] = op
    return aug


WRONG_CHAINS = {
    "scale range 0.2": lambda: _wrong(4, ba.BatchRandScaleIntensity(0.75, 0.2)),
    "blur p 0.5": lambda: _wrong(6, ba.BatchRandGaussianSmooth(0.5)),
    "rotate p 0.25": lambda: _wrong(3, ba.BatchRandRotate90(0.25)),
    "noise std 0.02": lambda: _wrong(7, ba.BatchRandGaussianNoise(0.25, 0.02)),
    "zoom 0.9-1.1": lambda: _wrong(0, ba.BatchRandZoom(0.75, 0.9, 1.1)),
    "shift range 0.2": lambda: _wrong(5, ba.BatchRandShiftIntensity(0.75, 0.2)),
    "zoom p 0.25": lambda: _wrong(0, ba.BatchRandZoom(0.25)),
    "never flip axis 1": lambda: _wrong(2, ba.BatchRandFlip(0.0, 1)),
    "noise std fixed at 0.01": lambda: _wrong(7, ba.BatchRandGaussianNoise(0.25, sample_std=False)),
    "blur sigma up to 3": lambda: _wrong(6, ba.BatchRandGaussianSmooth(0.25, (0.25, 3.0))),
}
# Too subtle for this sample size (p between 2e-4 and 4e-3 at N_VIEW = 1500, so not listed):
# the probability of the +-10 % intensity scale or shift lowered from 0.75 to 0.5.
# test_ops_fire_with_their_probabilities checks every probability directly instead.


@pytest.mark.parametrize("name", list(WRONG_CHAINS))
def test_distribution_test_rejects_a_wrong_chain(monai_view_reference, name):
    p = _p_values(monai_view_reference, _batched_view(WRONG_CHAINS[name]()))
    assert min(p.values()) < ALPHA, p


def test_finetune_chain_matches_monai_in_distribution(no_meta):
    img = _test_image()
    label = (torch.arange(256).reshape(16, 16) % 7)[None]  # any pattern: only consistency matters here
    chain = finetune_augmentations(2)
    chain.set_random_state(seed=99)
    ref = torch.stack([_plain(chain({"image": img.clone(), "label": label.clone()})["image"]) for _ in range(N_FT)])
    aug = ba.BatchFinetuneAugment(2, torch.Generator().manual_seed(5))
    out, lab = aug(img[None].repeat(N_FT, 1, 1, 1), label[None].repeat(N_FT, 1, 1, 1))
    p = _p_values(_statistics(ref), _statistics(out))
    assert min(p.values()) > ALPHA, p
    assert lab.dtype == label.dtype and lab.shape == (N_FT, 1, 16, 16)


def test_finetune_moves_label_with_image():
    """With the intensity ops switched off, image and label see the same flips/rotations."""
    g = torch.Generator().manual_seed(11)
    aug = ba.BatchFinetuneAugment(2, g)
    for op in aug.ops:
        if not op.geometric:
            op.prob = 0.0
    n = 64
    idx = torch.arange(100).reshape(1, 1, 10, 10).repeat(n, 1, 1, 1)
    image, label = aug(idx.float(), idx.to(torch.uint8))
    assert label.dtype == torch.uint8
    assert torch.equal(image, label.float())
    changed = (label != idx).flatten(1).any(1)
    assert 0.3 < changed.float().mean() < 0.8  # 1 - 0.75^3 = 0.58 of the samples move
    # with intensity ops on, the label is still an exact permutation of its input
    image, label = ba.BatchFinetuneAugment(2, g)(idx.float(), idx)
    assert torch.equal(label.flatten(1).sort(1).values, idx.flatten(1))


# ----------------------------------------------------------------------------------------
# reproducibility, dtypes, devices, shapes, errors
# ----------------------------------------------------------------------------------------


def test_seeded_generator_reproduces_and_seeds_differ():
    x = torch.rand(8, 1, 12, 12)
    a = ba.BatchViewAugment(2, torch.Generator().manual_seed(1))(x)
    b = ba.BatchViewAugment(2, torch.Generator().manual_seed(1))(x)
    c = ba.BatchViewAugment(2, torch.Generator().manual_seed(2))(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a second call draws new parameters; a restored state repeats them
    g = torch.Generator().manual_seed(4)
    aug = ba.BatchViewAugment(2, g)
    state = g.get_state()
    first = aug(x)
    assert not torch.equal(first, aug(x))
    g.set_state(state)
    assert torch.equal(first, aug(x))
    # samples of one batch get different parameters
    same = ba.BatchViewAugment(2, torch.Generator().manual_seed(3))(x[:1].repeat(8, 1, 1, 1))
    assert len({tuple(s.flatten()[:20].tolist()) for s in same}) == 8
    # the global RNG when no generator is given
    torch.manual_seed(5)
    d = ba.BatchViewAugment(2)(x)
    torch.manual_seed(5)
    assert torch.equal(d, ba.BatchViewAugment(2)(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtype_and_shape_preserved(dtype):
    x = torch.rand(4, 1, 10, 10).to(dtype)
    out = ba.BatchViewAugment(2, torch.Generator().manual_seed(0))(x)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert torch.isfinite(out.float()).all()


def test_3d_chains():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 10, 10, 7)
    out = ba.BatchViewAugment(3, g)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    lab = torch.randint(0, 14, (6, 1, 10, 10, 7))
    img, lab2 = ba.BatchFinetuneAugment(3, g)(x, lab)
    assert img.shape == x.shape and lab2.shape == lab.shape and lab2.dtype == lab.dtype
    # flips and rotations act on (H, W): every depth slice of the label keeps its histogram
    for i in range(6):
        for z in range(7):
            assert torch.equal(
                torch.bincount(lab2[i, 0, :, :, z].flatten(), minlength=14),
                torch.bincount(lab[i, 0, :, :, z].flatten(), minlength=14),
            )


def test_bad_inputs():
    aug = ba.BatchViewAugment(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shape"):
        aug(torch.rand(1, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        aug(torch.zeros(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="square"):
        ba.BatchRandRotate90(1.0)(torch.rand(2, 1, 8, 6))
    with pytest.raises(ValueError, match="spatial_dims"):
        ba.BatchViewAugment(4)
    with pytest.raises(ValueError, match="does not match"):
        ba.BatchFinetuneAugment(2)(torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 6))
    with pytest.raises(ValueError, match="prob"):
        ba.BatchRandFlip(1.5, 0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            ba.BatchViewAugment(2, torch.Generator())(torch.rand(2, 1, 8, 8, device="cuda"))


# ----------------------------------------------------------------------------------------
# real CT and the GPU
# ----------------------------------------------------------------------------------------


def test_zoom_and_blur_match_monai_on_real_ct(real_ct):
    vol = np.asarray(nib.load(real_ct.image).dataobj)
    sl = np.clip((vol[:96, :96, 15].astype(np.float32) + 500) / 1000, 0, 1)  # an axial slice, [-500, 500] HU -> [0, 1]
    x = torch.from_numpy(sl)[None, None].repeat(3, 1, 1, 1)
    zooms = torch.tensor([0.81, 1.0, 1.17], dtype=torch.float64)
    out = ba.BatchRandZoom(1.0).apply(x, {"do": _ones(3), "zoom": zooms})
    sig = torch.tensor([[0.4, 1.3], [1.5, 0.25], [0.8, 0.8]], dtype=torch.float64)
    blurred = ba.BatchRandGaussianSmooth(1.0).apply(x, {"do": _ones(3), "sigma": sig})
    for i in range(3):
        torch.testing.assert_close(
            out[i], _plain(Zoom(float(zooms[i]), mode="bilinear", padding_mode="constant")(x[i])), rtol=0, atol=1e-6
        )
        ref = _plain(GaussianSmooth(sigma=tuple(float(s) for s in sig[i]))(x[i]))
        torch.testing.assert_close(blurred[i], ref, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_for_fixed_parameters():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 96, 96)
    g = torch.Generator().manual_seed(0)
    for op in ba.view_ops(2):
        params = op.sample(x, g)
        params["do"] = torch.ones_like(params["do"])
        cpu = op.apply(x, params)
        gpu = op.apply(x.cuda(), {k: v.cuda() for k, v in params.items()})
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=2e-6, msg=type(op).__name__)
    gen = torch.Generator(device="cuda").manual_seed(1)
    xc = x.cuda()
    lab = torch.zeros(8, 1, 96, 96, dtype=torch.int64, device="cuda")
    view, ft = ba.BatchViewAugment(2, gen), ba.BatchFinetuneAugment(2, gen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the chains must never wait for the GPU
    try:
        a = view(xc)
        img, lab2 = ft(xc, lab)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gen.manual_seed(1)
    assert a.is_cuda and torch.equal(a, view(xc))
    assert img.is_cuda and lab2.dtype == torch.int64


# ----------------------------------------------------------------------------------------
# the benchmark command line
# ----------------------------------------------------------------------------------------


def test_benchmark_cli_in_process(tmp_path):
    out = tmp_path / "bench.json"
    args = ba.get_args_parser().parse_args(
        [
            "--batch_size",
            "4",
            "--size",
            "16",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--monai_samples",
            "2",
            "--out",
            str(out),
        ]
    )
    res = ba.main(args)
    assert res["batched_samples_per_s"] > 0 and res["monai_s_per_sample"] > 0 and res["speedup"] > 0
    assert out.is_file() and '"speedup"' in out.read_text()
    args = ba.get_args_parser().parse_args(
        [
            "--chain",
            "finetune",
            "--spatial_dims",
            "3",
            "--size",
            "8",
            "--batch_size",
            "2",
            "--iters",
            "1",
            "--skip_monai",
        ]
    )
    assert "speedup" not in ba.main(args)
    with pytest.raises(UserError, match="--batch_size"):
        ba.main(ba.get_args_parser().parse_args(["--batch_size", "0"]))
    with pytest.raises(SystemExit) as e:
        ba.run_cli(ba.main, ba.get_args_parser(), ["--size", "1", "--skip_monai"])
    assert e.value.code == 2
