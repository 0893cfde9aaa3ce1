"""metrics.py: both scores against independent computations, conventions, outputs, figure, real CT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_surface_dice
from PIL import Image
from scipy import ndimage

import metrics
from data import LABEL_NAMES
from metrics import (
    FLARE22_TOLERANCE_MM,
    PaperDice,
    class_counts,
    format_summary,
    organ_scores,
    paper_dice_per_item,
    plot_predictions,
    summarize_case_scores,
    write_scores,
)
from utils import UserError

# ------------------------------------------------------------------------------------------
# Independent reference computations, written from the formulas
# ------------------------------------------------------------------------------------------


def ref_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice by set counts on voxel coordinates."""
    sa = set(map(tuple, np.argwhere(a)))
    sb = set(map(tuple, np.argwhere(b)))
    return 2 * len(sa & sb) / (len(sa) + len(sb))


def ref_boundary_points(mask: np.ndarray) -> np.ndarray:
    """Coordinates of mask voxels with a face neighbour outside the mask or outside the array (by loops)."""
    pts = []
    for idx in np.argwhere(mask):
        on_edge = False
        for d in range(mask.ndim):
            for step in (-1, 1):
                nb = idx.copy()
                nb[d] += step
                if nb[d] < 0 or nb[d] >= mask.shape[d] or not mask[tuple(nb)]:
                    on_edge = True
        if on_edge:
            pts.append(idx)
    return np.array(pts, dtype=np.float64).reshape(-1, mask.ndim)


def ref_nsd(a: np.ndarray, b: np.ndarray, spacing, tol: float) -> float:
    """NSD by brute-force point-to-point distances between boundary voxel centres in mm."""
    pa = ref_boundary_points(a) * np.asarray(spacing)
    pb = ref_boundary_points(b) * np.asarray(spacing)
    if len(pa) == 0 and len(pb) == 0:
        return 1.0
    if len(pa) == 0 or len(pb) == 0:
        return 0.0
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    close = (d.min(axis=1) <= tol + 1e-9).sum() + (d.min(axis=0) <= tol + 1e-9).sum()
    return close / (len(pa) + len(pb))


def ref_organ(pred, label, organ, spacing, tol):
    """FLARE conventions around the two reference functions."""
    a, b = label == organ, pred == organ
    if not a.any() and not b.any():
        return 1.0, 1.0
    if not a.any():
        return 0.0, 0.0
    return ref_dice(a, b), ref_nsd(a, b, spacing, tol)


# ------------------------------------------------------------------------------------------
# Hand-made label volumes
# ------------------------------------------------------------------------------------------


def hand_made_2d():
    """Label and prediction (12 x 10) over organ ids 1..5 (n_classes 6)."""
    label = np.zeros((12, 10), dtype=np.uint8)
    pred = np.zeros_like(label)
    label[1:6, 1:5] = 1  # organ 1: a block, prediction shifted by one row and cut
    pred[2:7, 1:4] = 1
    label[8:11, 6:9] = 2  # organ 2: in the label only -> Dice 0, NSD 0
    pred[0:2, 7:10] = 3  # organ 3: in the prediction only (touches the border) -> 0, 0
    # organ 4: absent from both -> 1, 1
    label[7, 0:4] = 5  # organ 5: a thin line, predicted one row off and longer
    pred[8, 0:5] = 5
    return pred, label


def hand_made_3d():
    """Label and prediction (9 x 11 x 7) over organs 1..13: some overlap, some absent, organ 5 on part of z."""
    label = np.zeros((9, 11, 7), dtype=np.int16)
    pred = np.zeros_like(label)
    label[1:5, 1:6, 1:5] = 1
    pred[1:5, 2:7, 1:6] = 1
    label[5:8, 6:10, 2:4] = 2
    pred[6:8, 6:9, 2:5] = 2
    label[0:2, 8:11, 0:2] = 3  # 3 only in the label
    pred[7:9, 0:2, 5:7] = 4  # 4 only in the prediction
    label[4, 4, 1:4] = 5  # aorta: label on z 1..3, prediction runs on z 0..6
    pred[4, 4, 0:7] = 5
    pred[3, 4, 2] = 5
    label[6:8, 1:3, 5:7] = 13
    pred[6:8, 1:3, 5:7] = 13  # 13 exact
    return pred, label


