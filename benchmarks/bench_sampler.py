"""Benchmark of the exact IoU crop-pair sampler against the original trial-and-error sampler.

Both samplers are timed through the same code path, the ``iou_crops.IoUCrop`` transform
(``sampler="exact"``: this project's ``IoUCropSampler``; ``sampler="original"``: the
thesis' Algorithm 1, ``OriginalIoUSampler``: draw the first crop uniformly, try the second
up to r1 = 30 times inside the box that extends one crop size around the first when
min_iou > 0, redraw the first up to r2 = 4 times, then return whatever pair was drawn
last), drawing from the transform's own ``self.R`` as in a pipeline. Measures, on one CPU
core:

1. pairs per second and the fraction of pairs whose IoU lies outside the interval, on 2D
   300 x 250 and 512 x 512 slices with 96 x 96 crops and 3D 200 x 200 x 120 volumes with
   64^3 crops, for the intervals [0, 0], [0.0001, 0.3], [0.3, 0.6], [0.6, 1], [0, 1] and
   [0.45, 0.5];
2. the whole crop step on a 300 x 250 slice (sampling plus cutting both crops),
   ``IoUCropd`` (both samplers) against a pair of plain ``RandSpatialCropd`` crops, alone
   and inside a PNG loading pipeline (the paper measured +4 % load time for [0.3, 0.6]).

Prints a table and writes ``benchmarks/results/sampler.json`` (next to this script).

    .venv/bin/python benchmarks/bench_sampler.py            # full run, about 2-3 minutes
    .venv/bin/python benchmarks/bench_sampler.py --quick    # a short smoke run (seconds)
    .venv/bin/python benchmarks/bench_sampler.py --output /tmp/sampler.json --n_pairs_2d 10000
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, as the targets are stated per core

# the imports below come after the thread variables above, which must be set before numpy / torch load
import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropd, ScaleIntensityd  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the project's modules, importable once ROOT is on sys.path (above)
from iou_crops import IOU_SAMPLERS, IoUCrop, IoUCropd, crop_iou  # noqa: E402
from utils import UserError, atomic_write_json, run_cli  # noqa: E402

logger = logging.getLogger(__name__)

SHAPES = [((300, 250), 96), ((512, 512), 96), ((200, 200, 120), 64)]
INTERVALS = [(0.0, 0.0), (0.0001, 0.3), (0.3, 0.6), (0.6, 1.0), (0.0, 1.0), (0.45, 0.5)]
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "sampler.json"


def _time_pairs(draw, n_pairs: int, lo: float, hi: float, crop: int) -> dict:
    """Call ``draw()`` n_pairs times: CPU time per pair (this thread only, so other processes
    on a busy machine do not inflate it), wall-clock latency percentiles, and the fraction
    of pairs outside [lo, hi] (checked afterwards, outside the timed loop)."""
    pairs = [None] * n_pairs
    lat = np.empty(n_pairs, dtype=np.float64)
    clock = time.perf_counter_ns
    cpu0 = time.thread_time_ns()
    for i in range(n_pairs):
        t0 = clock()
        pairs[i] = draw()
        lat[i] = clock() - t0
    cpu_us = (time.thread_time_ns() - cpu0) / n_pairs / 1e3
    outside = sum(not (lo <= crop_iou(a, b, crop) <= hi) for a, b in pairs)  # type: ignore[misc]
    lat_us = lat / 1e3
    return {
        "us_per_pair": cpu_us,
        "pairs_per_s": 1e6 / cpu_us,
        "wall_median_us": float(np.median(lat_us)),
        "wall_p99_us": float(np.percentile(lat_us, 99)),
        "outside_fraction": outside / n_pairs,
        "n_pairs": n_pairs,
    }


def bench_samplers(n_2d: int, n_3d: int, seed: int) -> list[dict]:
    rows = []
    grid = [(shape, crop, lo, hi) for shape, crop in SHAPES for lo, hi in INTERVALS]
    for shape, crop, lo, hi in tqdm(grid, desc="sampler grid", file=sys.stderr):
        n = n_2d if len(shape) == 2 else n_3d
        img = np.zeros((1, *shape), dtype=np.float32)
        row: dict = {"shape": list(shape), "crop": crop, "min_iou": lo, "max_iou": hi}
        for kind in IOU_SAMPLERS:
            t = IoUCrop(crop, lo, hi, sampler=kind).set_random_state(seed)

            def draw(t=t):
                t(img)  # sample and cut both crops, as in a pipeline
                return t.start_a, t.start_b

            t0 = time.perf_counter()
            draw()  # the exact sampler builds its class table and shape plan here
            cold_ms = (time.perf_counter() - t0) * 1e3
            t.sampler.reset_stats()
            res = _time_pairs(draw, n, lo, hi, crop)
            res["cold_first_call_ms"] = cold_ms
            res.update({f"{k}_reported": v for k, v in t.stats.items() if k != "pairs"})
            row[kind] = res
        row["speedup"] = row["original"]["us_per_pair"] / row["exact"]["us_per_pair"]
        rows.append(row)
    return rows


def _make_png(folder: Path, shape: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 255).astype(np.uint8)
    path = folder / "slice.png"
    Image.fromarray(arr).save(path)
    return path


def bench_crop_step(n: int, rounds: int, seed: int) -> dict:
    """Crop step (and PNG loading pipeline) with IoUCropd vs a pair of RandSpatialCropd."""
    torch.set_num_threads(1)
    shape = (300, 250)

    class TwoRandomCrops:
        """Two independent RandSpatialCropd crops of the same image (plain random cropping)."""

        def __init__(self) -> None:
            self.crop = RandSpatialCropd(["image"], roi_size=(96, 96), random_size=False).set_random_state(seed)

        def __call__(self, d):
            d = dict(d)
            img = d.pop("image")
            d["image1"] = self.crop({"image": img})["image"]
            d["image2"] = self.crop({"image": img})["image"]
            return d

    variants = {
        "rand_spatial_cropd_x2": TwoRandomCrops(),
        "ioucropd_0.3_0.6": IoUCropd(
            ["image"], spatial_dims=2, crop_size=96, min_iou=0.3, max_iou=0.6
        ).set_random_state(seed),
        "ioucropd_original_0.3_0.6": IoUCropd(
            ["image"], spatial_dims=2, crop_size=96, min_iou=0.3, max_iou=0.6, sampler="original"
        ).set_random_state(seed),
        "ioucropd_0_1": IoUCropd(["image"], spatial_dims=2, crop_size=96, min_iou=0.0, max_iou=1.0).set_random_state(
            seed
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        png = _make_png(Path(tmp), shape)
        load = Compose(
            [LoadImaged(["image"], image_only=True), EnsureChannelFirstd(["image"]), ScaleIntensityd(["image"])]
        )
        base = load({"image": str(png)})
        times: dict[str, dict[str, list[float]]] = {k: {"crop_only_us": [], "load_and_crop_us": []} for k in variants}
        for _ in range(rounds):  # interleave the variants so that machine load hits them alike
            for name, t in variants.items():
                t(base)
                t0 = time.thread_time()
                for _ in range(n):
                    t({"image": base["image"]})
                times[name]["crop_only_us"].append((time.thread_time() - t0) / n * 1e6)
                t0 = time.thread_time()
                for _ in range(n):
                    t(load({"image": str(png)}))
                times[name]["load_and_crop_us"].append((time.thread_time() - t0) / n * 1e6)
    out: dict[str, dict] = {}
    for name, d in times.items():
        out[name] = {k: statistics.median(v) for k, v in d.items()}
    ref = out["rand_spatial_cropd_x2"]
    for name, d in out.items():
        d["crop_only_vs_random_pct"] = 100.0 * (d["crop_only_us"] / ref["crop_only_us"] - 1.0)
        d["load_and_crop_vs_random_pct"] = 100.0 * (d["load_and_crop_us"] / ref["load_and_crop_us"] - 1.0)
    return {"image_shape": list(shape), "crop": 96, "samples_per_round": n, "rounds": rounds, "variants": out}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the exact IoU crop-pair sampler against the original's Algorithm 1 (both via IoUCrop).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("size of the run")
    g.add_argument("--quick", action="store_true", help="a short smoke run (few pairs); numbers are noisy")
    g.add_argument("--n_pairs_2d", type=int, default=4000, help="pairs per 2D configuration and sampler")
    g.add_argument("--n_pairs_3d", type=int, default=1500, help="pairs per 3D configuration and sampler")
    g.add_argument("--n_crop_step", type=int, default=400, help="samples per round of the crop-step timing")
    g.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the crop-step timing (median taken)")
    g = parser.add_argument_group("output")
    g.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="JSON file with every figure (default: benchmarks/results/sampler.json next to this script)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random generators")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.quick:
        args.n_pairs_2d, args.n_pairs_3d, args.n_crop_step, args.rounds = 200, 60, 40, 2
    for name in ("n_pairs_2d", "n_pairs_3d", "n_crop_step", "rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.output.suffix != ".json":
        raise UserError(f"--output {str(args.output)!r} must end in .json")
    t_start = time.perf_counter()
    rows = bench_samplers(args.n_pairs_2d, args.n_pairs_3d, args.seed)
    logger.info("timing the crop step")
    crop_step = bench_crop_step(args.n_crop_step, args.rounds, args.seed)
    speedups = [r["speedup"] for r in rows]
    summary = {
        "exact_outside_total": int(sum(round(r["exact"]["outside_fraction"] * r["exact"]["n_pairs"]) for r in rows)),
        "original_outside_total": int(
            sum(round(r["original"]["outside_fraction"] * r["original"]["n_pairs"]) for r in rows)
        ),
        "median_speedup_vs_original": statistics.median(speedups),
        "worst_us_per_pair_2d": max(r["exact"]["us_per_pair"] for r in rows if len(r["shape"]) == 2),
        "worst_us_per_pair_3d": max(r["exact"]["us_per_pair"] for r in rows if len(r["shape"]) == 3),
        "worst_wall_median_us_2d": max(r["exact"]["wall_median_us"] for r in rows if len(r["shape"]) == 2),
        "worst_wall_median_us_3d": max(r["exact"]["wall_median_us"] for r in rows if len(r["shape"]) == 3),
    }
    result = {
        "summary": summary,
        "sampler_grid": rows,
        "crop_step": crop_step,
        "settings": {
            "quick": args.quick,
            "n_pairs_2d": args.n_pairs_2d,
            "n_pairs_3d": args.n_pairs_3d,
            "seed": args.seed,
            "threads": 1,
        },
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
            "platform": platform.platform(),
        },
        "runtime_s": time.perf_counter() - t_start,
    }
    atomic_write_json(args.output, result)

    print(
        f"\n{'shape':>14} {'crop':>4} {'interval':>15} | {'exact us/pair':>13} {'wall p50':>8} {'outside':>8} | "
        f"{'orig. us/pair':>13} {'outside':>8} | {'speedup':>7}"
    )
    for r in rows:
        o, a = r["exact"], r["original"]
        print(
            f"{'x'.join(map(str, r['shape'])):>14} {r['crop']:>4} {'[' + str(r['min_iou']) + ', ' + str(r['max_iou']) + ']':>15} | "
            f"{o['us_per_pair']:13.1f} {o['wall_median_us']:8.1f} {o['outside_fraction']:8.2%} | "
            f"{a['us_per_pair']:13.1f} {a['outside_fraction']:8.2%} | {r['speedup']:7.2f}"
        )
    print(
        f"\nmedian speedup over the original (Algorithm 1): {summary['median_speedup_vs_original']:.2f}x; "
        f"worst mean us/pair of the exact sampler 2D {summary['worst_us_per_pair_2d']:.1f}, "
        f"3D {summary['worst_us_per_pair_3d']:.1f}; pairs outside the interval: exact "
        f"{summary['exact_outside_total']}, original {summary['original_outside_total']}"
    )
    print(
        "(us/pair: CPU time of the sampling thread per pair, IoUCrop sampling and cutting; wall p50: median "
        "wall-clock latency of one call)"
    )
    print(
        f"\ncrop step on a {crop_step['image_shape'][0]}x{crop_step['image_shape'][1]} slice, 96x96 crops (CPU us per sample, median of rounds):"
    )
    for name, d in crop_step["variants"].items():
        print(
            f"  {name:>26}: crop only {d['crop_only_us']:7.1f} us ({d['crop_only_vs_random_pct']:+6.1f} %), "
            f"load PNG + crop {d['load_and_crop_us']:7.1f} us ({d['load_and_crop_vs_random_pct']:+6.1f} %)"
        )
    print(f"\nwrote {args.output} in {result['runtime_s']:.0f} s")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
