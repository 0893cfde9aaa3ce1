"""Smoke test of benchmarks/bench_train.py at toy sizes on the CPU: the code paths that
benchmarks/gpu_check.sh runs on a GPU (where every minute counts) must not break unnoticed,
and the levers that only move work between host and device must leave the losses unchanged."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_runs_end_to_end_and_levers_keep_the_loss(tmp_path):
    out = tmp_path / "train_cpu.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train.py"),
        "--device",
        "cpu",
        "--quick",
        "--no-three_d",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--workers",
        "0",
        "--batch_size",
        "4",
        "--crop_size",
        "32",
        "--out",
        str(out),
    ]
    p = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["complete"] is True and res["device"] == "cpu" and res["torch"]
    f, r = res["figures"], res["ratios"]
    for key in (
        "pretrain_2d_fp32_batch_augment_pairs_per_s",
        "pretrain_2d_fp32_monai_workers_pairs_per_s",
        "step_2d_fp32_batch_augment_pairs_per_s",
        "lever_2d_fp32_check_every_1_loop_pairs_per_s",
        "lever_2d_fp32_fused_step_pairs_per_s",
        "pipeline_2d_crops_only_cached_w0_pairs_per_s",
        "batch_augment_2d_views_per_s",
    ):
        assert f[key] > 0 and math.isfinite(f[key]), key
    assert f["flops_per_pair_paper_size"] > 7e9  # ~7.7 GFLOP per SimSiam pair at the paper's size
    assert set(f["eval_overhead"]) >= {"dice_monai_cpu_s_per_slice", "dice_counts_s_per_slice"}
    assert all(v > 0 for v in f["finetune_pipeline"].values())
    # reading the loss every step or every 20 changes nothing in fp32 on the CPU; fused by rounding only
    assert r["lever_2d_fp32_check_every_20_loop_loss_abs_diff"] == 0.0
    assert r["lever_2d_fp32_check_every_20_step_loss_abs_diff"] == 0.0
    assert r["lever_2d_fp32_fused_loop_loss_abs_diff"] < 1e-4
    assert sorted(q.name for q in tmp_path.iterdir()) == [
        "train_cpu.json"
    ]  # nothing else lands in the working directory
