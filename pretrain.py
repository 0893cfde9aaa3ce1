"""What ``main_simsiam.py`` and ``main_dino.py`` share: their common flags, the data set of
IoU crop pairs, the check of the IoU interval against the images, the pair audit, and the
epoch loop with logging, checkpoints and resume.

A script supplies only its method (model, loss, optimizer, schedules, per-step hooks) as a
:class:`PretrainMethod` subclass and calls :func:`run_pretraining`::

    class SimSiamMethod(PretrainMethod):
        name = "simsiam"
        ...

    def main(args):
        return run_pretraining(args, SimSiamMethod)

What a run does, in order:

1. check the flags (one clear line and exit code 2 for bad ones);
2. list the images (``data.list_pretrain_images``), read their header sizes, and refuse an
   interval that none of them admits (images smaller than the crop count as padded);
3. build the method, or restore it from ``<run>_last.pt`` with ``--resume``;
4. per epoch: a loader seeded from (seed, epoch, rank) (with ``--batch_augment`` the views are
   augmented on the device in each step, see :func:`augment_views`), ``engine.train_one_epoch``, one JSON
   line in ``<run>_log.jsonl`` (loss, lr, wd, method values, pair audit, speed), then the
   encoder weights ``<run>.pt`` and the full state ``<run>_last.pt``, both atomically;
5. ``<run>_files/result.json`` with what ``main`` returns.

Everything random in an epoch is a function of (seed, epoch, rank): the loader's shuffling
and every transform's random state come from the loader's generator, the global torch
RNG (drop path) is reseeded at the start of each epoch, and so is the device generator of
the batched view augmentations (``--batch_augment``). A run killed at any point and
resumed therefore ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from monai.data import Dataset
from tqdm import tqdm

import engine
from batch_augment import BatchViewAugment
from data import (
    MANIFEST_NAME,
    SliceCache,
    data_fingerprints,
    detect_slice_layout,
    list_pretrain_images,
    png_size,
    read_manifest,
)
from iou_crops import IOU_SAMPLERS, IoUCropSampler
from models import encoder_checkpoint, encoder_config_from_args
from transforms import pretrain_transforms
from utils import UserError, atomic_torch_save

logger = logging.getLogger(__name__)

WANDB_PROJECT = "exploring-ssl-for-ct-pre"
AUDIT_BINS = 10

#: flags whose value must not change when a run is resumed (plus each method's own)
RESUME_KEYS = engine.COMMON_RESUME_KEYS + (
    "min_iou",
    "max_iou",
    "strict_iou",
    "iou_sampler",
    "no_augment",
    "slice_layout",
)

_HELP = {
    "spatial_dims": "2: train on 2D slices (the paper); 3: on 3D volumes with cubic crops.",
    "num_workers": "Data-loading processes per GPU; -1 times a few batches with 0, 2, 4, ... workers and keeps the "
    "fastest. Results depend on this value (each worker has its own random stream).",
}


# ---------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------


def add_common_args(
    parser: argparse.ArgumentParser, method: str, defaults: dict[str, Any], batch_size_aliases: tuple[str, ...] = ()
) -> dict[str, argparse._ArgumentGroup]:
    """Add the flags both pretraining scripts share (the training flags of
    :func:`engine.add_training_args` and the IoU interval), in groups; return the groups by
    name ("data", "model", "optim", "run", "hardware") so a script can add its own flags.

    ``defaults`` sets the method's own defaults for ``base_lr``, ``warmup_epochs`` and ``end_lr``;
    ``batch_size_aliases`` are other names of ``--batch_size`` (the original DINO script's
    ``--batch_size_per_gpu``).
    """
    helps = {
        **_HELP,
        "base_lr": f"Peak learning rate, used as given (no scaling with the batch size; the paper passes 0.025 with "
        f"batch 128 for SimSiam). Default {defaults['base_lr']:g}.",
        "warmup_epochs": f"Epochs of linear learning-rate warm-up before the cosine decay (default {defaults['warmup_epochs']}).",
        "run_name": f"Name of the run; its files are <chkpt_dir>/<run_name>.pt, _last.pt, _log.jsonl, _args.json and "
        f"_files/. Default: {method}_<2|3>d_iou_<min>_<max>.",
        "wandb_project": f"W&B project name (the original's: {WANDB_PROJECT}).",
    }
    groups = engine.add_training_args(
        parser,
        {
            "num_workers": 0,
            "embedding_size": 48,
            "drop_path_rate": 0.1,
            "batch_size": 128,
            "n_epochs": 100,
            "end_lr": 1e-6,
            "wandb_project": WANDB_PROJECT,
            **defaults,
        },
        helps,
        batch_size_aliases,
    )
    g_iou = parser.add_argument_group("IoU-based positives")
    g_iou.add_argument(
        "--min_iou",
        type=float,
        default=0.0,
        help="Smallest IoU allowed between the two crops of a positive pair (0.3 is the paper's best).",
    )
    g_iou.add_argument(
        "--max_iou",
        type=float,
        default=1.0,
        help="Largest IoU allowed between the two crops (0.6 is the paper's best; [0, 1] is plain random cropping).",
    )
    g_iou.add_argument(
        "--iou_sampler",
        choices=IOU_SAMPLERS,
        default="exact",
        help="How the crop pairs are drawn. exact: this project's sampler (every pair in the interval whenever the "
        "image admits one). original: the thesis' Algorithm 1 (up to 4 first crops x 30 second crops, then the "
        "last pair drawn whatever its IoU), to measure what the exact sampler changes; the log reports the "
        "fraction of pairs outside the interval (audit_outside_frac).",
    )
    g_iou.add_argument(
        "--strict_iou",
        action="store_true",
        help="Refuse to start when any image cannot meet the interval. By default such images get the "
        "pair closest to the interval, and the log reports how often (audit_infeasible_frac).",
    )
    groups["data"].add_argument(
        "--no_augment",
        action="store_true",
        help="Leave out the view augmentations (the two crops are used as cut). For debugging "
        "and for comparing runs exactly; never for real pretraining.",
    )
    return groups


def default_run_name(method: str, args: argparse.Namespace) -> str:
    name = f"{method}_{args.spatial_dims}d_iou_{args.min_iou:g}_{args.max_iou:g}"
    return name if args.iou_sampler == "exact" else f"{name}_{args.iou_sampler}"


def check_common_args(args: argparse.Namespace) -> None:
    """Refuse bad flag values with one line each (UserError)."""
    engine.check_training_args(args)
    for name in ("min_iou", "max_iou"):
        v = getattr(args, name)
        if not (0.0 <= v <= 1.0):
            raise UserError(f"--{name} must lie in [0, 1], got {v}")
    if args.min_iou > args.max_iou:
        raise UserError(f"--min_iou {args.min_iou} is larger than --max_iou {args.max_iou}")
    if args.batch_augment and args.no_augment:
        raise UserError("--batch_augment and --no_augment contradict each other (augment on the device, or not at all)")


def apply_low_resource_mode(args: argparse.Namespace) -> None:
    """``--low_resource_mode``: embedding 12 and batch size at most 4 (the heads are shrunk
    by the methods themselves)."""
    if args.low_resource_mode:
        args.embedding_size = min(args.embedding_size, 12)
        args.batch_size = min(args.batch_size, 4)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The encoder configuration for these flags (stored in every checkpoint)."""
    return encoder_config_from_args(args)


