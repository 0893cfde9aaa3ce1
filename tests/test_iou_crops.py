"""Tests of the method (iou_crops.py): exactness, distribution, errors, MONAI integration."""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.data.box_utils import box_iou
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandFlipd
from scipy import stats as sps

from iou_crops import (
    IOU_SAMPLERS,
    IoUCrop,
    IoUCropd,
    IoUCropSampler,
    OriginalIoUSampler,
    crop_iou,
    get_args_parser,
    main,
    make_sampler,
)
from utils import UserError

# --------------------------------------------------------------------------- independent references


def mask_iou(start_a, start_b, size) -> float:
    """IoU by rasterising both crops on a grid just big enough to hold them."""
    lo = [min(a, b) for a, b in zip(start_a, start_b)]
    hi = [max(a, b) + c for a, b, c in zip(start_a, start_b, size)]
    grid = tuple(h - low for h, low in zip(hi, lo))
    m1 = np.zeros(grid, bool)
    m2 = np.zeros(grid, bool)
    m1[tuple(slice(a - low, a - low + c) for a, low, c in zip(start_a, lo, size))] = True
    m2[tuple(slice(b - low, b - low + c) for b, low, c in zip(start_b, lo, size))] = True
    return float((m1 & m2).sum()) / float((m1 | m2).sum())


def monai_iou(start_a, start_b, size) -> float:
    box_a = np.array([list(start_a) + [s + c for s, c in zip(start_a, size)]], dtype=np.float64)
    box_b = np.array([list(start_b) + [s + c for s, c in zip(start_b, size)]], dtype=np.float64)
    return float(box_iou(box_a, box_b)[0, 0])


def all_pairs(shape, size):
    """Every (start_a, start_b) of two crops inside the image, with its IoU (vectorised)."""
    n = [s - c + 1 for s, c in zip(shape, size)]
    starts = np.array(list(itertools.product(*[range(m) for m in n])), dtype=np.int64)  # (P, k)
    diff = np.abs(starts[:, None, :] - starts[None, :, :])
    overlap = np.clip(np.array(size)[None, None, :] - diff, 0, None)
    inter = overlap.prod(-1)
    vol = math.prod(size)
    iou = inter.astype(np.float64) / (2 * vol - inter).astype(np.float64)
    return starts, iou


def expected_distribution(shape, size, lo, hi):
    """Target P(a, b): a uniform over positions with a partner, b uniform over its partners."""
    starts, iou = all_pairs(shape, size)
    valid = (iou >= lo) & (iou <= hi)
    partners = valid.sum(1)
    has = partners > 0
    prob = np.where(valid, 1.0 / np.maximum(partners, 1)[:, None], 0.0) / has.sum()
    return starts, valid, prob


# --------------------------------------------------------------------------- crop_iou


def test_crop_iou_known_values():
    assert crop_iou((0, 0), (0, 0), 4) == 1.0
    assert crop_iou((0, 0), (4, 0), 4) == 0.0
    assert crop_iou((0, 0), (2, 0), 4) == pytest.approx(8 / 24)  # inter 2x4, union 32 - 8
    assert crop_iou((0, 0, 0), (1, 1, 1), 2) == pytest.approx(1 / 15)
    assert crop_iou((0, 0), (1, 3), (2, 6)) == pytest.approx(3 / 21)  # rectangular: 1x3 of 12 each
    assert isinstance(crop_iou((0, 0), (1, 1), 3), float)


def test_crop_iou_matches_references():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(2, 4))
        size = tuple(int(x) for x in rng.integers(1, 12, size=k))
        a = tuple(int(x) for x in rng.integers(0, 20, size=k))
        b = tuple(int(x) for x in rng.integers(0, 20, size=k))
        got = crop_iou(a, b, size)
        assert got == mask_iou(a, b, size)
        assert got == pytest.approx(monai_iou(a, b, size), abs=1e-6)


