"""Benchmark: seconds per FLARE-size case for ``predict.py`` (2D model).

Writes synthetic CT of FLARE's size (512 x 512 x 100 voxels of 0.8 x 0.8 x 2.5 mm, int16 HU,
make_phantoms.py) into a temporary folder, saves a 2D Swin-UNETR of the paper's size (embed
48, crop 96, 14 classes, random weights: the speed does not depend on them) as a fine-tuned
checkpoint with the paper's preprocessing record, and times :func:`predict.predict_cases`
on the cases: reading + preprocessing, the model (sliding window, 96 x 96, overlap 0.25),
the inverse preprocessing, writing. Results: ``benchmarks/results/predict_<device>.json``.

    python benchmarks/bench_predict.py                              # CPU, 1 case (minutes on 2 cores)
    python benchmarks/bench_predict.py --low_resource_mode --n_slices 20   # a quick look
    python benchmarks/bench_predict.py --device cuda --use_amp --n_cases 4 --num_workers 4   # a GPU
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the project's modules and their dependencies, importable once ROOT is on sys.path (above)
import monai  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import finetune  # noqa: E402
import make_phantoms  # noqa: E402
import models  # noqa: E402
import predict  # noqa: E402
from transforms import preprocessing_record  # noqa: E402
from utils import UserError, atomic_write_json, run_cli  # noqa: E402

logger = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "bench_predict",
        description="Seconds per FLARE-size case for predict.py with a 2D model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data (synthetic, made fresh in a temporary folder)")
    g.add_argument("--n_cases", type=int, default=1, help="cases timed (each a different phantom)")
    g.add_argument("--size_xy", type=int, default=512, help="voxels along x and y (FLARE: 512)")
    g.add_argument("--n_slices", type=int, default=100, help="slices per case (FLARE: about 100)")
    g.add_argument("--spacing", default="0.8,0.8,2.5", help="voxel size x,y,z in mm")
    g = p.add_argument_group("model")
    g.add_argument(
        "--low_resource_mode",
        action="store_true",
        help="the tiny network of the tests (embed 12) instead of the paper's",
    )
    g.add_argument("--crop_size", type=int, default=96, help="sliding-window size (the paper's 96)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs")
    g.add_argument("--use_amp", action="store_true", help="autocast on CUDA")
    g.add_argument("--amp_dtype", default="bf16", choices=("fp16", "bf16"), help="autocast type with --use_amp")
    g.add_argument("--sw_batch_size", type=int, default=None, help="windows per forward pass (default predict.py's)")
    g.add_argument("--num_workers", type=int, default=0, help="predict.py --num_workers (loading in other processes)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--work_dir", default=None, help="folder for the cases (default: a temporary folder, removed)")
    g.add_argument("--output", default=None, help="JSON file (default benchmarks/results/predict_<device>.json)")
    return p


def _make_cases(folder: Path, n: int, size_xy: int, n_slices: int, spacing: tuple[float, float, float]) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"BENCH_{i:04d}_0000.nii.gz"
        if not path.exists():
            img, _, affine = make_phantoms.make_case(100 + i, size_xy=size_xy, n_slices=n_slices, spacing=spacing)
            nib.save(nib.Nifti1Image(img, affine), str(path))
        items.append(path)
    return items


def main(args: argparse.Namespace) -> dict[str, Any]:
    spacing = tuple(float(v) for v in args.spacing.split(","))
    if len(spacing) != 3:
        raise UserError(f"--spacing needs three numbers, got {args.spacing!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = predict.resolve_device(args.device)
    own_dir = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_predict_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        cases = _make_cases(work / "in", args.n_cases, args.size_xy, args.n_slices, spacing)
        logger.info(
            "%d phantom case(s) of %d x %d x %d in %.1f s",
            len(cases),
            args.size_xy,
            args.size_xy,
            args.n_slices,
            time.perf_counter() - t0,
        )
        cfg = models.encoder_config("swin", 2, 48, low_resource_mode=args.low_resource_mode, crop_size=args.crop_size)
        torch.manual_seed(0)
        model = models.build_segmenter(cfg, 14)
        rec = preprocessing_record(
            2, -500.0, 500.0, (1.0, 1.0, 2.5), 96, 8, "benchmarks/bench_predict.py (the paper's)"
        )
        ckpt = work / "model.pt"
        torch.save(
            finetune.finetuned_checkpoint(
                model, cfg, 14, {"crop_size": args.crop_size, "spatial_dims": 2}, 0, 0.0, rec
            ),
            ckpt,
        )
        predictor = predict.Predictor.from_checkpoint(
            str(ckpt), device, args.use_amp, args.amp_dtype, args.sw_batch_size
        )
        out_dir = work / "out"
        shutil.rmtree(out_dir, ignore_errors=True)
        items = predict.list_inputs(str(work / "in"), str(out_dir))
        pre_shape = list(predict.preprocess_scan(str(items[0].path), predictor.pipeline, -500.0)[0].shape[1:])
        if device.type == "cuda":  # warm-up (cuDNN autotuning, allocator) on one case, not timed
            predict.predict_cases(predictor, items[:1], overwrite=True, progress=False)
        res = predict.predict_cases(predictor, items, overwrite=True, num_workers=args.num_workers, progress=False)
        if res["failed"]:
            raise UserError(f"cases failed: {res['failed']}")
        n = res["n_written"]
        windows = finetune.windows_per_item(pre_shape[:2], args.crop_size, 0.25) * pre_shape[2]
        result = {
            "benchmark": "predict.py, 2D model, FLARE-size cases",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "case_shape": [args.size_xy, args.size_xy, args.n_slices],
            "case_spacing_mm": list(spacing),
            "preprocessed_shape_case0": pre_shape,
            "windows_per_case0": windows,
            "model": {
                "embedding_size": cfg["embedding_size"],
                "num_heads": cfg["num_heads"],
                "crop_size": args.crop_size,
                "n_classes": 14,
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            "n_cases": n,
            "seconds_per_case": res["seconds"] / n,
            "stage_seconds_per_case": {k: v / n for k, v in res["timing"].items()},
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "use_amp": bool(args.use_amp and device.type == "cuda"),
            "amp_dtype": args.amp_dtype if args.use_amp else None,
            "sw_batch_size": predictor.sw_batch_size,
            "num_workers": args.num_workers,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
            "machine": platform.platform(),
        }
        out = Path(args.output or ROOT / "benchmarks" / "results" / f"predict_{device.type}.json")
        atomic_write_json(out, result)
        print(
            f"{result['seconds_per_case']:.1f} s per case of {args.size_xy} x {args.size_xy} x {args.n_slices} "
            f"({windows} windows of {args.crop_size}^2) on {device}: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in result["stage_seconds_per_case"].items())
            + f" -> {out}"
        )
        return result
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
