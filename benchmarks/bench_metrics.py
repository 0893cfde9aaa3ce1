"""Benchmark: seconds per FLARE-size case (512 x 512 x 100) of the evaluation scores.

Makes phantom label volumes of FLARE size with make_phantoms.py, derives a prediction
from each (every organ eroded, dilated or shifted by a voxel or two, one dropped, as a
fine-tuned model's errors look), and times on one CPU thread:

* ``organ_scores``: the challenge-grade per-organ Dice and NSD of the official FLARE 2022
  evaluation (surfel areas, per-organ tolerances, slice range of aorta / IVC / esophagus),
  computed once per case at the end of a fine-tuning;
* ``dice_paper``: the per-slice Dice of the paper (:class:`metrics.PaperDice`), the score of
  every evaluation epoch, on the same case as 100 slices.

Prints a table and writes ``benchmarks/results/metrics.json`` (next to this script).

    .venv/bin/python benchmarks/bench_metrics.py                 # 3 cases, about 2 minutes on one core
    .venv/bin/python benchmarks/bench_metrics.py --quick         # one smaller case (seconds)
    .venv/bin/python benchmarks/bench_metrics.py --n_cases 5 --repeats 3
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, as the numbers are stated per core

# the imports below come after the thread variables above, which must be set before numpy / torch load
import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the project's modules, importable once ROOT is on sys.path (above)
import metrics  # noqa: E402
from make_phantoms import make_case  # noqa: E402
from utils import UserError, atomic_write_json, run_cli  # noqa: E402

logger = logging.getLogger(__name__)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "metrics.json"


def prediction_like(label: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction of ``label``: each organ eroded or dilated in plane by 1-2 voxels
    or shifted by up to 2 voxels, one organ dropped (seeded, so every run times the same)."""
    rng = np.random.default_rng(seed)
    in_plane = ndimage.generate_binary_structure(3, 1) * np.array([0, 1, 0], dtype=bool)[None, None, :]
    present = [int(i) for i in np.unique(label) if i > 0]
    dropped = int(rng.choice(present))
    pred = np.zeros_like(label)
    for organ in present:
        if organ == dropped:
            continue
        box = ndimage.find_objects((label == organ).astype(np.uint8))[0]
        box = tuple(slice(max(0, s.start - 4), min(n, s.stop + 4)) for s, n in zip(box, label.shape))
        m = label[box] == organ
        op = rng.integers(3)
        if op == 0:
            m = ndimage.binary_erosion(m, structure=in_plane, iterations=int(rng.integers(1, 3)))
        elif op == 1:
            m = ndimage.binary_dilation(m, structure=in_plane, iterations=int(rng.integers(1, 3)))
        else:
            m = np.roll(m, tuple(int(v) for v in rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
        pred[box][m] = organ
    return pred


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median CPU seconds (this thread) and median wall seconds of ``repeats`` calls; the last result."""
    cpu, wall = [], []
    out = None
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        out = fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall), out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time the challenge-grade organ scores (official FLARE 2022) and dice_paper per FLARE-size case.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("cases (phantoms, made in memory)")
    g.add_argument("--n_cases", type=int, default=3, help="phantom cases timed (one seed each)")
    g.add_argument("--size_xy", type=int, default=512, help="voxels along x and y (FLARE: 512)")
    g.add_argument("--n_slices", type=int, default=100, help="slices per case (FLARE: about 100 after resampling)")
    g.add_argument("--repeats", type=int, default=1, help="timings per case and score; the median is kept")
    g.add_argument("--seed", type=int, default=0, help="first phantom seed")
    g.add_argument("--quick", action="store_true", help="one 256 x 256 x 50 case: a smoke run, not the target size")
    g = parser.add_argument_group("output")
    g.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file with every figure")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.quick:
        args.n_cases, args.size_xy, args.n_slices, args.repeats = 1, 256, 50, 1
    for name in ("n_cases", "size_xy", "n_slices", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.output.suffix != ".json":
        raise UserError(f"--output {str(args.output)!r} must end in .json")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    cases = []
    for k in range(args.n_cases):
        seed = args.seed + k
        logger.info(
            "case %d/%d: making a %dx%dx%d phantom", k + 1, args.n_cases, args.size_xy, args.size_xy, args.n_slices
        )
        _, label, affine = make_case(seed, size_xy=args.size_xy, n_slices=args.n_slices)
        spacing = tuple(float(np.float32(v)) for v in np.diag(affine)[:3])
        pred = prediction_like(label, seed)
        cpu, wall, scores = _timed(lambda: metrics.organ_scores(pred, label, spacing), args.repeats)
        slices_p = torch.from_numpy(pred.astype(np.int64)).permute(2, 0, 1)
        slices_l = torch.from_numpy(label.astype(np.int64)).permute(2, 0, 1)
        p_cpu, p_wall, _ = _timed(lambda: metrics.paper_dice_per_item(slices_p, slices_l, 14), args.repeats)
        nsd = [s["nsd"] for s in scores.values()]  # type: ignore[union-attr]
        cases.append(
            {
                "seed": seed,
                "shape": list(label.shape),
                "spacing_mm": list(spacing),
                "organ_scores_cpu_s": cpu,
                "organ_scores_wall_s": wall,
                "dice_paper_cpu_s": p_cpu,
                "dice_paper_wall_s": p_wall,
                "organs_with_partial_nsd": int(sum(0.0 < v < 1.0 for v in nsd)),
                "nsd_mean": float(np.mean(nsd)),
            }
        )
    summary = {
        "organ_scores_s_per_case_median": statistics.median(c["organ_scores_cpu_s"] for c in cases),
        "organ_scores_s_per_case_max": max(c["organ_scores_cpu_s"] for c in cases),
        "dice_paper_s_per_case_median": statistics.median(c["dice_paper_cpu_s"] for c in cases),
    }
    result = {
        "summary": summary,
        "cases": cases,
        "settings": {
            "quick": args.quick,
            "n_cases": args.n_cases,
            "size_xy": args.size_xy,
            "n_slices": args.n_slices,
            "repeats": args.repeats,
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
    print(f"{'case':>6} {'shape':>14} | {'organ_scores s':>14} {'wall s':>7} | {'dice_paper s':>12} | partial NSD")
    for c in cases:
        print(
            f"{c['seed']:>6} {'x'.join(map(str, c['shape'])):>14} | {c['organ_scores_cpu_s']:14.2f} "
            f"{c['organ_scores_wall_s']:7.2f} | {c['dice_paper_cpu_s']:12.3f} | {c['organs_with_partial_nsd']}"
        )
    print(
        f"\norgan_scores (official FLARE 2022 DSC + NSD): median {summary['organ_scores_s_per_case_median']:.2f} s "
        f"per case (CPU, one thread); dice_paper: {summary['dice_paper_s_per_case_median']:.3f} s"
    )
    print(f"wrote {args.output} in {result['runtime_s']:.0f} s")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