def test_crop_iou_bad_arguments():
    with pytest.raises(ValueError, match="different numbers of axes"):
        crop_iou((0, 0), (0, 0, 0), 4)
    with pytest.raises(ValueError, match="positive"):
        crop_iou((0, 0), (1, 1), 0)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        crop_iou((0, 0), (1, 1), (4, 4, 4))


# --------------------------------------------------------------------------- exactness


def _random_case(rng):
    k = int(rng.integers(2, 4))
    size = tuple(int(x) for x in rng.integers(3, 9 if k == 2 else 6, size=k))
    shape = tuple(int(c + rng.integers(0, 2 * c + 3)) for c in size)
    kind = rng.integers(0, 4)
    if kind == 0:
        lo, hi = 0.0, 0.0
    elif kind == 1:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = sorted(float(x) for x in rng.random(2).round(3))
    return shape, size, lo, hi


def test_every_pair_inside_image_and_interval_2d_3d():
    """Many shapes, crop sizes (rectangular / cuboid), intervals and seeds, against brute force."""
    rng = np.random.default_rng(1234)
    n_cases, n_pairs = 100, 20
    checked = infeasible_cases = 0
    for case in range(n_cases):
        shape, size, lo, hi = _random_case(rng)
        _, iou = all_pairs(shape, size)
        feasible = bool(((iou >= lo) & (iou <= hi)).any())
        # square crops as one int half of the time (the sampler then serves any dimensionality)
        square = len(set(size)) == 1 and case % 2
        sampler = IoUCropSampler(size[0] if square else size, lo, hi)
        assert sampler.is_feasible(shape) == feasible, (shape, size, lo, hi)
        seed_rng = np.random.default_rng(case) if case % 3 else np.random.RandomState(case)
        for i in range(n_pairs):
            a, b = sampler.sample(shape, seed_rng)
            assert all(type(x) is int for x in a + b)
            for s, c, x, y in zip(shape, size, a, b):
                assert 0 <= x <= s - c and 0 <= y <= s - c, (shape, size, a, b)
            v = crop_iou(a, b, size)
            assert v == mask_iou(a, b, size)
            if i < 3:
                assert v == pytest.approx(monai_iou(a, b, size), abs=1e-6)
            if feasible:
                assert lo <= v <= hi, (shape, size, lo, hi, a, b, v)
            checked += 1
        assert sampler.stats["pairs"] == n_pairs
        assert sampler.stats["infeasible"] == (0 if feasible else n_pairs)
        infeasible_cases += not feasible
    assert checked == n_cases * n_pairs
    assert infeasible_cases > 0  # the closest-pair path was exercised


def test_paper_intervals_on_paper_sizes():
    """The paper's intervals and a narrow one on realistic slice and volume sizes."""
    intervals = [(0.0, 0.0), (0.0001, 0.3), (0.3, 0.6), (0.6, 1.0), (0.0, 1.0), (0.45, 0.5)]
    rng = np.random.default_rng(7)
    for shape, c in [((300, 250), 96), ((512, 512), 96), ((200, 200, 120), 64), ((96, 200), 96)]:
        for lo, hi in intervals:
            sampler = IoUCropSampler(c, lo, hi)
            if (shape, lo) == ((96, 200), 0.0) and hi == 0.0:
                continue  # 96 x 200 admits no disjoint pair of 96 x 96 crops (tested below)
            for _ in range(40):
                a, b = sampler.sample(shape, rng)
                assert lo <= crop_iou(a, b, c) <= hi
            assert sampler.stats == {"pairs": 40, "infeasible": 0}


# --------------------------------------------------------------------------- distribution


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    mask = probs > 0
    assert counts[~mask].sum() == 0, "samples outside the support"
    expected = probs[mask] * counts.sum()
    return float(sps.chisquare(counts[mask], expected).pvalue)


