"""Fine-tuning and evaluation (main_finetune.py, finetune.py, checkpoint loading in models.py).

CPU only, on tiny phantoms (64 x 64 x 8 voxels -> about 10 slices of 96 x 96 per case):
training runs, the evaluation schedule and early stopping, pretrained checkpoints of
every accepted layout, both scores against an independent computation, --eval_only and
--save_predictions, resume after SIGKILL, DDP with two processes, bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.metrics import DiceMetric
from torch._dynamo.utils import counters

import batch_augment
import data
import engine
import finetune
import main_finetune
import main_simsiam
import make_phantoms
import metrics
import models
import preprocess_flare_labelled as prep
import utils
from conftest import flare22_reference
from utils import TrainingError, UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """4 labelled phantom cases (1 train, 3 val), raw NIfTI and preprocessed 2D slices."""
    root = tmp_path_factory.mktemp("ft_phantoms")
    r = make_phantoms.generate_dataset(
        root / "raw", n_labelled=4, n_unlabelled=0, seed=0, size_xy=64, n_slices=8, n_train=1
    )
    out = root / "d2"
    prep.main(
        prep.get_args_parser().parse_args(
            ["--data_dir", r["labelled_dir"], "--output_dir", str(out), "--split_path", r["split_path"]]
        )
    )
    return {"raw": r["labelled_dir"], "split": r["split_path"], "d2": str(out), "root": root}


def _argv(ph, chkpt_dir, *extra) -> list[str]:
    return [
        "--data_dir",
        ph["d2"],
        "--split_path",
        ph["split"],
        "--low_resource_mode",
        "--crop_size",
        "64",
        "--batch_size",
        "2",
        "--n_crops_per_ct",
        "1",
        "--n_epochs",
        "1",
        "--warmup_epochs",
        "0",
        "--num_workers",
        "0",
        "--max_images",
        "2",
        "--sw_batch_size",
        "8",
        "--n_vis",
        "1",
        "--no-progress",
        "--ignore_user_warning",
        "--chkpt_dir",
        str(chkpt_dir),
        *extra,
    ]


def _args(ph, chkpt_dir, *extra):
    return main_finetune.get_args_parser().parse_args(_argv(ph, chkpt_dir, *extra))


def _log(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _cfg(embedding_size=12, arch="swin", crop=64):
    return models.encoder_config(arch, 2, embedding_size, low_resource_mode=True, crop_size=crop)


# ---------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------


def test_run_files_schedule_early_stopping_from_dino_student(phantom, tmp_path):
    """A run from a DINO checkpoint's student with lr 0: the schedule, early stopping and every file it writes."""
    cfg = _cfg()
    torch.manual_seed(1)
    teacher, student = models.build_encoder(cfg), models.build_encoder(cfg)
    extra = {"student_encoder": {k: v.clone() for k, v in student.backbone.state_dict().items()}}
    dino_path = tmp_path / "dino.pt"
    torch.save(models.encoder_checkpoint(teacher, cfg, "dino", 1, {}, **extra), dino_path)
    # lr 0: the weights never change, so no evaluation after the first one improves
    res = main_finetune.main(
        _args(
            phantom,
            tmp_path,
            "--n_epochs",
            "9",
            "--eval_every",
            "2",
            "--eval_every_from",
            "3",
            "--patience",
            "1",
            "--base_lr",
            "0",
            "--end_lr",
            "0",
            "--run_name",
            "es",
            "--chkpt_path",
            str(dino_path),
            "--checkpoint_key",
            "student",
            "--eval_train",
        )
    )
    log = _log(tmp_path / "es_log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert [r["epoch"] for r in log if "val_dice_paper" in r] == [2, 3]
    assert [r["epoch"] for r in log if "train_dice_paper" in r] == [2, 3]  # --eval_train
    assert set(json.loads(Path(res["train_scores"]).read_text())["per_case"]) == {"FLARE22_Tr_0001"}
    assert res["epochs_done"] == 3 and res["best_epoch"] == 2 and res["stopped_early"] is True
    # the final evaluation of the reloaded best model reproduces the training-time score
    assert res["dice_paper"] == pytest.approx(res["best_dice_paper"], abs=1e-12) == log[1]["val_dice_paper"]
    # the encoder is exactly DINO's student (not the teacher)
    assert res["pretrained_tensors"] == len(extra["student_encoder"])
    best = torch.load(tmp_path / "es.pt", weights_only=True)
    assert best["format"] == finetune.FINETUNE_FORMAT and best["epoch"] == 2 and best["n_classes"] == 14
    got, saved_cfg = models.extract_encoder_state(best, "es.pt")
    assert saved_cfg["embedding_size"] == 12
    assert all(torch.equal(got[k], v) for k, v in extra["student_encoder"].items())
    assert not torch.equal(got["patch_embed.proj.weight"], teacher.backbone.state_dict()["patch_embed.proj.weight"])
    # the files of the run
    files = tmp_path / "es_files"
    assert json.loads((files / "result.json").read_text()) == json.loads(json.dumps(res))
    scores = json.loads(Path(res["scores"]).read_text())
    assert set(scores["per_case"]) == {"FLARE22_Tr_0002"} and len(scores["per_case"]["FLARE22_Tr_0002"]) == 13
    assert res["summary"]["dice_mean"] == pytest.approx(scores["summary"]["dice_mean"])
    assert (files / "val_scores.csv").read_text().startswith("case,organ_id,organ,dice,nsd")
    assert (files / "predictions.png").read_bytes()[:4] == b"\x89PNG"
    last = torch.load(tmp_path / "es_last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["method"] == "finetune" and last["best"]["stopped"] is True
    # a second run with the same name is refused unless resuming
    with pytest.raises(UserError, match="already exists"):
        main_finetune.main(_args(phantom, tmp_path, "--run_name", "es"))
    # the paper's schedule: every 10 epochs, every epoch from 90 (and the last)
    a = main_finetune.get_args_parser().parse_args(["--data_dir", "x"])
    evals = [e for e in range(1, 226) if finetune.should_evaluate(e, a)]
    assert evals == list(range(10, 90, 10)) + list(range(90, 226))


def test_non_finite_loss_stops_the_run(phantom, tmp_path):
    with pytest.raises(TrainingError, match="loss is nan|loss is inf"):
        main_finetune.main(
            _args(phantom, tmp_path, "--n_epochs", "3", "--base_lr", "1e30", "--end_lr", "1e30", "--run_name", "nan")
        )
    assert torch.load(tmp_path / "nan_last.pt", weights_only=True)["epoch"] >= 1  # the last good state is kept
    assert not (tmp_path / "nan_files" / "result.json").exists()


def test_checkpoint_layouts_and_refusals(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    enc = models.build_encoder(cfg)
    ref = {k: v.clone() for k, v in enc.backbone.state_dict().items()}

    def loaded(path, key="teacher"):
        seg = models.build_segmenter(cfg, 14)
        n = models.load_pretrained_encoder(seg, str(path), cfg, key)
        got = models.segmenter_encoder(seg).state_dict()
        assert n == len(ref) and all(torch.equal(got[k], ref[k]) for k in ref)

    torch.save(models.encoder_checkpoint(enc, cfg, "simsiam", 3, {}), tmp_path / "sim.pt")
    loaded(tmp_path / "sim.pt")
    torch.save(ref, tmp_path / "bare.pt")
    loaded(tmp_path / "bare.pt")
    # MONAI's SwinUNETR layout: a whole segmenter state dict, swinViT. keys, DataParallel's module. prefix
    seg = models.build_segmenter(cfg, 14)
    models.segmenter_encoder(seg).load_state_dict(ref)
    torch.save({"state_dict": {"module." + k: v for k, v in seg.state_dict().items()}}, tmp_path / "monai.pt")
    loaded(tmp_path / "monai.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in ref.items()}}, tmp_path / "monai_ssl.pt")
    loaded(tmp_path / "monai_ssl.pt")

    target = models.build_segmenter(cfg, 14)
    before = {k: v.clone() for k, v in models.segmenter_encoder(target).state_dict().items()}
    cfg24 = models.encoder_config("swin", 2, 24, crop_size=64)
    torch.save(models.encoder_checkpoint(models.build_encoder(cfg24), cfg24, "simsiam", 1, {}), tmp_path / "e24.pt")
    with pytest.raises(UserError, match=r"embedding_size=24, but this model has embedding_size=12"):
        models.load_pretrained_encoder(target, str(tmp_path / "e24.pt"), cfg)
    unetr_cfg = _cfg(arch="unetr", crop=64)
    torch.save(
        models.encoder_checkpoint(models.build_encoder(unetr_cfg), unetr_cfg, "simsiam", 1, {}), tmp_path / "unetr.pt"
    )
    with pytest.raises(UserError, match=r"arch=unetr, but this model has arch=swin"):
        models.load_pretrained_encoder(target, str(tmp_path / "unetr.pt"), cfg)
    bad = dict(ref)
    bad.pop("patch_embed.proj.weight")
    bad["extra.weight"] = torch.zeros(1)
    bad["layers1.0.blocks.0.norm1.weight"] = torch.zeros(5)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(
        UserError, match=r"1 missing \(patch_embed.proj.weight\); 1 unexpected \(extra.weight\); 1 mis-shaped"
    ):
        models.load_pretrained_encoder(target, str(tmp_path / "bad.pt"), cfg)
    with pytest.raises(UserError, match="--checkpoint_key 'student' not available"):
        models.load_pretrained_encoder(target, str(tmp_path / "sim.pt"), cfg, "student")
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "pickle.pt")
    with pytest.raises(UserError, match=r"needs the Python object argparse.Namespace"):
        models.load_pretrained_encoder(target, str(tmp_path / "pickle.pt"), cfg)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        models.load_pretrained_encoder(target, str(tmp_path / "notes.txt"), cfg)
    # the refused attempts left the model untouched
    after = models.segmenter_encoder(target).state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_3d_run_on_raw_nifti(phantom, tmp_path):
    args = main_finetune.get_args_parser().parse_args(
        [
            "--data_dir",
            phantom["raw"],
            "--split_path",
            phantom["split"],
            "--spatial_dims",
            "3",
            "--arch",
            "unetr",
            "--low_resource_mode",
            "--crop_size",
            "32",
            "--batch_size",
            "1",
            "--n_crops_per_ct",
            "1",
            "--n_epochs",
            "1",
            "--warmup_epochs",
            "0",
            "--num_workers",
            "0",
            "--max_images",
            "1",
            "--sw_batch_size",
            "9",
            "--sw_overlap",
            "0",
            "--n_vis",
            "1",
            "--no-progress",
            "--ignore_user_warning",
            "--chkpt_dir",
            str(tmp_path),
            "--run_name",
            "r3d",
            "--save_predictions",
            str(tmp_path / "pred3d"),
        ]
    )
    res = main_finetune.main(args)
    assert res["n_val_items"] == 1 and 0.0 <= res["dice_paper"] <= 1.0
    assert any(p.name.startswith("flare3d_") for p in (tmp_path / "cache").iterdir())
    pred = nib.load(tmp_path / "pred3d" / "FLARE22_Tr_0002.nii.gz")
    lab = nib.load(tmp_path / "pred3d" / "reference_labels" / "FLARE22_Tr_0002.nii.gz")
    assert pred.shape == lab.shape and pred.shape[0] >= 96
    assert np.allclose(nib.affines.voxel_sizes(pred.affine), (1.0, 1.0, 2.5))
    assert np.allclose(pred.affine, lab.affine)


# ---------------------------------------------------------------------------------------
# DDP, --eval_only, --save_predictions
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(phantom, tmp_path_factory):
    """A 2-process torchrun run (gloo) over the full data: 3 validation cases, split 2 + 1."""
    out = tmp_path_factory.mktemp("ft_ddp")
    argv = _argv(phantom, out, "--run_name", "ddp", "--max_images", "0", "--batch_size", "4", "--sw_batch_size", "16")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "main_finetune.py"),
        *argv,
    ]
    p = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, json.loads((out / "ddp_files" / "result.json").read_text())


@pytest.mark.slow
def test_ddp_scores_equal_one_process_and_prediction_round_trip(phantom, ddp_run, tmp_path):
    out, ddp = ddp_run
    assert ddp["n_val_items"] == sum(
        1 for it in data.list_finetune_pairs(phantom["d2"], data.load_split(phantom["split"]), 2)["val"]
    )
    preds = tmp_path / "preds"
    one = main_finetune.main(
        _args(
            phantom,
            tmp_path,
            "--eval_only",
            "--chkpt_path",
            ddp["weights"],
            "--max_images",
            "0",
            "--sw_batch_size",
            "16",
            "--save_predictions",
            str(preds),
            "--run_name",
            "one",
        )
    )
    assert one["dice_paper"] == ddp["dice_paper"] and one["n_val_items"] == ddp["n_val_items"]
    assert json.loads(Path(one["scores"]).read_text()) == json.loads(Path(ddp["scores"]).read_text())
    # the saved volumes: one per case, the preprocessed geometry, labels = the stacked PNG slices
    split = data.load_split(phantom["split"])
    assert sorted(p.name for p in preds.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in split["val"]]
    pairs = data.list_finetune_pairs(phantom["d2"], split, 2)["val"]
    case = split["val"][0]
    lab = nib.load(preds / "reference_labels" / f"{case}.nii.gz")
    stacked = np.stack([data.read_label_2d(it["label"]) for it in pairs if it["case"] == case], axis=-1)
    assert np.array_equal(np.asarray(lab.dataobj), stacked)
    assert np.allclose(lab.affine, np.diag([1.0, 1.0, 2.5, 1.0]))
    # metrics.py on the saved files gives the run's challenge-grade scores
    summary = metrics.main(
        metrics.get_args_parser().parse_args(["--pred_dir", str(preds), "--label_dir", str(preds / "reference_labels")])
    )
    assert summary["dice_mean"] == pytest.approx(one["summary"]["dice_mean"], abs=1e-12)
    assert summary["nsd_mean"] == pytest.approx(one["summary"]["nsd_mean"], abs=1e-12)
    # --eval_only refuses what is not a fine-tuned model, or the wrong dimensionality
    enc = tmp_path / "enc.pt"
    torch.save(models.encoder_checkpoint(models.build_encoder(_cfg()), _cfg(), "simsiam", 1, {}), enc)
    with pytest.raises(UserError, match="is not a fine-tuned model"):
        main_finetune.main(_args(phantom, tmp_path, "--eval_only", "--chkpt_path", str(enc)))
    with pytest.raises(UserError, match="is a 2D model but --spatial_dims is 3"):
        main_finetune.main(
            _args(phantom, tmp_path, "--eval_only", "--chkpt_path", ddp["weights"], "--spatial_dims", "3")
        )


# ---------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------


def test_resume_after_sigkill_equals_uninterrupted(phantom, tmp_path):
    """From a real tiny SimSiam run: killed during epoch 2 and resumed = uninterrupted, bit for bit."""
    sim = main_simsiam.main(
        main_simsiam.get_args_parser().parse_args(
            [
                "--data_dir",
                phantom["d2"],
                "--low_resource_mode",
                "--crop_size",
                "32",
                "--batch_size",
                "2",
                "--n_epochs",
                "1",
                "--max_images",
                "2",
                "--num_workers",
                "0",
                "--chkpt_dir",
                str(tmp_path),
                "--run_name",
                "sim",
                "--no-progress",
            ]
        )
    )
    n_enc = len(torch.load(sim["weights"], weights_only=True)["encoder"])
    extra = (
        "--n_epochs",
        "2",
        "--n_vis",
        "0",
        "--run_name",
        "r",
        "--chkpt_path",
        sim["weights"],
        "--embedding_size",
        "48",
    )
    a, b = tmp_path / "a", tmp_path / "b"
    ref = main_finetune.main(_args(phantom, a, *extra))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reductions as this process
    with open(tmp_path / "killed.log", "w") as err:
        proc = subprocess.Popen(
            [PY, str(ROOT / "main_finetune.py"), *_argv(phantom, b, *extra)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    last = b / "r_last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not last.exists():  # killed during epoch 2
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    with pytest.raises(UserError, match="already exists"):
        main_finetune.main(_args(phantom, b, *extra))
    res = main_finetune.main(_args(phantom, b, *extra, "--resume"))
    assert res["epochs_done"] == 2 and res["best_dice_paper"] == ref["best_dice_paper"]
    assert ref["pretrained_tensors"] == res["pretrained_tensors"] == n_enc
    for name in ("r.pt", "r_last.pt"):
        x = torch.load(a / name, weights_only=True)["model"]
        y = torch.load(b / name, weights_only=True)["model"]
        assert all(torch.equal(x[k], y[k]) for k in x), name
    la, lb = _log(a / "r_log.jsonl"), _log(b / "r_log.jsonl")
    assert [r["epoch"] for r in lb] == [1, 2]
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    # the log after a resume: lines of redone epochs dropped; the line of a kill between state and log restored
    log_b = b / "r_log.jsonl"
    engine.repair_log(str(log_b), 2, {"epoch": 2, "train_loss": 0.5})
    assert [r["epoch"] for r in _log(log_b)] == [1, 2] and _log(log_b)[1] == lb[1]
    log_b.write_text(json.dumps(lb[0]) + "\n")
    engine.repair_log(str(log_b), 2, {"epoch": 2, "train_loss": 0.5})
    assert _log(log_b) == [lb[0], {"epoch": 2, "train_loss": 0.5}]
    # --resume with a foreign file or a missing one (--resume alone on a run that never saved a
    # state starts it afresh: test_faults.py)
    with pytest.raises(UserError, match="not a training state"):
        main_finetune.main(_args(phantom, b, *extra, "--resume", str(b / "r.pt")))
    with pytest.raises(UserError, match="does not exist"):
        main_finetune.main(_args(phantom, b, "--run_name", "nope", "--resume", str(b / "nope_last.pt")))


# ---------------------------------------------------------------------------------------
# Scores against an independent computation
# ---------------------------------------------------------------------------------------


class _EchoModel(nn.Module):
    """A 'model' whose logits are the one-hot of ids encoded in the image (id / 100)."""

    def forward(self, x):
        ids = torch.round(x[:, 0] * 100).long()
        return torch.nn.functional.one_hot(ids, 14).movedim(-1, 1).float()


def _evaluate(pred, label, spacing, tolerance=1.0, spatial_dims=2, crop=16):
    ref = data.CaseRef(case="C1", spacing=spacing)
    affine = np.diag([*spacing, 1.0])
    return finetune.evaluate(
        _EchoModel(),
        [ref],
        lambda r: (pred.astype(np.float32) / 100, label, affine),
        spatial_dims=spatial_dims,
        n_classes=14,
        crop_size=crop,
        sw_batch_size=4,
        sw_overlap=0.25,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        info=engine.DistInfo(),
        full=True,
        tolerance_mm=tolerance,
        progress=False,
    )


def test_scores_match_independent_computation():
    shape = (24, 20, 6)
    label = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    label[2:10, 3:11, 1:5] = 1  # identical
    pred[2:10, 3:11, 1:5] = 1
    label[12:20, 2:9, 0:4] = 2  # shifted by 2 mm in x, one slice longer
    pred[14:22, 2:9, 0:5] = 2
    label[3:6, 14:18, 2:4] = 3  # missed
    pred[18:21, 14:18, 4:6] = 4  # predicted, absent from the label
    pred[8:12, 12:16, 1:3] = 7  # partial
    label[9:12, 12:16, 1:2] = 7
    spacing = (1.0, 1.0, 2.5)
    res = _evaluate(pred, label, spacing, tolerance=1.0)
    scores = res.per_case["C1"]
    # the official FLARE 2022 rules (absent organs, the low-Dice rule) with a 1 mm tolerance for every organ
    want = flare22_reference(pred, label, spacing, dict.fromkeys(range(1, 14), 1.0))
    for i in range(1, 14):
        want_d, want_n = want[i]
        assert scores[i]["dice"] == pytest.approx(want_d, abs=1e-12), i
        assert scores[i]["nsd"] == pytest.approx(want_n, abs=1e-6), i
    assert 0 < scores[2]["nsd"] < 1 and scores[3]["dice"] == 0 and scores[4]["dice"] == 0 and scores[9]["dice"] == 1
    # dice_paper: per slice, over the channels present in the label (background included), mean over slices
    per_slice = []
    for z in range(shape[2]):
        vals = []
        for c in range(14):
            a, b = label[..., z] == c, pred[..., z] == c
            if a.any():
                vals.append(2 * (a & b).sum() / (a.sum() + b.sum()))
        per_slice.append(np.mean(vals))
    assert res.dice_paper == pytest.approx(np.mean(per_slice), abs=1e-6) and res.n_items == shape[2]
    # the same volume as one 3D item: one value for the volume
    res3 = _evaluate(pred, label, spacing, tolerance=1.0, spatial_dims=3)
    present = [c for c in range(14) if (label == c).any()]
    want3 = np.mean(
        [2 * ((label == c) & (pred == c)).sum() / ((label == c).sum() + (pred == c).sum()) for c in present]
    )
    assert res3.dice_paper == pytest.approx(want3, abs=1e-6) and res3.n_items == 1
    assert res3.per_case["C1"] == scores


def test_real_ct_prediction_equal_to_label_scores_one(real_ct):
    img = nib.load(real_ct.label)
    label = np.asarray(img.dataobj).astype(np.uint8)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    res = _evaluate(label, label, spacing, tolerance=metrics.FLARE22_TOLERANCE_MM, crop=128)
    scores = res.per_case["C1"]
    assert res.dice_paper == pytest.approx(1.0) and res.n_items == label.shape[2]
    present = set(np.unique(label).tolist()) - {0}
    assert present == set(range(1, 14)) - {10}  # every organ but the esophagus
    for i in range(1, 14):
        assert scores[i]["dice"] == 1.0 and scores[i]["nsd"] == 1.0, i
    # missing one organ costs exactly that organ
    pred = label.copy()
    pred[pred == 4] = 0
    s2 = _evaluate(pred, label, spacing, crop=128).per_case["C1"]
    assert s2[4]["dice"] == 0.0 and all(s2[i]["dice"] == 1.0 for i in range(1, 14) if i != 4)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_bad_input_is_one_clear_error(phantom, tmp_path):
    def fails(match, *extra, ph=phantom):
        with pytest.raises(UserError, match=match):
            main_finetune.main(_args(ph, tmp_path, *extra))

    split = data.load_split(phantom["split"])
    (tmp_path / "s_missing.json").write_text(json.dumps({"train": split["train"], "val": ["FLARE22_Tr_0099"]}))
    fails(r"val case 'FLARE22_Tr_0099' has no slices", "--split_path", str(tmp_path / "s_missing.json"))
    (tmp_path / "s_empty.json").write_text(json.dumps({"train": split["train"], "val": []}))
    fails(r"has no validation cases", "--split_path", str(tmp_path / "s_empty.json"))
    # --n_classes is checked against the folder's label set (FLARE 2022's 14 classes: its manifest records none)
    fails(r"--n_classes 3, but the label set of --data_dir \(FLARE 2022.*\) has 14 classes", "--n_classes", "3")
    # a label id outside the label set names the label file
    ids = tmp_path / "d2ids"
    shutil.copytree(phantom["d2"], ids)
    victim = sorted((ids / "labels").glob("*.png"))[0]
    lab = data.read_label_2d(victim)
    lab[0, 0] = 14
    victim.write_bytes(data.encode_png_2d(lab, is_label=True))
    fails(rf"label .*labels/{victim.name} holds class id 14, outside 0\.\.13", ph={**phantom, "d2": str(ids)})
    # image and label slice lists that disagree
    copy = tmp_path / "d2copy"
    shutil.copytree(phantom["d2"], copy)
    victim = sorted((copy / "labels").glob("*.png"))[3]
    victim.unlink()
    fails(rf"{victim.name} has no label", ph={**phantom, "d2": str(copy)})
    # --spatial_dims that does not match the data
    fails(r"PNG slices: use spatial_dims 2|no images/ folder", "--spatial_dims", "3")
    fails(r"looks like raw FLARE NIfTI", ph={**phantom, "d2": phantom["raw"]})
    # a checkpoint of another embedding size is named before any data is read
    cfg24 = models.encoder_config("swin", 2, 24, crop_size=64)
    torch.save(models.encoder_checkpoint(models.build_encoder(cfg24), cfg24, "simsiam", 1, {}), tmp_path / "e24.pt")
    fails(r"embedding_size=24, but this model has embedding_size=12", "--chkpt_path", str(tmp_path / "e24.pt"))
    fails(r"Swin-UNETR needs a multiple of 32 of at least 64", "--crop_size", "32")
    assert not list(tmp_path.glob("*_last.pt")) and not list(tmp_path.glob("*.pt.*tmp"))


def test_cli_exit_code_2_on_bad_input(phantom, tmp_path, capsys):
    """The command line (utils.run_cli, what ``__main__`` runs): one ``error:`` line, exit code 2, nothing written."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with pytest.raises(SystemExit) as e:
            run_cli(main_finetune.main, main_finetune.get_args_parser(), _argv(phantom, tmp_path, "--n_classes", "3"))
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
    assert e.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--n_classes 3" in errors[0] and "has 14 classes" in errors[0]
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".jsonl")]


@pytest.mark.slow
def test_speed_flags_keep_the_fine_tuning_numbers(phantom, tmp_path):
    """--fused_optimizer, --check_every and --compile (eager backend: tracing only, inductor
    compiles for minutes on this CPU) change the training numbers at most by rounding.

    The fused AdamW rounds differently from the per-tensor one, and Adam's first steps turn a
    rounding difference of a gradient near 0 into up to a whole step (``lr``) of that weight:
    it is compared on its own, within one step per weight for a few of them."""
    common = ("--n_epochs", "2", "--eval_every", "1", "--eval_every_from", "1", "--drop_path_rate", "0")
    main_finetune.main(_args(phantom, tmp_path, *common, "--run_name", "plain", "--check_every", "1"))
    torch._dynamo.reset()
    counters.clear()
    main_finetune.main(
        _args(
            phantom,
            tmp_path,
            *common,
            "--run_name",
            "fast",
            "--check_every",
            "3",
            "--compile",
            "--compile_backend",
            "eager",
        )
    )
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
    main_finetune.main(_args(phantom, tmp_path, *common, "--run_name", "fused", "--fused_optimizer"))
    la = _log(tmp_path / "plain_log.jsonl")
    sa = torch.load(tmp_path / "plain_last.pt", weights_only=True)["model"]
    for name in ("fast", "fused"):
        lb = _log(tmp_path / f"{name}_log.jsonl")
        assert len(la) == len(lb) == 2
        np.testing.assert_allclose([r["train_loss"] for r in la], [r["train_loss"] for r in lb], rtol=1e-4)
        np.testing.assert_allclose([r["val_dice_paper"] for r in la], [r["val_dice_paper"] for r in lb], atol=1e-3)
        sb = torch.load(tmp_path / f"{name}_last.pt", weights_only=True)["model"]
        assert set(sa) == set(sb) and not any("_orig_mod" in k for k in sb)
        far, n = 0, 0
        for k in sa:
            if name == "fast":
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-5, msg=k)
            elif sa[k].is_floating_point():
                diff = (sa[k] - sb[k]).abs()
                assert float(diff.max()) <= 2e-3, k  # two AdamW steps of lr 1e-3 at most
                far += int((diff > 1e-5 + 1e-3 * sa[k].abs()).sum())
                n += sa[k].numel()
        assert far <= 0.02 * n  # all but a few weights within rounding


# ---------------------------------------------------------------------------------------
# Evaluation speed paths: cached stored slices, Dice on the prediction's device
# ---------------------------------------------------------------------------------------


def _device_image_cases():
    rng = np.random.default_rng(4)
    return [
        rng.integers(0, 256, size=(9, 7, 3)).astype(np.uint8),
        rng.integers(0, 65536, size=(9, 7, 3)).astype(np.uint16),
        rng.random((9, 7, 3)).astype(np.float32),
    ]


def test_stored_slices_become_the_floats_of_read_image_2d():
    for image in _device_image_cases():
        take = finetune._device_image(image, torch.device("cpu"))
        want = data.stored_to_float(image)
        assert torch.equal(take(None), torch.from_numpy(want)) and torch.equal(
            take(slice(1, 3)), torch.from_numpy(want[..., 1:3])
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stored_slices_become_the_same_floats_on_cuda():
    for image in _device_image_cases():
        got = finetune._device_image(image, torch.device("cuda"))(None).cpu()
        assert torch.equal(got, torch.from_numpy(data.stored_to_float(image)))


def test_cached_evaluation_equals_reading_every_slice_and_monai_dice(phantom, ddp_run, monkeypatch):
    """evaluate() with --cache_eval (stored uint8 slices, Dice counted on the prediction's
    device) gives the predictions and dice_paper values of the plain path: float slices read
    from the PNGs, prediction on the host, MONAI's DiceMetric per slice. A second evaluation
    reads no file."""
    _, ddp = ddp_run
    model, _, _ = finetune.load_finetuned(ddp["weights"])
    split = data.load_split(phantom["split"])
    items = data.list_finetune_pairs(phantom["d2"], split, 2)["val"]
    cases = data.group_cases_2d(items, data.read_manifest_spacing(phantom["d2"]), phantom["d2"])
    kw = dict(
        spatial_dims=2,
        crop_size=64,
        sw_batch_size=16,
        sw_overlap=0.25,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
    )
    ref_values = []
    for ref in cases:
        image, label, _ = data.load_case_2d(ref, 14)
        assert image.dtype == np.float32
        pred = finetune.predict_volume(model, image, **kw)

        def oh(a):
            return (
                torch.nn.functional.one_hot(torch.from_numpy(np.moveaxis(a, -1, 0)).long(), 14).movedim(-1, 1).float()
            )

        dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(oh(pred), oh(label))
        ref_values.append(torch.nanmean(dice.double(), dim=1).tolist())
        stored, label2, _ = data.load_case_2d(ref, 14, stored=True)
        assert stored.dtype == np.uint8 and np.array_equal(label, label2)
        assert np.array_equal(finetune.predict_volume(model, stored, **kw), pred)
    cache = data.CaseCache(lambda ref: data.load_case_2d(ref, 14, stored=True))
    info = engine.DistInfo()
    res = finetune.evaluate(model, cases, cache.load, n_classes=14, info=info, progress=False, **kw)
    assert res.n_items == sum(len(v) for v in ref_values)
    assert res.paper_per_case == {ref.case: float(np.mean(v)) for ref, v in zip(cases, ref_values)}
    voxels = sum(img.size for img, _, _ in cache.cases.values())
    assert all(img.dtype == np.uint8 for img, _, _ in cache.cases.values())
    assert cache.nbytes == 2 * voxels + 16 * 8 * len(cases)  # uint8 image and label, float64 4x4 affine

    def no_reading(path):
        raise AssertionError(f"read {path} although its case is cached")

    monkeypatch.setattr(data, "read_image_2d_stored", no_reading)
    again = finetune.evaluate(model, cases, cache.load, n_classes=14, info=info, progress=False, full=True, **kw)
    assert again.dice_paper == res.dice_paper and again.per_case is not None


def test_batch_augment_and_cache_images_in_fine_tuning(phantom, tmp_path, monkeypatch):
    """--cache_images: the same run as reading the PNGs; --batch_augment: the augmentations run
    on the device once per step, reproducibly, and a run cannot be resumed with the other value."""
    common = (
        "--n_epochs",
        "2",
        "--eval_every",
        "2",
        "--eval_every_from",
        "2",
        "--max_images",
        "4",
        "--num_workers",
        "0",
    )

    def run(name, *extra):
        main_finetune.main(_args(phantom, tmp_path, *common, "--run_name", name, *extra))
        return _log(tmp_path / f"{name}_log.jsonl"), torch.load(tmp_path / f"{name}_last.pt", weights_only=True)[
            "model"
        ]

    def same(a, b):
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    log_a, wa = run("plain")
    log_b, wb = run("cached", "--cache_images")
    assert [r["train_loss"] for r in log_a] == [r["train_loss"] for r in log_b] and same(wa, wb)

    calls = []
    original = batch_augment.BatchFinetuneAugment.forward

    def counted(self, image, label):
        calls.append((tuple(image.shape), tuple(label.shape), image.device.type))
        return original(self, image, label)

    monkeypatch.setattr(batch_augment.BatchFinetuneAugment, "forward", counted)
    log_c, wc = run("ba", "--batch_augment")
    assert len(calls) == 2 * 2 and all(
        c == ((2, 1, 64, 64), (2, 1, 64, 64), "cpu") for c in calls
    )  # 2 epochs x 2 steps
    log_d, wd = run("ba2", "--batch_augment", "--cache_images")
    assert [r["train_loss"] for r in log_c] == [r["train_loss"] for r in log_d] and same(wc, wd)
    assert not same(wa, wc) and all(np.isfinite(r["train_loss"]) for r in log_c)
    with pytest.raises(UserError, match=r"different arguments \(batch_augment: True -> False\)"):
        main_finetune.main(_args(phantom, tmp_path, *common, "--run_name", "ba", "--resume"))
    with pytest.raises(UserError, match="--cache_images"):
        main_finetune.main(_args(phantom, tmp_path, "--spatial_dims", "3", "--cache_images"))


def test_caches_refused_when_they_cannot_fit(phantom, tmp_path, monkeypatch):
    """--cache_eval (on by default) and --cache_images are sized from the PNG headers at start-up
    and refused, naming the way out, when they would not fit; nothing is written."""
    monkeypatch.setattr(utils, "available_memory", lambda: utils.MEMORY_RESERVE_MIN)  # no room for any cache
    out = tmp_path / "runs"
    with pytest.raises(UserError, match=r"--cache_eval: 2 evaluated slices and their labels need .*--no-cache_eval"):
        main_finetune.main(_args(phantom, out))
    with pytest.raises(
        UserError, match=r"--cache_images: 2 training slices and their labels need .*run without --cache_images"
    ):
        main_finetune.main(_args(phantom, out, "--no-cache_eval", "--cache_images"))
    assert not any(out.iterdir())  # the run folder is created and write-tested at start-up, and left empty
    monkeypatch.setattr(utils, "available_memory", lambda: None)  # unknown: not checked (a warning says so)
    main_finetune.main(_args(phantom, out, "--no-cache_eval", "--cache_images", "--n_vis", "0"))
    assert (out / "run_log.jsonl").exists() or any(out.glob("*_log.jsonl"))