def test_organ_scores_2d_match_bruteforce_with_anisotropic_spacing():
    pred, label = hand_made_2d()
    spacing = (0.8, 2.0)
    for tol in (0.5, 1.0, 2.0, 3.0):
        got = organ_scores(pred, label, spacing, n_classes=6, tolerance_mm=tol, z_axis=None)
        assert sorted(got) == [1, 2, 3, 4, 5]
        for organ in range(1, 6):
            d, n = ref_organ(pred, label, organ, spacing, tol)
            assert got[organ]["dice"] == pytest.approx(d, abs=1e-12), (organ, tol)
            assert got[organ]["nsd"] == pytest.approx(n, abs=1e-12), (organ, tol)
            assert got[organ]["tolerance_mm"] == tol
    # the conventions, spelled out
    assert (got[2]["dice"], got[2]["nsd"]) == (0.0, 0.0)  # label only
    assert (got[3]["dice"], got[3]["nsd"]) == (0.0, 0.0)  # prediction only
    assert (got[4]["dice"], got[4]["nsd"]) == (1.0, 1.0)  # absent from both
    assert (got[4]["label_voxels"], got[4]["pred_voxels"]) == (0, 0)
    assert got[3]["pred_voxels"] == 6 and got[3]["label_voxels"] == 0
    # organ 1 is neither perfect nor zero, and NSD grows with the tolerance
    nsd1 = [organ_scores(pred, label, spacing, 6, t, z_axis=None)[1]["nsd"] for t in (0.5, 1.0, 3.0)]
    assert 0 < nsd1[0] < nsd1[1] <= nsd1[2] and 0 < got[1]["dice"] < 1


def test_organ_scores_3d_match_bruteforce_and_flare_tolerances():
    pred, label = hand_made_3d()
    spacing = (0.9, 1.4, 2.5)
    got = organ_scores(pred, label, spacing, z_axis=None)  # FLARE 2022 per-organ tolerances
    assert sorted(got) == list(range(1, 14))
    for organ in range(1, 14):
        tol = FLARE22_TOLERANCE_MM[organ]
        d, n = ref_organ(pred, label, organ, spacing, tol)
        assert got[organ]["dice"] == pytest.approx(d, abs=1e-12), organ
        assert got[organ]["nsd"] == pytest.approx(n, abs=1e-12), organ
        assert got[organ]["tolerance_mm"] == tol
    # a single small tolerance for every organ (FLARE 2021 style)
    got1 = organ_scores(pred, label, spacing, tolerance_mm=1.0, z_axis=None)
    for organ in (1, 2, 5):
        assert got1[organ]["nsd"] == pytest.approx(ref_organ(pred, label, organ, spacing, 1.0)[1], abs=1e-12)
    assert got1[1]["nsd"] < got[1]["nsd"]  # 1 mm is stricter than the liver's 5 mm
    assert got[13]["dice"] == got[13]["nsd"] == 1.0


def test_tubular_organs_are_scored_on_the_label_slice_range_only():
    pred, label = hand_made_3d()
    spacing = (1.0, 1.0, 2.5)
    restricted = organ_scores(pred, label, spacing, z_axis=-1)
    whole = organ_scores(pred, label, spacing, z_axis=None)
    zs = slice(1, 4)  # the label's aorta spans z 1..3, inclusive
    d, n = ref_organ(pred[:, :, zs], label[:, :, zs], 5, spacing, FLARE22_TOLERANCE_MM[5])
    assert restricted[5]["dice"] == pytest.approx(d, abs=1e-12)
    assert restricted[5]["nsd"] == pytest.approx(n, abs=1e-12)
    d_whole = ref_organ(pred, label, 5, spacing, FLARE22_TOLERANCE_MM[5])[0]
    assert whole[5]["dice"] == pytest.approx(d_whole, abs=1e-12)
    assert restricted[5]["dice"] > whole[5]["dice"]  # prediction beyond the label's range is ignored
    # other organs are not restricted; z_axis=0 restricts along the first axis instead
    for organ in (1, 2, 3, 4, 13):
        assert restricted[organ] == whole[organ]
    along0 = organ_scores(pred, label, spacing, z_axis=0)
    assert along0[5]["dice"] == pytest.approx(ref_dice(label[4:5] == 5, pred[4:5] == 5), abs=1e-12)


