"""Smoke test of benchmarks/bench_predict.py at a toy size on the CPU: the command a GPU machine
runs must not break unnoticed, and its result file must hold what the README quotes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_predict_runs_end_to_end(tmp_path):
    out = tmp_path / "predict_cpu.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_predict.py"),
        "--low_resource_mode",
        "--size_xy",
        "96",
        "--n_slices",
        "8",
        "--crop_size",
        "64",
        "--output",
        str(out),
    ]
    p = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["n_cases"] == 1 and res["device"] == "cpu" and res["case_shape"] == [96, 96, 8]
    stages = res["stage_seconds_per_case"]
    assert set(stages) == {"load_and_preprocess", "model", "inverse", "write"} and all(v > 0 for v in stages.values())
    assert 0 < sum(stages.values()) <= res["seconds_per_case"]
    assert res["windows_per_case0"] > 0 and res["model"]["embedding_size"] == 12
    assert "s per case" in p.stdout
    assert sorted(q.name for q in tmp_path.iterdir()) == ["predict_cpu.json"]  # nothing else in the working directory
