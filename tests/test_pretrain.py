"""Pretraining (main_simsiam.py, main_dino.py, pretrain.py, transforms.pretrain_transforms):
short runs in 2D and 3D on phantom slices, the pair audit, resume after SIGKILL, two-process
DDP against one process, and every bad input of the issue. Tiny sizes throughout."""

import argparse
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
import main_dino
import main_simsiam
import models
import utils
from conftest import free_port, write_unlabelled_phantoms
from data import encode_png_2d
from models import build_segmenter, load_pretrained_encoder
from pretrain import PairAudit, model_config
from transforms import pretrain_transforms
from utils import TrainingError, UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# A driver for torchrun: sets up torch.distributed once, then runs main() of one or more
# scripts in turn (main() uses the existing process group and leaves it in place). With
# SNAPSHOT=<src_dir>:<run>:<dst_dir>, rank 0 copies that run's files right after its first
# checkpoint, i.e. the state an interrupted run leaves behind, for a later --resume.
DRIVER = """
import json, os, shutil, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from utils import setup_logging
setup_logging(rank=int(os.environ.get("RANK", "0")))
import engine
info = engine.init_distributed("cpu")
snap = os.environ.get("SNAPSHOT")
if snap:
    src, run, dst = snap.split(":")
    original = engine.save_training_state
    def save_and_snapshot(path, state, info):
        original(path, state, info)
        if info.is_main and state["epoch"] == 1 and os.path.basename(path) == run + "_last.pt" and not os.path.exists(dst):
            os.makedirs(dst)
            for suffix in (".pt", "_last.pt", "_log.jsonl", "_args.json"):  # the log line comes after the state
                if os.path.exists(os.path.join(src, run + suffix)):
                    shutil.copy(os.path.join(src, run + suffix), os.path.join(dst, run + suffix))
    engine.save_training_state = save_and_snapshot
import importlib
for name, argv in json.load(open(sys.argv[1])):
    mod = importlib.import_module(name)
    mod.main(mod.get_args_parser().parse_args(argv))
"""


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(encode_png_2d(arr.astype(np.float32)))


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    """Two phantom CT cases (48 x 48 x 8) as PNG slices (16) and as NIfTI volumes (2),
    windowed to [0, 1] as the preprocessing does."""
    return write_unlabelled_phantoms(tmp_path_factory.mktemp("phantoms"), png_cases=(0, 1))


@pytest.fixture(scope="module")
def crop_sized_data(tmp_path_factory):
    """Four random 32 x 32 slices: with 32-pixel crops both crops are the whole image."""
    root = tmp_path_factory.mktemp("crop_sized")
    rng = np.random.default_rng(0)
    for i in range(4):
        _write_png(root / f"img_{i:04d}.png", rng.random((32, 32)))
    return root


def _argv(data_dir, chkpt_dir, *extra):
    return [
        "--data_dir",
        str(data_dir),
        "--chkpt_dir",
        str(chkpt_dir),
        "--low_resource_mode",
        "--crop_size",
        "32",
        "--no-progress",
        "--device",
        "cpu",
        *map(str, extra),
    ]


def _run(mod, data_dir, chkpt_dir, *extra):
    return mod.main(mod.get_args_parser().parse_args(_argv(data_dir, chkpt_dir, *extra)))


