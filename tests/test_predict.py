"""predict.py: new CT in, label maps in the input's own geometry out.

Geometry on the real CT (``real_ct``: skipped when absent), on a copy of it re-oriented to
LPS with a shuffled axis order (and a qform different from its sform), and on phantoms
with anisotropic voxels: the output has the input's shape, affine, qform and sform, and a
label volume taken through the forward preprocessing and back keeps every organ. A tiny
model really fine-tuned for one epoch records its preprocessing, sees on new CT exactly
the values its training slices held, predicts there exactly what the fine-tuning's own
evaluation predicts, and its predictions are scored by metrics.py in the labels' own geometry. Bad cases are skipped and listed (exit 1); nothing-can-run is exit 2.

Models built directly (random weights, saved with ``finetune.finetuned_checkpoint``) keep
the geometry tests fast; a coarse preprocessing record (3 x 3 x 5 mm) keeps the real CT
small for the model (the code path is the same for any record).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import main_finetune
import make_phantoms
import metrics
import models
import predict
import preprocess_flare_labelled as prep
from conftest import save_model
from transforms import preprocessing_transforms
from utils import TrainingError, UserError

ROOT = Path(__file__).resolve().parents[1]
PAPER = dict(a_min=-500.0, a_max=500.0, pixdim=(1.0, 1.0, 2.5), min_xy=96)
HEADER_FIELDS = (
    "dim",
    "pixdim",
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
    "xyzt_units",
)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def reoriented(img, codes, qform_shift_mm: float = 0.0):
    """``img`` with its voxel axes re-ordered and flipped to ``codes`` (same world geometry), the
    sform (code 2) the new affine and the qform (code 1) the same moved by ``qform_shift_mm`` in x."""
    t = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(codes)
    )
    r = img.as_reoriented(t)
    out = nib.Nifti1Image(np.asanyarray(r.dataobj), r.affine, header=r.header)
    q = r.affine.copy()
    q[0, 3] += qform_shift_mm
    out.set_qform(q, code=1)
    out.set_sform(r.affine, code=2)
    return out


def dice_per_organ(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for k in range(1, 14):
        na, nb = int((a == k).sum()), int((b == k).sum())
        if na + nb:
            out[k] = 2.0 * int(((a == k) & (b == k)).sum()) / (na + nb)
    return out


def round_trip(predictor: predict.Predictor, image_path: str, label_path: str) -> tuple[np.ndarray, dict]:
    """The label through the training preprocessing (image and label together, as
    preprocess_flare_labelled.py does) and back through predict.py's inverse."""
    pre, ref = predict.preprocess_scan(image_path, predictor.pipeline, predictor.preprocessing["a_min"])
    image, _ = predict.load_scan(image_path)
    label, _ = predict.load_scan(label_path)
    label.affine = image.affine.clone()
    both = preprocessing_transforms(keys=("image", "label"), load=False, **PAPER)({"image": image, "label": label})
    # predict.py's preprocessed image is exactly the training chain's
    assert torch.equal(both["image"].as_tensor(), pre.as_tensor())
    assert np.allclose(np.asarray(both["label"].affine), np.asarray(pre.affine))
    ids = both["label"].as_tensor().numpy()[0].round().astype(np.uint8)
    back = predictor.invert(ids, pre, ref.shape, ref.affine)
    original = np.asarray(nib.load(label_path).dataobj).round().astype(np.uint8)
    assert back.shape == original.shape and back.dtype == np.uint8
    return back, dice_per_organ(back, original)


def header_equal(a, b) -> None:
    for f in HEADER_FIELDS:
        assert np.array_equal(a.header[f], b.header[f]), f


# ---------------------------------------------------------------------------------------
# Geometry: the round trip of a label volume
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_2d(tmp_path_factory) -> predict.Predictor:
    path = save_model(tmp_path_factory.mktemp("models") / "paper_2d.pt")
    return predict.Predictor.from_checkpoint(str(path), torch.device("cpu"))


