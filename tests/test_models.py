"""Heads, losses and encoders of models.py against independent computations from the formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import engine
from models import (
    AllReduceBatchNorm1d,
    DINOHead,
    DINOLoss,
    SimSiam,
    SimSiamLoss,
    build_encoder,
    collapse_coefficient,
    convert_sync_batchnorm,
    encoder_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _neg_cos(p: np.ndarray, z: np.ndarray) -> float:
    num = (p * z).sum(1)
    den = np.sqrt((p * p).sum(1)) * np.sqrt((z * z).sum(1))
    return float(-(num / den).mean())


# ---------------------------------------------------------------------------------------
# SimSiam
# ---------------------------------------------------------------------------------------


def test_simsiam_loss_value_matches_formula():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(4))
    got = SimSiamLoss()(p1, p2, z1, z2).item()
    expected = 0.5 * (_neg_cos(p1.numpy(), z2.numpy()) + _neg_cos(p2.numpy(), z1.numpy()))
    assert got == pytest.approx(expected, abs=1e-12)
    # identical directions give the minimum, -1
    assert SimSiamLoss()(z2 * 3.0, z1 * 0.5, z1, z2).item() == pytest.approx(-1.0, abs=1e-12)


def test_simsiam_loss_stops_gradient_to_targets():
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 8, generator=g).requires_grad_(True) for _ in range(4))
    SimSiamLoss()(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert p2.grad is not None and p2.grad.abs().sum() > 0


def test_simsiam_model_detaches_targets_and_trains_encoder():
    cfg = encoder_config("swin", spatial_dims=2, embedding_size=12, low_resource_mode=True)
    model = SimSiam(build_encoder(cfg), dim=32, pred_dim=8)
    x1, x2 = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    p1, p2, z1, z2 = model(x1, x2)
    assert p1.shape == (3, 32) and z2.shape == (3, 32)
    assert not z1.requires_grad and not z2.requires_grad
    SimSiamLoss()(p1, p2, z1, z2).backward()
    enc_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert all(gr is not None for gr in enc_grads)
    # the projector's last BatchNorm has no affine parameters
    last_bn = model.projector.net[-1]
    assert isinstance(last_bn, nn.BatchNorm1d) and last_bn.weight is None


def _collapse_by_hand(p: np.ndarray) -> float:
    q = p / np.linalg.norm(p, axis=1, keepdims=True)
    s = q.std(axis=0, ddof=1).mean()
    return max(0.0, 1.0 - math.sqrt(p.shape[1]) * s)


def test_collapse_coefficient():
    rng = np.random.default_rng(0)
    row = rng.normal(size=(1, 64))
    same = np.repeat(row, 10, axis=0)
    assert float(collapse_coefficient(torch.from_numpy(same))) == pytest.approx(1.0, abs=1e-6)
    spread = rng.normal(size=(4000, 64))
    assert float(collapse_coefficient(torch.from_numpy(spread))) < 0.02
    # in between: a common direction plus a little noise, against the formula by hand
    mixed = same[:1] + 0.3 * rng.normal(size=(50, 64))
    got_t = collapse_coefficient(torch.from_numpy(mixed).requires_grad_(True))
    assert got_t.dim() == 0 and not got_t.requires_grad  # stays on the device, no graph
    got = float(got_t)
    assert got == pytest.approx(_collapse_by_hand(mixed), abs=1e-6)
    assert 0.1 < got < 0.99


# ---------------------------------------------------------------------------------------
# DINO
# ---------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def test_dino_loss_matches_hand_written_cross_entropy_and_center_ema():
    rng = np.random.default_rng(2)
    b, k = 5, 12
    student = rng.normal(size=(2 * b, k))
    teacher = rng.normal(size=(2 * b, k))
    center = rng.normal(size=(1, k)) * 0.1
    loss_fn = DINOLoss(
        k,
        n_epochs=10,
        student_temp=0.1,
        teacher_temp=0.04,
        warmup_teacher_temp=0.07,
        warmup_teacher_temp_epochs=3,
        center_momentum=0.9,
    )
    assert loss_fn.teacher_temp(0) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(1) == pytest.approx(0.055)
    assert loss_fn.teacher_temp(2) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(9) == pytest.approx(0.04)
    loss_fn.center.copy_(torch.from_numpy(center).float())
    epoch = 1
    got = loss_fn(torch.from_numpy(student).float(), torch.from_numpy(teacher).float(), epoch).item()

    tt = 0.055
    q = [_softmax((teacher[i * b : (i + 1) * b] - center) / tt) for i in range(2)]
    logp = [_log_softmax(student[i * b : (i + 1) * b] / 0.1) for i in range(2)]
    terms = [(-(q[t] * logp[s]).sum(axis=1)).mean() for t in range(2) for s in range(2) if s != t]
    assert got == pytest.approx(float(np.mean(terms)), rel=1e-5)

    expected_center = 0.9 * center + 0.1 * teacher.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(loss_fn.center.numpy(), expected_center, rtol=1e-5, atol=1e-6)


def test_dino_head_last_layer_norm_is_fixed_and_not_trained():
    head = DINOHead(in_dim=24, out_dim=16, hidden_dim=32, bottleneck_dim=8)
    par = head.last_layer.parametrizations.weight
    g = par.original0
    assert not g.requires_grad
    assert torch.all(g == 1.0)
    trainable = [p for grp in engine.param_groups(head) for p in grp["params"]]
    assert all(p is not g for p in trainable)
    opt = torch.optim.AdamW(engine.param_groups(head), lr=0.1)
    engine.apply_schedules(opt, 0.1, 0.04, 0.1)
    for _ in range(3):
        head(torch.randn(8, 24)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.all(g == 1.0)
    # the effective weight's rows keep unit norm, while the direction did change
    w = head.last_layer.weight
    np.testing.assert_allclose(w.norm(dim=1).detach().numpy(), np.ones(16), rtol=1e-5)
    assert par.original1.grad is None  # zero_grad(set_to_none) after the last step


# ---------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,dims,shape",
    [
        ("swin", 2, (2, 1, 32, 32)),
        ("swin", 3, (1, 1, 32, 32, 32)),
        ("unetr", 2, (2, 1, 32, 32)),
        ("unetr", 3, (1, 1, 32, 32, 32)),
    ],
)
def test_encoder_output_size(arch, dims, shape):
    cfg = encoder_config(arch, spatial_dims=dims, embedding_size=12, low_resource_mode=True, crop_size=32)
    enc = build_encoder(cfg)
    with torch.no_grad():
        out = enc(torch.rand(*shape))
    assert out.shape == (shape[0], 16 * 12) == (shape[0], enc.out_dim)
    assert torch.isfinite(out).all()


def test_paper_encoder_config():
    cfg = encoder_config("swin", spatial_dims=2, embedding_size=48)
    assert cfg["num_heads"] == [3, 6, 12, 24] and cfg["depths"] == [2, 2, 2, 2]
    assert cfg["window_size"] == 7 and cfg["patch_size"] == 2
    low = encoder_config("swin", spatial_dims=2, embedding_size=48, low_resource_mode=True)
    assert low["embedding_size"] == 12 and low["num_heads"] == [3, 3, 3, 3]


# ---------------------------------------------------------------------------------------
# Synchronised BatchNorm (the multi-process behaviour is tested in test_pretrain's DDP test)
# ---------------------------------------------------------------------------------------


def test_convert_sync_batchnorm_on_cpu_keeps_names_and_single_process_behaviour():
    torch.manual_seed(0)
    ref = SimSiam(build_encoder(encoder_config("swin", 2, 12, True)), dim=16, pred_dim=8)
    conv = SimSiam(build_encoder(encoder_config("swin", 2, 12, True)), dim=16, pred_dim=8)
    conv.load_state_dict(ref.state_dict())
    conv = convert_sync_batchnorm(conv, torch.device("cpu"))
    n_sync = sum(isinstance(m, AllReduceBatchNorm1d) for m in conv.modules())
    n_bn = sum(type(m) is nn.BatchNorm1d for m in ref.modules())
    assert n_sync == n_bn == 4
    assert set(conv.state_dict()) == set(ref.state_dict())
    x1, x2 = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)
    for a, b in zip(ref(x1, x2), conv(x1, x2)):
        assert torch.equal(a, b)