# ---------------------------------------------------------------------------------------
# Data: the images, their sizes, the interval check
# ---------------------------------------------------------------------------------------


def image_shape(path: str, spatial_dims: int, layout: str = "ioupos") -> tuple[int, ...]:
    """Spatial size of an image from its header only: (X, Y) of a PNG (of slice ``layout``),
    (X, Y, Z) of a NIfTI.

    Raises:
        UserError: the file cannot be read as an image of that kind.
    """
    if spatial_dims == 2:
        return png_size(path, layout)
    try:
        shape = tuple(int(s) for s in nib.load(path).shape)
    except Exception as e:
        raise UserError(f"cannot read NIfTI {path}: {type(e).__name__}: {e}") from None
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise UserError(f"{path} has shape {shape}; pretraining with --spatial_dims 3 needs 3D volumes")
    return shape[:3]


def check_interval(
    paths: list[str],
    spatial_dims: int,
    crop_size: int,
    min_iou: float,
    max_iou: float,
    strict: bool,
    progress: bool = True,
    layout: str = "ioupos",
) -> dict[str, Any]:
    """Check which images admit a crop pair with IoU in [min_iou, max_iou] (2D slices of ``layout``).

    Sizes come from the file headers; images smaller than the crop count as padded to it
    (as the pipeline pads them). Returns ``{"n_images", "n_infeasible", "infeasible_frac",
    "shapes": {shape: count}}``.

    Raises:
        UserError: no image admits the interval (the message lists the image shapes), or
            ``strict`` and some image does not; a header that cannot be read.
    """
    sampler = IoUCropSampler(crop_size, min_iou, max_iou, strict=False)
    shapes: dict[tuple[int, ...], int] = {}
    for p in tqdm(paths, desc="reading image sizes", disable=not progress or len(paths) < 1000, leave=False):
        s = tuple(max(int(v), crop_size) for v in image_shape(p, spatial_dims, layout))
        shapes[s] = shapes.get(s, 0) + 1
    feasible = {s: sampler.is_feasible(s) for s in shapes}
    n_bad = sum(n for s, n in shapes.items() if not feasible[s])

    def listing(keys) -> str:
        keys = sorted(keys, key=lambda s: -shapes[s])
        txt = ", ".join(f"{'x'.join(map(str, s))} ({shapes[s]})" for s in keys[:6])
        return txt + (f" and {len(keys) - 6} more shapes" if len(keys) > 6 else "")

    interval = f"[{min_iou:g}, {max_iou:g}]"
    if n_bad == len(paths):
        raise UserError(
            f"no image admits two {crop_size}-pixel crops with IoU in {interval}: image sizes after padding to the crop "
            f"are {listing(shapes)}; choose another interval or a smaller --crop_size"
        )
    if n_bad and strict:
        raise UserError(
            f"--strict_iou: {n_bad} of {len(paths)} images admit no pair of {crop_size}-pixel crops with IoU in "
            f"{interval} (sizes {listing([s for s in shapes if not feasible[s]])})"
        )
    if n_bad:
        logger.warning(
            "%d of %d images (%.1f%%) cannot meet the IoU interval %s with %d-pixel crops (sizes %s); they get the "
            "pair closest to the interval (logged per epoch as audit_infeasible_frac)",
            n_bad,
            len(paths),
            100.0 * n_bad / len(paths),
            interval,
            crop_size,
            listing([s for s in shapes if not feasible[s]]),
        )
    return {"n_images": len(paths), "n_infeasible": n_bad, "infeasible_frac": n_bad / len(paths), "shapes": shapes}