def test_nsd_counts_a_distance_equal_to_the_tolerance_despite_rounding():
    # 3 voxels of 0.8 mm: in floating point 3 * 0.8 = 2.4000000000000004 > 2.4
    a = np.zeros((12, 6), dtype=bool)
    a[2:5, 1:5] = True
    b = np.roll(a, 3, axis=0)
    spacing = (0.8, 1.0)
    at_tie = metrics.surface_dice(a, b, spacing, 2.4)
    assert at_tie == metrics.surface_dice(a, b, spacing, 2.45)
    assert at_tie > metrics.surface_dice(a, b, spacing, 2.35)
    assert at_tie == pytest.approx(ref_nsd(a, b, spacing, 2.4), abs=1e-12)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice inside get_mask_edges
def test_surface_dice_agrees_with_monai_on_random_masks():
    rng = np.random.default_rng(7)
    spacing = (0.7, 1.3, 2.5)
    for _ in range(3):
        a = ndimage.binary_opening(rng.random((10, 12, 8)) > 0.45)
        b = ndimage.binary_opening(rng.random((10, 12, 8)) > 0.45)
        assert a.any() and b.any()
        ours = metrics.surface_dice(a, b, spacing, 1.5)
        theirs = compute_surface_dice(
            torch.from_numpy(b)[None, None].float(),
            torch.from_numpy(a)[None, None].float(),
            class_thresholds=[1.5],
            include_background=True,
            spacing=spacing,
        )
        assert ours == pytest.approx(float(theirs), abs=1e-6)
        assert ours == pytest.approx(ref_nsd(a, b, spacing, 1.5), abs=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, lab: (p[:-1], lab), "shape"),
        (lambda p, lab: (p.astype(np.float32), lab), "dtype"),
        (lambda p, lab: (p, np.where(lab == 1, 14, lab)), "class id 14"),
        (lambda p, lab: (p.astype(np.int16) - 1, lab), "class id -1"),
    ],
)
def test_organ_scores_refuses_bad_input(change, message):
    pred, label = hand_made_3d()
    pred, label = change(pred, label)
    with pytest.raises(UserError, match=message):
        organ_scores(pred, label, (1.0, 1.0, 2.5))


def test_organ_scores_refuses_bad_spacing_and_tolerances():
    pred, label = hand_made_3d()
    with pytest.raises(UserError, match="spacing"):
        organ_scores(pred, label, (1.0, 1.0))
    with pytest.raises(UserError, match="spacing"):
        organ_scores(pred, label, (1.0, 0.0, 2.5))
    with pytest.raises(UserError, match="organ ids \\[14\\]"):
        organ_scores(pred, label, (1.0, 1.0, 2.5), n_classes=15)


# ------------------------------------------------------------------------------------------
# The paper's Dice
# ------------------------------------------------------------------------------------------


def test_paper_dice_matches_hand_computed_values():
    # item 0: label bg 3 px, organ 1 at (0,1); prediction bg at (0,0) only, 1 at (0,1) and (1,0), 2 at (1,1)
    #   bg 2*1/(3+1) = 0.5, organ 1 2*1/(1+2) = 2/3, organ 2 absent from the label -> ignored
    # item 1: label all background; prediction has one voxel of organ 3 -> bg 2*3/(4+3) = 6/7 only
    # item 2: exact -> 1.0 on channels 0 and 2
    pred = torch.tensor([[[0, 1], [1, 2]], [[0, 0], [3, 0]], [[2, 2], [0, 0]]])
    label = torch.tensor([[[0, 1], [0, 0]], [[0, 0], [0, 0]], [[2, 2], [0, 0]]])
    pd = PaperDice()
    new = pd.update(pred, label, n_classes=4)
    expected = [(0.5 + 2 / 3) / 2, 6 / 7, 1.0]
    assert new == pytest.approx(expected, abs=1e-6)
    assert pd.values() == pytest.approx(expected, abs=1e-6)
    assert pd.mean() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert pd.state()[1] == 3
    assert PaperDice.name == "dice_paper"