def _sample_counts(sampler, shape, starts, n, seed):
    index = {tuple(s): i for i, s in enumerate(starts.tolist())}
    counts = np.zeros((len(starts), len(starts)), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        a, b = sampler.sample(shape, rng)
        counts[index[a], index[b]] += 1
    return counts


@pytest.mark.parametrize(
    "shape,size,lo,hi",
    [
        ((11, 9), (4, 3), 0.3, 0.6),  # rectangular crops, all first positions feasible
        ((10, 9), (4, 4), 0.0, 0.0),  # central first positions have no disjoint partner
        ((7, 6, 6), (3, 3, 2), 0.3, 0.6),  # 3D cuboid
    ],
)
def test_distribution_matches_target_and_rejects_pair_uniform(shape, size, lo, hi):
    """Chi-square over every valid pair: first crop uniform over feasible positions, second
    uniform over the first's partners. The same test must reject a sampler that is uniform
    over all valid pairs (first crop weighted by its partner count)."""
    starts, valid, target = expected_distribution(shape, size, lo, hi)
    n_cells = int(valid.sum())
    n = max(12000, 12 * n_cells)
    counts = _sample_counts(IoUCropSampler(size, lo, hi), shape, starts, n, seed=0)
    assert _chi2_pvalue(counts, target) > 1e-3
    # the first crop alone (more power on the marginal)
    assert _chi2_pvalue(counts.sum(1), target.sum(1)) > 1e-3

    pair_uniform = valid / valid.sum()
    assert not np.allclose(pair_uniform.sum(1), target.sum(1))
    rng = np.random.default_rng(1)
    flat = rng.choice(valid.size, size=n, p=pair_uniform.ravel())
    alt_counts = np.bincount(flat, minlength=valid.size).reshape(valid.shape)
    assert _chi2_pvalue(alt_counts, target) < 1e-6  # the test has power against the alternative
    assert _chi2_pvalue(counts, pair_uniform) < 1e-6


def test_generator_and_randomstate_same_contract():
    s = IoUCropSampler(5, 0.3, 0.6)
    for rng in (np.random.default_rng(3), np.random.RandomState(3)):
        for _ in range(50):
            a, b = s.sample((17, 13), rng)
            assert 0.3 <= crop_iou(a, b, 5) <= 0.6
    with pytest.raises(TypeError, match="Generator or RandomState"):
        s.sample((17, 13), 3)


# --------------------------------------------------------------------------- infeasible and invalid input


@pytest.mark.parametrize(
    "shape,crop,lo,hi",
    [
        ((96, 96), 96, 0.0, 0.0),
        ((96, 96), 96, 0.3, 0.6),
        ((150, 150), 96, 0.0, 0.0),  # no axis at least twice the crop
        ((64, 64, 64), 64, 0.0001, 0.3),
        ((40, 40), 16, 0.3, 0.3),  # no class attains exactly 0.3 -> nothing valid at all
    ],
)
def test_infeasible_strict_raises_and_lenient_returns_closest(shape, crop, lo, hi):
    strict = IoUCropSampler(crop, lo, hi, strict=True)
    assert not strict.is_feasible(shape)
    with pytest.raises(ValueError) as err:
        strict.sample(shape, np.random.default_rng(0))
    msg = str(err.value)
    assert str(tuple(shape)) in msg and str(crop) in msg and str(lo) in msg and str(hi) in msg

    lenient = IoUCropSampler(crop, lo, hi, strict=False)
    size = (crop,) * len(shape)
    if math.prod(s - crop + 1 for s in shape) <= 1500:
        _, iou = all_pairs(shape, size)
        dist = np.where(iou < lo, lo - iou, np.where(iou > hi, iou - hi, 0.0))
        best = dist.min()
        assert best > 0
    else:
        best = None
    rng = np.random.default_rng(0)
    for _ in range(20):
        pair = lenient.sample_pair(shape, rng)
        assert pair.feasible is False
        v = crop_iou(pair.start_a, pair.start_b, crop)
        assert v == pair.iou
        if best is not None:
            d = lo - v if v < lo else v - hi
            assert d == best
    assert lenient.stats == {"pairs": 20, "infeasible": 20}
    lenient.reset_stats()
    assert lenient.stats == {"pairs": 0, "infeasible": 0}


def test_closest_pair_on_wide_image_for_zero_interval():
    # 150 x 150 with 96 crops: the least overlapping pair is the two opposite corners
    s = IoUCropSampler(96, 0.0, 0.0)
    for seed in range(5):
        a, b = s.sample((150, 150), np.random.default_rng(seed))
        assert (abs(a[0] - b[0]), abs(a[1] - b[1])) == (54, 54)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(crop_size=96, min_iou=0.7, max_iou=0.3), "0.7.*0.3"),
        (dict(crop_size=96, min_iou=-0.1, max_iou=0.3), "-0.1"),
        (dict(crop_size=96, min_iou=0.1, max_iou=1.5), "1.5"),
        (dict(crop_size=96, min_iou=float("nan")), "nan"),
        (dict(crop_size=0), "0"),
        (dict(crop_size=(96, -1)), "-1"),
        (dict(crop_size=(96,)), r"\(96,\)"),
        (dict(crop_size=(4, 4, 4, 4)), r"\(4, 4, 4, 4\)"),
        (dict(crop_size=(4.5, 4)), "4.5"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IoUCropSampler(**kwargs)


def test_invalid_shapes():
    s = IoUCropSampler(8, 0.3, 0.6)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(7, 20\)"):
        s.sample((7, 20), rng)
    with pytest.raises(ValueError, match=r"\(20,\)"):
        s.sample((20,), rng)
    with pytest.raises(ValueError, match=r"\(20, 20, 20, 20\)"):
        s.sample((20, 20, 20, 20), rng)
    with pytest.raises(ValueError, match=r"\(20, 20, 20\).*\(8, 8\)"):
        IoUCropSampler((8, 8), 0.3, 0.6).sample((20, 20, 20), rng)
    with pytest.raises(ValueError, match="spatial_dims"):
        IoUCropd("image", spatial_dims=4)
    with pytest.raises(ValueError, match="channel-first"):
        IoUCropd("image", spatial_dims=2, crop_size=4)({"image": np.zeros((1, 8, 8, 8))})
    with pytest.raises(ValueError, match="'label'"):
        IoUCropd(["image", "label"], spatial_dims=2, crop_size=4)(
            {"image": np.zeros((1, 8, 8)), "label": np.zeros((1, 8, 9))}
        )


# --------------------------------------------------------------------------- MONAI transforms


def _coord_image(shape, channels=1):
    """Channel-first image whose value encodes the spatial position (crops reveal their box)."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    code = np.zeros(shape, dtype=np.float32)
    for g, s in zip(grids, shape):
        code = code * 1000 + g
    return np.stack([code + 1e7 * c for c in range(channels)]).astype(np.float64)


def _box_of(crop, img, size):
    """Recover the start of ``crop`` inside ``img`` from the position code."""
    arr = np.asarray(crop)
    full = np.asarray(img)
    where = np.argwhere(full[0] == arr[(0,) + (0,) * (arr.ndim - 1)])
    assert len(where) == 1
    start = tuple(int(x) for x in where[0])
    np.testing.assert_array_equal(arr, full[(slice(None),) + tuple(slice(s, s + c) for s, c in zip(start, size))])
    return start


def test_iou_crop_array_level_types_and_attributes():
    img = _coord_image((30, 25), channels=2)
    t = IoUCrop(8, 0.3, 0.6).set_random_state(0)
    assert isinstance(t, IoUCrop)
    for inp, typ in [
        (img, np.ndarray),
        (torch.as_tensor(img), torch.Tensor),
        (MetaTensor(torch.as_tensor(img)), MetaTensor),
    ]:
        c1, c2 = t(inp)
        assert type(c1) is typ and type(c2) is typ
        assert tuple(c1.shape) == (2, 8, 8)
        assert _box_of(c1, img, (8, 8)) == t.start_a
        assert _box_of(c2, img, (8, 8)) == t.start_b
        assert t.iou == crop_iou(t.start_a, t.start_b, 8) and 0.3 <= t.iou <= 0.6
        assert t.feasible is True
    with pytest.raises(TypeError, match="list"):
        t([[1.0]])
    # randomize=False reuses the boxes
    prev = (t.start_a, t.start_b)
    c1b, c2b = t(img, randomize=False)
    assert (t.start_a, t.start_b) == prev
    assert _box_of(c1b, img, (8, 8)) == prev[0]


def test_iou_cropd_same_boxes_for_all_keys_and_store_boxes():
    img = _coord_image((40, 33))
    label = (img.copy() * 2).astype(np.float32)
    t = IoUCropd(["image", "label"], spatial_dims=2, crop_size=(10, 7), min_iou=0.3, max_iou=0.6, store_boxes=True)
    assert t.set_random_state(5) is t
    for _ in range(20):
        out = t({"image": MetaTensor(torch.as_tensor(img)), "label": label, "case": "x"})
        assert set(out) == {
            "image1",
            "image2",
            "label1",
            "label2",
            "case",
            "iou_start1",
            "iou_start2",
            "iou_value",
            "iou_feasible",
        }
        assert type(out["image1"]) is MetaTensor and type(out["label1"]) is np.ndarray
        s1, s2 = _box_of(out["image1"], img, (10, 7)), _box_of(out["image2"], img, (10, 7))
        np.testing.assert_array_equal(out["label1"], 2 * np.asarray(out["image1"]).astype(np.float32))
        np.testing.assert_array_equal(out["label2"], 2 * np.asarray(out["image2"]).astype(np.float32))
        assert out["iou_start1"].dtype == np.int64 and out["iou_start1"].shape == (2,)
        assert tuple(out["iou_start1"].tolist()) == s1 and tuple(out["iou_start2"].tolist()) == s2
        assert type(out["iou_value"]) is float and out["iou_value"] == crop_iou(s1, s2, (10, 7))
        assert 0.3 <= out["iou_value"] <= 0.6 and out["iou_feasible"] is True
        # the MetaTensor affine follows the crop
        np.testing.assert_allclose(np.asarray(out["image1"].affine)[:2, 3], np.array(s1, dtype=float))
    assert t.stats == {"pairs": 20, "infeasible": 0}


def test_iou_cropd_infeasible_reported_and_missing_keys():
    t = IoUCropd("image", spatial_dims=2, crop_size=8, min_iou=0.0, max_iou=0.0, store_boxes=True).set_random_state(0)
    out = t({"image": np.zeros((1, 8, 12), np.float32)})
    assert out["iou_feasible"] is False and out["iou_value"] > 0
    assert t.stats["infeasible"] == 1
    strict = IoUCropd("image", spatial_dims=2, crop_size=8, min_iou=0.0, max_iou=0.0, strict=True)
    with pytest.raises(ValueError, match=r"\(8, 12\)"):
        strict({"image": np.zeros((1, 8, 12), np.float32)})
    with pytest.raises(KeyError):
        IoUCropd(["image", "label"], spatial_dims=2, crop_size=4)({"image": np.zeros((1, 8, 8))})
    out = IoUCropd(["image", "label"], spatial_dims=2, crop_size=4, allow_missing_keys=True)(
        {"image": np.zeros((1, 8, 8))}
    )
    assert set(out) == {"image1", "image2"}


def test_determinism_under_set_random_state_3d():
    img = _coord_image((20, 18, 16))
    runs = []
    for seed in (11, 11, 12):
        t = IoUCropd("image", spatial_dims=3, crop_size=(6, 5, 4), min_iou=0.3, max_iou=0.6, store_boxes=True)
        t.set_random_state(seed)
        runs.append([(tuple(o["iou_start1"]), tuple(o["iou_start2"])) for o in (t({"image": img}) for _ in range(15))])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    for a, b in runs[0]:
        assert 0.3 <= crop_iou(a, b, (6, 5, 4)) <= 0.6


def test_iou_cropd_wraps_iou_crop_with_one_generator():
    """IoUCropd draws with its IoUCrop from self.R: the same pairs as an IoUCrop seeded alike, also after pickling."""
    img = _coord_image((31, 27))
    d = IoUCropd("image", spatial_dims=2, crop_size=(9, 6), min_iou=0.3, max_iou=0.6, store_boxes=True)
    assert isinstance(d.cropper, IoUCrop) and d.sampler is d.cropper.sampler and d.pair is None
    assert d.set_random_state(21) is d and d.cropper.R is d.R
    c = IoUCrop((9, 6), 0.3, 0.6).set_random_state(21)
    for i in range(12):
        if i == 5:
            d = pickle.loads(pickle.dumps(d))
            assert d.cropper.R is d.R
        out = d({"image": img})
        c(img)
        assert (tuple(out["iou_start1"].tolist()), tuple(out["iou_start2"].tolist())) == (c.start_a, c.start_b)
        assert d.pair == (c.start_a, c.start_b, c.iou, c.feasible) and out["iou_value"] == c.iou
    assert d.stats == {"pairs": 12, "infeasible": 0}
    # a generator given as state, or set on R directly, is the one drawn from
    rs = np.random.RandomState(4)
    d.set_random_state(state=rs)
    d.R = np.random.RandomState(8)
    d({"image": img})
    assert rs.random_sample() == np.random.RandomState(4).random_sample()
    c.set_random_state(8)
    c(img)
    assert d.pair.start_a == c.start_a and d.pair.start_b == c.start_b


def _pipeline_batches(seed, num_workers, cache=False):
    data = [
        {"image": _coord_image((30 + i, 26)).astype(np.float32), "label": np.full((1, 30 + i, 26), i, np.uint8)}
        for i in range(8)
    ]
    transform = Compose(
        [
            IoUCropd(["image", "label"], spatial_dims=2, crop_size=12, min_iou=0.3, max_iou=0.6, store_boxes=True),
            RandFlipd(["image1", "label1"], prob=0.5, spatial_axis=0),
        ]
    )
    ds = CacheDataset(data, transform, progress=False) if cache else Dataset(data, transform)
    loader = DataLoader(
        ds, batch_size=4, num_workers=num_workers, generator=torch.Generator().manual_seed(seed), shuffle=True
    )
    return list(loader)


def test_pipeline_with_two_workers_is_reproducible():
    b1 = _pipeline_batches(seed=0, num_workers=2)
    b2 = _pipeline_batches(seed=0, num_workers=2)
    b3 = _pipeline_batches(seed=1, num_workers=2)
    assert len(b1) == 2
    for x, y in zip(b1, b2):
        assert torch.equal(torch.as_tensor(x["image1"]), torch.as_tensor(y["image1"]))
        assert torch.equal(torch.as_tensor(x["image2"]), torch.as_tensor(y["image2"]))
        assert torch.equal(x["iou_start1"], y["iou_start1"]) and torch.equal(x["iou_start2"], y["iou_start2"])
    assert any(not torch.equal(x["iou_start1"], y["iou_start1"]) for x, y in zip(b1, b3))
    for batch in b1:
        assert batch["image1"].shape == (4, 1, 12, 12) and batch["label2"].shape == (4, 1, 12, 12)
        assert batch["iou_value"].dtype == torch.float64 and batch["iou_feasible"].dtype == torch.bool
        assert bool(batch["iou_feasible"].all())
        assert ((batch["iou_value"] >= 0.3) & (batch["iou_value"] <= 0.6)).all()
        for i in range(4):
            s1 = tuple(batch["iou_start1"][i].tolist())
            s2 = tuple(batch["iou_start2"][i].tolist())
            assert batch["iou_value"][i].item() == crop_iou(s1, s2, 12)


def test_cache_dataset_single_process():
    batches = _pipeline_batches(seed=3, num_workers=0, cache=True)
    again = _pipeline_batches(seed=3, num_workers=0, cache=True)
    for x, y in zip(batches, again):
        assert torch.equal(x["iou_start2"], y["iou_start2"])
        assert ((x["iou_value"] >= 0.3) & (x["iou_value"] <= 0.6)).all()


def test_real_ct_volume_metatensor_crops(real_ct):
    path, lab = real_ct.image, real_ct.label
    load = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])])
    d = load({"image": str(path), "label": str(lab)})
    img = d["image"]
    assert tuple(img.shape[1:]) == (122, 101, 30)
    t = IoUCropd(["image", "label"], spatial_dims=3, crop_size=(48, 48, 24), min_iou=0.3, max_iou=0.6, store_boxes=True)
    out = t.set_random_state(0)(d)
    s1 = tuple(out["iou_start1"].tolist())
    window = tuple(slice(s, s + c) for s, c in zip(s1, (48, 48, 24)))
    np.testing.assert_array_equal(np.asarray(out["image1"]), np.asarray(img)[(slice(None),) + window])
    np.testing.assert_array_equal(np.asarray(out["label1"]), np.asarray(d["label"])[(slice(None),) + window])
    expected_origin = np.asarray(img.affine) @ np.array(list(s1) + [1.0])
    np.testing.assert_allclose(np.asarray(out["image1"].affine)[:3, 3], expected_origin[:3], atol=1e-4)
    assert 0.3 <= out["iou_value"] <= 0.6


# --------------------------------------------------------------------------- command line


def test_cli_main_and_bad_input(capsys):
    args = get_args_parser().parse_args(["--image_shape", "40", "30", "--crop_size", "8", "--n", "4"])
    pairs = main(args)
    assert len(pairs) == 4 and all(0.3 <= p.iou <= 0.6 for p in pairs)
    assert "start_a" in capsys.readouterr().out
    bad = get_args_parser().parse_args(["--image_shape", "4", "30", "--crop_size", "8"])
    with pytest.raises(UserError, match=r"\(4, 30\)"):
        main(bad)


# --------------------------------------------------------------------------- the original's Algorithm 1


def algorithm1_as_the_original(array_shape, crop, lo, hi, R):
    """Algorithm 1 of the thesis in the original code's terms, written out here as the reference:
    the shape's first two axes swapped ("x" first), boxes as [x1, y1, (z1,) x2, y2, (z2)], the
    second crop drawn inside the box grown by one crop around the first when lo > 0, 30 tries
    per first crop, 4 first crops, then the last pair. Returns (start_a, start_b) in array order."""
    k = len(array_shape)
    shape = list(array_shape)
    shape[0], shape[1] = shape[1], shape[0]

    def draw(box):  # box: [mins..., maxs...]
        return [int(R.randint(box[i], box[k + i] - crop + 1)) for i in range(k)]

    def iou(a, b):
        inter = math.prod(max(0, min(a[i], b[i]) + crop - max(a[i], b[i])) for i in range(k))
        return inter / (2 * crop**k - inter)

    for _ in range(4):
        a = draw([0] * k + shape)
        box = [max(a[i] - crop, 0) for i in range(k)] + [min(a[i] + 2 * crop, shape[i]) for i in range(k)]
        if lo == 0:
            box = [0] * k + shape
        for _ in range(30):
            b = draw(box)
            if lo <= iou(a, b) <= hi:
                break
        else:
            continue
        break

    def to_array_order(p):
        return (p[1], p[0], *p[2:])

    return to_array_order(a), to_array_order(b)


@pytest.mark.parametrize(
    "shape, crop, lo, hi",
    [
        ((40, 30), 8, 0.3, 0.6),
        ((40, 30), 8, 0.0, 0.0),
        ((16, 10), 8, 0.0, 0.0),  # a third of the pairs: the fallback
        ((25, 21), 6, 0.45, 0.5),
        ((30, 26, 22), 6, 0.3, 0.6),
        ((16, 16, 12), 6, 0.6, 1.0),
        ((9, 9), 8, 0.0, 1.0),
    ],
)
def test_original_sampler_draws_the_originals_pairs(shape, crop, lo, hi):
    """OriginalIoUSampler, from a RandomState in a given state, returns exactly the pairs of the
    original's Algorithm 1 (same draws, same order, same fallback)."""
    ours = OriginalIoUSampler(crop, lo, hi)
    r_ours, r_ref = np.random.RandomState(5), np.random.RandomState(5)
    n_out = 0
    for _ in range(60):
        pair = ours.sample_pair(shape, r_ours)
        assert (pair.start_a, pair.start_b) == algorithm1_as_the_original(shape, crop, lo, hi, r_ref)
        assert pair.iou == crop_iou(pair.start_a, pair.start_b, crop)
        assert pair.feasible == IoUCropSampler(crop, lo, hi).is_feasible(shape)
        n_out += not lo <= pair.iou <= hi
    assert r_ours.randint(1 << 30) == r_ref.randint(1 << 30)  # the same number of draws
    assert ours.stats["pairs"] == 60 and ours.stats["fallbacks"] == n_out
    if (shape, lo, hi) == ((16, 10), 0.0, 0.0):
        assert n_out > 10  # the trial-and-error sampler misses an interval the exact one always meets
        assert IoUCropSampler(crop, lo, hi).is_feasible(shape)


def test_original_sampler_in_the_transforms_and_its_errors():
    img = _coord_image((40, 30))
    d = IoUCropd("image", spatial_dims=2, crop_size=8, min_iou=0.0, max_iou=0.0, store_boxes=True, sampler="original")
    assert isinstance(d.sampler, OriginalIoUSampler)
    d.set_random_state(3)
    ref = OriginalIoUSampler(8, 0.0, 0.0)
    rs = np.random.RandomState(3)
    for _ in range(10):
        out = d({"image": img})
        a, b = ref.sample(img.shape[1:], rs)
        assert (tuple(out["iou_start1"].tolist()), tuple(out["iou_start2"].tolist())) == (a, b)
        assert out["iou_feasible"] is True
        assert _box_of(out["image1"], img, (8, 8)) == a and _box_of(out["image2"], img, (8, 8)) == b
    assert d.stats["pairs"] == 10 and set(d.stats) == {"pairs", "infeasible", "fallbacks"}
    c = IoUCrop(8, 0.3, 0.6, sampler="original").set_random_state(1)
    c1, c2 = c(img)
    assert c1.shape == c2.shape == (1, 8, 8) and isinstance(c.sampler, OriginalIoUSampler)
    # an image that admits no pair: flagged, or refused with strict
    small = np.zeros((1, 8, 12), np.float32)
    t = IoUCropd("image", spatial_dims=2, crop_size=8, min_iou=0.0, max_iou=0.0, store_boxes=True, sampler="original")
    out = t.set_random_state(0)({"image": small})
    assert out["iou_feasible"] is False and out["iou_value"] > 0 and t.stats["fallbacks"] == 1
    strict = IoUCropd("image", spatial_dims=2, crop_size=8, max_iou=0.0, strict=True, sampler="original")
    with pytest.raises(ValueError, match=r"\(8, 12\)"):
        strict({"image": small})
    with pytest.raises(ValueError, match="sampler must be one of exact, original, got 'thesis'"):
        IoUCropd("image", spatial_dims=2, crop_size=8, sampler="thesis")
    with pytest.raises(ValueError, match="r1 must be a positive integer"):
        OriginalIoUSampler(8, r1=0)
    assert make_sampler("exact", 8).__class__ is IoUCropSampler and IOU_SAMPLERS == ("exact", "original")