def build_dataset(
    args: argparse.Namespace, info: engine.DistInfo, on_listed: Callable[[list[str]], None] | None = None
) -> tuple[Any, dict[str, Any]]:
    """The pretraining data set (``monai.data.Dataset`` of ``{"image": path}`` through
    :func:`transforms.pretrain_transforms`) and the interval check's summary.

    The image listing and header check run on rank 0 and are shared with the other ranks.
    ``on_listed(paths)``, when given, runs on every rank once the listing is known and before
    ``--cache_images`` decodes the slices (a resume refused for changed data stops before that).
    """
    payload: tuple[str, Any]
    if info.is_main:
        try:
            paths = list_pretrain_images(args.data_dir, args.spatial_dims)
            layout = "ioupos"
            if args.spatial_dims == 2:
                layout = detect_slice_layout(args.data_dir, paths, args.slice_layout)
            check_recorded_preprocessing(args)
            if args.max_images:
                paths = paths[: args.max_images]
            check = check_interval(
                paths,
                args.spatial_dims,
                args.crop_size,
                args.min_iou,
                args.max_iou,
                args.strict_iou,
                args.progress,
                layout,
            )
            payload = ("ok", (paths, check, layout))
        except UserError as e:
            payload = ("error", str(e))
    else:
        payload = ("", None)
    if info.distributed:
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
    if payload[0] == "error":
        raise UserError(payload[1])
    paths, check, layout = payload[1]
    logger.info(
        "%d images in %s (%dD%s)",
        len(paths),
        args.data_dir,
        args.spatial_dims,
        ", slices written by the original code's preprocessing" if layout == "original" else "",
    )
    if on_listed is not None:
        on_listed(paths)
    cache = None
    if args.cache_images:
        cache = SliceCache.build(
            paths,
            f"{len(paths):,} slices",
            "--cache_images",
            copies=info.local_world_size,
            progress=args.progress and info.is_main,
            layout=layout,
        )
    # with --batch_augment the workers stop after the IoU crops; the views are augmented in the training step
    augment = not args.no_augment and not args.batch_augment
    tf = pretrain_transforms(
        args.spatial_dims,
        args.crop_size,
        args.min_iou,
        args.max_iou,
        strict=args.strict_iou,
        augment=augment,
        cache=cache,
        sampler=args.iou_sampler,
        layout=layout,
    )
    return Dataset([{"image": p} for p in paths], transform=tf), check


