"""metrics.py: both scores against independent computations, conventions, outputs, figure, real CT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.metrics.utils import get_code_to_measure_table
from PIL import Image
from scipy import ndimage

import metrics
from conftest import OFFICIAL_TOLERANCE, flare22_reference, monai_nsd
from data import LABEL_NAMES
from make_phantoms import make_case
from metrics import (
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
# Independent reference computations: set counts for Dice; MONAI's surfel NSD and the
# official FLARE 2022 script's rules written out again are conftest's monai_nsd and
# flare22_reference
# ------------------------------------------------------------------------------------------


def ref_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice by set counts on voxel coordinates."""
    sa = set(map(tuple, np.argwhere(a)))
    sb = set(map(tuple, np.argwhere(b)))
    return 2 * len(sa & sb) / (len(sa) + len(sb))


def perturbed(label: np.ndarray, k: int) -> np.ndarray:
    """A prediction made from ``label``: each organ eroded or dilated (in plane or in 3D),
    shifted (in plane, along z, both, or far), kept or dropped, the operation depending on
    the organ and ``k``; a small false positive of an organ the label lacks."""
    ops = ("erode1", "dilate1", "shift_xy", "shift_z", "dilate2", "shift_xyz", "far", "dilate3d", "keep", "drop")
    in_plane = ndimage.generate_binary_structure(3, 1) * np.array([0, 1, 0], dtype=bool)[None, None, :]
    shifts = {"shift_xy": (2, -1, 0), "shift_z": (0, 0, 1), "shift_xyz": (1, 1, 1), "far": (6, -5, 1)}
    pred = np.zeros_like(label)
    for organ in range(1, 14):
        m = label == organ
        if not m.any():
            c = [s // 2 + 3 * k for s in label.shape[:2]]
            pred[c[0] : c[0] + 3, c[1] : c[1] + 3, :2] = organ  # predicted, absent from the label
            continue
        op = ops[(organ + 3 * k) % len(ops)]
        if op in ("erode1", "dilate1", "dilate2"):
            morph = ndimage.binary_erosion if op.startswith("erode") else ndimage.binary_dilation
            m = morph(m, structure=in_plane, iterations=int(op[-1]))
        elif op == "dilate3d":
            m = ndimage.binary_dilation(m)
        elif op in shifts:
            m = np.roll(m, shifts[op], axis=(0, 1, 2))
        elif op == "drop":
            m = np.zeros_like(m)
        pred[m] = organ
    return pred


def assert_equal_to_reference(got, ref, what):
    for organ, (d, n) in ref.items():
        assert got[organ]["dice"] == pytest.approx(d, abs=1e-6), (what, organ)
        assert got[organ]["nsd"] == pytest.approx(n, abs=1e-6), (what, organ)


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
    label[4, 4, 1:4] = 5  # aorta: label on z 1..3 (scored on 1..2), prediction runs on z 0..6
    pred[4, 4, 0:7] = 5
    pred[3, 4, 2] = 5
    label[6:8, 1:3, 5:7] = 13
    pred[6:8, 1:3, 5:7] = 13  # 13 exact
    return pred, label


def test_surfel_measures_are_the_areas_of_flat_faces_and_monai_table():
    spacing = (0.7, 1.3, 2.5)
    areas = metrics.surfel_measures(spacing)
    # a block whose voxels at offset 1 along one axis are inside: a flat face across the other two axes
    assert areas[0b00001111] == pytest.approx(1.3 * 2.5, rel=1e-12)  # face across axes 1 and 2
    assert areas[0b00110011] == pytest.approx(0.7 * 2.5, rel=1e-12)  # across axes 0 and 2
    assert areas[0b01010101] == pytest.approx(0.7 * 1.3, rel=1e-12)  # across axes 0 and 1
    assert areas[0] == areas[255] == 0.0
    theirs, _ = get_code_to_measure_table(spacing)  # MONAI's public table (float32)
    np.testing.assert_allclose(areas, theirs.double().numpy(), rtol=1e-6)
    lengths = metrics.surfel_measures((0.8, 2.0))
    assert lengths[0b0011] == pytest.approx(2.0) and lengths[0b0101] == pytest.approx(0.8)


def test_organ_scores_equal_the_flare22_reference_on_perturbed_phantoms():
    """Eroded, dilated, shifted, dropped and false-positive organs on phantom CT labels: every
    case and organ within 1e-6 of the official rules with MONAI's surfel NSD."""
    n_partial = n_low_dice = n_z_cut = 0
    cases = ((11, 64, 16, (1.5, 1.5, 4.0)), (12, 72, 18, (1.2, 1.4, 3.0)), (13, 64, 20, (1.8, 1.8, 2.5)))
    for k, (seed, size, n_slices, voxel) in enumerate(cases):
        # coarse voxels: shifts of a voxel or two are comparable to the 2 - 7 mm tolerances
        _, label, affine = make_case(seed, size_xy=size, n_slices=n_slices, spacing=voxel)
        spacing = tuple(float(np.float32(v)) for v in np.diag(affine)[:3])  # as a NIfTI header stores it
        pred = perturbed(label, k)
        got = organ_scores(pred, label, spacing)
        ref = flare22_reference(pred, label, spacing)
        assert_equal_to_reference(got, ref, f"phantom {seed}")
        n_partial += sum(0.0 < n < 1.0 for _, n in ref.values())
        n_low_dice += sum(0.0 < d < 0.2 for d, _ in ref.values())
        for organ in (5, 6, 10):
            zs = np.flatnonzero((label == organ).any(axis=(0, 1)))
            n_z_cut += bool(zs.size and (pred[:, :, zs.max() :] == organ).any())
    # the cases exercise what the rules are about
    assert n_partial >= 15 and n_low_dice >= 1 and n_z_cut >= 2, (n_partial, n_low_dice, n_z_cut)


def test_organ_scores_equal_the_flare22_reference_on_the_real_ct(real_ct):
    img = nib.load(str(real_ct.label))
    label = np.asarray(img.dataobj)
    spacing = img.header.get_zooms()[:3]
    for k in (0, 1):
        pred = perturbed(label, k)
        assert_equal_to_reference(organ_scores(pred, label, spacing), flare22_reference(pred, label, spacing), k)


def test_organ_scores_2d_equal_monai_with_anisotropic_spacing():
    pred, label = hand_made_2d()
    spacing = (0.8, 2.0)
    for tol in (0.5, 1.0, 2.0, 3.0):
        got = organ_scores(pred, label, spacing, n_classes=6, tolerance_mm=tol, z_axis=None)
        assert sorted(got) == [1, 2, 3, 4, 5]
        assert_equal_to_reference(
            got, flare22_reference(pred, label, spacing, dict.fromkeys(range(1, 6), tol), ()), tol
        )
        for organ in range(1, 6):
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


def test_the_official_rules_on_a_hand_made_volume():
    pred, label = hand_made_3d()
    spacing = (0.9, 1.4, 2.5)
    got = organ_scores(pred, label, spacing)
    assert_equal_to_reference(got, flare22_reference(pred, label, spacing), "hand-made")
    assert [got[i]["tolerance_mm"] for i in range(1, 14)] == [float(OFFICIAL_TOLERANCE[i]) for i in range(1, 14)]
    assert (got[3]["dice"], got[3]["nsd"]) == (0.0, 0.0) and (got[4]["dice"], got[4]["nsd"]) == (0.0, 0.0)
    assert got[13]["dice"] == got[13]["nsd"] == 1.0 and got[7]["dice"] == got[7]["nsd"] == 1.0
    # the aorta's label spans z 1..3: scored on z 1..2, the last labelled slice left out
    assert got[5]["dice"] == pytest.approx(ref_dice(label[:, :, 1:3] == 5, pred[:, :, 1:3] == 5), abs=1e-12)
    whole = organ_scores(pred, label, spacing, z_axis=None)
    assert whole[5]["dice"] == pytest.approx(ref_dice(label == 5, pred == 5), abs=1e-12)
    assert got[5]["dice"] > whole[5]["dice"]  # prediction beyond the label's range is ignored
    for organ in (1, 2, 3, 4, 13):  # other organs are not restricted
        assert got[organ] == whole[organ]
    # a FLARE 2021 style single tolerance is stricter for the liver than its 5 mm
    assert organ_scores(pred, label, spacing, tolerance_mm=1.0)[1]["nsd"] < got[1]["nsd"]


def test_slice_range_edge_cases_and_the_low_dice_rule():
    spacing = (1.0, 1.0, 2.5)
    label = np.zeros((12, 12, 8), dtype=np.uint8)
    pred = np.zeros_like(label)
    label[2:6, 2:6, 2:6] = 6  # IVC on z 2..5: scored on z 2..4
    pred[2:6, 2:6, 5:8] = 6  # predicted only from the last labelled slice on
    label[8, 8, 4] = 10  # esophagus on one slice: the script fails (empty range); scored on that slice
    pred[8, 8, 4] = 10
    label[0:10, 0:2, 0:8] = 1  # liver, predicted with Dice < 0.2 but surfaces partly within 5 mm
    pred[0:1, 0:1, 0:8] = 1
    got = organ_scores(pred, label, spacing)
    assert (got[6]["dice"], got[6]["nsd"]) == (0.0, 0.0)
    assert (got[10]["dice"], got[10]["nsd"]) == (1.0, 1.0)
    assert metrics.flare22_z_range(slice(2, 6)) == slice(2, 5) and metrics.flare22_z_range(slice(4, 5)) == slice(4, 5)
    assert 0 < got[1]["dice"] < 0.2 and got[1]["nsd"] == 0.0
    assert monai_nsd(label == 1, pred == 1, spacing, 5.0) > 0.3  # what the NSD would have been
    assert_equal_to_reference(got, flare22_reference(pred, label, spacing), "edge cases")


def test_surface_dice_agrees_with_monai_on_random_masks_and_counts_exact_ties():
    rng = np.random.default_rng(7)
    spacing = (0.7, 1.3, 2.5)
    for _ in range(3):
        a = ndimage.binary_opening(rng.random((10, 12, 8)) > 0.45)
        b = ndimage.binary_opening(rng.random((10, 12, 8)) > 0.45)
        assert a.any() and b.any()
        for tol in (0.0, 1.5, 3.0):
            assert metrics.surface_dice(a, b, spacing, tol) == pytest.approx(monai_nsd(a, b, spacing, tol), abs=1e-6)
    # two slabs 2 slices (5.0 mm) apart: their faces across z are exactly at the tolerance
    a = np.zeros((6, 6, 10), dtype=bool)
    a[1:5, 1:5, 2:5] = True
    b = np.roll(a, 2, axis=2)
    at_tie = metrics.surface_dice(a, b, (1.0, 1.0, 2.5), 5.0)
    assert at_tie == pytest.approx(monai_nsd(a, b, (1.0, 1.0, 2.5), 5.0), abs=1e-12)
    assert at_tie > metrics.surface_dice(a, b, (1.0, 1.0, 2.5), 4.99)
    assert metrics.surface_dice(a, a, (1.0, 1.0, 2.5), 0.0) == 1.0
    assert metrics.surface_dice(a, np.zeros_like(a), (1.0, 1.0, 2.5), 5.0) == 0.0


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
