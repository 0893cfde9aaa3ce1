"""export_model.py: our weights in MONAI's layouts, checked with MONAI's own code.

``monai_ssl``: ``SwinUNETR(...).load_from(torch.load(PATH))`` (MONAI's method) must fill every
tensor of ``swinViT`` with our encoder's values: SimSiam and DINO (teacher and student)
encoders, 2D and 3D, and the encoder of a fine-tuned model. ``swinunetr``: the network
rebuilt from the JSON model card alone (``monai.networks.nets.<class>(**args)``) loads the
state dict strictly and gives our segmenter's outputs (Swin-UNETR 2D and 3D, UNETR); a
pretrained encoder loads into ``swinViT`` and gives our encoder's features.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import monai.networks.nets as nets
import pytest
import torch

import data
import export_model
import finetune
import models
from transforms import preprocessing_record
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


def _encoder_file(tmp_path: Path, method: str, spatial_dims: int, arch: str = "swin") -> tuple[Path, dict]:
    """A pretrained checkpoint (DINO: teacher and student differ); returns (path, {key: backbone state})."""
    cfg = models.encoder_config(arch, spatial_dims, 12, low_resource_mode=True, crop_size=64)
    torch.manual_seed(spatial_dims)
    teacher, student = models.build_encoder(cfg), models.build_encoder(cfg)
    with torch.no_grad():  # every tensor random (norms start at 1 and 0), so each copy is seen
        for p in [*teacher.parameters(), *student.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    states = {"teacher": teacher.backbone.state_dict(), "student": student.backbone.state_dict()}
    extra = {"student_encoder": {k: v.clone() for k, v in states["student"].items()}} if method == "dino" else {}
    args = {"data_dir": "/data/unlabelled", "min_iou": 0.3, "max_iou": 0.6, "crop_size": 64, "seed": 7}
    path = tmp_path / f"{method}_{arch}{spatial_dims}d.pt"
    torch.save(models.encoder_checkpoint(teacher, cfg, method, 5, args, **extra), path)
    return path, states


def _finetuned_file(
    tmp_path: Path, spatial_dims: int, arch: str = "swin", name: str = "ft"
) -> tuple[Path, torch.nn.Module]:
    cfg = models.encoder_config(arch, spatial_dims, 12, low_resource_mode=True, crop_size=64)
    torch.manual_seed(3)
    model = models.build_segmenter(cfg, 14).eval()
    rec = preprocessing_record(spatial_dims, -500.0, 500.0, (1.0, 1.0, 2.5), 96, 8 if spatial_dims == 2 else None, "m")
    args = {"crop_size": 64, "spatial_dims": spatial_dims, "data_dir": "/data/flare_2d", "seed": 1, "chkpt_path": None}
    path = tmp_path / f"{name}.pt"
    torch.save(finetune.finetuned_checkpoint(model, cfg, 14, args, 12, 0.81, rec), path)
    return path, model


def _rebuild(card: dict) -> torch.nn.Module:
    """The network from the model card alone."""
    cls = card["architecture"]["class"]
    assert cls.startswith("monai.networks.nets.")
    return getattr(nets, cls.rsplit(".", 1)[1])(**card["architecture"]["args"])


# ---------------------------------------------------------------------------------------
# monai_ssl: MONAI's load_from
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, dims, key",
    [("simsiam", 2, "teacher"), ("simsiam", 3, "teacher"), ("dino", 3, "teacher"), ("dino", 2, "student")],
)
def test_monai_ssl_load_from_fills_every_encoder_tensor(tmp_path, method, dims, key):
    src, states = _encoder_file(tmp_path, method, dims)
    out = export_model.export(str(src), "monai_ssl", str(tmp_path / "ssl.pt"), key)
    weights = torch.load(out["weights"], weights_only=True)
    assert set(weights) == {"state_dict"} and all(k.startswith("module.") for k in weights["state_dict"])
    card = json.loads(Path(out["card"]).read_text())
    torch.manual_seed(123)  # initialised differently from the exported encoder
    model = _rebuild(card)
    before = {k: v.clone() for k, v in model.swinViT.state_dict().items()}
    model.load_from(weights)  # MONAI's own method
    got, want = model.swinViT.state_dict(), states[key]
    assert set(got) == set(want) and out["n_tensors"] == len(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # every learned tensor changed (the relative position index is a constant buffer)
    assert all(not torch.equal(before[k], got[k]) for k in got if "relative_position_index" not in k)
    other = "student" if key == "teacher" else "teacher"
    if method == "dino":
        assert not torch.equal(got["patch_embed.proj.weight"], states[other]["patch_embed.proj.weight"])
    assert card["training"]["encoder"] == (key if method == "dino" else "encoder")
    assert card["training"]["min_iou"] == 0.3 and card["weights"]["component"] == "swinViT"


def test_monai_ssl_of_a_finetuned_model_is_its_encoder(tmp_path):
    src, model = _finetuned_file(tmp_path, 2)
    out = export_model.export(str(src), "monai_ssl", str(tmp_path / "enc.pt"))
    card = json.loads(Path(out["card"]).read_text())
    fresh = _rebuild(card)
    fresh.load_from(torch.load(out["weights"], weights_only=True))
    for k, v in model.swinViT.state_dict().items():
        assert torch.equal(fresh.swinViT.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------
# swinunetr: the network from the model card alone
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims, arch", [(2, "swin"), pytest.param(3, "swin", marks=pytest.mark.slow), (2, "unetr")])
def test_swinunetr_rebuilt_from_the_card_alone_gives_our_outputs(tmp_path, dims, arch):
    src, ours = _finetuned_file(tmp_path, dims, arch)
    out = export_model.export(str(src), "swinunetr", str(tmp_path / "model.pt"))
    assert out["card"] == str(tmp_path / "model.pt") + ".json"
    card = json.loads(Path(out["card"]).read_text())
    payload = Path(out["weights"]).read_bytes()
    assert card["weights"]["sha256"] == hashlib.sha256(payload).hexdigest()
    rebuilt = _rebuild(card)
    rebuilt.load_state_dict(torch.load(out["weights"], weights_only=True), strict=True)
    rebuilt.eval()
    x = torch.rand(2, 1, 64, 64) if dims == 2 else torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ours(x))
    assert card["architecture"]["class"] == (
        "monai.networks.nets.SwinUNETR" if arch == "swin" else "monai.networks.nets.UNETR"
    )
    assert card["labels"] == {str(i): n for i, n in enumerate(data.LABEL_NAMES)}
    ckpt = torch.load(src, weights_only=True)
    assert card["input"]["preprocessing"] == ckpt["preprocessing"]
    assert card["input"]["sliding_window"]["roi_size"] == [64] * dims
    assert card["validation"]["dice_paper"] == pytest.approx(0.81) and card["validation"]["epoch"] == 12
    assert card["validation"]["challenge_grade"] is None  # no run folder next to this file
    assert card["training"]["data_dir"] == "/data/flare_2d" and card["training"]["run"] == "ft"
    assert card["intended_use"] and card["limitations"]


def test_swinunetr_card_carries_the_runs_validation_scores(tmp_path):
    src, _ = _finetuned_file(tmp_path, 2, name="run7")
    files = tmp_path / "run7_files"
    files.mkdir()
    summary = {"n_cases": 35, "dice_mean": 0.71, "nsd_mean": 0.74, "per_organ": {"liver": {"dice": 0.9}}}
    (files / "result.json").write_text(json.dumps({"summary": summary, "best_dice_paper": 0.81}))
    card = json.loads(Path(export_model.export(str(src), "swinunetr", str(tmp_path / "o.pt"))["card"]).read_text())
    got = card["validation"]["challenge_grade"]
    assert got["source"] == str(files / "result.json")
    assert {k: got[k] for k in summary} == summary


def test_swinunetr_of_a_pretrained_encoder_is_the_encoder_alone(tmp_path):
    src, states = _encoder_file(tmp_path, "simsiam", 2)
    out = export_model.export(str(src), "swinunetr", str(tmp_path / "enc.pt"))
    card = json.loads(Path(out["card"]).read_text())
    assert card["weights"]["component"] == "swinViT" and card["labels"] is None
    model = _rebuild(card)
    model.swinViT.load_state_dict(torch.load(out["weights"], weights_only=True), strict=True)
    ours = models.build_encoder(models.encoder_config("swin", 2, 12, low_resource_mode=True))
    ours.backbone.load_state_dict(states["teacher"])
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.swinViT(x), ours.backbone(x)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refusals_name_the_problem(tmp_path):
    unetr, _ = _encoder_file(tmp_path, "simsiam", 2, arch="unetr")
    with pytest.raises(UserError, match="monai_ssl is the layout of MONAI's Swin-UNETR .* unetr encoder"):
        export_model.export(str(unetr), "monai_ssl", str(tmp_path / "a.pt"))
    simsiam, _ = _encoder_file(tmp_path, "simsiam", 3)
    with pytest.raises(UserError, match="--checkpoint_key student: .* has no student"):
        export_model.export(str(simsiam), "monai_ssl", str(tmp_path / "a.pt"), "student")
    torch.save({"w": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        export_model.export(str(tmp_path / "foreign.pt"), "swinunetr", str(tmp_path / "a.pt"))
    with pytest.raises(UserError, match="is the checkpoint itself"):
        export_model.export(str(simsiam), "swinunetr", str(simsiam), overwrite=True)
    export_model.export(str(simsiam), "swinunetr", str(tmp_path / "b.pt"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "export_model.py"), "--chkpt_path", str(simsiam), "--format", "swinunetr"]
    p = subprocess.run([*argv, "-o", str(tmp_path / "b.pt")], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'b.pt'} exists; pass --overwrite to replace it"
    )
    args = export_model.get_args_parser().parse_args([*argv[2:], "-o", str(tmp_path / "b.pt"), "--overwrite"])
    assert export_model.main(args)["weights"] == str(tmp_path / "b.pt")


def test_monai_ssl_file_is_a_pretrained_checkpoint_for_fine_tuning(tmp_path, caplog):
    """What ``load_from`` reads, ``main_finetune.py --chkpt_path`` reads too: the exported
    file (MONAI's ``mlp.fc1`` / ``fc2`` names) loads strictly into our segmenter's encoder,
    also with the heads of MONAI's SSLHead beside it (left out, counted in the log)."""
    src, states = _encoder_file(tmp_path, "simsiam", 3)
    out = export_model.export(str(src), "monai_ssl", str(tmp_path / "ssl.pt"))
    weights = torch.load(out["weights"], weights_only=True)
    assert any(".mlp.fc1." in k for k in weights["state_dict"])
    with_heads = {"state_dict": dict(weights["state_dict"])}
    with_heads["state_dict"]["module.rotation_head.weight"] = torch.zeros(4, 96)
    with_heads["state_dict"]["module.contrastive_head.bias"] = torch.zeros(512)
    torch.save(with_heads, tmp_path / "ssl_heads.pt")
    cfg = models.encoder_config("swin", 3, 12, low_resource_mode=True, crop_size=64)
    caplog.set_level("INFO")
    for name in ("ssl.pt", "ssl_heads.pt"):
        torch.manual_seed(5)
        seg = models.build_segmenter(cfg, 14)
        assert models.load_pretrained_encoder(seg, str(tmp_path / name), cfg) == len(states["teacher"])
        got = models.segmenter_encoder(seg).state_dict()
        for k, v in states["teacher"].items():
            assert torch.equal(got[k], v), k
    assert "2 head tensors not used" in caplog.text
    # anything else beside the encoder is still refused by name
    weights["state_dict"]["module.decoder.weight"] = torch.zeros(1)
    torch.save(weights, tmp_path / "ssl_extra.pt")
    with pytest.raises(UserError, match=r"1 unexpected \(decoder.weight\)"):
        models.load_pretrained_encoder(models.build_segmenter(cfg, 14), str(tmp_path / "ssl_extra.pt"), cfg)