def test_round_trip_keeps_every_organ_real_ct_and_lps_copy(real_ct, paper_2d, tmp_path):
    _, dice = round_trip(paper_2d, str(real_ct.image), str(real_ct.label))
    # 3 mm voxels up-sampled to 1 x 1 x 2.5 mm and back: nearest neighbour finds every voxel again
    assert len(dice) == 12 and min(dice.values()) >= 0.95, dice
    assert min(dice.values()) == 1.0
    # the same scan stored LPS-wise with the axes in another order (P, S, L) and a qform != sform
    img, lab = (
        reoriented(nib.load(real_ct.image), ("P", "S", "L"), 0.5),
        reoriented(nib.load(real_ct.label), ("P", "S", "L"), 0.5),
    )
    assert nib.aff2axcodes(img.affine) == ("P", "S", "L") and img.shape == (101, 30, 122)
    nib.save(img, tmp_path / "lps_0000.nii.gz")
    nib.save(lab, tmp_path / "lps.nii.gz")
    back, dice_lps = round_trip(paper_2d, str(tmp_path / "lps_0000.nii.gz"), str(tmp_path / "lps.nii.gz"))
    assert dice_lps == dice and back.shape == (101, 30, 122)


@pytest.mark.parametrize(
    "spacing, size_xy, min_dice_small",
    [
        ((1.5, 1.25, 5.0), 128, 0.95),  # coarser than 1 x 1 x 2.5 mm on every axis: up-sampled
        ((1.25, 2.0, 3.0), 128, 0.95),
        ((0.8, 0.8, 3.0), 256, 0.85),  # finer in-plane: down-sampled, tiny organs lose a layer
    ],
)
def test_round_trip_keeps_every_organ_anisotropic_phantoms(paper_2d, tmp_path, spacing, size_xy, min_dice_small):
    img, lab, affine = make_phantoms.make_case(5, size_xy=size_xy, n_slices=12, spacing=spacing)
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "p_0000.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "p.nii.gz")
    _, dice = round_trip(paper_2d, str(tmp_path / "p_0000.nii.gz"), str(tmp_path / "p.nii.gz"))
    assert len(dice) == 13
    counts = np.bincount(lab.ravel(), minlength=14)
    for k, d in dice.items():
        # 1 x 1 mm voxels keep 0.8 mm organs of 500 voxels and more at >= 0.95; an adrenal gland of
        # 50 voxels (in 12 slices of a 256^2 phantom) loses a boundary layer to the coarser grid
        want = 0.95 if counts[k] >= 500 else min_dice_small
        assert d >= want, (k, counts[k], d)


# ---------------------------------------------------------------------------------------
# predict.py end to end
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_output_overlays_the_input_real_ct_and_lps_copy(real_ct, tmp_path, capsys, caplog):
    model = save_model(tmp_path / "coarse.pt", pixdim=(3.0, 3.0, 5.0))
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(real_ct.image, inp / real_ct.image.name)
    lps = reoriented(nib.load(real_ct.image), ("P", "S", "L"), 0.5)
    nib.save(lps, inp / "lps_copy_0000.nii")  # uncompressed .nii: the output is .nii.gz all the same
    out = tmp_path / "out"
    argv = ["-i", str(inp), "-o", str(out), "--chkpt_path", str(model), "--no-progress"]
    res = predict.main(predict.get_args_parser().parse_args(argv))
    assert res["n_written"] == 2 and res["n_failed"] == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "FLARE22_Tr_9001.nii.gz"), str(out / "lps_copy.nii.gz")]
    for name, src in (("FLARE22_Tr_9001", nib.load(real_ct.image)), ("lps_copy", nib.load(inp / "lps_copy_0000.nii"))):
        got = nib.load(out / f"{name}.nii.gz")
        assert got.shape == src.shape and np.array_equal(got.affine, src.affine)
        header_equal(got, src)
        assert got.get_data_dtype() == np.uint8 and got.header.get_slope_inter() == (None, None)
        ids = np.asarray(got.dataobj)
        assert ids.dtype == np.uint8 and ids.max() < 14 and len(np.unique(ids)) > 1
    assert nib.load(out / "lps_copy.nii.gz").header["sform_code"] == 2
    # the same scan stored another way gets the same labels, voxel for voxel
    a = nib.load(out / "FLARE22_Tr_9001.nii.gz")
    b = nib.load(out / "lps_copy.nii.gz")
    t = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(b.affine), nib.orientations.io_orientation(a.affine)
    )
    b_ras = b.as_reoriented(t)
    assert np.allclose(b_ras.affine, a.affine) and np.array_equal(np.asarray(b_ras.dataobj), np.asarray(a.dataobj))
    # a second run resumes: both cases are done, nothing is rewritten; --overwrite redoes them
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    res2 = predict.main(predict.get_args_parser().parse_args(argv))
    assert res2["n_written"] == 0 and res2["n_skipped"] == 2
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # ... here with the scans read and preprocessed in a loader process: the same labels
    res3 = predict.main(predict.get_args_parser().parse_args([*argv, "--overwrite", "--num_workers", "1"]))
    assert res3["n_written"] == 2
    assert np.array_equal(np.asarray(nib.load(out / "lps_copy.nii.gz").dataobj), np.asarray(b.dataobj))
    assert np.array_equal(np.asarray(nib.load(out / "FLARE22_Tr_9001.nii.gz").dataobj), np.asarray(a.dataobj))


