"""Benchmark: preprocessing throughput with 1 worker vs N workers (``--num_workers``).

Generates synthetic CT with make_phantoms.py into a temporary folder, runs the
unlabelled 2D preprocessing (preprocess_flare_unlabelled.py, in-process) a few times
with ``--num_workers 1`` and with ``--num_workers N`` into fresh output folders, and
writes the medians, the speed-up and the machine to benchmarks/results/preprocess.json.
Target: at least 1.7x with 2 workers on a 2-core machine.

    python benchmarks/bench_preprocess.py                       # ~1-3 minutes on 2 cores
    python benchmarks/bench_preprocess.py --n_cases 4 --repeats 1 --size_xy 128   # a quick look
    python benchmarks/bench_preprocess.py --workers 4 --n_cases 16                # a bigger machine
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the project's modules, importable once ROOT is on sys.path (above)
import make_phantoms  # noqa: E402
import preprocess_flare_unlabelled as script  # noqa: E402
from utils import UserError, atomic_write_json, run_cli  # noqa: E402

logger = logging.getLogger(__name__)
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "preprocess.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "bench_preprocess",
        description="Time preprocess_flare_unlabelled.py with 1 vs N worker processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("data (synthetic, made fresh in a temporary folder)")
    g.add_argument(
        "--n_cases",
        type=int,
        default=8,
        help="unlabelled phantom cases; use a multiple of --workers so no worker idles at the end",
    )
    g.add_argument("--size_xy", type=int, default=256, help="phantom voxels along x and y (FLARE itself is 512)")
    g.add_argument(
        "--n_slices", type=int, default=60, help="phantom slices of a labelled case (unlabelled ones get 30%% more)"
    )
    g.add_argument("--seed", type=int, default=0, help="phantom seed")
    r = parser.add_argument_group("runs")
    r.add_argument("--workers", type=int, default=2, help="the --num_workers compared with 1 (set to the core count)")
    r.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    r.add_argument(
        "--work_dir",
        default=None,
        help="folder for phantoms and outputs (default: a new temporary folder, removed at the end)",
    )
    o = parser.add_argument_group("output")
    o.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON file for the results")
    return parser


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (pool workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def _time_run(data_dir: Path, out_dir: Path, workers: int) -> tuple[float, int, float]:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    args = script.get_args_parser().parse_args(
        ["--data_dir", str(data_dir), "--output_dir", str(out_dir), "--num_workers", str(workers)]
    )
    c0, t0 = _cpu_seconds(), time.perf_counter()
    summary = script.main(args)
    seconds = time.perf_counter() - t0
    return seconds, int(summary["n_slices"]), _cpu_seconds() - c0


def _spin(_: int) -> float:
    t0 = time.perf_counter()
    s = 0
    for i in range(3_000_000):
        s += i
    return time.perf_counter() - t0


def cpu_parallel_capacity(workers: int) -> float:
    """Speed-up of ``workers`` processes over one on a pure-Python CPU loop, measured now.

    About ``workers`` on an idle machine with that many cores; lower when other programs
    keep the cores busy. The preprocessing speed-up cannot exceed it, so it is recorded
    next to the result to tell a slow machine from slow code.
    """
    t0 = time.perf_counter()
    for i in range(workers):
        _spin(i)
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers) as pool:
        pool.map(_spin, range(workers), chunksize=1)
    return serial / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.n_cases < 1 or args.repeats < 1 or args.workers < 2:
        raise UserError("--n_cases and --repeats must be at least 1 and --workers at least 2")
    own_dir = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_")) if own_dir else Path(args.work_dir)
    try:
        t0 = time.perf_counter()
        made = make_phantoms.generate_dataset(
            work / "phantoms",
            n_labelled=2,
            n_train=1,
            n_unlabelled=args.n_cases,
            seed=args.seed,
            size_xy=args.size_xy,
            n_slices=args.n_slices,
        )
        logger.info("phantoms: %d cases in %.1f s", args.n_cases, time.perf_counter() - t0)
        data_dir = Path(made["unlabelled_dir"])
        # warm-up (untimed): the first run in a process pays for importing MONAI and its lazy modules
        warm = make_phantoms.generate_dataset(
            work / "warmup", n_labelled=2, n_train=1, n_unlabelled=1, size_xy=48, n_slices=8
        )
        _time_run(Path(warm["unlabelled_dir"]), work / "out_warmup", 1)
        capacity = [cpu_parallel_capacity(args.workers)]
        times: dict[int, list[float]] = {1: [], args.workers: []}
        cpu: dict[int, list[float]] = {1: [], args.workers: []}
        n_slices = 0
        for rep in range(args.repeats):
            for w in (1, args.workers):  # interleaved, so a load change on the machine hits both
                seconds, n_slices, cpu_s = _time_run(data_dir, work / f"out_{w}", w)
                times[w].append(seconds)
                cpu[w].append(cpu_s)
                logger.info("repeat %d, %d worker(s): %.2f s wall, %.2f s CPU", rep + 1, w, seconds, cpu_s)
        capacity.append(cpu_parallel_capacity(args.workers))
        med1 = statistics.median(times[1])
        medn = statistics.median(times[args.workers])
        speedup = med1 / medn
        try:
            load = list(os.getloadavg())
        except OSError:
            load = None
        result = {
            "benchmark": "preprocess_flare_unlabelled.py 2D, --num_workers 1 vs N",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv) if sys.argv else None,
            "data": {
                "n_cases": args.n_cases,
                "size_xy": args.size_xy,
                "n_slices_labelled": args.n_slices,
                "seed": args.seed,
                "n_output_slices": n_slices,
            },
            "workers": args.workers,
            "repeats": args.repeats,
            "seconds": {str(k): v for k, v in times.items()},
            "median_seconds": {"1": med1, str(args.workers): medn},
            # CPU seconds (all processes) per run: equal for 1 and N workers when the work splits
            # cleanly, so a missing speed-up then comes from busy cores, not from the code
            "cpu_seconds": {str(k): v for k, v in cpu.items()},
            "cases_per_second": {"1": args.n_cases / med1, str(args.workers): args.n_cases / medn},
            "slices_per_second": {"1": n_slices / med1, str(args.workers): n_slices / medn},
            "speedup": speedup,
            "target_speedup": 1.7 if args.workers == 2 else None,
            # speed-up of a pure CPU loop with the same number of processes, before and after:
            # what the machine could give at the time (other programs share the cores)
            "cpu_parallel_capacity": capacity,
            "speedup_over_capacity": speedup / statistics.mean(capacity),
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "load_average_at_end": load,
            },
        }
        atomic_write_json(args.output, result)
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'workers':>8} {'median s':>9} {'cases/s':>8} {'slices/s':>9}")
    for w in (1, args.workers):
        m = result["median_seconds"][str(w)]
        print(f"{w:>8} {m:>9.2f} {args.n_cases / m:>8.2f} {n_slices / m:>9.1f}")
    print(f"speed-up with {args.workers} workers: {speedup:.2f}x (results in {args.output})")
    print(
        f"CPU capacity for {args.workers} processes at the time (pure CPU loop, before / after): "
        f"{capacity[0]:.2f}x / {capacity[1]:.2f}x"
    )
    if speedup < 0.9 * min(capacity):
        logger.warning("the preprocessing scales worse than the machine allowed at the time")
    elif max(capacity) < 0.9 * args.workers:
        logger.warning("other programs kept the cores busy: rerun on a quiet machine for the real figure")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