def test_paper_dice_per_channel_against_numpy_on_random_slices():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 5, size=(4, 9, 7))
    pred = np.where(rng.random((4, 9, 7)) < 0.7, label, rng.integers(0, 5, size=(4, 9, 7)))
    pd = PaperDice()
    pd.update(torch.from_numpy(pred), torch.from_numpy(label), n_classes=5)
    for k in range(4):
        ch = [ref_dice(label[k] == c, pred[k] == c) for c in range(5) if (label[k] == c).any()]
        assert pd.values()[k] == pytest.approx(np.mean(ch), abs=1e-6)


def test_paper_dice_state_merge_is_exact_across_ranks():
    rng = np.random.default_rng(5)
    label = torch.from_numpy(rng.integers(0, 4, size=(10, 8, 8)))
    pred = torch.from_numpy(rng.integers(0, 4, size=(10, 8, 8)))
    whole = PaperDice()
    whole.update(pred, label, 4)
    ranks = [PaperDice(), PaperDice()]
    ranks[0].update(pred[:3], label[:3], 4)
    ranks[0].update(pred[3:6], label[3:6], 4)
    ranks[1].update(pred[6:], label[6:], 4)
    merged = PaperDice.from_states([r.state() for r in ranks])
    assert merged.count() == whole.count() == 10
    assert merged.mean() == pytest.approx(whole.mean(), rel=1e-15, abs=1e-15)
    # merge_state on a live accumulator, and gathering values for a bit-identical mean
    ranks[0].merge_state(*ranks[1].state())
    assert ranks[0].count() == 10 and ranks[0].mean() == pytest.approx(whole.mean(), rel=1e-15)
    gathered = PaperDice()
    gathered.extend(whole.values()[:6])
    gathered.extend(whole.values()[6:])
    assert gathered.mean() == whole.mean()


def test_paper_dice_refuses_bad_input_and_empty_sets():
    pd = PaperDice()
    with pytest.raises(UserError, match="empty validation set"):
        pd.mean()
    with pytest.raises(UserError, match="class id 14"):
        pd.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 14), n_classes=14)
    with pytest.raises(UserError, match="shape"):
        pd.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long), n_classes=14)
    with pytest.raises(UserError, match="dtype"):
        pd.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), n_classes=14)
    assert pd.count() == 0


# ------------------------------------------------------------------------------------------
# Summary, files, table, figure
# ------------------------------------------------------------------------------------------


def _two_cases():
    pred, label = hand_made_3d()
    spacing = (1.0, 1.0, 2.5)
    return {
        "case_a": organ_scores(pred, label, spacing),
        "case_b": organ_scores(label, label, spacing),
    }