@pytest.mark.slow
def test_3d_model_anisotropic_phantom_with_probabilities(tmp_path):
    # 1.5 x 1.5 x 5 mm and padding to 64: one 64^3 window for the tiny 3D model (seconds on a CPU)
    model = save_model(tmp_path / "m3d.pt", spatial_dims=3, pixdim=(1.5, 1.5, 5.0), min_xy=64)
    inp = tmp_path / "in"
    inp.mkdir()
    img, _, affine = make_phantoms.make_case(2, size_xy=64, n_slices=12, spacing=(0.75, 1.25, 4.0))
    nib.save(nib.Nifti1Image(img, affine), inp / "ph_0000.nii.gz")
    argv = ["-i", str(inp / "ph_0000.nii.gz"), "--chkpt_path", str(model), "--no-progress"]
    predict.main(predict.get_args_parser().parse_args([*argv, "-o", str(tmp_path / "a"), "--save_probabilities"]))
    a = nib.load(tmp_path / "a" / "ph.nii.gz")
    assert a.shape == (64, 64, 12) and np.array_equal(a.affine, nib.load(inp / "ph_0000.nii.gz").affine)
    header_equal(a, nib.load(inp / "ph_0000.nii.gz"))
    ids = np.asarray(a.dataobj)
    z = np.load(tmp_path / "a" / "ph_probabilities.npz")
    p = z["probabilities"]
    assert p.dtype == np.float16 and p.shape == (14, 64, 64, 12)
    assert list(z["label_names"]) == list(data.LABEL_NAMES) and np.array_equal(z["affine"], a.affine)
    assert np.allclose(p.astype(np.float32).sum(axis=0), 1.0, atol=0.005)
    # labels: the argmax, resampled nearest-neighbour; probabilities resampled bilinearly: they
    # differ where neighbouring voxels disagree (many, for the random weights of this model)
    assert (p.argmax(axis=0) == ids).mean() > 0.8
    # on the model's grid each label is the most probable class (float16 rounding is monotone,
    # so the label's probability equals the maximum; ties may appear, never a larger value)
    predictor = predict.Predictor.from_checkpoint(str(model), torch.device("cpu"))
    pre, _ = predict.preprocess_scan(str(inp / "ph_0000.nii.gz"), predictor.pipeline, -500.0)
    grid_ids, grid_p = predictor.segment(pre, probabilities=True)
    assert grid_p.dtype == torch.float16 and grid_p.shape == (14, *pre.shape[1:])
    at_label = torch.take_along_dim(grid_p, torch.from_numpy(grid_ids).long()[None], dim=0)[0]
    assert torch.equal(at_label, grid_p.max(dim=0).values)