def check_recorded_preprocessing(args: argparse.Namespace) -> None:
    """``--a_min ... --size_z`` against the preprocessing recorded in ``--data_dir``'s
    ``manifest.json``: pretraining reads preprocessed data, so the flags can only confirm it.
    A folder without a manifest (the original's preprocessing) records nothing to check.

    Raises:
        UserError: a given flag differs from the recorded value, or the manifest is unreadable.
    """
    where = os.path.join(args.data_dir, MANIFEST_NAME)
    if os.path.isfile(where):
        engine.check_preprocessing_flags(args, read_manifest(args.data_dir)["args"], where)
    elif any(getattr(args, k, None) is not None for k in engine.PAPER_PREPROCESSING):
        logger.info(
            "%s records no preprocessing (not this project's output): --a_min ... --size_z not checked", args.data_dir
        )


def make_batch_augment(args: argparse.Namespace, epoch: int, info: engine.DistInfo):
    """``--batch_augment``: the batched view chain for one epoch, with a generator on the
    training device seeded from (seed, epoch, rank), so that a resumed run replays the same
    augmentations; None without the flag."""
    if not args.batch_augment:
        return None
    gen = torch.Generator(device=info.device)
    gen.manual_seed(engine.derived_seed(args.seed, epoch, info.rank, 2))
    return BatchViewAugment(args.spatial_dims, gen)


def augment_views(batch: dict[str, Any], aug: Any, device: torch.device) -> dict[str, Any]:
    """Move both views of a batch to ``device`` and, when ``aug`` is given, augment each of
    them there (two independent calls: every sample of every view has its own draw).

    Runs in float32 outside autocast and without gradients. Returns a new dict.
    """
    out = dict(batch)
    for k in ("image1", "image2"):
        out[k] = batch[k].to(device, non_blocking=True)
    if aug is not None:
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            for k in ("image1", "image2"):
                out[k] = aug(out[k])
    return out


# ---------------------------------------------------------------------------------------
# The pair audit
# ---------------------------------------------------------------------------------------