def _log(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a, b, where="state"):
    """Every tensor equal (torch.equal), everything else ==, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _torchrun(tmp_path, runs, nproc=2, env_extra=None, timeout=300):
    """Run DRIVER with ``nproc`` processes under torchrun (gloo on the CPU)."""
    drv = tmp_path / "driver.py"
    drv.write_text(DRIVER.format(root=str(ROOT)))
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([[m, [str(a) for a in argv]] for m, argv in runs]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env_extra or {})}
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(drv),
        str(spec),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s: {err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _train_then_sigkill(mod_name, argv, kill_at_step):
    """In a forked child: run main() and SIGKILL the process at the start of optimizer step
    number ``kill_at_step`` (1-based, counted over the run)."""
    torch.set_num_threads(1)
    calls = [0]
    original = engine.apply_schedules

    def counting(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)

    engine.apply_schedules = counting
    mod = importlib.import_module(mod_name)
    mod.main(mod.get_args_parser().parse_args(argv))


def _no_run_files(chkpt_dir: Path):
    if not chkpt_dir.exists():
        return True
    names = [p.name for p in chkpt_dir.iterdir()]
    return not any(n.endswith((".pt", ".jsonl", ".tmp")) for n in names)


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------


def test_pretrain_transforms_2d_3d_and_padding(phantom_data, tmp_path):
    png = sorted(phantom_data["2d"].glob("*.png"))[3]
    nii = sorted(phantom_data["3d"].glob("*.nii.gz"))[0]
    for dims, path, shape in ((2, png, (1, 32, 32)), (3, nii, (1, 32, 32, 32))):
        tf = pretrain_transforms(dims, 32, 0.3, 0.6)
        tf.set_random_state(5)
        out = tf({"image": str(path)})
        assert set(out) == {"image1", "image2", "iou_value", "iou_feasible"}
        for k in ("image1", "image2"):
            assert type(out[k]) is torch.Tensor and out[k].dtype == torch.float32 and tuple(out[k].shape) == shape
        assert 0.3 <= out["iou_value"] <= 0.6 and out["iou_feasible"] is True
        again = pretrain_transforms(dims, 32, 0.3, 0.6).set_random_state(5)({"image": str(path)})
        assert torch.equal(again["image1"], out["image1"]) and torch.equal(again["image2"], out["image2"])

    # an image smaller than the crop is padded; one as large as the crop gives only IoU 1
    small = tmp_path / "small.png"
    _write_png(small, np.full((20, 24), 0.5))
    out = pretrain_transforms(2, 32, 0.0, 1.0, augment=False)({"image": str(small)})
    assert tuple(out["image1"].shape) == (1, 32, 32) and out["iou_value"] == 1.0
    assert torch.equal(out["image1"], out["image2"])
    assert out["image1"].sum().item() == pytest.approx(0.5 * 20 * 24, abs=1.0)  # zero padding
    # with augmentation, the two views of the very same crop differ: independent chains
    views_differ = []
    for seed in range(4):
        o = pretrain_transforms(2, 32, 1.0, 1.0).set_random_state(seed)({"image": str(png)})
        views_differ.append(not torch.equal(o["image1"], o["image2"]))
    assert any(views_differ)


def test_pair_audit_counts():
    audit = PairAudit(0.05, 0.999)
    audit.update(
        {
            "iou_value": torch.tensor([0.0, 0.05, 0.1, 0.999, 1.0], dtype=torch.float64),
            "iou_feasible": torch.tensor([True, True, False, True, False]),
        }
    )
    audit.update({"iou_value": torch.tensor([0.45], dtype=torch.float64), "iou_feasible": torch.tensor([True])})
    s = audit.summary(engine.DistInfo())
    assert s["audit_pairs"] == 6
    assert s["audit_iou_hist"] == [2, 1, 0, 0, 1, 0, 0, 0, 0, 2]
    assert s["audit_infeasible_frac"] == pytest.approx(2 / 6)
    assert s["audit_outside_frac"] == pytest.approx(2 / 6)  # 0.0 and 1.0 (the ends 0.05 and 0.999 are inside)
    assert s["audit_iou_mean"] == pytest.approx((0.05 + 0.1 + 0.999 + 1.0 + 0.45) / 6)


def test_pair_audit_in_a_run_with_infeasible_images(tmp_path):
    """4 images the size of the crop (only IoU 1 possible) and 4 larger ones, interval [0.3, 0.6]."""
    data = tmp_path / "mixed"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        _write_png(data / f"a_small_{i}.png", rng.random((32, 32)))
        _write_png(data / f"b_large_{i}.png", rng.random((64, 48)))
    res = _run(
        main_simsiam,
        data,
        tmp_path / "runs",
        "--min_iou",
        0.3,
        "--max_iou",
        0.6,
        "--batch_size",
        4,
        "--n_epochs",
        1,
        "--run_name",
        "audit",
    )
    rec = res["final"]
    assert res["images_infeasible_frac"] == 0.5
    assert rec["audit_pairs"] == 8 and sum(rec["audit_iou_hist"]) == 8
    assert rec["audit_infeasible_frac"] == 0.5 and rec["audit_outside_frac"] == 0.5
    assert rec["audit_iou_hist"][9] == 4  # the closest pair of a crop-sized image: the same crop twice
    assert sum(rec["audit_iou_hist"][3:7]) == 4  # the others inside [0.3, 0.6]
    assert (4 + 4 * 0.3) / 8 - 1e-9 <= rec["audit_iou_mean"] <= (4 + 4 * 0.6) / 8 + 1e-9
    with pytest.raises(UserError, match=r"--strict_iou: 4 of 8 images.*32x32"):
        _run(main_simsiam, data, tmp_path / "runs2", "--min_iou", 0.3, "--max_iou", 0.6, "--strict_iou")
    assert _no_run_files(tmp_path / "runs2")


def test_original_sampler_run_logs_its_pairs_outside_the_interval(tmp_path):
    """--iou_sampler original (Algorithm 1) on 64 x 40 slices with 32-pixel crops and IoU [0, 0]:
    every image admits such pairs (starts 32 apart along x), which the exact sampler always
    draws and the trial-and-error one mostly misses (then it keeps its last, overlapping pair)."""
    data = tmp_path / "wide"
    data.mkdir()
    rng = np.random.default_rng(2)
    for i in range(8):
        _write_png(data / f"s_{i}.png", rng.random((64, 40)))
    args = ("--min_iou", 0, "--max_iou", 0, "--batch_size", 4, "--n_epochs", 1, "--no_augment")
    exact = _run(main_simsiam, data, tmp_path / "runs", *args)
    original = _run(main_simsiam, data, tmp_path / "runs", *args, "--iou_sampler", "original")
    assert exact["run_name"] == "simsiam_2d_iou_0_0" and original["run_name"] == "simsiam_2d_iou_0_0_original"
    e, o = exact["final"], original["final"]
    assert e["audit_pairs"] == o["audit_pairs"] == 8
    assert e["audit_outside_frac"] == 0.0 and e["audit_iou_hist"][0] == 8
    assert o["audit_outside_frac"] > 0.25 and o["audit_infeasible_frac"] == e["audit_infeasible_frac"] == 0.0
    args_json = json.loads(Path(original["args"]).read_text())
    assert args_json["iou_sampler"] == "original"


# ---------------------------------------------------------------------------------------
# Short runs
# ---------------------------------------------------------------------------------------


def test_simsiam_2d_run_writes_the_run_files(phantom_data, tmp_path):
    out = tmp_path / "runs"
    res = _run(
        main_simsiam,
        phantom_data["2d"],
        out,
        "--min_iou",
        0.3,
        "--max_iou",
        0.6,
        "--batch_size",
        4,
        "--n_epochs",
        2,
        "--max_images",
        8,
        "--use_wandb",
    )
    name = "simsiam_2d_iou_0.3_0.6"
    assert res["run_name"] == name and res["epochs_done"] == 2
    assert json.loads((out / f"{name}_files" / "result.json").read_text()) == json.loads(json.dumps(res))
    log = _log(out / f"{name}_log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    for r in log:
        assert np.isfinite(r["loss"]) and 0.0 <= r["collapse"] <= 1.0 and r["wd"] == 1e-5
        assert r["audit_pairs"] == 8 and sum(r["audit_iou_hist"]) == 8 and r["audit_infeasible_frac"] == 0.0
        assert 0.3 <= r["audit_iou_mean"] <= 0.6 and r["pairs_per_s"] > 0
    assert log[0]["lr"] > log[1]["lr"] >= 1e-6  # cosine decay per iteration
    assert res["final"] == log[-1]
    assert any((out / "wandb").glob("offline-run-*")), "wandb offline run folder missing"

    ckpt = _load(out / f"{name}.pt")
    assert ckpt["method"] == "simsiam" and ckpt["epoch"] == 2 and ckpt["model_config"]["embedding_size"] == 12
    assert ckpt["args"]["min_iou"] == 0.3
    last = _load(out / f"{name}_last.pt")
    assert last["epoch"] == 2 and set(last["method_state"]) == {"model", "optimizer"}
    # the weights load strictly into the fine-tuning model
    seg = build_segmenter(ckpt["model_config"], 14)
    assert load_pretrained_encoder(seg, str(out / f"{name}.pt"), ckpt["model_config"]) == len(ckpt["encoder"])
    # predictor at a fixed lr, the others on the schedule
    groups = last["method_state"]["optimizer"]["param_groups"]
    assert {g["lr"] for g in groups if g["fixed_lr"]} == {0.025}
    assert all(g["lr"] < 0.025 for g in groups if not g["fixed_lr"])
    assert all(g["weight_decay"] == (1e-5 if g["apply_wd"] else 0.0) for g in groups)


def test_dino_2d_run(phantom_data, tmp_path):
    out = tmp_path / "runs"
    res = _run(
        main_dino,
        phantom_data["2d"],
        out,
        "--batch_size",
        4,
        "--n_epochs",
        2,
        "--warmup_epochs",
        1,
        "--max_images",
        8,
        "--run_name",
        "dino",
    )
    log = _log(out / "dino_log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2] and res["final"] == log[-1]
    for r in log:
        assert np.isfinite(r["loss"]) and r["teacher_temp"] == pytest.approx(0.04)
        assert 0.9995 <= r["teacher_momentum"] <= 1.0 and 0.04 <= r["wd"] <= 0.4
    assert log[1]["wd"] > log[0]["wd"]  # weight decay rises on its cosine schedule
    ckpt = _load(out / "dino.pt")
    assert ckpt["method"] == "dino" and set(ckpt["student_encoder"]) == set(ckpt["encoder"])
    assert any(not torch.equal(ckpt["encoder"][k], ckpt["student_encoder"][k]) for k in ckpt["encoder"])
    last = _load(out / "dino_last.pt")
    assert set(last["method_state"]) == {"student", "teacher", "optimizer", "loss"}
    assert last["method_state"]["loss"]["center"].abs().sum() > 0  # the centre moved
    cfg = ckpt["model_config"]
    for key in ("teacher", "student"):
        assert load_pretrained_encoder(build_segmenter(cfg, 14), str(out / "dino.pt"), cfg, checkpoint_key=key) > 0


# SimSiam's BatchNorm needs 2 images per batch; DINO trains on one (its two views make 2)
@pytest.mark.parametrize("mod,batch", [(main_simsiam, 2), (main_dino, 1)], ids=["simsiam", "dino"])
def test_3d_run(mod, batch, phantom_data, tmp_path):
    res = _run(
        mod,
        phantom_data["3d"],
        tmp_path / "runs",
        "--spatial_dims",
        3,
        "--batch_size",
        batch,
        "--n_epochs",
        1,
        "--min_iou",
        0.3,
        "--max_iou",
        0.6,
        "--warmup_epochs",
        0,
        "--max_images",
        batch,
    )
    rec = res["final"]
    assert np.isfinite(rec["loss"]) and rec["audit_pairs"] == batch and 0.3 <= rec["audit_iou_mean"] <= 0.6
    ckpt = _load(res["weights"])
    assert ckpt["model_config"]["spatial_dims"] == 3
    assert ckpt["encoder"]["patch_embed.proj.weight"].dim() == 5  # Conv3d patch embedding


def test_unetr_encoder_pretrains_and_loads_into_unetr(phantom_data, tmp_path):
    res = _run(
        main_simsiam,
        phantom_data["2d"],
        tmp_path / "runs",
        "--arch",
        "unetr",
        "--batch_size",
        4,
        "--n_epochs",
        1,
        "--max_images",
        4,
    )
    ckpt = _load(res["weights"])
    cfg = ckpt["model_config"]
    assert cfg["arch"] == "unetr" and cfg["img_size"] == 32
    assert load_pretrained_encoder(build_segmenter(cfg, 14), res["weights"], cfg) == len(ckpt["encoder"])


def _method(mod, cls, *extra, iters=20):
    args = mod.get_args_parser().parse_args(_argv("x", "y", "--drop_path_rate", 0, "--n_epochs", 1, *extra))
    cls.adjust_args(args)
    engine.fix_random_seeds(0)
    return cls(args, model_config(args), engine.DistInfo(), iters)


@pytest.mark.parametrize(
    "mod,cls,extra",
    [
        (main_simsiam, main_simsiam.SimSiamMethod, ["--base_lr", 0.05]),
        # a fixed teacher and centre: the student fits fixed targets
        (
            main_dino,
            main_dino.DINOMethod,
            [
                "--base_lr",
                1e-3,
                "--warmup_epochs",
                0,
                "--freeze_last_layer",
                0,
                "--momentum_teacher",
                1,
                "--center_momentum",
                1,
            ],
        ),
    ],
    ids=["simsiam", "dino"],
)
def test_loss_decreases_on_a_fixed_batch(mod, cls, extra):
    n = 12
    m = _method(mod, cls, *extra, iters=n)
    g = torch.Generator().manual_seed(0)
    batch = {"image1": torch.rand(4, 1, 32, 32, generator=g), "image2": torch.rand(4, 1, 32, 32, generator=g)}
    losses = []

    def loss_fn(b):
        loss, logs = m.loss_fn(b, 0)
        losses.append(loss.item())
        return loss, logs

    engine.train_one_epoch(
        m.train_module,
        [batch] * n,
        m.optimizer,
        loss_fn,
        epoch=0,
        n_epochs=1,
        iters_per_epoch=n,
        lr_schedule=m.lr_schedule,
        base_lr=m.base_lr,
        wd_schedule=m.wd_schedule,
        amp=engine.Amp(torch.device("cpu"), False),
        clip_grad=m.clip_grad,
        clip_mode=m.clip_mode,
        before_optimizer_step=m.before_optimizer_step,
        after_optimizer_step=m.after_optimizer_step,
        progress=False,
    )
    assert len(losses) == n
    assert losses[-1] < losses[0] - 0.2
    assert losses[-1] < min(losses[:3])


def test_dino_freezes_last_layer_and_updates_teacher_by_ema():
    m = _method(main_dino, main_dino.DINOMethod, "--freeze_last_layer", 1, "--warmup_epochs", 0, iters=2)
    x = {"image1": torch.rand(2, 1, 32, 32), "image2": torch.rand(2, 1, 32, 32)}
    last = list(m.student.head.last_layer.parameters())
    trainable_last = [p for p in last if p.requires_grad]
    assert len(trainable_last) == 1  # the direction v; the norm g is fixed
    for it, frozen in ((1, True), (2, False)):  # iteration 1 is in epoch 0, iteration 2 in epoch 1
        m.optimizer.zero_grad()
        m.loss_fn(x, 0)[0].backward()
        m.before_optimizer_step(it)
        assert (trainable_last[0].grad is None) == frozen
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1)
    before = [p.detach().clone() for p in m.teacher.parameters()]
    m.after_optimizer_step(0)
    mom = float(m.momentum_schedule[0])
    for pt, pb, ps in zip(m.teacher.parameters(), before, m.student.parameters()):
        torch.testing.assert_close(pt, mom * pb + (1 - mom) * ps, rtol=1e-6, atol=1e-7)


def test_clip_gradients_modes():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    model = torch.nn.ParameterList([a, b])
    for mode in ("per_param", "global"):
        a.grad = torch.tensor([6.0, 8.0])  # norm 10
        b.grad = torch.tensor([0.6, 0.8])  # norm 1
        engine.clip_gradients(model, 3.0, mode)
        if mode == "per_param":
            assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5) and b.grad.norm().item() == pytest.approx(1.0)
        else:
            total = (a.grad.norm() ** 2 + b.grad.norm() ** 2).sqrt().item()
            assert total == pytest.approx(3.0, rel=1e-5) and a.grad.norm() / b.grad.norm() == pytest.approx(10.0)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(phantom_data, tmp_path, monkeypatch):
    calls = [0]
    real = models.SimSiamLoss.forward

    def sometimes_nan(self, *a):
        calls[0] += 1
        loss = real(self, *a)
        return loss * float("nan") if calls[0] == 3 else loss  # first step of epoch 2

    monkeypatch.setattr(models.SimSiamLoss, "forward", sometimes_nan)
    out = tmp_path / "runs"
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2"):
        _run(
            main_simsiam,
            phantom_data["2d"],
            out,
            "--batch_size",
            4,
            "--n_epochs",
            3,
            "--max_images",
            8,
            "--run_name",
            "nan",
        )
    assert _load(out / "nan.pt")["epoch"] == 1 and _load(out / "nan_last.pt")["epoch"] == 1
    assert [r["epoch"] for r in _log(out / "nan_log.jsonl")] == [1]
    assert not (out / "nan_files" / "result.json").exists()


# ---------------------------------------------------------------------------------------
# Resume after SIGKILL: identical weights
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mod_name,num_workers", [("main_dino", 0), ("main_simsiam", 2)])
def test_resume_after_sigkill_mid_epoch_gives_identical_weights(mod_name, num_workers, phantom_data, tmp_path):
    mod = importlib.import_module(mod_name)
    extra = [
        "--max_images",
        12,
        "--batch_size",
        4,
        "--n_epochs",
        2,
        "--num_workers",
        num_workers,
        "--min_iou",
        0.3,
        "--max_iou",
        0.6,
        "--warmup_epochs",
        1,
        "--run_name",
        "r",
    ]
    full = _run(mod, phantom_data["2d"], tmp_path / "full", *extra)

    cut = tmp_path / "cut"
    # 3 steps per epoch: the 5th step is the middle of epoch 2
    child = multiprocessing.get_context("fork").Process(
        target=_train_then_sigkill, args=(mod_name, _argv(phantom_data["2d"], cut, *extra), 5)
    )
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert [r["epoch"] for r in _log(cut / "r_log.jsonl")] == [1]
    assert _load(cut / "r_last.pt")["epoch"] == 1
    resumed = _run(mod, phantom_data["2d"], cut, *extra, "--resume")

    assert resumed["epochs_done"] == full["epochs_done"] == 2
    _assert_same(_load(full["weights"])["encoder"], _load(resumed["weights"])["encoder"], "encoder")
    a, b = _load(full["last"]), _load(resumed["last"])
    _assert_same(a["method_state"], b["method_state"], "method_state")
    for ra, rb in zip(_log(full["log"]), _log(resumed["log"])):
        for k in ("epoch_time_s", "pairs_per_s"):
            ra.pop(k), rb.pop(k)
        assert ra == rb


# ---------------------------------------------------------------------------------------
# Two processes (torchrun, gloo) against one
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_and_resume(crop_sized_data, tmp_path):
    # crop-sized images and no augmentation: the global batch of 4 is the same images in
    # any process layout, so the losses and weights must agree with a batch of 4 in one process
    common = ["--n_epochs", 2, "--no_augment", "--drop_path_rate", 0, "--num_workers", 0]
    simsiam = ["--run_name", "s", *common]
    dino = ["--run_name", "d", "--warmup_epochs", 0, "--base_lr", 1e-3, *common]
    ddp, snap = tmp_path / "ddp", tmp_path / "snapshot"
    done = _torchrun(
        tmp_path,
        [
            ["main_simsiam", _argv(crop_sized_data, ddp, *simsiam, "--batch_size", 2)],
            # resume from the files the run had after its first epoch, as after a kill
            ["main_simsiam", _argv(crop_sized_data, snap, *simsiam, "--batch_size", 2, "--resume")],
            ["main_dino", _argv(crop_sized_data, ddp, *dino, "--batch_size", 2)],
        ],
        env_extra={"SNAPSHOT": f"{ddp}:s:{snap}"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stderr

    one = tmp_path / "one"
    _run(main_simsiam, crop_sized_data, one, *simsiam, "--batch_size", 4)
    _run(main_dino, crop_sized_data, one, *dino, "--batch_size", 4)
    for folder, run in ((ddp, "s"), (snap, "s"), (ddp, "d")):
        log_ddp, log_one = _log(folder / f"{run}_log.jsonl"), _log(one / f"{run}_log.jsonl")
        assert [r["epoch"] for r in log_ddp] == [1, 2]
        for rd, r1 in zip(log_ddp, log_one):
            assert rd["audit_pairs"] == r1["audit_pairs"] == 4  # gathered over both ranks
            assert rd["loss"] == pytest.approx(r1["loss"], rel=1e-4, abs=2e-5)
        assert log_ddp[1]["loss"] != log_ddp[0]["loss"]  # it trained
        wd, w1 = _load(folder / f"{run}.pt")["encoder"], _load(one / f"{run}.pt")["encoder"]
        assert _load(folder / f"{run}.pt")["epoch"] == 2
        for k in w1:
            torch.testing.assert_close(wd[k], w1[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{run} {k}: {m}")
    # the resumed two-process run ends exactly where the uninterrupted one does
    _assert_same(_load(ddp / "s_last.pt")["method_state"], _load(snap / "s_last.pt")["method_state"])
    assert _load(snap / "s_last.pt")["world_size"] == 2


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def _bad(mod, tmp_path, data_dir, *extra, match):
    out = tmp_path / "bad_runs"
    with pytest.raises(UserError, match=match):
        _run(mod, data_dir, out, *extra)
    assert _no_run_files(out), sorted(p.name for p in out.iterdir())


def test_bad_flags_and_data(phantom_data, crop_sized_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = main_simsiam.get_args_parser().parse_args(["--chkpt_dir", str(tmp_path / "bad_runs")])
    with pytest.raises(UserError, match="--data_dir is required"):
        main_simsiam.main(args)
    _bad(main_simsiam, tmp_path, tmp_path / "missing", match="missing")
    _bad(main_dino, tmp_path, empty, match="empty|no")
    _bad(main_simsiam, tmp_path, phantom_data["2d"], "--min_iou", 0.7, "--max_iou", 0.6, match="larger than --max_iou")
    _bad(main_simsiam, tmp_path, phantom_data["2d"], "--max_iou", 1.5, match=r"--max_iou must lie in \[0, 1\]")
    _bad(main_dino, tmp_path, phantom_data["2d"], "--min_iou", -0.1, match=r"--min_iou must lie in \[0, 1\]")
    _bad(
        main_simsiam,
        tmp_path,
        crop_sized_data,
        "--min_iou",
        0.3,
        "--max_iou",
        0.6,
        match=r"no image admits .*IoU in \[0.3, 0.6\].*32x32 \(4\)",
    )
    _bad(main_simsiam, tmp_path, phantom_data["2d"], "--spatial_dims", 3, match="--spatial_dims")
    _bad(main_dino, tmp_path, phantom_data["3d"], "--spatial_dims", 2, match="--spatial_dims")
    _bad(main_simsiam, tmp_path, phantom_data["2d"], "--crop_size", 48, match="multiple of 32")
    _bad(main_simsiam, tmp_path, phantom_data["2d"], "--batch_size", 4, "--max_images", 3, match="too few")


def _corrupt_data(phantom_data, tmp_path) -> tuple[Path, Path]:
    data = tmp_path / "corrupt"
    data.mkdir()
    files = sorted(phantom_data["2d"].glob("*.png"))[:8]
    for f in files:
        shutil.copy(f, data / f.name)
    bad = data / (files[3].stem + "_x.png")  # sorts into the middle
    blob = files[3].read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])  # a valid header, truncated data
    return data, bad


def test_corrupt_png_in_the_middle_is_named(phantom_data, tmp_path):
    data, bad = _corrupt_data(phantom_data, tmp_path)
    _bad(main_simsiam, tmp_path, data, "--batch_size", 3, "--n_epochs", 1, match=f"cannot read PNG {bad}")


def test_cli_exit_code_2_with_one_line_for_a_corrupt_png_read_by_workers(phantom_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(utils, "setup_logging", lambda **kw: None)  # leave pytest's logging alone
    data, bad = _corrupt_data(phantom_data, tmp_path)
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        utils.run_cli(
            main_simsiam.main, main_simsiam.get_args_parser(), _argv(data, out, "--batch_size", 3, "--num_workers", 2)
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in errors[0], err[-2000:]
    assert _no_run_files(out)


@pytest.mark.slow
def test_bad_resume(phantom_data, tmp_path):
    out = tmp_path / "runs"
    base = ["--batch_size", 4, "--n_epochs", 1, "--max_images", 4, "--run_name", "r"]
    _run(main_simsiam, phantom_data["2d"], out, *base)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())

    with pytest.raises(UserError, match="already exists"):
        _run(main_simsiam, phantom_data["2d"], out, *base)
    with pytest.raises(UserError, match=r"min_iou: 0\.0 -> 0\.2.*drop_path_rate: 0\.1 -> 0\.2|drop_path_rate.*min_iou"):
        _run(main_simsiam, phantom_data["2d"], out, *base, "--min_iou", 0.2, "--drop_path_rate", 0.2, "--resume")
    with pytest.raises(UserError, match=r"iou_sampler: 'exact' -> 'original'"):
        _run(main_simsiam, phantom_data["2d"], out, *base, "--iou_sampler", "original", "--resume")
    with pytest.raises(UserError, match="is a 'simsiam' run"):
        _run(main_dino, phantom_data["2d"], out, *base, "--warmup_epochs", 0, "--resume", out / "r_last.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        _run(main_simsiam, phantom_data["2d"], out, *base, "--resume", text)
    pickled = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(UserError, match="weights_only=True"):
        _run(main_simsiam, phantom_data["2d"], out, *base, "--resume", pickled)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(UserError, match="not a training state"):
        _run(main_simsiam, phantom_data["2d"], out, *base, "--resume", foreign)
    with pytest.raises(UserError, match="does not exist"):
        _run(main_simsiam, phantom_data["2d"], tmp_path / "other", *base, "--resume", tmp_path / "other" / "r_last.pt")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before  # nothing touched