@pytest.mark.slow
def test_a_finetuned_model_records_its_preprocessing_and_predicts_raw_ct(tmp_path, capsys, caplog):
    raw = make_phantoms.generate_dataset(
        tmp_path / "raw", n_labelled=3, n_unlabelled=0, seed=0, size_xy=64, n_slices=8, n_train=1
    )
    d2 = tmp_path / "d2"
    prep.main(
        prep.get_args_parser().parse_args(
            ["--data_dir", raw["labelled_dir"], "--output_dir", str(d2), "--split_path", raw["split_path"]]
        )
    )
    argv = [
        "--data_dir", str(d2), "--split_path", raw["split_path"], "--low_resource_mode", "--crop_size", "64",
        "--batch_size", "2", "--n_crops_per_ct", "1", "--n_epochs", "1", "--warmup_epochs", "0",
        "--num_workers", "0", "--max_images", "2", "--sw_batch_size", "8", "--n_vis", "0", "--no-progress",
        "--ignore_user_warning", "--chkpt_dir", str(tmp_path / "runs"), "--run_name", "ft",
    ]  # fmt: skip
    main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    ckpt_path = tmp_path / "runs" / "ft.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    manifest = json.loads((d2 / "manifest.json").read_text())["args"]
    rec = ckpt["preprocessing"]
    assert rec["source"] == str(d2 / "manifest.json") and rec["orientation"] == "RAS"
    for k in ("a_min", "a_max", "pixdim", "min_xy", "png_bits", "spatial_dims"):
        assert rec[k] == manifest[k], k

    # on new CT the model sees exactly the values its training slices held
    predictor = predict.Predictor.from_checkpoint(str(ckpt_path), torch.device("cpu"))
    case = "FLARE22_Tr_0002"
    pre, _ = predict.preprocess_scan(
        os.path.join(raw["labelled_dir"], "images", f"{case}_0000.nii.gz"), predictor.pipeline, -500.0
    )
    slices = sorted((d2 / "imgs").glob(f"{case}_*.png"))
    stored = np.stack([data.read_image_2d_stored(p) for p in slices], axis=-1)
    got = predictor.model_input(pre)
    assert got.dtype == np.uint8 and np.array_equal(got, stored)
    # ... and predicts there what the fine-tuning's own evaluation predicts from those slices
    ev = [
        "--eval_only",
        "--chkpt_path",
        str(ckpt_path),
        "--save_predictions",
        str(tmp_path / "ev"),
        "--max_images",
        "0",
    ]
    ev += ["--run_name", "ev"]
    main_finetune.main(main_finetune.get_args_parser().parse_args([*argv[: argv.index("--run_name")], *ev]))
    evaluated = np.asarray(nib.load(tmp_path / "ev" / f"{case}.nii.gz").dataobj)
    predictor.sw_batch_size = 8  # the evaluation's --sw_batch_size
    grid_ids, _ = predictor.segment(pre)
    assert np.array_equal(grid_ids, evaluated)

    # predict the raw scans, then score them with metrics.py in the labels' own geometry
    out = tmp_path / "pred"
    images = os.path.join(raw["labelled_dir"], "images")
    predict.main(
        predict.get_args_parser().parse_args(
            ["-i", images, "-o", str(out), "--chkpt_path", str(ckpt_path), "--no-progress"]
        )
    )
    labels = Path(raw["labelled_dir"]) / "labels"
    summary = metrics.main(metrics.get_args_parser().parse_args(["--pred_dir", str(out), "--label_dir", str(labels)]))
    assert summary["n_cases"] == 3
    pred = nib.load(out / f"{case}.nii.gz")
    lab = nib.load(labels / f"{case}.nii.gz")
    assert pred.shape == lab.shape and np.array_equal(pred.affine, lab.affine)
    direct = metrics.organ_scores(np.asarray(pred.dataobj), np.asarray(lab.dataobj), lab.header.get_zooms(), z_axis=-1)
    want = float(np.mean([direct[i]["dice"] for i in direct]))
    assert summary["per_case"][case]["dice_mean"] == pytest.approx(want)
    # the scan-geometry labels taken back through the training preprocessing are the evaluation's
    # labels inside the scan (the padding is the model's alone), but where nearest-neighbour
    # resampling between the two grids moves a boundary
    image, _ = predict.load_scan(os.path.join(images, f"{case}_0000.nii.gz"))
    native, _ = predict.load_scan(str(out / f"{case}.nii.gz"))
    native.affine = image.affine.clone()
    inside = native.clone()
    inside[:] = 1.0
    chain = preprocessing_transforms(keys=("image", "label"), load=False, **PAPER)
    again = chain({"image": image, "label": native})["label"].as_tensor().numpy()[0].round().astype(np.uint8)
    mask = chain({"image": image, "label": inside})["label"].as_tensor().numpy()[0] > 0.5
    assert again.shape == evaluated.shape and 0.1 < mask.mean() < 1.0  # a 45 mm phantom in 96 x 96
    assert (again[mask] == evaluated[mask]).mean() > 0.95 and (again[~mask] == 0).all()

    # a checkpoint from before the record: the settings come from its data folder's manifest
    legacy = {k: v for k, v in ckpt.items() if k != "preprocessing"}
    torch.save(legacy, tmp_path / "legacy.pt")
    with caplog.at_level("WARNING"):
        old = predict.Predictor.from_checkpoint(str(tmp_path / "legacy.pt"), torch.device("cpu"))
    assert old.preprocessing == predictor.preprocessing and "has no preprocessing record" in caplog.text
    # ... and refused, naming the missing manifest, once that folder is gone
    legacy["args"] = {**legacy["args"], "data_dir": str(tmp_path / "gone")}
    torch.save(legacy, tmp_path / "legacy_gone.pt")
    with pytest.raises(UserError, match=r"records no preprocessing .* gone"):
        predict.Predictor.from_checkpoint(str(tmp_path / "legacy_gone.pt"), torch.device("cpu"))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def _run(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *map(str, argv)], capture_output=True, text=True, env=env
    )