class PairAudit:
    """Per-epoch statistics of the crop pairs that were trained on.

    ``audit_outside_frac``: fraction of pairs whose IoU lies outside [min_iou, max_iou] (the
    exact sampler: only pairs of images that cannot meet the interval; the original's
    Algorithm 1 (``--iou_sampler original``): also its fallbacks to a random pair);
    ``audit_infeasible_frac``: fraction of pairs whose image could not meet the interval
    at all; ``audit_iou_hist``: counts of realised IoUs in 10 equal bins over [0, 1] (the
    last bin includes 1); ``audit_iou_mean``; ``audit_pairs``. Summed over all ranks.
    """

    def __init__(self, min_iou: float = 0.0, max_iou: float = 1.0) -> None:
        self.min_iou = float(min_iou)
        self.max_iou = float(max_iou)
        self.n = 0
        self.n_infeasible = 0
        self.n_outside = 0
        self.iou_sum = 0.0
        self.hist = np.zeros(AUDIT_BINS, dtype=np.int64)

    def update(self, batch: dict[str, Any]) -> None:
        iou = torch.as_tensor(batch["iou_value"]).double().flatten().cpu().numpy()
        ok = torch.as_tensor(batch["iou_feasible"]).bool().flatten().cpu().numpy()
        self.n += int(iou.size)
        self.n_infeasible += int((~ok).sum())
        # the same float64 comparison as the samplers' (the IoUs travel as float64)
        self.n_outside += int(((iou < self.min_iou) | (iou > self.max_iou)).sum())
        self.iou_sum += float(iou.sum())
        self.hist += np.histogram(iou, bins=AUDIT_BINS, range=(0.0, 1.0))[0]

    def summary(self, info: engine.DistInfo) -> dict[str, Any]:
        t = torch.tensor(
            [self.n, self.n_infeasible, self.n_outside, self.iou_sum, *self.hist.tolist()],
            dtype=torch.float64,
            device=info.device,
        )
        if info.distributed:
            dist.all_reduce(t)
        v = t.cpu().tolist()
        n = int(round(v[0]))
        return {
            "audit_pairs": n,
            "audit_infeasible_frac": v[1] / n if n else 0.0,
            "audit_outside_frac": v[2] / n if n else 0.0,
            "audit_iou_mean": v[3] / n if n else float("nan"),
            "audit_iou_hist": [int(round(c)) for c in v[4:]],
        }


# ---------------------------------------------------------------------------------------
# The method interface
# ---------------------------------------------------------------------------------------


