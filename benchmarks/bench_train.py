"""Training speed: SimSiam pretraining steps with and without the batched view augmentations,
the data pipeline alone against the training step alone, and (on CUDA) the targets of
issue 7: pairs per second at the paper's size, precision variants, model FLOP utilisation,
3D pairs per second, and the time of a fine-tuning at the paper's settings.

Every figure is measured in steady state: the first ``--warmup`` batches of a loop are not
counted (worker start-up, cuDNN autotuning, allocator growth). Data are phantoms
(make_phantoms.py + preprocess_flare_unlabelled.py / preprocess_flare_labelled.py) written
into a temporary folder that is removed at the end.

On the CPU (small sizes, for the ratios between variants; under 2 minutes with --quick)::

    python benchmarks/bench_train.py --device cpu --quick
    python benchmarks/bench_train.py --device cpu --workers 0 1 2 --steps 40

On one GPU (the issue's targets; benchmarks/gpu_check.sh runs this within 8 minutes)::

    python benchmarks/bench_train.py --device cuda --workers 16
    python benchmarks/bench_train.py --device cuda --peak_tflops 312 --no-finetune   # an A100

Sections (CPU / CUDA):

* ``pretrain_2d``: pairs/s of the whole loop (data loading included) with MONAI's per-sample
  augmentations in the workers, and with ``--batch_augment`` (workers stop after the IoU
  crops, the views are augmented on the device); on CUDA for fp32, fp16 and bf16 autocast;
* ``lever_2d``: the speed levers of issue 7 stacked one on the other (``--batch_augment``, bf16 on
  CUDA): ``check_every_1`` (the loss read on the host at every step, a GPU sync), ``check_every_20``
  (the scripts' default), ``fused`` (``--fused_optimizer``) and, on CUDA, ``fused_compile``
  (``--compile``, inductor); each as the step alone and as the whole loop, with the mean loss on
  the same seed and data (a lever must not change it beyond rounding);
* ``pipeline_2d``: pairs/s of the data loader alone (decode + IoU crops [+ augmentations]),
  per number of workers, with and without ``--cache_images``;
* ``step_2d``: pairs/s of the training step alone on a batch already on the device, with the
  model FLOPs of one step (``torch.utils.flop_counter``) and, on CUDA, the model FLOP
  utilisation against ``--peak_tflops``;
* ``flops_per_pair``: FLOPs of a SimSiam pair at the paper's size (embed 48, 96 x 96);
* ``pretrain_3d`` (CUDA; CPU with small sizes): the training step and the pipeline for 3D crops;
* ``finetune_pipeline``: slices/s of the 2D fine-tuning loader alone (512 x 512, 2 crops each) with
  the MONAI augmentations, with ``--batch_augment`` (load and crop only) and with ``--cache_images``;
* ``eval_overhead``: an evaluation's cost beside the model per 512 x 512 slice: reading the PNGs
  (saved by ``--cache_eval`` after the first evaluation), ``dice_paper`` by MONAI's one-hot
  DiceMetric on the CPU (the former path) and from class counts on the device (the current);
* ``finetune`` (CUDA): seconds per training epoch and per evaluation (5 epochs, the last 3 evaluated) at the paper's settings
  on phantoms the size of FLARE's labelled split, and the estimate for 225 epochs with the
  paper's evaluation schedule (144 evaluations).

Results: ``benchmarks/results/train_<cpu|cuda>.json`` (``--out`` to change), with the device
name, torch version and every figure; a summary table is printed at the end. The file is
rewritten after each measurement with ``"complete": false`` until the end, so a run cut short
by a time limit keeps what it measured. On CUDA the order is: bf16 loop and step, the levers
without compilation, the pipeline, 3D, the evaluation overhead, fine-tuning, ``--compile``,
then fp16 and fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.data import Dataset  # noqa: E402
from monai.metrics import DiceMetric  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# the project's modules, importable once ROOT is on sys.path (above)
import data  # noqa: E402
import engine  # noqa: E402
import finetune  # noqa: E402
import main_finetune  # noqa: E402
import main_simsiam  # noqa: E402
import make_phantoms  # noqa: E402
import metrics  # noqa: E402
import preprocess_flare_labelled  # noqa: E402
import preprocess_flare_unlabelled  # noqa: E402
import pretrain  # noqa: E402
from batch_augment import BatchViewAugment  # noqa: E402
from data import SliceCache  # noqa: E402
from pretrain import augment_views  # noqa: E402
from utils import UserError, atomic_write_json, run_cli  # noqa: E402

logger = logging.getLogger(__name__)

RESULTS_DIR = ROOT / "benchmarks" / "results"
H100_H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM
PAPER_PAIRS_PER_S = 443.0  # 100 epochs x 237,449 slices in 14.9 h on one V100
PRETRAIN_SLICES = 237_449  # FLARE 2022's unlabelled pretraining slices (one epoch)
FLARE_TRAIN_SLICES, FLARE_VAL_SLICES = 1515, 3535  # 5,050 labelled slices, 15 / 35 cases
EVALS_IN_225_EPOCHS = sum(1 for e in range(1, 226) if e % 10 == 0 or e >= 90)  # 144


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "bench_train",
        description="Pretraining and fine-tuning speed (issue 7).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("where")
    g.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="cpu: small sizes, for ratios between variants; cuda: the issue's targets. auto: cuda when available.",
    )
    g.add_argument(
        "--out", default=None, help="Result JSON (default: benchmarks/results/train_<device type>.json in the project)."
    )
    g.add_argument(
        "--work_dir",
        default=None,
        help="Folder for the phantom data (kept afterwards); default: a temporary folder, removed at the end.",
    )
    g = p.add_argument_group("sizes (defaults depend on the device; change them to study one setting)")
    g.add_argument("--quick", action="store_true", help="CPU: fewer steps and workers, under 2 minutes in all.")
    g.add_argument(
        "--steps", type=int, default=None, help="Counted steps per measurement (CPU 30, CUDA 60; --quick: 12)."
    )
    g.add_argument(
        "--warmup", type=int, default=None, help="Steps not counted at the start of each loop (CPU 3, CUDA 10)."
    )
    g.add_argument("--batch_size", type=int, default=None, help="Pairs per 2D step (CPU 16, CUDA 128: the paper).")
    g.add_argument("--crop_size", type=int, default=None, help="2D crop side (CPU 64, CUDA 96: the paper).")
    g.add_argument(
        "--embedding_size",
        type=int,
        default=None,
        help="Swin embedding size (CPU 12 with small heads, CUDA 48: the paper).",
    )
    g.add_argument(
        "--batch_size_3d", type=int, default=None, help="Pairs per 3D step (CPU 2 with 32^3 crops, CUDA 8 with 96^3)."
    )
    g.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="Data-loader worker counts for the pipeline-alone measurement; the largest is used in the "
        "whole loop (CPU: 0 1 2, --quick 1; CUDA: 16).",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the main process (CPU default 1, so workers get the other cores).",
    )
    g = p.add_argument_group("what")
    g.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help=f"Peak dense TFLOP/s of the GPU for the FLOP utilisation; default {H100_H200_BF16_TFLOPS:g} "
        f"(bf16, H100/H200) when the GPU's name says H100 or H200, otherwise no utilisation is reported.",
    )
    g.add_argument(
        "--finetune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Time fine-tuning epochs (default: on CUDA only; on the CPU it takes minutes).",
    )
    g.add_argument(
        "--ft_cases",
        type=int,
        default=20,
        help="Labelled phantom cases for fine-tuning (30 %% train; 512 x 512 x 80 each on CUDA, as FLARE's "
        "slices; 96 x 96 on the CPU); the estimate is scaled "
        "to FLARE's 1,515 / 3,535 slices. 50 = the size of FLARE's labelled split, slower to measure "
        "(the final evaluation's NSD runs on the CPU).",
    )
    g.add_argument(
        "--three_d", action=argparse.BooleanOptionalAction, default=True, help="Measure the 3D step and pipeline."
    )
    g.add_argument(
        "--two_d",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Measure the 2D loop, step and pipeline (--no-two_d with --finetune: fine-tuning alone).",
    )
    g.add_argument(
        "--compile_lever",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Also measure --compile (inductor) among the levers (default: on CUDA only; on the CPU "
        "compilation alone takes several minutes).",
    )
    g.add_argument("--seed", type=int, default=0, help="Seed of the phantoms and of the runs.")
    return p


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def make_pretrain_data(work: Path, spatial_dims: int, n_cases: int, size_xy: int, n_slices: int, workers: int) -> Path:
    """Unlabelled phantoms, preprocessed to 2D PNG slices or 3D volumes; returns the folder."""
    raw = work / f"raw_u{spatial_dims}d"
    out = work / f"pre_{spatial_dims}d"
    if not out.exists():
        make_phantoms.main(
            make_phantoms.get_args_parser().parse_args(
                [
                    "--output_dir",
                    str(raw),
                    "--n_labelled",
                    "0",
                    "--n_unlabelled",
                    str(n_cases),
                    "--size_xy",
                    str(size_xy),
                    "--n_slices",
                    str(n_slices),
                    "--num_workers",
                    str(max(1, workers)),
                ]
            )
        )
        argv = ["--data_dir", str(raw / "unlabelled"), "--output_dir", str(out), "--num_workers", str(max(1, workers))]
        if spatial_dims == 3:
            argv += ["--spatial_dims", "3"]
        preprocess_flare_unlabelled.main(preprocess_flare_unlabelled.get_args_parser().parse_args(argv))
    return out


def make_labelled_data(work: Path, n_cases: int, size_xy: int, workers: int) -> tuple[Path, Path]:
    """Labelled phantoms (30 % train) preprocessed to 2D slices; returns (data folder, split file)."""
    raw = work / "raw_l"
    out = work / "pre_l2d"
    split = raw / "split.json"
    if not out.exists():
        make_phantoms.main(
            make_phantoms.get_args_parser().parse_args(
                [
                    "--output_dir",
                    str(raw),
                    "--n_labelled",
                    str(n_cases),
                    "--n_train",
                    str(max(1, round(0.3 * n_cases))),
                    "--n_unlabelled",
                    "0",
                    "--size_xy",
                    str(size_xy),
                    "--n_slices",
                    "80",
                    "--num_workers",
                    str(max(1, workers)),
                ]
            )
        )
        preprocess_flare_labelled.main(
            preprocess_flare_labelled.get_args_parser().parse_args(
                [
                    "--data_dir",
                    str(raw / "labelled"),
                    "--output_dir",
                    str(out),
                    "--split_path",
                    str(split),
                    "--num_workers",
                    str(max(1, workers)),
                ]
            )
        )
    return out, split


# ---------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stamped:
    """Wraps an iterable of batches and notes the time at which each batch is handed out."""

    def __init__(self, items: Iterable, n: int):
        self.items, self.n, self.times = items, n, []

    def __iter__(self) -> Iterator:
        for i, b in enumerate(self.items):
            if i >= self.n:
                break
            self.times.append(time.perf_counter())
            yield b


def _rate(stamps: Stamped, t_end: float, warmup: int, batch: int) -> float:
    """Pairs per second from the hand-out of batch ``warmup`` to ``t_end``."""
    counted = len(stamps.times) - warmup
    if counted < 1:
        raise UserError(f"--steps must exceed --warmup (got {len(stamps.times)} batches, warm-up {warmup})")
    return counted * batch / (t_end - stamps.times[warmup])


class Repeat:
    """The same batch ``n`` times (the training step alone, no data loading)."""

    def __init__(self, batch: Any, n: int):
        self.batch, self.n = batch, n

    def __iter__(self) -> Iterator:
        for _ in range(self.n):
            yield self.batch


# ---------------------------------------------------------------------------------------
# Pretraining measurements
# ---------------------------------------------------------------------------------------


def pretrain_args(
    data_dir: Path,
    spatial_dims: int,
    crop: int,
    batch: int,
    embed: int,
    small: bool,
    *,
    batch_augment: bool = False,
    cache: bool = False,
    amp: str | None = None,
    workers: int = 0,
    seed: int = 0,
    check_every: int = 20,
    fused: bool = False,
    compile: bool = False,
) -> argparse.Namespace:
    """The flags of main_simsiam.py for one measurement (batch size not capped by low-resource mode)."""
    argv = [
        "--data_dir",
        str(data_dir),
        "--spatial_dims",
        str(spatial_dims),
        "--crop_size",
        str(crop),
        "--batch_size",
        str(batch),
        "--embedding_size",
        str(embed),
        "--n_epochs",
        "1",
        "--min_iou",
        "0.3",
        "--max_iou",
        "0.6",
        "--no-progress",
        "--num_workers",
        str(workers),
        "--seed",
        str(seed),
    ]
    if small:
        argv.append("--low_resource_mode")
    if batch_augment:
        argv.append("--batch_augment")
    if cache:
        argv.append("--cache_images")
    if amp:
        argv += ["--use_amp", "--amp_dtype", amp]
    argv += ["--check_every", str(check_every)]
    if fused:
        argv.append("--fused_optimizer")
    if compile:
        argv.append("--compile")
    args = main_simsiam.get_args_parser().parse_args(argv)
    main_simsiam.SimSiamMethod.adjust_args(args)  # small heads with --low_resource_mode
    return args


def _dataset(args: argparse.Namespace, info, n_items: int):
    """The run's data set, its items repeated until it holds ``n_items``."""
    ds, _ = pretrain.build_dataset(args, info)
    items = list(ds.data)
    reps = -(-n_items // len(items))
    return Dataset(items * reps, transform=ds.transform)


def _method(args: argparse.Namespace, info, steps: int):
    engine.fix_random_seeds(args.seed)
    method = main_simsiam.SimSiamMethod(args, pretrain.model_config(args), info, steps)
    method.compile()
    amp = engine.Amp(info.device, args.use_amp, args.amp_dtype)
    return method, amp


def _train(method, amp, batches: Iterable, args, info, steps: int, aug) -> dict[str, float]:
    """``steps`` optimizer steps through engine.train_one_epoch, exactly as pretrain.py runs
    them; returns its averages (the mean loss, to compare variants on the same seed)."""

    def loss_fn(batch):
        return method.loss_fn(augment_views(batch, aug, info.device), 0)

    return engine.train_one_epoch(
        method.train_module,
        batches,
        method.optimizer,
        loss_fn,
        epoch=0,
        n_epochs=1,
        iters_per_epoch=steps,
        lr_schedule=method.lr_schedule,
        base_lr=method.base_lr,
        wd_schedule=method.wd_schedule,
        amp=amp,
        info=info,
        progress=False,
        check_every=args.check_every,
    )


def measure_loop(args: argparse.Namespace, info, steps: int, warmup: int) -> dict[str, float]:
    """The whole pretraining loop, data loading included: ``pairs_per_s`` in steady state,
    ``mean_loss`` over all steps (same seed: comparable between variants within noise) and
    ``first_batch_s``, the loader's start-up (from ``iter()`` to the first batch: what
    persistent workers would save once per epoch)."""
    n = steps + warmup
    ds = _dataset(args, info, n * args.batch_size)
    method, amp = _method(args, info, n)
    loader = engine.build_loader(
        ds, args.batch_size, args.num_workers, args.seed, 0, info, pin_memory=info.device.type == "cuda"
    )
    stamps = Stamped(loader, n)
    t_start = time.perf_counter()
    stats = _train(method, amp, stamps, args, info, n, pretrain.make_batch_augment(args, 0, info))
    _sync(info.device)
    return {
        "pairs_per_s": _rate(stamps, time.perf_counter(), warmup, args.batch_size),
        "mean_loss": stats["loss"],
        "first_batch_s": stamps.times[0] - t_start,
    }


def measure_pipeline(args: argparse.Namespace, info, batches: int, warmup: int) -> float:
    """Pairs/s of the data loader alone (decode, IoU crops and, unless --batch_augment, the views)."""
    n = batches + warmup
    ds = _dataset(args, info, n * args.batch_size)
    loader = engine.build_loader(ds, args.batch_size, args.num_workers, args.seed, 0, info)
    stamps = Stamped(loader, n)
    for _ in stamps:
        pass
    return _rate(stamps, time.perf_counter(), warmup, args.batch_size)


def measure_step(
    args: argparse.Namespace, info, steps: int, warmup: int, peak_tflops: float | None, flops: int | None = None
) -> dict[str, Any]:
    """Pairs/s of the training step alone (one batch already on the device), FLOPs of a step
    (counted unless given: pass them for a compiled model), the model FLOP utilisation when a
    peak is known, the mean loss, and ``warmup_s`` (the uncounted first steps: compilation)."""
    n = steps + warmup
    ds = _dataset(args, info, args.batch_size)
    batch = next(iter(engine.build_loader(ds, args.batch_size, 0, args.seed, 0, info)))
    batch = {k: (v.to(info.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    method, amp = _method(args, info, n)
    aug = pretrain.make_batch_augment(args, 0, info)
    if flops is None:
        flops = step_flops(method, amp, batch, info, aug)
    stamps = Stamped(Repeat(batch, n), n)
    stats = _train(method, amp, stamps, args, info, n, aug)
    _sync(info.device)
    rate = _rate(stamps, time.perf_counter(), warmup, args.batch_size)
    out: dict[str, Any] = {
        "pairs_per_s": rate,
        "mean_loss": stats["loss"],
        "warmup_s": stamps.times[warmup] - stamps.times[0],
        "flops_per_step": flops,
        "flops_per_pair": flops / args.batch_size,
        "achieved_tflops": flops * rate / args.batch_size / 1e12,
    }
    if peak_tflops:
        out["mfu"] = out["achieved_tflops"] / peak_tflops
    return out


def step_flops(method, amp, batch: dict[str, Any], info, aug) -> int:
    """Model FLOPs of one forward and backward pass (torch.utils.flop_counter; matmuls and
    convolutions, 2 per multiply-add), augmentations excluded."""
    views = augment_views(batch, aug, info.device)
    method.train_module.train()
    with FlopCounterMode(display=False) as fc:
        with amp.autocast():
            loss, _ = method.loss_fn(views, 0)
        loss.backward()
    method.optimizer.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def paper_flops_per_pair() -> int:
    """FLOPs (forward and backward) of one SimSiam pair at the paper's size: embed 48, 96 x 96,
    heads of 2048 (counted on the CPU with a batch of 2, divided by 2)."""
    args = main_simsiam.get_args_parser().parse_args(["--data_dir", "-", "--batch_size", "2", "--n_epochs", "1"])
    info = engine.DistInfo(device=torch.device("cpu"))
    method, amp = _method(args, info, 1)
    x = torch.rand(2, 1, 96, 96)
    return step_flops(method, amp, {"image1": x, "image2": x.clone()}, info, None) // 2


def measure_batch_augment(spatial_dims: int, batch: int, size: int, device: torch.device, iters: int) -> float:
    """Views per second of batch_augment.BatchViewAugment alone."""
    gen = torch.Generator(device=device).manual_seed(0)
    aug = BatchViewAugment(spatial_dims, gen)
    x = torch.rand(batch, 1, *([size] * spatial_dims), device=device)
    aug(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        aug(x)
    _sync(device)
    return iters * batch / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------


def measure_finetune_pipeline(work: Path, workers: int, batches: int, n_slices: int = 12) -> dict[str, float]:
    """Slices per second of the 2D fine-tuning loader alone (512 x 512 slices, 2 crops of 96
    each, batch 4): with the MONAI augmentations in the workers, with ``--batch_augment``
    (load + crop only), and with ``--cache_images`` as well."""
    items, _, _ = synthetic_labelled_slices(work, n_slices)
    info = engine.DistInfo()
    out = {}
    for name, augment, cached in (
        ("monai_augment", True, False),
        ("crops_only", False, False),
        ("crops_only_cached", False, True),
    ):
        cache = SliceCache([p for it in items for p in (it["image"], it["label"])], progress=False) if cached else None
        ds = finetune.train_dataset_2d(items * -(-(batches + 2) * 4 // n_slices), 96, 2, augment=augment, cache=cache)
        loader = engine.build_loader(ds, 4, workers, 0, 0, info)
        stamps = Stamped(loader, batches + 2)
        for _ in stamps:
            pass
        out[f"{name}_w{workers}_slices_per_s"] = _rate(stamps, time.perf_counter(), 2, 4)
    return out


def synthetic_labelled_slices(
    work: Path, n_slices: int = 12, size: int = 512
) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
    """``n_slices`` labelled slices of ``size``^2 with 14 classes (a block per organ) written as
    PNG pairs; returns (items {"image", "label"}, labels [Z, X, Y], a prediction with 5 % noise)."""
    rng = np.random.default_rng(0)
    folder = work / f"labelled_slices_{size}"
    folder.mkdir(exist_ok=True)
    label = np.zeros((n_slices, size, size), dtype=np.int64)
    for c in range(1, 14):  # a block per organ, shifted per slice
        x0, y0 = rng.integers(0, size - 60 - n_slices, size=2)
        for z in range(n_slices):
            label[z, x0 + z : x0 + z + 60, y0 : y0 + 60] = c
    pred = np.where(rng.random(label.shape) < 0.95, label, rng.integers(0, 14, size=label.shape))
    items = []
    for z in range(n_slices):
        img = np.clip(rng.normal(0.4, 0.1, size=(size, size)).cumsum(1) / size, 0, 1).astype(np.float32)
        (folder / f"i{z}.png").write_bytes(data.encode_png_2d(img))
        (folder / f"l{z}.png").write_bytes(data.encode_png_2d(label[z].astype(np.uint8), is_label=True))
        items.append({"image": str(folder / f"i{z}.png"), "label": str(folder / f"l{z}.png")})
    return items, label, pred


def measure_eval_overhead(work: Path, device: torch.device, n_slices: int = 12, size: int = 512) -> dict[str, float]:
    """What an evaluation costs beside the model, per 512 x 512 slice with 14 classes:
    reading the image and label PNGs (what --cache_eval saves after the first evaluation),
    ``dice_paper`` with MONAI's DiceMetric on one-hot tensors on the CPU (the former path),
    and ``metrics.paper_dice_per_item`` from class counts on ``device`` (the current one)."""
    items, label, pred = synthetic_labelled_slices(work, n_slices, size)
    t0 = time.perf_counter()
    for it in items:
        data.read_image_2d(it["image"])
        data.read_label_2d(it["label"])
    read_s = (time.perf_counter() - t0) / n_slices
    pt, lt = torch.from_numpy(pred), torch.from_numpy(label)
    t0 = time.perf_counter()

    def oh(t):
        return torch.nn.functional.one_hot(t, 14).movedim(-1, 1).float()

    for z in range(0, n_slices, 4):
        DiceMetric(include_background=True, reduction="none", ignore_empty=True)(oh(pt[z : z + 4]), oh(lt[z : z + 4]))
    monai_s = (time.perf_counter() - t0) / n_slices
    pd, ld = pt.to(torch.uint8).to(device), lt.to(torch.uint8).to(device)
    metrics.paper_dice_per_item(pd, ld, 14)
    _sync(device)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        metrics.paper_dice_per_item(pd, ld, 14).tolist()
    counts_s = (time.perf_counter() - t0) / (reps * n_slices)
    return {
        "read_png_s_per_slice": read_s,
        "dice_monai_cpu_s_per_slice": monai_s,
        "dice_counts_s_per_slice": counts_s,
        "per_eval_flare_val_old_s": FLARE_VAL_SLICES * (read_s + monai_s),
        "per_eval_flare_val_new_s": FLARE_VAL_SLICES * counts_s,
    }


def measure_finetune(
    data_dir: Path, split: Path, work: Path, workers: int, seed: int, small: bool = False
) -> dict[str, Any]:
    """Three epochs of main_finetune.py at the paper's settings (embed 48, batch 32 x 2 crops;
    bf16, --batch_augment, --cache_images, --fused_optimizer, the default --sw_batch_size and
    --cache_eval; ``small``: low-resource model, 64-pixel crops, batch 2, for a CPU dry run), five
    epochs, the last three evaluated. The second epoch's time is the training epoch (the first
    carries start-up costs); the third's minus it the first evaluation (reading the cases), the
    fourth's a routine one (cases in memory), the fifth's the final full one. Scaled to FLARE's
    1,515 train / 3,535 val slices with the paper's 144 evaluations."""
    split_d = json.loads(split.read_text())
    imgs = sorted((data_dir / "imgs").glob("*.png"))
    n_train = sum(1 for p in imgs if any(p.name.startswith(c + "_") for c in split_d["train"]))
    n_val = sum(1 for p in imgs if any(p.name.startswith(c + "_") for c in split_d["val"]))
    size = (
        ["--low_resource_mode", "--crop_size", "64", "--batch_size", "2"]
        if small
        else ["--embedding_size", "48", "--batch_size", "32"]
    )
    argv = [
        "--data_dir",
        str(data_dir),
        "--split_path",
        str(split),
        *size,
        "--n_epochs",
        "5",
        "--eval_every_from",
        "3",
        "--warmup_epochs",
        "1",
        "--num_workers",
        str(workers),
        "--use_amp",
        "--amp_dtype",
        "bf16",
        "--batch_augment",
        "--cache_images",
        "--fused_optimizer",
        "--chkpt_dir",
        str(work / "ft_runs"),
        "--run_name",
        "bench",
        "--no-progress",
        "--ignore_user_warning",
        "--n_vis",
        "0",
        "--seed",
        str(seed),
    ]
    res = main_finetune.main(main_finetune.get_args_parser().parse_args(argv))
    with open(res["log"]) as fh:
        log = [json.loads(ln) for ln in fh if ln.strip()]
    t_train = float(log[1]["time_s"])
    t_eval_first = max(0.0, float(log[2]["time_s"]) - t_train)  # reads the cases (then cached)
    t_eval = max(0.0, float(log[3]["time_s"]) - t_train)  # a routine evaluation, cases in memory
    t_eval_full = max(0.0, float(log[4]["time_s"]) - t_train)  # the last: per-organ Dice and NSD too
    scale_val = FLARE_VAL_SLICES / n_val
    est = (
        225 * t_train * FLARE_TRAIN_SLICES / n_train
        + ((EVALS_IN_225_EPOCHS - 2) * t_eval + t_eval_first + t_eval_full) * scale_val
    )
    return {
        "train_slices": n_train,
        "val_slices": n_val,
        "first_epoch_s": float(log[0]["time_s"]),
        "epoch_train_s": t_train,
        "eval_first_s": t_eval_first,
        "eval_s": t_eval,
        "eval_full_s": t_eval_full,
        "estimate_225_epochs_min_flare_size": est / 60.0,
    }


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _defaults(args: argparse.Namespace, cuda: bool) -> None:
    quick = args.quick and not cuda
    fill = {
        "steps": 60 if cuda else (12 if quick else 30),
        "warmup": 10 if cuda else 3,
        "batch_size": 128 if cuda else 16,
        "crop_size": 96 if cuda else 64,
        "embedding_size": 48 if cuda else 12,
        "batch_size_3d": 8 if cuda else 2,
        "workers": [min(16, os.cpu_count() or 1)] if cuda else ([1] if quick else [0, 1, 2]),
        "threads": None if cuda else 1,
        "finetune": cuda,
        "compile_lever": cuda,
    }
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 2 or args.batch_size_3d < 2:
        raise UserError("--steps and --warmup must be at least 1 and the batch sizes at least 2 (BatchNorm)")
    if min(args.workers) < 0:
        raise UserError(f"--workers must be non-negative, got {args.workers}")


def main(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    _defaults(args, cuda)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    info = engine.DistInfo(device=device)
    name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    peak = args.peak_tflops
    if peak is None and cuda and ("H100" in name or "H200" in name):
        peak = H100_H200_BF16_TFLOPS
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out_path = Path(args.out) if args.out else RESULTS_DIR / f"train_{device.type}.json"

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "peak_tflops": peak,
        "settings": {},
        "figures": {},
    }
    fig = res["figures"]
    W = max(args.workers)
    try:
        t0 = time.perf_counter()
        dir2d = None if not args.two_d else make_pretrain_data(work, 2, 24 if cuda else 2, 256, 80 if cuda else 24, W)
        small = not cuda
        common = dict(
            spatial_dims=2,
            crop=args.crop_size,
            batch=args.batch_size,
            embed=args.embedding_size,
            small=small,
            seed=args.seed,
        )
        res["settings"]["2d"] = {
            "crop": args.crop_size,
            "batch": args.batch_size,
            "embed": args.embedding_size,
            "low_resource_heads": small,
            "steps": args.steps,
            "warmup": args.warmup,
            "workers_in_loop": W,
            "workers_pipeline": args.workers,
        }
        logger.info("data ready in %.0f s", time.perf_counter() - t0)

        def save_partial() -> None:  # a run cut short by a time limit keeps what it measured
            atomic_write_json(out_path, {**res, "complete": False})

        def loop(key: str, a: argparse.Namespace, steps: int, warmup: int) -> None:
            r = measure_loop(a, info, steps, warmup)
            fig[f"{key}_pairs_per_s"] = r["pairs_per_s"]
            fig[f"{key}_mean_loss"] = r["mean_loss"]
            fig[f"{key}_first_batch_s"] = r["first_batch_s"]
            logger.info("%s: %.1f pairs/s", key, r["pairs_per_s"])
            save_partial()

        def step(key: str, a: argparse.Namespace, steps: int, warmup: int, flops: int | None = None) -> dict[str, Any]:
            st = measure_step(a, info, steps, warmup, peak, flops)
            for k, v in st.items():
                if flops is None or not k.startswith("flops_"):  # given FLOPs are already in the table
                    fig[f"{key}_{k}"] = v
            logger.info("%s (step alone): %.1f pairs/s", key, st["pairs_per_s"])
            save_partial()
            return st

        def precision_2d(prec: str | None) -> None:
            tag = prec or "fp32"
            for ba in (False, True):
                a = pretrain_args(dir2d, **common, batch_augment=ba, amp=prec, workers=W)
                loop(f"pretrain_2d_{tag}_{'batch_augment' if ba else 'monai_workers'}", a, args.steps, args.warmup)
            step(
                f"step_2d_{tag}_batch_augment",
                pretrain_args(dir2d, **common, batch_augment=True, amp=prec, workers=W),
                args.steps,
                args.warmup,
            )
            a = pretrain_args(dir2d, **common, batch_augment=False, amp=prec, workers=0)
            fig[f"step_2d_{tag}_no_augment_pairs_per_s"] = measure_step(a, info, args.steps, args.warmup, peak)[
                "pairs_per_s"
            ]

        def lever(tag: str, main_prec: str | None, name: str, kw: dict[str, Any]) -> None:
            a = pretrain_args(dir2d, **common, batch_augment=True, amp=main_prec, workers=W, **kw)
            flops = fig.get(f"step_2d_{tag}_batch_augment_flops_per_step")
            try:
                step(f"lever_2d_{tag}_{name}_step", a, args.steps, args.warmup, flops)
                loop(f"lever_2d_{tag}_{name}_loop", a, args.steps, args.warmup)
            except Exception as e:  # noqa: BLE001 - torch.compile may fail on a machine without a compiler; keep the rest
                if not kw.get("compile"):
                    raise
                fig[f"lever_2d_{tag}_{name}_error"] = f"{type(e).__name__}: {e}"[:500]
                logger.error("--compile failed, the other figures are kept: %s", fig[f"lever_2d_{tag}_{name}_error"])

        def main_levers(main_prec: str | None) -> None:
            tag = main_prec or "fp32"
            for name, kw in (
                ("check_every_1", dict(check_every=1)),
                ("check_every_20", dict(check_every=20)),
                ("fused", dict(check_every=20, fused=True)),
            ):
                lever(tag, main_prec, name, kw)

        if args.two_d:
            fig["flops_per_pair_paper_size"] = paper_flops_per_pair()
            main_prec = "bf16" if cuda else None
            precision_2d(main_prec)

            # the levers, one after the other on top of each other (--batch_augment, main precision):
            # the step alone shows their effect on the device, the loop the whole effect
            main_levers(main_prec)

            for nw in args.workers:
                for ba in (False, True):
                    for cache in (False, True):
                        a = pretrain_args(dir2d, **common, batch_augment=ba, cache=cache, workers=nw)
                        key = f"pipeline_2d_{'crops_only' if ba else 'monai_augment'}{'_cached' if cache else ''}_w{nw}_pairs_per_s"
                        fig[key] = measure_pipeline(a, info, args.steps, args.warmup)
                        logger.info("%s: %.1f", key, fig[key])
            views = 2 * args.batch_size
            fig["batch_augment_2d_views_per_s"] = measure_batch_augment(
                2, views, args.crop_size, device, max(3, args.steps // 3)
            )
            save_partial()

        if args.three_d:
            dir3d = make_pretrain_data(
                work, 3, 2 if not cuda else 4, 128 if not cuda else 256, 40 if not cuda else 80, W
            )
            crop3 = 96 if cuda else 32
            c3 = dict(
                spatial_dims=3,
                crop=crop3,
                batch=args.batch_size_3d,
                embed=args.embedding_size,
                small=small,
                seed=args.seed,
            )
            res["settings"]["3d"] = {"crop": crop3, "batch": args.batch_size_3d, "embed": args.embedding_size}
            prec3 = "bf16" if cuda else None
            n3 = max(3, args.steps // 3)
            a = pretrain_args(dir3d, **c3, batch_augment=True, amp=prec3, workers=0)
            for k, v in measure_step(a, info, n3, max(1, args.warmup // 3), peak).items():
                fig[f"step_3d_{prec3 or 'fp32'}_batch_augment_{k}"] = v
            for ba in (False, True):
                a = pretrain_args(dir3d, **c3, batch_augment=ba, workers=W)
                key = f"pipeline_3d_{'crops_only' if ba else 'monai_augment'}_w{W}_pairs_per_s"
                fig[key] = measure_pipeline(a, info, n3, 1)
            a = pretrain_args(dir3d, **c3, batch_augment=True, amp=prec3, workers=W)
            loop(f"pretrain_3d_{prec3 or 'fp32'}_batch_augment", a, n3, max(1, args.warmup // 3))

        fig["finetune_pipeline"] = measure_finetune_pipeline(work, W, max(4, args.steps // 2))
        logger.info("fine-tuning loader alone: %s", fig["finetune_pipeline"])
        fig["eval_overhead"] = measure_eval_overhead(work, device)
        logger.info("evaluation beside the model: %s", fig["eval_overhead"])
        save_partial()

        if args.finetune:
            ft_dir, split = make_labelled_data(work, args.ft_cases, 512 if cuda else 96, W)  # FLARE's 512 x 512 slices
            fig["finetune"] = measure_finetune(ft_dir, split, work, W, args.seed, small=not cuda)
            res["settings"]["finetune"] = {"cases": args.ft_cases, "paper_settings": cuda}
            save_partial()

        if args.two_d and args.compile_lever:  # after the fine-tuning: compilation takes minutes
            prec = "bf16" if cuda else None
            lever(prec or "fp32", prec, "fused_compile", dict(check_every=20, fused=True, compile=True))

        if args.two_d and cuda:  # the other precisions last: the paper's fp16, and fp32
            for prec in ("fp16", None):
                precision_2d(prec)

        _ratios(res)
        res["wall_s"] = time.perf_counter() - t0
        res["complete"] = True
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, res)
    _print_table(res)
    logger.info("results written to %s", out_path)
    return res


def _ratios(res: dict[str, Any]) -> None:
    """The comparisons the issue asks for, from the figures.

    * ``pretrain_2d_<prec>_batch_augment_over_monai_workers``: whole loop, --batch_augment / MONAI in workers;
    * ``..._over_paper``: whole loop against the paper's 443 pairs/s;
    * ``pipeline_2d_crops_only[_cached]_w<n>_over_step_<prec>``: what the loader delivers with
      --batch_augment over what the step (with batched augmentations) consumes: at least 1.5 wanted;
    * ``pipeline_2d_monai_augment[_cached]_w<n>_over_step_<prec>``: the same for MONAI's per-sample views;
    * ``step_2d_<prec>_batch_augment_cost_frac``: share of the step spent on the batched augmentations;
    * ``lever_2d_<prec>_<lever>_<step|loop>_over_check_every_1``: each lever (cumulative) against
      the loop that reads every loss on the host; ``..._loss_abs_diff``: its mean loss against that
      loop's (same seed and data: rounding only; SimSiam's loss lies in [-1, 1]);
    * ``pretrain_2d_<prec>_batch_augment_epoch_start_frac``: the loader's start-up over the time of a
      FLARE-size epoch (237,449 slices) at the measured rate: what persistent workers could save.
    """
    f = res["figures"]
    r: dict[str, float] = {}
    for key in [k for k in f if k.startswith("pretrain_2d_") and k.endswith("_batch_augment_pairs_per_s")]:
        other = key.replace("_batch_augment_", "_monai_workers_")
        r[key.replace("_pairs_per_s", "_over_monai_workers")] = f[key] / f[other]
    for key in [k for k in f if k.startswith("pretrain_2d_") and k.endswith("_pairs_per_s")]:
        r[key.replace("_pairs_per_s", "_over_paper")] = f[key] / PAPER_PAIRS_PER_S
    for key in [k for k in f if k.startswith("step_2d_") and k.endswith("_batch_augment_pairs_per_s")]:
        prec = key.split("_")[2]
        plain = f[f"step_2d_{prec}_no_augment_pairs_per_s"]
        r[f"step_2d_{prec}_batch_augment_cost_frac"] = 1.0 - f[key] / plain
        for pk in [p for p in f if p.startswith("pipeline_2d_")]:
            consumer = f[key] if "crops_only" in pk else plain
            r[f"{pk.replace('_pairs_per_s', '')}_over_step_{prec}"] = f[pk] / consumer
    for key in [k for k in f if k.startswith("lever_2d_") and k.endswith("_pairs_per_s")]:
        tag = key.split("_")[2]
        kind = "step" if key.endswith("_step_pairs_per_s") else "loop"
        base = f.get(f"lever_2d_{tag}_check_every_1_{kind}_pairs_per_s")
        if base:
            r[key.replace("_pairs_per_s", "_over_check_every_1")] = f[key] / base
            loss, base_loss = (
                f[key.replace("_pairs_per_s", "_mean_loss")],
                f[f"lever_2d_{tag}_check_every_1_{kind}_mean_loss"],
            )
            r[key.replace("_pairs_per_s", "_loss_abs_diff")] = abs(loss - base_loss)
    for key in [k for k in f if k.startswith("pretrain_2d_") and k.endswith("_batch_augment_first_batch_s")]:
        rate = f[key.replace("_first_batch_s", "_pairs_per_s")]
        r[key.replace("_first_batch_s", "_epoch_start_frac")] = f[key] / (PRETRAIN_SLICES / rate)
    res["ratios"] = r


def _print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['device_name']} ({res['device']}), torch {res['torch']}, {res['threads']} threads")
    rows = [(k, v) for k, v in res["figures"].items() if not isinstance(v, dict)]
    rows += [(f"finetune.{k}", v) for k, v in res["figures"].get("finetune", {}).items()]
    rows += [(f"eval_overhead.{k}", v) for k, v in res["figures"].get("eval_overhead", {}).items()]
    rows += [(f"finetune_pipeline.{k}", v) for k, v in res["figures"].get("finetune_pipeline", {}).items()]
    rows += [(f"ratio.{k}", v) for k, v in res.get("ratios", {}).items()]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v:,.3f}" if isinstance(v, float) else f"  {k:<{w}}  {v:,}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