def test_bad_cases_are_named_skipped_and_listed_with_exit_1(tmp_path):
    model = save_model(tmp_path / "m.pt", pixdim=(2.0, 2.0, 5.0))
    inp = tmp_path / "in"
    inp.mkdir()
    img, _, affine = make_phantoms.make_case(1, size_xy=64, n_slices=8)
    nib.save(nib.Nifti1Image(img, affine), inp / "good_0000.nii.gz")
    (inp / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(300))
    nib.save(nib.Nifti1Image(img[:, :, 0], affine), inp / "flat_0000.nii.gz")
    nan = img.astype(np.float32)
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), inp / "nan_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.full((32, 32, 8), -1000, np.int16), affine), inp / "air_0000.nii.gz")
    (inp / "notes.txt").write_text("not a scan: ignored")
    p = _run("-i", inp, "-o", tmp_path / "out", "--chkpt_path", model, "--no-progress")
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 4 of 5 cases failed: air, corrupt, flat, nan"), last
    for name, why in (
        ("corrupt", "corrupt_0000.nii.gz"),
        ("flat", "is not a 3D volume"),
        ("nan", "1 NaN or infinite voxels"),
        ("air", "no voxel above -500 HU"),
    ):
        assert any(line.count("ERROR") and name in line and why in line for line in p.stderr.splitlines()), name
    # nothing half-written (hidden: the record of what the project wrote there, .ioupos-outputs.json)
    assert sorted(n for n in os.listdir(tmp_path / "out") if not n.startswith(".")) == ["good.nii.gz"]
    assert p.stdout.split() == [str(tmp_path / "out" / "good.nii.gz")]


def test_nothing_can_run_is_one_line_and_exit_2(tmp_path):
    model = save_model(tmp_path / "m.pt", pixdim=(2.0, 2.0, 5.0))
    img, _, affine = make_phantoms.make_case(1, size_xy=32, n_slices=8)
    scan = tmp_path / "scan_0000.nii.gz"
    nib.save(nib.Nifti1Image(img, affine), scan)
    p = _run("-i", scan, "-o", tmp_path / "o", "--chkpt_path", tmp_path / "missing.pt")
    assert (
        p.returncode == 2
        and p.stderr.strip().splitlines()[-1] == f"error: checkpoint {str(tmp_path / 'missing.pt')!r} does not exist"
    )
    assert not (tmp_path / "o").exists()

    parse = predict.get_args_parser().parse_args
    enc_cfg = models.encoder_config("swin", 2, 12, low_resource_mode=True)
    torch.save(models.encoder_checkpoint(models.build_encoder(enc_cfg), enc_cfg, "simsiam", 1, {}), tmp_path / "enc.pt")
    cases = [
        (
            ["-i", scan, "--chkpt_path", tmp_path / "enc.pt"],
            "is a pretrained simsiam encoder, not a segmentation model",
        ),
        (["-i", scan, "--chkpt_path", model, "--sw_overlap", "1"], r"--sw_overlap must be in \[0, 1\)"),
        (["-i", scan, "--chkpt_path", model, "--num_workers", "-1"], "--num_workers must be 0 or more"),
        (["-i", tmp_path / "nope", "--chkpt_path", model], "does not exist"),
        (["-i", model, "--chkpt_path", model], "is not a NIfTI file"),
        (["-i", tmp_path / "o_empty", "--chkpt_path", model], "holds no .nii.gz or .nii file"),
    ]
    (tmp_path / "o_empty").mkdir()
    for argv, msg in cases:
        with pytest.raises(UserError, match=msg):
            predict.main(parse([*map(str, argv), "-o", str(tmp_path / "o")]))
    # an output that would overwrite its input (a scan without "_0000", -o the input folder)
    same = tmp_path / "same"
    same.mkdir()
    nib.save(nib.Nifti1Image(img, affine), same / "case.nii.gz")
    with pytest.raises(UserError, match="would overwrite the input"):
        predict.main(parse(["-i", str(same), "-o", str(same), "--chkpt_path", str(model)]))
    # two files giving one case id
    nib.save(nib.Nifti1Image(img, affine), same / "case_0000.nii")
    with pytest.raises(UserError, match="both give case 'case'"):
        predict.main(parse(["-i", str(same), "-o", str(tmp_path / "o"), "--chkpt_path", str(model)]))
    # a failing case is exit 1 in-process too (TrainingError), not a crash
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_0000.nii.gz").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="1 of 1 cases failed: x"):
        predict.main(parse(["-i", str(bad), "-o", str(tmp_path / "o"), "--chkpt_path", str(model), "--no-progress"]))