class PretrainMethod:
    """What a pretraining method provides to :func:`run_pretraining`.

    Subclasses set ``name`` and ``resume_keys`` (their own flags that must not change on
    resume), build everything in ``__init__`` and set these attributes:

    * ``train_module``: the module ``engine.train_one_epoch`` trains (DDP-wrapped when distributed);
    * ``optimizer``, ``lr_schedule``, ``wd_schedule`` (per-iteration arrays), ``base_lr``
      (the lr of fixed-lr groups), ``clip_grad`` and ``clip_mode``;
    * ``encoder``: the encoder whose weights go into ``<run>.pt``.
    """

    name = "method"
    resume_keys: tuple[str, ...] = ()
    clip_grad: float = 0.0
    clip_mode: str = "global"

    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any], info: engine.DistInfo, iters_per_epoch: int):
        self.args = args
        self.cfg = cfg
        self.info = info
        self.iters_per_epoch = iters_per_epoch

    @staticmethod
    def adjust_args(args: argparse.Namespace) -> None:
        """Method-specific flag checks and ``--low_resource_mode`` changes (in place)."""

    def loss_fn(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward pass of one batch: the loss and scalars to average (tensors are read on the
        host only every ``--check_every`` batches)."""
        raise NotImplementedError

    def compile(self) -> None:
        """``--compile``: compile the forward passes (``train_module``; methods add theirs)."""
        self.train_module = engine.maybe_compile(self.train_module, self.args)

    def before_optimizer_step(self, it: int) -> None:
        """Called after clipping, just before ``optimizer.step()`` (global iteration ``it``)."""

    def after_optimizer_step(self, it: int) -> None:
        """Called after ``optimizer.step()`` (global iteration ``it``)."""

    def epoch_record(self, epoch: int) -> dict[str, float]:
        """Method values to log for the epoch just trained (0-based ``epoch``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def extra_checkpoint(self) -> dict[str, Any]:
        """Extra entries of the pretrained-weights file (e.g. DINO's student encoder)."""
        return {}


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run_pretraining(args: argparse.Namespace, method_cls: type[PretrainMethod]) -> dict[str, Any]:
    """Run (or resume) one pretraining; return the run's result (also written to
    ``<run>_files/result.json``): ``{"run_name", "method", "weights", "last", "log",
    "epochs_done", "final"}`` where ``final`` is the last epoch's log record.

    Raises:
        UserError: bad flags or data (exit code 2); TrainingError: a non-finite loss (exit code 1).
    """
    args = argparse.Namespace(**vars(args))  # never change the caller's namespace
    check_common_args(args)
    apply_low_resource_mode(args)
    method_cls.adjust_args(args)
    args.data_dir = os.path.abspath(args.data_dir)
    if args.run_name is None:
        args.run_name = default_run_name(method_cls.name, args)
    with engine.distributed(args.device) as info:
        return _run(args, method_cls, info)


def _run(args: argparse.Namespace, method_cls: type[PretrainMethod], info: engine.DistInfo) -> dict[str, Any]:
    run = engine.RunFiles(args.chkpt_dir, args.run_name, method_cls.name, info)
    paths = run.paths
    logger.info("%s pretraining run %r; its files go to %s", method_cls.name, args.run_name, paths["chkpt_dir"])
    args_d = engine.args_dict(args)
    state = run.open(args.resume, args_d, RESUME_KEYS + method_cls.resume_keys, inputs={"--data_dir": args.data_dir})
    if state is not None and int(state.get("world_size", 1)) != info.world_size:
        raise UserError(
            f"cannot resume {run.resume_path!r} with {info.world_size} processes: it was started with "
            f"{state.get('world_size')} (the data partition would change)"
        )

    dataset, check = build_dataset(
        args, info, on_listed=lambda paths: run.pin_inputs(state, data_fingerprints(args.data_dir, paths))
    )
    per_rank = len(dataset) // info.world_size
    iters_per_epoch = per_rank // args.batch_size // args.accum_iters
    if iters_per_epoch == 0:
        raise UserError(
            f"{len(dataset)} images are too few for one optimizer step of --batch_size {args.batch_size} x "
            f"--accum_iters {args.accum_iters} x {info.world_size} processes"
        )
    num_workers = engine.resolve_num_workers(args.num_workers, state, dataset, args.batch_size)

    cfg = model_config(args)
    engine.fix_random_seeds(args.seed)
    method = method_cls(args, cfg, info, iters_per_epoch)
    method.compile()
    amp = engine.Amp(info.device, args.use_amp, args.amp_dtype)

    start_epoch, wandb_id, last_record = 0, None, None
    if state is not None:
        method.load_state_dict(state["method_state"])
        amp.load_state_dict(state.get("amp", {}))
        engine.set_rng_state(state["rng"])
        start_epoch = int(state["epoch"])
        wandb_id = state.get("wandb_id")
        last_record = run.restore_log(state)
        logger.info("resumed %s after epoch %d of %d", run.resume_path, start_epoch, args.n_epochs)

    engine.write_args(
        paths,
        {
            **args_d,
            "model_config": cfg,
            "num_workers_used": num_workers,
            "world_size": info.world_size,
            "inputs": run.inputs,
        },
        info,
    )
    epoch_logger = engine.EpochLogger(paths, info, args.use_wandb, args.wandb_project, args_d, wandb_id)
    try:
        for epoch in range(start_epoch, args.n_epochs):
            last_record = _train_epoch(args, method, amp, dataset, num_workers, epoch, info, iters_per_epoch)
            if info.is_main:
                weights = encoder_checkpoint(
                    method.encoder, cfg, method.name, epoch + 1, args_d, **method.extra_checkpoint()
                )
                atomic_torch_save(weights, paths["weights"])
            run.end_epoch(
                {
                    "epoch": epoch + 1,
                    "method_state": method.state_dict(),
                    "amp": amp.state_dict(),
                    "rng": engine.rng_state(),
                    "wandb_id": epoch_logger.wandb_id,
                    "args": args_d,
                    "model_config": cfg,
                    "num_workers": num_workers,
                    "world_size": info.world_size,
                },
                last_record,
                epoch_logger,
            )
            logger.info(
                "epoch %d/%d: loss %.4f, lr %.3g, IoU mean %.3f, outside the interval %.1f%% (infeasible images "
                "%.1f%%), %.1f pairs/s",
                epoch + 1,
                args.n_epochs,
                last_record["loss"],
                last_record["lr"],
                last_record["audit_iou_mean"],
                100 * last_record["audit_outside_frac"],
                100 * last_record["audit_infeasible_frac"],
                last_record["pairs_per_s"],
            )
    finally:
        epoch_logger.finish()

    result = {
        "run_name": args.run_name,
        "method": method.name,
        "weights": paths["weights"],
        "last": paths["last"],
        "log": paths["log"],
        "args": paths["args"],
        "epochs_done": args.n_epochs,
        "images": check["n_images"],
        "images_infeasible_frac": check["infeasible_frac"],
        "final": last_record,
    }
    run.write_result(result)
    return result


def _train_epoch(
    args: argparse.Namespace,
    method: PretrainMethod,
    amp: engine.Amp,
    dataset: Any,
    num_workers: int,
    epoch: int,
    info: engine.DistInfo,
    iters_per_epoch: int,
) -> dict[str, Any]:
    """One epoch: a fresh loader seeded from (seed, epoch, rank), training, the log record."""
    torch.manual_seed(engine.derived_seed(args.seed, epoch, info.rank, 1))  # model randomness (drop path)
    loader = engine.build_loader(
        dataset,
        args.batch_size,
        num_workers,
        args.seed,
        epoch,
        info,
        shuffle=True,
        drop_last=True,
        pin_memory=info.device.type == "cuda",
    )
    audit = PairAudit(args.min_iou, args.max_iou)
    aug = make_batch_augment(args, epoch, info)

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        audit.update(batch)
        return method.loss_fn(augment_views(batch, aug, info.device), epoch)

    t0 = time.perf_counter()
    try:
        stats = engine.train_one_epoch(
            method.train_module,
            loader,
            method.optimizer,
            loss_fn,
            epoch=epoch,
            n_epochs=args.n_epochs,
            iters_per_epoch=iters_per_epoch,
            lr_schedule=method.lr_schedule,
            base_lr=method.base_lr,
            wd_schedule=method.wd_schedule,
            amp=amp,
            accum_iters=args.accum_iters,
            clip_grad=method.clip_grad,
            clip_mode=method.clip_mode,
            before_optimizer_step=method.before_optimizer_step,
            after_optimizer_step=method.after_optimizer_step,
            info=info,
            progress=args.progress,
            check_every=args.check_every,
        )
    finally:
        del loader
    dt = time.perf_counter() - t0
    record: dict[str, Any] = {"epoch": epoch + 1, **stats, **method.epoch_record(epoch), **audit.summary(info)}
    record["epoch_time_s"] = dt
    record["pairs_per_s"] = record["audit_pairs"] / dt if dt > 0 else float("nan")
    return record