def test_summary_means_and_score_files(tmp_path):
    per_case = _two_cases()
    summary = summarize_case_scores(per_case)
    case_means = {c: np.mean([s[i]["dice"] for i in range(1, 14)]) for c, s in per_case.items()}
    assert summary["per_case"]["case_b"]["dice_mean"] == 1.0
    assert summary["per_case"]["case_a"]["dice_mean"] == pytest.approx(case_means["case_a"])
    assert summary["dice_mean"] == pytest.approx(np.mean(list(case_means.values())))
    nsd_means = [np.mean([s[i]["nsd"] for i in range(1, 14)]) for s in per_case.values()]
    assert summary["nsd_mean"] == pytest.approx(np.mean(nsd_means))
    liver = summary["per_organ"]["liver"]
    assert liver["organ_id"] == 1 and liver["tolerance_mm"] == 5.0 and liver["n_cases_in_label"] == 2
    assert liver["dice"] == pytest.approx((per_case["case_a"][1]["dice"] + 1.0) / 2)
    assert summary["per_organ"]["esophagus"]["n_cases_in_label"] == 0
    assert summary["n_cases"] == 2

    paths = write_scores(per_case, tmp_path / "run", prefix="val")
    assert paths == {"csv": str(tmp_path / "run" / "val_scores.csv"), "json": str(tmp_path / "run" / "val_scores.json")}
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 13
    row = next(r for r in rows if r["case"] == "case_a" and r["organ_id"] == "4")
    assert row["organ"] == "pancreas" and float(row["dice"]) == 0.0 and row["label_voxels"] == "0"
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["summary"]["dice_mean"] == pytest.approx(summary["dice_mean"])
    assert doc["per_case"]["case_a"]["liver"]["dice"] == pytest.approx(per_case["case_a"][1]["dice"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["val_scores.csv", "val_scores.json"]

    text = format_summary(summary)
    assert "liver" in text and "left kidney" in text and f"{summary['dice_mean']:.4f}" in text
    assert len(text.splitlines()) == 13 + 5


def test_summary_refuses_an_empty_validation_set(tmp_path):
    with pytest.raises(UserError, match="empty validation set"):
        summarize_case_scores({})
    with pytest.raises(UserError, match="empty validation set"):
        write_scores({}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_plot_predictions_writes_a_png(tmp_path):
    pred, label = hand_made_3d()
    rng = np.random.default_rng(0)
    images = [rng.random(label.shape[:2]) for _ in range(2)]
    out = plot_predictions(
        images,
        [label[:, :, 2], label[:, :, 5]],
        [pred[:, :, 2], pred[:, :, 5]],
        tmp_path / "fig" / "val.png",
        titles=["a", "b"],
    )
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    colors = metrics.organ_colors(14)
    assert colors[0, 3] == 0 and len({tuple(c) for c in colors[1:]}) == 13  # distinct, background transparent
    with pytest.raises(UserError, match="2 images, 1 labels"):
        plot_predictions(images, [label[:, :, 2]], [pred[:, :, 2]] * 2, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_cli_scores_nifti_cases(tmp_path):
    nib = pytest.importorskip("nibabel")
    pred, label = hand_made_3d()
    for d, arr in (("pred", pred), ("lab", label)):
        (tmp_path / d).mkdir()
        img = nib.Nifti1Image(arr.astype(np.uint8), np.diag([1.0, 1.0, 2.5, 1.0]))
        nib.save(img, tmp_path / d / "FLARE22_Tr_0001.nii.gz")
    args = metrics.get_args_parser().parse_args(
        ["--pred_dir", str(tmp_path / "pred"), "--label_dir", str(tmp_path / "lab"), "--out_dir", str(tmp_path / "out")]
    )
    summary = metrics.main(args)
    expected = summarize_case_scores({"FLARE22_Tr_0001": organ_scores(pred, label, (1.0, 1.0, 2.5))})
    assert summary == expected
    assert (tmp_path / "out" / "eval_scores.csv").is_file()
    bad = metrics.get_args_parser().parse_args(
        ["--pred", str(tmp_path / "nope.nii.gz"), "--label", str(tmp_path / "lab" / "FLARE22_Tr_0001.nii.gz")]
    )
    with pytest.raises(UserError, match="nope.nii.gz does not exist"):
        metrics.main(bad)


# ------------------------------------------------------------------------------------------
# The real CT
# ------------------------------------------------------------------------------------------


def test_real_ct_label_against_itself_and_shifted(real_ct):
    path = real_ct.label
    nib = pytest.importorskip("nibabel")
    img = nib.load(str(path))
    label = np.asarray(img.dataobj)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    same = organ_scores(label, label, spacing)
    for organ in range(1, 14):
        assert same[organ]["dice"] == 1.0 and same[organ]["nsd"] == 1.0, LABEL_NAMES[organ]
        assert (same[organ]["label_voxels"] > 0) == (organ != 10)  # esophagus is outside the field of view
    assert same[1]["label_voxels"] == 38634 and same[10]["label_voxels"] == 0

    shifted = organ_scores(np.roll(label, 3, axis=0), label, spacing)  # 9 mm, beyond every tolerance
    for organ in range(1, 14):
        if organ == 10:
            assert shifted[organ]["dice"] == shifted[organ]["nsd"] == 1.0
        else:
            assert shifted[organ]["dice"] < 1.0 and shifted[organ]["nsd"] < 1.0, LABEL_NAMES[organ]
    # a large organ keeps most of its overlap, and its 5 mm tolerance keeps NSD well above 0
    assert shifted[1]["dice"] > 0.8 and shifted[1]["nsd"] > 0.5
    # 6 mm: within the duodenum's 7 mm tolerance (NSD 1), beyond the aorta's 2 mm
    by6 = organ_scores(np.roll(label, 2, axis=0), label, spacing)
    assert by6[12]["nsd"] == 1.0 and by6[12]["dice"] < 1.0 and by6[5]["nsd"] < 1.0

    pd = PaperDice()
    vol = torch.from_numpy(label.astype(np.int64)).permute(2, 0, 1)
    pd.update(vol, vol, n_classes=14)
    assert pd.count() == label.shape[2] and pd.mean() == 1.0


def test_paper_dice_equals_monai_dicemetric_bit_for_bit():
    """paper_dice_per_item (per-class counts) against MONAI's DiceMetric on one-hot tensors,
    the definition the paper used: equal bit for bit on slices, incl. absent classes,
    predictions of classes absent from the label, and all-background labels."""
    rng = np.random.default_rng(11)
    for shape, k in (((6, 40, 33), 14), ((3, 17, 9, 11), 5), ((2, 64, 64), 3)):
        label = np.zeros(shape, dtype=np.int64)
        for b in range(shape[0]):  # blobs of a few classes, some items background only
            for c in rng.choice(np.arange(1, k), size=rng.integers(0, min(4, k - 1) + 1), replace=False):
                sl = tuple(
                    slice(int(a), int(a) + int(rng.integers(2, max(3, n // 2))))
                    for a, n in ((rng.integers(0, n - 2), n) for n in shape[1:])
                )
                label[(b, *sl)] = c
        noise = rng.integers(0, k, size=shape)
        pred = np.where(rng.random(shape) < 0.8, label, noise)
        pt, lt = torch.from_numpy(pred), torch.from_numpy(label)

        def oh(t):
            return torch.nn.functional.one_hot(t, k).movedim(-1, 1).float()

        ref = torch.nanmean(
            DiceMetric(include_background=True, reduction="none", ignore_empty=True)(oh(pt), oh(lt)).double(), dim=1
        )
        got = paper_dice_per_item(pt, lt, k)
        assert got.dtype == torch.float64 and torch.equal(got, ref), (shape, got, ref)
        both, in_label, in_pred = class_counts(pt.to(torch.uint8), lt.to(torch.uint8), k)
        scattered = class_counts(pt, lt, k, method="scatter")  # the CUDA path, here on the CPU
        assert all(torch.equal(a, c) for a, c in zip((both, in_label, in_pred), scattered))
        for b in range(shape[0]):
            for c in range(k):
                assert in_label[b, c] == (label[b] == c).sum() and in_pred[b, c] == (pred[b] == c).sum()
                assert both[b, c] == ((label[b] == c) & (pred[b] == c)).sum()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paper_dice_on_cuda_equals_the_cpu():
    rng = np.random.default_rng(2)
    label = torch.from_numpy(rng.integers(0, 14, size=(5, 96, 80)))
    pred = torch.where(
        torch.from_numpy(rng.random((5, 96, 80))) < 0.7, label, torch.from_numpy(rng.integers(0, 14, size=(5, 96, 80)))
    )
    cpu = class_counts(pred, label, 14)
    gpu = class_counts(pred.cuda().to(torch.uint8), label.cuda().to(torch.uint8), 14)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    assert torch.equal(paper_dice_per_item(pred, label, 14), paper_dice_per_item(pred.cuda(), label.cuda(), 14).cpu())
